"""Attribution: Grad-CAM family against hand computations, guided backprop against an autograd reference,
SmoothGrad against its definition, batched == unbatched, 3D and ViT models, rollout by hand, clear errors."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_vis as lv
from lightning_vis import images as im
from lightning_vis.attribution import cam_from, rollout
from lightning_vis.hooks import hook_counts


def tiny_cam_net():
    """conv 1x1 (weights 1 and 2) -> global mean -> linear [[2, 1], [0, 1], [-1, 0]]."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    fc = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        fc.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]))
    return nn.Sequential(OrderedDict(conv=conv, pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=fc))


X_TINY = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])


@pytest.mark.parametrize("method,expected", [
    # dS/dA_c = W[0, c] / 4 everywhere: g = (0.5, 0.25); A = (x, 2x)
    ("gradcam", [[1.0, 0.0], [3.0, 0.0]]),  # relu(0.5 x + 0.25 * 2x) = relu(x)
    ("layercam", [[1.0, 0.0], [3.0, 0.0]]),  # relu(sum_c relu(g_c) A_c) = relu(x)
    # alpha_c = g^2 / (2 g^2 + sum(A_c) g^3) = 1 / (2 + sum(A_c) g_c) = 1/3 for both (sums 2 and 4)
    # w_c = 4 positions * g_c * alpha_c = (2/3, 1/3): relu(2/3 x + 1/3 * 2x) = relu(4/3 x)
    ("gradcam++", [[4 / 3, 0.0], [4.0, 0.0]]),
])
def test_cam_methods_against_hand_computation(method, expected):
    net = tiny_cam_net()
    cam = lv.grad_cam(net, X_TINY, "conv", target=0, method=method)
    torch.testing.assert_close(cam.maps, torch.tensor([expected]))
    torch.testing.assert_close(cam.low_res, torch.tensor([expected]))
    assert cam.targets.tolist() == [0] and cam.layer == "conv"
    # score of class 0: 2 * mean(x) + 1 * mean(2x) = 4 * 0.5
    torch.testing.assert_close(cam.scores, torch.tensor([2.0]))


def test_cam_from_rejects_unknown_method():
    with pytest.raises(ValueError, match="gradcam"):
        cam_from(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), "scorecam")


class RefGuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp_min(0) * (x > 0)


class SmallNet(nn.Module):
    def __init__(self, functional=False, ref=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.relu = nn.ReLU(inplace=True)
        self.functional, self.ref = functional, ref

    def act(self, x):
        if self.ref:
            return RefGuidedReLU.apply(x)
        return F.relu(x) if self.functional else self.relu(x)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.conv1(x)), 2)
        x = self.act(self.conv2(x))
        return self.fc(F.max_pool2d(x, 2).flatten(1))


def test_guided_backprop_matches_an_autograd_reference_module_and_functional():
    x = torch.randn(3, 3, 16, 16)
    ref_net = SmallNet(ref=True)
    xr = x.clone().requires_grad_()
    out = ref_net(xr)
    cls = out.argmax(1)
    (want,) = torch.autograd.grad(out.gather(1, cls[:, None]).sum(), xr)
    for net in (SmallNet(), SmallNet(functional=True)):
        got = lv.guided_backprop(net, x)
        assert torch.equal(got.targets, cls)
        torch.testing.assert_close(got.maps, want)
    plain = lv.saliency(SmallNet(), x, absolute=False)
    assert not torch.allclose(plain.maps, want)  # the rule changed something


def test_saliency_is_the_input_gradient_and_smoothgrad_follows_its_definition():
    net, x = SmallNet(), torch.randn(2, 3, 16, 16)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(net(xr)[:, 3].sum(), xr)
    torch.testing.assert_close(lv.saliency(net, x, target=3).maps, g.abs())
    torch.testing.assert_close(lv.saliency(net, x, target=[3, 3], absolute=False).maps, g)

    samples, noise = 4, 0.2
    sg = lv.saliency(net, x, target=[1, 4], samples=samples, noise=noise, seed=7, chunk_size=3)
    eps = torch.randn((samples, *x.shape), generator=torch.Generator().manual_seed(7))
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    want = torch.zeros_like(x)
    for s in range(samples):
        xs = (x + noise * span * eps[s]).requires_grad_()
        (gs,) = torch.autograd.grad(net(xs).gather(1, torch.tensor([[1], [4]])).sum(), xs)
        want += gs.abs() / samples
    torch.testing.assert_close(sg.maps, want)
    assert sg.targets.tolist() == [1, 4] and sg.method == "smoothgrad"
    again = lv.saliency(net, x, target=[1, 4], samples=samples, noise=noise, seed=7)
    other = lv.saliency(net, x, target=[1, 4], samples=samples, noise=noise, seed=8)
    torch.testing.assert_close(again.maps, sg.maps)
    assert not torch.allclose(other.maps, sg.maps)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "guided-gradcam"])
def test_cams_batched_equal_unbatched_and_chunked(method):
    net, x = SmallNet(), torch.randn(4, 3, 16, 16)
    full = lv.grad_cam(net, x, "conv2", method=method)
    chunked = lv.grad_cam(net, x, "conv2", method=method, chunk_size=3, target=full.targets)
    torch.testing.assert_close(chunked.maps, full.maps)
    assert full.maps.shape == (4, 16, 16) and full.low_res.shape == (4, 8, 8)
    for i in range(4):
        one = lv.grad_cam(net, x[i:i + 1], "conv2", method=method)
        torch.testing.assert_close(one.maps[0], full.maps[i])
        if method == "guided-gradcam":
            torch.testing.assert_close(one.guided[0], full.guided[i])
    assert (full.maps >= 0).all()
    norm, peak = full.normalized().flatten(1), full.maps.flatten(1).amax(1)
    torch.testing.assert_close(norm.amax(1), (peak > 0).float())
    torch.testing.assert_close(norm * (peak - full.maps.flatten(1).amin(1))[:, None],
                               full.maps.flatten(1) - full.maps.flatten(1).amin(1, keepdim=True))


def test_guided_gradcam_is_guided_backprop_times_the_map():
    net, x = SmallNet(), torch.randn(2, 3, 16, 16)
    cam = lv.grad_cam(net, x, "conv2", method="guided-gradcam", target=[0, 2])
    gb = lv.guided_backprop(net, x, target=[0, 2])
    plain = lv.grad_cam(net, x, "conv2", target=[0, 2])
    torch.testing.assert_close(cam.maps, plain.maps)
    torch.testing.assert_close(cam.guided, gb.maps * plain.maps[:, None])


def test_gradcam_by_hand_on_a_conv_layer_with_bilinear_upsampling():
    net, x = SmallNet(), torch.randn(2, 3, 16, 16)
    cam = lv.grad_cam(net, x, "conv2", target=torch.tensor([1, 2]))
    acts = {}
    # the hook keeps conv2's own output; the in-place ReLU after it works on a copy
    h = net.conv2.register_forward_hook(lambda m, a, o: acts.setdefault("a", o).clone())
    out = net(x)
    h.remove()
    (g,) = torch.autograd.grad(out.gather(1, torch.tensor([[1], [2]])).sum(), acts["a"])
    low = (g.mean((2, 3), keepdim=True) * acts["a"]).sum(1).clamp_min(0)
    torch.testing.assert_close(cam.low_res, low.detach())
    torch.testing.assert_close(cam.maps, F.interpolate(low[:, None].detach(), size=(16, 16), mode="bilinear")[:, 0])


def test_conv3d_cams_are_trilinear_and_render_as_frames_and_gif(tmp_path):
    torch.manual_seed(3)
    net = nn.Sequential(OrderedDict(conv=nn.Conv3d(3, 4, 3, padding=1), relu=nn.ReLU(), pool=nn.MaxPool3d(2),
                                    conv2=nn.Conv3d(4, 6, 3, padding=1), gap=nn.AdaptiveAvgPool3d(1),
                                    flat=nn.Flatten(), fc=nn.Linear(6, 4)))
    x = torch.randn(2, 3, 4, 8, 8)
    cam = lv.grad_cam(net, x, "conv2", target=1)
    assert cam.maps.shape == (2, 4, 8, 8) and cam.low_res.shape == (2, 2, 4, 4)
    want = F.interpolate(cam.low_res[:, None], size=(4, 8, 8), mode="trilinear")[:, 0]
    torch.testing.assert_close(cam.maps, want)
    for i in range(2):
        torch.testing.assert_close(lv.grad_cam(net, x[i:i + 1], "conv2", target=1).maps[0], cam.maps[i])
    frames = im.video_overlay(x[0].sigmoid(), cam.low_res[0])
    assert frames.shape == (4, 3, 8, 8)
    path = im.save_gif(frames, tmp_path / "cam.gif")
    from PIL import Image
    with Image.open(path) as gif:
        assert gif.n_frames == 4
    strip = im.grid(frames, ncol=4)
    assert strip.shape == (3, 10, 37)


def small_vit(image_size=24, patch=8):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(4)
    vit = VisionTransformer(image_size=image_size, patch_size=patch, num_layers=2, num_heads=2, hidden_dim=16,
                            mlp_dim=32, num_classes=5).eval()
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head: every gradient would be 0
    return vit


def test_vit_cam_on_token_layer_infers_the_grid():
    vit = small_vit()  # 3x3 patches + class token: the grid is inferred, not 14x14
    x = torch.randn(2, 3, 24, 24)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    cam = lv.grad_cam(vit, x, layer, target=[0, 3])
    assert cam.low_res.shape == (2, 3, 3) and cam.maps.shape == (2, 24, 24)
    acts = {}
    h = vit.get_submodule(layer).register_forward_hook(lambda m, a, o: acts.setdefault("a", o))
    out = vit(x)
    h.remove()
    (g,) = torch.autograd.grad(out.gather(1, torch.tensor([[0], [3]])).sum(), acts["a"])
    a, g = acts["a"][:, 1:].detach(), g[:, 1:]  # class token dropped, (N, 9, D)
    low = ((g.mean(1, keepdim=True) * a).sum(2)).clamp_min(0).view(2, 3, 3)
    torch.testing.assert_close(cam.low_res, low)


def test_attention_maps_and_rollout_of_a_vit():
    vit = small_vit()
    x = torch.randn(2, 3, 24, 24)
    before = hook_counts(vit)
    maps = lv.attention_maps(vit, x)
    assert list(maps) == ["encoder.layers.encoder_layer_0.self_attention",
                          "encoder.layers.encoder_layer_1.self_attention"]
    with lv.hooks.capture_attention(vit) as tap:
        with torch.no_grad():
            vit(x)
    weights = [tap.values[k][0] for k in maps]
    for k, w in zip(maps, weights):
        assert maps[k].shape == (2, 2, 3, 3)
        torch.testing.assert_close(maps[k], w[:, :, 0, 1:].reshape(2, 2, 3, 3))
    roll = lv.attention_rollout(vit, x)
    torch.testing.assert_close(roll, rollout(weights)[:, 0, 1:].reshape(2, 3, 3))
    assert hook_counts(vit) == before


def test_rollout_against_a_hand_computation_on_two_blocks():
    a1 = torch.full((1, 1, 3, 3), 1 / 3)  # uniform
    a2 = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]).view(1, 1, 3, 3)  # a permutation
    # (A1 + I)/2: 2/3 on the diagonal, 1/6 elsewhere; (A2 + I)/2 averages row i and row i+1 of that
    want = torch.tensor([[5 / 12, 5 / 12, 1 / 6], [1 / 6, 5 / 12, 5 / 12], [5 / 12, 1 / 6, 5 / 12]])
    torch.testing.assert_close(rollout([a1, a2])[0], want)
    # two heads fused by max: [uniform, permutation] -> max; rows renormalised after the residual
    two = torch.cat([a1, a2], 1)
    fused = torch.maximum(a1, a2)[0, 0] + torch.eye(3)
    torch.testing.assert_close(rollout([two], head_fusion="max")[0], fused / fused.sum(1, keepdim=True))
    # discard the smallest weight of each row (never the class token's column)
    a = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]).view(1, 1, 3, 3)
    kept = torch.tensor([[0.5, 0.3, 0.0], [0.1, 0.6, 0.0], [0.2, 0.0, 0.6]]) + torch.eye(3)
    torch.testing.assert_close(rollout([a], discard_ratio=0.34)[0], kept / kept.sum(1, keepdim=True))


def test_methods_leave_the_model_as_it_was_and_never_fill_grad():
    net = SmallNet().train()
    net.conv1.weight.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    before = hook_counts(net)
    lv.saliency(net, x)
    lv.saliency(net, x, samples=2)
    lv.guided_backprop(net, x)
    for method in ("gradcam", "gradcam++", "layercam", "guided-gradcam"):
        lv.grad_cam(net, x, "conv2", method=method)
    assert net.training and all(m.training for m in net.modules())
    assert not net.conv1.weight.requires_grad and net.conv2.weight.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert net.relu.inplace and hook_counts(net) == before


@pytest.mark.parametrize("call,pattern", [
    (lambda n, x: lv.grad_cam(n, x, "conv2", target=5), r"target class 5 out of range.*5 classes \(0..4\)"),
    (lambda n, x: lv.saliency(n, x, target=-1), "target class -1 out of range"),
    (lambda n, x: lv.guided_backprop(n, x, target=[1, 2, 3]), "3 targets for a batch of 2"),
    (lambda n, x: lv.grad_cam(n, x, "fc"), r"'fc' outputs \(2, 5\), a vector: no spatial map over the 2D input"),
    (lambda n, x: lv.grad_cam(n, x, "conv*"), "takes one layer.*conv1, conv2"),
    (lambda n, x: lv.grad_cam(n, x, "conv3"), "conv1|conv2"),
    (lambda n, x: lv.grad_cam(n, x, "conv2", method="cam"), "choose one of gradcam"),
    (lambda n, x: lv.grad_cam(n, x, "conv2", target=lambda out: out), r"must return \(N,\) = \(2,\) scores"),
    (lambda n, x: lv.saliency(n, x[0, 0, 0], target=0), "inputs must be a batch"),
    (lambda n, x: lv.saliency(n, x, samples=-1), "samples must be >= 0"),
])
def test_bad_targets_and_layers_give_clear_errors(call, pattern):
    net, x = SmallNet(), torch.randn(2, 3, 16, 16)
    before = hook_counts(net)
    with pytest.raises((ValueError, KeyError), match=pattern):
        call(net, x)
    assert hook_counts(net) == before and all(p.grad is None for p in net.parameters())


def test_callable_target_and_non_logit_outputs():
    net, x = SmallNet(), torch.randn(2, 3, 16, 16)
    by_callable = lv.grad_cam(net, x, "conv2", target=lambda out: out[:, 2] - out[:, 0])
    assert by_callable.targets is None
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad((net(xr)[:, 2] - net(xr)[:, 0]).sum(), xr)
    torch.testing.assert_close(lv.saliency(net, x, target=lambda out: out[:, 2] - out[:, 0]).maps, g.abs())
    seg = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(ValueError, match="needs \\(N, classes\\) logits"):
        lv.saliency(seg, x)


def test_conv1d_net_cams_on_a_relu_layer_are_channels_first():
    """(N, C, L) outputs of a 1D net, also of a ReLU after the conv, are channel maps, not tokens."""
    torch.manual_seed(6)
    net = nn.Sequential(OrderedDict(conv=nn.Conv1d(2, 5, 3, padding=1), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool1d(1),
                                    flat=nn.Flatten(), fc=nn.Linear(5, 3)))
    x = torch.randn(3, 2, 9)
    cam = lv.grad_cam(net, x, "relu", target=2)
    assert cam.low_res.shape == (3, 9) and cam.maps.shape == (3, 9)
    a = net.relu(net.conv(x))
    (g,) = torch.autograd.grad(net.fc(a.mean(2))[:, 2].sum(), a)
    torch.testing.assert_close(cam.low_res, (g.mean(2, keepdim=True) * a).sum(1).clamp_min(0).detach())


class _TwoHeads(torch.nn.Module):
    """Class logits from `body`, and a mask branch after it that the logits never read (Mask2Former's pixel
    decoder): the last map over the input is `mask`, which the class score does not depend on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.mask = torch.nn.Conv2d(4, 2, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        feats = self.body(x).relu()
        return {"logits": self.head(feats.mean((2, 3))), "masks": self.mask(feats)}


def test_default_cam_layer_is_one_the_score_depends_on():
    model, x = _TwoHeads().eval(), torch.rand(2, 3, 8, 8)
    cam = lv.grad_cam(model, x)  # the last map was `mask`: the score has no gradient there
    assert cam.layer == "body"
    want = lv.grad_cam(model, x, "body")
    torch.testing.assert_close(cam.maps, want.maps)
    with pytest.raises(ValueError, match=r"^the target's score does not depend on layer 'mask': name a layer it is "
                                         r"computed from"):
        lv.grad_cam(model, x, "mask")
