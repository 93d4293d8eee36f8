"""Seeded random pooling problems shared by the pooling tests."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
UNPOOL = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}


@dataclass
class Case:
    seed: int
    nd: int
    shape: tuple  # batched (N, C, *spatial)
    k: tuple
    s: tuple
    p: tuple
    d: tuple
    ceil_mode: bool
    layout: str  # contiguous | channels_last | strided
    dtype: torch.dtype
    data: str  # normal | ties | special
    batched: bool

    def __str__(self):
        return (f"seed={self.seed} nd={self.nd} shape={self.shape} k={self.k} s={self.s} p={self.p} d={self.d} "
                f"ceil={self.ceil_mode} {self.layout} {self.dtype} {self.data} batched={self.batched}")

    def make_input(self, device="cpu") -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        if self.data == "ties":  # few distinct values: many ties inside windows
            base = torch.randint(-2, 3, self.shape, generator=g).double()
        else:
            base = torch.randn(self.shape, generator=g, dtype=torch.float64)
        if self.data == "special":  # NaN, +inf and -inf sprinkled in
            u = torch.rand(self.shape, generator=g)
            base[u < 0.04] = float("nan")
            base[(u >= 0.04) & (u < 0.07)] = float("inf")
            base[(u >= 0.07) & (u < 0.12)] = float("-inf")
        x = base.to(self.dtype)
        if self.layout == "channels_last":
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        elif self.layout == "strided":  # every other element of a wider tensor along the last dim
            wide = torch.zeros(*self.shape[:-1], 2 * self.shape[-1], dtype=self.dtype)
            wide[..., ::2] = x
            x = wide[..., ::2]
        x = x.to(device)
        return x if self.batched else x[0]


def random_case(seed: int) -> Case:
    r = random.Random(seed)
    nd = r.choice([1, 2, 2, 3])
    k = tuple(r.randint(1, 4) for _ in range(nd))
    s = tuple(r.randint(1, 3) for _ in range(nd))
    p = tuple(r.randint(0, ki // 2) for ki in k)
    d = tuple(r.choice([1, 1, 1, 2]) for _ in range(nd))
    sizes = tuple(r.choice([1, 2, 3, 5, 7, 8, 11, 16]) for _ in range(nd))
    shape = (r.choice([1, 2, 3]), r.choice([1, 2, 3, 4, 8, 17]), *sizes)
    return Case(seed, nd, shape, k, s, p, d, r.random() < 0.3,
                r.choice(["contiguous", "channels_last", "strided"]), r.choice(DTYPES),
                r.choice(["normal", "ties", "special"]), r.random() < 0.85)


def torch_pool(case: Case, x: torch.Tensor):
    """torch's values and indices for the case, or the exception torch raises."""
    try:
        return POOL[case.nd](x, case.k, case.s, case.p, case.d, ceil_mode=case.ceil_mode, return_indices=True)
    except RuntimeError as e:
        return e


def degenerate(case: Case) -> bool:
    """Some window lies wholly in the padding: torch then points its index outside the input (or at a wrong
    cell of the next row), and its gradient there is not a reference for anything."""
    from lightning_vis.ops._geometry import pooled_size
    for i in range(case.nd):
        n = case.shape[2 + i]
        out = pooled_size(n, case.k[i], case.s[i], case.p[i], case.d[i], case.ceil_mode)
        for o in range(max(out, 0)):
            start = o * case.s[i] - case.p[i]
            if not any(0 <= start + t * case.d[i] < n for t in range(case.k[i])):
                return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# The CUDA kernels' fast paths (csrc/cuda/pool_bodies.h), for the simulator (test_cuda_sim.py) and the GPU
# (test_pool_cuda.py): both compare a backend with the CPU kernels through check_against_cpu.

def vec_width(dtype) -> int:
    """Elements in 16 bytes: the vector width of the CUDA bodies."""
    return 16 // torch.empty(0, dtype=dtype).element_size()


def misalign(t: torch.Tensor) -> torch.Tensor:
    """The same values, in the same layout, one element off a 16-byte boundary (a dense tensor with a storage
    offset: the vector bodies must notice)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    if t.dim() >= 4 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous():
        return flat.view(t.movedim(1, -1).shape).copy_(t.movedim(1, -1)).movedim(-1, 1)
    return flat.view(t.shape).copy_(t)


def check_against_cpu(run, x, k, s, p, d, ceil_mode, seed=0):
    """pool, unpool and gather through run(op_name, *args) (the backend under test; CPU tensors in and out) against
    the CPU kernels: pool and gather exactly, unpool to rounding (sums in another order). When x is off its 16-byte
    alignment, so are the values given to unpool and the gradient given to gather. Raises AssertionError."""
    ops = torch.ops.lightning_vis
    off = misalign if x.data_ptr() % 16 else (lambda t: t)
    args = (list(k), list(s), list(p), list(d))
    v_ref, s_ref = ops.max_pool_with_switches(x, *args, ceil_mode)
    v, sw = run("max_pool_with_switches", x, *args, ceil_mode)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"pool values: {m}")
    assert v.stride() == v_ref.stride(), "pool: values in another layout than the CPU kernels'"
    torch.testing.assert_close(sw, s_ref, rtol=0, atol=0, msg=lambda m: f"pool switches: {m}")
    g = torch.randn(v_ref.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    g = off(torch.empty_like(v_ref).copy_(g))  # in the pooled layout
    size = list(x.shape[2:])
    torch.testing.assert_close(run("unpool", g, s_ref, *args, size), ops.unpool(g, s_ref, *args, size),
                               msg=lambda m: f"unpool: {m}")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(x.dtype)
    grad = off(torch.empty_like(x).copy_(grad))  # in x's layout
    torch.testing.assert_close(run("gather_switches", grad, s_ref, *args), ops.gather_switches(grad, s_ref, *args),
                               rtol=0, atol=0, msg=lambda m: f"gather: {m}")


# Windows of the planar S2 bodies (along W: 2 / stride 2, or 3 / stride 2 / padding 1), in 2D and 3D and with
# other windows along H: (kernel, stride, padding).
S2_WINDOWS = [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)), ((2, 2, 2), (2, 2, 2), (0, 0, 0)),
              ((3, 3, 3), (2, 2, 2), (1, 1, 1)), ((1, 2), (1, 2), (0, 0)), ((3, 2), (2, 2), (1, 0))]


def s2_cases(dtype):
    """(x, k, s, p, d, ceil_mode) for the S2 bodies at every width up to four vector widths: whole and partial
    groups, rows aligned and not (every fourth input off its alignment), tiles inside and over the row's edge, floor
    and ceil mode."""
    from lightning_vis.ops._geometry import pooled_size

    gen = torch.Generator().manual_seed(vec_width(dtype))
    for k, s, p in S2_WINDOWS:
        nd = len(k)
        for w in range(1, 4 * vec_width(dtype) + 4):
            for ceil_mode in (False, True):
                spatial = ((3,) if nd == 3 else ()) + (w % 3 + 3, w)
                if any(pooled_size(n, k[i], s[i], p[i], 1, ceil_mode) < 1 for i, n in enumerate(spatial)):
                    continue
                x = torch.randn((1, 2) + spatial, generator=gen, dtype=torch.float64).to(dtype)
                yield (misalign(x) if w % 4 == 1 else x), k, s, p, (1,) * nd, ceil_mode


def channels_last_cases(dtype):
    """(x, k, s, p, d, vector) for the channels-last bodies: vector is whether the 16-byte channel-group bodies serve
    it (C a multiple of the vector width, tensors aligned) or the one-element bodies."""
    V = vec_width(dtype)
    gen = torch.Generator().manual_seed(7)
    for C, misaligned in [(V, False), (3 * V, False), (V + 1, False), (2 * V, True)]:
        for shape, k, s, p, d in [((2, C, 7, 9), (3, 3), (2, 2), (1, 1), (1, 1)),
                                  ((1, C, 6, 8), (2, 2), (2, 2), (0, 0), (1, 1)),
                                  ((2, C, 9, 7), (2, 3), (1, 2), (1, 1), (2, 1)),
                                  ((1, C, 4, 5, 6), (2, 2, 2), (2, 2, 2), (0, 1, 1), (1, 1, 1))]:
            x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
            yield (misalign(x) if misaligned else x), k, s, p, d, C % V == 0 and not misaligned
