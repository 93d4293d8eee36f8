"""Attention maps and attention rollout: per attention layer and head, what the class token (or every query) attends
to on the input's grid, from whatever computes the weights (hooks.capture_attention); rollout multiplies the
blocks' weights through the residual paths (Abnar and Zuidema)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..hooks import ModelGuard, capture_attention
from ..hooks.attention import grid_fits, key_layout
from ..hooks.layout import MAX_PREFIX, LayoutError
from ..hooks.resolve import LayerSpec
from ..inputs import image_model, image_modules
from ._common import _check_batch


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def _check_class_token(class_token) -> None:
    if class_token not in ("auto", "first", "none"):
        raise ValueError(f"class_token must be 'auto', 'first' or 'none', not {class_token!r}")


def _attention_records(model, inputs, layers):
    with ModelGuard(model, eval=True), torch.no_grad(), capture_attention(model, layers) as tap:
        model(inputs)
    seen = image_modules(model, inputs)  # a multi-input model: a text tower's attention is not over the image
    records = [r for r in tap.records if seen is None or r.layer in seen]
    if tap.records and not records:
        raise ValueError(f"the attention found ({tap.records[0].layer!r}, ...) never sees the image: name layers of "
                         "the image tower, or none")
    if not records:
        where = "the layers named" if layers is not None else "the model"
        failed = f"; reading them failed: {tap.failures[0]}" if tap.failures else ""
        raise ValueError(f"no attention weights were computed in {where} during the forward pass (looked for "
                         "nn.MultiheadAttention, F.scaled_dot_product_attention and softmax over the last axis)"
                         f"{failed}")
    return records


def attention_maps(model: nn.Module, inputs: Tensor, layers: LayerSpec | None = None, *, class_token: str = "auto",
                   grid=None) -> dict[str, Tensor]:
    """Per attention layer, per head, what the class token attends to on the input's grid: {layer: (N, heads,
    *grid)}; without a class token (Swin, LeViT), the attention each position receives, averaged over the queries.

    Attention from whatever computes it (hooks.capture_attention): nn.MultiheadAttention (torchvision's ViT),
    F.scaled_dot_product_attention (timm's fused attention), explicit softmax (LeViT's biases, MViT's pooled keys on
    their space-time grid); window attention (Swin, MaxViT, MobileViT) placed back on the image grid. layers: the
    modules to watch (default: every module in which attention happens). class_token: "auto" (from the token
    layout), "first" or "none" (mean over queries). A pooling head (SigLIP's MAP head, CLIP's attention pool): its
    one query's map. A decoder (DETR): its cross-attention per object query, (N, heads, queries, *grid); its
    self-attention (queries over queries) is no map of the image. A layer whose attention cannot be placed is left
    out with a warning (an error when none can). grid: the keys' (h, w) / (t, h, w) grid, for the layers it fits
    (0 to hooks.layout.MAX_PREFIX tokens in front of it); the others keep the grid their tokens have."""
    _check_class_token(class_token)
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    records = _attention_records(model, inputs, layers)
    if grid is not None:  # a grid that fits no layer would be ignored everywhere: say so
        counts = sorted({r.weights.shape[-1] for r in records if r.kind == "global"})
        if counts and not any(grid_fits(c, grid) for c in counts):
            raise LayoutError(f"attention_maps: the grid given, {tuple(grid)}, fits none of the layers' key counts "
                              f"({', '.join(map(str, counts))}; a grid with 0 to {MAX_PREFIX} prefix tokens in front)")
    maps, skipped = {}, {}
    for r in records:
        if r.layer in maps or r.layer in skipped:
            continue  # the first call of each module
        try:
            maps[r.layer] = r.received(class_token, grid)
        except ValueError as e:
            skipped[r.layer] = str(e)
    if not maps:
        raise LayoutError(next(iter(skipped.values())))
    if skipped:
        warnings.warn(f"attention_maps: left out {len(skipped)} layer(s): {next(iter(skipped.values()))}",
                      RuntimeWarning, stacklevel=2)
    return maps


def rollout(attentions: Sequence[Tensor], *, head_fusion: str = "mean", discard_ratio: float = 0.0,
            residual: bool = True, keep: int = 1) -> Tensor:
    """Attention rollout (Abnar and Zuidema) of per-block weights [(N, heads, L, L), ...] in forward order:
    heads fused (mean, max or min), optionally the smallest discard_ratio of each row's weights dropped (never
    the first `keep` (prefix) tokens'), residual: A <- (A + I) / 2, rows renormalised, then A_last @ ... @ A_first.
    -> (N, L, L)."""
    if not attentions:
        raise ValueError("rollout needs the weights of at least one attention block")
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', not {head_fusion!r}")
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    fuse = {"mean": lambda w: w.mean(1), "max": lambda w: w.amax(1), "min": lambda w: w.amin(1)}[head_fusion]
    result = None
    for w in attentions:
        a = fuse(w.float())
        if discard_ratio > 0:
            k = int(a.shape[-1] * discard_ratio)
            if k:
                low = a[..., keep:].topk(k, dim=-1, largest=False).indices + keep
                a = a.scatter(-1, low, 0.0)
        if residual:
            a = (a + torch.eye(a.shape[-1], device=a.device)) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def attention_rollout(model: nn.Module, inputs: Tensor, layers: LayerSpec | None = None, *,
                      head_fusion: str = "mean", discard_ratio: float = 0.0, class_token: str = "auto",
                      grid=None) -> Tensor:
    """Attention rollout across the attention blocks (in the order they run) as a map on the input's grid (N, *grid):
    the class token's row of the rolled-out matrix, its prefix tokens dropped (without a class token: the mean row).

    Defined where every block attends over the same tokens (ViT, DeiT, token-mixing models); refused with a clear
    error where it is not: window attention (Swin, MaxViT: attention stays inside windows, there are no token-to-token
    paths to multiply) and attention whose token count changes (MViT's pooling, LeViT's subsampling). Pooling heads
    (one query attending to the tokens: SigLIP's MAP head) and decoders (DETR's object queries) are left out: the
    rollout runs over the tokens' own self-attention (DETR's encoder)."""
    _check_class_token(class_token)
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    everything = _attention_records(model, inputs, layers)
    records = [r for r in everything if not r.role]
    if not records:
        r = everything[0]
        what = {"pool": "a pooling head's (one query attending to the tokens)", "decoder": "a decoder's",
                "sampling": "deformable (over sampling points)"}[r.role]
        raise ValueError(f"attention rollout needs the tokens' own self-attention; the attention of {r.layer!r} is "
                         f"{what}: use attention_maps")
    windowed = [r for r in records if r.kind != "global"]
    if windowed:
        raise ValueError(f"attention rollout is not defined for window attention ({windowed[0].layer!r}: "
                         f"{windowed[0].scheme or 'windows in the batch'}): each block attends inside windows, so "
                         "there are no token-to-token paths to multiply; use attention_maps")
    sizes = [tuple(r.weights.shape[-2:]) for r in records]
    if any(sq != sk for sq, sk in sizes) or len(set(sizes)) > 1:
        changes = " -> ".join(dict.fromkeys(f"{sq}x{sk}" for sq, sk in sizes))
        raise ValueError(f"attention rollout is not defined here: the blocks attend over different token sets "
                         f"({changes} queries x keys: pooling or subsampling); use attention_maps")
    # every block attends over the same tokens: a grid given must fit them (no other layout to fall back on)
    own = records[0].key if grid is None else None
    key = key_layout(sizes[0][1], own, grid, "attention rollout", records[0].why)
    prefix = key.prefix if class_token != "first" else max(1, key.prefix)
    r = rollout([rec.weights for rec in records], head_fusion=head_fusion, discard_ratio=discard_ratio,
                keep=max(prefix, 1))
    row = r[:, 0] if (class_token != "none" and prefix > 0) else r.mean(1)
    return row[:, prefix:].reshape(r.shape[0], *key.grid)
