"""An inference copy of a model for the CAMs whose map comes from one layer's activations in a plain forward pass
(Eigen-CAM, FEM, KPCA-CAM) when they are called again and again on a model whose weights do not change (a notebook,
the CLI over a folder, the explorer). Its values equal the model's up to float rounding (about 1e-6 relative).

The copy is torch.fx's ``optimize_for_inference`` of a traced graph that also returns the layer's output (a copy of
it, taken where the layer returns, before any later in-place operation): each BatchNorm folded into its convolution,
dropout removed, the convolutions' weights packed once for oneDNN and runs of them kept in its blocked layout (an
eager pass re-packs every weight on every call). Measured on this project's 2-core CPU, one thread, 224 px, against
the model itself as given: ResNet-50 1.16x at batch 1 and 1.31x at batch 8, VGG16-BN 1.11x / 1.35x, MobileNetV2
1.0x / 1.44x; DenseNet-121 and ConvNeXt-T were up to 4% slower, so the copy is one more candidate in
:func:`~._common.fastest_format`'s timed choice, kept only where its passes are the fastest.

Building costs 0.3-1 s (MobileNetV2 to VGG16-BN: fx tracing, two deep copies, packing the weights), so a copy is
built only once the weights have stayed the same over more than one call and the model's own passes with them have
taken BUILD_AFTER seconds of CPU time (the build then costs at most about twice what was already spent; a model in
training changes its weights between calls and never pays for it; ResNet-50 at 224 px on one thread builds on the
4th call of one image, the 2nd of eight). It is checked on that call against the model's own pass (layer output and
model output within rtol 1e-4) and used while the weights stay the same: a fingerprint of every parameter and buffer
(its storage, its version counter, which every in-place update bumps, and a strided sample of its values, for
updates through ``.data``, which the counter misses) is compared on each call, and a changed one drops the copy.
Only where it applies: a float32 CPU model and 4D batch, no hooks on the model (the copy would not run them),
parameters and buffers within FOLD_BUDGET, a layer run once by a model fx can trace, a tensor output. Anything else
runs the model itself, as before. Copies are held weakly per model (a deleted model takes them along), at most
COPIES per model."""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
import weakref
from itertools import chain

import torch
from torch import Tensor, fx, nn

from ._common import FOLD_BUDGET

COPIES = 2  # inference copies kept per model (layer, layout and input shape); the oldest is dropped
BUILD_AFTER = 0.5  # CPU seconds of the model's own passes with the same weights before a copy is built
SAMPLE = 16  # values of each parameter and buffer the fingerprint reads


def fingerprint(model: nn.Module, x: Tensor) -> tuple | None:
    """What changes when the model's weights or modules change (see the module's docstring), or None where the copy
    does not apply to model and x. ResNet-50: 0.5 ms (the strided samples are views, made again only when a
    parameter's storage, version or shape changes)."""
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    modules = list(model.modules())
    if any(m._forward_hooks or m._forward_pre_hooks or m.training for m in modules):
        return None
    tensors = list(chain(model.parameters(), model.buffers()))
    if any(t.device.type != "cpu" or t.layout != torch.strided or (t.is_floating_point() and t.dtype != torch.float32)
           for t in tensors) or \
            sum(t.numel() * t.element_size() for t in tensors) > FOLD_BUDGET:
        return None
    cheap = (tuple(map(id, modules)), tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors))
    views = _COPIES.views(model, cheap, tensors)
    with torch.no_grad():
        return cheap, torch.cat(views).tolist() if views else []


def _samples(tensors: list[Tensor]) -> list[Tensor]:
    """Views of SAMPLE evenly strided values of each floating-point tensor (its first value where it is not
    contiguous): views, so that they see a later change through ``.data``."""
    out = []
    for t in tensors:
        if t.is_floating_point() and t.numel():
            t = t.detach()
            out.append(t.view(-1)[::max(1, t.numel() // SAMPLE)] if t.is_contiguous() else t[(0,) * t.dim()][None])
    return out


class _Entry:
    """One layer's copy: the fingerprint of the weights it is for, the calls with them and the CPU seconds their
    passes took, the copy (None until built, or where building failed: failed then stays set) and the layout of the
    layer's output (from the model's own pass)."""

    def __init__(self, mark):
        self.mark, self.calls, self.spent, self.copy, self.layout, self.failed = mark, 0, 0.0, None, None, False


class _Copies:
    """The entries, weakly per model; the lock keeps the explorer's threads from mixing them up."""

    def __init__(self):
        self.models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.samples: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()

    def entry(self, model, key, mark) -> _Entry:
        with self.lock:
            table = self.models.setdefault(model, {})
            entry = table.pop(key, None) or _Entry(mark)  # re-inserted last: the oldest key is the first one
            if entry.mark != mark:  # the weights changed: this call is the first with the new ones
                entry.mark, entry.calls, entry.spent, entry.copy, entry.layout = mark, 0, 0.0, None, None
            table[key] = entry
            while len(table) > COPIES:
                table.pop(next(iter(table)))
            return entry

    def views(self, model, cheap, tensors) -> list[Tensor]:
        """fingerprint's sample views of model's tensors, made again where cheap (storages, versions) changed."""
        with self.lock:
            held = self.samples.get(model)
            if held is None or held[0] != cheap:
                held = self.samples[model] = (cheap, _samples(tensors))
            return held[1]

    def failed(self, model, key) -> bool:
        with self.lock:
            entry = self.models.get(model, {}).get(key)
            return entry is not None and entry.failed


_COPIES = _Copies()


class Session:
    """The inference copy's part in one call: ``run`` (x -> (output, layer output), or None where there is no copy for
    these weights yet) and ``layout``; ``offer(x, layout, act, out, seconds)`` after the model's own pass, which
    builds the copy when these weights have had enough of them (BUILD_AFTER); ``drop()`` where the copy lost the
    timed choice. A key (layer, layout and input shape) whose copy failed to build, failed its check or lost is not
    tried again, and takes no fingerprint."""

    def __init__(self, model: nn.Module, name: str, x: Tensor, key):
        self.model, self.name, self.entry = model, name, None
        key = (name, key, tuple(x.shape[1:]))
        mark = None if _COPIES.failed(model, key) else fingerprint(model, x)  # failed: no fingerprint to take
        if mark is not None:
            self.entry = _COPIES.entry(model, key, mark)

    def drop(self) -> None:
        """The copy lost the timed choice, raised or failed its check: never built again for this key."""
        if self.entry is not None:
            self.entry.copy, self.entry.failed = None, True

    @property
    def run(self):
        return None if self.entry is None else self.entry.copy

    def __call__(self, x: Tensor) -> tuple | None:
        """(output, layer output) from the copy, or None where it raises (it is then dropped for good)."""
        try:  # a graph module that raises prints its generated code to stderr: not the user's to read
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                return self.entry.copy(x)
        except Exception:  # noqa: BLE001 - the model itself runs instead
            self.drop()
            return None

    @property
    def layout(self):
        return self.entry.layout

    def offer(self, x: Tensor, layout, act, out, seconds: float) -> None:
        e = self.entry
        if e is None or e.copy is not None or e.failed or not isinstance(act, Tensor) or not isinstance(out, Tensor):
            return
        e.calls, e.spent = e.calls + 1, e.spent + seconds
        if e.calls < 2 or e.spent < BUILD_AFTER:
            return
        e.copy, e.layout = _build(self.model, self.name), layout
        got = self(x) if e.copy is not None else None
        if got is None or not all(_close(g, w) for g, w in zip(got, (out, act))):
            self.drop()


def _close(got, want: Tensor) -> bool:
    """got equals want to rtol 1e-4 of each value, and 1e-5 of want's largest magnitude."""
    return isinstance(got, Tensor) and got.shape == want.shape and \
        torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) if want.numel() else 0)


class _Tap(fx.Tracer):
    """torch.fx's tracer, noting what the module at path ``name`` returns each time it is called."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.found = name, []

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if self.path_of_module(m) == self.name:
            self.found.append(out)
        return out


@torch.no_grad()
def _build(model: nn.Module, name: str):
    """The inference copy of model returning (output, a copy of layer name's output), or None where it cannot be
    built (a model fx cannot trace, a layer called other than once, a layer output that is not one tensor)."""
    from torch.fx.experimental.optimization import optimize_for_inference

    try:
        tracer = _Tap(name)
        graph = tracer.trace(model)
        if len(tracer.found) != 1 or not isinstance(tracer.found[0], fx.Proxy):
            return None
        node = tracer.found[0].node
        with graph.inserting_after(node):
            kept = graph.call_method("clone", (node,))
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = ((output.args[0], kept),)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimize_for_inference(fx.GraphModule(model, graph))  # works on deep copies: model untouched
    except Exception:  # noqa: BLE001 - any model the passes cannot take runs as it is
        return None
