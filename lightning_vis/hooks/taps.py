"""Taps: capture what layers output (or receive) during a forward pass, safely.

- Every call of a module is recorded (torchvision's ResNet calls one ReLU two or three times per block).
- A later in-place op (``ReLU(inplace=True)``, ``out += identity``) cannot change what was captured: values are
  copied when the layer returns, and in gradient mode the layer's real output is kept as an autograd node while
  the rest of the network runs on a copy of it.
- Hooks are removed on exit, also when the forward raises.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .guard import ModelGuard
from .resolve import LayerSpec, resolve_layers


def _first_tensor(value):
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, Tensor):
                return v
    return None


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
        returns (before any later in-place op): streaming statistics without a copy of every activation.
    For a layer returning a tuple (e.g. ``nn.MultiheadAttention``), its first tensor is recorded.
    """

    def __init__(self, model: nn.Module, spec: LayerSpec, *, what: str = "output", grads: bool = False,
                 reduce=None):
        if what not in ("output", "input"):
            raise ValueError(f"what must be 'output' or 'input', not {what!r}")
        if grads and (what != "output" or reduce is not None):
            raise ValueError("grads=True taps layer outputs only, unreduced")
        self.model, self.what, self.grads, self.reduce = model, what, grads, reduce
        self.layers = resolve_layers(model, spec)
        self.values: dict[str, list[Tensor]] = defaultdict(list)
        self.live: dict[str, list[Tensor]] = defaultdict(list)
        self._handles = []

    def _output_hook(self, name):
        def hook(module, args, output):
            out = _first_tensor(output)
            if out is None:
                return None
            if self.grads:
                if not out.requires_grad:  # nothing below needs gradients: start the graph here
                    out = out.detach().requires_grad_(True)
                self.live[name].append(out)
                self.values[name].append(out.detach())
                copy = out.clone()  # what the rest of the network sees (and may modify in place)
                if isinstance(output, Tensor):
                    return copy
                first = _first_tensor(output)
                return type(output)(copy if v is first else v for v in output)
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

    def __init__(self, model: nn.Module, layers: LayerSpec):
        self.model = model
        self.tap = capture(model, layers, reduce=self._reduce)
        self.names = list(self.tap.layers)
        self.tokens: dict[str, bool] = {}
        self.input_dims = 4

    def summarise(self, name: str, maps: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def add(self, indices) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reduce(self, name, module, act):
        from .attention import is_token_layout, tokens_to_grid

        if name not in self.tokens:
            self.tokens[name] = is_token_layout(act, module, "auto", self.input_dims)
        if self.tokens[name]:
            act = tokens_to_grid(act)[0]
        return self.summarise(name, act[..., None] if act.dim() == 2 else act)

    def attach(self):
        self.tap.__enter__()
        return self

    def detach(self) -> None:
        self.tap.__exit__(None, None, None)

    def before(self, x: Tensor) -> None:
        """Ahead of the forward pass of batch x."""
        self.input_dims = x.dim()
        for v in self.tap.values.values():
            v.clear()

    def batch_values(self) -> dict:
        """{layer: its summary} of the last forward pass (the first call of a layer called several times)."""
        missing = [name for name in self.names if not self.tap.values.get(name)]
        if missing:
            raise ValueError(f"layer {missing[0]!r} did not run in the forward pass")
        return {name: self.tap.values[name][0] for name in self.names}


@dataclass
class LayerInfo:
    name: str
    type: str
    output_shape: tuple | None  # of the first call; None when the output is not a tensor
    calls: int
    params: int


def layers(model: nn.Module, example_input, *, leaves_only: bool = False) -> list[LayerInfo]:
    """Every submodule the example forward pass runs, with its type and output shape (one dry forward in eval
    mode without gradients; the model is restored afterwards). ``example_input``: a tensor or a tuple of
    positional inputs."""
    shapes: dict[str, list] = defaultdict(list)
    named = [(k, m) for k, m in model.named_modules() if k and (not leaves_only or not any(m.children()))]
    handles = []

    def hook_for(name):
        def hook(module, args, output):
            out = _first_tensor(output)
            shapes[name].append(tuple(out.shape) if out is not None else None)
        return hook

    with ModelGuard(model, eval=True), torch.no_grad():
        try:
            for k, m in named:
                handles.append(m.register_forward_hook(hook_for(k)))
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
        finally:
            for h in handles:
                h.remove()
    return [LayerInfo(k, type(m).__name__, shapes[k][0], len(shapes[k]), sum(p.numel() for p in m.parameters()))
            for k, m in named if shapes.get(k)]
