"""Attention from whatever computes it (hand computations from the projection weights), targets for any output,
activation checkpointing, default layers and fixed-size models."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_vis as lv
from lightning_vis import targets
from lightning_vis.hooks import ReentrantCheckpointError, capture_attention, hook_counts

# ----------------------------------------------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    """timm's attention: fused (F.scaled_dot_product_attention) or an explicit softmax, with an optional learned bias
    (LeViT)."""

    def __init__(self, dim, heads, fused, tokens=None):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens)) if tokens else None

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
            if self.bias is not None:
                attn = attn + self.bias
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim, heads, fused, tokens=None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, fused, tokens)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, fused=True, bias=False):
        super().__init__()
        torch.manual_seed(3)
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.blocks = nn.Sequential(*[Block(8, 2, fused, 10 if bias else None) for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, 9, 8): a 3x3 grid
        t = self.blocks(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))
        return self.head(self.norm(t)[:, 0])


def hand_weights(block: Block, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) (+ bias)) from the block's projection weights, per head."""
    a = block.attn
    h = block.norm1(x)
    n, length, d = h.shape
    q, k, _ = (h @ a.qkv.weight.T + a.qkv.bias).split(d, -1)
    q = q.view(n, length, a.heads, -1).transpose(1, 2)
    k = k.view(n, length, a.heads, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // a.heads)
    return (logits + (a.bias if a.bias is not None else 0)).softmax(-1)


@pytest.mark.parametrize("fused,bias", [(True, False), (False, False), (False, True)])
def test_attention_weights_equal_a_hand_computation(fused, bias):
    vit = TinyViT(fused, bias).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        plain = vit(x)
        with capture_attention(vit) as att:
            out = vit(x)
        tokens = torch.cat([vit.cls.expand(2, -1, -1), vit.patch(x).flatten(2).transpose(1, 2)], 1)
        w0 = hand_weights(vit.blocks[0], tokens)
        w1 = hand_weights(vit.blocks[1], vit.blocks[0](tokens))
    assert torch.equal(out, plain)  # bit for bit: the capture never changes what the model computes
    assert att.layers() == ["blocks.0.attn", "blocks.1.attn"]
    rec = att.records[0]
    assert rec.source == ("scaled_dot_product_attention" if fused else "softmax")
    assert rec.query.describe() == rec.key.describe() == "tokens 1+3x3"
    torch.testing.assert_close(att.values["blocks.0.attn"][0], w0)
    torch.testing.assert_close(att.values["blocks.1.attn"][0], w1)
    maps = lv.attention_maps(vit, x)
    torch.testing.assert_close(maps["blocks.1.attn"], w1[:, :, 0, 1:].reshape(2, 2, 3, 3))
    fused_heads = [(w.mean(1) + torch.eye(10)) / 2 for w in (w0, w1)]
    fused_heads = [a / a.sum(-1, keepdim=True) for a in fused_heads]
    want = (fused_heads[1] @ fused_heads[0])[:, 0, 1:].reshape(2, 3, 3)  # rollout by hand, two blocks
    torch.testing.assert_close(lv.attention_rollout(vit, x), want)
    assert hook_counts(vit) == 0


def test_watching_a_block_credits_its_attention_and_plain_layers_record_nothing():
    vit = TinyViT().eval()
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad(), capture_attention(vit, "blocks.1") as att:
        vit(x)
    assert att.layers() == ["blocks.1"]
    with pytest.raises(ValueError, match="no attention weights were computed in the layers named"):
        lv.attention_maps(vit, x, "patch")


def swin_net(size, shift=1):
    from torchvision.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(5)
    embed = nn.Conv2d(3, 8, 2, stride=2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = embed
            self.block = SwinTransformerBlock(8, 2, window_size=[2, 2], shift_size=[shift, shift])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.block(self.embed(x).permute(0, 2, 3, 1)).mean((1, 2)))

    return Net().eval()


def window_coordinates(h, w, ws, shift):
    """For each window of torchvision's shifted-window attention, the (row, col) of its tokens in the feature map,
    -1 for padding: the same pad, roll and partition applied to a map of coordinates."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).float()  # (h, w, 2)
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    coords = F.pad(coords, (0, 0, 0, pw, 0, ph), value=-1)
    hp, wp = coords.shape[:2]
    s = [0 if ws >= hp else shift, 0 if ws >= wp else shift]
    coords = coords.roll((-s[0], -s[1]), (0, 1))
    win = coords.view(hp // ws, ws, wp // ws, ws, 2).permute(0, 2, 1, 3, 4).reshape(-1, ws * ws, 2)
    return win.long(), (hp, wp), s


@pytest.mark.parametrize("size", [8, 6])  # a 4x4 map in 2x2 windows; a 3x3 map padded to 4x4
def test_window_attention_equals_a_hand_computation_placed_back_on_the_map(size):
    net = swin_net(size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain = net(x)
        with capture_attention(net) as att:
            out = net(x)
        feat = net.embed(x).permute(0, 2, 3, 1)
        h = net.block.norm1(feat)
        attn = net.block.attn
        n, hh, ww, c = h.shape
        win, (hp, wp), s = window_coordinates(hh, ww, 2, 1)
        padded = F.pad(h, (0, 0, 0, wp - ww, 0, hp - hh)).roll((-s[0], -s[1]), (1, 2))
        windows = padded.view(n, hp // 2, 2, wp // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        q, k, _ = F.linear(windows, attn.qkv.weight, attn.qkv.bias).view(-1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
        logits = (q * 4 ** -0.5) @ k.transpose(-1, -2) + attn.get_relative_position_bias()
        if sum(s):  # tokens that were not neighbours before the roll do not attend to each other
            region = torch.zeros(hp, wp)
            for i, (a, b) in enumerate([(0, -2), (-2, -s[0]), (-s[0], None)]):
                for j, (c0, d0) in enumerate([(0, -2), (-2, -s[1]), (-s[1], None)]):
                    region[a:b, c0:d0] = 3 * i + j
            rw = region.view(hp // 2, 2, wp // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
            mask = (rw[:, None, :] != rw[:, :, None]).float() * -100
            logits = logits + mask.repeat(n, 1, 1)[:, None]
        weights = logits.softmax(-1)  # (n * windows, heads, 4, 4)
    assert torch.equal(out, plain)
    torch.testing.assert_close(att.values["block.attn"][0], weights)
    want = torch.zeros(n, 2, hh, ww)
    # averaged over each window's queries that are tokens of the map (padding attends too, but is cropped away)
    real = (win[..., 0] >= 0).float().repeat(n, 1)[:, None, :, None]  # (n * windows, 1, queries, 1)
    received = ((weights * real).sum(-2) / real.sum(-2)).view(n, -1, 2, 4)
    for b in range(n):
        for wi in range(win.shape[0]):
            for t in range(4):
                r, cc = win[wi, t].tolist()
                if r >= 0:
                    want[b, :, r, cc] = received[b, wi, :, t]
    torch.testing.assert_close(lv.attention_maps(net, x)["block.attn"], want)
    with pytest.raises(ValueError, match="not defined for window attention"):
        lv.attention_rollout(net, x)


# ----------------------------------------------------------------------------------------------------------------
# targets


class SegNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.classifier = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return {"out": self.classifier(self.backbone(x)), "aux": x.mean()}


def test_a_callable_target_sees_any_output_and_ready_made_targets_compute_the_right_score():
    net = SegNet().eval()
    x = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 1:4] = True
    target = targets.segmentation(2, mask)
    out = net(x)
    torch.testing.assert_close(target(out), (out["out"][:, 2] * mask).sum((1, 2)))
    cam = lv.grad_cam(net, x, "backbone", target)
    ref_act = net.backbone(x)
    (g,) = torch.autograd.grad(target({"out": net.classifier(ref_act)}).sum(), ref_act)
    torch.testing.assert_close(cam.low_res, (g.mean((2, 3), keepdim=True) * ref_act).sum(1).clamp_min(0).detach())
    sal = lv.saliency(net, x, lambda o: o["out"][:, 1].mean((1, 2)))
    assert sal.maps.shape == x.shape and sal.targets is None
    with pytest.raises(ValueError, match=r"returned a dict with out \(2, 4, 8, 8\), aux \(\).*target=f\(output\)"):
        lv.guided_backprop(net, x, target=1)  # a class needs (N, classes) logits
    gb = lv.guided_backprop(net, x)  # target=None: the class most pixels get, over its pixels
    torch.testing.assert_close(gb.scores, targets.default(out)[0].detach())
    with pytest.raises(ValueError, match=r"no 'logits' in the model output, a dict with out"):
        lv.saliency(net, x, targets.classifier(0, key="logits"))


def test_detection_and_similarity_targets():
    det = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.4])},
           {"boxes": torch.tensor([[1.0, 1, 11, 11]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.7])}]
    t = targets.detection(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([1]))
    torch.testing.assert_close(t(det), torch.tensor([0.9, 0.0]))  # image 2's box has IoU 0.68 but label 2
    t = targets.detection([[[20.0, 20, 30, 30]], [[0.0, 0, 10, 10]]], [[2], [2]], iou=0.6)
    torch.testing.assert_close(t(det), torch.tensor([0.4, 0.7]))
    with pytest.raises(ValueError, match="expected a list of dicts with boxes, labels and scores"):
        t(torch.zeros(2, 3))
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(targets.similarity(torch.tensor([1.0, 0.0]))(emb), torch.tensor([1.0, 0.5 ** 0.5]))


# ----------------------------------------------------------------------------------------------------------------
# activation checkpointing


class CheckpointedNet(nn.Module):
    def __init__(self, mode=None):
        super().__init__()
        torch.manual_seed(2)
        self.mode = mode
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.b = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.a(x)
        x = self.b(x) if self.mode is None else checkpoint(self.b, x, use_reentrant=self.mode == "reentrant")
        return self.head(x.relu().mean((2, 3)))


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_every_method_through_activation_checkpointing_equals_the_plain_model(mode):
    plain, ckpt = CheckpointedNet().eval(), CheckpointedNet(mode).eval()
    x = torch.randn(2, 3, 16, 16)
    for layer in ("a.0", "b.0", "b"):  # before the segment, inside it, the segment itself
        torch.testing.assert_close(lv.grad_cam(ckpt, x, layer).low_res, lv.grad_cam(plain, x, layer).low_res)
    torch.testing.assert_close(lv.saliency(ckpt, x).maps, lv.saliency(plain, x).maps)
    torch.testing.assert_close(lv.saliency(ckpt, x, samples=3).maps, lv.saliency(plain, x, samples=3).maps)
    if mode == "non-reentrant":
        torch.testing.assert_close(lv.guided_backprop(ckpt, x).maps, lv.guided_backprop(plain, x).maps)
        torch.testing.assert_close(lv.grad_cam(ckpt, x, "a.0", method="guided-gradcam").guided,
                                   lv.grad_cam(plain, x, "a.0", method="guided-gradcam").guided)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=1)
    assert torch.equal(lv.top_k_examples(ckpt, loader, ["b.2"], k=1, progress=False).layers["b.2"].indices,
                       lv.top_k_examples(plain, loader, ["b.2"], k=1, progress=False).layers["b.2"].indices)
    if mode == "non-reentrant":
        torch.testing.assert_close(lv.deconvnet(ckpt, x, ["b.2"]).images["b.2"],
                                   lv.deconvnet(plain, x, ["b.2"]).images["b.2"])
        torch.testing.assert_close(lv.render(ckpt, ("b.2", [1]), size=8, steps=2, progress=False).images,
                                   lv.render(plain, ("b.2", [1]), size=8, steps=2, progress=False).images)
    else:  # recomputed in the backward pass, where the rules cannot reach: these methods say how to turn it off
        for call in (lambda: lv.deconvnet(ckpt, x, ["b.2"]), lambda: lv.deconvnet(ckpt, x, ["a.0"]),
                     lambda: lv.guided_backprop(ckpt, x),
                     lambda: lv.render(ckpt, ("b.2", [1]), size=8, steps=2, progress=False)):
            with pytest.raises(ReentrantCheckpointError, match="use_reentrant=True.*set_grad_checkpointing\\(False\\)"):
                call()
    assert hook_counts(ckpt) == 0 and all(p.grad is None for p in ckpt.parameters())



def test_gradient_methods_work_inside_the_callers_no_grad():
    """Called inside torch.no_grad() (an evaluation loop), the gradient methods give what they give outside it; a
    plain conv net is not mistaken for a reentrant checkpoint, and a real one is still told apart."""
    plain, ckpt = CheckpointedNet().eval(), CheckpointedNet("reentrant").eval()
    x = torch.randn(2, 3, 16, 16)
    calls = {"grad_cam": lambda m: lv.grad_cam(m, x, "a.0").low_res, "saliency": lambda m: lv.saliency(m, x).maps,
             "guided": lambda m: lv.guided_backprop(m, x).maps,
             "deconvnet": lambda m: lv.deconvnet(m, x, ["b.2"], top_k=1).images["b.2"],
             "receptive": lambda m: torch.tensor(lv.receptive_field(m, "b.2", (3, 16, 16)).size),
             "render": lambda m: lv.render(m, ("b.2", [1]), size=8, steps=2, progress=False).images,
             "deep_dream": lambda m: lv.deep_dream(m, x[0].sigmoid(), "b.2", octaves=1, steps=2, progress=False)}
    for name, call in calls.items():
        want = call(plain)
        with torch.no_grad():
            got = call(plain)
        torch.testing.assert_close(got, want, msg=name)
    with torch.no_grad():  # conv3, pool2, conv3, conv3: 3 + 1 + 2 * 2 + 2 * 2 = 12 pixels, every 2
        rf = lv.receptive_field(plain, "b.2", (3, 16, 16))
    assert (rf.size, rf.jump) == ((12, 12), (2, 2))
    with torch.no_grad():
        torch.testing.assert_close(lv.grad_cam(ckpt, x, "b.0").low_res, lv.grad_cam(plain, x, "b.0").low_res)
        for call in (lambda: lv.deconvnet(ckpt, x, ["b.2"]), lambda: lv.guided_backprop(ckpt, x),
                     lambda: lv.render(ckpt, ("b.2", [1]), size=8, steps=2, progress=False)):
            with pytest.raises(ReentrantCheckpointError, match="use_reentrant=True.*set_grad_checkpointing\\(False\\)"):
                call()
        assert not torch.is_grad_enabled()  # the caller's mode is back
    assert hook_counts(ckpt) == 0 and hook_counts(plain) == 0


# ----------------------------------------------------------------------------------------------------------------
# default layers, zero gradients, fixed-size models


def test_default_cam_layers_follow_the_architecture():
    import torchvision

    from lightning_vis.attribution import default_cam_layer

    x = torch.randn(1, 3, 64, 64)
    assert default_cam_layer(torchvision.models.resnet18().eval(), x) == "layer4"
    assert default_cam_layer(torchvision.models.vgg11().eval(), x) == "features"
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8,
                                              mlp_dim=8).eval()
    assert default_cam_layer(vit, torch.randn(1, 3, 32, 32)) == "encoder.layers.encoder_layer_1.ln_1"
    assert default_cam_layer(TinyViT().eval(), torch.randn(1, 3, 12, 12)) == "blocks.1.norm1"
    cam = lv.grad_cam(TinyViT().eval(), torch.randn(2, 3, 12, 12))
    assert cam.layer == "blocks.1.norm1" and cam.maps.shape == (2, 12, 12)


def test_a_layer_whose_gradient_is_zero_gets_a_warning_naming_one_that_works():
    vit = TinyViT().eval()
    x = torch.randn(2, 3, 12, 12)
    with pytest.warns(RuntimeWarning, match=r"zero everywhere.*a layer that works: 'blocks.1.norm1'"):
        cam = lv.grad_cam(vit, x, "norm")  # after the last block only the class token reaches the head
    assert cam.maps.abs().max() == 0


def test_render_feeds_a_fixed_size_model_the_size_it_accepts():
    import torchvision

    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                              mlp_dim=8).eval()
    res = lv.render(vit, ("encoder.layers.encoder_layer_0", [0, 3]), size=32, steps=2, progress=False)
    assert res.images.shape == (2, 3, 32, 32) and res.settings["input_size"] == [32, 32]
    cnn = lv.render(CheckpointedNet().eval(), ("b.2", [0]), size=16, steps=2, progress=False)
    assert cnn.settings["input_size"] == [40, 40]  # Lucid's transforms: padded by 12, jittered, as it always was


def test_chunk_size_zero_is_refused_not_taken_as_the_whole_batch():
    net, x = CheckpointedNet().eval(), torch.randn(2, 3, 16, 16)
    for call in (lambda c: lv.saliency(net, x, chunk_size=c), lambda c: lv.guided_backprop(net, x, chunk_size=c),
                 lambda c: lv.grad_cam(net, x, "a.0", chunk_size=c),
                 lambda c: lv.deconvnet(net, x, ["b.2"], chunk_size=c)):
        for bad in (0, -1, 1.5):
            with pytest.raises(ValueError, match=r"chunk_size must be a positive integer or None \(the whole batch\)"):
                call(bad)
    torch.testing.assert_close(lv.saliency(net, x, chunk_size=1).maps, lv.saliency(net, x, chunk_size=None).maps)


class DictOut(nn.Module):
    """A block that returns {"out": maps} (one tensor: it has a layout)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return {"out": self.conv(x)}


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.block = DictOut(nn.Conv2d(3, 4, 3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x)["out"].mean((2, 3)))


def test_receptive_field_and_render_read_a_layer_that_returns_a_dict():
    net = DictNet().eval()
    rf = lv.receptive_field(net, "block", (3, 16, 16))
    assert (rf.size, rf.jump) == ((3, 3), (1, 1))
    got = lv.render(net, ("block", [1]), size=8, steps=2, progress=False).images
    bare = nn.Sequential(net.block.conv)  # the same conv, returning a tensor
    want = lv.render(bare, ("0", [1]), size=8, steps=2, progress=False).images
    torch.testing.assert_close(got, want)


def test_classifier_target_takes_whole_numbers_of_any_dtype_and_refuses_the_rest():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]])
    for c in (torch.tensor([1, 3], dtype=torch.int32), torch.tensor([1.0, 3.0]), [1, 3], (1.0, 3.0)):
        assert torch.equal(targets.classifier(c)(logits), torch.tensor([1.0, 13.0]))
    for c in (2, 2.0, torch.tensor(2, dtype=torch.int16), torch.tensor([2.0])):
        assert torch.equal(targets.classifier(c)(logits), torch.tensor([2.0, 12.0]))
    for bad in (2.5, torch.tensor([1.0, 2.7]), float("nan")):
        with pytest.raises(ValueError, match="classifier target: class indices must be whole numbers, got"):
            targets.classifier(bad)
    for bad in (True, "cat", [[1], [2]], []):
        with pytest.raises(ValueError, match="classifier target: category must be a class index or one per input"):
            targets.classifier(bad)
