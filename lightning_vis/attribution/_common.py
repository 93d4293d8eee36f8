"""What every attribution method shares: the result types (Attribution, CAM), the target path (target_scores: the
(N,) scores a method explains, from any model output; check_target refuses malformed targets before any pass), the
batch checks, chunking over the batch (_chunked), upsampling of low-resolution maps to the input, and FastForward
(the perturbation methods' many no-grad passes, faster with the same values)."""

from __future__ import annotations

import warnings
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
    one pass over each activation less), fed 4D inputs in channels-last memory (faster convolutions on a CPU; the
    model itself is untouched). Measured on this project's 2-core CPU, a batch of 8 at 224 px: MobileNetV2 1.57x
    and ResNet-50 1.22x from channels-last memory alone; folding MobileNetV2 at 112 px 1.5x.

    The model itself runs where folding does not apply: no BatchNorm, a model fx cannot trace or copy, hooks on
    it (the traced copy would not run them all), parameters and buffers over FOLD_BUDGET (the folded convolutions
    are copies), or a copy whose ``score(output)`` on ``probe`` differs from the model's (checked once). A model
    whose code needs contiguous maps (``.view`` after a convolution) raises in channels-last memory: it then runs
    as given from that pass on. The caller holds a ModelGuard in eval mode and no autograd (a pass may run twice)."""

    def __init__(self, model: nn.Module, probe: Tensor, score: Callable):
        self.run = _folded(model, probe, score)
        self.fast = probe.dim() == 4

    def __call__(self, x: Tensor):
        if self.fast:
            try:
                return self.run(x.contiguous(memory_format=torch.channels_last))
            except RuntimeError:
                self.fast = False
        return self.run(x)


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
