"""Objectives for feature visualization: f(activations {layer: tensor}, model output) -> (B,) values to maximise,
one per batch element, so that one optimisation renders many units. Combine with +, -, * and ``.on(b)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

class Objective:
    """A differentiable score per batch element. Combine with +, -, * (by a number), and restrict to one batch
    element with ``.on(b)``."""

    def __init__(self, fn: Callable[[dict, Tensor | None], Tensor], layers: Sequence[str] = (), name: str = "",
                 needs_output: bool = False):
        self.fn, self.layers, self.name, self.needs_output = fn, tuple(layers), name, needs_output

    def __call__(self, acts: dict, output: Tensor | None = None) -> Tensor:
        return self.fn(acts, output)

    def _combine(self, other, op, symbol):
        if isinstance(other, (int, float)):
            return Objective(lambda a, o: op(self(a, o), other), self.layers, f"({self.name} {symbol} {other})",
                             self.needs_output)
        return Objective(lambda a, o: op(self(a, o), other(a, o)), self.layers + other.layers,
                         f"({self.name} {symbol} {other.name})", self.needs_output or other.needs_output)

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b, "+")

    def __radd__(self, other):
        return self if other == 0 else self._combine(other, lambda a, b: b + a, "+")

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b, "-")

    def __mul__(self, k):
        return self._combine(k, lambda a, b: a * b, "*")

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1

    def on(self, b: int) -> "Objective":
        """Only batch element b gets this objective (others: 0)."""
        def fn(a, o):
            v = self(a, o)
            mask = torch.zeros_like(v)
            mask[b] = 1
            return v * mask
        return Objective(fn, self.layers, f"{self.name}@{b}", self.needs_output)


def _maps(act: Tensor) -> Tensor:
    """(B, C, *spatial) view of a layer output (token layouts put on their grid, linear outputs as 1x1)."""
    if act.dim() == 2:
        return act[:, :, None]
    return act


def _per_element(units, batch: int, what: str) -> Tensor:
    units = torch.as_tensor(units).long().flatten()
    if units.numel() == 1:
        units = units.expand(batch)
    if units.numel() != batch:
        raise ValueError(f"{units.numel()} {what} for a batch of {batch}: give one, or one per batch element")
    return units


def channel(layer: str, units, batch: int | None = None) -> Objective:
    """Mean activation of channel `units` (one, or one per batch element) of `layer`."""
    def fn(acts, _):
        a = _maps(acts[layer])
        c = _per_element(units, a.shape[0], "channels")
        _check_units(c, a.shape[1], layer)
        return a[torch.arange(a.shape[0]), c.to(a.device)].flatten(1).mean(1)
    return Objective(fn, [layer], f"channel({layer}, {units})")


def neuron(layer: str, units, position=None) -> Objective:
    """Activation of one unit of channel `units`: at `position` (a grid index tuple) or the centre."""
    def fn(acts, _):
        a = _maps(acts[layer])
        c = _per_element(units, a.shape[0], "channels")
        _check_units(c, a.shape[1], layer)
        grid = a.shape[2:]
        pos = tuple(g // 2 for g in grid) if position is None else tuple(position)
        if len(pos) != len(grid) or any(not 0 <= p < g for p, g in zip(pos, grid)):
            raise ValueError(f"position {pos} is outside {layer!r}'s grid {tuple(grid)}")
        return a[(torch.arange(a.shape[0]), c.to(a.device), *pos)]
    return Objective(fn, [layer], f"neuron({layer}, {units}, {position})")


def layer(layer: str) -> Objective:
    """DeepDream: the mean squared activation of the whole layer."""
    return Objective(lambda acts, _: _maps(acts[layer]).pow(2).flatten(1).mean(1), [layer], f"layer({layer})")


def class_logit(units) -> Objective:
    """The model output (N, classes) at class `units` (one, or one per batch element)."""
    def fn(_, out):
        c = _per_element(units, out.shape[0], "classes")
        _check_units(c, out.shape[1], "the output")
        return out[torch.arange(out.shape[0]), c.to(out.device)]
    return Objective(fn, [], f"class_logit({units})", needs_output=True)


def direction(layer: str, vector: Tensor) -> Objective:
    """Cosine-weighted projection of the layer's channel vectors onto `vector` (C,), averaged over positions."""
    def fn(acts, _):
        a = _maps(acts[layer])
        v = vector.to(a).view(1, -1, *[1] * (a.dim() - 2))
        if v.shape[1] != a.shape[1]:
            raise ValueError(f"direction has {v.shape[1]} entries; {layer!r} has {a.shape[1]} channels")
        return (a * v).sum(1).flatten(1).mean(1)
    return Objective(fn, [layer], f"direction({layer})")


def diversity(layer: str, group: int | None = None) -> Objective:
    """Minus the mean cosine similarity of each element's Gram matrix with the others' (Lucid's diversity),
    vectorised: one (B, B) product, no loop over pairs. group=g: only among each run of g consecutive elements
    (many units' diverse renders in one batch, g per unit; B must be a multiple of g)."""
    def fn(acts, _):
        a = _maps(acts[layer]).flatten(2)
        b = a.shape[0]
        g = b if group is None else group
        if g < 1 or b % g:
            raise ValueError(f"diversity: a batch of {b} does not split into groups of {g}")
        if g < 2:
            return torch.zeros(b, device=a.device)
        gram = torch.einsum("bcp,bdp->bcd", a, a).flatten(1)
        gram = F.normalize(gram, dim=1).view(b // g, g, -1)
        sim = gram @ gram.transpose(1, 2)  # (B / g, g, g)
        return (-(sim.sum(2) - sim.diagonal(dim1=1, dim2=2)) / (g - 1)).flatten()
    return Objective(fn, [layer], f"diversity({layer}{'' if group is None else f', group={group}'})")


def _check_units(units: Tensor, n: int, where: str):
    bad = units[(units < 0) | (units >= n)]
    if bad.numel():
        raise ValueError(f"unit {int(bad[0])} out of range: {where} has {n} channels (0..{n - 1})")
