"""Pure-torch references of the compiled operators: the one truth that tests and benchmarks compare with,
and the fallback when the extension is missing. Arguments are batched and normalised (tuples of nd ints)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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


# ----------------------------------------------------------------------------------------------------------------
# impute: ROAD's linear imputer (every unknown pixel the weighted mean of its 8 neighbours), batched CG + multigrid

COARSEST = 100  # points of the multigrid's coarsest grid, solved exactly


def _ones121(x: Tensor) -> Tensor:
    """(1 2 1) x (1 2 1) sums over each pixel's 3x3 neighbourhood, zero outside: (..., H, W) -> (..., H, W), by two
    in-place passes (on a CPU 1.2x faster than a depthwise convolution at 3 planes and 5x at 27, and 2.5x faster
    than shifted slices of a padded copy)."""
    y = x * 2
    y[..., 1:, :] += x[..., :-1, :]
    y[..., :-1, :] += x[..., 1:, :]
    z = y * 2
    z[..., 1:] += y[..., :-1]
    z[..., :-1] += y[..., 1:]
    return z


def _stencil(x: Tensor) -> Tensor:
    """The weighted sum over each pixel's 8 neighbours (1/6 across, 1/12 diagonal; zero outside the image), as
    pytorch-grad-cam's imputer weighs them: (..., H, W) -> (..., H, W); the weights are (1 2 1) x (1 2 1) / 12
    less the centre's 1/3."""
    return _ones121(x).div_(12).sub_(x, alpha=1 / 3)


def impute(images: Tensor, known: Tensor, tol: float, max_iter: int, check: int = 1) -> Tensor:
    """ROAD's linear imputer (lightning_vis.ops.impute): images (B, C, H, W) with the pixels where known (B, H, W) is
    False solved for, all B x C systems at once, by conjugate gradients preconditioned with a multigrid V-cycle
    (`_Multigrid`), each (image, channel) system with its own step sizes, to a relative residual of `tol`; the
    residuals are read (a host sync) every `check` steps. The compiled CPU kernel runs the same algorithm."""
    k = known[:, None].to(images.dtype)
    # the known values, zero elsewhere (not images * k: a NaN at a removed pixel must not be read)
    v = torch.where(known[:, None], images, torch.zeros((), dtype=images.dtype, device=images.device))
    u = 1 - k
    d = _stencil(torch.ones_like(k[:1])).add_(1 / 3)  # the weights of the neighbours inside the image, + 1/3

    def op(p):  # the system's operator, right on the unknown pixels (what the known ones get is never read)
        return (d * p).sub_(_ones121(p), alpha=1 / 12)

    b = _stencil(v) * u  # what the known neighbours contribute
    mg = _Multigrid(u, op, 2 * d - 2 / 3)
    x = torch.zeros_like(v)
    r = b
    p = z = mg(r)
    rz = (r * z).sum((2, 3), keepdim=True)
    bn = b.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(1e-30)
    for step in range(max_iter):
        if step % check == 0 and bool(((r.pow(2).sum((2, 3), keepdim=True).sqrt() / bn) <= tol).all()):
            break
        ap = op(p).mul_(u)
        alpha = rz / (p * ap).sum((2, 3), keepdim=True).clamp_min(1e-30)
        x.addcmul_(alpha, p)
        r = r.addcmul(alpha, ap, value=-1)
        z = mg(r)
        rz_new = (r * z).sum((2, 3), keepdim=True)
        p = z.addcmul_(rz_new / rz.clamp_min(1e-30), p)
        rz = rz_new
    return x.mul_(u).add_(v)


def _restrict(r: Tensor, u: Tensor) -> Tensor:
    """The adjoint of `_prolong`: (B, C, H, W) residuals on the unknown pixels u -> (B, C, H // 2 + 1, W // 2 + 1)."""
    c = r * u
    for dim in (2, 3):
        n = c.shape[dim]
        odd = c.narrow(dim, 1, n - 1)[(slice(None),) * dim + (slice(None, None, 2),)]  # fine points 2j + 1
        c = torch.cat([c[(slice(None),) * dim + (slice(None, None, 2),)], c.new_zeros(1).expand(
            *c.shape[:dim], 1 - n % 2, *c.shape[dim + 1:])], dim)  # fine points 2j, and one past an even grid
        c.narrow(dim, 1, odd.shape[dim]).add_(odd, alpha=0.5)
        c.narrow(dim, 0, odd.shape[dim]).add_(odd, alpha=0.5)
    return c


def _prolong(x: Tensor, u: Tensor) -> Tensor:
    """Bilinear interpolation of a coarse grid onto the unknown fine pixels u: coarse point j sits on fine point 2j,
    and the coarse grid reaches one point past an even-sized fine grid, so that its last row and column are
    interpolated as fully as the others (without it, smooth errors along the image's bottom and right edges,
    where the system has no known pixel, were left to the smoother: 25-29 steps on ROAD's masks instead of 6)."""
    for dim, n in ((2, u.shape[2]), (3, u.shape[3])):
        m = x.shape[dim]
        y = x.new_empty(*x.shape[:dim], 2 * m - 1, *x.shape[dim + 1:])
        y[(slice(None),) * dim + (slice(None, None, 2),)] = x
        y[(slice(None),) * dim + (slice(1, None, 2),)] = (x.narrow(dim, 0, m - 1) + x.narrow(dim, 1, m - 1)) * 0.5
        x = y.narrow(dim, 0, n)
    return x * u


def _apply9(coef: Tensor, x: Tensor) -> Tensor:
    """A 9-point stencil with coefficients per pixel, coef (B, 9, h, w) (offset (dy, dx) at 3 (dy + 1) + dx + 1),
    applied to x (B, C, h, w), zero outside."""
    h, w = x.shape[2:]
    p = F.pad(x, (1, 1, 1, 1))
    out = coef[:, 4:5] * x
    for j in (0, 1, 2, 3, 5, 6, 7, 8):
        dy, dx = divmod(j, 3)
        out.addcmul_(coef[:, j:j + 1], p[..., dy:dy + h, dx:dx + w])
    return out


def _dense(coef: Tensor, active: Tensor) -> Tensor:
    """The (B, n, n) matrices of 9-point stencils coef (B, 9, h, w) on n = h * w points, with inactive points'
    rows and columns the identity's."""
    b, _, h, w = coef.shape
    idx = torch.arange(h * w, device=coef.device).view(h, w)
    a = torch.diag_embed(1 - active.flatten(1))
    for j in range(9):
        dy, dx = divmod(j, 3)
        ys, xs = slice(max(0, 1 - dy), h - max(0, dy - 1)), slice(max(0, 1 - dx), w - max(0, dx - 1))
        rows = idx[ys, xs].flatten()
        cols = idx[max(0, dy - 1):h + min(0, dy - 1), max(0, dx - 1):w + min(0, dx - 1)].flatten()
        a[:, rows, cols] += coef[:, j, ys, xs].flatten(1)
    return a


class _Multigrid:
    """One symmetric multigrid V-cycle for the imputer's system, the preconditioner of `_solve` (a fixed SPD linear
    map, as conjugate gradients need). Coarse levels are Galerkin (R A P, bilinear P on the unknown pixels, R its
    adjoint), so every coarse operator stays symmetric positive semidefinite whatever the mask; their 9-point
    stencils, one per job, are read off by probing with the 9 colours of a 3x3 tiling. Smoother: l1-Jacobi scaled
    by 4/3 (convergent for any symmetric operator: the l1 row sums bound its spectrum), two sweeps before and
    after; the coarsest grid (<= COARSEST points) is solved exactly (its pseudo-inverse, in float64). Steps: about
    7 for 1e-5 on ROAD's masks at 224 px (plain Jacobi-CG needs hundreds)."""

    def __init__(self, u: Tensor, op: Callable[[Tensor], Tensor], l1: Tensor):
        self.levels = [(u, op, u / l1 * (4 / 3))]
        while u.shape[2] * u.shape[3] > COARSEST:
            u, coef = self._coarsen(u, op)
            l1 = coef.abs().sum(1, keepdim=True).where(u > 0, torch.ones_like(u))

            def op(x, coef=coef):
                return _apply9(coef, x)

            self.levels.append((u, op, u / l1 * (4 / 3)))
        self.coarsest = torch.linalg.pinv(_dense(coef, u).double(), hermitian=True).to(u.dtype) \
            if len(self.levels) > 1 else None

    @staticmethod
    def _coarsen(u: Tensor, op: Callable) -> tuple[Tensor, Tensor]:
        """The coarse grid's active points (B, 1, h, w) and its operator's stencils (B, 9, h, w)."""
        b = u.shape[0]
        h, w = u.shape[2] // 2 + 1, u.shape[3] // 2 + 1
        i = torch.arange(h, device=u.device)[:, None] % 3
        j = torch.arange(w, device=u.device)[None] % 3
        probes = ((i * 3 + j)[None] == torch.arange(9, device=u.device)[:, None, None]).to(u.dtype)
        y = _restrict(op(_prolong(probes[None].expand(b, 9, h, w), u)), u)  # (B, 9 colours, h, w)
        # the coefficient of offset (dy, dx) at a point is the response to the colour of that neighbour
        coef = torch.cat([y.gather(1, (((i + dy) % 3) * 3 + (j + dx) % 3)[None, None].expand(b, 1, h, w))
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 1)
        active = (coef[:, 4:5] > 0).to(u.dtype)  # coarse points that reach an unknown fine pixel
        return active, coef * active

    def __call__(self, r: Tensor, level: int = 0) -> Tensor:
        u, op, w = self.levels[level]
        if level and level == len(self.levels) - 1:
            b, c, h, n = r.shape
            return (self.coarsest[:, None] @ r.reshape(b, c, h * n, 1)).view(b, c, h, n) * u
        x = w * r
        for _ in range(19 if level == len(self.levels) - 1 else 0):  # a grid too small to coarsen: Jacobi alone
            x.addcmul_(w, r - op(x))
        if level == len(self.levels) - 1:
            return x
        x += _prolong(self(_restrict(r - op(x), u), level + 1), u)
        for _ in range(1):
            x.addcmul_(w, r - op(x))
        return x
