"""Per input: activation maps of chosen layers (what quiver shows) and the model's top-N predictions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import images as im
from .display import NoPicture, Shows, stack
from .hooks import ModelGuard, capture
from .hooks.layout import Layout, LayoutError, _ByTensor
from .inputs import image_model
from .hooks.resolve import LayerSpec

# The layout (or Unplaceable reason) of every output `activations` returned, for as long as that tensor lives: so
# that activation_grid(acts[name]) draws tokens and channels-last maps on their grid without being told.
_RETURNED = _ByTensor(forget=True)


class LayerOutputs(Shows, dict):
    """{layer: its output as the layer returned it}; ``layouts[layer]``: its Layout (hooks.layout) or the
    Unplaceable reason; ``maps(layer)``: the output as (N, C, *grid) maps (tokens on their grid, channels-last
    moved), LayoutError when it cannot be placed. Shows itself (``show()``, ``save(path)``, notebooks): the
    activation grid of every layer with maps, one below the other, for one input (``index=``, default 0)."""

    def __init__(self, values=(), layouts=None):
        super().__init__(values)
        self.layouts = layouts or {}

    def layout(self, name: str) -> Layout:
        lay = self.layouts.get(name)
        if lay is None:
            raise KeyError(f"no output of layer {name!r}; layers: {', '.join(self)}")
        if not isinstance(lay, Layout):
            raise lay.error()
        return lay

    def maps(self, name: str) -> Tensor:
        maps = self.layout(name).to_maps(self[name])
        if maps.dim() > 2:  # activation_grid(acts.maps(name)) knows them too, (N, C, L) and (N, C, T, H, W) included
            _RETURNED[maps] = Layout("channels_first", tuple(maps.shape[2:]), source="maps")
        return maps

    def _picture(self, index: int = 0, max_filters: int | None = 64) -> Tensor:
        pictures = [activation_grid(self[n], index, max_filters=max_filters, layout=self.layouts[n])
                    for n in self if self.has_maps(n)]
        if not pictures:
            raise NoPicture(f"none of the layers {', '.join(self)} has maps to draw")
        return stack(pictures)

    def has_maps(self, name: str) -> bool:
        """The layer's output has a place on a grid: channels-first / -last maps or tokens (not a vector, not
        unplaceable)."""
        lay = self.layouts.get(name)
        return isinstance(lay, Layout) and lay.kind != "vector"


def activations(model: nn.Module, inputs: Tensor, layers: LayerSpec, *, layout=None,
                grid=None) -> tuple[LayerOutputs, Tensor]:
    """One forward pass in eval mode without gradients; returns ({layer name: its output}, model output).

    Outputs keep their layout: (N, C, L), (N, C, H, W), (N, C, T, H, W), channels-last (N, H, W, C), tokens (N, L, D)
    or (N, features); the returned mapping knows each one's layout (``.layouts``, ``.maps(name)``; layout= / grid=
    override it). A layer called several times in the pass gives its first call (``lightning_vis.capture`` gives
    every call). The model is restored afterwards (training flags, hooks)."""
    model, inputs = image_model(model, inputs)
    with ModelGuard(model, eval=True), torch.no_grad(), \
            capture(model, layers, layouts=True, layout=layout, grid=grid) as tap:
        out = model(inputs)
    got = {name: tap.values[name][0] for name in tap.layers if tap.values.get(name)}
    layouts = {name: tap.tracer.layouts.get(name) for name in got}
    for name, t in got.items():
        if isinstance(t, Tensor) and layouts[name] is not None:
            _RETURNED[t] = layouts[name]
    return LayerOutputs(got, layouts), out


def activation_grid(act: Tensor, index: int = 0, scale: str = "per_image", cmap: str = "viridis",
                    max_filters: int | None = None, ncol: int | None = None,
                    cell: int | tuple[int, int] | None = None, layout: Layout | None = None) -> Tensor:
    """Every filter's map of one input as one coloured grid image (3, H', W').

    act: a layer's output in its own layout. An output of ``activations(...)`` (``acts[name]``) carries its layout:
    tokens and channels-last maps are put on their grid, and an output that cannot be placed is refused with its
    reason. Any other tensor is read as channels-first (N, C, H, W) maps, or needs ``layout`` (e.g.
    ``acts.layout(name)``, or ``Layout("channels_first", grid)`` for (N, C, L) shown as 1-pixel-high strips and
    (N, C, T, H, W) showing their middle frame): a 3-D tensor may be (N, C, L) maps or (N, L, D) tokens, a 5-D one
    channels-first or -last, and neither is guessed. scale: "per_image" (each filter on its own scale) or "shared"
    (one scale: compare filters' strength). cell: the size maps are shown at: an int enlarges narrower maps by a
    whole factor to at least that width; (h, w) resizes every map to exactly that (area average when shrinking).
    Maps are coloured at the smaller of the two sizes (nearest enlargement after colouring gives the same
    picture)."""
    if layout is None:
        layout = _RETURNED.get(act)
        if layout is not None and not isinstance(layout, Layout):
            raise layout.error()
    if layout is not None:
        if layout.kind == "vector":
            raise ValueError(f"activation maps need a grid: a {tuple(act.shape)} vector output has none")
        layout.check(act)
        act = layout.to_maps(act)
    elif act.dim() in (3, 5):
        raise LayoutError(f"activation_grid: a {act.dim()}-D tensor {tuple(act.shape)} of unknown layout (" +
                          ("(N, C, L) maps or (N, L, D) tokens" if act.dim() == 3 else "channels-first or -last") +
                          "); pass layout=acts.layout(name), or the acts[name] that activations() returned")
    if act.dim() not in (3, 4, 5):
        raise ValueError(f"activation maps need (N, C, L), (N, C, H, W) or (N, C, T, H, W), got shape "
                         f"{tuple(act.shape)}")
    if not 0 <= index < act.shape[0]:
        raise IndexError(f"input index {index} out of range for a batch of {act.shape[0]}")
    maps = act[index]
    if maps.dim() == 2:
        maps = maps[:, None, :]
    elif maps.dim() == 4:
        maps = maps[:, maps.shape[1] // 2]
    if max_filters is not None:
        maps = maps[:max_filters]
    maps = im.normalize(maps, scale)
    h, w = maps.shape[-2:]
    if isinstance(cell, int):
        size = (h * -(-cell // w), w * -(-cell // w)) if w < cell else (h, w)
    else:
        size = tuple(cell) if cell is not None else (h, w)
    if size[1] < w:
        maps = F.interpolate(maps[:, None], size=size, mode="area")[:, 0]
    colours = im.colormap(maps, cmap)
    if size[1] > w:
        colours = F.interpolate(colours, size=size, mode="nearest")
    return im.grid(colours, ncol=ncol)


def top_predictions(logits: Tensor, k: int | None = None, class_names: Sequence[str] | None = None):
    """Per input, the k most probable classes as [(class index, name, probability), ...]; softmax over the last
    dim of (N, classes) logits. k defaults to 5 (or all classes when fewer); names default to the index as text."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, classes), got shape {tuple(logits.shape)}")
    n_cls = logits.shape[1]
    k = min(5, n_cls) if k is None else k
    if not 1 <= k <= n_cls:
        raise ValueError(f"k must be between 1 and the number of classes ({n_cls}), got {k}")
    if class_names is not None and len(class_names) != n_cls:
        raise ValueError(f"{len(class_names)} class names for {n_cls} classes")
    probs = logits.detach().float().softmax(-1)
    p, idx = probs.topk(k, dim=-1)
    names = class_names if class_names is not None else [str(i) for i in range(n_cls)]
    return [[(int(i), names[int(i)], float(q)) for q, i in zip(row_p, row_i)] for row_p, row_i in zip(p, idx)]
