"""The rest of the Grad-CAM family, as ``grad_cam(..., method=...)`` offers it: maps from a layer's activations and
gradients (HiRes-CAM, XGrad-CAM, element-wise Grad-CAM, Eigen-CAM, Eigen-Grad-CAM, KPCA-CAM, FEM, Shapley-CAM,
Finer-CAM) and maps that run the network again (Score-CAM, Ablation-CAM), equal to pytorch-grad-cam 1.5.7's classes
of the same names.

Everything here works on (N, C, *grid) maps (the layout model's ``to_maps``), so 1D, 2D, 3D and token layers alike;
the re-running methods take the layer's native layout to modify it. All of it is batched: one ``torch.linalg.eigh``
for the whole batch, and (image, channel) pairs of several images through the model together, in chunks whose size
follows from a memory budget.

``grad_cam`` is the one entry point of the family (``method=``, one of CAM_METHODS: the methods of FROM_GRADIENTS and
RERUNS), on a layer named or picked by ``default_cam_layer``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import ModelGuard, capture, resolve_layers
from ..hooks.checkpoint import HOW_TO_TURN_OFF, _is_reentrant_error, input_gradient, reentrant_guard
from ..hooks.layout import Layout, LayoutTracer, Unplaceable, _first_tensor
from ..hooks.resolve import LayerSpec
from ..inputs import ImageInputs, image_model, image_modules
from ..targets import LOGITS, field
from . import _inference
from ._common import (CAM, FastForward, Target, _check_batch, _chunked, check_target, fastest_format, settled_way,
                      target_scores, upsample)
from .attention import _is_attention
from .gradients import guided_backprop

# The bytes of masked inputs or ablated activations (times a forward pass's expansion) one chunk may hold.
MEMORY_BUDGET = 256 * 2**20
_FORWARD_EXPANSION = 32  # a no-grad forward pass holds a few tens of times its input at its peak
ABLATION_OFFSET = 1e7  # how far below the minimum an ablated unit goes where the layer is not rectified


def _spatial(t: Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.dim()))


def _per_channel(weights: Tensor, act: Tensor) -> Tensor:
    """sum_c weights[n, c] * act[n, c, ...] -> (N, *grid)."""
    return (weights[(...,) + (None,) * (act.dim() - 2)] * act).sum(1)


def hirescam(act: Tensor, grad: Tensor) -> Tensor:
    """HiRes-CAM (Draelos and Carin): the element-wise product of gradient and activation summed over channels."""
    return (grad * act).sum(1)


def xgradcam(act: Tensor, grad: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al.): channel weights sum(grad * act) / sum(act) over the grid, in float64: after a
    LayerNorm a channel's sum can be near 0, and float32's rounding of it then sets the map (ViT-B/32 drew 1.6e-3 of
    its scale away from the same formula in another order)."""
    dims = _spatial(act)
    a, g = act.double(), grad.double()
    weights = (g * a).sum(dims) / (a.sum(dims) + 1e-7)
    return _per_channel(weights, a).to(act.dtype)


def gradcam_elementwise(act: Tensor, grad: Tensor) -> Tensor:
    """Element-wise Grad-CAM: the rectified product of gradient and activation, summed over channels."""
    return (grad * act).clamp_min(0).sum(1)


def first_component(maps: Tensor) -> Tensor:
    """(N, C, *grid) -> (N, *grid): each map's positions projected on the first principal component of their
    channel vectors, its sign chosen so that the projection correlates positively with the sum over channels (the
    sign of a singular vector is arbitrary; pytorch-grad-cam keeps whichever NumPy's SVD returns). The component is
    the top eigenvector of the smaller Gram matrix, in float64 (one batched ``torch.linalg.eigh`` of positions x
    positions or channels x channels: ResNet-50's last layer, 49 x 49 instead of an SVD of 49 x 2048; a CPU's SVD of
    wide matrices took seconds)."""
    flat = torch.nan_to_num(maps.flatten(2).transpose(1, 2).double(), nan=0.0)  # (N, positions, C)
    flat = flat - flat.mean(1, keepdim=True)
    if flat.shape[1] <= flat.shape[2]:  # flat flat^T = U S^2 U^T: flat v1 = u1 s1
        values, vectors = torch.linalg.eigh(flat @ flat.transpose(1, 2))
        proj = vectors[..., -1] * values[:, -1:].clamp_min(0).sqrt()
    else:  # flat^T flat = V S^2 V^T
        proj = (flat @ torch.linalg.eigh(flat.transpose(1, 2) @ flat)[1][..., -1:])[..., 0]
    return _oriented(proj, maps).float().view(maps.shape[0], *maps.shape[2:])


def kernel_component(maps: Tensor) -> Tensor:
    """(N, C, *grid) -> (N, *grid): each map's positions projected on the first kernel principal component of their
    centred channel vectors, with scikit-learn KernelPCA's defaults as pytorch-grad-cam's KPCA-CAM uses them: the
    sigmoid kernel tanh(<a, b> / C + 1), centred, its top eigenvector times the square root of its eigenvalue (one
    batched ``torch.linalg.eigh`` of the (positions x positions) kernels, in float64). The sign as
    :func:`first_component`'s (scikit-learn flips it to make the largest entry positive, whatever the activations)."""
    flat = torch.nan_to_num(maps.flatten(2).transpose(1, 2).double(), nan=0.0)  # (N, positions, C)
    flat = flat - flat.mean(1, keepdim=True)
    k = torch.tanh(flat @ flat.transpose(1, 2) / flat.shape[2] + 1)
    k = k - k.mean(1, keepdim=True) - k.mean(2, keepdim=True) + k.mean((1, 2), keepdim=True)
    values, vectors = torch.linalg.eigh(k)  # ascending
    proj = vectors[..., -1] * values[:, -1:].clamp_min(0).sqrt()
    return _oriented(proj, maps).float().view(maps.shape[0], *maps.shape[2:])


def _oriented(proj: Tensor, maps: Tensor) -> Tensor:
    """proj (N, positions) with each row's sign flipped where it correlates negatively with maps' channel sum; where
    that sum hardly varies over the positions (a LayerNorm's tokens sum to about the same everywhere: rounding would
    decide), so that its largest entry in absolute value is positive (scikit-learn's convention)."""
    flat = torch.nan_to_num(maps.flatten(2).to(proj.dtype), nan=0.0)
    flat = flat - flat.mean(2, keepdim=True)
    total = flat.sum(1)
    agree = ((proj - proj.mean(1, keepdim=True)) * total).sum(1)
    weak = total.norm(dim=1) <= 1e-4 * flat.norm(dim=(1, 2))
    largest = proj.gather(1, proj.abs().argmax(1, keepdim=True))[:, 0]
    flip = torch.where(weak, largest < 0, agree < 0)
    return torch.where(flip[:, None], -proj, proj)


def eigencam(act: Tensor, grad: Tensor) -> Tensor:
    """Eigen-CAM (Muhammad and Yeasin): the first principal component of the activations (no gradient)."""
    return first_component(act)


def eigengradcam(act: Tensor, grad: Tensor) -> Tensor:
    """Eigen-Grad-CAM: the first principal component of gradient times activation."""
    return first_component(grad * act)


def kpcacam(act: Tensor, grad: Tensor) -> Tensor:
    """KPCA-CAM (Karmani et al.): the first kernel principal component of the activations (no gradient)."""
    return kernel_component(act)


FEM_K = 2.0  # FEM's k-sigma rule, pytorch-grad-cam's default


def fem(act: Tensor, grad: Tensor) -> Tensor:
    """FEM (Fuad et al.): channel weights the share of the channel's positions above its mean plus FEM_K (population)
    standard deviations; no gradient."""
    dims = _spatial(act)
    a = act.double()  # a channel equal everywhere has no position above its mean: float32 may round the mean below
    high = a > a.mean(dims, keepdim=True) + FEM_K * a.std(dims, correction=0, keepdim=True)
    return _per_channel(high.to(act.dtype).mean(dims), act)


def grad_weighted(act: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM's weighting: each channel by its mean gradient over the grid. Shapley-CAM gives it the Shapley
    gradient (:func:`shapley_gradient`), Finer-CAM the gradient of its comparison score (:func:`finer_scores`)."""
    return _per_channel(grad.mean(_spatial(act)), act)


def shapley_gradient(act: Tensor, grad: Tensor) -> Tensor:
    """Shapley-CAM's gradient (Cai et al.): grad - (H act) / 2, with H the Hessian of the score with respect to the
    layer's output (a Hessian-vector product). act: the layer's output in the graph, grad: d score / d act taken
    with create_graph=True. Where the gradient does not depend on the output (the part above it is linear in it, or
    piecewise linear: ReLU networks under a logit) the product is zero and Shapley-CAM is Grad-CAM."""
    if not grad.requires_grad:
        return grad.detach()
    try:
        (hvp,) = torch.autograd.grad(grad, act, grad_outputs=act.detach(), allow_unused=True)
    except RuntimeError as e:
        if "derivative for" not in str(e) and "double backward" not in str(e):
            raise
        raise ValueError(f"shapleycam needs second derivatives of the part above the layer; torch has none here "
                         f"({str(e).splitlines()[0]}): use another method or a layer above that operation") from None
    return grad.detach() if hvp is None else grad.detach() - 0.5 * hvp


def twice_differentiable():
    """A context in which F.scaled_dot_product_attention takes its math path, the one with second derivatives
    (the fused CPU and CUDA kernels have none): Shapley-CAM's pass through attention layers."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


FINER_COMPARISONS = 3  # Finer-CAM compares with the 3 classes whose logits are nearest the target's (its default)


def finer_scores(logits: Tensor, classes: Tensor, alpha: float = 1.0) -> Tensor:
    """Finer-CAM's score (Zhang et al.): of each input's class c and the FINER_COMPARISONS other classes k whose
    logits are nearest to c's, sum_k p_k (s_c - alpha s_k) / sum_k p_k with p the softmax of the logits: what sets c
    apart from the classes it is most easily confused with. logits (N, classes), classes (N,) -> (N,)."""
    n_cls = logits.shape[1]
    if n_cls < 2:
        raise ValueError("finercam compares the target class with the classes nearest to it: the model has one class")
    main = logits.gather(1, classes[:, None])
    distance = (logits.detach() - main.detach()).abs().scatter(1, classes[:, None], -1.0)  # the class itself first
    near = distance.argsort(dim=1, stable=True)[:, 1:1 + min(FINER_COMPARISONS, n_cls - 1)]
    p = logits.softmax(1).gather(1, near)
    return (p * (main - alpha * logits.gather(1, near))).sum(1) / (p.sum(1) + 1e-9)


# method -> f(act, grad) -> (N, *grid), before the final rectification
FROM_GRADIENTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hirescam": hirescam, "xgradcam": xgradcam, "gradcam-elementwise": gradcam_elementwise,
    "eigencam": eigencam, "eigengradcam": eigengradcam, "shapleycam": grad_weighted, "finercam": grad_weighted,
    "fem": fem, "kpcacam": kpcacam}
# methods that read the activations alone: one no-grad forward pass, no backward
NO_GRADIENT = ("eigencam", "fem", "kpcacam", "scorecam", "ablationcam")


# ----------------------------------------------------------------------------------------------------------------
# methods that run the network again on (image, channel) pairs


def _pair_chunks(n: int, c: int, pair_bytes: int, device) -> Iterator[tuple[Tensor, Tensor]]:
    """(image index, channel index) of all n * c pairs, image-major, in chunks that fit MEMORY_BUDGET."""
    size = max(1, min(n * c, MEMORY_BUDGET // max(pair_bytes, 1)))
    pairs = torch.arange(n * c, device=device)
    for part in pairs.split(size):
        yield part // c, part % c


def _pair_target(target, classes: Tensor | None, images: Tensor):
    """The target of each pair: its image's class, or the callable itself (applied to the pairs' output)."""
    return classes[images] if classes is not None else target


def _interpolate(maps: Tensor, size) -> Tensor:
    """(N, C, *grid) -> (N, C, *size), (bi/tri)linear with align_corners=True (pytorch-grad-cam's Score-CAM masks
    come from nn.UpsamplingBilinear2d)."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[maps.dim() - 2]
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=True)


@torch.no_grad()
def scorecam(model: nn.Module, x: Tensor, name: str, lay, act: Tensor, target, classes: Tensor | None,
             scores: Tensor, scores_fn) -> Tensor:
    """Score-CAM (Wang et al.): each channel, upsampled to the input and min-max normalised, masks the input; the
    target's scores on the masked inputs, softmaxed over the channels, weigh the channels. act: the layer's output
    (native layout) for x; scores_fn(output, target) -> (B,) scores.

    Identical maps give identical masked inputs: each distinct map of an image runs once (a rectified layer's dead
    channels, all zero, are many: 111 of MobileNetV2's 1280 at features.18 on random weights, 90 to 204 on photos).
    The passes run on a copy of the model with its BatchNorms folded into their convolutions where that applies
    (:class:`~._common.FastForward`: BatchNorm folded, channels-last memory), in chunks under MEMORY_BUDGET."""
    maps = lay.to_maps(act)
    n, c = maps.shape[:2]
    images, channels, where, offset = [], [], [], 0
    for i in range(n):
        uniq, inverse = torch.unique(maps[i].flatten(1), dim=0, return_inverse=True)
        first = torch.full((len(uniq),), c, device=maps.device).scatter_reduce(
            0, inverse, torch.arange(c, device=maps.device), "amin")  # a channel of each distinct map
        images.append(torch.full_like(first, i))
        channels.append(first)
        where.append(inverse + offset)
        offset += len(uniq)
    images, channels = torch.cat(images), torch.cat(channels)
    pair_bytes = x[0].numel() * x.element_size() * _FORWARD_EXPANSION
    size = max(1, min(len(images), MEMORY_BUDGET // max(pair_bytes, 1)))
    out = torch.empty(len(images), device=x.device)
    run = None
    for part in torch.arange(len(images), device=x.device).split(size):  # masks made per chunk: N * C images is large
        up = _interpolate(maps[images[part], channels[part]][:, None].float(), x.shape[2:])
        flat = up.flatten(1)
        lo, hi = flat.amin(1)[:, None], flat.amax(1)[:, None]
        mask = ((flat - lo) / (hi - lo + 1e-8)).view_as(up)
        masked = x[images[part]] * mask.to(x.dtype)
        pair_target = _pair_target(target, classes, images[part])
        if run is None:
            run = FastForward(model, masked[:1], lambda o: scores_fn(o, _pair_target(target, classes, images[:1])))
        out[part] = scores_fn(run(masked), pair_target).float()
    weights = out[torch.cat(where)].view(n, c).softmax(1)
    return _per_channel(weights, maps.float())


def _ablated(values: Tensor, lay, channels: Tensor) -> Tensor:
    """values (B, ...) in the layer's layout with unit channels[b] of each b pushed out: zeroed where the layer is
    rectified (its minimum is 0), else set to ABLATION_OFFSET below the minimum (below the next rectifier), as
    pytorch-grad-cam's AblationLayer."""
    units = lay.unit_first(values)
    low = values.flatten(1).amin(1)
    value = torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)
    index = (torch.arange(len(values), device=values.device), channels)
    units[index] = value[(...,) + (None,) * (units.dim() - 2)].expand_as(units[index])
    return values


@torch.no_grad()
def ablationcam(model: nn.Module, x: Tensor, name: str, lay, act: Tensor, target, classes: Tensor | None,
                scores: Tensor, scores_fn) -> Tensor:
    """Ablation-CAM (Desai and Ramaswamy): channel weights (score - score with the channel ablated) / score.
    act: the layer's output (native layout) for x, scores: (N,) the target's scores on x. Only the part of the
    network above the layer runs again (see :class:`Replay`)."""
    maps = lay.to_maps(act).float()
    n, c = maps.shape[:2]
    pair_bytes = act[0].numel() * act.element_size() * 8
    ablated = torch.empty(n * c, device=x.device)
    done = 0
    with Replay(model, name, x) as replay:
        for images, channels in _pair_chunks(n, c, pair_bytes, x.device):
            values = _ablated(act[images].clone(), lay, channels)
            s = scores_fn(replay(images, values), _pair_target(target, classes, images))
            ablated[done:done + len(s)] = s.float()
            done += len(s)
    base = scores.float()[:, None]
    weights = (base - ablated.view(n, c)) / base
    return _per_channel(weights, maps)


class Replay:
    """Runs a model again with one layer's output replaced by a given batch, without recomputing the part below it.

    On entry, one no-grad pass over x records the outputs of the modules that finish before the layer starts and
    that are siblings of the layer or of one of its ancestors (ResNet-50's layer4.2: conv1 ... layer3, layer4.0,
    layer4.1): the outermost pieces of the part below. On each replay those modules return their recorded outputs
    (indexed by the replay's images) instead of running, and the layer returns the given values: only the modules
    above the layer, and functional code around them, compute. This needs no knowledge of the model: it holds for
    any forward whose modules run in the same order on the same inputs. Only batch-first tensor outputs are
    recorded; any other module below simply runs again. Every replaced ``forward`` is restored on exit."""

    def __init__(self, model: nn.Module, name: str, x: Tensor):
        self.model, self.name, self.x = model, name, x
        modules = dict(model.named_modules())
        self.layer = modules[name]
        parts = name.split(".")
        ancestors = {".".join(parts[:i]) for i in range(len(parts))}
        self.below = {k: m for k, m in modules.items()
                      if k and k != name and k.rpartition(".")[0] in ancestors and k not in ancestors}
        self.recorded: dict[str, list] = {}
        self.saved: dict[nn.Module, object] = {}
        self.views = True

    def __enter__(self) -> "Replay":
        n, started, handles = self.x.shape[0], [], []

        def record(k):
            def hook(module, args, output):
                if not started:
                    keep = output.detach().clone() if isinstance(output, Tensor) and output.dim() and \
                        output.shape[0] == n else None  # a copy: the model may write into its output later
                    self.recorded.setdefault(k, []).append(keep)
            return hook

        def keep(module, args, output):
            if not hasattr(self, "output"):
                self.output = output

        try:
            handles.append(self.layer.register_forward_pre_hook(lambda m, a: started.append(True)))
            handles.append(self.layer.register_forward_hook(keep))
            handles += [m.register_forward_hook(record(k)) for k, m in self.below.items()]
            self.model(self.x)
        finally:
            for h in handles:
                h.remove()
        self.recorded = {k: v for k, v in self.recorded.items() if any(t is not None for t in v)}
        return self

    def __call__(self, images: Tensor, values: Tensor):
        """The model's output with the layer's output replaced by values (B, ...), the other recorded modules'
        by their outputs for x[images]. Where all the pairs are of one image, those outputs (and the input) are
        expanded views, not B copies (ResNet-50's layer4.2: 70 s -> a few s per image on a CPU); a model that writes
        into them in place is replayed with copies instead."""
        if self.views and bool(images.min() == images.max()):
            i0 = int(images[0])
            try:
                return self._run(lambda t: t[i0:i0 + 1].expand(len(images), *t.shape[1:]), values)
            except RuntimeError:
                self.views = False
        return self._run(lambda t: t[images], values)

    def _run(self, take, values: Tensor):
        calls: dict[str, int] = {}

        def replaced(k, original):
            def forward(*args, **kwargs):
                i = calls[k] = calls.get(k, -1) + 1
                kept = self.recorded[k]
                return take(kept[i]) if i < len(kept) and kept[i] is not None else original(*args, **kwargs)
            return forward

        try:
            for k, m in self.below.items():
                if k in self.recorded:
                    self._replace(m, replaced(k, m.forward))
            self._replace(self.layer, lambda *a, **kw: _with_first(self.output, values, take, self.x.shape[0]))
            return self.model(take(self.x))
        finally:
            self._restore()

    def _replace(self, module: nn.Module, forward) -> None:
        self.saved[module] = module.__dict__.get("forward", _ABSENT)
        module.forward = forward

    def _restore(self) -> None:
        for module, old in self.saved.items():
            if old is _ABSENT:
                del module.__dict__["forward"]
            else:
                module.forward = old
        self.saved.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
        self.recorded.clear()
        self.__dict__.pop("output", None)


def _with_first(output, values: Tensor, take, n: int):
    """The layer's output as the model expects it (a tensor, a tuple, a dict or a transformers ModelOutput) with its
    first tensor, the one the CAM reads, replaced by values, and its other batch-first tensors (also in tuples beside
    it: transformers' hidden_states) taken for the replay's images (take)."""
    if isinstance(output, Tensor):
        return values
    first = []

    def taken(v):
        if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
            return type(v)(taken(u) for u in v)
        return take(v) if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v

    def swap(v):
        if not isinstance(v, Tensor) or first:
            return taken(v)
        first.append(v)
        return values

    if isinstance(output, dict):  # a ModelOutput takes its fields as keywords
        items = {k: swap(v) for k, v in output.items()}
        return type(output)(**items) if type(output) is not dict else items
    if isinstance(output, (tuple, list)):
        parts = [swap(v) for v in output]
        return type(output)(*parts) if hasattr(output, "_fields") else type(output)(parts)
    return values


_ABSENT = object()

# method -> f(model, x, layer name, layout, activation, target, classes, scores, scores_fn) -> (N, *grid), before
# the final rectification: maps that run the network again (see grad_cam)
RERUNS: dict[str, Callable[..., Tensor]] = {"scorecam": scorecam, "ablationcam": ablationcam}

CAM_METHODS = ("gradcam", "gradcam++", "layercam", "guided-gradcam", *FROM_GRADIENTS, *RERUNS)


# ----------------------------------------------------------------------------------------------------------------
# the Grad-CAM family


def cam_from(act: Tensor, grad: Tensor, method: str = "gradcam") -> Tensor:
    """The map of one method from a layer's activations and gradients, both (N, C, *spatial) -> (N, *spatial)."""
    dims = tuple(range(2, act.dim()))
    expand = (...,) + (None,) * len(dims)
    if method in ("gradcam", "guided-gradcam"):
        cam = grad_weighted(act, grad)
    elif method == "gradcam++":  # Chattopadhyay et al., closed form with exp(score) (as pytorch-grad-cam)
        g2, g3 = grad.pow(2), grad.pow(3)
        alpha = g2 / (2 * g2 + act.sum(dims)[expand] * g3 + 1e-7)
        alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
        weights = (grad.clamp_min(0) * alpha).sum(dims)
        cam = (weights[expand] * act).sum(1)
    elif method == "layercam":  # Jiang et al.: positive gradients weigh each position
        cam = (grad.clamp_min(0) * act).sum(1)
    elif method in FROM_GRADIENTS:
        cam = FROM_GRADIENTS[method](act, grad)
    else:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    return cam.clamp_min(0)


@torch.enable_grad()
def grad_cam(model: nn.Module, inputs: Tensor, layer: LayerSpec | None = None, target: Target = None, *,
             method: str = "gradcam", layout=None, grid=None, chunk_size: int | None = None) -> CAM:
    """Class activation maps of one layer: method "gradcam" (Selvaraju et al.), "gradcam++", "layercam",
    "guided-gradcam" (Grad-CAM times guided backprop, in ``.guided``), or one of the rest of the family: "hirescam",
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
        if method in NO_GRADIENT:
            (lay, act, scores, classes), grad = _layer_forward(model, x, t, name, layout, grid,
                                                               timed=method not in RERUNS), None
        elif method == "finercam":
            finer = _FinerTarget(t)
            lay, act, grad, scores, _ = _layer_gradient(model, x, finer, name, layout, grid)
            classes = finer.classes
        else:
            second = method == "shapleycam"
            with twice_differentiable() if second else contextlib.nullcontext():
                lay, act, grad, scores, classes = _layer_gradient(model, x, t, name, layout, grid, second=second)
                if second:
                    grad = shapley_gradient(act, grad)
        if lay.kind == "vector" or lay.spatial_dims != x.dim() - 2:
            what = "a vector" if lay.kind == "vector" else f"{lay.spatial_dims}D maps ({lay.describe()})"
            raise ValueError(f"layer {name!r} outputs {tuple(act.shape)}, {what}: no spatial map over the "
                             f"{x.dim() - 2}D input {tuple(x.shape)}; pick a layer with maps over the input (or "
                             "layer=None)")
        a = lay.to_maps(act.detach())
        g = a if grad is None else lay.to_maps(grad.detach())  # the gradient-free methods read no gradient
        if grad is not None:
            zero.append(bool(g.abs().amax() == 0))
        if method in RERUNS:
            low = RERUNS[method](model, x, name, lay, act.detach(), t, classes, scores.detach(), _scores_of)
            low = low.clamp_min(0)
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
    """Finer-CAM's score (finer_scores) of a class target (None: the top class) as a callable
    target; ``classes`` holds the classes it explained."""

    def __init__(self, target):
        self.target, self.classes = target, None

    def __call__(self, output) -> Tensor:
        _, self.classes = target_scores(output, self.target)  # validated class indices, and the logits read below
        logits = output if isinstance(output, Tensor) else field(output, LOGITS)
        if self.classes is None or logits is None or logits.dim() != 2:
            raise ValueError("finercam compares the target class with the classes nearest to it: it needs a "
                             "classifier's (N, classes) logits (the output or its logits field), which this model's "
                             "output is not; use another CAM method")
        return finer_scores(logits, self.classes)


def _layer_forward(model, x, target, name, layout, grid, *, timed: bool):
    """(layout, activation, scores, classes) of one layer for a batch, from one forward pass without gradients (the
    CAMs that read the activations alone). timed (the CAMs whose map comes from this pass alone): run the fastest way
    (fastest_format: in channels-last memory or as given, or by the inference copy of a model whose weights did not
    change over the last calls, see _inference: the values are the same up to float rounding); else channels-last
    (Score-CAM's and Ablation-CAM's scores are compared with passes in that format)."""
    copies = _inference.Session(model, name, x, repr((layout, grid))) if timed else None

    def run(xx):
        with torch.no_grad(), capture(model, name, layouts=True, layout=layout, grid=grid) as tap:
            out = model(xx)
        if not tap.values.get(name):
            raise ValueError(f"layer {name!r} did not run in the forward pass{_ran_inside(tap, name)}")
        return tap.layout(name), tap.values[name][0], out

    def fast(xx):
        got = copies(xx)
        if got is None:  # the copy raised (and is dropped): the model itself
            return run(xx)
        return copies.layout, got[1], got[0]

    ready = copies is not None and copies.run is not None
    start = time.process_time()
    lay, act, out = fastest_format(model, x, run, {"copy": fast} if ready else None, timed=timed)
    if copies is not None:
        if ready and settled_way(model, x) not in (None, "copy"):
            copies.drop()
        copies.offer(x, lay, act, out, time.process_time() - start)
    scores, classes = target_scores(out, target)
    return lay, act, scores, classes


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
