"""Faithfulness metrics: does the model's score change the way a map says it should when the input is perturbed?

Deletion and insertion (Petsiuk et al.), ROAD (Rong et al.), average drop / increase in confidence (Chattopadhyay
et al.), infidelity and max-sensitivity (Yeh et al., as captum defines them) and the pointing game (Zhang et al.).

Every metric runs its (image x step) jobs as batches of perturbed inputs, ``batch_size`` at a time and at most
``memory_budget`` bytes of perturbed inputs per forward pass, on the inputs' device; ROAD's noisy linear imputation
is solved by multigrid-preconditioned conjugate gradients (lightning_vis.ops.impute: a compiled kernel on a CPU,
a whole batch at once on a GPU; pytorch-grad-cam solves one sparse system per image per percentile with SciPy).

Maps: (N, *spatial) on the input's grid or a coarser one (upsampled (bi/tri)linearly to the input, as torch-cam
does), or (N, C, *spatial) of the input's shape (gradients: summed over channels where a metric ranks positions).
The model runs in eval mode inside a ModelGuard and comes back as it was.

Targets: None (each input's top prediction on the clean input), a class for all, one per input, or a callable
``f(output) -> (N,)`` scores. The class is fixed on the clean input and tracked through every perturbation. A
callable target is applied to batches of perturbed inputs of several images, so it must score each input on its own
(``targets.classifier(c)`` does; a target that holds per-image state, such as one mask per image, does not).
Scores: ``score="probability"`` (softmax of (N, classes) logits; the default of the confidence metrics) or
``"logit"``; a callable target's scores are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..attribution import Target, _check_batch, check_target, target_scores, upsample
from ..attribution._common import FastForward, first_target
from ..hooks import ModelGuard

BASELINES = ("zeros", "blur", "mean")
SCORES = ("probability", "logit")
DEFAULT_BATCH = 64
DEFAULT_BUDGET = 256 << 20  # bytes of perturbed inputs per forward pass
# bytes of inputs per forward pass on a CPU, where a larger batch runs slower per input (its activations leave the
# caches): one thread, 24 inputs at 224 px in passes of 6 / all at once: MobileNetV2 0.28 / 0.41 s, ResNet-50 2.3 /
# 2.5 s; ResNet-18 at 112 px is fastest in passes of 24 or more (this cap: 27)
CPU_PASS = 4 << 20


# ----------------------------------------------------------------------------------------------------------------
# shared pieces: targets, scores, maps, batches


@dataclass
class _Scorer:
    """Scores perturbed inputs of known images for the targets fixed on the clean inputs."""

    model: Callable  # the model, or its FastForward
    classes: Tensor | None  # (N,) or None for a callable target
    target: Target
    score: str

    def __call__(self, x: Tensor, owners: Tensor) -> Tensor:
        """(J,) scores of J perturbed inputs; owners: (J,) the image each one comes from."""
        rows = max(1, CPU_PASS // max(1, x[0].numel() * x.element_size()))
        if x.device.type == "cpu" and x.shape[0] > rows:
            return torch.cat([self(x[s:s + rows], owners[s:s + rows]) for s in range(0, x.shape[0], rows)])
        out = self.model(x)
        if self.classes is None:
            return target_scores(out, self.target)[0].float()
        if self.score == "probability":
            out = out.float().softmax(1)
        return target_scores(out, self.classes[owners])[0].float()


def _scorer(model, inputs, target, score, many: bool = True) -> tuple[_Scorer, Tensor]:
    """The scorer and the clean inputs' (N,) scores (one forward pass; the caller holds a ModelGuard and inference
    mode). many: the scorer will see many perturbed copies of each input, so it runs the model's FastForward
    (BatchNorm folded into a copy, channels-last inputs: the same scores, faster)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
    check_target(target)
    if many:  # the clean pass too: every score of a difference from the same computation
        model = FastForward(model, inputs[:1], lambda o: target_scores(o, first_target(target))[0])
    out = model(inputs)
    scores, classes = target_scores(out, target)
    s = _Scorer(model, classes, target, score)
    if classes is not None and score == "probability":
        scores = target_scores(out.float().softmax(1), classes)[0]
    return s, scores.float()


def _batch(inputs: Tensor, batch_size: int | None, memory_budget: int | None) -> int:
    """Perturbed inputs per forward pass: batch_size, at most memory_budget bytes of them (never below 1)."""
    for name, v in (("batch_size", batch_size), ("memory_budget", memory_budget)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
    per = inputs[0].numel() * inputs.element_size()
    return max(1, min(batch_size or DEFAULT_BATCH, (memory_budget or DEFAULT_BUDGET) // max(per, 1)))


def position_map(maps: Tensor, shape: Sequence[int], name: str = "maps") -> Tensor:
    """(N, *spatial) relevance per input position: a map on the input's grid as it is, a coarser (N, *grid) map
    upsampled (bi/tri)linearly (as torch-cam does), an input-shaped (N, C, *spatial) map summed over channels."""
    if not isinstance(maps, Tensor):
        raise ValueError(f"{name} must be a tensor, not {type(maps).__name__}")
    shape = tuple(shape)
    spatial = shape[2:]
    if maps.dim() == 0 or maps.shape[0] != shape[0]:
        raise ValueError(f"{name}: {tuple(maps.shape)[:1] or 'no'} maps for {shape[0]} inputs")
    if tuple(maps.shape) == shape:
        return maps.float().sum(1)
    if maps.dim() == len(shape) - 1 and 1 <= len(spatial) <= 3:
        if not torch.isfinite(maps).all():
            raise ValueError(f"{name} contain NaN or infinite values")
        return upsample(maps.float(), spatial)
    raise ValueError(f"{name} of shape {tuple(maps.shape)} do not fit inputs {shape}: give "
                     f"(N, *grid) maps over the input's {len(spatial)}D grid or maps of the input's shape")


def _cells(pos: Tensor, grid: Sequence[int] | None) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(N, *spatial) relevance -> (N, *grid) mean relevance per cell of `grid`, and the map from (J, cells) masks to
    (J, positions) masks (each cell's positions alike). grid None: the positions themselves."""
    spatial = tuple(pos.shape[1:])
    if grid is None:
        return pos, lambda m: m
    grid = tuple(grid)
    if len(grid) != len(spatial) or any(not isinstance(g, int) or g < 1 or s % g for g, s in zip(grid, spatial)):
        raise ValueError(f"grid {grid} does not divide the input's {len(spatial)}D grid {spatial}: give one "
                         "positive size per axis that divides it (a ViT's patch grid, a clip's (T, H, W))")
    size = [s // g for g, s in zip(grid, spatial)]
    pooled = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(grid) - 1](pos[:, None], size, size)[:, 0]

    def expand(m: Tensor) -> Tensor:
        m = m.view(-1, *grid)
        for axis, r in enumerate(size):
            m = m.repeat_interleave(r, axis + 1)
        return m.flatten(1)

    return pooled, expand


def _check(inputs, maps=None):
    _check_batch(inputs)
    if inputs.dim() < 3:
        raise ValueError(f"inputs must have a grid to perturb: (N, C, *spatial), got {tuple(inputs.shape)}")
    return None if maps is None else position_map(maps, inputs.shape)


def baseline_for(inputs: Tensor, baseline: str | Tensor | float, sigma: float = 5.0) -> Tensor:
    """What replaces removed positions: "zeros", "blur" (a Gaussian blur of each input, standard deviation `sigma`
    positions, as Petsiuk et al.), "mean" (each input's per-channel mean), a number or a tensor broadcastable to the
    inputs."""
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(inputs), inputs.shape)
        except RuntimeError:
            raise ValueError(f"a baseline tensor {tuple(baseline.shape)} does not broadcast to the inputs "
                             f"{tuple(inputs.shape)}") from None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if baseline == "zeros":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        return inputs.mean(tuple(range(2, inputs.dim())), keepdim=True).expand_as(inputs).clone()
    if baseline == "blur":
        return _blur(inputs, sigma)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, a number or a tensor, not {baseline!r}")


def _blur(x: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur along every spatial axis (reflect padding where the axis is long enough)."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    n, c = x.shape[:2]
    out = x
    for axis in range(2, x.dim()):
        moved = out.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        mode = "reflect" if flat.shape[-1] > radius else "replicate"
        flat = F.conv1d(F.pad(flat, (radius, radius), mode=mode), k.view(1, 1, -1))
        out = flat.view(moved.shape).movedim(-1, axis)
    return out.reshape(n, c, *x.shape[2:])


# ----------------------------------------------------------------------------------------------------------------
# deletion and insertion


@dataclass
class Curves:
    """Deletion and insertion curves: scores (N, points) at `fractions` (points,) of positions removed (deletion)
    or inserted (insertion), and their areas under the curve (N,) by the trapezoidal rule."""

    fractions: Tensor
    deletion: Tensor
    insertion: Tensor
    deletion_auc: Tensor = field(init=False)
    insertion_auc: Tensor = field(init=False)

    def __post_init__(self):
        self.deletion_auc = torch.trapezoid(self.deletion, self.fractions, dim=1)
        self.insertion_auc = torch.trapezoid(self.insertion, self.fractions, dim=1)


@torch.inference_mode()  # no autograd records at all (cheaper than no_grad), as torch-cam scores
def deletion_insertion(model: nn.Module, inputs: Tensor, maps: Tensor, target: Target = None, *, steps: int = 20,
                       baseline: str | Tensor | float = "zeros", score: str = "probability",
                       grid: Sequence[int] | None = None, batch_size: int | None = None,
                       memory_budget: int | None = None) -> Curves:
    """Deletion and insertion (Petsiuk et al., RISE): positions ranked by the map (highest first, ties in position
    order); deletion replaces the top k with the baseline, insertion starts from the baseline and puts the top k
    back, for k = 0, s, 2s, ... and all positions (s = ceil(positions / steps)), as torch-cam's
    DeletionInsertionMetric. Every (image, curve, k) input runs batched; the all-baseline input is shared by both
    curves. A faithful map gives a low deletion AUC and a high insertion AUC.

    grid: the positions are the cells of this grid over the input's (a ViT's patch grid, a video's (T, H, W) or a
    coarser space-time grid; each axis must divide the input's), ranked by the map's mean over each cell and
    removed or inserted whole; None: every input position (pixel, or voxel of a clip)."""
    pos = _check(inputs, maps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    base = baseline_for(inputs, baseline)
    pos, cells = _cells(pos, grid)
    n, p = pos.shape[0], pos[0].numel()
    size = (p + steps - 1) // steps
    counts = [*range(0, p, size), p]
    fractions = torch.tensor(counts, dtype=torch.float32, device=inputs.device) / p
    ranks = torch.argsort(torch.argsort(pos.flatten(1), dim=1, descending=True, stable=True), dim=1)
    with ModelGuard(model, eval=True):
        scorer, clean = _scorer(model, inputs, target, score)
        # jobs: (image, curve, count): curve 0 deletion, 1 insertion, 2 all-baseline (deletion's last point and
        # insertion's first); the clean input is deletion's first and insertion's last point
        jobs = [(i, 2, p) for i in range(n)] + [(i, c, k) for i in range(n) for k in counts[1:-1] for c in (0, 1)]
        job = torch.tensor(jobs, dtype=torch.long, device=inputs.device).view(-1, 3)
        got = torch.empty(len(jobs), device=inputs.device)
        flat_x, flat_b = inputs.flatten(2), base.flatten(2)
        chunk = _batch(inputs, batch_size, memory_budget)
        for s in range(0, len(jobs), chunk):
            i, c, k = job[s:s + chunk].unbind(1)
            top = cells(ranks[i] < k[:, None])  # (J, positions): among the k most relevant
            keep = torch.where((c == 1)[:, None], top, ~top)[:, None]
            x = torch.where(keep, flat_x[i], flat_b[i]).view(-1, *inputs.shape[1:])
            got[s:s + chunk] = scorer(x, i)
    deletion = clean[:, None].repeat(1, len(counts))
    insertion = deletion.clone()
    last = got[:n]
    deletion[:, -1], insertion[:, 0] = last, last
    if len(counts) > 2:
        inner = got[n:].view(n, len(counts) - 2, 2)
        deletion[:, 1:-1], insertion[:, 1:-1] = inner[..., 0], inner[..., 1]
    return Curves(fractions, deletion, insertion)


# ----------------------------------------------------------------------------------------------------------------
# ROAD: noisy linear imputation solved by batched conjugate gradients

def impute(images: Tensor, known: Tensor, *, noise: float = 0.0, generator: torch.Generator | None = None,
           tol: float = 1e-5, max_iter: int = 1000) -> Tensor:
    """The noisy linear imputer of ROAD (Rong et al.; pytorch-grad-cam's NoisyLinearImputer): every unknown pixel
    becomes the weighted mean of its 8 neighbours (weight 1/6 across, 1/12 diagonal; neighbours outside the image
    left out), a linear system over all unknown pixels, plus Gaussian noise of standard deviation `noise`.

    images: (B, C, H, W); known: (B, H, W) True where the pixel stays. The systems are solved by
    :func:`lightning_vis.ops.impute` (multigrid-preconditioned conjugate gradients: the compiled kernel for float32
    on a CPU, the pure-torch solver with all B x C systems at once elsewhere), to a relative residual of `tol` (the
    system is symmetric positive definite: every region of unknown pixels touches a known one, unless no pixel is
    known, which is refused). float32 reaches about 1e-6 relative."""
    if images.dim() != 4 or known.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"impute takes (B, C, H, W) images and a (B, H, W) mask, got {tuple(images.shape)} and "
                         f"{tuple(known.shape)}")
    k = known[:, None].to(images.dtype)
    if bool((k.flatten(1).amax(1) == 0).any()):
        raise ValueError("impute: an image with every pixel removed has nothing to impute from")
    if not bool(torch.isfinite(images.masked_fill(k == 0, 0)).all()):
        raise ValueError("impute: the images hold NaN or infinite values at kept pixels: every imputed value would "
                         "be NaN (give finite images)")
    x = ops.impute(images, known, tol, max_iter)
    if noise:
        r = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator is not None \
            else torch.randn_like(x)
        x = x + noise * r * (1 - k)
    return x


@dataclass
class ROAD:
    """ROAD scores: morf, lerf (N, percentiles): the target's score after imputing, minus its score on the clean
    input; combined (N,) = mean over percentiles of (lerf - morf) / 2, as pytorch-grad-cam's ROADCombined (higher:
    more faithful)."""

    percentiles: list[float]
    morf: Tensor
    lerf: Tensor
    combined: Tensor = field(init=False)

    def __post_init__(self):
        self.combined = (self.lerf.mean(1) - self.morf.mean(1)) / 2


@torch.inference_mode()  # no autograd records at all (cheaper than no_grad), as torch-cam scores
def road(model: nn.Module, inputs: Tensor, maps: Tensor, target: Target = None, *,
         percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90), noise: float = 0.01, seed: int = 0,
         score: str = "probability", batch_size: int | None = None, memory_budget: int | None = None,
         tol: float = 1e-5) -> ROAD:
    """ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods") as
    pytorch-grad-cam computes it: at percentile q, MoRF keeps the pixels whose map value is below the map's q-th
    percentile (it removes the most relevant 100 - q %) and LeRF keeps those whose (1 - map) is below the q-th
    percentile of (1 - map); removed pixels are imputed (see `impute`) and the model scores the result. Maps
    min-max scaled to [0, 1] per input come out the same as pytorch-grad-cam's CAMs. 2D inputs only (the imputer
    is an 8-neighbour stencil). Every (image, order, percentile) job of a batch is imputed and scored together;
    noise from a generator seeded with `seed`."""
    pos = _check(inputs, maps)
    if inputs.dim() != 4:
        raise ValueError(f"ROAD imputes over a 2D grid: inputs (N, C, H, W), got {tuple(inputs.shape)}")
    qs = [float(q) for q in percentiles]
    if not qs or any(not 0 <= q <= 100 for q in qs):
        raise ValueError(f"percentiles must be numbers in [0, 100], got {list(percentiles)}")
    n, q = inputs.shape[0], torch.tensor(qs, device=inputs.device) / 100
    flat = pos.flatten(1)
    morf = flat[:, None] < torch.quantile(flat, q, dim=1).T[..., None]  # (N, Q, P): kept
    inv = 1 - flat
    lerf = inv[:, None] < torch.quantile(inv, q, dim=1).T[..., None]
    empty = ~torch.stack([morf, lerf], 1).any(-1)  # (N, 2, Q): nothing left to impute from
    if bool(empty.any()):
        i, o, j = (int(v) for v in empty.nonzero()[0])
        raise ValueError(f"ROAD: map {i} keeps no pixel for {('MoRF', 'LeRF')[o]} at percentile {qs[j]:g} (a "
                         "constant map ranks nothing, and percentile 0 removes everything): give maps that vary "
                         "and percentiles in (0, 100]")
    keep = torch.stack([morf, lerf], 1).view(n * 2 * len(qs), *inputs.shape[2:])  # jobs: image, order, q
    owners = torch.arange(n, device=inputs.device).repeat_interleave(2 * len(qs))
    gen = torch.Generator(inputs.device).manual_seed(seed)
    got = torch.empty(len(owners), device=inputs.device)
    # the imputer keeps a handful of images' worth of state per job
    chunk = _batch(inputs, batch_size, (memory_budget or DEFAULT_BUDGET) // 8)
    with ModelGuard(model, eval=True):
        scorer, clean = _scorer(model, inputs, target, score)
        for s in range(0, len(owners), chunk):  # ops.impute sizes its own solves
            i, k = owners[s:s + chunk], keep[s:s + chunk]
            x = impute(inputs[i].float(), k, noise=noise, generator=gen, tol=tol)
            got[s:s + chunk] = scorer(x.to(inputs.dtype), i)
    diff = (got.view(n, 2, len(qs)) - clean[:, None, None])
    return ROAD(qs, diff[:, 0], diff[:, 1])


# ----------------------------------------------------------------------------------------------------------------
# average drop / increase in confidence


@dataclass
class Confidence:
    """Per input: drop = max(0, s - s') / s (Chattopadhyay et al.'s average drop, a fraction: x100 for their %),
    increase = s' > s (their increase in confidence), where s is the target's score on the input and s' on the
    input times its map scaled to [0, 1]."""

    drop: Tensor
    increase: Tensor


@torch.inference_mode()  # no autograd records at all (cheaper than no_grad), as torch-cam scores
def confidence(model: nn.Module, inputs: Tensor, maps: Tensor, target: Target = None, *,
               score: str = "probability", batch_size: int | None = None,
               memory_budget: int | None = None) -> Confidence:
    """Average drop and increase in confidence (Grad-CAM++): the model sees each input multiplied by its map, min-max
    scaled to [0, 1] per input (torch-cam's ClassificationMetric with normalised CAMs)."""
    pos = _check(inputs, maps)
    flat = pos.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    m = ((flat - lo) / (hi - lo).clamp_min(1e-12)).view(pos.shape)[:, None]
    chunk = _batch(inputs, batch_size, memory_budget)
    with ModelGuard(model, eval=True):
        scorer, clean = _scorer(model, inputs, target, score, many=False)
        idx = torch.arange(inputs.shape[0], device=inputs.device)
        masked = torch.cat([scorer((inputs[s:s + chunk] * m[s:s + chunk]).to(inputs.dtype), idx[s:s + chunk])
                            for s in range(0, inputs.shape[0], chunk)])
    return Confidence((clean - masked).clamp_min(0) / (clean + 1e-7), masked > clean)


# ----------------------------------------------------------------------------------------------------------------
# infidelity and max-sensitivity (captum's definitions)


def gaussian_perturbation(std: float = 0.1, seed: int = 0) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """captum-style perturbation for infidelity: inputs -> (noise, inputs - noise) with Gaussian noise of standard
    deviation `std`, drawn from a generator seeded with `seed` (each call draws the next noise)."""
    gen = {}

    def perturb(x: Tensor) -> tuple[Tensor, Tensor]:
        g = gen.setdefault(x.device, torch.Generator(x.device).manual_seed(seed))
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * std
        return noise, x - noise

    return perturb


def uniform_perturbation(radius: float = 0.02, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """captum's default perturbation for max-sensitivity (uniform noise in the L-infinity ball of `radius`), drawn
    from a generator seeded with `seed`: inputs -> inputs + noise."""
    gen = {}

    def perturb(x: Tensor) -> Tensor:
        g = gen.setdefault(x.device, torch.Generator(x.device).manual_seed(seed))
        return x + (torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * radius

    return perturb


def _samples_per_chunk(n: int, samples: int, chunk: int) -> int:
    """captum's slicing of the perturbation samples: all inputs, max(chunk // n, 1) samples of each at a time."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    return min(max(chunk // n, 1), samples)


@torch.inference_mode()  # no autograd records at all (cheaper than no_grad), as torch-cam scores
def infidelity(model: nn.Module, inputs: Tensor, maps: Tensor, target: Target = None, *, samples: int = 10,
               perturb: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None, std: float = 0.1, seed: int = 0,
               normalize: bool = True, score: str = "logit", batch_size: int | None = None,
               memory_budget: int | None = None) -> Tensor:
    """Infidelity (Yeh et al.; captum.metrics.infidelity): the mean over perturbations I of (sum(map * I) -
    (f(x) - f(x - I)))^2, per input (N,). perturb: inputs (N x k, ...) in repeat_interleave order -> (I, x - I),
    as captum's perturb_func; by default `gaussian_perturbation(std, seed)`. normalize: scale the map by the
    least-squares beta first (captum's normalize=True), so that maps on different scales compare. Samples run
    captum's way (all inputs, as many samples of each as a batch holds), f(x) once."""
    _check(inputs)
    attr = maps.float() if maps.shape == inputs.shape else position_map(maps, inputs.shape)[:, None]
    perturb = perturb or gaussian_perturbation(std, seed)
    n = inputs.shape[0]
    per = _samples_per_chunk(n, samples, _batch(inputs, batch_size, memory_budget))
    acc = torch.zeros(3, n, device=inputs.device, dtype=torch.float64)
    with ModelGuard(model, eval=True):
        scorer, clean = _scorer(model, inputs, target, score)
        for s in range(0, samples, per):
            k = min(per, samples - s)
            owners = torch.arange(n, device=inputs.device).repeat_interleave(k)
            noise, perturbed = perturb(inputs.repeat_interleave(k, 0))
            diff = (clean[owners] - scorer(perturbed, owners)).view(n, k).double()
            dot = (attr.repeat_interleave(k, 0) * noise).flatten(1).sum(1).view(n, k).double()
            acc += torch.stack([dot.pow(2).sum(1), (dot * diff).sum(1), diff.pow(2).sum(1)])
    if normalize:
        beta = acc[1] / acc[0].where(acc[0] != 0, torch.ones_like(acc[0]))
        beta = beta.where(acc[0] != 0, torch.zeros_like(beta))
        values = beta * beta * acc[0] - 2 * beta * acc[1] + acc[2]
    else:
        values = acc[0] - 2 * acc[1] + acc[2]
    return (values / samples).float()


def max_sensitivity(explain: Callable[[Tensor, Tensor | None], Tensor], inputs: Tensor, target: Tensor | None = None,
                    *, samples: int = 10, perturb: Callable[[Tensor], Tensor] | None = None, radius: float = 0.02,
                    seed: int = 0, batch_size: int | None = None, memory_budget: int | None = None) -> Tensor:
    """Max-sensitivity (Yeh et al.; captum.metrics.sensitivity_max with norm 'fro'): the largest ||e(x') - e(x)|| /
    ||e(x)|| over perturbed copies x' of each input, (N,). explain(inputs, target) -> maps of any shape (N, ...):
    the method under test, given each perturbed copy's own target (the clean input's, repeated). perturb: inputs
    (N x k, ...) -> perturbed inputs, by default `uniform_perturbation(radius, seed)` (captum's default noise)."""
    _check(inputs)
    perturb = perturb or uniform_perturbation(radius, seed)
    n = inputs.shape[0]
    per = _samples_per_chunk(n, samples, _batch(inputs, batch_size, memory_budget))
    clean = explain(inputs, target).detach().flatten(1).float()
    norm = clean.norm(dim=1, keepdim=True)
    norm = norm.where(norm != 0, torch.ones_like(norm))
    best = torch.full((n,), -math.inf, device=clean.device)
    for s in range(0, samples, per):
        k = min(per, samples - s)
        t = None if target is None else torch.as_tensor(target, device=inputs.device).repeat_interleave(k)
        e = explain(perturb(inputs.repeat_interleave(k, 0)), t).detach().flatten(1).float()
        sens = (e - clean.repeat_interleave(k, 0)).norm(dim=1, keepdim=True) / norm.repeat_interleave(k, 0)
        best = torch.maximum(best, sens.view(n, k).amax(1))
    return best


# ----------------------------------------------------------------------------------------------------------------
# pointing game


def pointing_game(maps: Tensor, inputs_shape: Sequence[int], *, boxes: Tensor | None = None,
                  masks: Tensor | None = None, tolerance: int = 15) -> Tensor:
    """The pointing game (Zhang et al.): a hit (True) where the map's maximum (the first, in position order) lies
    within `tolerance` positions (Euclidean) of the object. boxes: (N, 4) as x0, y0, x1, y1 in pixels, inclusive of
    x0, y0 and exclusive of x1, y1 (2D only); masks: (N, *spatial) True on the object. -> (N,) bool."""
    pos = position_map(maps, inputs_shape)
    n, spatial = pos.shape[0], pos.shape[1:]
    if (boxes is None) == (masks is None):
        raise ValueError("pointing_game needs either boxes or masks (exactly one of them)")
    if boxes is not None:
        boxes = torch.as_tensor(boxes)
        if len(spatial) != 2 or boxes.shape != (n, 4):
            raise ValueError(f"boxes must be (N, 4) = ({n}, 4) x0, y0, x1, y1 over a 2D grid, got "
                             f"{tuple(boxes.shape)} for a {len(spatial)}D grid")
        ys = torch.arange(spatial[0], device=pos.device)[:, None]
        xs = torch.arange(spatial[1], device=pos.device)[None]
        b = boxes.to(pos.device)
        masks = torch.stack([(ys >= b[i, 1]) & (ys < b[i, 3]) & (xs >= b[i, 0]) & (xs < b[i, 2]) for i in range(n)])
    masks = torch.as_tensor(masks).to(pos.device).bool()
    if masks.shape != pos.shape:
        raise ValueError(f"masks must be (N, *spatial) = {tuple(pos.shape)}, got {tuple(masks.shape)}")
    peak = torch.stack(torch.unravel_index(pos.flatten(1).argmax(1), spatial), 1).float()  # (N, dims)
    hits = []
    for i in range(n):
        where = masks[i].nonzero().float()
        hits.append(bool(where.numel()) and bool((where - peak[i]).norm(dim=1).min() <= tolerance))
    return torch.tensor(hits, dtype=torch.bool)

