"""Models as the hubs ship them (Hugging Face transformers, built from small configs with random weights): every
method leaves the model as it was, lazily installed hooks included; targets read their outputs; multi-input
models take their other inputs; the CLI builds them from a local folder or a config."""

import collections
import copy
import dataclasses
import json

import pytest
import torch

import lightning_vis as lv
from lightning_vis import targets
from lightning_vis.attribution import default_cam_layer
from lightning_vis.hooks import ModelGuard, capture, hook_counts

transformers = pytest.importorskip("transformers")


def segformer():
    """SegFormer: its decode head asks the encoder for hidden states, so the first forward installs transformers'
    output-capture hooks (and marks them installed)."""
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                       mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3)
    return transformers.SegformerForSemanticSegmentation(cfg).eval()


def vit(**config):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=5, **config)
    return transformers.ViTForImageClassification(cfg).eval()


def vit_lazy():
    """A ViT whose config asks for hidden states: its first forward installs the output-capture hooks."""
    return vit(output_hidden_states=True)


def own_hooks(model) -> dict:
    """Every hook in the model's hook dictionaries, by module and dictionary, named by its function."""
    found = {}
    for name, m in model.named_modules():
        for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            fns = getattr(m, d)
            if fns:
                found[name, d] = sorted(f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', f)}"
                                        for f in fns.values())
    return found


def marked(model) -> bool:
    """Whether transformers marked a (sub)model's output-capture hooks as installed."""
    return any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules())


METHODS = {
    "saliency": lambda m, x, t, layer: lv.saliency(m, x, t),
    "guided_backprop": lambda m, x, t, layer: lv.guided_backprop(m, x, t),
    "grad_cam": lambda m, x, t, layer: lv.grad_cam(m, x, target=t),
    "gradcam++": lambda m, x, t, layer: lv.grad_cam(m, x, layer, t, method="gradcam++"),
    "attention_maps": lambda m, x, t, layer: lv.attention_maps(m, x),
    "activations": lambda m, x, t, layer: lv.activations(m, x, layer),
    "deconvnet": lambda m, x, t, layer: lv.deconvnet(m, x, layer, top_k=1),
    "receptive_field": lambda m, x, t, layer: lv.receptive_field(m, layer, tuple(x.shape[1:])),
    "deep_dream": lambda m, x, t, layer: lv.deep_dream(m, x[:1], layer, octaves=1, steps=1, progress=False),
}
MODELS = {"segformer": (segformer, lambda: targets.segmentation(1)),
          "vit": (vit, lambda: None),  # the top class of the output's logits
          "vit-lazy": (vit_lazy, lambda: targets.classifier(0, key="logits"))}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_every_method_leaves_a_fresh_hub_model_as_it_was(arch, method):
    build, target = MODELS[arch]
    model = build()
    twin = copy.deepcopy(model)  # never seen by lightning-vis: what the model gives and holds on its own
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layer = default_cam_layer(copy.deepcopy(model), x)  # on a copy: it runs the model
    with torch.no_grad():
        expected = twin(x).logits
    flags = [(m.training, vars(m.config).copy() if hasattr(m, "config") else None) for m in model.modules()]
    for _ in range(2):  # the first call on the fresh model, and a later one
        METHODS[method](model, x, target(), layer)
        with torch.no_grad():
            got = model(x).logits  # raised IndexError after the first call before the guard kept the model's hooks
        assert torch.equal(got, expected)
        assert own_hooks(model) == own_hooks(twin)
    assert [(m.training, vars(m.config) if hasattr(m, "config") else None) for m in model.modules()] == flags
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_the_lazy_models_install_hooks_of_their_own():
    """The premise of the test above: these models' first forward adds hooks (so they must survive the guard)."""
    for build in (segformer, vit_lazy):
        model = build()
        assert hook_counts(model) == 0
        model(torch.randn(1, 3, 32, 32))
        assert hook_counts(model) > 0 and marked(model)


def test_guard_removes_only_the_hooks_lightning_vis_left_and_restores_configs():
    model = vit()
    x = torch.randn(1, 3, 32, 32)
    user = model.vit.layernorm.register_forward_hook(lambda *a: None)
    with ModelGuard(model, eval=True):
        capture(model, "vit.layernorm").__enter__()  # a tap that is never closed: lightning-vis's own leak
        mine = model.classifier.register_forward_pre_hook(lambda *a: None, with_kwargs=True)  # the model's or user's
        model.set_attn_implementation("eager")
        model.config.output_attentions = True
        model.config.made_up_field = 3
        model(x, output_hidden_states=True)  # transformers installs its capture hooks
    assert set(model.vit.layernorm._forward_hooks) == {user.id}
    assert set(model.classifier._forward_pre_hooks) == {mine.id}
    assert set(model.classifier._forward_pre_hooks_with_kwargs) == {mine.id}
    assert marked(model) and any("output_capturing" in f for fns in own_hooks(model).values() for f in fns)
    assert model.config._attn_implementation == "sdpa" and not model.config.output_attentions
    assert not hasattr(model.config, "made_up_field")
    model(x)


# ----------------------------------------------------------------------------------------------------------------
# outputs as the hubs shape them


class Linear(torch.nn.Module):
    """logits = W x (flattened), returned as `wrap(logits)`: a tensor, dict, ModelOutput, dataclass, namedtuple."""

    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.wrap = torch.nn.Linear(12, 4, bias=False), wrap

    def forward(self, x):
        return self.wrap(self.fc(x.flatten(1)))


@dataclasses.dataclass
class Out:
    embedding: torch.Tensor
    logits: torch.Tensor


Named = collections.namedtuple("Named", "hidden logits")

WRAPS = {"dict": lambda t: {"pooled": t.sum(1), "logits": t},
         "ModelOutput": lambda t: transformers.modeling_outputs.ImageClassifierOutput(logits=t),
         "dataclass": lambda t: Out(t * 2, t), "namedtuple": lambda t: Named(t * 2, t)}


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_target_none_explains_the_top_class_of_the_logits_field(wrap):
    net = Linear(WRAPS[wrap])
    x = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    logits = net.fc(x.flatten(1)).detach()
    top = logits.argmax(1)
    sal = lv.saliency(net, x, absolute=False)  # refused before: "a class target needs (N, classes) logits"
    assert torch.equal(sal.targets, top)
    torch.testing.assert_close(sal.scores, logits.max(1).values)
    torch.testing.assert_close(sal.maps, net.fc.weight.detach()[top].view_as(x))  # d(W x)_c / dx = W[c]
    out = net(x)
    torch.testing.assert_close(targets.classifier(None, key="logits")(out), logits.max(1).values)
    torch.testing.assert_close(targets.classifier(None)(out), logits.max(1).values)
    torch.testing.assert_close(targets.classifier([1, 0, 3])(out), logits[[0, 1, 2], [1, 0, 3]])


def test_outputs_whose_logits_cannot_be_found_are_still_refused_in_one_line():
    net = Linear(lambda t: (t * 2, t))  # a plain tuple: its parts have no names, so none is guessed
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"^target=None: the model returned a tuple of 2: tensor \(2, 4\), tensor "
                                         r"\(2, 4\), with no class logits"):
        lv.saliency(net, x)
    with pytest.raises(ValueError, match=r"^the model returned a tuple of 2: tensor \(2, 4\), tensor \(2, 4\): a "
                                         r"class target needs"):
        lv.saliency(net, x, target=1)
    with pytest.raises(ValueError, match=r"^classifier target: the model returned a tuple of 2: .* with no 'logits' or 'logits_per_image'; "
                                         r"pass key="):
        targets.classifier(None)(net(x))
    with pytest.raises(ValueError, match=r"^target=None: the model returned a dict with x \(2, 2, 2\), with no class "
                                         r"logits \(logits, logits_per_image\), dense scores, detections or image "
                                         r"embedding"):
        lv.saliency(Linear(lambda t: {"x": t.view(2, 2, 2)}), x)


def test_target_none_on_masks_boxes_and_embeddings_by_hand():
    scores = torch.zeros(2, 3, 2, 2)
    scores[0, 1] = 1.0
    scores[0, 2, 0, 0] = 5.0  # image 0: class 1 wins 3 of 4 pixels -> 1 + 1 + 1
    scores[1, 2] = 2.0  # image 1: class 2 wins all 4 -> 8
    got, what = targets.default({"logits": scores})
    assert what == "the class most pixels get"
    torch.testing.assert_close(got, torch.tensor([3.0, 8.0]))
    queries = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))  # 3 classes + "no object"
    got, _ = targets.default({"logits": queries, "pred_boxes": torch.rand(2, 5, 4)})
    torch.testing.assert_close(got, queries.softmax(-1)[..., :3].flatten(1).max(1).values)
    got, _ = targets.default({"class_queries_logits": queries, "masks_queries_logits": torch.zeros(2, 5, 4, 4)})
    torch.testing.assert_close(got, queries.softmax(-1)[..., :3].flatten(1).max(1).values)
    owl = {"logits": queries, "pred_boxes": torch.rand(2, 5, 4), "text_embeds": torch.zeros(2, 4, 8)}
    torch.testing.assert_close(targets.default(owl)[0], queries.sigmoid().flatten(1).max(1).values)
    mask = torch.tensor([[[1.0, -2.0], [3.0, 4.0]], [[-1.0, -1.0], [-3.0, 2.0]]])  # CLIPSeg: one mask's logits
    torch.testing.assert_close(targets.default({"logits": mask})[0], torch.tensor([8.0, 5.0]))
    dets = [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.3, 0.9])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long(), "scores": torch.zeros(0)}]
    torch.testing.assert_close(targets.default(dets)[0], torch.tensor([0.9, 0.0]))
    emb = torch.tensor([[3.0, 4.0], [0.0, 2.0]], requires_grad=True)
    got, what = targets.default({"image_embeds": emb, "last_hidden_state": torch.zeros(2, 5, 2)})
    torch.testing.assert_close(got, torch.tensor([5.0, 2.0]))  # each embedding's length
    got.sum().backward()
    torch.testing.assert_close(emb.grad, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))  # its own direction, not zero
    model, x = segformer(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = targets.default(model(x))[0]
    sal = lv.saliency(model, x)  # refused before: "the model's logits has shape (2, 3, 8, 8)"
    torch.testing.assert_close(sal.scores, want)


def test_segmentation_target_reads_segformers_logits_upsampled_to_the_mask():
    model = segformer()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = model(x)
    assert out.logits.shape == (2, 3, 8, 8)  # 1/4 of the input
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:20, 8:30] = True
    big = torch.nn.functional.interpolate(out.logits, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(targets.segmentation(2, mask)(out), (big[:, 2] * mask).sum((1, 2)))
    own = out.logits.argmax(1) == 1  # no mask: the pixels the model gives class 1, at its resolution
    torch.testing.assert_close(targets.segmentation(1)(out), (out.logits[:, 1] * own).sum((1, 2)))
    torch.testing.assert_close(targets.segmentation(1)({"out": out.logits}), targets.segmentation(1)(out))
    with pytest.raises(ValueError, match=r"mask \(4, 4\) does not match the scores' \(8, 8\)"):
        targets.segmentation(1, torch.ones(4, 4))(out)
    cam = lv.grad_cam(model, x, target=targets.segmentation(2, mask))
    assert cam.maps.shape == (2, 32, 32) and torch.isfinite(cam.maps).all()
    torch.testing.assert_close(cam.scores, targets.segmentation(2, mask)(out).detach())


def test_detection_target_reads_detr_queries_by_hand():
    # one image, 3 queries, 2 object classes + "no object"
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.5, -1.0]]])
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.7, 0.7, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4]]])  # cx, cy, w, h
    out = {"logits": logits, "pred_boxes": boxes}
    p = logits.softmax(-1)[0]
    # query 0: box (0, 0, .5, .5), class 0 with p[0, 0]; query 2: box (.1, .1, .5, .5), class 1 with p[2, 1]
    t = targets.detection(torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([0]))
    torch.testing.assert_close(t(out), p[0, 0].view(1))
    t = targets.detection(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([1]))  # IoU with query 0: .16/.25
    torch.testing.assert_close(t(out), p[2, 1].view(1))
    t = targets.detection(torch.tensor([[0.6, 0.6, 0.8, 0.8], [0.0, 0.0, 0.5, 0.5]]), torch.tensor([1, 0]))
    torch.testing.assert_close(t(out), p[1, 1].view(1) + p[0, 0])  # query 1: "no object" first, then class 1
    t = targets.detection(torch.tensor([[0.6, 0.6, 0.8, 0.8]]), torch.tensor([0]))
    torch.testing.assert_close(t(out), torch.zeros(1))  # class 0 is not query 1's best object class
    t = targets.detection(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([0]), size=(100, 100))
    torch.testing.assert_close(t(out), p[0, 0].view(1))
    for named in (out, collections.namedtuple("DetrOut", "logits pred_boxes")(logits, boxes)):
        with pytest.raises(ValueError, match="DETR-style boxes are normalised to 0..1; .* or size=\\(H, W\\)"):
            targets.detection(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([0]))(named)
        torch.testing.assert_close(targets.detection(torch.tensor([[0.0, 0.0, 0.5, 0.5]]), 0)(named), p[0, 0].view(1))
    sig = logits.sigmoid()[0]  # a sigmoid head (Conditional / Deformable DETR): every class, no "no object"
    t = targets.detection(torch.tensor([[0.6, 0.6, 0.8, 0.8]]), torch.tensor([2]), no_object=False)
    torch.testing.assert_close(t(out), sig[1, 2].view(1))
    with pytest.raises(ValueError, match=r"^detection target: expected a list of dicts .* got a dict with logits"):
        targets.detection(torch.zeros(1, 4), torch.zeros(1))({"logits": logits})


def detr():
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                         out_features=["stage2"])
    cfg = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                  d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5,
                                  num_labels=3)
    return transformers.DetrForObjectDetection(cfg).eval()


def test_detection_target_on_transformers_detr():
    model = detr()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        out = twin(x)
    p = out.logits.softmax(-1)[..., :-1]
    score, label = p.max(-1)
    cx, cy, w, h = (out.pred_boxes * 64).unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    # image 0: query 3's own box and class; image 1: query 1's
    t = targets.detection([xyxy[0, 3:4], xyxy[1, 1:2]], [label[0, 3:4], label[1, 1:2]], size=(64, 64))
    want = torch.stack([max(score[i, q] for q in range(5) if label[i, q] == label[i, k] and
                            float(targets._iou(xyxy[i, k:k + 1], xyxy[i, q:q + 1])) >= 0.5)
                        for i, k in ((0, 3), (1, 1))])
    torch.testing.assert_close(t(out), want)
    sal = lv.saliency(model, x, t)
    torch.testing.assert_close(sal.scores, want)
    assert sal.maps.shape == x.shape and sal.maps.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model(x).logits, out.logits)


# ----------------------------------------------------------------------------------------------------------------
# inputs as the hubs shape them


def clip():
    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=2)
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=8)).eval()


def clip_inputs():
    g = torch.Generator().manual_seed(5)
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": torch.randint(0, 50, (3, 7),
                                                                                                generator=g)}


def test_clip_takes_its_text_and_attribution_flows_to_the_image():
    model, inputs = clip(), clip_inputs()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        before = twin(**inputs).logits_per_image
    best = targets.classifier(None, key="logits_per_image")  # each image's best-matching text
    sal = lv.saliency(model, inputs, best, absolute=False)  # a dict was refused; x landed in input_ids
    px = inputs["pixel_values"].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(twin(pixel_values=px, input_ids=inputs["input_ids"]).logits_per_image.max(1)
                                  .values.sum(), px)
    torch.testing.assert_close(sal.maps, want)
    torch.testing.assert_close(sal.scores, before.max(1).values)
    same = lv.saliency(lv.with_inputs(model, input_ids=inputs["input_ids"]), inputs["pixel_values"], best,
                       absolute=False)
    torch.testing.assert_close(same.maps, sal.maps)
    # Grad-CAM on the vision tower (the default layer is never in the text tower), by hand
    cam = lv.grad_cam(model, inputs, target=best)
    assert cam.layer.startswith("vision_model.") and cam.low_res.shape == (2, 4, 4)
    layer = dict(twin.named_modules())[cam.layer]
    acts = []
    handle = layer.register_forward_hook(lambda m, a, o: acts.append(o))
    score = twin(**inputs).logits_per_image.max(1).values.sum()
    handle.remove()
    (g,) = torch.autograd.grad(score, acts[0])
    tokens = (g[:, 1:].mean(1, keepdim=True) * acts[0][:, 1:]).sum(-1).clamp_min(0)  # class token dropped
    torch.testing.assert_close(cam.low_res, tokens.view(2, 4, 4).detach())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits_per_image, before)
    assert own_hooks(model) == own_hooks(twin)

class ImageAlone(torch.nn.Module):
    """A peer of the dict path written without lightning_vis.inputs: the image-text model as a function of the image
    alone, its other inputs closed over (every call scores the images against the same texts)."""

    def __init__(self, model, key="pixel_values", read=None, **others):
        super().__init__()
        self.model, self.key, self.others = model, key, others
        self.read = read or (lambda out: out.logits_per_image)

    def forward(self, x):
        return self.read(self.model(**{self.key: x}, **self.others))


PATH_METHODS = {  # small settings; rows (steps, draws, placements) outnumber the images
    "integrated_gradients": lambda m, x, t, **k: lv.integrated_gradients(m, x, t, steps=5, **k),
    "gradient_shap": lambda m, x, t, **k: lv.gradient_shap(m, x, t, samples=3, stdevs=0.1, seed=3, **k),
    "input_x_gradient": lambda m, x, t, **k: lv.input_x_gradient(m, x, t, **k),
    "occlusion": lambda m, x, t, **k: lv.occlusion(m, x, t, window=16, stride=8, **k),
}


@pytest.mark.parametrize("method", PATH_METHODS)
def test_clip_dict_inputs_for_the_path_methods_and_occlusion(method):
    model, inputs = clip(), clip_inputs()  # 2 images, 3 texts: a batch of texts, not one per image
    twin = copy.deepcopy(model)
    run = PATH_METHODS[method]
    x, ids = inputs["pixel_values"], inputs["input_ids"]
    with torch.no_grad():
        logits = twin(**inputs).logits_per_image
    got = run(model, inputs, None, chunk_size=3)  # passes of the 2 images (3 rows allowed) against the 3 texts
    want = run(ImageAlone(twin, input_ids=ids), x, None, chunk_size=3)  # passes of 3 rows cut across the images
    torch.testing.assert_close(got.maps, want.maps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.scores, logits.max(1).values)
    assert torch.equal(got.targets, logits.argmax(1)) and got.maps.abs().sum() > 0
    if method == "occlusion":
        torch.testing.assert_close(got.grid, want.grid, atol=1e-5, rtol=1e-5)
    else:
        assert got.maps.shape == x.shape
        if got.delta is not None:  # the completeness error, with the baselines' scores against the same texts
            torch.testing.assert_close(got.delta, want.delta, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.baseline_scores, want.baseline_scores, atol=1e-5, rtol=1e-5)
    if method != "gradient_shap":  # (its draws depend on the batch size: one seeded stream for all inputs)
        for i in range(2):  # one image at a time, against the same texts
            alone = run(model, {"pixel_values": x[i:i + 1], "input_ids": ids}, None)
            torch.testing.assert_close(got.maps[i:i + 1], alone.maps, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits_per_image, logits)
    assert own_hooks(model) == own_hooks(twin)


def test_per_image_prompts_meet_their_images_in_every_pass():
    """CLIPSeg takes one prompt per image: every pass of occlusion's placements is the image batch in its order."""
    torch.manual_seed(0)
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.CLIPSegForImageSegmentation(transformers.CLIPSegConfig(
        vision_config=vit, text_config=text, projection_dim=16, reduce_dim=16, extract_layers=[0, 1],
        decoder_num_attention_heads=2, decoder_intermediate_size=32)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 5, 7, 2], [1, 9, 3, 2]])  # image i's prompt: ids[i]
    mean_logit = lambda out: out.logits.flatten(1).mean(1)  # noqa: E731
    got = lv.occlusion(model, {"pixel_values": x, "input_ids": ids}, mean_logit, window=16, stride=8)
    for i in range(2):
        alone = lv.occlusion(ImageAlone(model, input_ids=ids[i:i + 1], read=lambda out: out.logits), x[i:i + 1],
                             lambda logits: logits.flatten(1).mean(1), window=16, stride=8, chunk_size=1)
        torch.testing.assert_close(got.grid[i:i + 1], alone.grid, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.maps[i:i + 1], alone.maps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"^chunk_size=1: with other inputs \(input_ids\) every pass is the whole "
                                         r"image batch of 2; pass chunk_size=None \(or fewer images\)$"):
        lv.occlusion(model, {"pixel_values": x, "input_ids": ids}, mean_logit, window=16, chunk_size=1)


def test_clip_dict_integrated_gradients_reports_completeness_against_the_same_texts():
    model, inputs = clip(), clip_inputs()
    x, ids = inputs["pixel_values"], inputs["input_ids"]
    ig = lv.integrated_gradients(model, inputs, [2, 0], steps=64, baseline=0.5)
    with torch.no_grad():  # f(x) - f(baseline) by plain forwards, the baseline of the image only
        base = torch.full_like(x, 0.5)
        f_x = model(pixel_values=x, input_ids=ids).logits_per_image[[0, 1], [2, 0]]
        f_b = model(pixel_values=base, input_ids=ids).logits_per_image[[0, 1], [2, 0]]
    torch.testing.assert_close(ig.baseline_scores, f_b)
    torch.testing.assert_close(ig.delta, ig.maps.flatten(1).sum(1) - (f_x - f_b))
    assert ig.delta.abs().max() < 1e-2 * (f_x - f_b).abs().max()  # near-exact with 64 Gauss-Legendre nodes
    # a layer of the vision tower: the path runs between its activations for the baseline and the image
    layer = lv.integrated_gradients(model, inputs, [2, 0], steps=5, layer="vision_model.encoder.layers.0")
    peer = lv.integrated_gradients(ImageAlone(model, input_ids=ids), x, [2, 0], steps=5,
                                   layer="model.vision_model.encoder.layers.0")
    assert layer.maps.shape == (2, 16, 4, 4)
    torch.testing.assert_close(layer.maps, peer.maps, atol=1e-5, rtol=1e-5)


def test_open_clip_image_and_text_through_with_inputs():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, embed_dim=16,
                                   text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
                                   vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8,
                                                   head_width=16)).eval()
    text = torch.randint(1, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def similarity(out):  # (N, texts) image-text logits from open_clip's (image, text features, logit scale)
        image, texts, scale = out
        return scale * image @ texts.T

    best = lambda out: similarity(out).max(1).values  # noqa: E731
    peer = ImageAlone(model, "image", similarity, text=text)
    for method, run in PATH_METHODS.items():
        got = run(lv.with_inputs(model, image_key="image", text=text), x, best, chunk_size=3)
        want = run(peer, x, lambda out: out.max(1).values, chunk_size=3)
        torch.testing.assert_close(got.maps, want.maps, atol=1e-5, rtol=1e-5, msg=method)
        assert got.maps.abs().sum() > 0, method


def test_clip_attention_maps_are_the_image_towers_only():
    model, inputs = clip(), clip_inputs()
    maps = lv.attention_maps(model, inputs)
    assert sorted(maps) == ["vision_model.encoder.layers.0.self_attn", "vision_model.encoder.layers.1.self_attn"]
    alone = lv.attention_maps(model.vision_model, inputs["pixel_values"])  # the vision tower on its own: a peer
    for name, m in alone.items():
        torch.testing.assert_close(maps["vision_model." + name], m)
    torch.testing.assert_close(lv.attention_rollout(model, inputs),
                               lv.attention_rollout(model.vision_model, inputs["pixel_values"]))
    with pytest.raises(ValueError, match=r"^the attention found \('text_model.encoder.layers.0.self_attn', "
                                         r"\.\.\.\) never sees the image"):
        lv.attention_maps(model, inputs, "text_model.encoder.layers.0.self_attn")


def test_clip_layers_take_the_dict_and_never_place_the_text_on_the_image_grid():
    model, inputs = clip(), clip_inputs()
    inputs["input_ids"] = torch.randint(0, 50, (2, 16))  # 16 text tokens: they would fit a 4x4 grid
    found = {info.name: info for info in lv.layers(model, inputs)}  # a dict crashed inside the hooks
    assert found["vision_model.encoder.layers.1"].layout_text == "tokens 1+4x4"
    for name in ("text_model.embeddings.token_embedding", "text_model.encoder.layers.1", "text_model.final_layer_norm"):
        assert found[name].layout.reason.startswith("not a map: it is not computed from the input's positions (token "
                                                    "ids"), name
    with pytest.raises(ValueError, match=r"^example_input is a dict \(pixel_values, input_ids\): give "
                                         r"lightning_vis.layers the dict"):
        lv.hooks.layers(model, inputs)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    cam = lv.grad_cam(model, inputs)  # target=None: each image's best-matching text, as for a classifier
    torch.testing.assert_close(cam.scores, logits.max(1).values)


def test_clip_image_alone_is_refused_in_one_line_and_dict_batches_scan():
    model, inputs = clip(), clip_inputs()
    calls = {"render": lambda: lv.render(model, ("vision_model.encoder.layers.0", [0]), size=32, steps=1,
                                         progress=False),
             "receptive_field": lambda: lv.receptive_field(model, "vision_model.encoder.layers.0", (3, 32, 32)),
             "deep_dream": lambda: lv.deep_dream(model, inputs["pixel_values"][0], "vision_model.encoder.layers.0",
                                                 steps=1, octaves=1, progress=False),
             "inputs": lambda: lv.grad_cam(model, inputs["pixel_values"])}  # the image landed in input_ids
    for what, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{what}: CLIPModel.forward takes input_ids before its 'pixel_values': "
                                             r"give lightning_vis.with_inputs\(model, input_ids=...\) as the model"):
            call()
    ids = inputs["input_ids"][:2]  # one text per picture in the loader's dicts
    data = [{"pixel_values": inputs["pixel_values"][i], "input_ids": ids[i]} for i in range(2)]
    layer = "vision_model.encoder.layers.1"
    got = lv.top_k_examples(model, torch.utils.data.DataLoader(data, batch_size=2), [layer], k=1, progress=False)
    want = lv.top_k_examples(lv.with_inputs(model, input_ids=ids), torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs["pixel_values"]), batch_size=2), [layer], k=1, progress=False)
    torch.testing.assert_close(got.layers[layer].scores, want.layers[layer].scores)
    assert torch.equal(got.layers[layer].indices, want.layers[layer].indices)


def test_multi_input_misuse_is_refused_in_one_line():
    model, inputs = clip(), clip_inputs()
    with pytest.raises(ValueError, match=r"^inputs is a dict with image \(2, 3, 32, 32\), input_ids \(3, 7\): a dict "
                                         r"of inputs needs the image batch under 'pixel_values'"):
        lv.grad_cam(model, {"image": inputs["pixel_values"], "input_ids": inputs["input_ids"]})
    with pytest.raises(ValueError, match="image_key must name the image keyword and not be one of the other inputs"):
        lv.with_inputs(model, image_key="input_ids", input_ids=inputs["input_ids"])
    acts, out = lv.activations(model, inputs, "vision_model.encoder.layers.1")
    assert list(acts) == ["vision_model.encoder.layers.1"] and out.logits_per_image.shape == (2, 3)


# ----------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_builds_a_transformers_model_from_a_local_folder_or_config(tmp_path, capsys):
    from PIL import Image

    from lightning_vis import cli

    labels = {0: "cat", 1: "dog", 2: "emu"}
    small = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        **small, id2label=labels, label2id={v: k for k, v in labels.items()})).eval()
    model.save_pretrained(tmp_path / "vit")
    transformers.ViTConfig(**small).save_pretrained(tmp_path / "config-only")  # names no model class
    Image.fromarray(torch.randint(0, 255, (40, 36, 3), generator=torch.Generator().manual_seed(0))
                    .numpy().astype("uint8")).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert cli.main(["cam", "--model", f"hf:{tmp_path / 'vit'}", "--images", str(tmp_path / "a.png"), "--size", "32",
                     "--out", str(out)]) == 0
    x, _ = cli.load_image(tmp_path / "a.png", None, 32)
    with torch.no_grad():
        logits = model(x[None]).logits[0]  # the saved weights were loaded: the same scores
    report = json.loads((out / "gradcam.json").read_text())["a.png"]
    assert report["class"] == int(logits.argmax()) and report["name"] == labels[report["class"]]
    assert report["score"] == pytest.approx(float(logits.max()), abs=1e-4)
    assert (out / "a_gradcam.png").is_file()
    capsys.readouterr()
    assert cli.main(["layers", "--model", f"hf:ViTForImageClassification:{tmp_path / 'config-only' / 'config.json'}",
                     "--input-size", "3,32,32"]) == 0
    assert "vit.layers.1.layernorm_before" in capsys.readouterr().out
    assert cli.main(["layers", "--model", "hf:google/vit-base-patch16-224"]) == 2
    assert "never downloads" in capsys.readouterr().err
    assert cli.main(["layers", "--model", f"hf:{tmp_path / 'config-only'}"]) == 2  # a config alone: which class?
    assert "the config names no model classes (architectures): name one" in capsys.readouterr().err
