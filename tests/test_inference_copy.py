"""The activation-only CAMs' inference copy (attribution._inference): built on the second call with unchanged
weights, equal to the model's own pass, dropped when the weights change (in place, through .data, or a module
replaced), never built where it does not apply, and the user's model untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_vis as lv
from lightning_vis.attribution import _common, _inference


def bn_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.5),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    for bn in (net[1], net[5]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return net


def entry(model, layer="5", shape=(3, 16, 16)):
    table = _inference._COPIES.models.get(model, {})
    return next((e for k, e in table.items() if k[0] == layer and k[2] == shape), None)


def eager_maps(model, x, layer, target, method="eigencam"):
    """The CAM by the model itself: a copy of the model, whose fingerprint no earlier call has seen."""
    return lv.grad_cam(copy.deepcopy(model), x, layer, target, method=method)


@pytest.fixture
def only_copy(monkeypatch):
    """fastest_format takes the copy whenever there is one (the timed choice is checked in test_memory_format), and
    a copy is built on the second call with the same weights (these nets' passes take far less than BUILD_AFTER)."""
    monkeypatch.setattr(_inference, "BUILD_AFTER", 0.0)
    real = _common._FORMATS.pick
    monkeypatch.setattr(_common._FORMATS, "pick", lambda model, key, ways: "copy" if "copy" in ways
                        else real(model, key, ways))


@pytest.mark.parametrize("method", ["eigencam", "fem", "kpcacam"])
def test_built_on_the_second_call_and_equal_to_the_model(only_copy, method):
    model = bn_net()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    want = eager_maps(model, x, "5", [0, 3, 1], method)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mods = list(model.modules())
    first = lv.grad_cam(model, x, "5", [0, 3, 1], method=method)
    assert entry(model).copy is None and entry(model).calls == 1
    lv.grad_cam(model, x, "5", [0, 3, 1], method=method)  # builds and checks the copy
    e = entry(model)
    assert e.copy is not None and not e.failed
    runs = []
    e.copy.register_forward_hook(lambda *a: runs.append(1))
    third = lv.grad_cam(model, x, "5", [0, 3, 1], method=method)
    assert runs == [1]  # the copy ran
    for got in (first, third):
        torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-5 * float(want.maps.abs().max()))
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-5)
    assert list(model.modules()) == mods and not any(m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not m.training for m in model.modules())


class InPlaceSkip(nn.Module):
    """Adds into the layer's output in place, after the layer returned it (a skip connection written in place)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        a = self.bn1(self.conv1(x))
        b = torch.relu(self.conv2(a))
        return self.head(a.add_(b))


class Clocked(nn.Module):
    """bn_net whose every eager pass advances a fake CPU clock by `step` seconds."""

    def __init__(self, clock, step):
        super().__init__()
        self.net, self.clock, self.step = bn_net(), clock, step

    def forward(self, x):
        self.clock["now"] += self.step
        return self.net(x)


@pytest.mark.parametrize("step, built_on", [(0.2, 3), (1.0, 2)])
def test_built_once_the_passes_with_the_same_weights_took_build_after(monkeypatch, step, built_on):
    """BUILD_AFTER 0.5 s: passes of 0.2 s build on the 3rd call; one pass of 1 s does not build on its own call (the
    weights must stay over more than one call), the 2nd call builds."""
    clock = {"now": 0.0}
    monkeypatch.setattr(_common.time, "process_time", lambda: clock["now"])
    monkeypatch.setattr(_inference, "BUILD_AFTER", 0.5)
    model = Clocked(clock, step).eval()
    x = torch.randn(2, 3, 16, 16)
    for call in range(1, 5):
        lv.grad_cam(model, x, "net.5", 1, method="eigencam")
        e = entry(model, "net.5")
        assert (e.copy is not None) == (call >= built_on), call


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "gradcam"])
def test_not_for_the_cams_that_compare_passes(only_copy, method):
    """Score-CAM and Ablation-CAM compare their first pass's scores with passes run channels-last: that pass runs
    channels-last too, never the copy; gradient CAMs run the model itself."""
    model = bn_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        lv.grad_cam(model, x, "5", [0, 3], method=method)
    assert entry(model) is None and model not in _common._FORMATS.times


def test_the_layer_output_is_read_before_a_later_in_place_op(only_copy):
    model = InPlaceSkip().eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    want = eager_maps(model, x, "bn1", 1)
    for _ in range(3):
        got = lv.grad_cam(model, x, "bn1", 1, method="eigencam")
    assert entry(model, "bn1", (3, 12, 12)).copy is not None
    torch.testing.assert_close(got.low_res, want.low_res, rtol=1e-4, atol=1e-5 * float(want.low_res.abs().max()))


@pytest.mark.parametrize("change", ["optimizer step", ".data", "module replaced", "buffer"])
def test_a_change_of_weights_drops_the_copy(only_copy, change):
    model = bn_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        lv.grad_cam(model, x, "5", 2, method="eigencam")
    assert entry(model).copy is not None
    if change == "optimizer step":
        model[4].weight.requires_grad_(True)
        model(x).sum().backward()
        torch.optim.SGD([model[4].weight], lr=0.5).step()
        model[4].weight.grad = None
    elif change == ".data":
        model[10].weight.data.mul_(-1.0)  # no version counter sees this
    elif change == "module replaced":
        model[10] = nn.Linear(16, 5)
    else:
        model[5].running_mean.data.add_(1.0)
    want = eager_maps(model, x, "5", 2)
    got = lv.grad_cam(model, x, "5", 2, method="eigencam")
    assert entry(model).copy is None  # dropped: this call ran the model itself
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-6)
    lv.grad_cam(model, x, "5", 2, method="eigencam")
    assert entry(model).copy is not None  # rebuilt for the new weights on the next call
    again = lv.grad_cam(model, x, "5", 2, method="eigencam")
    torch.testing.assert_close(again.maps, want.maps, rtol=1e-4, atol=1e-5 * float(want.maps.abs().max()))


class Shared(nn.Module):
    """Runs its conv twice: the layer's output is not one value."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.conv(torch.relu(self.conv(x))).mean((2, 3)))


class Branchy(nn.Module):
    """Control flow on a value: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.mean() > 100:
            y = -y
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("case", ["shared layer", "untraceable", "float64", "hooked", "3D input"])
def test_where_it_does_not_apply_the_model_runs_itself(only_copy, case):
    torch.manual_seed(0)
    model, layer, x = bn_net().eval(), "5", torch.randn(2, 3, 16, 16)
    if case == "shared layer":
        model, layer = Shared().eval(), "conv"
    elif case == "untraceable":
        model, layer, x = Branchy().eval(), "bn", torch.randn(2, 3, 8, 8)
    elif case == "float64":
        model, x = model.double(), x.double()
    elif case == "hooked":
        model[8].register_forward_hook(lambda *a: None)
    else:
        model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                              nn.Flatten(), nn.Linear(4, 2)).eval()
        layer, x = "1", torch.randn(2, 3, 4, 6, 6)
    want = eager_maps(model, x, layer, 1)
    for _ in range(3):
        got = lv.grad_cam(model, x, layer, 1, method="eigencam")
        torch.testing.assert_close(got.maps, want.maps)
    e = entry(model, layer, tuple(x.shape[1:]))
    if case in ("shared layer", "untraceable"):
        assert e.copy is None and e.failed
    else:
        assert e is None


class Squeeze(nn.Module):
    """A squeeze-and-excitation block (MobileNetV3's): oneDNN's layout cannot broadcast its product, so the copy
    raises on its check."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.conv2, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))
        return self.head(self.conv2(y).mean((2, 3)))


def test_a_copy_that_raises_is_dropped_silently(only_copy, capfd):
    """On its check (MobileNetV3's squeeze-and-excitation), or on a later call: the model itself runs, the copy is
    not built again, and nothing is printed (torch.fx prints a failing graph's code to stderr)."""
    model = Squeeze().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    want = eager_maps(model, x, "conv2", 1)
    for _ in range(3):
        got = lv.grad_cam(model, x, "conv2", 1, method="eigencam")
        torch.testing.assert_close(got.maps, want.maps)
    assert entry(model, "conv2", (3, 8, 8)).failed
    model = bn_net()
    x = torch.randn(2, 3, 16, 16)
    want = eager_maps(model, x, "5", 1)
    for _ in range(2):
        lv.grad_cam(model, x, "5", 1, method="eigencam")
    e = entry(model)
    assert e.copy is not None

    def boom(xx):
        raise RuntimeError("a batch the copy cannot take")
    e.copy = boom
    got = lv.grad_cam(model, x, "5", 1, method="eigencam")
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-6)
    assert e.failed and e.copy is None
    assert capfd.readouterr().err == ""


def test_a_copy_slower_than_the_model_is_dropped_for_good(monkeypatch):
    """With a clock under which the copy's passes are the slowest, the timed choice drops it; the key is not
    fingerprinted or built again."""
    clock = {"now": 0.0}
    monkeypatch.setattr(_common.time, "process_time", lambda: clock["now"])
    monkeypatch.setattr(_inference, "BUILD_AFTER", 0.0)
    real = _common.fastest_format

    def slow_copy(key, x, fn, others=None, **kw):
        if others:
            others = {k: (lambda f: lambda xx: (clock.__setitem__("now", clock["now"] + 1.0), f(xx))[1])(f)
                      for k, f in others.items()}
        return real(key, x, fn, others, **kw)
    monkeypatch.setattr("lightning_vis.attribution.cams.fastest_format", slow_copy)
    model = bn_net()
    x = torch.randn(2, 3, 16, 16)
    calls = []
    monkeypatch.setattr(_inference, "fingerprint", lambda m, x, f=_inference.fingerprint: calls.append(1) or f(m, x))
    for _ in range(2 + 3 * _common.FORMAT_TRIES):
        lv.grad_cam(model, x, "5", 0, method="eigencam")
    e = entry(model)
    assert e.failed and e.copy is None
    n = len(calls)
    lv.grad_cam(model, x, "5", 0, method="eigencam")
    assert len(calls) == n
