"""Occlusion's incremental passes (attribution/_incremental.py) against its plain passes: the grid of every placement
equal at float rounding on torchvision's MobileNetV2 and ResNet-18 and on a small net with odd kernels, strides,
paddings, dilation, groups, pooling and skip connections over the cut (1D, 2D, 3D; windows at every border, a stride
that does not divide the size, several images, blurred and tensor baselines); where it falls back; the model."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_vis as lv
from lightning_vis.attribution import _incremental, perturbation
from lightning_vis.hooks import hook_counts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


class Odd(nn.Module):
    """Every kind of step: a 5-kernel stride-2 padding-1 conv, a dilated grouped conv with a residual add, a 1x1
    stride-2 conv (it skips positions), an even "same" kernel, a product of two maps, max pooling with padding and
    ceil mode, average pooling with padding, and a head that reads a map from before the last steps (a skip over
    the cut)."""

    def __init__(self, dims=2):
        super().__init__()
        conv = CONV[dims]
        self.a, self.bn_a = conv(3, 8, 5, stride=2, padding=1), BN[dims](8)
        self.b, self.bn_b = conv(8, 8, 3, padding=2, dilation=2, groups=4), BN[dims](8)
        self.c = conv(8, 8, 1, stride=2)
        self.d = conv(8, 8, 4, padding="same")
        self.max, self.avg = MAX[dims](3, stride=2, padding=1, ceil_mode=True), AVG[dims](3, stride=1, padding=1)
        self.fc, self.skip = nn.Linear(8, 5), nn.Linear(8, 5)
        for bn in (self.bn_a, self.bn_b):  # statistics that fold into something other than the identity
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        a = F.relu(self.bn_a(self.a(x)))
        b = F.hardswish(self.bn_b(self.b(a))) + a
        c = self.c(b) * 0.5
        d = torch.sigmoid(self.d(c)) * c
        e = self.max(d)
        f = self.avg(e) - e
        return self.fc(f.flatten(2).mean(2)) + self.skip(b.flatten(2).amax(2))


def both(model, x, target, monkeypatch, **kw):
    """(incremental result, plain result, the Incremental that ran)."""
    made = []

    def spy(*args, **kwargs):
        made.append(_incremental.incremental(*args, **kwargs))
        return made[-1]

    with monkeypatch.context() as m:
        m.setattr(perturbation, "incremental", spy)
        fast = lv.occlusion(model, x, target, **kw)
    with monkeypatch.context() as m:
        m.setattr(_incremental, "ENABLED", False)
        plain = lv.occlusion(model, x, target, **kw)
    return fast, plain, made[0] if made else None


def same(fast, plain):
    scale = float(plain.grid.abs().max())
    torch.testing.assert_close(fast.grid, plain.grid, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(fast.maps, plain.maps, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(fast.scores, plain.scores, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("dims,size,window,stride", [(2, (23, 21), (5, 4), (3, 4)), (2, (23, 21), (1, 2), (1, 2)),
                                                     (1, (29,), (6,), (4,)), (3, (19, 21, 20), (5, 6, 6), (4, 5, 6))])
def test_odd_net_equals_the_plain_passes(dims, size, window, stride, early, monkeypatch):
    """Every kind of step on crops (as far as the graph allows, or cut early: skips pasted), windows
    at every border and cut by the edge (stride does not divide the size), thin windows, three images, a blurred
    baseline."""
    monkeypatch.setattr(_incremental, "PREFIX_FRACTION", 0.7 ** dims if early else math.inf)
    torch.manual_seed(0)
    net = Odd(dims).eval()
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    baseline = "blur" if dims == 2 else 0.3
    fast, plain, inc = both(net, x, torch.tensor([0, 3, 1]), monkeypatch, window=window, stride=stride,
                            baseline=baseline, chunk_size=7)
    same(fast, plain)
    assert inc is not None and inc.suffix is not None  # it ran, and its check on the first pass held
    kinds = {type(s.module) for s in inc.steps if s.module is not None}
    if not early:  # the input, 6 windowed steps and 7 elementwise ones
        assert {CONV[dims], MAX[dims], AVG[dims]} <= kinds and len(inc.steps) == 14
    else:
        assert 2 < len(inc.steps) < 14


def test_an_output_that_is_not_a_tensor_of_rows(monkeypatch):
    """A tuple output (scores by a callable target): the rest of the graph runs a pass at a time, not on a block."""

    class Pair(Odd):
        def forward(self, x):
            return super().forward(x), x.flatten(1).amax(1)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 23, 21, generator=torch.Generator().manual_seed(7))
    fast, plain, inc = both(Pair().eval(), x, lambda out: out[0][:, 2] * out[1], monkeypatch, window=5, stride=3)
    same(fast, plain)
    assert inc is not None and inc.suffix is not None and not inc.rows_out and inc.block_rows > 10


def test_windows_a_strided_conv_never_reads(monkeypatch):
    """A 1x1 stride-2 convolution reads the even positions only: a window on an odd one changes nothing (its crop
    is empty, the clean maps go on), on an even one it does."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(6))
    fast, plain, inc = both(net, x, 1, monkeypatch, window=1, stride=1)
    same(fast, plain)
    assert inc is not None and inc.suffix is not None
    odd = fast.grid[:, 1::2]
    torch.testing.assert_close(odd, fast.scores[:, None, None].expand_as(odd), rtol=0, atol=0)
    assert (fast.grid[:, ::2, ::2] != fast.scores[:, None, None]).all()


def test_mobilenet_v2_and_resnet18_equal_the_plain_passes(monkeypatch):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    b = torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(3))  # one baseline for every image
    for net, cut in ((tv.models.mobilenet_v2().eval(), "features"), (tv.models.resnet18().eval(), "layer")):
        fast, plain, inc = both(net, x, None, monkeypatch, window=24, stride=12, baseline=b)
        same(fast, plain)
        assert inc is not None and inc.suffix is not None
        assert sum(s.kind == "windowed" for s in inc.steps) >= 5 and all(u.name.startswith(cut) for u in inc.cut)


def test_falls_back_where_it_does_not_apply(monkeypatch):
    """No graph (no BatchNorm: FastForward runs the model itself), a unit's maps, a dict of inputs, an in-place
    operation on a map another node reads, clean maps over half the memory budget, a check on the first pass that
    fails: the plain passes' values."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    plain_net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(4, 3)).eval()
    fast, plain, inc = both(plain_net, x, 1, monkeypatch, window=4, stride=2)
    same(fast, plain)
    assert inc is None

    net = Odd().eval()
    calls = []
    monkeypatch.setattr(perturbation, "incremental", lambda *a, **k: calls.append(1))
    lv.occlusion(net, x, window=4, unit=("a", 2))

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Odd().eval()

        def forward(self, pixel_values, scale):
            return self.net(pixel_values) * scale

    lv.occlusion(Keyword().eval(), {"pixel_values": x, "scale": torch.tensor(2.0)}, window=4)
    assert not calls
    monkeypatch.undo()

    class Rewrites(nn.Module):  # relu_ rewrites the map the sum reads too
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.fc((y.relu_() + y).mean((2, 3)))

    fast, plain, inc = both(Rewrites().eval(), x, 1, monkeypatch, window=4, stride=2)
    same(fast, plain)
    assert inc is None

    fast, plain, inc = both(net, x, 1, monkeypatch, window=4, stride=2, memory_budget=4000)  # no room to keep maps
    same(fast, plain)
    assert inc is not None and inc.clean is None and inc.suffix is None

    def wrong(self, rows):
        return right(self, rows) + 1
    right = _incremental.Incremental._rows
    monkeypatch.setattr(_incremental.Incremental, "_rows", wrong)
    fast, plain, inc = both(net, x, 1, monkeypatch, window=4, stride=2)
    same(fast, plain)
    assert inc is not None and inc.checked and inc.suffix is None


def test_the_model_is_left_as_it_was(monkeypatch):
    net = Odd()  # in training mode
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modules = dict(net.named_modules())  # the copy folds without deep-copying the model: none of them replaced
    hooks = hook_counts(net)
    x = torch.randn(2, 3, 23, 21, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = net.eval()(x)
    net.train()
    fast, plain, inc = both(net, x, 2, monkeypatch, window=5, stride=3)
    same(fast, plain)
    assert inc is not None and inc.suffix is not None
    assert all(m.training for m in net.modules()) and hook_counts(net) == hooks
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    after = dict(net.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is m for k, m in modules.items())
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), before, rtol=0, atol=0)
