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


class _Attn(nn.Module):
    """One head of scaled dot-product attention on (N, L, D) tokens."""

    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x)[:, None].chunk(3, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, 0]

    def weights(self, x):  # (N, 1, L, L), by hand
        q, k, _ = self.qkv(x).chunk(3, -1)
        return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)[:, None]


class _TwoStage(nn.Module):
    """8x8 tokens, then 4x4 tokens (a LeViT-like subsampling); no class token."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.a1 = _Attn(16)
        self.down = nn.Conv2d(16, 16, 2, 2)
        self.a2 = _Attn(16)

    def tokens(self, x):
        t1 = self.embed(x).flatten(2).transpose(1, 2)
        t2 = self.down(self.a1(t1).transpose(1, 2).reshape(len(x), 16, 8, 8)).flatten(2).transpose(1, 2)
        return t1, t2

    def forward(self, x):
        return self.a2(self.tokens(x)[1]).mean(1)


def test_a_grid_given_applies_where_it_fits_and_nowhere_else():
    """grid=(4, 4) fits the second stage's 16 keys; the first stage's 64 keys are not 48 prefix tokens + 4x4."""
    import lightning_vis as lv
    from lightning_vis.hooks import LayoutError

    m, x = _TwoStage().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t1, t2 = m.tokens(x)
        want1 = m.a1.weights(t1).mean(-2).reshape(2, 1, 8, 8)  # received, averaged over the queries
        want2 = m.a2.weights(t2).mean(-2).reshape(2, 1, 4, 4)
    for grid in (None, (4, 4)):
        got = lv.attention_maps(m, x, grid=grid)
        torch.testing.assert_close(got["a1"], want1)
        torch.testing.assert_close(got["a2"], want2)
    with pytest.raises(LayoutError, match=r"the grid given, \(9, 9\), fits none of the layers' key counts \(16, 64"):
        lv.attention_maps(m, x, grid=(9, 9))


def test_rollout_takes_a_grid_that_fits_and_refuses_one_that_does_not():
    import lightning_vis as lv
    from lightning_vis.hooks import LayoutError

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.embed, self.a1, self.a2 = nn.Conv2d(3, 16, 4, 4), _Attn(16), _Attn(16)

        def forward(self, x):
            return self.a2(self.a1(self.embed(x).flatten(2).transpose(1, 2))).mean(1)

    m, x = One().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t1 = m.embed(x).flatten(2).transpose(1, 2)
        w1, w2 = m.a1.weights(t1)[:, 0], m.a2.weights(m.a1(t1))[:, 0]
    eye = torch.eye(64)
    a1, a2 = (w1 + eye) / 2, (w2 + eye) / 2  # rows still sum to 1
    want = (a2 @ a1).mean(1)
    torch.testing.assert_close(lv.attention_rollout(m, x), want.reshape(2, 8, 8))
    torch.testing.assert_close(lv.attention_rollout(m, x, grid=(8, 8)), want.reshape(2, 8, 8))
    torch.testing.assert_close(lv.attention_rollout(m, x, grid=(7, 9), class_token="none"),
                               want[:, 1:].reshape(2, 7, 9))
    for bad in ((4, 4), (9, 9)):  # 48 "prefix tokens"; more cells than keys
        with pytest.raises(LayoutError, match=rf"attention rollout: the grid given, \({bad[0]}, {bad[1]}\) .* does not "
                                              r"fit its 64 keys"):
            lv.attention_rollout(m, x, grid=bad)


def test_class_token_is_checked_before_any_forward_pass():
    import lightning_vis as lv

    m = _TwoStage().eval()
    ran = []
    h = m.register_forward_hook(lambda *a: ran.append(1))
    try:
        for method in (lv.attention_maps, lv.attention_rollout):
            with pytest.raises(ValueError, match="class_token must be 'auto', 'first' or 'none', not 'cls'"):
                method(m, torch.randn(1, 3, 32, 32), class_token="cls")
    finally:
        h.remove()
    assert not ran


def test_a_failure_reading_multihead_weights_leaves_the_forward_alone_and_is_reported(monkeypatch):
    import lightning_vis as lv

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    m, x = SelfAttention().eval(), torch.randn(3, 5, 8)

    def broken(self, *a):
        raise RuntimeError("cannot recompute")

    monkeypatch.setattr(capture_attention, "_mha_weights", broken)
    with torch.no_grad():
        want = m(x)
        with capture_attention(m) as att:
            got = m(x)
    torch.testing.assert_close(got, want)
    assert att.records == [] and att.failures == ["mha: RuntimeError: cannot recompute"] and hook_counts(m) == 0
    with pytest.raises(ValueError, match="no attention weights were computed .*; reading them failed: "
                                         "mha: RuntimeError: cannot recompute"):
        lv.attention_maps(m, x)
