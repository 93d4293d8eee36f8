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
    """The model's output without and under the capture: the same tensors, bit for bit; the model's own hooks (HF's
    output capture, installed by its first call with output_attentions) left as they were."""
    hooks = hook_counts(model)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as att:
            again = model(x)
    for name in ("logits", "last_hidden_state", "pred_boxes", "pooler_output"):
        if getattr(plain, name, None) is not None:
            assert torch.equal(getattr(plain, name), getattr(again, name)), name
    assert hook_counts(model) == hooks
    return att


# ----------------------------------------------------------------------------------------------------------------
# Swin and Swinv2: window attention on (N, L, C) tokens, the grid passed as input_dimensions


def _swin(version, implementation="eager"):
    torch.manual_seed(0)
    config, model = {1: (transformers.SwinConfig, transformers.SwinForImageClassification),
                     2: (transformers.Swinv2Config, transformers.Swinv2ForImageClassification)}[version]
    # 14x14 patches, 4x4 windows: stage 0 padded to 16x16 (shifted by 2 in its second block), stage 1 (7x7) padded
    # to 8x8, stage 2 (4x4) one window over the whole grid, not shifted
    cfg = config(image_size=28, patch_size=2, embed_dim=8, depths=[2, 2, 2], num_heads=[2, 2, 2], window_size=4,
                 num_labels=3)
    return model._from_config(cfg, attn_implementation=implementation).eval(), torch.randn(2, 3, 28, 28)


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


@pytest.mark.parametrize("version, implementation, size", [(1, "eager", (28, 28)), (1, "sdpa", (28, 44)),
                                                            (2, "eager", (28, 28)), (2, "eager", (28, 44))])
def test_hf_swin_windows_of_every_stage_are_placed_on_the_grid(version, implementation, size):
    """Swinv2 has no sdpa path. 28x44: a 14x22 grid (padded to 16x24), 7x11 (8x12), 4x6 (one row of windows, padded
    to 4x8, not shifted), one image."""
    model, x = _swin(version, implementation)
    x = x[:, :, :size[0], :size[1]] if size == (28, 28) else torch.randn(1, 3, *size)
    prefix = "swin" if version == 1 else "swinv2"
    layers = [getattr(model, prefix).encoder.layers[s].blocks[i] for s in range(3) for i in range(2)]
    args, _ = _calls(model, x, layers)
    with torch.no_grad():
        maps = lv.attention_maps(model, x)
    suffix = ".attention" if version == 1 else ".attention.self"
    assert list(maps) == [f"{prefix}.encoder.layers.{s}.blocks.{i}{suffix}" for s in range(3) for i in range(2)]
    shifts = [int(layer.shift_size) for layer in layers]
    assert shifts == [0, 2, 0, 2, 0, 0]  # stage 2's window covers its grid's height: not shifted
    grids = [(14, 14), (7, 7), (4, 4)] if size == (28, 28) else [(14, 22), (7, 11), (4, 6)]
    assert [dims for _, dims, *_ in args] == [g for g in grids for _ in range(2)]
    for layer, (hidden, dims, *_), name in zip(layers, args, maps):
        with torch.no_grad():
            want = swin_received(layer, hidden, dims)
        assert maps[name].shape == (len(x), 2, *dims)
        torch.testing.assert_close(maps[name], want, msg=name)
    with pytest.raises(ValueError, match="attention rollout is not defined for window attention .*shifted windows of "
                                         f"{prefix}.encoder.layers.0.blocks.0"):
        lv.attention_rollout(model, x)
    att = _same_output(model, x)
    assert all(r.kind == "window" and r.placeable for r in att.records)


# ----------------------------------------------------------------------------------------------------------------
# F.multi_head_attention_forward called directly: open_clip's (and CLIP's) ModifiedResNet attention pool


def _heads_softmax(q, k, heads):
    """(L, N, E) queries and (S, N, E) keys -> (N, heads, L, S) softmax(q k^T / sqrt(d)) per head."""
    q, k = (t.reshape(t.shape[0], t.shape[1], heads, -1).permute(1, 2, 0, 3) for t in (q, k))
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)


def _pool_weights(pool, feature):
    """(N, heads, 1 + hw, 1 + hw): the weights of open_clip's AttentionPool2d on (N, C, h, w) features, by hand."""
    t = feature.flatten(2).permute(2, 0, 1)
    t = torch.cat([t.mean(0, keepdim=True), t]) + pool.positional_embedding[:, None]  # the mean token + the grid
    return _heads_softmax(pool.q_proj(t), pool.k_proj(t), pool.num_heads)


def test_open_clip_attention_pool_is_seen_and_placed_on_the_feature_grid():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.modified_resnet.ModifiedResNet(layers=[1, 1, 1, 1], output_dim=16, heads=2, image_size=96,
                                                     width=8).eval()
    x = torch.randn(2, 3, 96, 96)
    ((feature,),), _ = _calls(model, x, [model.attnpool])  # (2, 256, 3, 3): the image's grid / 32
    with torch.no_grad():
        w = _pool_weights(model.attnpool, feature)  # (2, heads, 10, 10)
    maps = lv.attention_maps(model, x)
    assert list(maps) == ["attnpool"]
    torch.testing.assert_close(maps["attnpool"], w[:, :, 0, 1:].reshape(2, 2, 3, 3))  # the mean token's query
    # one block: (W + I) / 2, the mean token's row, itself dropped
    torch.testing.assert_close(lv.attention_rollout(model, x), w.mean(1)[:, 0, 1:].reshape(2, 3, 3) / 2)
    att = _same_output(model, x)
    assert [r.source for r in att.records] == ["multi_head_attention_forward"]


def test_open_clip_rn50_attention_pool():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("RN50", pretrained=None).eval()
    x = torch.randn(1, 3, 224, 224)
    ((feature,),), plain = _calls(model, x, [model.visual.attnpool])  # (1, 2048, 7, 7)
    with torch.no_grad():
        w = _pool_weights(model.visual.attnpool, feature)
        with capture_attention(model):
            again = model(x)
    assert torch.equal(plain[0], again[0]) and hook_counts(model) == 0  # the image features, bit for bit
    maps = lv.attention_maps(model, x)  # the image tower only: no text was given
    assert list(maps) == ["visual.attnpool"]
    torch.testing.assert_close(maps["visual.attnpool"], w[:, :, 0, 1:].reshape(1, 32, 7, 7))


# ----------------------------------------------------------------------------------------------------------------
# global attention of the hubs' ViTs against their own weights (output_attentions), SigLIP's pooling head


def _hf(name):
    torch.manual_seed(0)
    small = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    t = transformers
    config, model, prefix = {
        "vit": (t.ViTConfig(**small, intermediate_size=32), t.ViTForImageClassification, 1),
        "deit": (t.DeiTConfig(**small, intermediate_size=32), t.DeiTForImageClassificationWithTeacher, 2),
        "beit": (t.BeitConfig(**small, intermediate_size=32, use_relative_position_bias=True),
                 t.BeitForImageClassification, 1),
        "dinov2-registers": (t.Dinov2WithRegistersConfig(**small, mlp_ratio=2, num_register_tokens=4),
                             t.Dinov2WithRegistersForImageClassification, 5),
        "clip-vision": (t.CLIPVisionConfig(**small, intermediate_size=32), t.CLIPVisionModel, 1),
        "siglip-vision": (t.SiglipVisionConfig(**small, intermediate_size=32), t.SiglipVisionModel, 0),
    }[name]
    x = torch.randn(2, 3, 32, 40) if name in ("vit", "beit", "dinov2-registers") else torch.randn(2, 3, 32, 32)
    kw = {"interpolate_pos_encoding": True} if x.shape[-1] != 32 else {}
    return model._from_config(config, attn_implementation="eager").eval(), x, prefix, kw


@pytest.mark.parametrize("name", ["vit", "deit", "beit", "dinov2-registers", "clip-vision", "siglip-vision"])
def test_hf_vit_attention_matches_the_models_own_weights(name):
    model, x, prefix, kw = _hf(name)
    grid = (x.shape[-2] // 8, x.shape[-1] // 8)
    with torch.no_grad():
        out = model(x, output_attentions=True, **kw)
    own = out.attentions  # per encoder layer (N, heads, L, L)
    assert len(own) == 2 and own[0].shape[-1] == prefix + math.prod(grid)
    maps = lv.attention_maps(model, x) if not kw else lv.attention_maps(_Kw(model, kw), x)
    encoder = [k for k in maps if not k.endswith("head.attention")]
    assert len(encoder) == 2
    for layer, w in zip(encoder, own):
        row = w[:, :, 0] if prefix else w.mean(-2)  # the class token's row, or what each token receives
        torch.testing.assert_close(maps[layer], row[..., prefix:].reshape(2, 2, *grid), msg=layer)
    a1, a2 = ((w.mean(1) + torch.eye(w.shape[-1])) / 2 for w in own)
    rolled = a2 @ a1
    want = (rolled[:, 0] if prefix else rolled.mean(1))[:, prefix:].reshape(2, *grid)
    torch.testing.assert_close(lv.attention_rollout(model, x) if not kw else lv.attention_rollout(_Kw(model, kw), x),
                               want)
    _same_output(model, x) if not kw else None


class _Kw(torch.nn.Module):
    """A model called with fixed keyword arguments (HF's interpolate_pos_encoding for a non-square input)."""

    def __init__(self, model, kw):
        super().__init__()
        self.model, self.kw = model, kw

    def forward(self, x):
        return self.model(x, **self.kw)


def test_siglip_pooling_head_is_one_querys_map_and_left_out_of_rollout():
    model, x, _, _ = _hf("siglip-vision")
    head = model.head
    with torch.no_grad():
        out = model(x, output_attentions=True)
        mha = head.attention
        q = head.probe.expand(2, 1, -1) @ mha.in_proj_weight[:16].T + mha.in_proj_bias[:16]
        k = out.last_hidden_state @ mha.in_proj_weight[16:32].T + mha.in_proj_bias[16:32]
        w = _heads_softmax(q.transpose(0, 1), k.transpose(0, 1), 2)  # (2, heads, 1, 16): the probe over 4x4
    maps = lv.attention_maps(model, x)
    assert list(maps)[-1] == "head.attention"
    torch.testing.assert_close(maps["head.attention"], w[:, :, 0].reshape(2, 2, 4, 4))
    a1, a2 = ((a.mean(1) + torch.eye(16)) / 2 for a in out.attentions)  # the encoder only
    torch.testing.assert_close(lv.attention_rollout(model, x), (a2 @ a1).mean(1).reshape(2, 4, 4))
    with pytest.raises(ValueError, match="attention rollout needs the tokens' own self-attention; the attention of "
                                         r"'head' is a pooling head's \(one query attending to the tokens\)"):
        lv.attention_rollout(model, x, "head")


# ----------------------------------------------------------------------------------------------------------------
# DETR: the encoder on the backbone's feature grid, the decoder's object queries


def _detr():
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage4"])
    cfg = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                  d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                                  num_labels=3)
    model = transformers.DetrForObjectDetection._from_config(cfg, attn_implementation="eager").eval()
    return model, torch.randn(2, 3, 64, 96)  # a 2x3 feature grid (stride 32); 5 object queries


def test_detr_encoder_on_the_feature_grid_cross_attention_per_query_decoder_self_attention_refused():
    from lightning_vis.hooks import LayoutError

    model, x = _detr()
    with torch.no_grad():
        out = model(x, output_attentions=True)
    enc, cross = out.encoder_attentions, out.cross_attentions  # the model's own: (2, heads, 6, 6), (2, heads, 5, 6)
    assert enc[0].shape == (2, 2, 6, 6) and cross[0].shape == (2, 2, 5, 6)
    with pytest.warns(RuntimeWarning, match=r"left out 2 layer\(s\): attention of 'model.decoder.layers.0.self_attn' "
                                            "is no map of the image: its 5 queries attend to each other"):
        maps = lv.attention_maps(model, x)
    assert list(maps) == ["model.encoder.layers.0.self_attn", "model.encoder.layers.1.self_attn",
                          "model.decoder.layers.0.encoder_attn", "model.decoder.layers.1.encoder_attn"]
    for i in range(2):
        torch.testing.assert_close(maps[f"model.encoder.layers.{i}.self_attn"], enc[i].mean(-2).reshape(2, 2, 2, 3))
        torch.testing.assert_close(maps[f"model.decoder.layers.{i}.encoder_attn"], cross[i].reshape(2, 2, 5, 2, 3))
    for grid in (None, (2, 2)):  # no grid turns object queries into positions
        with pytest.raises(LayoutError, match="attention of 'model.decoder.layers.1.self_attn' is no map of the "
                                              "image: its 5 queries attend to each other"):
            lv.attention_maps(model, x, "model.decoder.layers.1.self_attn", grid=grid)
    a1, a2 = ((w.mean(1) + torch.eye(6)) / 2 for w in enc)  # the encoder only
    torch.testing.assert_close(lv.attention_rollout(model, x), (a2 @ a1).mean(1).reshape(2, 2, 3))
    with pytest.raises(ValueError, match="attention rollout needs the tokens' own self-attention; the attention of "
                                         "'model.decoder' is a decoder's"):
        lv.attention_rollout(model, x, "model.decoder")
    _same_output(model, x)


def test_pvt_v2_keys_on_the_reduced_grid_match_the_models_own_weights():
    """PVTv2's spatial-reduction attention: queries on each stage's grid, keys on a grid reduced by a strided conv
    (16x24 -> 2x3 in stage 0); the map is what each reduced key receives, averaged over the queries."""
    torch.manual_seed(0)
    cfg = transformers.PvtV2Config(image_size=64, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 2, 2],
                                   depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], num_labels=3)
    model = transformers.PvtV2ForImageClassification._from_config(cfg, attn_implementation="eager").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        own = [w for stage in model(x, output_attentions=True).attentions for w in stage]  # (N, heads, hw, 6)
    maps = lv.attention_maps(model, x)
    assert [tuple(w.shape[-2:]) for w in own] == [(384, 6), (96, 6), (24, 6), (6, 6)]
    assert list(maps) == [f"pvt_v2.encoder.layers.{i}.blocks.0.attention" for i in range(4)]
    for (layer, got), w in zip(maps.items(), own):
        torch.testing.assert_close(got, w.mean(-2).reshape(2, w.shape[1], 2, 3), msg=layer)
    with pytest.raises(ValueError, match=r"attention rollout is not defined here: the blocks attend over different "
                                         r"token sets \(384x6 -> 96x6 -> 24x6 -> 6x6 queries x keys"):
        lv.attention_rollout(model, x)
    _same_output(model, x)


def test_mask2former_deformable_attention_refused_cross_attention_per_query_on_each_level():
    """Mask2Former: the pixel decoder's deformable attention weighs sampling points (refused, whatever grid is
    given); the transformer decoder's masked cross-attention visits one feature level per layer (2x3, then 4x6 for a
    64x96 image: 24 keys are not 18 prefix tokens + 2x3), per object query; its self-attention is refused."""
    from lightning_vis.hooks import LayoutError

    torch.manual_seed(0)
    backbone = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                       num_heads=[1, 1, 1, 1], window_size=2,
                                       out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.Mask2FormerConfig(backbone_config=backbone, use_pretrained_backbone=False, feature_size=32,
                                         mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
                                         dim_feedforward=32, num_queries=5, decoder_layers=3, encoder_layers=1,
                                         num_attention_heads=2, num_labels=3)
    model = transformers.Mask2FormerForUniversalSegmentation(cfg).eval()
    x = torch.randn(1, 3, 64, 96)
    with pytest.warns(RuntimeWarning, match=r"left out 3 layer\(s\): attention of 'model.pixel_level_module.decoder"
                                            r".encoder.layers.0.self_attn' is no map of the image: .* is deformable "
                                            "attention: its softmax weighs sampling points"):
        maps = lv.attention_maps(model, x)
    cross = [f"model.transformer_module.decoder.layers.{i}.cross_attn" for i in range(2)]
    assert [k for k in maps if "transformer_module" in k] == cross
    assert maps[cross[0]].shape == (1, 2, 5, 2, 3) and maps[cross[1]].shape == (1, 2, 5, 4, 6)
    for name in cross:  # every key placed: each query's weights over its level's grid sum to 1
        torch.testing.assert_close(maps[name].sum((-2, -1)), torch.ones(1, 2, 5))
    for layer, grid in (("model.pixel_level_module.decoder.encoder.layers.0", (2, 3)),
                        ("model.transformer_module.decoder.layers.0.self_attn", (2, 2))):
        with pytest.raises(LayoutError, match="is no map of the image"):
            lv.attention_maps(model, x, layer, grid=grid)
    _same_output(model, x)
