"""Connections between the units of two layers: expanded weights (Olah et al., "Circuits"; Voss et al.,
"Visualizing Weights", Distill 2021).

Between a unit i of an earlier layer A and a unit j of a later layer B, the expanded weight is the gradient of B's
unit j, at the centre of B's grid, with respect to A's unit i at every position of A's grid, through a linearised
pass: rectifiers (ReLU, ReLU6, hardtanh, leaky ReLU, ELU) passed as identity and max-pools as average pools of the
same geometry (the linearisation of :mod:`lightning_vis.receptive`), in eval mode (BatchNorm is affine). For
adjacent layers this is the weight itself; through layers in between it is the product of their weights (a
convolution of kernels, scaled by BatchNorm, spread by pooling), summed over every path (residual branches
included). A piecewise-linear network gives exactly that, whatever the input; other nonlinearities (sigmoid, GELU,
softmax attention, LayerNorm) make it the gradient at the example input given.

The connection strength of i -> j is the sum over positions: how much B's centre unit j moves when A's unit i rises
by one everywhere. ``ExpandedWeights.strongest`` lists the strongest positive and negative ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .hooks import ModelGuard
from .hooks.layout import Layout, _first_tensor, trace_layouts
from .hooks.resolve import LayerSpec, resolve_layers
from .receptive import _Linearised


@dataclass
class ExpandedWeights:
    """weights: (units of target, units of source) connection strengths (sums over the source's positions);
    kernels: (target units, source units, *source grid) the expanded weights at each source position (when asked
    for); centre: the target position differentiated; connected: whether the target depends on the source at
    all."""

    source: str
    target: str
    weights: Tensor
    centre: tuple[int, ...]
    connected: bool
    kernels: Tensor | None = None

    def strongest(self, unit: int, n: int = 5, *, direction: str = "inputs") -> dict[str, list[tuple[int, float]]]:
        """The n strongest positive and negative connections of `unit`: direction "inputs" (unit of the target,
        its source units) or "outputs" (unit of the source, its target units). {"positive": [(unit, weight)],
        "negative": [...]}, strongest first; zero weights are left out; ties to the lower unit."""
        if direction not in ("inputs", "outputs"):
            raise ValueError(f"direction must be 'inputs' or 'outputs', not {direction!r}")
        row = self.weights[unit] if direction == "inputs" else self.weights[:, unit]
        out = {}
        for sign, name in ((1, "positive"), (-1, "negative")):
            v = row * sign
            order = torch.argsort(-v, stable=True)[:n]
            out[name] = [(int(i), float(row[i])) for i in order if float(v[i]) > 0]
        return out


class _Stop(Exception):
    pass


def _select_centre(maps: Tensor, units: Tensor, centre: tuple[int, ...]) -> Tensor:
    """(n, C, *grid) or (n, C) -> (n,) the value of unit units[b] at `centre` for each batch element b."""
    return maps[(torch.arange(maps.shape[0], device=maps.device), units.to(maps.device), *centre)]


def _with_first(output, old: Tensor, new: Tensor, name: str):
    """The layer's output with its first tensor `old` replaced by `new`: a dict, a namedtuple, a tuple or list."""
    if isinstance(output, dict):
        items = {k: new if v is old else v for k, v in output.items()}
        try:
            return type(output)(items)
        except TypeError:
            pass
    elif isinstance(output, tuple) and hasattr(type(output), "_fields"):  # a namedtuple: fields are arguments
        return type(output)(*(new if v is old else v for v in output))
    elif isinstance(output, (tuple, list)):
        try:
            return type(output)(new if v is old else v for v in output)
        except TypeError:
            pass
    raise ValueError(f"layer {name!r} returns a {type(output).__name__}, which expanded_weights cannot rebuild "
                     "with its tensor replaced: take a layer inside it that returns a tensor")


def expanded_weights(model: nn.Module, source: LayerSpec, target: LayerSpec, input_shape=None, *,
                     example: Tensor | None = None, kernels: bool = False, batch: int = 64, units=None,
                     layout=None, grid=None) -> ExpandedWeights:
    """The expanded weights from every unit of `source` to the `units` (default all) of the later layer `target`
    (see the module docstring). input_shape: (C, *spatial) of the model input (a zero input), or `example`, a batch
    of one input (1, C, *spatial): where nonlinear parts are linearised (piecewise-linear nets: any input gives the
    same weights). Target units are differentiated `batch` at a time (memory: `batch` copies of the pass up to the
    target). kernels=True also keeps every position's weight. layout / grid: overrides as in capture. The model is
    restored afterwards."""
    names = []
    for what, spec in (("source", source), ("target", target)):
        found = resolve_layers(model, spec)
        if len(found) != 1:
            raise ValueError(f"expanded_weights takes one {what} layer; {spec!r} names {len(found)}: "
                             f"{', '.join(found)}")
        names.append(next(iter(found)))
    src, tgt = names
    if src == tgt:
        raise ValueError(f"source and target are the same layer {src!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if example is None:
        if input_shape is None:
            raise ValueError("give input_shape=(C, *spatial) or an example input (1, C, *spatial)")
        example = torch.zeros(1, *[int(v) for v in input_shape])
    elif example.dim() < 2 or example.shape[0] != 1:
        raise ValueError(f"example must be a batch of one input (1, C, *spatial), got shape {tuple(example.shape)}")
    p = next(model.parameters(), None)
    example = example.detach().to(p.device if p is not None else example.device)
    layouts = trace_layouts(model, example, layout, grid)
    lays: list[Layout] = []
    for n in (src, tgt):
        lay = layouts.get(n)
        if lay is None:
            raise ValueError(f"layer {n!r} did not run in the forward pass")
        if not isinstance(lay, Layout):
            raise lay.error()
        lays.append(lay)
    src_lay, tgt_lay = lays
    modules = resolve_layers(model, [src, tgt])
    state: dict = {}

    def on_source(module, args, output):
        if "leaf" in state:  # later calls of the same module are left alone
            return None
        out = _first_tensor(output)
        leaf = out.detach().requires_grad_(True)
        state["leaf"] = leaf
        live = leaf * 1  # not a leaf: in-place ops after the layer stay legal
        if isinstance(output, Tensor):
            return live
        return _with_first(output, out, live, src)

    def on_target(module, args, output):
        if "leaf" not in state:
            raise ValueError(f"layer {tgt!r} runs before {src!r}: the source must come earlier in the pass")
        state["out"] = _first_tensor(output)
        raise _Stop

    def run(n: int):
        state.clear()
        try:
            with torch.enable_grad(), _Linearised():
                model(example.expand(n, *example.shape[1:]))
        except _Stop:
            pass
        if "out" not in state:
            raise ValueError(f"layer {tgt!r} did not run in the forward pass")
        return state["leaf"], tgt_lay.to_maps(state["out"])

    rows, kernel_rows = [], []
    connected = False
    with ModelGuard(model, eval=True, freeze=True):
        handles = [modules[src].register_forward_hook(on_source), modules[tgt].register_forward_hook(on_target)]
        try:
            leaf, maps = run(1)
            total, source_units = maps.shape[1], src_lay.units(leaf)
            centre = tuple(g // 2 for g in maps.shape[2:])
            wanted = torch.arange(total) if units is None else torch.as_tensor(units).long().flatten()
            bad = wanted[(wanted < 0) | (wanted >= total)]
            if bad.numel():
                raise ValueError(f"unit {int(bad[0])} out of range: {tgt!r} has {total} units (0..{total - 1})")
            for start in range(0, len(wanted), batch):
                js = wanted[start:start + batch]
                leaf, maps = run(len(js))
                value = _select_centre(maps, js, centre).sum()
                (g,) = torch.autograd.grad(value, leaf, allow_unused=True) if value.requires_grad else (None,)
                if g is None:
                    g = torch.zeros_like(leaf)
                else:
                    connected = True
                per_unit = src_lay.unit_first(g)
                rows.append((per_unit.flatten(2).sum(2) if per_unit.dim() > 2 else per_unit).float().cpu())
                if kernels:
                    kernel_rows.append(src_lay.to_maps(g).float().cpu())
        finally:
            for h in handles:
                h.remove()
    weights = torch.cat(rows) if rows else torch.zeros(0, source_units)
    return ExpandedWeights(src, tgt, weights, centre, connected, torch.cat(kernel_rows) if kernel_rows else None)
