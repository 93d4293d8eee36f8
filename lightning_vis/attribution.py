"""Where does the network look? Saliency (and SmoothGrad), guided backprop, the Grad-CAM family (Grad-CAM,
Grad-CAM++, Layer-CAM, Guided Grad-CAM) and attention maps / attention rollout.

Batched over inputs; for 1D, 2D and 3D (video) conv nets and for token layers of attention models, whose
(N, L, D) outputs are put on their patch grid (class token set apart, grid size inferred). Every method runs in
eval mode inside a ModelGuard (the model comes back exactly as it was) and takes gradients with
``torch.autograd.grad`` with the parameters frozen, so parameters' ``.grad`` is never touched.

Targets (``target=``): None (each input's top prediction), one class index for all, one per input (a sequence
or tensor), or a callable ``f(output) -> (N,)`` scores (for models whose output is not (N, classes) logits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import ModelGuard, capture, capture_attention, resolve_layers, tokens_to_grid
from .hooks.attention import is_token_layout
from .hooks.resolve import LayerSpec
from .hooks.rules import BackwardRules

Target = int | Sequence[int] | Tensor | Callable[[Tensor], Tensor] | None

CAM_METHODS = ("gradcam", "gradcam++", "layercam", "guided-gradcam")


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


def target_scores(output: Tensor, target: Target) -> tuple[Tensor, Tensor | None]:
    """(N,) scores to explain and (N,) their class indices (None for a callable target)."""
    if not isinstance(output, Tensor):
        raise ValueError(f"the model returned a {type(output).__name__}; pass a callable target that maps it to "
                         "(N,) scores")
    n = output.shape[0]
    if callable(target) and not isinstance(target, Tensor):
        scores = target(output)
        if not isinstance(scores, Tensor) or scores.shape != (n,):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"a callable target must return (N,) = ({n},) scores, one per input; it returned {got}")
        return scores, None
    if output.dim() != 2:
        raise ValueError(f"a class target needs (N, classes) logits, but the model output has shape "
                         f"{tuple(output.shape)}; pass target=callable(output) -> (N,) scores")
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


# ----------------------------------------------------------------------------------------------------------------
# input gradients: saliency, SmoothGrad, guided backprop


def _input_gradient(model, inputs, target, rule):
    x = inputs.detach().clone().requires_grad_(True)
    with BackwardRules(rule) if rule else contextlib.nullcontext():
        out = model(x)
    scores, classes = target_scores(out, target)
    (g,) = torch.autograd.grad(scores.sum(), x)  # each score depends on its own input only (eval mode)
    return g, scores.detach(), classes


def _chunked(inputs, target, chunk_size, fn):
    """fn(inputs chunk, target chunk) over chunks of the batch; results concatenated."""
    n = inputs.shape[0]
    size = chunk_size or n
    per_input = target is not None and not callable(target) and torch.as_tensor(target).numel() == n > 1
    parts = [fn(inputs[i:i + size], torch.as_tensor(target)[i:i + size] if per_input else target)
             for i in range(0, n, size)]
    return [torch.cat(p) if p[0] is not None else None for p in zip(*parts)]


def saliency(model: nn.Module, inputs: Tensor, target: Target = None, *, samples: int = 0, noise: float = 0.15,
             seed: int = 0, absolute: bool = True, chunk_size: int | None = None) -> Attribution:
    """The gradient of the target score with respect to the input (Simonyan et al.), as |grad| by default.

    samples > 0: SmoothGrad (Smilkov et al.): the mean over `samples` copies of each input with Gaussian noise of
    standard deviation noise * (max - min of that input), drawn from a generator seeded with `seed` (the same
    seed gives the same map, on any device). The noisy copies run batched, chunk_size inputs at a time.
    maps: (N, *input shape)."""
    if samples < 0:
        raise ValueError(f"samples must be >= 0 (0: plain gradient), got {samples}")
    _check_batch(inputs)

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
                target = model(inputs).argmax(1)
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


def guided_backprop(model: nn.Module, inputs: Tensor, target: Target = None, *,
                    chunk_size: int | None = None) -> Attribution:
    """Guided backpropagation (Springenberg et al.): the input gradient of the target score where every ReLU
    (module or functional, ReLU6 too) passes only positive gradient at positive input. maps: (N, *input shape)."""
    _check_batch(inputs)
    with ModelGuard(model, eval=True, freeze=True):
        maps, scores, classes = _chunked(inputs, target, chunk_size,
                                         lambda x, t: _input_gradient(model, x, t, "guided"))
    return Attribution(maps, classes, scores, "guided_backprop")


# ----------------------------------------------------------------------------------------------------------------
# the Grad-CAM family


def spatial_layout(act: Tensor, module: nn.Module, name: str, layout: str = "auto",
                   grid: tuple[int, int] | None = None, input_dims: int = 4) -> Tensor:
    """A layer output as (N, C, *spatial): conv outputs as they are; token outputs (N, L, D) put on their grid
    (class token dropped). layout: "auto" (see hooks.is_token_layout), "channels" or "tokens"."""
    if is_token_layout(act, module, layout, input_dims):
        try:
            return tokens_to_grid(act, grid)[0]
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from e
    if act.dim() < 3 or act.dim() > 5:
        raise ValueError(f"layer {name!r} outputs shape {tuple(act.shape)}, which has no spatial map: a CAM needs "
                         "(N, C, L), (N, C, H, W), (N, C, T, H, W) or tokens (N, L, D); pick a conv or attention "
                         "block")
    return act


def cam_from(act: Tensor, grad: Tensor, method: str = "gradcam") -> Tensor:
    """The map of one method from a layer's activations and gradients, both (N, C, *spatial) -> (N, *spatial)."""
    dims = tuple(range(2, act.dim()))
    expand = (...,) + (None,) * len(dims)
    if method in ("gradcam", "guided-gradcam"):
        weights = grad.mean(dims)
        cam = (weights[expand] * act).sum(1)
    elif method == "gradcam++":  # Chattopadhyay et al., closed form with exp(score) (as pytorch-grad-cam)
        g2, g3 = grad.pow(2), grad.pow(3)
        alpha = g2 / (2 * g2 + act.sum(dims)[expand] * g3 + 1e-7)
        alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
        weights = (grad.clamp_min(0) * alpha).sum(dims)
        cam = (weights[expand] * act).sum(1)
    elif method == "layercam":  # Jiang et al.: positive gradients weigh each position
        cam = (grad.clamp_min(0) * act).sum(1)
    else:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    return cam.clamp_min(0)


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(N, *grid) -> (N, *size): linear, bilinear or trilinear (align_corners=False)."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[maps.dim() - 1]
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode, align_corners=False)[:, 0]


def grad_cam(model: nn.Module, inputs: Tensor, layer: LayerSpec, target: Target = None, *,
             method: str = "gradcam", layout: str = "auto", grid: tuple[int, int] | None = None,
             chunk_size: int | None = None) -> CAM:
    """Class activation maps of one layer: method "gradcam" (Selvaraju et al.), "gradcam++", "layercam" or
    "guided-gradcam" (Grad-CAM times guided backprop, in ``.guided``).

    maps: (N, *input spatial), upsampled (bi/tri)linearly from the layer's grid, >= 0, not normalised (see
    ``CAM.normalized``). 3D conv layers give (N, T, H, W) maps; token layers are put on their patch grid.
    Only the part of the network above the layer is differentiated (the parameters are frozen)."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    _check_batch(inputs)
    found = resolve_layers(model, layer)
    if len(found) != 1:
        raise ValueError(f"grad_cam takes one layer; {layer!r} names {len(found)}: {', '.join(found)}")
    (name, module), = found.items()

    def one(x, t):
        with capture(model, name, grads=True) as tap:
            out = model(x)
        if not tap.live.get(name):
            raise ValueError(f"layer {name!r} did not run in the forward pass (or its output does not need "
                             "gradients)")
        scores, classes = target_scores(out, t)
        act = tap.live[name][0]
        (grad,) = torch.autograd.grad(scores.sum(), act, allow_unused=True)
        if grad is None:
            raise ValueError(f"the target does not depend on layer {name!r}")
        a = spatial_layout(act.detach(), module, name, layout, grid, x.dim())
        g = spatial_layout(grad, module, name, layout, grid, x.dim())
        if a.dim() != x.dim():
            raise ValueError(f"layer {name!r} gives {a.dim() - 2}D maps {tuple(a.shape)} for {x.dim() - 2}D inputs "
                             f"{tuple(x.shape)}: the map cannot be laid over the input")
        low = cam_from(a.float(), g.float(), method)
        return upsample(low, x.shape[2:]), low, scores.detach(), classes

    with ModelGuard(model, eval=True, freeze=True):
        maps, low, scores, classes = _chunked(inputs, target, chunk_size, one)
    cam = CAM(maps, classes, scores, method, low_res=low, layer=name)
    if method == "guided-gradcam":
        gb = guided_backprop(model, inputs, classes if classes is not None else target, chunk_size=chunk_size)
        cam.guided = gb.maps * maps[:, None]
    return cam


def _check_batch(inputs):
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a batch (N, C, ...), got {shape}")


# ----------------------------------------------------------------------------------------------------------------
# attention


def _patch_grid(length: int, class_token: str, grid) -> tuple[bool, int, int]:
    """(class token in front?, h, w) for a sequence of `length` tokens (see tokens_to_grid)."""
    maps, cls = tokens_to_grid(torch.zeros(1, length, 1), grid, class_token)
    return cls is not None, maps.shape[-2], maps.shape[-1]


def _patch_weights(w: Tensor, class_token: str, grid) -> Tensor:
    """(N, heads, L, L) -> (N, heads, h, w): what the class token attends to (or, with no class token, the
    attention each patch receives, averaged over queries)."""
    n, heads, length, _ = w.shape
    has_cls, h, wd = _patch_grid(length, class_token, grid)
    row = w[:, :, 0, 1:] if has_cls else w.mean(2)
    return row.reshape(n, heads, h, wd)


def attention_maps(model: nn.Module, inputs: Tensor, layers: LayerSpec = nn.MultiheadAttention, *,
                   class_token: str = "auto", grid: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """Per attention layer (nn.MultiheadAttention; torchvision's ViT blocks included), per head, what the class
    token attends to on the patch grid: {layer: (N, heads, h, w)}. Without a class token: the attention each
    patch receives, averaged over queries."""
    _check_batch(inputs)
    with ModelGuard(model, eval=True), torch.no_grad(), capture_attention(model, layers) as tap:
        model(inputs)
    return {name: _patch_weights(v[0], class_token, grid) for name, v in tap.values.items() if v}


def rollout(attentions: Sequence[Tensor], *, head_fusion: str = "mean", discard_ratio: float = 0.0,
            residual: bool = True) -> Tensor:
    """Attention rollout (Abnar and Zuidema) of per-block weights [(N, heads, L, L), ...] in forward order:
    heads fused (mean, max or min), optionally the smallest discard_ratio of each row's weights dropped (never
    the class token's), residual: A <- (A + I) / 2, rows renormalised, then A_last @ ... @ A_first. -> (N, L, L)."""
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
                low = a[..., 1:].topk(k, dim=-1, largest=False).indices + 1
                a = a.scatter(-1, low, 0.0)
        if residual:
            a = (a + torch.eye(a.shape[-1], device=a.device)) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def attention_rollout(model: nn.Module, inputs: Tensor, layers: LayerSpec = nn.MultiheadAttention, *,
                      head_fusion: str = "mean", discard_ratio: float = 0.0, class_token: str = "auto",
                      grid: tuple[int, int] | None = None) -> Tensor:
    """Attention rollout across the attention blocks (in module order) as a map on the patch grid
    (N, h, w): the class token's row of the rolled-out matrix (without a class token: the mean row)."""
    _check_batch(inputs)
    with ModelGuard(model, eval=True), torch.no_grad(), capture_attention(model, layers) as tap:
        model(inputs)
    order = [w for name in tap.layers for w in tap.values.get(name, [])]
    if not order:
        raise ValueError("no attention layer ran in the forward pass")
    r = rollout(order, head_fusion=head_fusion, discard_ratio=discard_ratio)
    has_cls, h, w = _patch_grid(r.shape[-1], class_token, grid)
    row = r[:, 0, 1:] if has_cls else r.mean(1)
    return row.reshape(r.shape[0], h, w)

