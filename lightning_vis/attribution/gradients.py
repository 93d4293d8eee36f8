"""Gradient attribution: the input gradient (saliency, SmoothGrad, guided backprop) and attribution along a path
(integrated gradients, GradientShap and input x gradient, of the input or of one layer's activations, ``layer=``).

- ``saliency`` (Simonyan et al.; SmoothGrad with ``samples``) and ``guided_backprop`` (Springenberg et al.): one
  backward pass per chunk of the batch.
- ``integrated_gradients`` (Sundararajan et al.): (x - x') times the path integral of the gradient from a baseline x'
  to x, by a Riemann sum (left, right, middle, trapezoid) or Gauss-Legendre quadrature (captum's methods and nodes).
- ``gradient_shap`` (Lundberg and Lee's expected gradients as captum computes them): per input, ``samples`` draws
  of a baseline from a distribution, a point uniformly on the segment to the (optionally noisy) input, and (x - x')
  times the gradient there, averaged.
- ``input_x_gradient``: x times the gradient (Shrikumar et al.).

Every (step, input) pair is one row; rows run through the model in chunks sized from a memory budget (a forward
probe of one input measures what a row costs), so a problem that fits step by step never runs out of memory, and
``chunk_size=`` overrides it. The result reports the completeness error: the sum of each input's attributions minus
its score difference f(x) - f(x') (zero for exact integrated gradients). Stochastic parts take ``seed``.

A multi-input model (CLIP) takes a dict of its inputs (lightning_vis.inputs): the image alone is on the path and its
baselines are images; every pass is then the image batch in its order (one step or draw of every image), so the
other inputs meet the images as in the model's own call, and f(x') is scored with them too.

With ``layer=``, the attributions are of the layer's activations (captum's LayerIntegratedGradients: the path runs
between the layer's activations for the baseline and for the input; LayerGradientShap and LayerGradientXActivation:
gradients at the layer for input-space points), laid out by hooks.layout as (N, C, *grid) maps (tokens on their
grid, prefix tokens dropped; vectors (N, D)).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import ModelGuard, capture, resolve_layers
from ..hooks.checkpoint import budget_bytes, check_chunk_size, input_gradient, rules_unreachable
from ..hooks.layout import Layout
from ..hooks.resolve import LayerSpec
from ..hooks.rules import BackwardRules
from ..inputs import ImageInputs, image_model
from ._common import Attribution, Target, _check_batch, _chunked, check_target, target_scores

IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
BASELINES = ("zeros", "blur", "uniform")


@dataclass
class PathAttribution(Attribution):
    """maps: (N, *input shape), or with ``layer`` the layer's (N, C, *grid) maps (as hooks.layout places them).
    delta: (N,) completeness error, sum of attributions minus (score - baseline_scores) (None for input x gradient);
    baseline_scores: (N,) the target score at the baseline (the mean over the drawn ones for GradientShap);
    raw: the attributions in the layer's own shape (the input's shape without a layer)."""

    delta: Tensor | None = None
    baseline_scores: Tensor | None = None
    layer: str = ""
    layout: Layout | None = None
    raw: Tensor | None = None


def path_nodes(method: str, steps: int) -> tuple[Tensor, Tensor]:
    """(alphas, weights), float64, of a quadrature of [0, 1] with `steps` nodes: captum's approximation methods."""
    if method not in IG_METHODS:
        raise ValueError(f"unknown integration method {method!r}; choose one of {', '.join(IG_METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or \
            (method == "riemann_trapezoid" and steps < 2):
        raise ValueError(f"steps must be an integer >= {2 if method == 'riemann_trapezoid' else 1}, got {steps!r}")
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (1 + x)), torch.from_numpy(0.5 * w)
    n = steps
    if method == "riemann_trapezoid":
        w = torch.full((n,), 1 / (n - 1), dtype=torch.float64)
        w[0] = w[-1] = 1 / (2 * (n - 1))
        return torch.linspace(0, 1, n, dtype=torch.float64), w
    lo, hi = {"riemann_left": (0, 1 - 1 / n), "riemann_right": (1 / n, 1),
              "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n))}[method]
    return torch.linspace(lo, hi, n, dtype=torch.float64), torch.full((n,), 1 / n, dtype=torch.float64)


def blur(x: Tensor, sigma: float) -> Tensor:
    """x (N, C, *spatial) blurred by a separable Gaussian of standard deviation sigma (pixels) on every spatial axis,
    edges replicated."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)
    out = x
    for axis in range(2, x.dim()):
        moved = out.movedim(axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        flat = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), k.view(1, 1, -1))
        out = flat.view(shape).movedim(-1, axis)
    return out


def make_baselines(inputs: Tensor, baseline, *, sigma: float = 5.0, seed: int = 0, many: bool = False) -> Tensor:
    """The baseline tensor for `inputs` (N, ...): "zeros", "blur" (each input blurred, Gaussian sigma pixels),
    "uniform" (noise uniform between each input's min and max, seeded), a number, or a tensor: of the input's shape,
    one input's shape or (1, ...); with many=True (GradientShap) also (B, ...): B baselines to draw from."""
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}, a number or a "
                             "tensor")
        if baseline == "zeros":
            return torch.zeros_like(inputs)
        if baseline == "blur":
            if inputs.dim() < 3:
                raise ValueError(f"a blurred baseline needs inputs with spatial axes (N, C, ...), got "
                                 f"{tuple(inputs.shape)}")
            if not sigma > 0:
                raise ValueError(f"sigma must be > 0, got {sigma}")
            return blur(inputs, sigma)
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(inputs.shape, generator=gen, dtype=torch.float64).to(inputs)
        lo = inputs.flatten(1).amin(1).view(-1, *[1] * (inputs.dim() - 1))
        hi = inputs.flatten(1).amax(1).view(-1, *[1] * (inputs.dim() - 1))
        return lo + u * (hi - lo)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if not isinstance(baseline, Tensor):
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, a number or a tensor, not "
                         f"{type(baseline).__name__}")
    b = baseline.detach().to(inputs)
    sample = tuple(inputs.shape[1:])
    if tuple(b.shape) == sample:
        b = b[None]
    if b.dim() != inputs.dim() or tuple(b.shape[1:]) != sample or \
            (b.shape[0] not in (1, inputs.shape[0]) and not many):
        valid = "(B, ...) baselines to draw from" if many else f"({inputs.shape[0]}, ...) or (1, ...)"
        raise ValueError(f"baseline shape {tuple(baseline.shape)} does not fit inputs {tuple(inputs.shape)}: give "
                         f"{sample}, {valid}")
    return b if many else b.expand_as(inputs)


def row_bytes(model: nn.Module, sample: Tensor, *, grads: bool) -> tuple[int, int]:
    """(bytes one row costs in a pass, bytes of its largest activation), one row being one input of the shape of
    `sample` (1, ...), from a forward probe of it: with grads, three times the sum of every leaf module's output
    (kept for backward, and their gradients); without, the input and three times the largest output (the live
    tensors of an inference pass)."""
    sizes = []

    def hook(module, args, output):
        if isinstance(output, Tensor):
            sizes.append(output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return row_cost(sample.numel() * sample.element_size(), sizes, grads=grads)


def row_cost(base: int, sizes: list[int], *, grads: bool) -> tuple[int, int]:
    """row_bytes from the bytes of one row's input (base) and of its leaf modules' outputs (sizes)."""
    largest = max(sizes, default=0)
    return (base * 3 + 3 * sum(sizes) if grads else base * 2 + 3 * largest), largest


CPU_CACHE_BYTES = 32 << 20  # on a CPU, a pass's largest activation beyond this runs slower per row (caches)


def chunk_rows(model, sample, chunk_size, memory_budget, *, grads: bool, cost: tuple[int, int] | None = None) -> int:
    """Rows per pass: chunk_size, or as many as fit memory_budget (default: 2 GiB on CPU, a quarter of the free
    memory on a GPU) by a probe of one row (or its row_bytes, cost, where the caller has them); on a CPU also no
    more than keep the largest activation of a pass within CPU_CACHE_BYTES (MobileNetV2's occlusion at 224 px: 140
    rows a pass took 37 s, 4 rows 9-11 s)."""
    check_chunk_size(chunk_size)
    if chunk_size is not None:
        return chunk_size
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
    cost, largest = row_bytes(model, sample, grads=grads) if cost is None else cost
    rows = max(1, budget_bytes(sample.device, memory_budget) // max(1, cost))
    if sample.device.type == "cpu":
        rows = min(rows, max(1, CPU_CACHE_BYTES // max(1, largest)))
    return rows


def pass_rows(model, inputs: Tensor, chunk_size, memory_budget, *, grads: bool,
              cost: tuple[int, int] | None = None) -> int:
    """Rows per pass of a method that runs rows made from the images (steps, draws, placements): chunk_rows; for a
    model with other inputs (a dict of inputs, with_inputs) the image batch itself, one row of every image in their
    order, so each pass meets the other inputs as the model's own call does, whether they are a batch of their own
    (CLIP's texts) or one per image (CLIPSeg's prompts, OWL-ViT's queries): which, nothing here can tell."""
    if isinstance(model, ImageInputs) and model.others:
        check_chunk_size(chunk_size)
        n = inputs.shape[0]
        if chunk_size is not None and chunk_size < n:
            raise ValueError(f"chunk_size={chunk_size}: with other inputs ({', '.join(model.others)}) every pass is "
                             f"the whole image batch of {n}; pass chunk_size=None (or fewer images)")
        return n
    return chunk_rows(model, inputs[:1], chunk_size, memory_budget, grads=grads, cost=cost)


class _Layer:
    """One layer's output, read or replaced in a pass: the rows' gradients are taken with respect to it."""

    def __init__(self, model, spec, layout, grid, inputs):
        found = resolve_layers(model, spec)
        if len(found) != 1:
            raise ValueError(f"layer= takes one layer; {spec!r} names {len(found)}: {', '.join(found)}")
        (self.name, self.module), = found.items()
        probe = inputs if isinstance(model, ImageInputs) else inputs[:1]  # other inputs may be one per image
        with torch.no_grad(), capture(model, self.name, layouts=True, layout=layout, grid=grid) as tap:
            model(probe)
        got = tap.values.get(self.name, [])
        if len(got) != 1:
            raise ValueError(f"layer {self.name!r} ran {len(got)} times in one forward pass; attributions need a "
                             "layer that runs once")
        self.layout = tap.layout(self.name)

    def activations(self, model, x: Tensor) -> tuple[Tensor, object]:
        """The layer's output for x (no gradients) and the model's output."""
        seen = []
        h = self.module.register_forward_hook(lambda m, a, o: seen.append(self._tensor(o).detach().clone()))
        try:
            with torch.no_grad():
                out = model(x)
        finally:
            h.remove()
        return seen[0], out

    def _tensor(self, output) -> Tensor:
        if not isinstance(output, Tensor):
            raise ValueError(f"layer {self.name!r} returns a {type(output).__name__}; attributions of a layer need "
                             "one that returns a tensor")
        return output

    def gradient(self, model, x, target, replace=None):
        """(d score / d layer output, scores) for rows x; the layer's output replaced by `replace` where given."""
        seen = []

        def hook(module, args, output):
            v = (self._tensor(output) if replace is None else replace).detach().requires_grad_(True)
            seen.append(v)
            return v.clone()  # what the network sees (an in-place op after the layer leaves v alone)

        h = self.module.register_forward_hook(hook)
        try:
            out = model(x)
        finally:
            h.remove()
        scores, _ = target_scores(out, target)
        (g,) = torch.autograd.grad(scores.sum(), seen[0], allow_unused=True)
        if g is None:
            raise ValueError(f"the target does not depend on layer {self.name!r}")
        return g, scores.detach()


def _input_rows_gradient(model, x, target):
    xg = x.detach().clone().requires_grad_(True)
    scores, _ = target_scores(model(xg), target)
    return input_gradient(scores.sum(), xg), scores.detach()


def _setup(model, inputs, target, layer, layout, grid):
    _check_batch(inputs)
    check_target(target)
    return _Layer(model, layer, layout, grid, inputs) if layer is not None else None


def _rows_target(classes: Tensor | None, target, rows: Tensor):
    """The target of some rows: their inputs' classes, or the callable (applied to the rows' outputs)."""
    return target if classes is None else classes[rows]


def _reference(model, inputs, target, lay):
    """(scores, classes, layer activations or None) of the inputs: the classes explained are fixed here."""
    if lay is not None:
        act, out = lay.activations(model, inputs)
    else:
        act = None
        with torch.no_grad():
            out = model(inputs)
    scores, classes = target_scores(out, target)
    return scores.detach(), classes, act


def _scores(model, x, target, size):
    """Target scores of rows x (no gradients), size rows per pass."""
    with torch.no_grad():
        return torch.cat([target_scores(model(x[i:i + size]), target if not isinstance(target, Tensor)
                                        else target[i:i + size])[0] for i in range(0, x.shape[0], size)])


def _result(method, lay, attr, scores, classes, delta, base_scores):
    maps = lay.layout.to_maps(attr) if lay is not None else attr
    return PathAttribution(maps.detach(), classes, scores, method, delta=delta, baseline_scores=base_scores,
                           layer=lay.name if lay is not None else "", layout=lay.layout if lay is not None else None,
                           raw=attr.detach())


@torch.enable_grad()  # gradients are the method: also when called inside the caller's torch.no_grad()
def integrated_gradients(model: nn.Module, inputs: Tensor, target: Target = None, *, baseline="zeros",
                         steps: int = 50, method: str = "gausslegendre", layer: LayerSpec | None = None,
                         sigma: float = 5.0, seed: int = 0, chunk_size: int | None = None,
                         memory_budget: int | None = None, layout=None, grid=None) -> PathAttribution:
    """Integrated gradients of the target score from a baseline to each input (captum's IntegratedGradients, and
    LayerIntegratedGradients with ``layer=``). baseline: "zeros", "blur" (Gaussian, sigma pixels), "uniform"
    (seeded), a number or a tensor. method: "gausslegendre" (default, as captum) or "riemann_left" / "_right" /
    "_middle" / "_trapezoid". The steps x inputs rows run chunk_size at a time (default: what fits memory_budget).
    ``delta``: sum of attributions - (f(x) - f(baseline)) per input."""
    alphas, weights = path_nodes(method, steps)
    model, inputs = image_model(model, inputs)
    with ModelGuard(model, eval=True, freeze=True):  # the layer's probe pass too: in eval mode
        lay = _setup(model, inputs, target, layer, layout, grid)
        b = make_baselines(inputs, baseline, sigma=sigma, seed=seed)
        n = inputs.shape[0]
        scores, classes, act_x = _reference(model, inputs, target, lay)
        if lay is not None:
            act_b, out_b = lay.activations(model, b)
            base_scores = target_scores(out_b, target if classes is None else classes)[0].detach()
            start, diff = act_b, act_x - act_b
        else:
            base_scores = _scores(model, b, target if classes is None else classes, n)
            start, diff = b, inputs - b
        size = pass_rows(model, inputs, chunk_size, memory_budget, grads=True)
        alphas, weights = alphas.to(inputs), weights.to(inputs)
        total = torch.zeros_like(diff)
        view = (-1,) + (1,) * (diff.dim() - 1)
        for r0 in range(0, steps * n, size):
            rows = torch.arange(r0, min(r0 + size, steps * n), device=inputs.device)
            k, i = rows // n, rows % n
            points = start[i] + alphas[k].view(view) * diff[i]
            t = _rows_target(classes, target, i)
            if lay is None:
                g, _ = _input_rows_gradient(model, points, t)
            else:
                g, _ = lay.gradient(model, inputs[i], t, replace=points)
            total.index_add_(0, i, g * weights[k].view(view))
        attr = total * diff
    delta = attr.flatten(1).sum(1) - (scores - base_scores)
    lost = (attr.flatten(1).abs().amax(1) == 0) & (scores != base_scores)
    if bool(lost.any()):  # never an all-zero picture of a score that changes along the path
        i = int(lost.nonzero()[0])
        raise ValueError(f"integrated_gradients: input {i}'s score goes from {float(base_scores[i]):.3g} at the "
                         f"baseline to {float(scores[i]):.3g}, but its gradient is zero at all {steps} steps (an "
                         "all-zero map): the score is flat along the path and jumps (a detection that exists only "
                         "near the input, a threshold); try more steps or another baseline, or use occlusion")
    return _result("integrated_gradients", lay, attr, scores, classes, delta, base_scores)


def shap_draws(n: int, samples: int, n_baselines: int, shape, stdevs: float, seed: int):
    """GradientShap's random draws for n inputs, row i * samples + s (input-major, as captum's NoiseTunnel): baseline
    indices (n * samples,), points on the path (n * samples,) float64 uniform in [0, 1), and the input noise
    (n * samples, *shape) of standard deviation stdevs (None for 0), from one generator seeded with seed."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n_baselines, (n * samples,), generator=gen)
    alphas = torch.rand(n * samples, generator=gen, dtype=torch.float64)
    noise = torch.randn((n * samples, *shape), generator=gen) * stdevs if stdevs else None
    return idx, alphas, noise


@torch.enable_grad()
def gradient_shap(model: nn.Module, inputs: Tensor, target: Target = None, *, baselines="zeros", samples: int = 5,
                  stdevs: float = 0.0, layer: LayerSpec | None = None, sigma: float = 5.0, seed: int = 0,
                  chunk_size: int | None = None, memory_budget: int | None = None, layout=None,
                  grid=None) -> PathAttribution:
    """GradientShap (captum's GradientShap / LayerGradientShap with the same draws, see shap_draws): baselines as
    integrated_gradients' baseline, or a (B, ...) tensor of baselines to draw from. stdevs: Gaussian noise added to
    each input copy. ``delta``: sum of attributions - (f(x) - mean over draws of f(baseline))."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not stdevs >= 0:
        raise ValueError(f"stdevs must be >= 0, got {stdevs}")
    model, inputs = image_model(model, inputs)
    with ModelGuard(model, eval=True, freeze=True):  # the layer's probe pass too: in eval mode
        lay = _setup(model, inputs, target, layer, layout, grid)
        pool = make_baselines(inputs, baselines, sigma=sigma, seed=seed, many=True)
        n = inputs.shape[0]
        scores, classes, _ = _reference(model, inputs, target, lay)
        idx, alphas, noise = shap_draws(n, samples, pool.shape[0], inputs.shape[1:], stdevs, seed)
        i_all = torch.arange(n * samples, device=inputs.device) // samples
        idx, alphas = idx.to(inputs.device), alphas.to(inputs)
        size = pass_rows(model, inputs, chunk_size, memory_budget, grads=True)
        # the rows run draw by draw (each pass: the images in their order, pass_rows), the results kept input-major
        order = torch.arange(n * samples, device=inputs.device).view(n, samples).t().flatten()
        back = order.argsort()
        drawn = _scores(model, pool[idx[order]], target if classes is None else classes[i_all[order]], size)
        base_scores = drawn[back].view(n, samples).mean(1)
        parts = []
        view = (-1,) + (1,) * (inputs.dim() - 1)
        for r0 in range(0, n * samples, size):
            rows = order[r0:r0 + size]
            x = inputs[i_all[rows]]
            if noise is not None:
                x = x + noise[rows].to(x)
            b = pool[idx[rows]]
            points = b + alphas[rows].view(view) * (x - b)
            t = _rows_target(classes, target, i_all[rows])
            if lay is None:
                g, _ = _input_rows_gradient(model, points, t)
                parts.append(g * (x - b))
            else:
                g, _ = lay.gradient(model, points, t)
                a_x, _ = lay.activations(model, x)
                a_b, _ = lay.activations(model, b)
                parts.append(g * (a_x - a_b))
        attr = torch.cat(parts)[back].view(n, samples, *parts[0].shape[1:]).mean(1)
    delta = attr.flatten(1).sum(1) - (scores - base_scores)
    return _result("gradient_shap", lay, attr, scores, classes, delta, base_scores)


@torch.enable_grad()
def input_x_gradient(model: nn.Module, inputs: Tensor, target: Target = None, *, layer: LayerSpec | None = None,
                     chunk_size: int | None = None, memory_budget: int | None = None, layout=None,
                     grid=None) -> PathAttribution:
    """The input times the gradient of the target score (captum's InputXGradient), or with ``layer=`` the layer's
    activations times their gradient (captum's LayerGradientXActivation)."""
    model, inputs = image_model(model, inputs)
    with ModelGuard(model, eval=True, freeze=True):  # the layer's probe pass too: in eval mode
        lay = _setup(model, inputs, target, layer, layout, grid)
        scores, classes, _ = _reference(model, inputs, target, lay)
        size = pass_rows(model, inputs, chunk_size, memory_budget, grads=True)
        parts = []
        for r0 in range(0, inputs.shape[0], size):
            rows = torch.arange(r0, min(r0 + size, inputs.shape[0]), device=inputs.device)
            t = _rows_target(classes, target, rows)
            if lay is None:
                g, _ = _input_rows_gradient(model, inputs[rows], t)
                parts.append(g * inputs[rows])
            else:
                g, _ = lay.gradient(model, inputs[rows], t)
                parts.append(g * lay.activations(model, inputs[rows])[0])
        attr = torch.cat(parts)
    return _result("input_x_gradient", lay, attr, scores, classes, None, None)


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


__all__ = ["PathAttribution", "gradient_shap", "guided_backprop", "input_x_gradient", "integrated_gradients",
           "make_baselines", "path_nodes", "saliency", "shap_draws"]
