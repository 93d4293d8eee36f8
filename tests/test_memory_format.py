"""fastest_format: the memory format (channels-last or as given) a model's no-grad passes run in, chosen from timed
passes per model and input shape. The clock is replaced by one the passes advance, so the choice is checked
exactly; the values must not depend on it."""

import gc
import weakref

import pytest
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis.attribution import _common, _inference
from lightning_vis.attribution._common import FORMAT_SHAPES, FORMAT_TRIES, FastForward, fastest_format


class Clock:
    """A process_time that moves only when a pass says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(_common.time, "process_time", c)
    return c


def is_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def timed(clock, last_s, given_s, seen):
    """A pass that takes last_s seconds in channels-last memory and given_s as given, and notes which it got."""
    def fn(x):
        last = is_last(x)
        seen.append(last)
        clock.now += last_s if last else given_s
        return x * 2
    return fn


@pytest.mark.parametrize("last_s, given_s, keep", [(0.01, 0.03, True), (0.03, 0.01, False)])
def test_alternates_then_keeps_the_faster(clock, last_s, given_s, keep):
    key, seen = nn.Conv2d(3, 3, 1), []
    x = torch.randn(2, 3, 5, 5)
    for _ in range(2 * FORMAT_TRIES + 3):
        out = fastest_format(key, x, timed(clock, last_s, given_s, seen))
        torch.testing.assert_close(out, x * 2)
    assert seen[:2 * FORMAT_TRIES] == [True, False] * FORMAT_TRIES
    assert seen[2 * FORMAT_TRIES:] == [keep] * 3


def test_the_best_pass_of_each_decides(clock):
    """The first pass in each format pays for its set-up: a slow first channels-last pass does not decide."""
    key, seen = nn.Conv2d(3, 3, 1), []
    x = torch.randn(1, 3, 5, 5)
    costs = iter([(0.09, 0), (0, 0.02), (0.01, 0), (0, 0.02)])

    def fn(xx):
        a, b = next(costs, (0.01, 0.02))
        seen.append(is_last(xx))
        clock.now += a if is_last(xx) else b
        return xx
    for _ in range(6):
        fastest_format(key, x, fn)
    assert seen == [True, False, True, False, True, True]


def test_each_shape_is_timed_on_its_own(clock):
    key = nn.Conv2d(3, 3, 1)
    a, b = [], []
    for _ in range(2 * FORMAT_TRIES):
        fastest_format(key, torch.randn(1, 3, 4, 4), timed(clock, 0.03, 0.01, a))
    fastest_format(key, torch.randn(1, 3, 4, 4), timed(clock, 0.03, 0.01, a))
    fastest_format(key, torch.randn(2, 3, 4, 4), timed(clock, 0.03, 0.01, b))  # a new shape starts channels-last
    assert a[-1] is False and b == [True]


def test_the_shapes_remembered_are_bounded(clock):
    key = nn.Conv2d(3, 3, 1)
    for n in range(1, FORMAT_SHAPES + 10):
        fastest_format(key, torch.randn(n, 3, 2, 2), timed(clock, 0.01, 0.02, []))
    table = _common._FORMATS.times[key]
    assert len(table) == FORMAT_SHAPES and ((FORMAT_SHAPES + 9, 3, 2, 2), torch.float32) in table
    ref = weakref.ref(key)
    del key, table  # the timings do not keep the model alive
    gc.collect()
    assert ref() is None


class ViewNet(nn.Module):
    """Flattens its maps with .view, which channels-last memory refuses; counts its passes by memory format."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)
        self.formats = []

    def forward(self, x):
        self.formats.append(is_last(x))
        return self.fc(torch.relu(self.conv(x)).view(x.shape[0], -1))


def test_a_model_that_needs_contiguous_maps_runs_as_given_from_then_on():
    model = ViewNet().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        act = model.conv(x)
    first = lv.grad_cam(model, x, "conv", target=[0, 2], method="eigencam")
    assert model.formats == [True, False]  # channels-last raised, then as given
    again = lv.grad_cam(model, x, "conv", target=[0, 2], method="eigencam")
    assert model.formats == [True, False, False]
    torch.testing.assert_close(first.maps, again.maps)
    for i in range(2):  # Eigen-CAM by hand: centred positions projected on their first right-singular vector
        a = act[i].flatten(1).T.double()  # (positions, C)
        a = a - a.mean(0)
        proj = a @ torch.linalg.svd(a, full_matrices=False)[2][0]
        total = act[i].sum(0).flatten().double()
        proj = proj if torch.dot(proj - proj.mean(), total - total.mean()) >= 0 else -proj
        torch.testing.assert_close(first.low_res[i].flatten().double(), proj.clamp_min(0), rtol=1e-4, atol=1e-5)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        self.conv(x)
        raise RuntimeError("broken whatever the memory format")


def test_an_error_that_is_not_the_formats_is_raised_and_marks_nothing():
    model = Broken()
    with pytest.raises(RuntimeError, match="broken whatever"):
        fastest_format(model, torch.randn(1, 3, 4, 4), model)
    assert not _common._FORMATS.refused(model)


def test_inputs_other_than_4d_run_as_given(clock):
    seen = []
    key = nn.Conv1d(3, 3, 1)
    for _ in range(3):
        fastest_format(key, torch.randn(1, 3, 4), lambda x: seen.append(x.is_contiguous()))
    assert seen == [True] * 3 and key not in _common._FORMATS.times


def test_fastforward_and_eigencam_values_do_not_depend_on_the_format(clock, monkeypatch):
    """Every pass of a BatchNorm net's Eigen-CAM gives the same values whichever way it runs; FastForward's passes all
    run channels-last."""
    monkeypatch.setattr(_inference, "BUILD_AFTER", 0.0)  # the copy is built on the second call
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 12, 12)
    maps = [lv.grad_cam(model, x, "3", target=1, method="eigencam").maps for _ in range(3 * FORMAT_TRIES + 1)]
    for m in maps[1:]:
        torch.testing.assert_close(m, maps[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want = model(x)
        ff = FastForward(model, x[:1], lambda o: o[:, 1])
        assert ff.run is not model and ff.model is model and ff.fast
        seen = []
        ff.run.register_forward_pre_hook(lambda m, a: seen.append(is_last(a[0])))
        for _ in range(2 * FORMAT_TRIES + 1):
            torch.testing.assert_close(ff(x), want, rtol=1e-4, atol=1e-5)
        assert seen == [True] * (2 * FORMAT_TRIES + 1)  # every pass the same computation
    table = _common._FORMATS.times[model]
    # Eigen-CAM also timed its inference copy (built on its second call, see test_inference_copy.py); FastForward's
    # passes are not timed: channels-last every time
    assert [sorted(ways) for ways in table.values()] == [["copy", "given", "last"]]
    assert all(len(t) == FORMAT_TRIES for ways in table.values() for t in ways.values())
