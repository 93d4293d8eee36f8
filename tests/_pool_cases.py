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
