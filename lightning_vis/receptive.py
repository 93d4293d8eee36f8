"""Receptive fields of layer units, measured by gradient on a linearised copy of the pass, for any model.

The unit's input-gradient is taken through the network with every parameter replaced by its absolute value
(plus a little), rectifiers (ReLU, ReLU6, hardtanh) passed as identity and max-pools as average pools of the
same geometry: every path then carries a positive gradient, so the gradient's support is exactly the set of
input pixels that can reach the unit (what the analytic formula gives for conv/pool chains, and what it cannot
give for branches, dilations and odd strides). Two units per axis give the field's size and its jump (stride);
a unit at position p sees ``start + p * jump`` to ``start + p * jump + size - 1`` (clipped to the input).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .hooks import ModelGuard
from .hooks.checkpoint import ReentrantCheckpointError, ungraded
from .hooks.layout import LayoutError, LayoutTracer, _first_tensor
from .hooks.resolve import LayerNotFoundError, LayerSpec, resolve_layers
from .hooks.rules import _POOLS
from .inputs import image_first


@dataclass
class ReceptiveField:
    """Per spatial axis of the input: size, jump (the input stride between neighbouring units; 0 where every unit sees
    the whole input) and start (the first input coordinate seen by unit 0, negative inside the padding). grid: the
    layer's spatial shape."""

    size: tuple[int, ...]
    jump: tuple[int, ...]
    start: tuple[int, ...]
    grid: tuple[int, ...]
    input_size: tuple[int, ...]
    unbounded: tuple[bool, ...] = ()  # per axis: the field is the whole input at any size (jump 0), or reaches
    # beyond the largest input the model accepts

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
        if not torch.is_grad_enabled():
            raise ungraded("receptive_field", name)
        got["out"] = _first_tensor(output)
        if got["out"] is None:
            raise ValueError(f"layer {name!r} returned {type(output).__name__}, not a tensor: pick a layer that "
                             "returns maps")
        raise _Stop

    first = next(iter(params.values()), None)
    dtype, device = (first.dtype, first.device) if first is not None else (torch.float32, torch.device("cpu"))
    x = torch.ones(2, *shape, dtype=dtype, device=device, requires_grad=True)  # where the model is (a GPU model too)
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
    out = lay.to_maps(got["out"])  # (N, C, *grid): tokens on their grid, prefix tokens left out
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
    g = g.abs().sum(1)
    # float32 loses the edge of a very deep field to underflow: a gradient this small says "measure in float64"
    faint = dtype == torch.float32 and bool((g > 0).any()) and float(g[g > 0].min()) < 1e-30
    return grid, c, c1, g > 0, faint


def _positive(p: Tensor) -> Tensor:
    """A parameter made positive (|p| plus a little: every path carries gradient), with filters (dim >= 2) scaled to
    sum 1 per output: activations stay bounded through hundreds of layers (computed in float64)."""
    w = p.detach().double().abs() + 1e-3
    return w / w.sum(tuple(range(1, w.dim())), keepdim=True) if w.dim() >= 2 else w


def _extent(support: Tensor, axis: int, name: str = "") -> tuple[int, int]:
    others = tuple(d for d in range(support.dim()) if d != axis)
    hit = support.any(dim=others) if others else support
    idx = hit.nonzero().flatten()
    if not idx.numel():
        raise ValueError(f"layer {name!r}: the unit depends on no input pixel (its gradient is zero everywhere)")
    return int(idx.min()), int(idx.max())


@torch.enable_grad()  # measured by gradient: also when called inside the caller's torch.no_grad()
def receptive_field(model: nn.Module, layer: LayerSpec, input_shape, max_size: int = 4096, *, layout=None,
                    grid=None) -> ReceptiveField:
    """The receptive field of `layer`'s units for inputs of shape (C, *spatial). Where the field of the centre
    unit is clipped by the input's edges, it is measured again on a larger input (up to max_size per axis; the
    forward stops at the layer, so a fixed-size head does not matter). Any layer with a grid (hooks.layout;
    layout= / grid= override it): conv maps, channels-last maps, tokens (a ViT's: the whole input)."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) < 2:
        raise ValueError(f"input_shape must be (C, *spatial), got {shape}")
    image_first(model, "receptive_field")
    found = resolve_layers(model, layer)
    if len(found) != 1:
        raise ValueError(f"receptive_field takes one layer; {layer!r} names {len(found)}: {', '.join(found)}")
    (name, _), = found.items()
    spatial = shape[1:]
    # the linearised passes run on a copy: a module that caches what it computed from its parameters (timm LeViT's
    # attention biases) must not keep values computed from the stand-in ones
    try:
        model = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - any model deepcopy cannot copy
        raise ValueError(f"receptive_field measures on a copy of the model, and this model cannot be copied ({e})") \
            from None
    module = model.get_submodule(name)
    exact = {k: _positive(p) for k, p in model.named_parameters()}
    exact.update({k: b.detach().double() for k, b in model.named_buffers() if b.is_floating_point()})
    params = [{k: v.float() for k, v in exact.items()}]  # float32 first (fast); float64 once a gradient is faint
    overrides = (layout, grid)

    def measure(sizes):
        *found, faint = _support(model, params[0], name, module, (shape[0], *sizes), *overrides)
        if faint:
            params[0] = exact
            *found, _ = _support(model, exact, name, module, (shape[0], *sizes), *overrides)
        return found

    with ModelGuard(model, eval=True, freeze=True):
        base = measure(spatial)
        grid = base[0]
        size, jump, start, whole = [], [], [], []
        for a in range(len(spatial)):
            # an axis whose field is clipped by the input's edges is measured again on a longer input (the other
            # axes as they are): until the field fits, the layer's grid stops growing with the input (global
            # pooling: the whole input at any size), the model refuses a longer input (a fixed size) or max_size
            n, (grid_a, c, c1, sup), unbounded = spatial[a], base, False
            while True:
                (lo, hi), lo1 = _extent(sup[0], a, name), _extent(sup[1], a, name)[0]
                if lo > 0 and hi < n - 1:
                    break
                if 2 * n > max_size:
                    unbounded = True
                    break
                longer = list(spatial)
                longer[a] = 2 * n
                try:
                    more = measure(longer)
                except (LayerNotFoundError, ReentrantCheckpointError, LayoutError):
                    raise
                except Exception:
                    unbounded = True  # as far as the model lets us see
                    break
                if more[0][a] == grid_a[a]:  # the grid did not grow with the input: global along this axis
                    unbounded = True
                    break
                n, (grid_a, c, c1, sup) = 2 * n, more
            if unbounded and lo == 0 and hi == n - 1:  # the whole input, wherever the unit is
                size.append(spatial[a])
                jump.append(0)
                start.append(0)
            else:
                step = c1[a] - c[a]
                j = (lo1 - lo) // step if step else 1
                size.append(hi - lo + 1)
                jump.append(max(1, j))
                start.append(lo - c[a] * max(1, j))
            whole.append(unbounded)
    return ReceptiveField(tuple(size), tuple(jump), tuple(start), grid, tuple(spatial), tuple(whole))
