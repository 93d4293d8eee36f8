"""Occlusion (Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", section 4.2): a window of
baseline values slides over the input's grid (1D, 2D images, 3D clips: every spatial axis of an (N, C, *grid)
input, all channels at once) and the model runs on every placement.

Two pictures, as in their figure 7: ``grid``, the value with the window at each placement (the target's score or
probability, or with ``unit=(layer, channel)`` the total activation of one feature map), and ``maps``, per input
position the mean drop of that value over the placements that cover it (captum's Occlusion, which this equals for a
window spanning all channels). All placements of all inputs are rows of one batch, run in chunks sized from a memory
budget (``chunk_size=`` overrides it), without gradients. A multi-input model (CLIP) takes a dict of its inputs
(lightning_vis.inputs): the image alone is occluded, and every pass is one placement of every image in their order,
with the other inputs as they are.

Token grids (``patches=``): on a ViT / DeiT / Swin the window and stride count patches, and the window covers whole
patches, so each token is occluded or not. The occluder is baseline pixels over those patches, not a baseline token
put in place of their tokens: a token has no "absent" value the model defines (zeros are not neutral after the
patch embedding's bias and the position embedding added later; only models trained with masking, BEiT / MAE, have a
mask token), while baseline pixels go through the model's own patch and position embeddings, so the occluded input
is one the model can take, the baselines mean what they mean for a conv net, and any model with a patch grid (Swin's
too) works without hooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..hooks import ModelGuard, capture, resolve_layers
from ..hooks.checkpoint import budget_bytes
from ..inputs import ImageInputs, image_model
from ._common import Attribution, FastForward, Target, _check_batch, check_target, first_target, target_scores
from ._incremental import incremental
from .gradients import make_baselines, pass_rows

OUTPUTS = ("score", "probability")


@dataclass
class OcclusionMap(Attribution):
    """maps: (N, *input grid) mean drop of the value over the windows covering each position; grid: (N, *placements)
    the value with the window at each placement; scores: (N,) the value of the whole input; window / stride per
    axis; starts: each axis's window starts (the last window may be cut by the edge); unit: (layer, channel) or
    None (the target's score / probability)."""

    grid: Tensor | None = None
    window: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    starts: tuple[Tensor, ...] = ()
    unit: tuple[str, int] | None = None
    patch: tuple[int, ...] | None = None

    def _heat(self) -> Tensor:
        return self.maps


def _per_axis(value, dims: int, what: str) -> tuple[int, ...]:
    vals = (value,) * dims if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(vals, Sequence) or len(vals) != dims or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in vals):
        raise ValueError(f"{what} must be a positive integer or one per spatial axis ({dims}), got {value!r}")
    return tuple(vals)


def placement_counts(size: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> list[int]:
    """Per axis, how many windows `placements` puts there (the last one reaching the edge)."""
    return [math.ceil(max(n - w, 0) / s) + 1 for n, w, s in zip(size, window, stride)]


def placements(size: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> list[Tensor]:
    """Per axis, an (placements, size) 0/1 matrix: which positions each window covers (captum's shifts: starts
    0, s, 2s, ... up to the first window that reaches the edge)."""
    out = []
    for n, w, s, count in zip(size, window, stride, placement_counts(size, window, stride)):
        starts = torch.arange(count) * s
        pos = torch.arange(n)
        out.append(((pos >= starts[:, None]) & (pos < starts[:, None] + w)).float())
    return out


@torch.no_grad()
def occlusion(model: nn.Module, inputs: Tensor, target: Target = None, *, window, stride=None, baseline=0.0,
              output: str = "score", unit: tuple[str, int] | None = None, chunk_size: int | None = None,
              memory_budget: int | None = None, layout=None, grid=None, patches=None) -> OcclusionMap:
    """Zeiler and Fergus' occlusion experiment on (N, C, *grid) inputs. window / stride: an int or one per spatial
    axis (stride default: half the window, at most the window); baseline: the occluder's values, a number (default
    0), "zeros", "blur", "uniform" or a tensor (as integrated_gradients' baseline). output: "score" (the target's,
    as lightning_vis' other methods take targets) or "probability" (its softmax over (N, classes) logits). unit:
    (layer, channel): the total activation of that feature map instead (the layer placed by hooks.layout; layout= /
    grid= override it). patches: window and stride count patches of this size (an int, one per axis, or "auto":
    the kernel of the model's patch embedding, its first convolution with kernel == stride); maps stay in pixels,
    grid / starts are per placement (starts in pixels)."""
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    check_target(target)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
    dims = inputs.dim() - 2
    if dims < 1:
        raise ValueError(f"occlusion needs inputs with spatial axes (N, C, *grid), got {tuple(inputs.shape)}")
    size = tuple(inputs.shape[2:])
    window = _per_axis(window, dims, "window")
    stride = tuple(max(1, w // 2) for w in window) if stride is None else _per_axis(stride, dims, "stride")
    patch = None if patches is None else _patch_size(model, patches, dims, size)
    if patch is not None:  # in pixels from here on
        window, stride = tuple(w * p for w, p in zip(window, patch)), tuple(s * p for s, p in zip(stride, patch))
    for w, s, n in zip(window, stride, size):
        if w > n:
            unit_note = "" if patch is None else f" (in pixels: patches of {patch})"
            raise ValueError(f"window {window} is larger than the input's grid {size}{unit_note}")
        if s > w:
            raise ValueError(f"stride {stride} is larger than the window {window}: positions between windows would "
                             "never be occluded")
    forward = model
    if unit is not None:
        value = _unit_value(model, unit, layout, grid, inputs)
    else:
        if output == "probability" and callable(target) and not isinstance(target, Tensor):
            raise ValueError("output='probability' needs a class target (softmax over (N, classes) logits); a "
                             "callable target gives scores: use output='score'")

        def read(out, t):
            if output == "probability":
                if not isinstance(out, Tensor) or out.dim() != 2:
                    raise ValueError("output='probability' needs a model returning (N, classes) logits; pass "
                                     "output='score'")
                out = out.softmax(1)
            return target_scores(out, t)

        def value(x, t):
            return read(forward(x), t)
    with ModelGuard(model, eval=True):
        b = make_baselines(inputs, baseline)
        if unit is None:  # the reference pass too: every score of a drop from the same computation
            forward = FastForward(model, inputs[:1], lambda out: read(out, first_target(target))[0])
        reference, classes = value(inputs, target)

        def row_targets(i):
            return target if classes is None else classes[i]

        cover = [m.to(inputs.device) for m in placements(size, window, stride)]
        counts = [m.shape[0] for m in cover]
        inc, place = None, occluded
        if unit is None and not (isinstance(model, ImageInputs) and model.others):
            inc = incremental(forward, inputs, b, cover, lambda out, i: read(out, row_targets(i))[0])
        size_rows = pass_rows(model, inputs, chunk_size, memory_budget, grads=False,
                              cost=None if inc is None else inc.cost)
        if inc is not None and inc.start(chunk_size, budget_bytes(inputs.device, memory_budget)):
            forward, place = inc, inc.place  # the first layers run the window's receptive field alone
        at, = sweep(inputs, b, cover, size_rows,
                    lambda x, i: (value(x, row_targets(i))[0],), place)  # (N, *placements)
        drop = reference.view(-1, *[1] * dims) - at
        total, weight = drop, torch.ones((), device=inputs.device)
        for axis, m in enumerate(cover):  # sum over placements of drop x window, one axis at a time
            total = torch.tensordot(total, m, dims=([1], [0]))  # the axis contracted moves to the end
            weight = weight[..., None] * m.sum(0)
        maps = total / weight
    starts = tuple(torch.arange(c) * s for c, s in zip(counts, stride))
    return OcclusionMap(maps, classes, reference, "occlusion", grid=at, window=window, stride=stride, starts=starts,
                        unit=None if unit is None else (unit[0], int(unit[1])), patch=patch)


def _patch_size(model: nn.Module, patches, dims: int, size: tuple[int, ...]) -> tuple[int, ...]:
    """The patch size in pixels per axis: given, or "auto" from the model's patch embedding; refused where the
    input's grid does not split into whole patches."""
    if patches == "auto":
        conv = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
        if conv is None or tuple(conv.kernel_size) != tuple(conv.stride) or len(conv.kernel_size) != dims:
            raise ValueError("patches='auto' needs a model whose first convolution is a patch embedding (kernel == "
                             "stride, one per spatial axis); pass the patch size")
        patch = tuple(conv.kernel_size)
    else:
        patch = _per_axis(patches, dims, "patches")
    if any(n % p for n, p in zip(size, patch)):
        raise ValueError(f"the input's grid {size} does not split into whole patches of {patch}")
    return patch


def occluded(inputs: Tensor, baselines: Tensor, cover: list[Tensor], rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of the placement batch: row r is input r % N with window placement r // N (row-major over the axes'
    placements, `cover` as :func:`placements` gives them) filled with the baselines. Returns (x, the input of each
    row)."""
    n, dims, size = inputs.shape[0], inputs.dim() - 2, tuple(inputs.shape[2:])
    counts = [m.shape[0] for m in cover]
    k, i = rows // n, rows % n
    mask = torch.ones(len(rows), *size, dtype=torch.bool, device=inputs.device)
    rest = k
    for axis in reversed(range(dims)):
        idx, rest = rest % counts[axis], rest // counts[axis]
        shape = [len(rows)] + [1] * dims
        shape[1 + axis] = size[axis]
        mask &= cover[axis][idx].bool().view(shape)
    return torch.where(mask[:, None], baselines[i], inputs[i]), i


def sweep(inputs: Tensor, baselines: Tensor, cover: list[Tensor], rows_per_pass: int, fn,
          place=occluded) -> tuple[Tensor, ...]:
    """Every placement of every input, as rows of passes of rows_per_pass: fn(x, i) -> a tuple of (rows, ...)
    values per pass (x, i: place(inputs, baselines, cover, rows): the occluded rows, or what an incremental
    forward takes for them, and each row's input); each value comes back as (N, *placements, ...)."""
    counts = [m.shape[0] for m in cover]
    n, total = inputs.shape[0], inputs.shape[0] * math.prod(counts)
    parts = []
    for r0 in range(0, total, rows_per_pass):
        rows = torch.arange(r0, min(r0 + rows_per_pass, total), device=inputs.device)
        parts.append(fn(*place(inputs, baselines, cover, rows)))
    return tuple(torch.cat(v).view(*counts, n, *v[0].shape[1:]).movedim(len(counts), 0) for v in zip(*parts))


def layer_maps(model, layer, layout=None, grid=None, what: str = "unit="):
    """(name, run): run(x) -> (the layer's output as (rows, C, *grid) maps, the model's output), one forward pass
    (the layer placed by hooks.layout; layout= / grid= override it). The layer must run once per pass."""
    found = resolve_layers(model, layer)
    if len(found) != 1:
        raise ValueError(f"{what} names one layer; {layer!r} names {len(found)}: {', '.join(found)}")
    name = next(iter(found))

    def run(x):
        with capture(model, name, layouts=True, layout=layout, grid=grid) as tap:
            out = model(x)
        got = tap.values.get(name, [])
        if len(got) != 1:
            raise ValueError(f"layer {name!r} ran {len(got)} times in one forward pass; {what} needs a layer that "
                             "runs once")
        return tap.maps(name), out

    return name, run


def _unit_value(model, unit, layout, grid, inputs):
    """value(x, target) -> (total activation of the unit's feature map per row, None)."""
    if not (isinstance(unit, (tuple, list)) and len(unit) == 2 and isinstance(unit[1], int)
            and not isinstance(unit[1], bool)):
        raise ValueError(f"unit must be (layer, channel), got {unit!r}")
    name, run = layer_maps(model, unit[0], layout, grid)
    channel = unit[1]

    def value(x, target):
        maps = run(x)[0]
        if not 0 <= channel < maps.shape[1]:
            raise ValueError(f"channel {channel} out of range for {name!r}, which has {maps.shape[1]} channels")
        return maps[:, channel].flatten(1).sum(1), None

    return value


__all__ = ["OcclusionMap", "occlusion", "placements"]
