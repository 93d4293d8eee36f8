"""Models as the hubs ship them (Hugging Face transformers, built from small configs with random weights): every
method leaves the model as it was, lazily installed hooks included; targets read their outputs; multi-input
models take their other inputs; the CLI builds them from a local folder or a config."""

import copy

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
MODELS = {"segformer": (segformer, lambda: targets.segmentation(1, key="logits")),
          "vit": (vit, lambda: targets.classifier(0, key="logits")),
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
