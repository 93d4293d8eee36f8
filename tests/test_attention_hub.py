"""Attention in the hubs' models (Hugging Face transformers, open_clip), built from small configs with random
weights: the weights captured are checked against hand computations from each module's own projection weights, and
placed on the image grid (or refused in one line); the model's output is the same, bit for bit."""

import math

import pytest
import torch
import torch.nn.functional as F

import lightning_vis as lv
from lightning_vis.hooks import capture_attention, hook_counts

transformers = pytest.importorskip("transformers")


def _calls(model, x, modules):
    """The positional arguments each of `modules` gets in a plain forward pass of `model` on x, and the output."""
    got = {m: [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args: got[mod].append(args)) for m in modules]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return [got[m][0] for m in modules], out


def _same_output(model, x):
    """The model's output without and under the capture: the same tensors, bit for bit."""
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as att:
            again = model(x)
    for name in ("logits", "last_hidden_state", "pred_boxes", "pooler_output"):
        if getattr(plain, name, None) is not None:
            assert torch.equal(getattr(plain, name), getattr(again, name)), name
    assert hook_counts(model) == 0
    return att


# ----------------------------------------------------------------------------------------------------------------
# Swin and Swinv2: window attention on (N, L, C) tokens, the grid passed as input_dimensions


def _swin(version):
    torch.manual_seed(0)
    config, model = {1: (transformers.SwinConfig, transformers.SwinForImageClassification),
                     2: (transformers.Swinv2Config, transformers.Swinv2ForImageClassification)}[version]
    # 14x14 patches, 4x4 windows: stage 0 padded to 16x16 (shifted by 2 in its second block), stage 1 (7x7) padded
    # to 8x8, stage 2 (4x4) one window over the whole grid, not shifted
    cfg = config(image_size=28, patch_size=2, embed_dim=8, depths=[2, 2, 2], num_heads=[2, 2, 2], window_size=4,
                 num_labels=3)
    return model._from_config(cfg, attn_implementation="eager").eval(), torch.randn(2, 3, 28, 28)


def _swin_logits(layer, windows, mask):
    """Per window and head, the attention logits of HF's Swin (scaled dot products + relative position bias) or
    Swinv2 (cosine similarity * clamped logit scale + 16 sigmoid(continuous position bias)), + the shift mask."""
    n, area, _ = windows.shape
    if hasattr(layer.attention, "q_proj"):  # Swin
        att = layer.attention
        heads = att.num_attention_heads
        q, k = (p(windows).view(n, area, heads, -1).transpose(1, 2) for p in (att.q_proj, att.k_proj))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        table = att.relative_position_bias.relative_position_bias_table
        bias = table[att.relative_position_bias.relative_position_index.view(-1)].view(area, area, heads)
        logits = logits + bias.permute(2, 0, 1)
    else:  # Swinv2
        att = layer.attention.self
        heads = att.num_attention_heads
        q, k = (p(windows).view(n, area, heads, -1).transpose(1, 2) for p in (att.query, att.key))
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = logits * att.logit_scale.clamp(max=math.log(100)).exp()
        table = att.continuous_position_bias_mlp(att.relative_coords_table).view(-1, heads)
        bias = table[att.relative_position_index.view(-1)].view(area, area, heads)
        logits = logits + 16 * torch.sigmoid(bias.permute(2, 0, 1))
    return logits + mask[:, None]


def swin_received(layer, hidden, dims):
    """(N, heads, h, w): per head, the attention each position receives, averaged over the queries of its window
    that are the map's own (not padding), by a loop over the windows of the padded, rolled grid."""
    b, _, c = hidden.shape
    h, w = dims
    ws, shift = int(layer.window_size), int(layer.shift_size)  # as the forward left them (HF clamps them there)
    x = (layer.layernorm_before(hidden) if hasattr(layer.attention, "q_proj") else hidden).view(b, h, w, c)
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h)).roll((-shift, -shift), (1, 2))

    def region(i, size):  # the shift mask's regions along an axis of the rolled grid
        return int(i >= size - ws) + int(i >= size - shift) if shift else 0

    out = None
    for r0 in range(0, hp, ws):
        for c0 in range(0, wp, ws):
            cells = [(r, cc) for r in range(r0, r0 + ws) for cc in range(c0, c0 + ws)]
            labels = torch.tensor([region(r, hp) * 3 + region(cc, wp) for r, cc in cells])
            mask = torch.where(labels[:, None] == labels[None], 0.0, -100.0)
            windows = x[:, r0:r0 + ws, c0:c0 + ws].reshape(b, ws * ws, c)
            weights = _swin_logits(layer, windows, mask[None].expand(b, -1, -1)).softmax(-1)
            home = [((r + shift) % hp, (cc + shift) % wp) for r, cc in cells]  # where each cell was before the roll
            real = torch.tensor([float(i < h and j < w) for i, j in home])
            received = (weights * real[:, None]).sum(-2) / real.sum()  # (b, heads, keys)
            if out is None:
                out = torch.zeros(b, received.shape[1], h, w)
            for k, (i, j) in enumerate(home):
                if i < h and j < w:
                    out[:, :, i, j] = received[:, :, k]
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_hf_swin_windows_of_every_stage_are_placed_on_the_grid(version):
    model, x = _swin(version)
    prefix = "swin" if version == 1 else "swinv2"
    layers = [getattr(model, prefix).encoder.layers[s].blocks[i] for s in range(3) for i in range(2)]
    args, _ = _calls(model, x, layers)
    with torch.no_grad():
        maps = lv.attention_maps(model, x)
    suffix = ".attention" if version == 1 else ".attention.self"
    assert list(maps) == [f"{prefix}.encoder.layers.{s}.blocks.{i}{suffix}" for s in range(3) for i in range(2)]
    shifts = [int(layer.shift_size) for layer in layers]
    assert shifts == [0, 2, 0, 2, 0, 0]  # stage 2's window covers its 4x4 grid: not shifted
    for layer, (hidden, dims, *_), name in zip(layers, args, maps):
        assert dims in ((14, 14), (7, 7), (4, 4))
        with torch.no_grad():
            want = swin_received(layer, hidden, dims)
        assert maps[name].shape == (2, 2, *dims)
        torch.testing.assert_close(maps[name], want, msg=name)
    with pytest.raises(ValueError, match="attention rollout is not defined for window attention .*shifted windows of "
                                         f"{prefix}.encoder.layers.0.blocks.0"):
        lv.attention_rollout(model, x)
    att = _same_output(model, x)
    assert all(r.kind == "window" and r.placeable for r in att.records)
