"""Pooling geometry in Python: argument normalisation, output sizes and torch's checks.

Mirrors csrc/pool_common.cpp (same rules, same messages) for the fake kernels, the reference
implementation and the wrappers, which must reject what the compiled kernels reject.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Ints = tuple[int, ...]
SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, T, H, W)"}


def _tuple(v, nd: int, name: str, op: str) -> Ints:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return v * nd
    if len(v) != nd:
        raise RuntimeError(f"{op}: {name} must be one int or {nd} ints for a {nd}D pool, got {len(v)} values")
    return v


def spatial_dims(kernel_size, spatial_dims: int | None, rank: int, op: str) -> int:
    """Number of pooled dims: from spatial_dims, a sequence kernel_size, or a batched input's rank."""
    if isinstance(kernel_size, Sequence):
        nd = len(kernel_size)
        if spatial_dims is not None and spatial_dims != nd:
            raise RuntimeError(f"{op}: kernel_size {tuple(kernel_size)} has {nd} values but "
                               f"spatial_dims={spatial_dims}")
    elif spatial_dims is not None:
        nd = spatial_dims
    else:
        nd = rank - 2
    if nd not in (1, 2, 3):
        raise RuntimeError(
            f"{op}: cannot tell a 1D, 2D or 3D pool from an int kernel_size and an input of rank {rank}; "
            "pass kernel_size as a tuple or spatial_dims=1, 2 or 3")
    return nd


def normalize(kernel_size, stride, padding, dilation, nd: int, op: str) -> tuple[Ints, Ints, Ints, Ints]:
    k = _tuple(kernel_size, nd, "kernel_size", op)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _tuple(stride, nd, "stride", op)
    return k, s, _tuple(padding, nd, "padding", op), _tuple(dilation, nd, "dilation", op)


def pooled_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def pooled_shape(op: str, shape: Sequence[int], k: Ints, s: Ints, p: Ints, d: Ints, ceil_mode: bool,
                 check_output: bool = True) -> list[int]:
    """Checks a batched input shape and pool parameters as torch does; returns the pooled shape."""
    nd = len(k)
    if len(shape) != nd + 2:
        raise RuntimeError(f"{op}: a {nd}D pool expects a batched input of shape {SHAPES[nd]} (rank {nd + 2}), "
                           f"got shape {list(shape)} (rank {len(shape)})")
    for i in range(nd):
        if k[i] <= 0:
            raise RuntimeError(f"{op}: kernel_size must be greater than zero, but got kernel_size={k}")
        if s[i] <= 0:
            raise RuntimeError(f"{op}: stride must be greater than zero, but got stride={s}")
        if d[i] <= 0:
            raise RuntimeError(f"{op}: dilation must be greater than zero, but got dilation={d}")
        if p[i] < 0:
            raise RuntimeError(f"{op}: padding must be non-negative, but got padding={p}")
        if p[i] > k[i] // 2:
            raise RuntimeError(f"{op}: pad should be at most half of effective kernel size, but got pad={p[i]}, "
                               f"kernel_size={k[i]} and dilation={d[i]}")
    if shape[1] <= 0:
        raise RuntimeError(f"{op}: expected a non-empty channel dim, got input of shape {list(shape)}")
    spatial = list(shape[2:])
    if any(v <= 0 for v in spatial):
        raise RuntimeError(f"{op}: expected non-empty spatial dims, got input of shape {list(shape)}")
    out = [pooled_size(spatial[i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(nd)]
    for i in range(nd if check_output else 0):
        if out[i] < 1:
            size = "x".join(map(str, [shape[1], *spatial]))
            osize = "x".join(map(str, [shape[1], *out]))
            raise RuntimeError(f"{op}: Given input size: ({size}). Calculated output size: ({osize}). Output size is "
                               f"too small: the window (kernel_size {k[i]}, dilation {d[i]}) is larger than the "
                               "padded input")
    return [shape[0], shape[1], *out]


def switch_dtype(window: int) -> torch.dtype:
    """uint8 when a window has at most 255 cells, int32 otherwise."""
    return torch.uint8 if window <= 255 else torch.int32


def window(k: Ints) -> int:
    return math.prod(k)


def default_unpooled_size(pooled: Sequence[int], k: Ints, s: Ints, p: Ints, d: Ints) -> list[int]:
    """The input size torch's max_unpool assumes when output_size is not given."""
    return [(o - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1 for i, o in enumerate(pooled)]


def unpool_geometry_ok(op: str, values_shape, output_size, k, s, p, d) -> None:
    """Checks that values of values_shape can come from pooling an input of output_size (floor or ceil mode)."""
    in_shape = [values_shape[0], values_shape[1], *output_size]
    floor = pooled_shape(op, in_shape, k, s, p, d, False, check_output=False)
    if list(values_shape) != floor and list(values_shape) != pooled_shape(op, in_shape, k, s, p, d, True, False):
        raise RuntimeError(f"{op}: a pooled shape of {list(values_shape)} cannot come from pooling an input of shape "
                           f"{in_shape} (that gives {floor}); pass the pooled input's size as output_size")


def is_channels_last_dense(t: torch.Tensor) -> bool:
    return t.movedim(1, -1).is_contiguous()


def pick_channels_last(t: torch.Tensor) -> bool:
    """The layout the kernels compute in (and return): planar unless the tensor is channels-last dense only."""
    return not t.is_contiguous() and is_channels_last_dense(t)


def empty_in_layout(shape: Sequence[int], channels_last: bool, dtype: torch.dtype, device) -> torch.Tensor:
    if not channels_last:
        return torch.empty(list(shape), dtype=dtype, device=device)
    cl = [shape[0], *shape[2:], shape[1]]
    return torch.empty(cl, dtype=dtype, device=device).movedim(-1, 1)
