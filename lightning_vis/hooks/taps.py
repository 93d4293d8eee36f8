"""Taps: capture what layers output (or receive) during a forward pass, safely.

- Every call of a module is recorded (torchvision's ResNet calls one ReLU two or three times per block).
- A later in-place op (``ReLU(inplace=True)``, ``out += identity``) cannot change what was captured: values are
  copied when the layer returns, and in gradient mode the layer's real output is kept as an autograd node while
  the rest of the network runs on a copy of it.
- Hooks are removed on exit, also when the forward raises.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .guard import ModelGuard
from .layout import Layout, LayoutError, LayoutTracer, Unplaceable, _first_tensor
from .resolve import LayerSpec, resolve_layers


class capture:
    """Context manager recording the outputs (or inputs) of the layers ``spec`` names.

    >>> with capture(model, ["features.3", "features.8"]) as tap:
    ...     model(images)
    >>> tap.output("features.3")            # (N, C, H, W), as the layer returned it

    what: "output" (default) or "input" (a layer's first positional input).
    grads: keep the layer's real output in the autograd graph (``tap.live[name]``) so that methods can take
        ``torch.autograd.grad(target, tap.live[name])``; the network continues on a copy, so an in-place op
        after the layer cannot corrupt it. Where nothing below the layer requires grad (frozen parameters, an
        input without grad) the output becomes a leaf that does: only the part above the layer is recorded.
        Outputs only.
    reduce: ``f(name, module, output) -> value`` recorded instead of a copy of the output, called when the layer
        returns (before any later in-place op): streaming statistics without a copy of every activation; inside it,
        ``tap.layout(name)`` is already known.
    layouts: decide the layout of every output (hooks.layout: channels-first, channels-last, tokens on their grid,
        vectors) in the same pass; ``tap.layout(name)`` and ``tap.maps(name)`` read it. layout / grid: overrides
        for one layer, or a dict per layer name.
    For a layer returning a tuple (e.g. ``nn.MultiheadAttention``) or a dict, its first tensor is recorded.

    Recomputation (``torch.utils.checkpoint``): keep the context open around the backward pass; calls made after the
    forward (``tap.recording = False``, set by ``forward_done()``) hand on the same kind of tensor and record
    nothing.
    """

    def __init__(self, model: nn.Module, spec: LayerSpec, *, what: str = "output", grads: bool = False,
                 reduce=None, layouts: bool = False, layout=None, grid=None):
        if what not in ("output", "input"):
            raise ValueError(f"what must be 'output' or 'input', not {what!r}")
        if grads and (what != "output" or reduce is not None):
            raise ValueError("grads=True taps layer outputs only, unreduced")
        self.model, self.what, self.grads, self.reduce = model, what, grads, reduce
        self.layers = resolve_layers(model, spec)
        self.values: dict[str, list[Tensor]] = defaultdict(list)
        self.live: dict[str, list[Tensor]] = defaultdict(list)
        if layouts or layout is not None or grid is not None:  # the pass may start at any ancestor of a layer
            entries = {".".join(name.split(".")[:i]) for name in self.layers for i in range(name.count(".") + 2)}
            self.tracer = LayoutTracer(model, layout, grid, entries=sorted(entries | {""}))
        else:
            self.tracer = None
        self.recording = True
        self.ungraded: set[str] = set()  # layers that ran under no_grad inside the model (reentrant checkpointing)
        self.late_grads: dict[str, list[Tensor]] = defaultdict(list)  # their gradients, from recomputation
        self._handles = []

    def forward_done(self) -> None:
        """The forward pass is over: later calls of the hooks (checkpoint recomputation) record nothing."""
        self.recording = False

    def _output_hook(self, name):
        def hook(module, args, output):
            out = _first_tensor(output)
            if out is None:
                return None
            if self.grads:
                if self.recording and not torch.is_grad_enabled():
                    self.ungraded.add(name)  # e.g. inside a reentrant checkpoint: no graph from here
                if not self.recording and name in self.ungraded and out.requires_grad:
                    out.register_hook(lambda g, name=name: self.late_grads[name].append(g))  # recomputed: its grad
                if not out.requires_grad and torch.is_grad_enabled():  # nothing below needs gradients: start here
                    out = out.detach().requires_grad_(True)
                if self.recording:
                    self.live[name].append(out)
                    self.values[name].append(out.detach())
                copy = out.clone()  # what the rest of the network sees (and may modify in place)
                if self.tracer is not None:
                    self.tracer.alias(copy, _first_tensor(output))
                if isinstance(output, Tensor):
                    return copy
                first = _first_tensor(output)
                if isinstance(output, dict):
                    return type(output)((k, copy if v is first else v) for k, v in output.items())
                return type(output)(copy if v is first else v for v in output)
            if not self.recording:
                return None
            if self.reduce is not None:  # summarised on the spot: nothing copied, nothing kept
                self.values[name].append(self.reduce(name, module, out.detach()))
            else:
                self.values[name].append(out.detach().clone())
            return None
        return hook

    def _input_hook(self, name):
        def hook(module, args):
            x = _first_tensor(args)
            if x is not None:
                self.values[name].append(x.detach().clone())
        return hook

    def __enter__(self) -> "capture":
        try:
            if self.tracer is not None:  # its hooks run first: a layer's layout is known when the tap's hook runs
                self.tracer.__enter__()
            for name, module in self.layers.items():
                if self.what == "output":
                    self._handles.append(module.register_forward_hook(self._output_hook(name)))
                else:
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.tracer is not None:
            self.tracer.__exit__(*exc)

    def layout(self, name: str) -> Layout:
        """The layout of the layer's (first) output; LayoutError when it cannot be placed. Needs layouts=True."""
        if self.tracer is None:
            raise RuntimeError("this tap decides no layouts: capture(..., layouts=True)")
        return self.tracer.layout(name)

    def maps(self, name: str, call: int = 0) -> Tensor:
        """The layer's output as (N, C, *grid) maps (tokens on their grid, prefix tokens dropped; vectors (N, D))."""
        got = self.values.get(name, [])
        if len(got) <= call:
            raise RuntimeError(f"layer {name!r} ran {len(got)} times in the pass")
        return self.layout(name).to_maps(got[call])

    def output(self, name: str) -> Tensor:
        """The single recorded value of a layer; an error if it ran zero times or more than once."""
        if name not in self.layers:
            resolve_layers(self.model, name)  # raises with suggestions when unknown
            raise KeyError(f"{name!r} was not among the tapped layers: {list(self.layers)}")
        got = self.values.get(name, [])
        if len(got) != 1:
            raise RuntimeError(f"layer {name!r} ran {len(got)} times in the pass; use tap.values[{name!r}] "
                               "for every call")
        return got[0]


class StreamingTap:
    """Per-batch statistics of layers over forward passes someone else runs (a DataLoader loop, a Lightning
    validation loop): subclasses give ``summarise(name, maps)``, called when each layer returns with its output as
    (N, C, *grid) maps (token layouts put on their grid, (N, C) outputs as (N, C, 1)); nothing is copied or kept.
    Call attach() once, before(x) ahead of each forward and add(indices) after it (the dataset indices of the
    batch's inputs), detach() at the end. needs_indices: whether add() uses the indices or only their count."""

    needs_indices = False

    def __init__(self, model: nn.Module, layers: LayerSpec, *, layout=None, grid=None):
        self.model = model
        self.tap = capture(model, layers, reduce=self._reduce, layouts=True, layout=layout, grid=grid)
        self.names = list(self.tap.layers)
        self._sample = None  # the per-sample input shape the layouts were decided for

    def summarise(self, name: str, maps: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def add(self, indices) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def layout(self, name: str) -> Layout:
        return self.tap.layout(name)

    def _reduce(self, name, module, act):
        maps = self.tap.layout(name).to_maps(act)
        return self.summarise(name, maps[..., None] if maps.dim() == 2 else maps)

    def attach(self):
        self.tap.__enter__()
        return self

    def detach(self) -> None:
        self.tap.__exit__(None, None, None)

    def before(self, x: Tensor) -> None:
        """Ahead of the forward pass of batch x. Inputs of another size (per sample) have other grids: their
        layouts are decided again in the coming pass (remembered ones cost a lookup)."""
        for v in self.tap.values.values():
            v.clear()
        sample = _sample_shape(x)
        if sample is None or sample != self._sample:
            self.tap.tracer.reset()
        self._sample = sample

    def batch_values(self) -> dict:
        """{layer: its summary} of the last forward pass (the first call of a layer called several times)."""
        missing = [name for name in self.names if not self.tap.values.get(name)]
        if missing:
            raise ValueError(f"layer {missing[0]!r} did not run in the forward pass")
        return {name: self.tap.values[name][0] for name in self.names}


def _sample_shape(x):
    """The shape of one input of batch x (a tensor, or a list of images); None when x is neither."""
    if isinstance(x, Tensor) and x.dim() >= 1:
        return tuple(x.shape[1:])
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        return ("list", tuple(x[0].shape))
    return None


@dataclass
class LayerInfo:
    name: str
    type: str
    output_shape: tuple | None  # of the first call; None when the output is not a tensor
    calls: int
    params: int
    layout: Layout | Unplaceable | None = None  # of the first call's output (hooks.layout)

    @property
    def units(self) -> int | None:
        """Channels / hidden units of the output (None when it cannot be placed)."""
        if isinstance(self.layout, Layout) and self.output_shape is not None:
            return int(self.output_shape[self.layout.unit_dim])
        return None

    @property
    def layout_text(self) -> str:
        if isinstance(self.layout, Layout):
            return self.layout.describe()
        return "-" if self.layout is None else "cannot place"


def layers(model: nn.Module, example_input, *, leaves_only: bool = False, layout=None,
           grid=None) -> list[LayerInfo]:
    """Every submodule the example forward pass runs, with its type, output shape and layout (one dry forward in
    eval mode without gradients; the model is restored afterwards). ``example_input``: a tensor or a tuple of
    positional inputs. layout / grid: overrides, as in capture."""
    if isinstance(example_input, Mapping):
        raise ValueError(f"example_input is a dict ({', '.join(map(str, example_input))}): give lightning_vis.layers "
                         "the dict (its image under 'pixel_values'), or a tensor or a tuple of positional inputs here")
    shapes: dict[str, list] = defaultdict(list)
    named = [(k, m) for k, m in model.named_modules() if k and (not leaves_only or not any(m.children()))]
    handles = []

    def hook_for(name):
        def hook(module, args, output):
            out = _first_tensor(output)
            shapes[name].append(tuple(out.shape) if out is not None else None)
        return hook

    with ModelGuard(model, eval=True), torch.no_grad(), LayoutTracer(model, layout, grid) as tracer:
        try:
            for k, m in named:
                handles.append(m.register_forward_hook(hook_for(k)))
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
        finally:
            for h in handles:
                h.remove()
    return [LayerInfo(k, type(m).__name__, shapes[k][0], len(shapes[k]), sum(p.numel() for p in m.parameters()),
                      tracer.layouts.get(k)) for k, m in named if shapes.get(k)]
