"""Pure-torch references of the compiled operators: the one truth that tests and benchmarks compare with,
and the fallback when the extension is missing. Arguments are batched and normalised (tuples of nd ints)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _geometry as geo

_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _out_grid(pooled: Sequence[int], s, p, device) -> list[torch.Tensor]:
    """Per dim, the window start o * s - p of every pooled position, broadcastable over (..., *pooled)."""
    nd = len(pooled)
    grids = []
    for i, o in enumerate(pooled):
        shape = [1] * nd
        shape[i] = o
        grids.append((torch.arange(o, device=device) * s[i] - p[i]).view(shape))
    return grids


def _positions(switches: torch.Tensor, nd: int, k, s, p, d) -> list[torch.Tensor]:
    """Per dim, the input coordinate each switch points at (int64, shaped like switches)."""
    sw = switches.long()
    starts = _out_grid(sw.shape[sw.dim() - nd:], s, p, sw.device)
    taps, rest = [], sw
    for i in reversed(range(nd)):
        taps.append(rest % k[i])
        rest = rest // k[i]
    taps.reverse()
    return [starts[i] + taps[i] * d[i] for i in range(nd)]


def switches_to_indices(switches: torch.Tensor, input_size: Sequence[int], kernel_size, stride=None, padding=0,
                        dilation=1) -> torch.Tensor:
    """Switches (offsets inside each window) -> torch's int64 flat indices into each (N, C) plane of the input.

    switches: (..., *pooled) with nd = len(input_size) trailing pooled dims; returns int64 of the same shape,
    equal to what ``F.max_poolNd(..., return_indices=True)`` gives.
    """
    nd = len(input_size)
    k, s, p, d = geo.normalize(kernel_size, stride, padding, dilation, nd, "switches_to_indices")
    flat = torch.zeros(switches.shape, dtype=torch.long, device=switches.device)
    for i, pos in enumerate(_positions(switches, nd, k, s, p, d)):
        flat = flat * input_size[i] + pos
    return flat


def indices_to_switches(indices: torch.Tensor, input_size: Sequence[int], kernel_size, stride=None, padding=0,
                        dilation=1) -> torch.Tensor:
    """torch's int64 flat indices -> switches (offset inside each window, uint8 or int32).

    Exact inverse of :func:`switches_to_indices` except for a window lying wholly in the padding (possible
    with dilation), where torch's index points outside the input and cannot be read back.
    """
    nd = len(input_size)
    k, s, p, d = geo.normalize(kernel_size, stride, padding, dilation, nd, "indices_to_switches")
    pooled = indices.shape[indices.dim() - nd:]
    starts = _out_grid(pooled, s, p, indices.device)
    rest = indices.long()
    pos = []
    for i in reversed(range(nd)):
        pos.append(rest % input_size[i])
        rest = rest // input_size[i]
    pos.reverse()
    sw = torch.zeros_like(rest)
    for i in range(nd):
        sw = sw * k[i] + (pos[i] - starts[i]) // d[i]
    return sw.to(geo.switch_dtype(geo.window(k)))


def max_pool_with_switches(x: torch.Tensor, k, s, p, d, ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's max-pool with its indices converted to switches."""
    geo.pooled_shape("max_pool_with_switches", x.shape, k, s, p, d, ceil_mode)
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise RuntimeError(f"max_pool_with_switches: input dtype {x.dtype} is not supported; expected float32, "
                           "float64, float16 or bfloat16")
    values, indices = _POOLS[len(k)](x, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
    return values, indices_to_switches(indices, x.shape[2:], k, s, p, d)


def _flat_targets(switches, output_size, k, s, p, d):
    """Flat per-plane targets of the switches, and which of them lie inside the input: a window wholly in the
    padding points outside it (torch does the same) and contributes nothing."""
    pos = _positions(switches, len(output_size), k, s, p, d)
    valid = torch.ones(switches.shape, dtype=torch.bool, device=switches.device)
    flat = torch.zeros(switches.shape, dtype=torch.long, device=switches.device)
    for i, q in enumerate(pos):
        valid &= (q >= 0) & (q < output_size[i])
        flat = flat * output_size[i] + q.clamp(0, output_size[i] - 1)
    return flat.flatten(2), valid.flatten(2), math.prod(output_size)


def unpool(values: torch.Tensor, switches: torch.Tensor, k, s, p, d, output_size: Sequence[int]) -> torch.Tensor:
    """The adjoint of max-pool: scatter-*add* each value to the input cell its switch points at."""
    geo.unpool_geometry_ok("unpool", values.shape, output_size, k, s, p, d)
    if switches.shape != values.shape:
        raise RuntimeError(f"unpool: switches of shape {list(switches.shape)} do not match the pooled shape "
                           f"{list(values.shape)}")
    idx, valid, plane = _flat_targets(switches, output_size, k, s, p, d)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    src = values.flatten(2).to(acc) * valid
    out = torch.zeros(values.shape[0], values.shape[1], plane, dtype=acc, device=values.device)
    out.scatter_add_(2, idx, src)
    return out.to(values.dtype).view(values.shape[0], values.shape[1], *output_size)


def gather_switches(grad: torch.Tensor, switches: torch.Tensor, k, s, p, d) -> torch.Tensor:
    """The adjoint of unpool: read each window's chosen input cell."""
    idx, valid, _ = _flat_targets(switches, grad.shape[2:], k, s, p, d)
    out = grad.flatten(2).gather(2, idx) * valid
    return out.to(grad.dtype).view(switches.shape)


def fft_image(spectrum: torch.Tensor, scale: torch.Tensor, color: torch.Tensor | None, size,
              sigmoid: bool = True) -> torch.Tensor:
    """Pure-torch fft_image: view_as_complex(spectrum) * scale -> irfftn (orthonormal) over the last len(size) dims
    -> / 4 -> colour mixing by `color` (3 channels, when given) -> sigmoid."""
    nd = len(size)
    img = torch.fft.irfftn(torch.view_as_complex(spectrum.contiguous()) * scale, s=list(size),
                           dim=tuple(range(-nd, 0)), norm="ortho") / 4
    if color is not None and color.numel() and img.shape[1] == 3:
        img = torch.einsum("ij,bj...->bi...", color.to(img), img)
    return torch.sigmoid(img) if sigmoid else img
