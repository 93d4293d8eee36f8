"""Deconvnet and guided backprop: hand-computed tensors, a plain-autograd reference with the same rules,
functional == module ReLU, batched == unbatched, 3D, a residual block; the model is left untouched."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_vis as lv
from lightning_vis.hooks import hook_counts


class RefReLU(torch.autograd.Function):
    """The reference rule, written independently of the library: deconvnet passes relu(grad)."""

    @staticmethod
    def forward(ctx, x, guided):
        ctx.save_for_backward(x)
        ctx.guided = guided
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (g.clamp_min(0) * (x > 0) if ctx.guided else g.clamp_min(0)), None


def net2d(functional=False):
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu1, self.pool1 = nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)
            self.conv2, self.relu2 = nn.Conv2d(4, 5, 3, padding=1), nn.ReLU()

        def forward(self, x):
            if functional:
                return F.relu(self.conv2(F.max_pool2d(torch.relu(self.conv1(x)), 2)))
            return self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x)))))

    return Net()


def reference(net, x, layer, channel, guided=False):
    """The same network written out by hand with the reference rule; max-pool's plain gradient is the unpool."""
    x = x.detach().clone().requires_grad_()
    a1 = RefReLU.apply(net.conv1(x), guided)
    p1 = F.max_pool2d(a1, 2)
    c2 = net.conv2(p1)
    a2 = RefReLU.apply(c2, guided)
    act = {"relu1": a1, "pool1": p1, "conv2": c2, "relu2": a2}[layer]
    g = torch.zeros_like(act)
    g[:, channel] = act[:, channel].detach()
    return torch.autograd.grad(act, x, g)[0]


def test_hand_computed_single_pixel():
    # conv 1x1 (w = 2) -> ReLU -> 2x2 max-pool on [[1, -3], [4, 2]]: pooled 8 from cell (1, 0);
    # projecting 8 back: unpool -> [[0, 0], [8, 0]], ReLU rule keeps it, transposed conv doubles it.
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(2.0)
    m = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(), pool=nn.MaxPool2d(2)))
    rec = lv.deconvnet(m, torch.tensor([[[[1.0, -3.0], [4.0, 2.0]]]]), "pool", top_k=1)
    assert torch.equal(rec.images["pool"][0, 0], torch.tensor([[[0.0, 0.0], [16.0, 0.0]]]))
    assert rec.features["pool"].tolist() == [[0]] and rec.scores["pool"].item() == 8.0


def test_deconvnet_differs_from_the_gradient_where_it_should():
    # conv1 (w = 1) -> ReLU -> conv2 (w = -1, b = 5) -> ReLU on x = [-1, 2]: the gradient reaching ReLU1 is
    # negative ([-5, -3]); the deconvnet rule rectifies it to 0, the plain gradient keeps -3 where x > 0.
    c1, c2 = nn.Conv1d(1, 1, 1, bias=False), nn.Conv1d(1, 1, 1)
    with torch.no_grad():
        c1.weight.fill_(1.0)
        c2.weight.fill_(-1.0)
        c2.bias.fill_(5.0)
    m = nn.Sequential(OrderedDict(c1=c1, r1=nn.ReLU(), c2=c2, r2=nn.ReLU()))
    x = torch.tensor([[[-1.0, 2.0]]])
    assert torch.equal(lv.deconvnet(m, x, "r2", top_k=1).images["r2"][0, 0], torch.zeros(1, 2))
    grad = lv.deconvnet(m, x, "r2", top_k=1, rule="gradient").images["r2"][0, 0]
    assert torch.equal(grad, torch.tensor([[0.0, -3.0]]))


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_against_reference_on_every_layer(rule):
    net = net2d()
    x = torch.randn(3, 2, 8, 8)
    rec = lv.deconvnet(net, x, ["relu1", "pool1", "relu2"], top_k=2, rule=rule)
    for layer in ("relu1", "pool1", "relu2"):
        for i in range(3):
            for j, c in enumerate(rec.features[layer][i].tolist()):
                ref = reference(net, x[i:i + 1], layer, c, guided=rule == "guided")[0]
                torch.testing.assert_close(rec.images[layer][i, j], ref, msg=f"{layer} image {i} feature {c}")


def test_functional_relu_and_pool_equal_modules():
    x = torch.randn(2, 2, 8, 8)
    mod, fun = net2d(False), net2d(True)
    a = lv.deconvnet(mod, x, "conv2", features=[0, 3])
    b = lv.deconvnet(fun, x, "conv2", features=[0, 3])
    torch.testing.assert_close(a.images["conv2"], b.images["conv2"])
    # the functional F.relu / torch.relu / F.max_pool2d really ran through the rules: the reference agrees and
    # the plain gradient does not
    plain = lv.deconvnet(fun, x, "conv2", features=[0, 3], rule="gradient")
    for i in range(2):
        for j, c in enumerate([0, 3]):
            torch.testing.assert_close(b.images["conv2"][i, j], reference(mod, x[i:i + 1], "conv2", c)[0])
    assert not torch.allclose(plain.images["conv2"], b.images["conv2"])


def test_batched_equals_unbatched_and_chunking():
    net = net2d()
    x = torch.randn(4, 2, 8, 8)
    full = lv.deconvnet(net, x, ["pool1", "relu2"], top_k=3, chunk_size=5)
    for i in range(4):
        one = lv.deconvnet(net, x[i:i + 1], ["pool1", "relu2"], top_k=3)
        for layer in ("pool1", "relu2"):
            assert torch.equal(one.features[layer][0], full.features[layer][i])
            torch.testing.assert_close(one.images[layer][0], full.images[layer][i])


def test_chunks_mixing_layers_agree(monkeypatch):
    """The GPU grouping (slots of several layers in one backward pass) and any chunk size give the same result."""
    from lightning_vis import deconv

    net = net2d()
    x = torch.randn(3, 2, 8, 8)
    base = lv.deconvnet(net, x, ["pool1", "relu2", "conv2"], top_k=2)
    assert [len(c) for c in deconv._chunks([("a", 0), ("a", 1), ("b", 0)], 5, False)] == [2, 1]
    assert [len(c) for c in deconv._chunks([("a", 0), ("a", 1), ("b", 0)], 2, True)] == [2, 1]
    assert [len(c) for c in deconv._chunks([("a", 0), ("b", 0), ("b", 1)], 2, True)] == [2, 1]
    real = deconv._chunks
    monkeypatch.setattr(deconv, "_chunks", lambda slots, size, mix_layers: real(slots, size, True))
    for size in (1, 3, 6):
        mixed = lv.deconvnet(net, x, ["pool1", "relu2", "conv2"], top_k=2, chunk_size=size)
        for layer in base.images:
            torch.testing.assert_close(mixed.images[layer], base.images[layer])


def test_3d_network():
    torch.manual_seed(2)
    m = nn.Sequential(OrderedDict(conv=nn.Conv3d(1, 3, 3, padding=1), relu=nn.ReLU(), pool=nn.MaxPool3d(2),
                                  conv2=nn.Conv3d(3, 2, 1)))
    x = torch.randn(2, 1, 4, 6, 6)
    rec = lv.deconvnet(m, x, "conv2", top_k=2)
    for i in range(2):
        for j, c in enumerate(rec.features["conv2"][i].tolist()):
            xi = x[i:i + 1].clone().requires_grad_()
            act = m.conv2(F.max_pool3d(RefReLU.apply(m.conv(xi), False), 2))
            g = torch.zeros_like(act)
            g[:, c] = act[:, c].detach()
            torch.testing.assert_close(rec.images["conv2"][i, j], torch.autograd.grad(act, xi, g)[0][0])


def test_residual_block():
    torch.manual_seed(3)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 3, padding=1)
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)  # called three times, in place, as in torchvision's ResNet

        def forward(self, x):
            x = self.relu(self.stem(x))
            out = self.conv2(self.relu(self.conv1(x)))
            out += x
            return self.relu(out)

    m = Block()
    x = torch.randn(2, 2, 6, 6)
    rec = lv.deconvnet(m, x, "conv2", top_k=2)
    for i in range(2):
        for j, c in enumerate(rec.features["conv2"][i].tolist()):
            xi = x[i:i + 1].clone().requires_grad_()
            h = RefReLU.apply(m.stem(xi), False)
            act = m.conv2(RefReLU.apply(m.conv1(h), False))
            g = torch.zeros_like(act)
            g[:, c] = act[:, c].detach()
            torch.testing.assert_close(rec.images["conv2"][i, j], torch.autograd.grad(act, xi, g)[0][0])


def test_model_untouched_and_errors():
    net = net2d().train()
    x = torch.randn(1, 2, 8, 8)
    lv.deconvnet(net, x, "relu2", top_k=1)
    assert all(mod.training for mod in net.modules()) and hook_counts(net) == 0
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert net.relu1.inplace is True
    with pytest.raises(ValueError, match="top_k must be between 1 and 5"):
        lv.deconvnet(net, x, "relu2", top_k=6)
    with pytest.raises(ValueError, match=r"features \[7\] out of range"):
        lv.deconvnet(net, x, "relu2", features=[7])
    with pytest.raises(lv.hooks.LayerNotFoundError, match="'relu2'"):
        lv.deconvnet(net, x, "relu3")


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_relu6_is_a_rectifier(rule):
    torch.manual_seed(4)
    m = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 3, 3, padding=1), act=nn.ReLU6(inplace=True),
                                  conv2=nn.Conv2d(3, 2, 1)))
    with torch.no_grad():
        m.conv.weight.mul_(8)  # some inputs above 6, so that the clip matters
    x = torch.randn(1, 2, 5, 5)
    rec = lv.deconvnet(m, x, "conv2", features=[1], rule=rule)
    xi = x.clone().requires_grad_()
    pre = m.conv(xi)
    assert (pre > 6).any() and (pre < 0).any()

    class Ref(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            ctx.save_for_backward(v)
            return v.clamp(0, 6)

        @staticmethod
        def backward(ctx, g):
            (v,) = ctx.saved_tensors
            return g.clamp_min(0) * ((v > 0) & (v < 6)) if rule == "guided" else g.clamp_min(0)

    act = m.conv2(Ref.apply(pre))
    g = torch.zeros_like(act)
    g[:, 1] = act[:, 1].detach()
    torch.testing.assert_close(rec.images["conv2"][0, 0], torch.autograd.grad(act, xi, g)[0][0])


def test_token_layers_of_a_vit_reconstruct_hidden_features():
    """A token layer's feature is a hidden dimension d: all tokens' d-th values are sent back."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    layer = "encoder.layers.encoder_layer_0"
    rec = lv.deconvnet(vit, x, layer, top_k=2)
    assert rec.features[layer].shape == (2, 2) and rec.images[layer].shape == (2, 2, 3, 16, 16)
    out = {}
    h = vit.get_submodule(layer).register_forward_hook(lambda m, a, o: out.setdefault("t", o))
    xr = x.clone().requires_grad_()
    vit(xr)
    h.remove()
    t = out["t"]  # (2, 5, 8): class token + 4 patches, 8 hidden dims
    norms = t.detach().norm(dim=1)
    assert torch.equal(rec.features[layer], norms.topk(2, dim=1).indices)
    for i in range(2):
        for j, d in enumerate(rec.features[layer][i].tolist()):
            g = torch.zeros_like(t)
            g[i, :, d] = t[i, :, d].detach()
            (want,) = torch.autograd.grad(t, xr, g, retain_graph=True)  # no ReLU in a ViT block: the gradient
            torch.testing.assert_close(rec.images[layer][i, j], want[i])
