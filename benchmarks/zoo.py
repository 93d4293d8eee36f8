"""Every method on the model zoos: torchvision's classification, video, segmentation and detection builders, a
timm set, and the hubs' family (24 transformers and open_clip architectures built offline from small configs),
random weights, small inputs, as a new user would call them.

    python -m benchmarks.zoo                      # everything (20-55 min on 2 CPU cores): the table + JSON
    python -m benchmarks.zoo --only resnet18 vit  # names containing these
    python -m benchmarks.zoo --only transformers: open_clip: --json benchmarks/results/zoo-hub.json  # the hubs
    python -m benchmarks.zoo --ci                 # the representative subset tests/test_zoo.py runs

Each call checks shapes against the layer's layout (and the layout against what the architecture is known to
produce, where the case says), values against an independent plain-autograd reference (Grad-CAM and every CAM method
computed from the layer's activations and gradients: Eigen-CAM's and KPCA-CAM's components up to their sign, FEM's
k-sigma weights, Shapley-CAM's gradient with its Hessian-vector product by double backward, Finer-CAM's gradient of
its comparison score with the 3 nearest classes; FullGrad's bias and input terms from forward hooks on every biased
convolution and BatchNorm; saliency; input x gradient; the completeness error integrated gradients and GradientShap
report, against f(x) - f(0) by plain forwards; occlusion's value with its first window, against a plain forward),
that the result is not silently empty, and that the model is unchanged afterwards (hooks, training flags,
requires_grad, parameters' .grad, the output bit for bit). Score-CAM, Ablation-CAM and LRP are checked for shape,
finiteness and sign (LRP, with stabilizers below the random weights' activations: not empty). A method the model
cannot support must be refused with the clear error the case expects (e.g. attention rollout over Swin's windows);
anything else is a failure. The table marks each cell ok, "refused" (the expected one-line error) or FAIL (with the
error), "-" where the method does not apply, and "not run" where the run left it out (--methods). Runs of parts of
the zoo (--only, --methods) merge into one table with --merge; --docs pastes the tables into the docs' page between
its markers:

    python -m benchmarks.zoo --merge part-*.json --docs docs/guide/any_model.md

The hubs' models are called with every default (target=None on the model's own output, grad_cam's own layer; a dict
of inputs for image-text models), as the issue that added them asks ("no glue"). There any one-line ValueError of
lightning_vis counts as a refusal, except for the methods a model with a class, embedding, mask or box output must
support (HUB_REQUIRED): a refusal there is a failure. Two more columns: "model unchanged" checks after every method
that the model gives its output bit for bit and still has exactly its hooks, plain attributes, config and
parameters' flags, compared to the model after a plain forward (transformers installs some hooks on the first one);
"first call" runs each method as the first call on a fresh copy of the model and checks the same against a copy
that ran a plain forward.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

import lightning_vis as lv
from lightning_vis import targets
from lightning_vis.hooks import HOOK_DICTS, Layout, hook_counts

# every CAM method grad_cam offers after Grad-CAM, then the other attribution methods, as the CLI spells them
CAMS = tuple(m for m in lv.attribution.CAM_METHODS if m != "gradcam")
ATTRIBUTION = ("integrated-gradients", "gradient-shap", "input-x-gradient", "occlusion", "lrp")
METHODS = ("layers", "activations", "gradcam", *CAMS, "fullgrad", "saliency", "guided", "deconvnet", *ATTRIBUTION,
           "render", "topk", "receptive", "attention", "rollout", "checkpoint")
# what a hub model with a class, embedding, mask or box output must support with no glue (the others may refuse)
HUB_REQUIRED = ("layers", "activations", "gradcam", "saliency", "guided", "model unchanged", "first call")
# what an image-text model (a dict of inputs) must also support: the image alone is interpolated or occluded, its
# other inputs go with every pass of images (CLIP's texts, CLIPSeg's prompts, OWL-ViT's queries)
IMAGE_TEXT_REQUIRED = ("integrated-gradients", "gradient-shap", "input-x-gradient", "occlusion")


@dataclass
class Case:
    name: str
    family: str
    build: Callable[[], nn.Module]
    shape: tuple  # the input batch
    task: str = "classify"  # classify | video | segment | detect
    layer: str | None = None  # the CAM layer (None: grad_cam's default)
    expect: dict = field(default_factory=dict)  # layer -> the layout it is known to have (Layout.describe())
    attention: bool = False
    refuse: dict = field(default_factory=dict)  # method -> regex of the expected clear refusal
    checkpoint: Callable[[nn.Module, bool], None] | None = None  # turns activation checkpointing on/off
    ci: bool = False
    # the hub family (transformers, open_clip): every method with its defaults (target=None) on `inputs(x)` (a dict
    # for multi-input models), any one-line refusal of lightning_vis accepted, the model checked after each method
    # and after a first call on a fresh copy; `not_maps` names layers whose output is no map over the input
    hub: bool = False
    inputs: Callable[[Tensor], object] | None = None
    not_maps: tuple = ()
    not_attention: tuple = ()  # modules (and what is inside them) whose attention is no map over the image
    min_attention: int = 1  # attention layers attention_maps must find (every stage's windows, a pooling head)
    must: tuple = ()  # methods beyond HUB_REQUIRED that must work (rollout once a pooling head is left out)

    def __post_init__(self):
        if self.attention and not self.hub:  # the hubs' cases accept any one-line refusal
            self.refuse = {"lrp": ATTENTION_LRP, **self.refuse}
        if self.task in ("segment", "detect") and not self.hub:
            self.refuse = {**CALLABLE_TARGET, **self.refuse}


# ----------------------------------------------------------------------------------------------------------------
# the zoo


def _tv(name, **kw):
    import torchvision

    return lambda: torchvision.models.get_model(name, weights=None, **kw)


def _timm(name, **kw):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, **kw)
    return build


def _small_mvit():
    """torchvision's MViT-V2 architecture (its block settings, rel-pos embedding, residual pooling) with 4 blocks at
    8 x 64 x 64: mvit_v2_s itself only takes 16 x 224 x 224."""
    from torchvision.models.video.mvit import MSBlockConfig, _mvit

    blocks = [MSBlockConfig(num_heads=h, input_channels=i, output_channels=o, kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3],
                            stride_q=sq, stride_kv=skv)
              for h, i, o, sq, skv in [(1, 96, 96, [1, 1, 1], [1, 4, 4]), (1, 96, 192, [1, 2, 2], [1, 2, 2]),
                                       (2, 192, 192, [1, 1, 1], [1, 2, 2]), (2, 192, 384, [1, 2, 2], [1, 1, 1])]]
    return _mvit(spatial_size=(64, 64), temporal_size=8, block_setting=blocks, residual_pool=True,
                 residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True, stochastic_depth_prob=0.0,
                 weights=None, progress=False, num_classes=10)


def _family(name: str) -> str:
    """torchvision builder -> architecture family: resnet50 -> resnet, efficientnet_v2_s -> efficientnet_v2,
    regnet_y_400mf -> regnet_y, vgg16_bn -> vgg, vit_l_16 -> vit."""
    for prefix in ("efficientnet_v2", "mobilenet_v2", "mobilenet_v3", "regnet_x", "regnet_y", "swin_v2",
                   "wide_resnet", "shufflenet"):
        if name.startswith(prefix):
            return prefix
    return re.match(r"[a-z]+", name).group(0)


def _timm_checkpointing(model, on):
    model.set_grad_checkpointing(on)


def _densenet_checkpointing(model, on):
    for m in model.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = on


# lv.lrp on attention models: AttnLRP where it follows every attention (composite=None picks it for a model with a
# module named attention); the refusals accepted where it cannot: attention computed where it cannot follow it
ATTENTION_LRP = "cannot follow the attention of|computes attention .* which the convolutional composites"
# lv.lrp's stabilizers are absolute (zennit's 1e-6 by default): torchvision's random initialisation shrinks the
# activations ~10-100x per stage (EfficientNet-B0's logits near 1e-14), where 1e-6 absorbs all the relevance; the
# zoo's random-weight models get stabilizers below their activations, so that the check sees the rules carry it
LRP_STABILIZERS = {"epsilon": 1e-30, "stabilizer": 1e-30}
# torchvision's roi_align has no second derivative: Shapley-CAM's Hessian-vector product refuses above it
ROI_ALIGN = {"shapleycam": "needs second derivatives of the part above the layer"}
# the segmentation and detection cases explain a callable target (a class over a mask, a box's score)
CALLABLE_TARGET = {"finercam": "takes a class target .* not a callable"}
# a detector's tracked box may exist only near the input: its score is flat (zero) along the path from a black image
PATH_FLAT = {"integrated-gradients": "gradient is zero at all .* steps"}
WINDOWS = {"rollout": "not defined for window attention"}
POOLED = {"rollout": "not defined here: the blocks attend over different token sets"}
TOKENS_RF = {}  # token layers have receptive fields too (a ViT's: the whole input)


def cases() -> list[Case]:
    import torchvision

    out = []
    img = (2, 3, 64, 64)
    # one per family in CI: the first case of each family below is the representative
    ci = {"alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
          "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
          "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
          "swin_v2_t", "vgg11",
          "vit_b_16", "wide_resnet50_2"}
    for name in torchvision.models.list_models(module=torchvision.models):
        family = _family(name)
        kw, shape, case = {}, img, {}
        if name.startswith("vit_"):
            patch = int(re.search(r"_(\d+)$", name).group(1))
            kw = {"image_size": 4 * patch}
            shape = (2, 3, 4 * patch, 4 * patch)
            case = dict(attention=True, refuse=TOKENS_RF, expect={"encoder.layers.encoder_layer_1": "tokens 1+4x4"})
        elif name.startswith("swin"):
            case = dict(attention=True, refuse=WINDOWS, expect={"features.1": "channels-last 16x16",
                                                                "permute": "channels-first 2x2"})
        elif name == "maxvit_t":
            shape = (1, 3, 224, 224)
            case = dict(attention=True, refuse=WINDOWS, expect={"blocks.3": "channels-first 7x7"})
        elif name == "inception_v3":
            kw, shape = {"init_weights": False, "aux_logits": False}, (2, 3, 96, 96)
        elif name == "googlenet":
            kw = {"init_weights": False, "aux_logits": False}
        elif name.startswith("densenet"):
            case = dict(checkpoint=_densenet_checkpointing)
        elif name.startswith("convnext"):
            case = dict(expect={"features.1.0.block.3": "channels-last 16x16", "features.1": "channels-first 16x16"})
        out.append(Case(f"torchvision:{name}", family, _tv(name, **kw), shape, ci=name in ci, **case))
    video = (1, 3, 8, 64, 64)
    for name in torchvision.models.list_models(module=torchvision.models.video):
        if name.startswith("mvit"):
            continue
        case, shape = {}, video
        if name == "s3d":  # its head pools 2x7x7 at stride 8x32x32
            shape = (1, 3, 16, 224, 224)
        if name.startswith("swin3d"):
            case = dict(attention=True, refuse=WINDOWS, expect={"features.0": "channels-last 4x16x16",
                                                                "features.1": "channels-last 4x8x8"})
        out.append(Case(f"torchvision.video:{name}", "video-" + name.split("_")[0], _tv(name), shape, "video",
                        ci=name in {"r3d_18", "r2plus1d_18", "s3d", "swin3d_t", "mc3_18"}, **case))
    out.append(Case("torchvision.video:mvit (MViT-V2, 4 blocks, 8x64x64)", "video-mvit", _small_mvit, video, "video",
                    attention=True, refuse={**POOLED, **TOKENS_RF}, ci=True,
                    expect={"conv_proj": "channels-first 4x16x16", "blocks.1": "tokens 1+4x8x8",
                            "blocks.3": "tokens 1+4x4x4"}))
    for name in ("mvit_v1_b", "mvit_v2_s"):
        out.append(Case(f"torchvision.video:{name}", "video-mvit", _tv(name), (1, 3, 16, 224, 224), "video",
                        attention=True, refuse={**POOLED, **TOKENS_RF}))
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        layer = "backbone.layer4" if "resnet" in name else "backbone.16"
        out.append(Case(f"torchvision.segmentation:{name}", "segmentation", _tv(name, weights_backbone=None,
                                                                                  num_classes=5),
                        (1, 3, 64, 64), "segment", layer=layer,
                        ci=name in {"fcn_resnet50", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"}))
    for name in torchvision.models.list_models(module=torchvision.models.detection):
        layer = {"ssd300_vgg16": "backbone.features", "ssdlite320_mobilenet_v3_large": "backbone.features.1"}.get(
            name, "backbone.body.layer4" if "resnet" in name else "backbone.body.16")
        out.append(Case(f"torchvision.detection:{name}", "detection",
                        _tv(name, weights_backbone=None, num_classes=5, box_score_thresh=0.0)
                        if "rcnn" in name else _tv(name, weights_backbone=None, num_classes=5),
                        (1, 3, 128, 128), "detect", layer=layer,
                        refuse={**PATH_FLAT, **(ROI_ALIGN if "rcnn" in name else {})},
                        ci=name in {"fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"}))
    t224 = (2, 3, 64, 64)
    out += [
        Case("timm:vit_tiny_patch16_224 (fused attention)", "timm-vit", _timm("vit_tiny_patch16_224", img_size=64),
             t224, attention=True, refuse=TOKENS_RF, checkpoint=_timm_checkpointing, ci=True,
             expect={"blocks.11": "tokens 1+4x4", "patch_embed": "tokens 4x4"}),
        Case("timm:vit_tiny_patch16_224 (explicit softmax)", "timm-vit", _timm_unfused("vit_tiny_patch16_224",
                                                                                        img_size=64),
             t224, attention=True, refuse=TOKENS_RF, ci=True, expect={"blocks.11": "tokens 1+4x4"}),
        Case("timm:vit_small_patch14_reg4_dinov2 (4 registers)", "timm-vit", _timm("vit_small_patch14_reg4_dinov2",
                                                                                     img_size=56),
             (2, 3, 56, 56), attention=True, refuse=TOKENS_RF, ci=True, expect={"blocks.11": "tokens 5+4x4"}),
        Case("timm:deit_tiny_distilled_patch16_224", "timm-deit", _timm("deit_tiny_distilled_patch16_224", img_size=64),
             t224, attention=True, refuse=TOKENS_RF, ci=True, expect={"blocks.11": "tokens 2+4x4"}),
        Case("timm:swin_tiny_patch4_window7_224", "timm-swin", _timm("swin_tiny_patch4_window7_224"),
             (1, 3, 224, 224), attention=True, refuse=WINDOWS, checkpoint=_timm_checkpointing, ci=True,
             expect={"layers.0": "channels-last 56x56", "layers.3": "channels-last 7x7"}),
        Case("timm:convnext_atto (conv MLP)", "timm-convnext", _timm("convnext_atto"), t224,
             checkpoint=_timm_checkpointing, ci=True,
             expect={"stages.1": "channels-first 8x8", "stages.1.blocks.0.norm": "channels-first 8x8"}),
        Case("timm:convnext_atto (channels-last MLP)", "timm-convnext", _timm("convnext_atto", conv_mlp=False), t224,
             ci=True, expect={"stages.1": "channels-first 8x8", "stages.1.blocks.0.norm": "channels-last 8x8",
                              "stages.1.blocks.0.mlp": "channels-last 8x8"}),
        Case("timm:efficientnet_b0", "timm-efficientnet", _timm("efficientnet_b0"), t224, ci=True),
        Case("timm:resnet18", "timm-resnet", _timm("resnet18"), t224, checkpoint=_timm_checkpointing, ci=True),
        Case("timm:mobilevit_xxs", "timm-mobilevit", _timm("mobilevit_xxs"), t224, attention=True,
             refuse=WINDOWS, ci=True, expect={"stages.3": "channels-first 4x4"}),
        Case("timm:levit_128s", "timm-levit", _timm("levit_128s"), (2, 3, 224, 224), attention=True,
             refuse={**POOLED, **TOKENS_RF}, ci=True, expect={"stages.1": "tokens 7x7", "stages.2": "tokens 4x4"}),
    ]
    return out + hub_cases()


def _timm_unfused(name, **kw):
    def build():
        model = _timm(name, **kw)()
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        return model
    return build


def _hf(cls: str, config: str, **kw):
    """A transformers model of class `cls` from a `config` built from keyword arguments: random weights, offline.
    transformers draws BatchNorm weights from N(0, initializer_range): in a deep random BN net (EfficientNet) the
    signal vanishes and the logits are 0 for every input, so BatchNorm weights start at 1, as torch's own init."""
    def build():
        import transformers

        model = getattr(transformers, cls)(getattr(transformers, config)(**kw))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                    m.weight.fill_(1.0)
        return model
    return build


def _open_clip(name: str, **kw):
    """open_clip's `name` architecture with the sizes in kw (its vision tower: what one explains of an image)."""
    def build():
        import open_clip

        text = dict(context_length=8, vocab_size=49408, width=32, heads=2, layers=1)
        return open_clip.create_model(name, pretrained=None, embed_dim=16, text_cfg=text, **kw).visual
    return build


def _with_text(key: str = "pixel_values"):
    """The input of an image-text model: the image batch under `key` and a 4-token prompt per image (two prompts,
    alternating)."""
    def inputs(x):
        ids = torch.tensor([[1, 5, 7, 2], [1, 9, 3, 2]])
        return {key: x, "input_ids": ids[torch.arange(x.shape[0]) % 2]}
    return inputs


_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)  # 4x4 patches of 8 pixels
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
             max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic")


def hub_cases() -> list[Case]:
    """The transformers and open_clip family: small configs (a few layers, small widths, 28-64 pixel inputs) that keep
    each architecture's structure (class/distillation/register tokens, windows, stages, decoders, text towers)."""
    x32, x64 = (2, 3, 32, 32), (2, 3, 64, 64)
    # families by structure; CI runs one of each (the one the issue found broken, where it names one)
    family = {"ViT": "vit", "DeiT (distilled)": "vit", "BEiT": "vit", "Data2Vec-vision": "vit",
              "DINOv2 with registers": "vit", "CLIP vision (with projection)": "vit", "SigLIP vision (MAP head)": "vit",
              "DPT (depth)": "vit", "Swin ": "swin", "Swinv2": "swin", "ConvNeXtV2": "conv", "EfficientNet": "conv",
              "ResNet": "conv", "MobileViTV2": "hybrid", "LeViT (distilled)": "hybrid", "PVTv2": "hybrid",
              "SegFormer": "hybrid", "CLIPModel (pixel_values + input_ids)": "image-text",
              "CLIPSeg (pixel_values + input_ids)": "image-text", "OWL-ViT (pixel_values + input_ids)": "image-text",
              "DETR": "queries", "Mask2Former (Swin backbone)": "queries"}
    ci = {"DINOv2 with registers", "Swinv2", "ConvNeXtV2", "SegFormer", "CLIPModel (pixel_values + input_ids)",
          "DETR"}
    rows = [
        ("ViT", "ViTForImageClassification", "ViTConfig", dict(**_VIT, num_labels=5), x32, "classify",
         dict(expect={"vit.layers.1": "tokens 1+4x4"})),
        ("DeiT (distilled)", "DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(**_VIT, num_labels=5), x32,
         "classify", dict(expect={"deit.layers.1": "tokens 2+4x4"})),
        ("BEiT", "BeitForImageClassification", "BeitConfig",
         dict(**_VIT, num_labels=5, use_relative_position_bias=True), x32, "classify",
         dict(expect={"beit.layers.1": "tokens 1+4x4"})),
        ("Data2Vec-vision", "Data2VecVisionForImageClassification", "Data2VecVisionConfig",
         dict(**_VIT, num_labels=5, use_relative_position_bias=True), x32, "classify",
         dict(expect={"data2vec_vision.encoder.layer.1": "tokens 1+4x4"})),
        ("DINOv2 with registers", "Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
         dict(**_VIT, num_labels=5, num_register_tokens=4), x32, "classify",
         dict(expect={"dinov2_with_registers.encoder.layer.1": "tokens 5+4x4"})),
        ("CLIP vision (with projection)", "CLIPVisionModelWithProjection", "CLIPVisionConfig",
         dict(**_VIT, projection_dim=16), x32, "embed",
         dict(expect={"vision_model.encoder.layers.1": "tokens 1+4x4"})),
        ("CLIPModel (pixel_values + input_ids)", "CLIPModel", "CLIPConfig",
         dict(vision_config=_VIT, text_config=_TEXT, projection_dim=16), x32, "classify",
         dict(inputs=_with_text(), expect={"vision_model.encoder.layers.1": "tokens 1+4x4"},
              not_maps=("text_model.encoder.layers.0",), not_attention=("text_model",), must=IMAGE_TEXT_REQUIRED)),
        ("SigLIP vision (MAP head)", "SiglipVisionModel", "SiglipVisionConfig", dict(_VIT), x32, "embed",
         dict(expect={"encoder.layers.1": "tokens 4x4"}, not_maps=("head",), must=("rollout",))),
        ("Swin ", "SwinForImageClassification", "SwinConfig",
         dict(image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 2, 2], window_size=4,
              num_labels=5), x32, "classify",
         dict(expect={"swin.encoder.layers.0.blocks.0": "tokens 16x16", "swin.encoder.layers.0": "tokens 8x8"},
              min_attention=3)),
        ("Swinv2", "Swinv2ForImageClassification", "Swinv2Config",
         dict(image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 2, 2], window_size=4,
              num_labels=5), x32, "classify",
         dict(expect={"swinv2.encoder.layers.0.blocks.0": "tokens 16x16", "swinv2.encoder.layers.0": "tokens 8x8"},
              min_attention=3)),
        ("ConvNeXtV2", "ConvNextV2ForImageClassification", "ConvNextV2Config",
         dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=5), x64, "classify",
         dict(expect={"convnextv2.encoder.stages.1": "channels-first 8x8"})),
        ("MobileViTV2", "MobileViTV2ForImageClassification", "MobileViTV2Config",
         dict(image_size=64, width_multiplier=0.25, num_labels=5, initializer_range=0.3), x64, "classify",
         dict(expect={"mobilevitv2.encoder.layer.2": "channels-first 8x8"},
              not_maps=tuple(f"mobilevitv2.encoder.layer.{i}.{m}" for i in (2, 3, 4)
                             for m in ("transformer", "layernorm")))),  # patch-folded: (N, C, pixels, patches)
        ("SegFormer", "SegformerForSemanticSegmentation", "SegformerConfig",
         dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
              decoder_hidden_size=16, num_labels=3), x64, "segment",
         dict(expect={"segformer.stages.2.blocks.0": "tokens 4x4", "segformer.stages.2": "channels-first 4x4"})),
        ("DETR", "DetrForObjectDetection", "DetrConfig",
         dict(use_timm_backbone=False, use_pretrained_backbone=False,
              backbone_config={"model_type": "resnet", **_RESNET, "out_features": ["stage4"]}, d_model=32,
              encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
              encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_labels=4), x64, "detect",
         dict(expect={"model.encoder.layers.0": "tokens 2x2"},
              not_maps=("model.decoder.layers.0", "model.decoder.layernorm", "bbox_predictor"),
              not_attention=("model.decoder.layers.0.self_attn",))),
        ("EfficientNet", "EfficientNetForImageClassification", "EfficientNetConfig",
         dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=5), x64,
         "classify", {}),
        ("ResNet", "ResNetForImageClassification", "ResNetConfig", dict(**_RESNET, num_labels=5), x64, "classify",
         dict(expect={"resnet.encoder.stages.1": "channels-first 8x8"})),
        ("LeViT (distilled)", "LevitForImageClassificationWithTeacher", "LevitConfig",
         dict(image_size=128, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
              key_dim=[8, 8, 8], num_labels=5), (2, 3, 128, 128), "classify",
         dict(expect={"levit.encoder.stages.0": "tokens 4x4", "levit.encoder.stages.1": "tokens 2x2"})),
        ("PVTv2", "PvtV2ForImageClassification", "PvtV2Config",
         dict(image_size=64, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
              num_labels=5), x64, "classify", {}),
        ("Mask2Former (Swin backbone)", "Mask2FormerForUniversalSegmentation", "Mask2FormerConfig",
         dict(backbone_config={"model_type": "swin", "image_size": 64, "patch_size": 4, "embed_dim": 8,
                               "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2,
                               "out_features": ["stage1", "stage2", "stage3", "stage4"]},
              use_pretrained_backbone=False, feature_size=32, mask_feature_size=32, hidden_dim=32,
              encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
              num_attention_heads=2, num_queries=5, num_labels=3, common_stride=4), x64, "segment",
         dict(not_maps=("model.transformer_module.decoder.layers.0",))),
        ("DPT (depth)", "DPTForDepthEstimation", "DPTConfig",
         dict(**_VIT, backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16], fusion_hidden_size=16,
              reassemble_factors=[2, 1]), x32, "depth", dict(expect={"dpt.encoder.layer.1": "tokens 1+4x4"})),
        ("CLIPSeg (pixel_values + input_ids)", "CLIPSegForImageSegmentation", "CLIPSegConfig",
         dict(vision_config=_VIT, text_config=_TEXT, projection_dim=16, reduce_dim=16, extract_layers=[0, 1],
              decoder_num_attention_heads=2, decoder_intermediate_size=32), x32, "segment",
         # CLIPSeg computes its CLIP features under torch.no_grad (a frozen backbone): no gradient reaches the image,
         # so the gradient methods must refuse (occlusion must not); its attention is refused too, since which modules
         # see the image is decided by gradients (a known limit: the vision tower's attention could be drawn)
         dict(inputs=_with_text(), not_maps=("clip.text_model.encoder.layers.0",), not_attention=("clip.text_model",),
              must=("occlusion",),
              refuse={"gradcam": "no layer of the model gives maps over the input",
                      "saliency": "does not depend on the input through autograd",
                      "guided": "does not depend on the input through autograd",
                      "attention": "never sees the image"})),
        ("OWL-ViT (pixel_values + input_ids)", "OwlViTForObjectDetection", "OwlViTConfig",
         dict(vision_config=_VIT, text_config=_TEXT, projection_dim=32), x32, "detect",
         dict(inputs=_with_text(), not_maps=("owlvit.text_model.encoder.layers.0",),
              not_attention=("owlvit.text_model",), must=IMAGE_TEXT_REQUIRED)),
    ]
    out = [Case(f"transformers:{name.strip()}", "hub-" + family[name], _hf(cls, config, **kw), shape, task, hub=True,
                attention=family[name] != "conv", ci=name in ci, **case)
           for name, cls, config, kw, shape, task, case in rows]
    out += [
        Case("open_clip:ViT-B-32 (visual, 2 layers of 32)", "hub-open_clip",
             _open_clip("ViT-B-32", vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16)),
             x32, "embed", hub=True, attention=True,
             expect={"transformer.resblocks.1": "tokens 1+4x4"}),
        Case("open_clip:RN50 (visual, one block a stage)", "hub-open_clip",
             _open_clip("RN50", vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16, patch_size=None)),
             x64, "embed", hub=True, attention=True, ci=True, expect={"layer4": "channels-first 2x2"},
             min_attention=1, not_maps=("attnpool",)),
    ]
    return out


# ----------------------------------------------------------------------------------------------------------------
# independent references


def ref_maps(t: Tensor, desc: str) -> Tensor:
    """(N, C, *grid) from a tensor whose layout is known by description ('channels-last 7x7', 'tokens 1+4x4'),
    written without lightning_vis.hooks.layout."""
    kind, _, rest = desc.partition(" ")
    if kind == "channels-first":
        return t
    if kind == "channels-last":
        return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    prefix, _, grid = rest.rpartition("+")
    dims = [int(v) for v in grid.split("x")]
    return t[:, int(prefix or 0):].permute(0, 2, 1).reshape(t.shape[0], t.shape[2], *dims)


def _first_tensor(value):
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return next((v for v in value if isinstance(v, Tensor)), None)
    return None


def _call(model, inputs):
    """The model on its input: a tensor, or a dict of keyword inputs (multi-input models)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def ref_grad_cam(model, x, layer, desc, target) -> Tensor:
    """Grad-CAM's low-resolution map by plain autograd (a forward hook, torch.autograd.grad, the layout by hand)."""
    a, g = ref_activation_gradient(model, x, layer, desc, target)
    return ref_cam("gradcam", a, g)[0]


def ref_cam(method: str, a: Tensor, g: Tensor) -> list[Tensor]:
    """A CAM method's low-resolution map from (N, C, *grid) activations and gradients, as the papers (and
    pytorch-grad-cam 1.5.7) define it, before the final ReLU; the maps it may equal (both signs of a principal
    component: its sign is arbitrary, image by image), or [] for a method with no reference here (those that run
    the network again)."""
    dims = tuple(range(2, a.dim()))

    def weighted(w):
        return (w[(...,) + (None,) * len(dims)] * a).sum(1)

    def first_component(m):  # positions x channels, centred; projected on the first right singular vector
        flat = m.flatten(2).transpose(1, 2).double()
        flat = flat - flat.mean(1, keepdim=True)
        _, s, vh = torch.linalg.svd(flat, full_matrices=False)
        ratio = float((s[:, 1] / s[:, 0].clamp_min(1e-30)).max()) if s.shape[1] > 1 else 0.0
        if ratio > 0.99:  # two components explain almost the same variance: either is "the first"
            raise Ambiguous(f"no unique first component (second singular value {ratio:.3f} of the first)")
        v = vh[:, 0]
        p = (flat @ v[..., None])[..., 0].float().view(m.shape[0], *m.shape[2:])
        return [p, -p]

    if method in ("gradcam", "guided-gradcam"):
        return [weighted(g.mean(dims))]
    if method == "gradcam++":
        g2, g3 = g ** 2, g ** 3
        alpha = g2 / (2 * g2 + a.sum(dims, keepdim=True) * g3 + 1e-7)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        return [weighted((g.clamp_min(0) * alpha).sum(dims))]
    if method == "layercam":
        return [(g.clamp_min(0) * a).sum(1)]
    if method == "hirescam":
        return [(g * a).sum(1)]
    if method == "xgradcam":  # in float64, as ours: a channel's sum can be near 0 after a LayerNorm
        a, g = a.double(), g.double()
        return [weighted((g * a).sum(dims) / (a.sum(dims) + 1e-7))]
    if method == "gradcam-elementwise":
        return [(g * a).clamp_min(0).sum(1)]
    if method == "eigencam":
        return first_component(a)
    if method == "eigengradcam":
        return first_component(g * a)
    if method == "fem":  # channels weighted by the share of their positions above mean + 2 standard deviations (in
        flat = a.flatten(2).double()  # float64: a channel equal everywhere has none, its mean not rounded below it)
        high = flat > flat.mean(2, keepdim=True) + 2 * flat.std(2, unbiased=False, keepdim=True)
        return [weighted(high.float().mean(2))]
    if method == "kpcacam":  # the first kernel principal component, scikit-learn KernelPCA's sigmoid kernel
        flat = a.flatten(2).transpose(1, 2).double()
        flat = flat - flat.mean(1, keepdim=True)
        k = torch.tanh(flat @ flat.transpose(1, 2) / flat.shape[2] + 1)
        n = k.shape[1]
        centre = torch.eye(n, dtype=k.dtype) - 1.0 / n
        values, vectors = torch.linalg.eigh(centre @ k @ centre)
        top = float(values[:, -1].min())
        if top < 1e-11:  # activations nearly equal at every position: tanh(<a, b> / C + 1) rounds them away
            raise Ambiguous(f"the centred kernel is float rounding (largest eigenvalue {top:.1e})")
        if values.shape[1] > 1 and float((values[:, -2] / values[:, -1].clamp_min(1e-30)).max()) > 0.99:
            raise Ambiguous("no unique first kernel component")
        p = (vectors[..., -1] * values[:, -1:].clamp_min(0).sqrt()).float().view(a.shape[0], *a.shape[2:])
        return [p, -p]
    if method in ("shapleycam", "finercam"):  # Grad-CAM's weighting of their own gradient (the caller passes it)
        return [weighted(g.mean(dims))]
    return []


class Ambiguous(Exception):
    """The reference is not unique on this model (random weights): the value check is left out, and says why."""


def ref_activation_gradient(model, x, layer, desc, target, hessian: bool = False) -> tuple[Tensor, Tensor]:
    """A layer's activation and the target's gradient there as (N, C, *grid) maps, by plain autograd (a forward
    hook, torch.autograd.grad, the layout by hand). hessian: the gradient less half the Hessian-vector product with
    the activation (Shapley-CAM's gradient), by double backward through attention's math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    got = {}
    module = model.get_submodule(layer)

    def keep(m, a, o):  # the network goes on with a copy: a later in-place op (DenseNet's F.relu_) cannot change it
        if "a" in got:
            return None
        got["a"] = _first_tensor(o)
        return got["a"].clone() if isinstance(o, Tensor) else None
    h = module.register_forward_hook(keep)
    try:
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]) if hessian else contextlib.nullcontext():
            out = _call(model, x)
            scores = target(out)
            (g,) = torch.autograd.grad(scores.sum(), got["a"], create_graph=hessian)
            if hessian and g.requires_grad:
                (hv,) = torch.autograd.grad(g, got["a"], grad_outputs=got["a"].detach(), allow_unused=True)
                g = g if hv is None else g - 0.5 * hv
    finally:
        h.remove()
    return ref_maps(got["a"].detach(), desc).float(), ref_maps(g.detach(), desc).float()


def ref_finer(output) -> Tensor:
    """Finer-CAM's score as its paper defines it, for each input's top class c of _top_logits(output): sum over the
    3 other classes k with logits nearest c's of p_k (s_c - s_k), over sum p_k (p: the softmax of the logits)."""
    logits = _top_logits(output)
    c = logits.detach().argmax(1)
    s_c = logits.gather(1, c[:, None])
    distance = (logits.detach() - s_c.detach()).abs()
    distance[torch.arange(len(c)), c] = float("inf")
    near = distance.topk(min(3, logits.shape[1] - 1), dim=1, largest=False).indices
    p = torch.softmax(logits, 1).gather(1, near)
    return (p * (s_c - logits.gather(1, near))).sum(1) / (p.sum(1) + 1e-9)


def ref_gradient(model, x, target, make=None) -> Tensor:
    """d score / d image; make(image) builds the model's input around the image (multi-input models)."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(target(_call(model, make(xg) if make else xg)).sum(), xg)
    return g


def ref_fullgrad(model, x, target, make=None) -> Tensor:
    """FullGrad as its paper and pytorch-grad-cam define it, by plain autograd: |input gradient x input| and, for
    every torch convolution and BatchNorm with a bias (eval BatchNorm's: beta - mean gamma / sqrt(var + eps)) whose
    output has the input's dimensionality, |bias x its output's gradient|; each (image, channel) map min-max scaled,
    summed over channels, resized to the input and summed. Forward hooks keep each call's output and give the network
    a copy (a later in-place op cannot change it)."""
    outs, handles = [], []

    def keep(m, a, o):
        if not isinstance(o, Tensor) or o.dim() != x.dim():
            return None
        outs.append((m, o))
        return o.clone()
    for m in model.modules():
        base = next((b for b in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
                     if isinstance(m, b)), None)
        if base is not None and type(m).forward is base.forward and m.bias is not None:
            handles.append(m.register_forward_hook(keep))
    xg = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            scores = target(_call(model, make(xg) if make else xg))
            grads = torch.autograd.grad(scores.sum(), [xg] + [o for _, o in outs], allow_unused=True)
    finally:
        for h in handles:
            h.remove()

    def scaled(t):
        flat = t.abs().flatten(2)
        lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
        return ((flat - lo) / (hi - lo + 1e-7)).sum(1).view(t.shape[0], 1, *t.shape[2:])
    mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
    total = scaled(grads[0] * x)[:, 0]
    for (m, _), g in zip(outs, grads[1:]):
        if g is None:
            continue
        bias = m.bias.detach()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bias = bias - m.running_mean * m.weight.detach() / torch.sqrt(m.running_var + m.eps)
        term = scaled(bias[(...,) + (None,) * (g.dim() - 2)] * g)
        if tuple(term.shape[2:]) != tuple(x.shape[2:]):
            term = torch.nn.functional.interpolate(term.float(), size=tuple(x.shape[2:]), mode=mode,
                                                   align_corners=False)
        total = total + term[:, 0]
    return total


def ref_saliency(model, x, target, make=None) -> Tensor:
    """|d score / d image|."""
    return ref_gradient(model, x, target, make).abs()


def _top_logits(output) -> Tensor | None:
    """The (N, classes) scores target=None explains (issue 19): a 2-D output itself, or its `logits` field (CLIP's
    `logits_per_image`) in a ModelOutput or dict; None where the output has neither (no reference then)."""
    if isinstance(output, Tensor):
        return output if output.dim() == 2 else None
    for key in ("logits", "logits_per_image"):
        v = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(v, Tensor) and v.dim() == 2:
            return v
    return None


def ref_top_class(output) -> Tensor:
    """The reference target for target=None: each input's top score in _top_logits(output)."""
    logits = _top_logits(output)
    return logits.gather(1, logits.detach().argmax(1, keepdim=True))[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# the checks


class Refused(Exception):
    pass


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            hook_counts(model), all(p.grad is None for p in model.parameters()))


def _signature(model, exact: bool):
    """What a method must leave as it found it, beyond _state: every module's hook dictionaries (the hooks
    themselves; their functions' names when `exact` is False, to compare two copies of a model), its plain attributes
    (training, and flags such as transformers' _output_capturing_hooks_installed, set with the hooks it installs on
    a first forward), each parameter's requires_grad and .grad, the model's config, and torch's global hooks."""
    def fn_name(v):
        return getattr(v, "__qualname__", type(v).__qualname__)
    mods = {}
    for name, m in model.named_modules():
        hooks = {d: [(k, v) if exact else fn_name(v) for k, v in getattr(m, d).items()]
                 for d in HOOK_DICTS if getattr(m, d, None)}
        flags = {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))}
        mods[name] = {"hooks": hooks, "flags": flags}
    params = {n: (p.requires_grad, p.grad is None) for n, p in model.named_parameters()}
    config = getattr(model, "config", None)
    glob = {d: len(getattr(torch.nn.modules.module, d)) for d in dir(torch.nn.modules.module) if d.startswith("_global")
            and d.endswith("hooks")}
    return {"modules": mods, "parameters": params, "global hooks": glob,
            "config": config.to_json_string() if hasattr(config, "to_json_string") else None}


def _difference(before: dict, after: dict) -> str:
    """The first thing that differs between two _signature()s, in words."""
    for name, b in before["modules"].items():
        a = after["modules"].get(name)
        if a is None:
            return f"module {name!r} gone"
        for what in ("hooks", "flags"):
            for k in sorted(set(b[what]) | set(a[what])):
                if b[what].get(k) != a[what].get(k):
                    return f"{name or 'the model'}.{k}: {_short(b[what].get(k))} -> {_short(a[what].get(k))}"
    for what in ("parameters", "global hooks", "config"):
        if before[what] != after[what]:
            return f"{what} changed"
    return "modules added"


def _short(v) -> str:
    return f"{len(v)} hooks" if isinstance(v, list) else repr(v)


def _one_line_refusal(e: BaseException) -> bool:
    """A clear refusal: a ValueError (LayoutError is one) raised by lightning_vis itself, with a one-line message."""
    tb = traceback.extract_tb(e.__traceback__)
    return isinstance(e, ValueError) and bool(tb) and "lightning_vis" in tb[-1].filename and \
        "\n" not in str(e).strip() and 0 < len(str(e)) <= 1000


def _outputs_equal(a, b) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_outputs_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_outputs_equal(u, v) for u, v in zip(a, b))
    return True


def _nonempty(t: Tensor, what: str):
    if not torch.isfinite(t).all():
        raise AssertionError(f"{what} has non-finite values")
    if t.float().abs().amax() == 0:
        raise AssertionError(f"{what} is all zero")


def _close(a, b, what, rtol=1e-3, atol=1e-5, floor: float = 1e-12):
    """a equals the reference b to rtol of b's largest magnitude, or of `floor` where b is smaller (a difference of
    two nearly equal scores, as a completeness error is, is float rounding there)."""
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    scale = b.abs().amax().clamp_min(floor)
    err = float(((a - b).abs().amax() / scale))
    if err > rtol:
        raise AssertionError(f"{what}: {err:.2e} relative difference from the plain-autograd reference")


def _target_for(case, model, x):
    """A callable target (N,) for the task, and its scores on x (hub models: None, the default)."""
    if case.hub:
        return None
    if case.task == "segment":  # the class most pixels get, over them
        with torch.no_grad():
            return targets.segmentation(int(model(x)["out"].argmax(1).flatten().mode().values))
    if case.task == "detect":
        with torch.no_grad():
            dets = model(x)
        if not dets or not len(dets[0]["boxes"]):
            raise Refused("no detections to explain with random weights")
        return targets.detection(dets[0]["boxes"][:1], dets[0]["labels"][:1])
    with torch.no_grad():
        cls = model(x).argmax(1)
    return targets.classifier(cls)


def _row_target(case, model, x):
    """The target for methods that run the model on many rows per input (Score-CAM, Ablation-CAM, integrated
    gradients, GradientShap, occlusion): a classifier's classes as a tensor, as a user passes them (a callable
    sees the rows' outputs, so a per-input callable cannot be applied there); the task's callable otherwise."""
    target = _target_for(case, model, x)
    return target._classes if isinstance(target, targets.classifier) else target


def run_case(case: Case, methods=METHODS, seed: int = 0) -> dict:
    """{method: ("ok" | "refused" | "FAIL" | "-", note)} for one case."""
    torch.manual_seed(seed)
    results = {}
    try:
        model = case.build().eval()
    except Exception as e:  # noqa: BLE001 - a builder that fails here is reported, not hidden
        return {**{m: ("FAIL", f"build: {type(e).__name__}: {e}") for m in methods}, "seconds": {}}
    with torch.no_grad():  # torchvision zero-initialises some heads: every gradient would be 0
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, Tensor) and w.dim() >= 2 and not w.any():
                nn.init.normal_(w, std=0.02)
    x = torch.rand(case.shape)
    inputs = case.inputs(x) if case.inputs else x  # detection models take a batch tensor as well as a list of images
    before = _state(model)
    pristine = copy.deepcopy(model) if case.hub else None  # never run: the first calls' copies
    try:
        with torch.no_grad():
            reference_out = _call(model, inputs)
    except Exception as e:  # noqa: BLE001
        return {**{m: ("FAIL", f"the model refuses {tuple(x.shape)}: {type(e).__name__}: {e}") for m in methods},
                "seconds": {}}
    if case.hub:  # as the model is after a plain forward (transformers installs some hooks on the first one)
        own, own_copy = _signature(model, exact=True), _signature(model, exact=False)
        changed = {}
    ctx = {}

    times = {}

    def check(method, fn, results=results, times=times):
        if method not in methods and method != "layers":  # layers picks the layers the others use
            return
        t0 = time.perf_counter()
        try:
            note = fn() or ""
            results[method] = ("ok", note)
        except Refused as e:
            results[method] = ("-", str(e))
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            expected = case.refuse.get(method)
            if expected and re.search(expected, str(e)) or case.hub and _one_line_refusal(e):
                results[method] = ("refused", msg[:160])
            else:
                results[method] = ("FAIL", msg[:300] + ("" if isinstance(e, AssertionError) else
                                                         " @ " + _where(e)))
        finally:
            times[method] = round(time.perf_counter() - t0, 2)

    spatial = x.dim() - 2

    def is_map(layout):
        return isinstance(layout, Layout) and layout.kind != "vector"

    def not_a_map(name):  # a layer the case names as no map over the input, or one inside it
        return any(name == n or name.startswith(n + ".") for n in case.not_maps)

    def layers():
        infos = lv.layers(model, inputs if case.hub else (inputs,))
        ctx["infos"] = {i.name: i for i in infos}
        placed = [i for i in infos if is_map(i.layout) and i.layout.spatial_dims == spatial and min(i.layout.grid) > 1
                  and i.units and i.units > 1 and i.calls == 1 and not not_a_map(i.name)]
        if placed:  # the other methods' layer, also when a layout below is wrong
            ctx["mid"] = placed[len(placed) // 2].name
        for name, desc in case.expect.items():
            info = ctx["infos"].get(name)
            if info is None or info.layout_text != desc:
                got = info.layout_text if info else "did not run"
                raise AssertionError(f"{name}: layout {got!r}, the architecture says {desc!r}")
        for name in case.not_maps:
            info = ctx["infos"].get(name)
            if info is None or is_map(info.layout):
                got = f"placed as {info.layout_text!r}" if info else "did not run"
                raise AssertionError(f"{name}: {got}, but it is no map over the input")
        if not placed:
            raise AssertionError("no layer with maps over the input")
        if case.hub:  # grad_cam picks its own layer (gradcam checks it)
            return f"{len(infos)} layers; middle {ctx['mid']} ({ctx['infos'][ctx['mid']].layout_text})"
        cam = case.layer or lv.attribution.default_cam_layer(model, x[:1])
        ctx["cam"] = cam
        return f"{len(infos)} layers; CAM layer {cam} ({ctx['infos'][cam].layout_text}); middle {ctx['mid']} " \
               f"({ctx['infos'][ctx['mid']].layout_text})"

    def need(key):
        if key not in ctx:
            raise Refused("layers failed")
        return ctx[key]

    def activations():
        names = list(dict.fromkeys([need("mid"), *case.expect] if case.hub else [need("cam"), need("mid")]))
        acts, _ = lv.activations(model, inputs, names)
        for name in names:
            lay = acts.layout(name)
            maps = acts.maps(name)
            if maps.shape[1] != ctx["infos"][name].units or tuple(maps.shape[2:]) != lay.grid:
                raise AssertionError(f"{name}: maps {tuple(maps.shape)} do not match {lay.describe()}")
            if maps.float().std() == 0:
                raise AssertionError(f"{name}: constant maps")
            grid = lv.activation_grid(acts[name], 0, layout=lay, max_filters=16)
            _nonempty(grid, f"{name} grid")

    def gradcam():
        if case.hub:
            return hub_gradcam()
        target = _target_for(case, model, inputs)
        cam = lv.grad_cam(model, inputs, need("cam"), target)
        want = tuple(x.shape[2:]) if case.task != "detect" else None
        if want and tuple(cam.maps.shape[1:]) != want:
            raise AssertionError(f"maps {tuple(cam.maps.shape)} for input {tuple(x.shape)}")
        desc = case.expect.get(ctx["cam"], ctx["infos"][ctx["cam"]].layout_text)
        ctx["ag"] = ref_activation_gradient(model, inputs, ctx["cam"], desc, target)
        ctx["ag of"] = (ctx["cam"], desc, target)
        ref = ref_cam("gradcam", *ctx["ag"])[0]
        _close(cam.low_res, ref.clamp_min(0), "low-res map")
        _nonempty(ref, "the map before its ReLU")  # random weights may leave nothing positive: not our fault
        return f"{ctx['cam']}: {tuple(cam.low_res.shape[1:])}"

    def hub_gradcam():  # the defaults: grad_cam's layer, target=None
        cam = lv.grad_cam(model, inputs)
        if tuple(cam.maps.shape) != (x.shape[0], *x.shape[2:]):
            raise AssertionError(f"maps {tuple(cam.maps.shape)} for input {tuple(x.shape)}")
        if not_a_map(cam.layer):
            raise AssertionError(f"the default layer {cam.layer} is no map over the input")
        info = need("infos").get(cam.layer)
        if info is None or not is_map(info.layout):
            raise AssertionError(f"the default layer {cam.layer} has no map in layers(): "
                                 f"{info.layout_text if info else 'did not run'}")
        desc = case.expect.get(cam.layer, info.layout_text)
        if _top_logits(reference_out) is None:
            _nonempty(cam.low_res, "the map")
            return f"{cam.layer} ({desc}): {tuple(cam.low_res.shape[1:])}; no class scores to check against"
        ctx["ag"] = ref_activation_gradient(model, inputs, cam.layer, desc, ref_top_class)
        ctx["ag of"] = (cam.layer, desc, ref_top_class)
        ref = ref_cam("gradcam", *ctx["ag"])[0]
        _close(cam.low_res, ref.clamp_min(0), "low-res map")
        _nonempty(ref, "the map before its ReLU")
        return f"{cam.layer} ({desc}): {tuple(cam.low_res.shape[1:])}"

    def cam_method(method):
        """Another CAM method on Grad-CAM's layer and target (the hubs: the defaults), against the same
        plain-autograd activation and gradient where the method is computed from them."""
        if case.hub:
            cam = lv.grad_cam(model, inputs, method=method)
        else:
            cam = lv.grad_cam(model, inputs, need("cam"), _row_target(case, model, inputs), method=method)
        if tuple(cam.maps.shape) != (x.shape[0], *x.shape[2:]):
            raise AssertionError(f"maps {tuple(cam.maps.shape)} for input {tuple(x.shape)}")
        if not torch.isfinite(cam.maps).all() or cam.maps.amin() < 0:
            raise AssertionError("maps not finite and >= 0")
        if method == "guided-gradcam" and (cam.guided is None or cam.guided.shape != x.shape):
            raise AssertionError(f"guided {None if cam.guided is None else tuple(cam.guided.shape)}")
        try:
            ag = ctx.get("ag")
            if ag is not None and method in ("shapleycam", "finercam"):  # their own gradient at Grad-CAM's layer
                layer, desc, target = ctx["ag of"]
                ag = ref_activation_gradient(model, inputs, layer, desc, ref_finer if method == "finercam" else target,
                                             hessian=method == "shapleycam")
            refs = ref_cam(method, *ag) if ag is not None else []
        except Ambiguous as e:
            return f"{cam.layer}: {tuple(cam.low_res.shape[1:])}; {e}"
        if refs:
            for i in range(x.shape[0]):  # each image's map equals one of them (a principal component's sign is
                errors = []  # arbitrary, image by image)
                for ref in refs:
                    try:
                        _close(cam.low_res[i], ref[i].clamp_min(0), f"image {i}'s low-res map")
                        break
                    except AssertionError as e:
                        errors.append(str(e))
                else:
                    raise AssertionError(errors[0])
            return f"{cam.layer}: {tuple(cam.low_res.shape[1:])}, equal to the reference"
        return f"{cam.layer}: {tuple(cam.low_res.shape[1:])}, max {float(cam.low_res.amax()):.3g}" + \
            ("" if "ag" in ctx or method in lv.attribution.cams.RERUNS else "; no class scores to check against")

    def hub_scores(out, classes):
        """The scores target=None explains on a hub model's output, for its classes; None without (N, classes)."""
        logits = _top_logits(out)
        if logits is None or classes is None:
            return None
        return logits.gather(1, classes[:, None].to(logits.device))[:, 0]

    def scores_at(points, classes):
        """The target's scores with the image replaced by `points` (plain forward), or None where not known."""
        with torch.no_grad():
            out = _call(model, case.inputs(points) if case.inputs else points)
        return hub_scores(out, classes) if case.hub else ctx["target"](out)

    def path(method):
        """Integrated gradients (16 Gauss-Legendre steps) and GradientShap from zeros: shape, not empty, and the
        completeness error they report against f(x) - f(0) by plain forwards."""
        ctx["target"] = _target_for(case, model, inputs)
        target = _row_target(case, model, inputs)
        if method == "integrated-gradients":
            r = lv.integrated_gradients(model, inputs if case.hub else x, target, steps=16)
        else:
            r = lv.gradient_shap(model, inputs if case.hub else x, target)
        if r.maps.shape != x.shape:
            raise AssertionError(f"maps {tuple(r.maps.shape)} for input {tuple(x.shape)}")
        _nonempty(r.maps, method)
        fx, f0 = scores_at(x, r.targets), scores_at(torch.zeros_like(x), r.targets)
        if fx is None:
            return "no class scores to check against"
        delta = r.maps.flatten(1).sum(1) - (fx - f0)
        # the reference is f(x) - f(0) from two forwards: its float rounding is of the order of 1e-7 of the scores,
        # so the scale of the comparison is at least 1e-4 of the largest score (a random-weight RN50's f(x) - f(0)
        # is 2e-4 of its score, its completeness error 1e-8)
        _close(r.delta, delta, "reported completeness error", rtol=1e-2, floor=1e-4 * float(fx.abs().amax()))
        rel = float((delta.abs() / (fx - f0).abs().clamp_min(1e-6)).max())
        return f"completeness error {rel:.1%} of f(x) - f(0)"

    def input_shaped(method, what):
        """method(model, inputs, target) on the task's target: maps of the input's shape, not empty."""
        target = _target_for(case, model, inputs)
        r = method(model, inputs if case.hub else x, target)
        if r.maps.shape != x.shape:
            raise AssertionError(f"maps {tuple(r.maps.shape)} for input {tuple(x.shape)}")
        _nonempty(r.maps, what)
        return r, target

    def input_x_gradient():
        r, target = input_shaped(lv.input_x_gradient, "input x gradient")
        if case.hub and _top_logits(reference_out) is None:
            return "no class scores to check against"
        ref = ref_gradient(model, x, ref_top_class if case.hub else target, case.inputs) * x
        _close(r.maps, ref, "input x gradient")

    def occlusion():
        """A window of a quarter of the input on each axis, stride = window (4 placements per axis): the value at
        the first placement against a plain forward with that corner zeroed."""
        ctx["target"] = _target_for(case, model, inputs)
        window = tuple(max(1, n // 4) for n in x.shape[2:])
        r = lv.occlusion(model, inputs if case.hub else x, _row_target(case, model, inputs), window=window,
                         stride=window)
        counts = tuple(len(s) for s in r.starts)
        if tuple(r.maps.shape) != (x.shape[0], *x.shape[2:]) or tuple(r.grid.shape) != (x.shape[0], *counts):
            raise AssertionError(f"maps {tuple(r.maps.shape)}, grid {tuple(r.grid.shape)} for input {tuple(x.shape)}")
        if not torch.isfinite(r.maps).all():
            raise AssertionError("maps not finite")
        corner = x.clone()
        corner[(..., *[slice(0, w) for w in window])] = 0
        at = scores_at(corner, r.targets)
        if at is None:
            return "no class scores to check against"
        _close(r.grid.flatten(1)[:, 0], at, "the value with the first window")
        return f"{counts} placements"

    def lrp():
        r, _ = input_shaped(lambda *a: lv.lrp(*a, **LRP_STABILIZERS), "lrp")
        share = r.maps.flatten(1).sum(1) / r.scores.abs().clamp_min(torch.finfo(r.scores.dtype).tiny)
        return f"relevance sums {share.min():.2f}..{share.max():.2f} x |score|"

    def fullgrad():
        """FullGrad on the task's target (the hubs: target=None), against ref_fullgrad."""
        target = _target_for(case, model, inputs)
        r = lv.fullgrad(model, inputs if case.hub else x, target)
        if tuple(r.maps.shape) != (x.shape[0], *x.shape[2:]):
            raise AssertionError(f"maps {tuple(r.maps.shape)} for input {tuple(x.shape)}")
        _nonempty(r.maps, "fullgrad")
        if case.hub and _top_logits(reference_out) is None:
            return "no class scores to check against"
        _close(r.maps, ref_fullgrad(model, x, ref_top_class if case.hub else target, case.inputs), "fullgrad")

    def saliency():
        if case.hub:
            s = lv.saliency(model, inputs)
            if s.maps.shape != x.shape:
                raise AssertionError(f"maps {tuple(s.maps.shape)} for input {tuple(x.shape)}")
            if _top_logits(reference_out) is not None:
                _close(s.maps, ref_saliency(model, x, ref_top_class, case.inputs), "saliency")
            _nonempty(s.maps, "saliency")
            return
        target = _target_for(case, model, inputs)
        s = lv.saliency(model, x, target)
        _close(s.maps, ref_saliency(model, x, target), "saliency")
        _nonempty(s.maps, "saliency")

    def guided():
        g = lv.guided_backprop(model, inputs if case.hub else x, _target_for(case, model, inputs))
        if g.maps.shape != x.shape:
            raise AssertionError(f"maps {tuple(g.maps.shape)}")
        _nonempty(g.maps, "guided backprop")

    def deconvnet():
        mid = need("mid")
        rec = lv.deconvnet(model, inputs if case.hub else x, [mid], top_k=1)
        if rec.images[mid].shape != (x.shape[0], 1, *x.shape[1:]):
            raise AssertionError(f"reconstructions {tuple(rec.images[mid].shape)}")
        _nonempty(rec.images[mid], "reconstruction")

    def render():
        if case.task == "detect" and not case.hub:
            raise Refused("detection models take image lists of any size: renders of the backbone instead")
        size = tuple(x.shape[2:]) if spatial == 3 else x.shape[-1]
        res = lv.render(model, (need("mid"), [0, 1]), size=size, steps=2, progress=False)
        _nonempty(res.images, "render")
        return f"input {res.settings['input_size']}"

    def topk():
        if case.task == "detect" and not case.hub:
            raise Refused("a batch of images of one size; detection models resize their inputs")
        data = torch.utils.data.TensorDataset(torch.rand(3, *x.shape[1:]))
        if case.inputs:  # a dataset of dicts, as a multi-input model's loader gives them
            data = [{k: v[0] for k, v in case.inputs(torch.rand(1, *x.shape[1:])).items()} for _ in range(3)]
        res = lv.top_k_examples(model, torch.utils.data.DataLoader(data, batch_size=2), [need("mid")], k=2,
                                progress=False)
        e = res.layers[ctx["mid"]]
        lay = ctx["infos"][ctx["mid"]].layout
        if e.grid != lay.grid or not ((e.indices >= 0) & (e.indices < 3)).all():
            raise AssertionError(f"grid {e.grid} vs {lay.describe()}, indices {e.indices[:2].tolist()}")

    def receptive():
        rf = lv.receptive_field(model, need("mid"), tuple(x.shape[1:]), max_size=4 * max(x.shape[2:]))
        if min(rf.size) < 1:
            raise AssertionError(f"size {rf.size}")
        return f"{ctx['mid']}: size {rf.size}"

    def attention():
        if not case.attention:
            raise Refused("no attention")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maps = lv.attention_maps(model, inputs if case.hub else x)
        for name, m in maps.items():  # (N, heads, *grid); a decoder's cross-attention: (N, heads, queries, *grid)
            cross = any(w in name.rsplit(".", 1)[-1] for w in ("cross", "encoder_attn"))
            if m.dim() != 2 + spatial + cross or m.shape[0] != x.shape[0]:
                raise AssertionError(f"{name}: maps {tuple(m.shape)}")
            if any(name == n or name.startswith(n + ".") for n in case.not_attention):
                raise AssertionError(f"{name}: its attention is drawn as maps over the image ({tuple(m.shape)})")
            _nonempty(m, name)
        if len(maps) < case.min_attention:
            raise AssertionError(f"{len(maps)} attention layers ({', '.join(maps)}), the architecture has "
                                 f"{case.min_attention}")
        return f"{len(maps)} layers: {', '.join(maps)}"[:300]

    def rollout():
        if not case.attention:
            raise Refused("no attention")
        r = lv.attention_rollout(model, inputs if case.hub else x)
        if r.dim() != 1 + spatial:
            raise AssertionError(f"rollout {tuple(r.shape)}")
        _nonempty(r, "rollout")

    def checkpoint():
        if case.checkpoint is None:
            raise Refused("no checkpointing switch")
        target = _target_for(case, model, inputs)
        case.checkpoint(model, True)  # timm's checkpoint_seq calls a stage's blocks one by one: a layer that runs
        try:
            layer = lv.attribution.default_cam_layer(model, x[:1])
            cam = lv.grad_cam(model, x, layer, target).low_res
            sal = lv.saliency(model, x, target).maps
        finally:
            case.checkpoint(model, False)
        plain_cam = lv.grad_cam(model, x, layer, target).low_res
        plain_sal = lv.saliency(model, x, target).maps
        _close(cam, plain_cam, "grad_cam with checkpointing")
        _close(sal, plain_sal, "saliency with checkpointing")
        return f"{layer}"

    def still_runs(exact: bool) -> str:
        """"" if the model gives the reference output bit for bit and has what it had (hub models), else what not."""
        now = _signature(model, exact) if exact else None  # before the forward below, which could repair it
        try:
            with torch.no_grad():
                out = _call(model, inputs)
        except Exception as e:  # noqa: BLE001
            return f"model(x) raises {type(e).__name__}: {str(e).splitlines()[0][:120]} @ {_where(e)}"
        if not _outputs_equal(reference_out, out):
            return "output changed"
        now = now or _signature(model, exact)
        want = own if exact else own_copy
        return "" if now == want else _difference(want, now)

    checks = {"layers": layers, "activations": activations, "gradcam": gradcam, "fullgrad": fullgrad,
              "saliency": saliency, "guided": guided, "deconvnet": deconvnet,
              "integrated-gradients": lambda: path("integrated-gradients"),
              "gradient-shap": lambda: path("gradient-shap"), "input-x-gradient": input_x_gradient,
              "occlusion": occlusion, "lrp": lrp, "render": render, "topk": topk, "receptive": receptive,
              "attention": attention, "rollout": rollout, "checkpoint": checkpoint,
              **{m: (lambda m=m: cam_method(m)) for m in CAMS}}
    steps = [(m, checks[m]) for m in METHODS]
    for method, fn in steps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            check(method, fn)
        if case.hub and method in results and (what := still_runs(exact=True)):
            changed[method] = what
            model = copy.deepcopy(pristine)  # the next methods on a model as the user has it
            with torch.no_grad():
                _call(model, inputs)
            own = _signature(model, exact=True)
    if case.hub:
        results["model unchanged"] = ("ok", "") if not changed else \
            ("FAIL", "; ".join(f"after {m}: {w}" for m, w in changed.items()))
        first, broken = {}, {}
        for method, fn in steps:  # each method as the first call on a fresh copy of the model
            if method not in results or method == "checkpoint":
                continue
            model = copy.deepcopy(pristine)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check(method, fn, first, {})
            what = still_runs(exact=False)
            if what or first[method][0] != results[method][0]:
                broken[method] = what or f"{first[method][0]} on a fresh model: {first[method][1][:160]}"
        results["first call"] = ("ok", "") if not broken else \
            ("FAIL", "; ".join(f"after {m}: {w}" for m, w in broken.items()))
        if case.task != "depth":  # a class, embedding, mask or box output: these must work with no glue
            for m in HUB_REQUIRED + (("attention",) if case.attention else ()) + case.must:
                expected = case.refuse.get(m)
                if results.get(m, ("",))[0] == "refused" and not (expected and re.search(expected, results[m][1])):
                    results[m] = ("FAIL", "refused with no glue: " + results[m][1])
        results["seconds"] = times
        return results
    after = _state(model)
    with torch.no_grad():
        same = _outputs_equal(reference_out, model(inputs))
    if after != before or not same:
        what = "output changed" if not same else "hooks, flags or .grad changed"
        results["model unchanged"] = ("FAIL", what)
    else:
        results["model unchanged"] = ("ok", "")
    results["seconds"] = times
    return results


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if "lightning_vis" in f.filename]
    f = (ours or tb)[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


# ----------------------------------------------------------------------------------------------------------------
# the table


def table(rows: list[tuple[str, dict]]) -> str:
    """The markdown table: a row per model, a column per method; "not run" where a method was left out of the runs
    (--methods), "-" where it does not apply."""
    cols = list(METHODS) + ["model unchanged"] + (["first call"] if any("first call" in r for _, r in rows) else [])
    mark = {"ok": "ok", "refused": "refused", "FAIL": "**FAIL**", "-": "-"}
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, res in rows:
        lines.append(f"| {name} | " + " | ".join(mark[res[c][0]] if c in res else "not run" if c in METHODS else "-"
                                                 for c in cols) + " |")
    return "\n".join(lines)


def summarize(rows: list[tuple[str, dict]], seconds: float | None = None) -> str:
    """One line: the models, the applicable checks that pass (ok or the expected refusal), the refusals and failures
    among them, the methods not run, and the time (where given)."""
    cells = [v[0] for _, r in rows for k, v in r.items() if k != "seconds"]
    total, ok, refused, failures = (len(cells) - cells.count("-"), cells.count("ok"), cells.count("refused"),
                                    cells.count("FAIL"))
    not_run = sum(1 for _, r in rows for m in METHODS if m not in r)
    return (f"{len(rows)} models, {ok + refused}/{total} applicable checks pass ({ok} ok, {refused} refused, "
            f"{failures} failures" + (f"; {not_run} cells not run" if not_run else "") + ")" +
            ("" if seconds is None else f", {seconds:.0f} s on {platform.processor() or platform.machine()}, "
                                        f"torch {torch.__version__}"))


def merge(paths: list[str]) -> tuple[list[tuple[str, dict]], float]:
    """The rows of several runs' JSON (parts of the zoo, other methods on the same models, a rerun of some) as one
    run's, in the order cases() lists the models, and the runs' seconds summed. A method two runs checked keeps the
    later run's result ("layers" runs in every run), except "model unchanged" and "first call", which check what
    each run's methods did: a failure in any run stays."""
    merged, seconds = {}, 0.0
    for p in paths:
        data = json.loads(Path(p).read_text())
        seconds += data["seconds"] if "seconds" in data else float(re.search(r"(\d+) s on", data["summary"]).group(1))
        for row in data["rows"]:
            into = merged.setdefault(row["model"], {"seconds": {}})
            for k, v in row["results"].items():
                if k == "seconds":
                    into["seconds"].update(v)
                elif k not in ("model unchanged", "first call") or k not in into or v[0] == "FAIL":
                    into[k] = tuple(v)
    order = {c.name: i for i, c in enumerate(cases())}
    return sorted(merged.items(), key=lambda kv: order.get(kv[0], len(order))), seconds


def paste(doc: Path, marker: str, text: str) -> None:
    """Replaces what lies between <!-- marker:start --> and <!-- marker:end --> in doc with text."""
    old = doc.read_text()
    begin, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
    if begin not in old or end not in old:
        raise SystemExit(f"{doc} has no {begin.strip()} ... {end} markers")
    head, rest = old.split(begin, 1)
    doc.write_text(head + begin + text + "\n" + end + rest.split(end, 1)[1])


def docs_block(rows: list[tuple[str, dict]], what: str) -> str:
    """The docs' generated part for rows: the summary (the time is the whole run's: the docs say it) and the table,
    folded."""
    return (f"**{summarize(rows)}**\n\n<details><summary>The table: {what} x every method</summary>\n\n"
            f"{table(rows)}\n\n</details>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=[], help="cases whose name contains one of these")
    ap.add_argument("--ci", action="store_true", help="the representative subset CI runs")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="methods to check")
    ap.add_argument("--json", default="benchmarks/results/zoo.json")
    ap.add_argument("--markdown", default="benchmarks/results/zoo.md")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="run nothing: merge these runs' JSON (parts of the zoo, "
                    "or other methods on the same models) into --json and --markdown")
    ap.add_argument("--docs", metavar="MD", help="also paste the tables into MD between its zoo markers (the hubs' "
                    "models between its zoo-hub markers), e.g. docs/guide/any_model.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.merge:
        rows, seconds = merge(args.merge)
    else:
        chosen = [c for c in cases() if (not args.only or any(o in c.name for o in args.only))
                  and (c.ci or not args.ci)]
        rows = []
        t0 = time.time()
        for i, case in enumerate(chosen, 1):
            t = time.time()
            res = run_case(case, methods=args.methods)
            rows.append((case.name, res))
            bad = {k: v[1] for k, v in res.items() if k != "seconds" and v[0] == "FAIL"}
            slow = sorted(res["seconds"].items(), key=lambda kv: -kv[1])[:3]
            print(f"[{i}/{len(chosen)}] {case.name}: {time.time() - t:.1f}s (slowest: {slow}) " +
                  ("ok" if not bad else "FAIL " + json.dumps(bad)[:600]), flush=True)
        seconds = time.time() - t0
    md = table(rows)
    summary = summarize(rows, seconds) if not args.merge else \
        f"{summarize(rows)}; merged from {len(args.merge)} runs, their times summing to {seconds:.0f} s"
    print(md)
    print(summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"schema": "lightning-vis/benchmarks/zoo/1", "summary": summary,
                                               "seconds": round(seconds),
                                               "rows": [{"model": n, "results": r} for n, r in rows]}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n\n" + summary + "\n")
    if args.docs:
        hub = {c.name for c in cases() if c.hub}
        paste(Path(args.docs), "zoo", docs_block([r for r in rows if r[0] not in hub], "every model"))
        paste(Path(args.docs), "zoo-hub", docs_block([r for r in rows if r[0] in hub], "every hub model"))
    return 1 if any(v[0] == "FAIL" for _, r in rows for k, v in r.items() if k != "seconds") else 0


if __name__ == "__main__":
    sys.exit(main())
