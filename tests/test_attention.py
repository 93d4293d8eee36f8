"""Token layouts to grids, and attention weights captured from nn.MultiheadAttention and torchvision's ViT."""

import math

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from lightning_vis.hooks import capture, capture_attention, hook_counts, tokens_to_grid


def test_tokens_to_grid_places_tokens_row_by_row():
    t = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    g, cls = tokens_to_grid(t)
    assert cls is None and g.shape == (2, 3, 4, 4)
    assert torch.equal(g[1, 2, 1, 3], t[1, 7, 2])  # token 7 -> row 1, column 3
    with_cls = torch.cat([torch.full((2, 1, 3), -1.0), t], 1)
    g2, cls2 = tokens_to_grid(with_cls)
    assert torch.equal(g2, g) and torch.equal(cls2, torch.full((2, 3), -1.0))
    g3, _ = tokens_to_grid(t, grid=(2, 8))
    assert g3.shape == (2, 3, 2, 8) and torch.equal(g3[0, :, 1, 0], t[0, 8])
    with pytest.raises(ValueError, match="15 tokens do not make a square grid"):
        tokens_to_grid(t[:, :15])
    with pytest.raises(ValueError, match=r"\(N, L, D\)"):
        tokens_to_grid(t[0])


def manual_attention(mha, x):
    """Per-head softmax(Q K^T / sqrt(d)) written out from the module's projection weights."""
    n, length, e = x.shape
    h = mha.num_heads
    q, k, _ = (x @ mha.in_proj_weight.T + mha.in_proj_bias).split(e, dim=-1)
    q = q.view(n, length, h, e // h).transpose(1, 2)
    k = k.view(n, length, h, e // h).transpose(1, 2)
    return (q @ k.transpose(-1, -2) / math.sqrt(e // h)).softmax(-1)


def test_weights_match_hand_computation_and_the_caller_gets_what_it_asked_for():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        plain_out, none = mha(x, x, x, need_weights=False)
        _, averaged = mha(x, x, x)
        with capture_attention(mha, mha) as att:  # the module itself is the layer
            out1, w1 = mha(x, x, x, need_weights=False)
            out2, w2 = mha(x, x, x)  # default: averaged over heads
            out3, w3 = mha(x, x, x, None, True, None, False)  # positional: per head
    assert none is None and w1 is None
    torch.testing.assert_close(out1, plain_out)
    torch.testing.assert_close(w2, averaged)
    assert w3.shape == (3, 2, 5, 5)
    expected = manual_attention(mha, x)
    for got in att.values[""]:
        torch.testing.assert_close(got, expected)
    assert len(att.values[""]) == 3 and hook_counts(mha) == 0


def test_vit_attention_and_token_grids():
    torch.manual_seed(1)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
        with capture_attention(vit) as att, capture(vit, "encoder.layers.encoder_layer_1") as tap:
            logits = vit(x)
    torch.testing.assert_close(logits, plain)
    names = list(att.values)
    assert names == ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"]
    for name in names:
        (w,) = att.values[name]
        assert w.shape == (2, 2, 17, 17)  # 16 patches + the class token, per head
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 17))
    grid, cls = tokens_to_grid(tap.output("encoder.layers.encoder_layer_1"))
    assert grid.shape == (2, 16, 4, 4) and cls.shape == (2, 16)
    assert hook_counts(vit) == 0


def test_a_layer_without_attention_records_nothing_and_the_method_says_so():
    import lightning_vis as lv

    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), capture_attention(vit, "conv_proj") as att:
        vit(x)
    assert att.records == [] and hook_counts(vit) == 0
    with pytest.raises(ValueError, match="no attention weights were computed in the layers named"):
        lv.attention_maps(vit, x, "conv_proj")
