"""Hook engine core: layer resolution, the model guard, capture taps and the layer listing."""

import gc
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis.hooks import LayerNotFoundError, ModelGuard, capture, hook_counts, layers, resolve_layers


def tiny():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                             nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
    return nn.Sequential(OrderedDict(features=features, pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
                                     classifier=nn.Linear(6, 5)))


class SharedReLU(nn.Module):
    """Calls one ReLU module twice per forward, as torchvision's ResNet blocks do."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.relu(self.b(self.relu(self.a(x))))


def test_resolve_by_name_glob_type_object_and_list():
    m = tiny()
    assert list(resolve_layers(m, "features.3")) == ["features.3"]
    assert list(resolve_layers(m, "features.*")) == [f"features.{i}" for i in range(6)]
    assert list(resolve_layers(m, nn.Conv2d)) == ["features.0", "features.3"]
    assert list(resolve_layers(m, m.classifier)) == ["classifier"]
    # a list keeps the model's order and drops duplicates
    assert list(resolve_layers(m, ["classifier", nn.ReLU, "features.5"])) == ["features.1", "features.5",
                                                                              "classifier"]


@pytest.mark.parametrize("spec,hint", [
    ("featurs.3", "'features.3'"),
    ("features.9", "'features."),
    ("classifer", "'classifier'"),
    ("layer4.*", "no layer matches the pattern"),
    (nn.LSTM, "Conv2d"),
    (nn.Linear(1, 1), "not a submodule"),
    ([], "no layers given"),
])
def test_unknown_layers_name_the_closest_valid_ones(spec, hint):
    with pytest.raises(LayerNotFoundError, match=hint.replace("*", r"\*").replace("(", r"\(")):
        resolve_layers(tiny(), spec)


def test_bad_layer_spec_type():
    with pytest.raises(TypeError, match="str, an nn.Module type or an nn.Module"):
        resolve_layers(tiny(), 3)


def test_guard_restores_everything_also_after_an_exception():
    m = tiny().train()
    m.features[4].eval()  # a mixed state the guard must keep per module
    m.classifier.weight.requires_grad_(False)
    before_training = [x.training for x in m.modules()]
    before_grad = [p.requires_grad for p in m.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with ModelGuard(m, eval=True, freeze=True):
            assert not any(x.training for x in m.modules())
            assert not any(p.requires_grad for p in m.parameters())
            m.features[1].inplace = False
            capture(m, ["features.0", "classifier"]).__enter__()  # left behind: the guard removes them
            own = m.register_forward_pre_hook(lambda *a: None)  # not lightning-vis's: it stays
            raise RuntimeError("boom")
    assert [x.training for x in m.modules()] == before_training
    assert [p.requires_grad for p in m.parameters()] == before_grad
    assert m.features[1].inplace is True
    assert hook_counts(m) == 1 and list(m._forward_pre_hooks) == [own.id]


def test_capture_is_safe_with_inplace_relu_and_matches_hand_computation():
    m = tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    with capture(m, ["features.0", "features.1", "classifier"]) as tap:
        logits = m(x)
    conv = F.conv2d(x, m.features[0].weight, m.features[0].bias, padding=1)
    got = tap.output("features.0")
    assert (got < 0).any(), "the in-place ReLU after the conv must not have changed the captured output"
    torch.testing.assert_close(got, conv)
    torch.testing.assert_close(tap.output("features.1"), conv.relu())
    torch.testing.assert_close(tap.output("classifier"), logits.detach())
    assert hook_counts(m) == 0


def test_capture_records_every_call_of_a_shared_module():
    m = SharedReLU()
    x = torch.randn(3, 4)
    with capture(m, "relu") as tap:
        m(x)
    first = m.a(x).relu()
    torch.testing.assert_close(tap.values["relu"][0], first)
    torch.testing.assert_close(tap.values["relu"][1], m.b(first).relu())
    with pytest.raises(RuntimeError, match="ran 2 times"):
        tap.output("relu")


def test_capture_inputs():
    m = tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    with capture(m, "features.3", what="input") as tap:
        m(x)
    expected = F.max_pool2d(F.conv2d(x, m.features[0].weight, m.features[0].bias, padding=1).relu(), 2)
    torch.testing.assert_close(tap.output("features.3"), expected)


def test_gradient_taps_give_pre_inplace_gradients_and_never_touch_param_grads():
    m = tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    with capture(m, "features.0", grads=True) as tap:
        logits = m(x)
    (act,) = tap.live["features.0"]
    (g,) = torch.autograd.grad(logits[:, 1].sum(), act)
    # reference: the same network written out by hand, differentiated at the conv output
    conv = F.conv2d(x, m.features[0].weight, m.features[0].bias, padding=1).detach().requires_grad_()
    rest = m.features[4](m.features[3](F.max_pool2d(conv.relu(), 2))).relu().mean((2, 3))
    (ref,) = torch.autograd.grad(m.classifier(rest)[:, 1].sum(), conv)
    torch.testing.assert_close(g, ref)
    torch.testing.assert_close(logits, m(x))  # the tap changed nothing the network computes
    assert all(p.grad is None for p in m.parameters())
    assert hook_counts(m) == 0


def test_hooks_removed_after_an_exception_and_after_many_cycles():
    m = tiny().eval()
    with pytest.raises(ValueError):
        with capture(m, nn.Conv2d):
            m(torch.randn(1, 3, 8, 8))
            raise ValueError("inside")
    assert hook_counts(m) == 0
    x = torch.randn(1, 3, 8, 8)
    gc.collect()
    objects = len(gc.get_objects())
    for _ in range(1000):
        with capture(m, ["features.*", "classifier"], grads=True) as tap:
            m(x)
        del tap
    gc.collect()
    assert hook_counts(m) == 0
    assert len(gc.get_objects()) < objects + 500  # no growth per cycle


def test_layers_lists_types_and_shapes_and_restores_the_model():
    m = tiny().train()
    info = {i.name: i for i in layers(m, torch.randn(2, 3, 8, 8))}
    assert info["features.0"].type == "Conv2d" and info["features.0"].output_shape == (2, 4, 8, 8)
    assert info["features.2"].output_shape == (2, 4, 4, 4)
    assert info["classifier"].output_shape == (2, 5) and info["classifier"].params == 35
    assert info["features"].calls == 1
    assert all(x.training for x in m.modules()) and hook_counts(m) == 0
    assert m.features[4].num_batches_tracked.item() == 0  # eval mode: BatchNorm statistics untouched
    leaves = [i.name for i in layers(m, torch.randn(1, 3, 8, 8), leaves_only=True)]
    assert "features" not in leaves and "features.0" in leaves


@pytest.mark.parametrize("call", [
    lambda x: nn.MaxPool2d(2)(x), lambda x: F.max_pool2d(x, 2), lambda x: torch.max_pool2d(x, 2),
    lambda x: F.max_pool2d(x, 2, return_indices=True)[0], lambda x: F.max_pool1d(x.flatten(2), 2),
    lambda x: nn.MaxPool3d(1)(x.unsqueeze(2)).squeeze(2)])
def test_rules_route_every_max_pool_spelling_through_the_switch_operator(call):
    from lightning_vis.hooks.rules import BackwardRules

    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with BackwardRules("deconvnet"):
        y = call(x)
    node = y.grad_fn
    while node is not None and "max_pool_with_switches" not in type(node).__name__:
        node = node.next_functions[0][0] if node.next_functions else None
    assert node is not None, type(y.grad_fn).__name__


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
def test_rules_keep_inplace_relu_semantics(rule):
    from lightning_vis.hooks.rules import BackwardRules

    x = torch.randn(2, 3, requires_grad=True)
    h = x * 1
    with BackwardRules(rule):
        out = F.relu(h, inplace=True)
    assert out is h and torch.equal(h, x.detach().clamp_min(0))
    g = torch.randn(2, 3)
    (gx,) = torch.autograd.grad(h, x, g)
    want = {"deconvnet": g.clamp_min(0), "guided": g.clamp_min(0) * (x > 0), "gradient": g * (x > 0)}[rule]
    torch.testing.assert_close(gx, want)


def test_capture_reduce_summarises_before_inplace_ops_and_copies_nothing():
    conv = nn.Conv2d(1, 2, 1)
    m = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(inplace=True)))
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad(), capture(m, "conv", reduce=lambda name, mod, t: (name, type(mod).__name__, t.amin())) \
            as tap:
        m(x)
        want = conv(x).amin()
    name, kind, low = tap.values["conv"][0]
    assert (name, kind) == ("conv", "Conv2d") and low == want and low < 0  # before the in-place ReLU
    with pytest.raises(ValueError, match="unreduced"):
        capture(m, "conv", grads=True, reduce=lambda *a: 0)


class _Tokens(nn.Module):
    """Patches as (N, L, D) tokens: the grid comes from the input's size only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.embed(x).flatten(2).transpose(1, 2)).mean(1)


def test_a_streaming_tap_decides_layouts_again_for_inputs_of_another_size():
    """16x32 then 32x16 inputs: 4x8 then 8x4 token grids; the second batch must not reuse the first's grid."""
    from lightning_vis.hooks.taps import StreamingTap

    class Keep(StreamingTap):
        def summarise(self, name, maps):
            return maps

    m = _Tokens().eval()
    xs = [torch.randn(2, 3, *hw) for hw in ((16, 32), (32, 16), (16, 32), (8, 8))]
    with torch.no_grad():  # (N, D, h, w) by hand, before the tap is attached
        wants = [m.norm(m.embed(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for x in xs]
    s = Keep(m, "norm").attach()
    try:
        for x, want in zip(xs, wants):
            hw = x.shape[2:]
            with torch.no_grad():
                s.before(x)
                m(x)
            got = s.batch_values()["norm"]
            assert got.shape == (2, 4, hw[0] // 4, hw[1] // 4)
            torch.testing.assert_close(got, want)
    finally:
        s.detach()
    assert hook_counts(m) == 0
