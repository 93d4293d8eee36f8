"""Models that take more than the image (CLIP: ``pixel_values`` and ``input_ids``): the methods vary, and explain,
the image tensor only; the other inputs are passed to every call as they are.

Two spellings, the same thing underneath:

    lv.grad_cam(clip, {"pixel_values": images, "input_ids": ids}, target=targets.classifier(key="logits_per_image"))
    lv.grad_cam(lv.with_inputs(clip, input_ids=ids), images, ...)        # any method, any image keyword

A dict input names the image ``pixel_values`` (transformers' name); any other image keyword (open_clip's ``image``)
is named with ``with_inputs(model, image_key=...)``. The other inputs are not split with the images: chunk_size=
and SmoothGrad run the image batch in parts against the same other inputs, which is right for CLIP's texts (every
image is scored against every text) and not for per-image inputs (give those methods the whole batch). The methods
that run many rows per image (integrated gradients, GradientShap, input x gradient, occlusion) make every pass the
image batch in its order (one step, draw or placement of every image): right for both kinds.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .hooks import taps
from .hooks.layout import IMAGE_KEY
from .targets import describe


class ImageInputs(nn.Module):
    """``model(**{image_key: x}, **others)`` as a module of the image alone. It shows the model's own modules under
    their own names (layer names, hooks, parameters and the guard all reach the model itself) and owns nothing."""

    def __init__(self, model: nn.Module, image_key: str = IMAGE_KEY, **others):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"with_inputs needs an nn.Module, not {type(model).__name__}")
        if not isinstance(image_key, str) or not image_key or image_key in others:
            raise ValueError(f"image_key must name the image keyword and not be one of the other inputs "
                             f"({', '.join(others) or 'none'}), got {image_key!r}")
        self.model, self.image_key, self.others = model, image_key, others

    def forward(self, x: Tensor):
        return self.model(**{self.image_key: x}, **self.others)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        return self.model.named_modules(memo, prefix, remove_duplicate)

    def image_modules(self, x: Tensor) -> set[str]:
        """The names of the modules whose output depends on the image in a pass on `x` (the vision tower, and what
        mixes it with the other inputs): those of a text tower never do. Gradients decide, so no name is guessed."""
        from .hooks import ModelGuard

        seen: set[str] = set()

        def hook_for(name):
            def hook(module, args, output):
                if _needs_grad(output):
                    seen.add(name)
            return hook

        with ModelGuard(self.model, eval=True, freeze=True), torch.enable_grad():
            handles = [m.register_forward_hook(hook_for(k)) for k, m in self.model.named_modules()]
            try:
                self(x.detach().clone().requires_grad_(True))
            finally:
                for h in handles:
                    h.remove()
        return seen


def _needs_grad(output, depth: int = 0) -> bool:
    if isinstance(output, Tensor):
        return output.requires_grad
    if depth > 3:
        return False
    if isinstance(output, Mapping):
        return any(_needs_grad(v, depth + 1) for v in output.values())
    if isinstance(output, (list, tuple)):
        return any(_needs_grad(v, depth + 1) for v in output)
    fields = getattr(output, "__dataclass_fields__", None)
    return bool(fields) and any(_needs_grad(getattr(output, k, None), depth + 1) for k in fields)


def with_inputs(model: nn.Module, image_key: str = IMAGE_KEY, **others) -> ImageInputs:
    """The model as a function of the image alone, called ``model(**{image_key: image}, **others)``: give it to
    any method with the image batch as `inputs`. Attribution flows to the image only."""
    return ImageInputs(model, image_key, **others)


def image_first(model: nn.Module, what: str = "inputs") -> None:
    """Refuses, in one line, a model whose forward takes other inputs before its image (transformers' CLIPModel,
    CLIPSeg, OWL-ViT: forward(input_ids, pixel_values, ...)): called with the image alone, the image would land in
    input_ids and fail deep inside the model."""
    if isinstance(model, ImageInputs):
        return
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if IMAGE_KEY in names and names[0] != IMAGE_KEY:
        before = ", ".join(names[:names.index(IMAGE_KEY)])
        raise ValueError(f"{what}: {type(model).__name__}.forward takes {before} before its {IMAGE_KEY!r}: give "
                         f"lightning_vis.with_inputs(model, {names[0]}=...) as the model (methods that take inputs "
                         f"also take a dict with the image under {IMAGE_KEY!r})")


def image_model(model: nn.Module, inputs) -> tuple[nn.Module, Tensor]:
    """(model, image batch) for a method: a tensor as it is; a dict of the model's inputs split into the image
    (its 'pixel_values') and the others, which every call passes on unchanged."""
    if isinstance(inputs, Tensor) or not isinstance(inputs, Mapping):
        image_first(model)
        return model, inputs
    image = inputs.get(IMAGE_KEY)
    if not isinstance(image, Tensor):
        raise ValueError(f"inputs is a {describe(dict(inputs))}: a dict of inputs needs the image batch under "
                         f"{IMAGE_KEY!r}; for another image keyword use lightning_vis.with_inputs(model, "
                         "image_key=..., **other_inputs) as the model and pass the image tensor")
    others = {k: v for k, v in inputs.items() if k != IMAGE_KEY}
    return with_inputs(model, IMAGE_KEY, **others), image


def layers(model: nn.Module, example_input, **kwargs) -> list[taps.LayerInfo]:
    """hooks.layers (every submodule the example pass runs, with its output shape and layout) that also takes a
    dict of the model's inputs: only the image (`pixel_values`) counts as the input's positions, so a text tower's
    tokens are never placed on the image's grid."""
    model, x = image_model(model, example_input)
    return taps.layers(model, x, **kwargs)


def image_modules(model: nn.Module, x: Tensor) -> set[str] | None:
    """The modules that see the image (ImageInputs.image_modules), or None for a model of the image alone."""
    return model.image_modules(x) if isinstance(model, ImageInputs) else None


__all__ = ["ImageInputs", "image_first", "image_model", "layers", "with_inputs"]
