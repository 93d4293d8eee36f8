"""Receptive fields of layer units, measured by gradient on a linearised copy of the pass, for any model.

The unit's input-gradient is taken through the network with every parameter replaced by its absolute value
(plus a little), rectifiers (ReLU, ReLU6, hardtanh) passed as identity and max-pools as average pools of the
same geometry: every path then carries a positive gradient, so the gradient's support is exactly the set of
input pixels that can reach the unit (what the analytic formula gives for conv/pool chains, and what it cannot
give for branches, dilations and odd strides). Two units per axis give the field's size and its jump (stride);
a unit at position p sees ``start + p * jump`` to ``start + p * jump + size - 1`` (clipped to the input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .hooks import ModelGuard
from .hooks.layout import LayoutTracer
from .hooks.resolve import LayerSpec, resolve_layers
from .hooks.rules import _POOLS


@dataclass
class ReceptiveField:
    """Per spatial axis of the input: size, jump (the input stride between neighbouring units) and start (the
    first input coordinate seen by unit 0, negative inside the padding). grid: the layer's spatial shape."""

    size: tuple[int, ...]
    jump: tuple[int, ...]
    start: tuple[int, ...]
    grid: tuple[int, ...]
    input_size: tuple[int, ...]

    def box(self, position) -> tuple[tuple[int, int], ...]:
        """[(lo, hi) per axis], hi exclusive, of the input region unit `position` sees, clipped to the input."""
        return tuple((max(0, s + p * j), min(n, s + p * j + z))
                     for p, s, j, z, n in zip(position, self.start, self.jump, self.size, self.input_size))

    def centre(self, position) -> tuple[float, ...]:
        return tuple(s + p * j + (z - 1) / 2 for p, s, j, z in zip(position, self.start, self.jump, self.size))


_IDENTITY = {F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_, F.relu6, F.hardtanh,
             F.leaky_relu, F.elu}


class _Linearised(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _IDENTITY:
            return args[0] * 1
        if func in _POOLS:
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            b = {**dict(zip(names, args)), **kwargs}
            nd = _POOLS[func]
            if b.get("dilation", 1) not in (1, (1,) * nd, [1] * nd):
                raise ValueError("receptive_field: dilated max-pools are not supported")
            stride = b.get("stride") or b["kernel_size"]
            out = getattr(F, f"avg_pool{nd}d")(b["input"], b["kernel_size"], stride, b.get("padding", 0),
                                               b.get("ceil_mode", False), count_include_pad=False)
            return (out, None) if b.get("return_indices") or func.__name__.endswith("with_indices") else out
        return func(*args, **kwargs)


class _Stop(Exception):
    pass


def _support(model, params, name, module, shape, layout=None, grid_override=None):
    """The layer's grid, its centre unit c and c + 1, and the input support of each (2, *spatial)."""
    got = {}

    def hook(mod, args, output):
        got["out"] = output if isinstance(output, Tensor) else output[0]
        raise _Stop

    device = next(iter(params.values())).device if params else torch.device("cpu")
    x = torch.ones(2, *shape, device=device, requires_grad=True)  # where the model is (a GPU model too)
    tracer = LayoutTracer(model, layout, grid_override)
    try:
        with tracer:
            handle = module.register_forward_hook(hook)  # after the tracer's: the layout is decided when it stops
            try:
                with _Linearised():
                    torch.func.functional_call(model, params, (x,), strict=False)
            finally:
                handle.remove()
    except _Stop:
        pass
    if "out" not in got:
        raise ValueError(f"layer {name!r} did not run in the forward pass")
    lay = tracer.layout(name)
    if lay.kind == "tokens":
        raise ValueError(f"layer {name!r} has a token layout ({lay.describe()}): attention sees the whole input")
    out = lay.unit_first(got["out"])
    grid = tuple(out.shape[2:])
    if len(grid) != len(shape) - 1:
        raise ValueError(f"layer {name!r} outputs shape {tuple(out.shape)}, which has no {len(shape) - 1}D map "
                         "over the input")
    c = tuple(g // 2 for g in grid)
    c1 = tuple(min(g - 1, ci + 1) for g, ci in zip(grid, c))
    target = torch.zeros_like(out)
    target[(0, slice(None), *c)] = 1.0
    target[(1, slice(None), *c1)] = 1.0
    (g,) = torch.autograd.grad(out, x, target)
    return grid, c, c1, g.abs().sum(1) > 0


def _extent(support: Tensor, axis: int) -> tuple[int, int]:
    others = tuple(d for d in range(support.dim()) if d != axis)
    hit = support.any(dim=others) if others else support
    idx = hit.nonzero().flatten()
    return int(idx.min()), int(idx.max())


def receptive_field(model: nn.Module, layer: LayerSpec, input_shape, max_size: int = 4096, *, layout=None,
                    grid=None) -> ReceptiveField:
    """The receptive field of `layer`'s units for inputs of shape (C, *spatial). Where the field of the centre
    unit is clipped by the input's edges, it is measured again on a larger input (up to max_size per axis; the
    forward stops at the layer, so a fixed-size head does not matter). Channels-first and channels-last layers
    (hooks.layout; layout= / grid= override it); token layers are refused (attention sees the whole input)."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) < 2:
        raise ValueError(f"input_shape must be (C, *spatial), got {shape}")
    found = resolve_layers(model, layer)
    if len(found) != 1:
        raise ValueError(f"receptive_field takes one layer; {layer!r} names {len(found)}: {', '.join(found)}")
    (name, module), = found.items()
    spatial = shape[1:]
    params = {k: p.detach().abs() + 1e-3 for k, p in model.named_parameters()}
    with ModelGuard(model, eval=True, freeze=True):
        overrides = (layout, grid)
        grid, *_ = _support(model, params, name, module, shape, *overrides)
        size, jump, start = [], [], []
        for axis in range(len(spatial)):
            n = spatial[axis]
            while True:
                probe = list(spatial)
                probe[axis] = n
                _, c, c1, sup = _support(model, params, name, module, (shape[0], *probe), *overrides)
                (lo, hi), (lo1, _) = _extent(sup[0], axis), _extent(sup[1], axis)
                if (lo > 0 and hi < n - 1) or 2 * n > max_size:
                    break
                n *= 2  # clipped: measure on a longer axis
            step = c1[axis] - c[axis]
            j = (lo1 - lo) // step if step else 1
            size.append(hi - lo + 1)
            jump.append(max(1, j))
            start.append(lo - c[axis] * max(1, j))
    return ReceptiveField(tuple(size), tuple(jump), tuple(start), grid, tuple(spatial))
