"""How features and the prediction respond to translation, scale and rotation (Zeiler & Fergus, Figure 5).

For each image and each amount of the transform, the Euclidean distance between the layer's feature vector (its
whole output, flattened) for the original and for the transformed image, per layer, and the probability the model
gives the true class (labels=) or, without labels, the original image's top class. Every transformed image of a
chunk goes through the model in one forward pass; only the distances are kept, never the transformed features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activations
from .display import Shows
from .hooks.resolve import LayerSpec

TRANSFORMS = ("translate", "scale", "rotate")
MAX_AMOUNTS = 1000
_DEFAULTS = {"scale": [0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 1.75, 2.0],
             "rotate": [float(a) for a in range(0, 361, 30)]}


@dataclass
class Invariance(Shows):
    """transform; amounts (pixels (dy, dx) for translate, factors for scale, degrees counter-clockwise for rotate);
    distances[layer]: (A, N) Euclidean distance between the features of the original and the transformed image;
    probabilities: (A, N) probability of classes[n] (the true class, or the original's top class) for the
    transformed image; predicted: (A, N) the transformed image's top class."""

    transform: str
    amounts: list
    distances: dict[str, Tensor] = field(default_factory=dict)
    probabilities: Tensor | None = None
    classes: Tensor | None = None
    predicted: Tensor | None = None

    def _axis(self) -> tuple[list[float], str]:
        """The x axis of the plot: a number per amount and what it is."""
        if self.transform == "translate":
            if not any(dy for dy, _ in self.amounts):
                return [float(dx) for _, dx in self.amounts], "horizontal shift (pixels)"
            if not any(dx for _, dx in self.amounts):
                return [float(dy) for dy, _ in self.amounts], "vertical shift (pixels)"
            return [math.copysign(math.hypot(dy, dx), dx or dy) for dy, dx in self.amounts], "shift (pixels)"
        return [float(a) for a in self.amounts], "scale factor" if self.transform == "scale" else "rotation (degrees)"

    def plot(self, fig=None):
        """One panel per layer (the distance, a line per image) and one for the class probability. Returns the
        matplotlib Figure (plots.figure: Agg, no pyplot)."""
        from .plots import figure

        panels = [*self.distances.items(), ("probability of the class", self.probabilities)]
        if fig is None:
            fig = figure(3.0 * len(panels), 2.6)
        xs, label = self._axis()
        order = sorted(range(len(xs)), key=xs.__getitem__)
        for i, (name, values) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for n in range(values.shape[1]):
                ax.plot([xs[j] for j in order], [float(values[j, n]) for j in order], marker="o", markersize=3,
                        label=f"image {n}")
            ax.set_title(name if i == len(panels) - 1 else f"{name}: feature distance", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(panels) - 1:
                ax.set_ylim(-0.02, 1.02)
                if values.shape[1] <= 8:
                    ax.legend(fontsize=7)
        return fig

    def _picture(self) -> Tensor:
        """The plot (Shows: ``show()``, ``save(path)`` as PNG, notebooks)."""
        from .plots import to_image

        return to_image(self.plot())


def _amounts(transform, amounts, size):
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
    if amounts is None:
        if transform == "translate":
            step = max(1, size[1] // 16)
            return [(0, d * step) for d in range(-4, 5)]
        return list(_DEFAULTS[transform])
    amounts = list(amounts)
    if not 1 <= len(amounts) <= MAX_AMOUNTS:
        raise ValueError(f"amounts: give 1 to {MAX_AMOUNTS} amounts, got {len(amounts)}")
    out = []
    for a in amounts:
        if transform == "translate":
            a = (0, a) if isinstance(a, int) else tuple(a) if isinstance(a, (tuple, list)) else None
            if a is None or len(a) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in a):
                raise ValueError("translate amounts are whole pixels: dx, or (dy, dx)")
        else:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                raise ValueError(f"{transform} amounts are finite numbers, got {a!r}")
            a = float(a)
            if transform == "scale" and a <= 0:
                raise ValueError(f"scale amounts are factors > 0, got {a}")
        out.append(a)
    return out


def transform_images(images: Tensor, transform: str, amount, fill: float | None = None) -> Tensor:
    """images (N, C, H, W) translated by (dy, dx) pixels (circular, or shifted in with `fill`), scaled by a factor
    about the centre or rotated counter-clockwise by degrees about the centre (bilinear; pixels from outside the
    image are `fill`, 0 by default)."""
    if transform == "translate":
        dy, dx = amount
        if fill is None:
            return torch.roll(images, (dy, dx), dims=(-2, -1))
        out = torch.full_like(images, fill)
        h, w = images.shape[-2:]
        ys, yd = (slice(0, max(0, h - dy)), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, max(0, h + dy)))
        xs, xd = (slice(0, max(0, w - dx)), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, max(0, w + dx)))
        if abs(dy) < h and abs(dx) < w:
            out[..., yd, xd] = images[..., ys, xs]
        return out
    n, _, h, w = images.shape
    if transform == "scale":
        theta = torch.tensor([[1 / amount, 0.0, 0.0], [0.0, 1 / amount, 0.0]], dtype=torch.float64)
    else:  # the output pixel p samples the input at R(-angle) p (y points down: counter-clockwise on screen)
        c, s = math.cos(math.radians(amount)), math.sin(math.radians(amount))
        theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float64)
    grid = F.affine_grid(theta.to(images.dtype)[None].expand(n, -1, -1).to(images.device), list(images.shape),
                         align_corners=False)
    base = 0.0 if fill is None else fill
    return F.grid_sample(images - base, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + base


def invariance(model: nn.Module, images: Tensor, layers: LayerSpec, transform: str = "translate", amounts=None, *,
               labels: Tensor | None = None, fill: float | None = None, batch_size: int = 64) -> Invariance:
    """The distance between each layer's features of the original and the transformed images, and the class
    probability, as functions of the amount of `transform` (Zeiler & Fergus, Figure 5).

    images: (N, C, H, W). transform: "translate" (amounts: dx or (dy, dx) whole pixels; circular shifts unless
    `fill` is given, then the pixels shifted in are `fill`), "scale" (factors about the centre) or "rotate" (degrees
    counter-clockwise about the centre); scale and rotate fill what comes from outside with `fill` (default 0, the
    mean of normalised inputs). amounts default to a few shifts of up to a quarter of the width, 0.5 to 2x, 0 to 360
    degrees. labels: (N,) true classes; without them the original image's top class is followed. The model's output
    must be (N, classes) scores (softmax gives the probabilities). batch_size: transformed images per forward pass.
    The model is restored afterwards (activations()).
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"invariance: images must be a batch (N, C, H, W), got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    amounts = _amounts(transform, amounts, tuple(images.shape[-2:]))
    n = images.shape[0]
    feats, out = activations(model, images, layers)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"invariance needs a model that returns (N, classes) scores, got {got}")
    if labels is not None:
        labels = torch.as_tensor(labels, device=out.device).long().flatten()
        if labels.shape != (n,) or not bool(((labels >= 0) & (labels < out.shape[1])).all()):
            raise ValueError(f"labels must be {n} class indices in [0, {out.shape[1]})")
    classes = labels if labels is not None else out.argmax(1)
    base = {name: f.flatten(1).double() for name, f in feats.items()}
    missing = [name for name in base if base[name].shape[0] != n]
    if missing:
        raise ValueError(f"layer {missing[0]!r} does not give one output per image")
    result = Invariance(transform, amounts, classes=classes.cpu())
    dists = {name: [] for name in base}
    probs, preds = [], []
    per_chunk = max(1, batch_size // n)
    for start in range(0, len(amounts), per_chunk):
        chunk = amounts[start:start + per_chunk]
        batch = torch.cat([transform_images(images, transform, a, fill) for a in chunk])
        f, o = activations(model, batch, list(base))
        for name in base:
            d = (f[name].flatten(1).double().reshape(len(chunk), n, -1) - base[name]).norm(dim=2)
            dists[name].append(d.float().cpu())
        p = o.float().softmax(1).reshape(len(chunk), n, -1)
        probs.append(p.gather(2, classes.reshape(1, n, 1).expand(len(chunk), -1, -1)).squeeze(2).cpu())
        preds.append(p.argmax(2).cpu())
    result.distances = {name: torch.cat(v) for name, v in dists.items()}
    result.probabilities, result.predicted = torch.cat(probs), torch.cat(preds)
    return result
