"""What every attribution method shares: the result types (Attribution, CAM), the target path (target_scores: the
(N,) scores a method explains, from any model output; check_target refuses malformed targets before any pass), the
batch checks, chunking over the batch (_chunked), upsampling of low-resolution maps to the input, and FastForward
(the perturbation methods' many no-grad passes, faster with the same values)."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import images as im
from ..display import NoPicture, Shows, frames, heat_picture
from ..hooks.checkpoint import check_chunk_size
from ..targets import LOGITS, describe, field
from ..targets import default as default_target

Target = int | Sequence[int] | Tensor | Callable[[Tensor], Tensor] | None


@dataclass
class Attribution(Shows):
    """maps: (N, *input shape) for saliency and guided backprop; (N, *input spatial) for CAMs.
    targets: (N,) class indices (None for a callable target); scores: (N,) the target scores explained.
    Shows itself (``show()``, ``save(path)``, notebooks): a grid of the maps, overlaid on ``images=`` (the inputs)
    where given."""

    maps: Tensor
    targets: Tensor | None
    scores: Tensor
    method: str

    def _heat(self) -> Tensor:
        """(N, *grid): each position's largest magnitude over the channels (dim 1), as saliency maps are shown."""
        if self.maps.dim() < 3:
            raise NoPicture(f"no map to draw: {self.method} maps of shape {tuple(self.maps.shape)} have no grid")
        return self.maps.abs().amax(1)

    def _picture(self, images: Tensor | None = None) -> Tensor:
        return heat_picture(self._heat(), images)


@dataclass
class CAM(Attribution):
    """A class activation map: ``maps`` upsampled to the input, ``low_res`` at the layer's resolution (N, *grid),
    and for Guided Grad-CAM ``guided`` (N, *input shape): guided backprop times the map."""

    low_res: Tensor | None = None
    layer: str = ""
    guided: Tensor | None = None

    def _heat(self) -> Tensor:
        return self.maps

    def _picture(self, images: Tensor | None = None) -> Tensor:
        """The maps (overlaid on images= where given), and beside each Guided Grad-CAM's guided map."""
        guided = None if self.guided is None else \
            im.signed_rgb(frames(self.guided.detach().float().cpu(), self.maps.dim() - 1))
        return heat_picture(self.maps, images, guided)

    def normalized(self) -> Tensor:
        """maps min-max scaled to [0, 1] per input (as pytorch-grad-cam shows them)."""
        flat = self.maps.flatten(1)
        lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(self.maps)


# ----------------------------------------------------------------------------------------------------------------
# targets


def target_scores(output, target: Target) -> tuple[Tensor, Tensor | None]:
    """(N,) scores to explain and (N,) their class indices (None for a callable target). A callable target is
    applied to the output as it is, whatever its type; class targets need (N, classes) logits (the output, or its
    `logits` / `logits_per_image` field); target=None on any other output is lightning_vis.targets.default (dense
    scores, detections, embeddings), or a one-line refusal."""
    if callable(target) and not isinstance(target, Tensor):
        scores = target(output)
        n = _batch_of(output)
        if not isinstance(scores, Tensor) or scores.dim() != 1 or (n is not None and scores.shape[0] != n):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            want = f"(N,) = ({n},)" if n is not None else "(N,)"
            raise ValueError(f"a callable target must return {want} scores, one per input; it returned {got}")
        return scores, None
    whole = output
    output = output if isinstance(output, Tensor) else field(output, LOGITS)  # transformers' ModelOutput
    if target is None and not isinstance(whole, Tensor) and (output is None or output.dim() != 2):  # named parts
        return default_target(whole)[0], None
    if output is None:
        raise ValueError(f"the model returned a {describe(whole)}: a class target needs (N, classes) logits; pass "
                         "target=f(output) -> (N,) scores (ready-made: lightning_vis.targets.classifier(c, key=...), "
                         "segmentation, detection, similarity)")
    n = output.shape[0]
    if output.dim() != 2:
        what = "model output" if output is whole else "model's logits"
        raise ValueError(f"a class target needs (N, classes) logits, but the {what} has shape "
                         f"{tuple(output.shape)}; pass target=f(output) -> (N,) scores (see lightning_vis.targets)")
    n_cls = output.shape[1]
    if target is None:
        classes = output.detach().argmax(1)
    else:
        classes = torch.as_tensor(target, device=output.device).long().flatten()
        if classes.numel() == 1:
            classes = classes.expand(n)
        if classes.numel() != n:
            raise ValueError(f"{classes.numel()} targets for a batch of {n}: give one class, or one per input")
        bad = classes[(classes < 0) | (classes >= n_cls)]
        if bad.numel():
            raise ValueError(f"target class {int(bad[0])} out of range: the model has {n_cls} classes "
                             f"(0..{n_cls - 1})")
    return output.gather(1, classes[:, None])[:, 0], classes


def first_target(target: Target) -> Target:
    """The target of a batch's first input alone (a probe of one input, as FastForward's check): one class of a
    per-input tensor or sequence; a single class or a callable as it is."""
    if target is None or callable(target):
        return target
    t = torch.as_tensor(target).flatten()
    return t[:1] if t.numel() > 1 else target


def _batch_of(output) -> int | None:
    logits = field(output, ("logits",))
    output = output if logits is None else logits
    if isinstance(output, Tensor):
        return int(output.shape[0]) if output.dim() else None
    if isinstance(output, (list, tuple)) and output and all(isinstance(v, dict) for v in output):
        return len(output)  # a list of per-image results (detection)
    return None


def check_target(target) -> None:
    """Malformed targets are refused before any forward pass."""
    if target is None or callable(target):
        return
    try:
        t = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"target must be a class index, one per input, or a callable, not {target!r}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"target classes must be integers, got {target!r}")


# ----------------------------------------------------------------------------------------------------------------
# batches and maps


def _check_batch(inputs):
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a batch (N, C, ...), got {shape}")


def _chunked(inputs, target, chunk_size, fn):
    """fn(inputs chunk, target chunk) over chunks of the batch; results concatenated."""
    check_chunk_size(chunk_size)
    n = inputs.shape[0]
    size = n if chunk_size is None else chunk_size
    per_input = target is not None and not callable(target) and torch.as_tensor(target).numel() == n > 1
    parts = [fn(inputs[i:i + size], torch.as_tensor(target)[i:i + size] if per_input else target)
             for i in range(0, n, size)]
    return [torch.cat(p) if p[0] is not None else None for p in zip(*parts)]


FOLD_BUDGET = 256 * 2**20  # the largest model (parameters and buffers, bytes) FastForward copies to fold


class FastForward:
    """model(x) for the many no-grad forward passes of a perturbation method (Score-CAM's masks, occlusion's
    placements, the metrics' perturbed inputs), faster and with the same values: a copy of an eval-mode model with
    each BatchNorm folded into the convolution (or linear layer) whose output only it reads (torch.fx's ``fuse``:
    one pass over each activation less), fed 4D inputs in channels-last memory (every pass the same way, so that
    scores compared with each other come from the same computation; see :func:`fastest_format`, ``timed=False``; the
    model itself is untouched). Measured on this project's 2-core CPU, a batch of 8 at 224 px: MobileNetV2 1.57x and
    ResNet-50 1.22x from channels-last memory alone; folding MobileNetV2 at 112 px 1.5x.

    The model itself runs where folding does not apply: no BatchNorm, a model fx cannot trace or copy, hooks on
    it (the traced copy would not run them all), parameters and buffers over FOLD_BUDGET (the folded convolutions
    are copies), or a copy whose ``score(output)`` on ``probe`` differs from the model's (checked once). The caller
    holds a ModelGuard in eval mode and no autograd (a pass may run twice). ``fast``: 4D inputs, and channels-last
    memory works for this model (its code did not raise in it)."""

    def __init__(self, model: nn.Module, probe: Tensor, score: Callable):
        self.run = _folded(model, probe, score)
        self.model, self.four = model, probe.dim() == 4

    @property
    def fast(self) -> bool:
        return self.four and not _FORMATS.refused(self.model)

    def __call__(self, x: Tensor):
        return fastest_format(self.model, x, self.run, timed=False)


FORMAT_TRIES = 2  # timed passes of each way to run before fastest_format keeps the fastest
FORMAT_SHAPES = 32  # input shapes remembered per model (the oldest is forgotten)


class _Formats:
    """fastest_format's timings: per model (weakly held: a model that is deleted takes its entry along) and input
    shape, the seconds of each timed pass of each way to run it ("last": channels-last memory, "given",
    and any other the caller offers); and the models whose code raised in channels-last memory."""

    def __init__(self):
        self.times: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.broken: weakref.WeakSet = weakref.WeakSet()
        self.lock = threading.Lock()

    def refused(self, model) -> bool:
        try:
            return model in self.broken
        except TypeError:  # not weakly referable: never marked
            return False

    def pick(self, model, key, ways: Sequence[str]) -> str:
        """The way the next pass runs: while any has fewer than FORMAT_TRIES timed passes, the first of those with
        the fewest; then the fastest by its best pass."""
        with self.lock:
            seen = self.table(model).get(key, {})
            counts = [len(seen.get(w, ())) for w in ways]
            if min(counts) < FORMAT_TRIES:
                return ways[counts.index(min(counts))]
            return _fastest(seen, ways)

    def settled(self, model, key) -> str | None:
        """The way pick keeps, once every way seen has FORMAT_TRIES timed passes; None before."""
        with self.lock:
            seen = self.table(model).get(key, {})
            if not seen or min(len(t) for t in seen.values()) < FORMAT_TRIES:
                return None
            return _fastest(seen, seen)

    def table(self, model) -> dict:
        try:
            return self.times.setdefault(model, {})
        except TypeError:
            return {}

    def record(self, model, key, way: str, seconds: float) -> None:
        with self.lock:
            table = self.table(model)
            seen = table.pop(key, {})  # re-inserted last: the oldest shape is the first one
            if len(seen.setdefault(way, [])) < FORMAT_TRIES:
                seen[way].append(seconds)
            table[key] = seen
            while len(table) > FORMAT_SHAPES:
                table.pop(next(iter(table)))

    def refuse(self, model) -> None:
        with contextlib.suppress(TypeError):
            self.broken.add(model)


def _fastest(seen: dict, ways) -> str:
    """The way of ways whose best timed pass in seen is the shortest (the first such, on a tie)."""
    return min(ways, key=lambda w: min(seen[w]))


_FORMATS = _Formats()


def fastest_format(model: nn.Module, x: Tensor, fn: Callable[[Tensor], object],
                   others: dict[str, Callable] | None = None, *, timed: bool = True):
    """fn(x) with x (a 4D CPU batch) in the memory format that model's passes run fastest in: channels-last (faster
    convolutions for most nets on a CPU, measured on this project's 2-core CPU, one thread, batch 1 at 224 px:
    VGG-11 1.13x, DenseNet-121 1.13x, MobileNetV2 1.11x) or as given (ResNet-50 at batch 1: 1.37x faster as given,
    as torch sends its 1x1 convolutions to a GEMM that copies channels-last maps back and forth; at batch 8 it is
    1.23x faster channels-last). The values are the same up to float rounding (a convolution sums in another order:
    about 1e-6 relative), so a call that explores may differ from the next in the last bits: callers whose results
    compare passes with each other (the perturbation methods and metrics, through FastForward) take ``timed=False``,
    channels-last every time. ``others``: more ways to compute the same values, by name (the CAMs' inference copy),
    timed beside the two formats.

    Per model and input shape, the first passes take each way in turn (channels-last first) until each has
    FORMAT_TRIES timed passes (the first pass of each pays for its kernels' set-up), and the later ones take the
    fastest. A model whose code needs contiguous maps (``.view`` after a convolution) raises in channels-last: it
    runs again as given, and never channels-last again.
    Times are the process's CPU seconds (on a shared machine another process's load does not decide). Not timed
    (``timed=False``, or on a GPU, where a pass's time is not known without a synchronisation): channels-last always
    (as the convolution libraries prefer); other inputs run as given."""
    others = others or {}
    if x.dim() != 4:
        return fn(x)
    timed = timed and x.device.type == "cpu"
    ways = (() if _FORMATS.refused(model) else ("last",)) + ("given",) + tuple(others)
    shape = (tuple(x.shape), x.dtype)
    way = _FORMATS.pick(model, shape, ways) if timed else ways[0]
    start = time.process_time()
    if way == "last":
        try:
            out = fn(x.contiguous(memory_format=torch.channels_last))
        except RuntimeError:
            out = fn(x)  # raises again where the error was not the memory format's
            _FORMATS.refuse(model)
            return out
    else:
        out = others[way](x) if way in others else fn(x)
    if timed:
        _FORMATS.record(model, shape, way, time.process_time() - start)
    return out


def settled_way(model: nn.Module, x: Tensor) -> str | None:
    """The way fastest_format keeps for model and x's shape ("last", "given" or one of its ``others``), or None while
    it is still timing them."""
    return _FORMATS.settled(model, (tuple(x.shape), x.dtype))


@torch.no_grad()
def _folded(model: nn.Module, probe: Tensor, score: Callable) -> nn.Module:
    """FastForward's BatchNorm-folded copy of model, or model itself where folding does not apply."""
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if size > FOLD_BUDGET or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) or \
            any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # inplace=True skips only fuse's deepcopy of the whole model: the traced copy has containers of its
            # own, each folded convolution is a new module set on them, and the model's modules are left as they
            # are (those not folded are shared, run without gradients under the caller's guard)
            copy = fuse(model, inplace=True)
        want = score(model(probe))
        try:  # as the passes will run it: channels-last (MobileNetV2 at 224 px: 12 ms, contiguous 22 ms)
            out = copy(probe.contiguous(memory_format=torch.channels_last)) if probe.dim() == 4 else copy(probe)
        except RuntimeError:
            out = copy(probe)
        got = score(out)
        same = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    except Exception:  # noqa: BLE001 - any model fx cannot trace or copy runs as it is
        return model
    return copy if same else model


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(N, *grid) -> (N, *size): linear, bilinear or trilinear (align_corners=False)."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[maps.dim() - 1]
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode, align_corners=False)[:, 0]
