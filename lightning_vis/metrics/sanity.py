"""Sanity checks for saliency maps (Adebayo et al., "Sanity Checks for Saliency Maps"): does the map depend on what
the model learned? The model-parameter randomisation test (cascading from the top layer, and one layer at a time)
and the random-logit test, with a verdict per method whose threshold is stated.

Layers are randomised on a deep copy of the model, never the user's: each parameter of the layer is redrawn from a
normal distribution with that parameter's own standard deviation (the scale of a trained layer; Adebayo et al.
redraw from a truncated normal), from a generator seeded with `seed`. Maps are compared per image on the input's
grid (input-shaped maps summed over channels): Spearman rank correlation of the maps and of their absolute values
(ties get their mean rank), SSIM (Wang et al., as scikit-image's structural_similarity by default: 7x7 uniform
window, sample covariance, on maps min-max scaled to [0, 1]) and the Pearson correlation of their histograms of
oriented gradients (9 unsigned orientations per cell of 8x8 positions, each cell's histogram L2-normalised).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .perturbation import position_map

Explain = Callable[[nn.Module, Tensor, Tensor | None], Tensor]  # (model, inputs, classes) -> maps
SIMILARITIES = ("spearman", "spearman_abs", "ssim", "hog")


# ----------------------------------------------------------------------------------------------------------------
# similarities of two batches of maps (N, *grid) -> (N,)


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 of a 1D tensor, ties given their mean rank (as scipy.stats.rankdata(method='average') - 1)."""
    values, order = x.sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)
    mean_rank = (ends - counts + ends - 1).double() / 2
    ranks = torch.empty_like(mean_rank[inverse])
    ranks[order] = mean_rank[inverse]
    return ranks


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of (N, P) tensors; 0 where a row is constant."""
    a, b = a.double() - a.double().mean(1, keepdim=True), b.double() - b.double().mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den)).float()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps: (N, ...) x (N, ...) -> (N,)."""
    a, b = a.flatten(1), b.flatten(1)
    return _pearson(torch.stack([_ranks(r) for r in a]), torch.stack([_ranks(r) for r in b]))


def _scaled(m: Tensor) -> Tensor:
    flat = m.flatten(1).double()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view(m.shape)


def ssim(a: Tensor, b: Tensor, win: int = 7) -> Tensor:
    """Structural similarity of each pair of 2D maps (N, H, W), both min-max scaled to [0, 1] (data range 1): the
    mean over 7x7 windows (scikit-image's defaults: uniform window, sample covariance, borders cropped) -> (N,)."""
    if a.dim() != 3 or min(a.shape[1:]) < win:
        raise ValueError(f"ssim compares 2D maps of at least {win}x{win} positions, got {tuple(a.shape[1:])}")
    x, y = _scaled(a)[:, None], _scaled(b)[:, None]
    mean = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731
    cov = win * win / (win * win - 1)
    ux, uy = mean(x), mean(y)
    vx, vy = cov * (mean(x * x) - ux * ux), cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def hog(m: Tensor, cell: int = 8, bins: int = 9) -> Tensor:
    """Histograms of oriented gradients of 2D maps (N, H, W) -> (N, cells * bins): central-difference gradients,
    unsigned orientations in `bins` bins, magnitudes summed per cell of cell x cell positions, each cell's histogram
    L2-normalised."""
    x = _scaled(m).float()
    gy = F.pad(x[:, 2:] - x[:, :-2], (0, 0, 1, 1))
    gx = F.pad(x[:, :, 2:] - x[:, :, :-2], (1, 1))
    mag = torch.sqrt(gx * gx + gy * gy)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    b = (angle / (180 / bins)).long().clamp_max(bins - 1)
    votes = F.one_hot(b, bins).float() * mag[..., None]  # (N, H, W, bins)
    cell = max(1, min(cell, *x.shape[1:]))
    h = F.avg_pool2d(votes.permute(0, 3, 1, 2), cell) * cell * cell  # (N, bins, cells_y, cells_x)
    h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return h.flatten(1)


def similarities(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Every similarity of two batches of maps on a 2D grid (or only the rank correlations on another grid)."""
    out = {"spearman": spearman(a, b), "spearman_abs": spearman(a.abs(), b.abs())}
    if a.dim() == 3 and min(a.shape[1:]) >= 7:
        out["ssim"] = ssim(a.abs(), b.abs())
        out["hog"] = _pearson(hog(a.abs()), hog(b.abs()))
    return out


# ----------------------------------------------------------------------------------------------------------------
# randomisation


def randomizable_layers(model: nn.Module) -> list[str]:
    """Modules with parameters of their own, top (output side) first: the order in which the cascading test
    randomises them (registration order, reversed)."""
    return [name for name, m in reversed(list(model.named_modules()))
            if name and any(True for _ in m.parameters(recurse=False))]


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            std = p.float().std().item() if p.numel() > 1 else 1.0
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
            p.copy_(noise * (std if std > 0 else 1.0))


@dataclass
class Randomisation:
    """The similarity of each randomised model's maps to the trained model's, per layer and image:
    cascading[similarity]: (layers, N), the top k layers randomised at row k-1 (layers in `layers`' order);
    independent[similarity]: (layers, N), only that layer randomised. maps: the trained model's maps, and cascade
    the maps after each cascading step (layers, N, *grid), for the strip of maps of the paper's figure."""

    layers: list[str]
    cascading: dict[str, Tensor]
    independent: dict[str, Tensor]
    maps: Tensor
    cascade: Tensor
    random_logit: dict[str, Tensor] = field(default_factory=dict)

    def survived(self, threshold: float = 0.5, similarity: str = "spearman_abs") -> int:
        """How many layers, from the top, can be randomised (cascading) while the maps' mean similarity to the
        trained model's stays at or above `threshold`."""
        n = 0
        for row in self.cascading[similarity]:
            if row.mean().item() < threshold:
                break
            n += 1
        return n

    def verdict(self, threshold: float = 0.5, similarity: str = "spearman_abs") -> dict:
        """{"verdict": "passes" | "fails", "reason", "survived_layers", "threshold", "similarity"}: a method passes
        when randomising the top layer already takes its maps' mean similarity below `threshold`."""
        n = self.survived(threshold, similarity)
        if n == 0:
            reason = (f"passes: randomising the top layer ({self.layers[0]}) takes the mean {similarity} below "
                      f"{threshold}")
        else:
            reason = (f"fails: the map survives randomisation of {n} layer{'s' if n > 1 else ''} (down to "
                      f"{self.layers[n - 1]}; mean {similarity} >= {threshold})")
        return {"verdict": "passes" if n == 0 else "fails", "reason": reason, "survived_layers": n,
                "threshold": threshold, "similarity": similarity}


def _maps(explain: Explain, model, inputs, classes) -> Tensor:
    return position_map(explain(model, inputs, classes).detach(), inputs.shape).cpu()


def randomisation_test(model: nn.Module, inputs: Tensor, explain: Explain, *, layers: list[str] | None = None,
                       independent: bool = True, random_logit: bool = True, seed: int = 0) -> Randomisation:
    """The model-parameter randomisation test and the random-logit test for one method.

    explain(model, inputs, classes) -> maps: the method (classes: the (N,) classes to explain). The classes are
    the trained model's top predictions, kept through every randomisation. layers: those to randomise, top first
    (default: every module with parameters, see randomizable_layers); the cascade randomises the first, then the
    first two, ...; independent: also each layer alone. random_logit: also compare with the map of a random other
    class (seeded), which a class-sensitive method changes. Runs on deep copies; the model is not changed."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, not {type(model).__name__}")
    names = randomizable_layers(model)
    if layers is None:
        layers = names
    unknown = [k for k in layers if k not in names]
    if unknown or not layers:
        raise ValueError(f"cannot randomise {unknown or 'no layers'}: name modules with parameters of their own, "
                         f"top first (e.g. {', '.join(names[:3])})")
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = work(inputs)
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError("the randomisation test needs (N, classes) logits from the model")
    classes = out.argmax(1)
    base = _maps(explain, work, inputs, classes)
    gen = torch.Generator().manual_seed(seed)
    cascading, cascade = [], []
    for name in layers:
        _randomize(work.get_submodule(name), gen)
        m = _maps(explain, work, inputs, classes)
        cascade.append(m)
        cascading.append(similarities(base, m))
    alone = []
    if independent:
        for name in layers:
            single = copy.deepcopy(model).eval()
            _randomize(single.get_submodule(name), gen)
            alone.append(similarities(base, _maps(explain, single, inputs, classes)))
    logit = {}
    if random_logit and out.shape[1] > 1:
        other = (classes + torch.randint(1, out.shape[1], classes.shape, generator=gen).to(classes.device)) % \
            out.shape[1]
        logit = similarities(base, _maps(explain, copy.deepcopy(model).eval(), inputs, other))
    stack = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}  # noqa: E731
    return Randomisation(list(layers), stack(cascading), stack(alone), base, torch.stack(cascade), logit)
