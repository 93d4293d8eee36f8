"""Layouts that never guess, on models as the hubs build them (transformers, small configs, random weights, nothing
downloaded): tokens go on a grid only when they come from the input's positions (DETR's object queries, attention
probabilities and MobileViTV2's unfolded patches are "not a map"), a module that acts on the last dim decides even
where C = H = W, a shape with two readings is a LayoutError, the same model and input give the same layouts in every
run whatever else is alive, and activation_grid draws an output in its own layout or refuses it."""

import gc

import pytest
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis.attribution import default_cam_layer
from lightning_vis.hooks import Layout, LayoutError, LayoutTracer, trace_layouts
from lightning_vis.hooks.layout import Unplaceable

transformers = pytest.importorskip("transformers")


def _detr(queries: int):
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage4"])
    cfg = transformers.DetrConfig(use_pretrained_backbone=False, use_timm_backbone=False, backbone_config=backbone,
                                  d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                                  num_queries=queries, num_labels=3)
    return transformers.DetrForObjectDetection(cfg).eval()


def _described(layouts):
    return {k: v.describe() if isinstance(v, Layout) else f"X {v.reason}" for k, v in layouts.items()}


@pytest.mark.parametrize("queries, size", [(10, 64), (100, 320)])
def test_detr_object_queries_are_not_a_map(queries, size):
    """10 queries were 'tokens 6+2x2' next to a 2x2 feature grid; 100 queries next to a 10x10 feature grid (a 320
    input, stride 32) have the very count of that grid: only where they come from tells them apart."""
    m = _detr(queries)
    side = size // 32
    lay = trace_layouts(m, torch.rand(1, 3, size, size))
    enc = lay["model.encoder.layers.0.final_layer_norm"]
    assert isinstance(enc, Layout) and (enc.kind, enc.grid, enc.prefix) == ("tokens", (side, side), 0)
    for name in ("model.decoder.layers.0.self_attn_layer_norm", "model.decoder.layers.0.encoder_attn.o_proj",
                 "model.decoder.layers.0.final_layer_norm", "model.decoder.layernorm", "class_labels_classifier",
                 "bbox_predictor"):
        assert isinstance(lay[name], Unplaceable), (name, lay[name])
        assert lay[name].reason.startswith("not a map: it is not computed from the input's positions")
    # the keys and values the queries read are the image's features, on its grid
    assert lay["model.decoder.layers.0.encoder_attn.v_proj"].describe() == f"tokens {side}x{side}"
    with pytest.raises(LayoutError, match=r"layer 'model.decoder.layernorm' output \(1, %d, 16\): not a map" % queries):
        lv.activations(m, torch.rand(1, 3, size, size), "model.decoder.layernorm")[0].layout("model.decoder.layernorm")


def test_the_default_cam_layer_of_hub_models_is_a_map_of_the_image():
    """Never a decoder or query layer (DETR's was its decoder norm), never attention probabilities or unfolded
    patches: the last layer on the image's grid."""
    seg = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        decoder_hidden_size=16, num_labels=3)).eval()
    mvit = transformers.MobileViTV2ForImageClassification(transformers.MobileViTV2Config(
        image_size=64, width_multiplier=0.25, num_labels=5)).eval()
    swin = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
        num_labels=5)).eval()
    x64, x32 = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32)
    assert default_cam_layer(_detr(10), x64) == "model.encoder"  # its last layer: the 2x2 features
    assert default_cam_layer(seg, x64) == "decode_head"  # its fused 16x16 maps (the class logits)
    assert default_cam_layer(mvit, x64) == "mobilevitv2.encoder"  # its last stage, 2x2
    assert default_cam_layer(swin, x32) == "swinv2.layernorm"


def test_attention_probabilities_and_unfolded_patches_are_not_maps():
    """HF Swinv2's last stage has one window: its (N, heads, 16, 16) attention probabilities were read as a
    channels-first 16x16 map; MobileViTV2's (N, C, pixels per patch, patches) were channels-first maps of a GroupNorm
    and 1x1 convolutions. What is folded back onto the grid is a map again."""
    swin = transformers.Swinv2Model(transformers.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)).eval()
    lay = trace_layouts(swin, torch.rand(1, 3, 32, 32))
    probs = lay["encoder.layers.1.blocks.0.attention.self.dropout"]
    assert isinstance(probs, Unplaceable) and probs.shape == (1, 2, 16, 16)
    assert probs.reason.startswith("not a map: attention probabilities")
    assert lay["encoder.layers.1.blocks.0.attention.self"].describe() == "tokens 4x4"
    # a learned table of relative positions is not a map of the image either
    assert isinstance(lay["encoder.layers.0.blocks.0.attention.self.continuous_position_bias_mlp"], Unplaceable)

    mvit = transformers.MobileViTV2Model(transformers.MobileViTV2Config(image_size=64, width_multiplier=0.25)).eval()
    lay = trace_layouts(mvit, torch.rand(1, 3, 64, 64))
    for name in ("encoder.layer.3.transformer.layer.0.layernorm_before",
                 "encoder.layer.3.transformer.layer.0.ffn.conv1", "encoder.layer.3.layernorm"):
        assert isinstance(lay[name], Unplaceable) and lay[name].reason.startswith("not a map: patches unfolded"), name
    assert lay["encoder.layer.3.transformer.layer.0.attention.attn_dropout"].reason.startswith(
        "not a map: attention probabilities")
    assert lay["encoder.layer.3.conv_projection"].describe() == "channels-first 4x4"


def test_the_same_model_and_input_give_the_same_layouts_whatever_else_is_alive():
    """SegFormer's third stage has 16 tokens (4x4) after a 2x2 sequence reduction: it was 'tokens 12+2x2' in some
    runs and 'tokens 4x4' in others, as freed tensors' addresses were found again in the memo."""
    torch.manual_seed(0)
    m = transformers.SegformerModel(transformers.SegformerConfig(
        num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 1])).eval()
    x = torch.rand(1, 3, 64, 64)
    runs, junk = [], []
    for i in range(12):
        junk.append([torch.rand(1, 16, 24) for _ in range(i % 5)])  # reuses addresses freed by the last pass
        with torch.no_grad(), LayoutTracer(m, cache=False) as tracer:
            m(x)
        runs.append(_described(tracer.layouts))
        if i % 3 == 2:
            junk.clear()
            gc.collect()
    assert all(r == runs[0] for r in runs)
    block = "stages.2.blocks.0."
    stage = {k[len(block):]: v for k, v in runs[0].items() if k.startswith(block)}
    reduced = {"attention.sequence_reduction.sequence_reduction": "channels-first 2x2",  # keys of a 2x2 reduction
               "attention.sequence_reduction.layer_norm": "tokens 2x2", "attention.sequence_reduction": "tokens 2x2",
               "attention.k_proj": "tokens 2x2", "attention.v_proj": "tokens 2x2",
               "mlp.dwconv.dwconv": "channels-first 4x4"}
    assert len(stage) > 10 and stage == {k: reduced.get(k, "tokens 4x4") for k in stage}, stage


def test_a_linear_decides_where_channels_equal_the_grid():
    """A ConvNeXtV2 stage whose output has C = H = W (8 x 8x8): its Linear layers act on the last dim by definition
    (channels-last), the permute back makes channels-first; no reading of the shape is needed, so no LayoutError."""
    m = transformers.ConvNextV2Model(transformers.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], patch_size=4,
                                                                   num_stages=2)).eval()
    lay = _described(trace_layouts(m, torch.rand(1, 3, 32, 32)))
    assert lay["encoder.stages.0.layers.0.pwconv1"] == "channels-last 8x8"
    assert lay["encoder.stages.0.layers.0.pwconv2"] == "channels-last 8x8"  # was channels-first
    assert lay["encoder.stages.0.layers.0.grn"] == "channels-last 8x8"
    assert lay["encoder.stages.0.layers.0.drop_path"] == "channels-first 8x8"
    assert lay["encoder.stages.0"] == "channels-first 8x8"


def test_a_shape_with_two_readings_is_a_layout_error_even_after_one_of_that_shape():
    """Nothing says where the units of `odd` are (a reshaped tensor, C = H = W): an earlier output of the same shape
    is no evidence, so it is a LayoutError, as documented (it used to take the earlier one's layout)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.odd = nn.Identity()

        def forward(self, x):
            y = self.conv(x)  # (N, 8, 8, 8)
            self.odd(y.flatten(1).flip(1).reshape(y.shape))
            return y

    acts, _ = lv.activations(Net(), torch.rand(2, 3, 32, 32), ["conv", "odd"])
    assert acts.layout("conv").describe() == "channels-first 8x8"
    with pytest.raises(LayoutError, match="reads both as channels-first and as channels-last"):
        acts.layout("odd")
    with pytest.raises(LayoutError, match="reads both as channels-first and as channels-last"):
        lv.activation_grid(acts["odd"])


def test_activation_grid_draws_an_output_in_its_own_layout_or_refuses_it():
    """`activation_grid(acts[name])` on a token layer drew (N, L, D) as D-long strips of L filters; it now knows the
    layout activations() found, refuses a 3-D or 5-D tensor of unknown layout in one line, and keeps plain NCHW."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Conv2d(3, 6, 4, stride=4)
            self.norm = nn.LayerNorm(6)

        def forward(self, x):
            return self.norm(self.embed(x).flatten(2).transpose(1, 2))  # (N, 16, 6): a 4x4 grid of tokens

    m, x = Tokens(), torch.rand(2, 3, 16, 16)
    acts, out = lv.activations(m, x, ["norm", "embed"])
    want = lv.activation_grid(out.transpose(1, 2).reshape(2, 6, 4, 4), 1)  # 6 filters of 4x4, drawn as NCHW
    torch.testing.assert_close(lv.activation_grid(acts["norm"], 1), want)
    torch.testing.assert_close(lv.activation_grid(acts["norm"], 1, layout=acts.layout("norm")), want)
    torch.testing.assert_close(lv.activation_grid(acts.maps("norm"), 1), want)
    with pytest.raises(LayoutError, match=r"a 3-D tensor \(2, 16, 6\) of unknown layout .* pass layout="):
        lv.activation_grid(acts["norm"].clone())
    with pytest.raises(LayoutError, match="5-D tensor .* of unknown layout"):
        lv.activation_grid(torch.rand(1, 2, 3, 4, 4))
    plain = torch.rand(2, 6, 4, 4)
    torch.testing.assert_close(lv.activation_grid(plain, 1), lv.activation_grid(plain, 1, layout=Layout(
        "channels_first", (4, 4))))


def test_patches_unfolded_into_tokens_are_a_patch_embedding():
    """F.unfold + Linear is a patch embedding: (N, patches, D) tokens on the 4x4 grid of patches; the same patches
    kept as (N, C, pixels per patch, patches) are not a map."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3 * 4 * 4, 8)
            self.norm = nn.GroupNorm(1, 3)

        def forward(self, x):
            patches = torch.nn.functional.unfold(x, 4, stride=4)  # (N, 48, 16)
            self.norm(patches.reshape(x.shape[0], 3, 16, 16))
            return self.embed(patches.transpose(1, 2))

    lay = trace_layouts(Net(), torch.rand(2, 3, 16, 16))
    assert lay["embed"].describe() == "tokens 4x4"
    assert isinstance(lay["norm"], Unplaceable) and lay["norm"].reason.startswith("not a map: patches unfolded")


def test_the_provenance_mode_never_outlives_the_pass():
    """It is pushed when the traced pass starts and taken off when it ends, also when the forward raises, leaving a
    mode the caller entered around the pass where it was (capture_attention enters one)."""
    from torch.overrides import BaseTorchFunctionMode

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fail = True

        def forward(self, x):
            y = self.conv(x)
            if self.fail:
                raise RuntimeError("boom")
            return y

    m, x = Boom(), torch.rand(1, 3, 8, 8)
    depth = torch._C._len_torch_function_stack()
    with BaseTorchFunctionMode() as outer, LayoutTracer(m, cache=False) as tracer:
        with pytest.raises(RuntimeError, match="boom"):
            m(x)
        assert torch._C._len_torch_function_stack() == depth + 1
        assert torch._C._get_function_stack_at(depth) is outer
        m.fail = False
        m(x)
        assert tracer.layouts["conv"].describe() == "channels-first 6x6"
        assert torch._C._len_torch_function_stack() == depth + 1
    assert torch._C._len_torch_function_stack() == depth
