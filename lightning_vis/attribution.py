"""Where does the network look? Saliency (and SmoothGrad), guided backprop, the Grad-CAM family (Grad-CAM,
Grad-CAM++, Layer-CAM, Guided Grad-CAM; the rest of the family in lightning_vis.cams) and attention maps / attention
rollout.

Batched over inputs; for 1D, 2D and 3D (video) conv nets and for attention models. Every method runs in eval mode
inside a ModelGuard (the model comes back exactly as it was) and takes gradients with the parameters frozen
(``torch.autograd.grad``, or ``.backward()`` into the method's own input copy), so parameters' ``.grad`` is never
touched.

Targets (``target=``): None (each input's top prediction), one class index for all, one per input (a sequence
or tensor), or a callable ``f(output) -> (N,)`` scores, applied to whatever the model returns (dicts of
segmentation models, lists of detections, tuples, dataclasses; ready-made ones in lightning_vis.targets). Class
targets read (N, classes) logits, or the ``logits`` field of a dict, dataclass or namedtuple output (transformers'
ModelOutput).

Inputs: an image batch, or for models that take more (CLIP) a dict of the model's inputs with the image under
``pixel_values``: the image alone is varied and explained (see lightning_vis.inputs; attention_maps and the default
CAM layer leave out the modules that never see the image, a text tower's).

Layers: anything hooks.layout can place (channels-first and channels-last maps, tokens on a 2D or space-time grid
with any prefix tokens); ``layout=`` / ``grid=`` override it. Models with activation checkpointing work (see
hooks.checkpoint).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import ModelGuard, capture, capture_attention, resolve_layers
from .hooks.attention import grid_fits, key_layout
from .hooks.checkpoint import (HOW_TO_TURN_OFF, _is_reentrant_error, check_chunk_size, input_gradient, reentrant_guard,
                               rules_unreachable)
from .hooks.layout import MAX_PREFIX, Layout, LayoutError, LayoutTracer, Unplaceable, _first_tensor
from .hooks.resolve import LayerSpec
from .inputs import ImageInputs, image_model, image_modules
from . import cams
from .hooks.rules import BackwardRules
from .targets import LOGITS, describe, field
from .targets import default as default_target

Target = int | Sequence[int] | Tensor | Callable[[Tensor], Tensor] | None

CAM_METHODS = ("gradcam", "gradcam++", "layercam", "guided-gradcam", *cams.FROM_GRADIENTS, *cams.RERUNS)


@dataclass
class Attribution:
    """maps: (N, *input shape) for saliency and guided backprop; (N, *input spatial) for CAMs.
    targets: (N,) class indices (None for a callable target); scores: (N,) the target scores explained."""

    maps: Tensor
    targets: Tensor | None
    scores: Tensor
    method: str


@dataclass
class CAM(Attribution):
    """A class activation map: ``maps`` upsampled to the input, ``low_res`` at the layer's resolution (N, *grid),
    and for Guided Grad-CAM ``guided`` (N, *input shape): guided backprop times the map."""

    low_res: Tensor | None = None
    layer: str = ""
    guided: Tensor | None = None

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
# input gradients: saliency, SmoothGrad, guided backprop


def _input_gradient(model, inputs, target, rule):
    x = inputs.detach().clone().requires_grad_(True)
    rules = BackwardRules(rule) if rule else contextlib.nullcontext()
    with rules:
        out = model(x)
    if rule and rules.skipped_no_grad:
        raise rules_unreachable(f"{rule} backprop", f"the {rule} rules")
    scores, classes = target_scores(out, target)
    g = input_gradient(scores.sum(), x)  # each score depends on its own input only (eval mode)
    return g, scores.detach(), classes


def _chunked(inputs, target, chunk_size, fn):
    """fn(inputs chunk, target chunk) over chunks of the batch; results concatenated."""
    check_chunk_size(chunk_size)
    n = inputs.shape[0]
    size = n if chunk_size is None else chunk_size
    per_input = target is not None and not callable(target) and torch.as_tensor(target).numel() == n > 1
    parts = [fn(inputs[i:i + size], torch.as_tensor(target)[i:i + size] if per_input else target)
             for i in range(0, n, size)]
    return [torch.cat(p) if p[0] is not None else None for p in zip(*parts)]


@torch.enable_grad()  # gradients are the method: also when called inside the caller's torch.no_grad()
def saliency(model: nn.Module, inputs: Tensor, target: Target = None, *, samples: int = 0, noise: float = 0.15,
             seed: int = 0, absolute: bool = True, chunk_size: int | None = None) -> Attribution:
    """The gradient of the target score with respect to the input (Simonyan et al.), as |grad| by default.

    samples > 0: SmoothGrad (Smilkov et al.): the mean over `samples` copies of each input with Gaussian noise of
    standard deviation noise * (max - min of that input), drawn from a generator seeded with `seed` (the same
    seed gives the same map, on any device). The noisy copies run batched, chunk_size inputs at a time.
    maps: (N, *input shape)."""
    if samples < 0:
        raise ValueError(f"samples must be >= 0 (0: plain gradient), got {samples}")
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    check_target(target)

    def plain(x, t):
        g, s, c = _input_gradient(model, x, t, None)  # plain autograd
        return (g.abs() if absolute else g), s, c

    with ModelGuard(model, eval=True, freeze=True):
        if samples == 0:
            maps, scores, classes = _chunked(inputs, target, chunk_size, plain)
            return Attribution(maps, classes, scores, "saliency")
        # the class explained is the clean input's (as captum's NoiseTunnel with the same target)
        with torch.no_grad():
            if target is None:
                target = target_scores(model(inputs), None)[1]
        gen = torch.Generator().manual_seed(seed)
        span = (inputs.flatten(1).amax(1) - inputs.flatten(1).amin(1)).view(-1, *[1] * (inputs.dim() - 1))
        noise_t = torch.randn((samples, *inputs.shape), generator=gen).to(inputs.device, inputs.dtype)
        noisy = (inputs[None] + noise * span[None] * noise_t).flatten(0, 1)  # (samples * N, ...)
        rep = target if callable(target) or torch.as_tensor(target).numel() == 1 else \
            torch.as_tensor(target).repeat(samples)
        maps, scores, classes = _chunked(noisy, rep, chunk_size, plain)
        maps = maps.view(samples, *inputs.shape).mean(0)
        scores = scores.view(samples, -1).mean(0)
        classes = None if classes is None else classes[:inputs.shape[0]]
    return Attribution(maps, classes, scores, "smoothgrad")


@torch.enable_grad()
def guided_backprop(model: nn.Module, inputs: Tensor, target: Target = None, *,
                    chunk_size: int | None = None) -> Attribution:
    """Guided backpropagation (Springenberg et al.): the input gradient of the target score where every ReLU
    (module or functional, ReLU6 too) passes only positive gradient at positive input. maps: (N, *input shape)."""
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    check_target(target)
    with ModelGuard(model, eval=True, freeze=True):
        maps, scores, classes = _chunked(inputs, target, chunk_size,
                                         lambda x, t: _input_gradient(model, x, t, "guided"))
    return Attribution(maps, classes, scores, "guided_backprop")


# ----------------------------------------------------------------------------------------------------------------
# the Grad-CAM family


def cam_from(act: Tensor, grad: Tensor, method: str = "gradcam") -> Tensor:
    """The map of one method from a layer's activations and gradients, both (N, C, *spatial) -> (N, *spatial)."""
    dims = tuple(range(2, act.dim()))
    expand = (...,) + (None,) * len(dims)
    if method in ("gradcam", "guided-gradcam"):
        cam = cams.grad_weighted(act, grad)
    elif method == "gradcam++":  # Chattopadhyay et al., closed form with exp(score) (as pytorch-grad-cam)
        g2, g3 = grad.pow(2), grad.pow(3)
        alpha = g2 / (2 * g2 + act.sum(dims)[expand] * g3 + 1e-7)
        alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
        weights = (grad.clamp_min(0) * alpha).sum(dims)
        cam = (weights[expand] * act).sum(1)
    elif method == "layercam":  # Jiang et al.: positive gradients weigh each position
        cam = (grad.clamp_min(0) * act).sum(1)
    elif method in cams.FROM_GRADIENTS:
        cam = cams.FROM_GRADIENTS[method](act, grad)
    else:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    return cam.clamp_min(0)


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(N, *grid) -> (N, *size): linear, bilinear or trilinear (align_corners=False)."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[maps.dim() - 1]
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode, align_corners=False)[:, 0]


@torch.enable_grad()
def grad_cam(model: nn.Module, inputs: Tensor, layer: LayerSpec | None = None, target: Target = None, *,
             method: str = "gradcam", layout=None, grid=None, chunk_size: int | None = None) -> CAM:
    """Class activation maps of one layer: method "gradcam" (Selvaraju et al.), "gradcam++", "layercam",
    "guided-gradcam" (Grad-CAM times guided backprop, in ``.guided``), or one of lightning_vis.cams: "hirescam",
    "xgradcam", "gradcam-elementwise", "eigengradcam", "shapleycam" (with the Hessian-vector product of the score
    at the layer), "finercam" (Grad-CAM of the target class against the 3 classes nearest to it: class targets
    only), from activations and gradients; "eigencam", "kpcacam", "fem" from the activations alone (one forward
    pass, no backward); "scorecam" and "ablationcam" (which run the network again on (image, channel) pairs,
    batched).

    layer: None picks one (see :func:`default_cam_layer`: the last layer with maps over the input; for a
    class-token transformer the last block's pre-attention norm). maps: (N, *input spatial), upsampled
    (bi/tri)linearly from the layer's grid, >= 0, not normalised (see ``CAM.normalized``). Conv layers (1D, 2D, 3D),
    channels-last maps (Swin) and token layers on their grid (ViT, DeiT, LeViT; MViT's space-time tokens give
    (N, T, H, W) maps) alike, as hooks.layout decides; ``layout=`` / ``grid=`` override it. Only the part of the
    network above the layer is differentiated (the parameters are frozen). A layer whose gradient is zero everywhere
    gets a warning naming a layer that works."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    check_target(target)
    probe = inputs if isinstance(model, ImageInputs) else inputs[:1]  # other inputs may be one per image (CLIPSeg)
    if layer is None:
        layer = default_cam_layer(model, probe, target)
    found = resolve_layers(model, layer)
    if len(found) != 1:
        raise ValueError(f"grad_cam takes one layer; {layer!r} names {len(found)}: {', '.join(found)}")
    (name, module), = found.items()
    zero = []

    if method == "finercam" and callable(target) and not isinstance(target, torch.Tensor):
        raise ValueError("finercam compares the target class with the classes nearest to it: it takes a class "
                         "target (an index, one per input, or None for the top class), not a callable")

    def one(x, t):
        if method in cams.NO_GRADIENT:
            (lay, act, scores, classes), grad = _layer_forward(model, x, t, name, layout, grid), None
        elif method == "finercam":
            finer = _FinerTarget(t)
            lay, act, grad, scores, _ = _layer_gradient(model, x, finer, name, layout, grid)
            classes = finer.classes
        else:
            second = method == "shapleycam"
            with cams.twice_differentiable() if second else contextlib.nullcontext():
                lay, act, grad, scores, classes = _layer_gradient(model, x, t, name, layout, grid, second=second)
                if second:
                    grad = cams.shapley_gradient(act, grad)
        if lay.kind == "vector" or lay.spatial_dims != x.dim() - 2:
            what = "a vector" if lay.kind == "vector" else f"{lay.spatial_dims}D maps ({lay.describe()})"
            raise ValueError(f"layer {name!r} outputs {tuple(act.shape)}, {what}: no spatial map over the "
                             f"{x.dim() - 2}D input {tuple(x.shape)}; pick a layer with maps over the input (or "
                             "layer=None)")
        a = lay.to_maps(act.detach())
        g = a if grad is None else lay.to_maps(grad.detach())  # the gradient-free methods read no gradient
        if grad is not None:
            zero.append(bool(g.abs().amax() == 0))
        if method == "scorecam":
            low = cams.scorecam(model, x, a, t, classes, _scores_of).clamp_min(0)
        elif method == "ablationcam":
            low = cams.ablationcam(model, x, name, lay, act.detach(), t, classes, scores.detach(),
                                   _scores_of).clamp_min(0)
        else:
            low = cam_from(a.float(), g.float(), method)
        return upsample(low, x.shape[2:]), low, scores.detach(), classes

    with ModelGuard(model, eval=True, freeze=True):
        maps, low, scores, classes = _chunked(inputs, target, chunk_size, one)
    if zero and all(zero):
        try:
            better = default_cam_layer(model, probe, target)
        except ValueError:
            better = None
        hint = f"; a layer that works: {better!r}" if better and better != name else ""
        warnings.warn(f"grad_cam: the target's gradient at layer {name!r} is zero everywhere on its grid, so the map "
                      "is empty (after the last block of a class-token transformer only the class token reaches the "
                      f"head){hint}", RuntimeWarning, stacklevel=2)
    cam = CAM(maps, classes, scores, method, low_res=low, layer=name)
    if method == "guided-gradcam":
        gb = guided_backprop(model, inputs, classes if classes is not None else target, chunk_size=chunk_size)
        cam.guided = gb.maps * maps[:, None]
    return cam


# layers whose bias FullGrad reads: torch's own convolutions and BatchNorms (a subclass that changes forward, timm's
# BatchNormAct2d, returns more than the affine output, so its output's gradient is not its bias's)
_BIASED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.enable_grad()
def fullgrad(model: nn.Module, inputs: Tensor, target: Target = None, *, chunk_size: int | None = None) -> CAM:
    """FullGrad (Srinivas and Fleuret): |input-gradient x input| plus, for every convolution and BatchNorm with a
    bias whose output is a map of the input's dimensionality, |bias x the gradient at its output| (an eval-mode
    BatchNorm's bias: beta - mean gamma / sqrt(var + eps)); each (image, channel) map min-max scaled, summed over
    channels, resized to the input ((bi/tri)linearly) and summed over the layers, as pytorch-grad-cam's FullGrad
    (which takes Conv2d and BatchNorm2d). One forward and one backward pass per chunk of the batch, every layer's
    gradient from it. maps: (N, *input spatial), not normalised (``CAM.normalized`` is pytorch-grad-cam's map).
    Layers named for grad_cam do not apply: every biased layer is used."""
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    check_target(target)
    if not 3 <= inputs.dim() <= 5:
        raise ValueError(f"fullgrad explains 1D, 2D or 3D inputs (N, C, ...); got {tuple(inputs.shape)}")
    biased = {}
    for name, m in model.named_modules():
        base = next((b for b in _BIASED if isinstance(m, b)), None)
        if base is None or type(m).forward is not base.forward or getattr(m, "bias", None) is None:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise ValueError(f"fullgrad: BatchNorm {name!r} keeps no running statistics (track_running_stats=False), "
                             "so its bias varies with the batch; FullGrad needs a fixed bias")
        biased[name] = m
    with ModelGuard(model, eval=True, freeze=True), reentrant_guard("fullgrad"):
        maps, scores, classes = _chunked(inputs, target, chunk_size, lambda x, t: _fullgrad(model, x, t, biased))
    return CAM(maps, classes, scores, "fullgrad")


def _fullgrad(model, x, target, biased):
    def scaled_sum(t):  # |t| (N, C, *grid): each (image, channel) map min-max scaled, summed over channels
        flat = t.abs().flatten(2)
        lo = flat.amin(2, keepdim=True)
        return ((flat - lo) / (flat.amax(2, keepdim=True) - lo + 1e-7)).sum(1).view(t.shape[0], *t.shape[2:])

    xg = x.detach().clone().requires_grad_(True)
    with capture(model, list(biased), grads=True) if biased else contextlib.nullcontext() as tap:
        out = model(xg)
        scores, classes = target_scores(out, target)
        if not scores.requires_grad:
            raise ValueError("the target's score does not depend on the input through autograd: the model computes "
                             "it under torch.no_grad or from detached tensors, so no gradient method applies")
        outs = [(name, a) for name in biased for a in tap.live.get(name, []) if a.dim() == x.dim()] if tap else []
        grads = torch.autograd.grad(scores.sum(), [xg] + [a for _, a in outs], allow_unused=True)
    total = scaled_sum(grads[0] * x) if grads[0] is not None else x.new_zeros(x.shape[:1] + x.shape[2:])
    for (name, a), g in zip(outs, grads[1:]):
        if g is None:
            continue
        m = biased[name]
        bias = m.bias.detach()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bias = bias - m.running_mean * m.weight.detach() / torch.sqrt(m.running_var + m.eps)
        total = total + upsample(scaled_sum(bias[(...,) + (None,) * (g.dim() - 2)] * g), x.shape[2:])
    return total, scores.detach(), classes


def _scores_of(output, target) -> Tensor:
    return target_scores(output, target)[0]


class _FinerTarget:
    """Finer-CAM's score (lightning_vis.cams.finer_scores) of a class target (None: the top class) as a callable
    target; ``classes`` holds the classes it explained."""

    def __init__(self, target):
        self.target, self.classes = target, None

    def __call__(self, output) -> Tensor:
        _, self.classes = target_scores(output, self.target)  # validated class indices, and the logits read below
        logits = output if isinstance(output, Tensor) else field(output, LOGITS)
        return cams.finer_scores(logits, self.classes)


def _layer_forward(model, x, target, name, layout, grid):
    """(layout, activation, scores, classes) of one layer for a batch, from one forward pass without gradients (the
    CAMs that read the activations alone). Images go in channels-last memory (faster convolutions on a CPU; the
    values are the same); a model whose code needs contiguous maps (``.view``) raises, and runs again as given."""
    tries = [x.contiguous(memory_format=torch.channels_last), x] if x.dim() == 4 else [x]
    for xx in tries:
        try:
            with torch.no_grad(), capture(model, name, layouts=True, layout=layout, grid=grid) as tap:
                out = model(xx)
        except RuntimeError:
            if xx is x:
                raise
            continue
        if not tap.values.get(name):
            raise ValueError(f"layer {name!r} did not run in the forward pass{_ran_inside(tap, name)}")
        scores, classes = target_scores(out, target)
        return tap.layout(name), tap.values[name][0], scores, classes


def _layer_gradient(model, x, target, name, layout, grid, second: bool = False):
    """(layout, activation, d score / d activation, scores, classes) of one layer for a batch, through any kind of
    checkpointing. second: the gradient keeps its graph (create_graph), for a Hessian-vector product at the layer;
    reentrant checkpointing cannot give one."""
    with capture(model, name, grads=True, layouts=True, layout=layout, grid=grid) as tap:
        out = model(x)
        tap.forward_done()
        if not tap.live.get(name):
            raise ValueError(f"layer {name!r} did not run in the forward pass{_ran_inside(tap, name)}")
        lay = tap.layout(name)
        scores, classes = target_scores(out, target)
        act = tap.live[name][0]
        if name not in tap.ungraded:
            try:
                (grad,) = torch.autograd.grad(scores.sum(), act, allow_unused=True, retain_graph=True,
                                              create_graph=second)
            except RuntimeError as e:
                if not _is_reentrant_error(e):
                    if not scores.requires_grad:  # nothing of the score's graph reaches back to the layer
                        raise ValueError(f"the target's score does not depend on layer {name!r}: name a layer it is "
                                         "computed from") from None
                    raise
            else:
                if grad is None:
                    raise ValueError(f"the target does not depend on layer {name!r}")
                return lay, act, grad, scores, classes
    if second:
        raise ValueError(f"layer {name!r}: second derivatives (shapleycam) do not pass reentrant "
                         f"torch.utils.checkpoint; {HOW_TO_TURN_OFF}")
    # reentrant torch.utils.checkpoint: no autograd.grad, and a layer inside a segment ran under no_grad. Run again
    # with an input that needs gradients and catch the layer's gradient with a tensor hook during .backward(): on the
    # layer's output itself, or, inside a segment, on its recomputation.
    xg = x.detach().clone().requires_grad_(True)
    with capture(model, name, grads=True) as tap:
        out = model(xg)
        tap.forward_done()
        if name not in tap.ungraded:
            tap.live[name][0].register_hook(lambda g: tap.late_grads[name].append(g))
        scores, classes = target_scores(out, target)
        input_gradient(scores.sum(), xg)
        if not tap.late_grads.get(name):
            raise ValueError(f"the target does not depend on layer {name!r}")
        return lay, tap.values[name][0], tap.late_grads[name][0], scores, classes


def _ran_inside(tap, name: str) -> str:
    """A hint when a container did not run but its children did (timm's checkpoint_seq calls the blocks of a stage
    one by one): the last of them that ran."""
    inside = [k for k in (tap.tracer.layouts if tap.tracer is not None else {}) if k.startswith(name + ".")]
    return f"; the model calls its parts directly: pick one of them, e.g. {inside[-1]!r}" if inside else ""


def _score_reaches(model: nn.Module, inputs: Tensor, names: list[str], target: Target) -> set[str] | None:
    """Which of `names`' outputs the target's score depends on (one forward and backward on the inputs, no
    parameter's .grad touched), or None where that cannot be told (the target does not fit these inputs)."""
    modules = dict(model.named_modules())
    outs: dict[str, Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            t = _first_tensor(output)
            if t is not None and name not in outs:
                outs[name] = t
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    try:
        with ModelGuard(model, eval=True), torch.enable_grad():
            try:
                out = model(inputs.detach().requires_grad_(True))
            finally:
                for h in handles:
                    h.remove()
            scores = target_scores(out, target)[0]
            kept = [n for n in names if n in outs and outs[n].requires_grad]
            if not scores.requires_grad or not kept:
                return set()
            grads = torch.autograd.grad(scores.sum(), [outs[n] for n in kept], allow_unused=True)
    except (ValueError, TypeError, IndexError, RuntimeError):
        return None
    return {n for n, g in zip(kept, grads) if g is not None}


def default_cam_layer(model: nn.Module, inputs: Tensor, target: Target = None) -> str:
    """The layer grad_cam uses when none is named: the last layer (in the order layers finish) whose output is a map
    over the input (a grid of the input's dimensionality, larger than 1 on every axis; not a head's adaptive pooling)
    and that runs once, outside any module whose output is not a map (DETR's decoder projects the image features
    into keys and values for its queries: a map, but read by queries); for
    tokens with a class token in front (ViT, DeiT, MViT: the head reads only the class token after the last block)
    the last block's pre-attention norm, as pytorch-grad-cam's documentation advises."""
    finished, calls = [], {}
    handles = []
    named = list(model.named_modules())

    def hook_for(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                finished.append(name)
        return hook

    with ModelGuard(model, eval=True), torch.no_grad(), LayoutTracer(model) as tracer:
        try:
            for k, m in named:
                if k:
                    handles.append(m.register_forward_hook(hook_for(k)))
            model(inputs)
        finally:
            for h in handles:
                h.remove()
    spatial = inputs.dim() - 2

    modules = dict(named)

    queries = [k for k, lay in tracer.layouts.items() if isinstance(lay, Unplaceable) and lay.not_a_map]

    def maps_over_input(k):
        lay = tracer.layouts.get(k)
        return isinstance(lay, Layout) and lay.kind != "vector" and lay.spatial_dims == spatial and \
            all(g > 1 for g in lay.grid) and calls.get(k) == 1 and not isinstance(modules[k], _ADAPTIVE) and \
            not any(k.startswith(q + ".") for q in queries)

    seen = image_modules(model, inputs)  # a multi-input model: only what depends on the image is a map over it
    candidates = [k for k in finished if maps_over_input(k) and (seen is None or k in seen)]
    if not candidates:
        raise ValueError("no layer of the model gives maps over the input (a grid of its size); name one with layer=")
    reached = _score_reaches(model, inputs, candidates, target if target is None or callable(target) else None)
    if reached is not None:  # the score may read only part of the maps (Mask2Former's classes: not its mask features)
        if not reached:
            raise ValueError("the target's score depends on no layer that gives maps over the input; name one with "
                             "layer=")
        candidates = [k for k in candidates if k in reached]
    last = candidates[-1]
    lay = tracer.layouts[last]
    if lay.kind == "tokens" and lay.prefix > 0:
        blocks = [k for k in finished if any(_is_attention(c) for c in modules[k].children())]
        for block in reversed(blocks):
            norms = [f"{block}.{c}" for c, m in modules[block].named_children()
                     if isinstance(m, nn.LayerNorm) and maps_over_input(f"{block}.{c}")]
            if norms:
                return norms[0]
    return last


_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)  # a head's pooling to a fixed size (VGG's 7x7): not a map


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def _check_batch(inputs):
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a batch (N, C, ...), got {shape}")


# ----------------------------------------------------------------------------------------------------------------
# attention


def _check_class_token(class_token) -> None:
    if class_token not in ("auto", "first", "none"):
        raise ValueError(f"class_token must be 'auto', 'first' or 'none', not {class_token!r}")


def _attention_records(model, inputs, layers):
    with ModelGuard(model, eval=True), torch.no_grad(), capture_attention(model, layers) as tap:
        model(inputs)
    seen = image_modules(model, inputs)  # a multi-input model: a text tower's attention is not over the image
    records = [r for r in tap.records if seen is None or r.layer in seen]
    if tap.records and not records:
        raise ValueError(f"the attention found ({tap.records[0].layer!r}, ...) never sees the image: name layers of "
                         "the image tower, or none")
    if not records:
        where = "the layers named" if layers is not None else "the model"
        failed = f"; reading them failed: {tap.failures[0]}" if tap.failures else ""
        raise ValueError(f"no attention weights were computed in {where} during the forward pass (looked for "
                         "nn.MultiheadAttention, F.scaled_dot_product_attention and softmax over the last axis)"
                         f"{failed}")
    return records


def attention_maps(model: nn.Module, inputs: Tensor, layers: LayerSpec | None = None, *, class_token: str = "auto",
                   grid=None) -> dict[str, Tensor]:
    """Per attention layer, per head, what the class token attends to on the input's grid: {layer: (N, heads,
    *grid)}; without a class token (Swin, LeViT), the attention each position receives, averaged over the queries.

    Attention from whatever computes it (hooks.capture_attention): nn.MultiheadAttention (torchvision's ViT),
    F.scaled_dot_product_attention (timm's fused attention), explicit softmax (LeViT's biases, MViT's pooled keys on
    their space-time grid); window attention (Swin, MaxViT, MobileViT) placed back on the image grid. layers: the
    modules to watch (default: every module in which attention happens). class_token: "auto" (from the token
    layout), "first" or "none" (mean over queries). A pooling head (SigLIP's MAP head, CLIP's attention pool): its
    one query's map. A decoder (DETR): its cross-attention per object query, (N, heads, queries, *grid); its
    self-attention (queries over queries) is no map of the image. A layer whose attention cannot be placed is left
    out with a warning (an error when none can). grid: the keys' (h, w) / (t, h, w) grid, for the layers it fits
    (0 to hooks.layout.MAX_PREFIX tokens in front of it); the others keep the grid their tokens have."""
    _check_class_token(class_token)
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    records = _attention_records(model, inputs, layers)
    if grid is not None:  # a grid that fits no layer would be ignored everywhere: say so
        counts = sorted({r.weights.shape[-1] for r in records if r.kind == "global"})
        if counts and not any(grid_fits(c, grid) for c in counts):
            raise LayoutError(f"attention_maps: the grid given, {tuple(grid)}, fits none of the layers' key counts "
                              f"({', '.join(map(str, counts))}; a grid with 0 to {MAX_PREFIX} prefix tokens in front)")
    maps, skipped = {}, {}
    for r in records:
        if r.layer in maps or r.layer in skipped:
            continue  # the first call of each module
        try:
            maps[r.layer] = r.received(class_token, grid)
        except ValueError as e:
            skipped[r.layer] = str(e)
    if not maps:
        raise LayoutError(next(iter(skipped.values())))
    if skipped:
        warnings.warn(f"attention_maps: left out {len(skipped)} layer(s): {next(iter(skipped.values()))}",
                      RuntimeWarning, stacklevel=2)
    return maps


def rollout(attentions: Sequence[Tensor], *, head_fusion: str = "mean", discard_ratio: float = 0.0,
            residual: bool = True, keep: int = 1) -> Tensor:
    """Attention rollout (Abnar and Zuidema) of per-block weights [(N, heads, L, L), ...] in forward order:
    heads fused (mean, max or min), optionally the smallest discard_ratio of each row's weights dropped (never
    the first `keep` (prefix) tokens'), residual: A <- (A + I) / 2, rows renormalised, then A_last @ ... @ A_first.
    -> (N, L, L)."""
    if not attentions:
        raise ValueError("rollout needs the weights of at least one attention block")
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', not {head_fusion!r}")
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    fuse = {"mean": lambda w: w.mean(1), "max": lambda w: w.amax(1), "min": lambda w: w.amin(1)}[head_fusion]
    result = None
    for w in attentions:
        a = fuse(w.float())
        if discard_ratio > 0:
            k = int(a.shape[-1] * discard_ratio)
            if k:
                low = a[..., keep:].topk(k, dim=-1, largest=False).indices + keep
                a = a.scatter(-1, low, 0.0)
        if residual:
            a = (a + torch.eye(a.shape[-1], device=a.device)) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def attention_rollout(model: nn.Module, inputs: Tensor, layers: LayerSpec | None = None, *,
                      head_fusion: str = "mean", discard_ratio: float = 0.0, class_token: str = "auto",
                      grid=None) -> Tensor:
    """Attention rollout across the attention blocks (in the order they run) as a map on the input's grid (N, *grid):
    the class token's row of the rolled-out matrix, its prefix tokens dropped (without a class token: the mean row).

    Defined where every block attends over the same tokens (ViT, DeiT, token-mixing models); refused with a clear
    error where it is not: window attention (Swin, MaxViT: attention stays inside windows, there are no token-to-token
    paths to multiply) and attention whose token count changes (MViT's pooling, LeViT's subsampling). Pooling heads
    (one query attending to the tokens: SigLIP's MAP head) and decoders (DETR's object queries) are left out: the
    rollout runs over the tokens' own self-attention (DETR's encoder)."""
    _check_class_token(class_token)
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    everything = _attention_records(model, inputs, layers)
    records = [r for r in everything if not r.role]
    if not records:
        r = everything[0]
        what = {"pool": "a pooling head's (one query attending to the tokens)", "decoder": "a decoder's",
                "sampling": "deformable (over sampling points)"}[r.role]
        raise ValueError(f"attention rollout needs the tokens' own self-attention; the attention of {r.layer!r} is "
                         f"{what}: use attention_maps")
    windowed = [r for r in records if r.kind != "global"]
    if windowed:
        raise ValueError(f"attention rollout is not defined for window attention ({windowed[0].layer!r}: "
                         f"{windowed[0].scheme or 'windows in the batch'}): each block attends inside windows, so "
                         "there are no token-to-token paths to multiply; use attention_maps")
    sizes = [tuple(r.weights.shape[-2:]) for r in records]
    if any(sq != sk for sq, sk in sizes) or len(set(sizes)) > 1:
        changes = " -> ".join(dict.fromkeys(f"{sq}x{sk}" for sq, sk in sizes))
        raise ValueError(f"attention rollout is not defined here: the blocks attend over different token sets "
                         f"({changes} queries x keys: pooling or subsampling); use attention_maps")
    # every block attends over the same tokens: a grid given must fit them (no other layout to fall back on)
    own = records[0].key if grid is None else None
    key = key_layout(sizes[0][1], own, grid, "attention rollout", records[0].why)
    prefix = key.prefix if class_token != "first" else max(1, key.prefix)
    r = rollout([rec.weights for rec in records], head_fusion=head_fusion, discard_ratio=discard_ratio,
                keep=max(prefix, 1))
    row = r[:, 0] if (class_token != "none" and prefix > 0) else r.mean(1)
    return row[:, prefix:].reshape(r.shape[0], *key.grid)
