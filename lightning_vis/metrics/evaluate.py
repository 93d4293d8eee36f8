"""Which method should I trust on this model? ``evaluate`` runs the chosen methods on the user's images, scores
each with the faithfulness metrics and the sanity checks, always beside a random map (is the method better than
chance here?), and gives a table (method x metric: mean, spread and every image's value), the JSON the CLI writes,
and plots (deletion / insertion curves, the randomisation cascade as a strip of maps per method)."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attribution import (CAM_METHODS, _input_gradient, attention_rollout, fullgrad, grad_cam, gradient_shap,
                           guided_backprop, input_x_gradient, integrated_gradients, lrp, occlusion, saliency,
                           target_scores)
from ..display import NoPicture, Shows, html_table
from ..hooks import Layout, ModelGuard
from ..hooks.taps import layers
from . import perturbation as P
from .sanity import Randomisation, randomisation_test

# The one table of methods: name as the CLI spells it -> explain(model, inputs, classes, layer, seed) -> (maps,
# grid). maps: what the metrics score ((N, *spatial) or the input's shape); grid: the spatial shape the method
# resolves (a CAM's layer grid, attention rollout's patch grid, occlusion's window placements; the input's own
# grid for per-pixel methods): the random baseline a method is compared with is drawn on the same grid.


def _pixels(maps: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return maps, tuple(maps.shape[2:])


def _cam(method: str) -> Callable:
    def explain(m, x, c, layer, seed):
        cam = grad_cam(m, x, layer, c, method=method)
        if method == "guided-gradcam":  # the picture is guided backprop times the map: per pixel
            return _pixels(cam.guided.abs())
        return cam.maps, tuple(cam.low_res.shape[1:])

    return explain


def _deconvnet(model, x, classes):
    with ModelGuard(model, eval=True, freeze=True), torch.enable_grad():
        return _input_gradient(model, x, classes, "deconvnet")[0]


def _rollout(m, x, c, layer, seed):
    maps = attention_rollout(m, x)  # class-agnostic: the attention the model pays, whatever the class
    return maps, tuple(maps.shape[1:])


def _fullgrad(m, x, c, layer, seed):
    maps = fullgrad(m, x, c).maps  # (N, *input spatial): per position, as a CAM upsampled
    return maps, tuple(maps.shape[1:])


def _occlusion(m, x, c, layer, seed):
    window = [max(1, n // 8) for n in x.shape[2:]]  # 8 windows a side, overlapping by half (the default stride)
    occ = occlusion(m, x, c, window=window)
    return occ.maps, tuple(occ.grid.shape[1:])


METHODS: dict[str, Callable] = {
    **{name: _cam(name) for name in CAM_METHODS},
    "fullgrad": _fullgrad,
    "saliency": lambda m, x, c, layer, seed: _pixels(saliency(m, x, c).maps),
    "smoothgrad": lambda m, x, c, layer, seed: _pixels(saliency(m, x, c, samples=16, seed=seed).maps),
    "guided-backprop": lambda m, x, c, layer, seed: _pixels(guided_backprop(m, x, c).maps.abs()),
    "deconvnet": lambda m, x, c, layer, seed: _pixels(_deconvnet(m, x, c).abs()),
    "attention-rollout": _rollout,
    "integrated-gradients": lambda m, x, c, layer, seed: _pixels(integrated_gradients(m, x, c).maps),
    "gradient-shap": lambda m, x, c, layer, seed: _pixels(gradient_shap(m, x, c, seed=seed).maps),
    "input-x-gradient": lambda m, x, c, layer, seed: _pixels(input_x_gradient(m, x, c).maps),
    "occlusion": _occlusion,
    "lrp": lambda m, x, c, layer, seed: _pixels(lrp(m, x, c).maps),
}


def random_name(grid: Sequence[int], spatial: Sequence[int]) -> str:
    """The random baseline row of a grid: "random (pixels)" on the input's own grid, "random (7x7)" on a coarser
    one."""
    return "random (pixels)" if tuple(grid) == tuple(spatial) else f"random ({'x'.join(map(str, grid))})"


def _random(x: Tensor, grid: Sequence[int], seed: int) -> Tensor:
    """A map of uniform noise on `grid` (N, *grid), the same for the same seed and shape; the metrics upsample a
    coarse one to the input as they do a CAM."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((x.shape[0], *grid), generator=g).to(x.device)


def patch_grid(model: nn.Module, images: Tensor) -> tuple[int, ...] | None:
    """The cells deletion / insertion remove when the caller names none: a token model's patch grid (ViT, DeiT: every
    token layer over the input on one grid, the grid its attention rollout and Grad-CAM maps are on), from the
    layouts of one pass (hooks.layout); None (every position) for a model with no token layer over the input (a
    CNN), and so for token layers on several grids (Swin, PVT, MViT: no one patch grid; grid= names a stage's)."""
    spatial = images.dim() - 2
    grids = {info.layout.grid for info in layers(model, images[:1]) if isinstance(info.layout, Layout)
             and info.layout.kind == "tokens" and len(info.layout.grid) == spatial}
    return next(iter(grids)) if len(grids) == 1 else None


METRICS = ("deletion", "insertion", "road", "average_drop", "increase_in_confidence", "infidelity",
           "max_sensitivity", "sanity")
# which way is better, for the table's reader
BETTER = {"deletion": "lower", "insertion": "higher", "road": "higher", "average_drop": "lower",
          "increase_in_confidence": "higher", "infidelity": "lower", "max_sensitivity": "lower"}


def _summary(values: Tensor) -> dict:
    """mean, std (population: 0 for one image) and every image's value, as plain floats."""
    v = values.detach().double().cpu()
    return {"mean": float(v.mean()), "std": float(v.std(correction=0)), "per_image": [float(a) for a in v]}


@dataclass
class Evaluation(Shows):
    """metrics[method][metric] = {"mean", "std", "per_image"}; curves[method]: deletion / insertion Curves;
    sanity[method]: the Randomisation and its verdict; threshold: the verdicts' similarity threshold; grids[method]:
    the grid the method's map resolves; baselines[method]: the random row drawn on that grid (its own name for a
    random row); settings: what the metrics ran with (deletion / insertion's cells, steps and baseline, ROAD's
    percentiles, the samples and the seed). Shows itself (``show()``, ``save("x.png")``, notebooks: the table above the picture) as the
    deletion / insertion curves, or without them the randomisation cascade."""

    methods: list[str]
    grids: dict[str, tuple[int, ...]] = field(default_factory=dict)
    baselines: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)
    curves: dict[str, P.Curves] = field(default_factory=dict)
    sanity: dict[str, Randomisation] = field(default_factory=dict)
    threshold: float = 0.5
    settings: dict = field(default_factory=dict)

    def verdict(self, method: str) -> dict:
        return self.sanity[method].verdict(self.threshold)

    def to_json(self) -> dict:
        """{"methods": {name: {"grid": [...], "baseline": random row, "metrics": {metric: {"mean", "std",
        "per_image"}}, "sanity": {"verdict": "passes" |
        "fails", "reason", "survived_layers", "threshold", "similarity", "cascading": {similarity: per layer
        means}, "layers": [...]}}}, "settings": {"cells": deletion / insertion's grid or null (every position),
        "steps", "baseline", "percentiles", "samples", "seed"}} (sanity only where it was run)."""
        out = {}
        for m in self.methods:
            entry = {"grid": list(self.grids.get(m, ())), "baseline": self.baselines.get(m),
                     "metrics": self.metrics.get(m, {})}
            if m in self.sanity:
                r = self.sanity[m]
                entry["sanity"] = {**self.verdict(m), "layers": r.layers,
                                   "cascading": {k: [float(row.mean()) for row in v] for k, v in r.cascading.items()},
                                   "random_logit": {k: float(v.mean()) for k, v in r.random_logit.items()}}
            out[m] = entry
        return {"methods": out, "settings": self.settings}

    def table(self) -> str:
        """The table as text: a row per method, a column per metric (mean +- std), the sanity verdict last."""
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

    def _rows(self) -> list[list[str]]:
        """The table's cells, its header first."""
        cols = [k for k in METRICS[:-1] if any(k in self.metrics.get(m, {}) for m in self.methods)]
        head = ["method", *[f"{c} ({BETTER[c]})" for c in cols]] + (["sanity"] if self.sanity else [])
        rows = [head]
        for m in self.methods:
            cells = [m]
            for c in cols:
                s = self.metrics.get(m, {}).get(c)
                cells.append(f"{s['mean']:.4g} +- {s['std']:.2g}" if s else "-")
            if self.sanity:
                cells.append(self.verdict(m)["verdict"] if m in self.sanity else "-")
            rows.append(cells)
        return rows

    def _picture(self) -> Tensor:
        from ..plots import to_image

        if self.curves:
            return to_image(self.plot_curves())
        if self.sanity:
            return to_image(self.plot_cascade())
        raise NoPicture("nothing to draw: no deletion / insertion curves and no sanity check were run")

    def _repr_html_(self) -> str:
        try:
            picture = self._picture()
        except NoPicture:
            picture = None
        return html_table(self._rows(), picture)

    def plot_curves(self):
        """Deletion and insertion curves (mean over images) of every method, side by side."""
        from ..plots import figure

        fig = figure(8, 3)
        for i, kind in enumerate(("deletion", "insertion")):
            ax = fig.add_subplot(1, 2, i + 1)
            for m, c in self.curves.items():
                ax.plot(c.fractions.cpu(), getattr(c, kind).mean(0).cpu(), label=m,
                        linestyle="--" if m.startswith("random") else "-")
            ax.set_title(f"{kind} (AUC: {'lower' if kind == 'deletion' else 'higher'} is better)", fontsize=10)
            ax.set_xlabel(f"fraction of positions {'removed' if kind == 'deletion' else 'inserted'}", fontsize=9)
            ax.set_ylabel("target score", fontsize=9)
        if self.curves:
            ax.legend(fontsize=8)
        return fig

    def plot_cascade(self, image: int = 0):
        """The randomisation cascade of one image as a strip of maps per method (rows): the trained model's map,
        then the map after randomising each further layer from the top (as Adebayo et al.'s figure)."""
        from ..plots import figure

        methods = list(self.sanity)
        if not methods:
            raise ValueError("no sanity check was run: evaluate with 'sanity' among the metrics")
        cols = 1 + max(len(self.sanity[m].layers) for m in methods)
        fig = figure(1.3 * cols, 1.4 * len(methods) + 0.3)
        for r, m in enumerate(methods):
            res = self.sanity[m]
            maps = [res.maps[image], *res.cascade[:, image]]
            for c, mp in enumerate(maps):
                ax = fig.add_subplot(len(methods), cols, r * cols + c + 1)
                a = mp.abs().float()
                a = a if a.dim() == 2 else a.flatten(0, -2)
                ax.imshow((a / a.max().clamp_min(1e-12)).numpy(), cmap="magma", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("trained" if c == 0 else res.layers[c - 1], fontsize=6)
                if c == 0:
                    ax.set_ylabel(m, fontsize=8)
        return fig

    def save(self, folder: str | Path) -> dict[str, Path] | Path:
        """evaluate.json, curves.png, cascade.png (where sanity ran) and index.html into folder; a path ending in
        .png: the picture alone (as ``show()`` draws it), returning that path."""
        from ..plots import save

        if Path(folder).suffix.lower() == ".png":
            return super().save(folder)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = {"json": folder / "evaluate.json", "html": folder / "index.html"}
        out["json"].write_text(json.dumps(self.to_json(), indent=1, allow_nan=False))
        if self.curves:
            out["curves"] = folder / "curves.png"
            save(self.plot_curves(), out["curves"])
        if self.sanity:
            out["cascade"] = folder / "cascade.png"
            save(self.plot_cascade(), out["cascade"])
        rows = "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in line.split('  ') if c)}</tr>"
                       for line in self.table().splitlines())
        notes = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(self.verdict(m)['reason'])}</li>"
                        for m in self.sanity)
        imgs = "".join(f'<p><img src="{p.name}"></p>' for k, p in out.items() if k in ("curves", "cascade"))
        out["html"].write_text(f"<!doctype html><meta charset=utf-8><title>lightning-vis evaluate</title>"
                               f"<h1>Which method to trust</h1><table border=1>{rows}</table><ul>{notes}</ul>{imgs}")
        return out


def evaluate(model: nn.Module, images: Tensor, methods: Sequence[str] = ("saliency", "gradcam", "guided-backprop"),
             metrics: Sequence[str] = ("deletion", "insertion", "road", "average_drop", "increase_in_confidence",
                                       "sanity"),
             *, target=None, layer=None, steps: int = 20, baseline: str = "blur", percentiles=(10, 30, 50, 70, 90),
             samples: int = 10, sanity_layers: list[str] | None = None, threshold: float = 0.5, seed: int = 0,
             grid: Sequence[int] | None = None, batch_size: int | None = None,
             memory_budget: int | None = None) -> Evaluation:
    """Every method in `methods` (names as the CLI spells them: see METHODS) scored by every metric in `metrics`
    (see METRICS) on `images` (N, C, *spatial), beside random maps as baseline rows.

    The random baseline is drawn on each method's own grid, so that "better than chance" compares like with like:
    a CAM of a 7x7 layer against uniform noise on 7x7 upsampled as the CAM is ("random (7x7)"), a per-pixel method
    against per-pixel noise ("random (pixels)"); one random row per grid the chosen methods use, named by it, and
    each method's ``baselines[method]`` names its row.

    target: as everywhere (None: each image's top prediction, fixed on the clean image); layer: the CAM methods'
    layer (None: attribution.default_cam_layer). Deletion / insertion use `steps` and `baseline` and remove whole
    cells of `grid` (a ViT's patch grid, a clip's (T, H, W) grid; None: a token model's patch grid as its layout
    gives it, see patch_grid, else every position), ROAD the `percentiles`, infidelity and max-sensitivity
    `samples` perturbations; "sanity" runs the randomisation test (over `sanity_layers`, default every layer with
    parameters) with its verdict at `threshold`. All seeded."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method {unknown[0] if unknown else 'none given'!r}; choose from "
                         f"{', '.join(METHODS)} (the random baselines are always added)")
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"unknown metric {bad[0] if bad else 'none given'!r}; choose from {', '.join(METRICS)}")
    P._check(images)
    if grid is None and ("deletion" in metrics or "insertion" in metrics):  # the metrics that remove cells
        grid = patch_grid(model, images)
    with torch.no_grad(), ModelGuard(model, eval=True):
        out = model(images)
    classes = target_scores(out, target)[1]
    if classes is None:
        raise ValueError("evaluate needs class targets (None, a class, or one per image): the sanity checks and "
                         "the methods explain classes")
    opts = {"batch_size": batch_size, "memory_budget": memory_budget}
    spatial = tuple(images.shape[2:])
    explainers, first, grids = {}, {}, {}
    for name in dict.fromkeys(methods):
        explainers[name] = lambda m, x, c, fn=METHODS[name]: fn(m, x, c, layer, seed)[0]
        maps, grids[name] = METHODS[name](model, images, classes, layer, seed)
        first[name] = maps.detach()
    for cells in dict.fromkeys(grids.values()):  # (not `grid`: that is the deletion / insertion cells asked for)
        name = random_name(cells, spatial)
        explainers[name] = lambda m, x, c, cells=cells: _random(x, cells, seed)
        first[name] = _random(images, cells, seed)
        grids[name] = cells
    names = list(explainers)
    result = Evaluation(names, threshold=threshold, grids=grids,
                        baselines={m: random_name(grids[m], spatial) for m in names},
                        settings={"cells": None if grid is None else [int(v) for v in grid], "steps": steps,
                                  "baseline": baseline, "percentiles": [float(q) for q in percentiles],
                                  "samples": samples, "seed": seed})
    for name in names:
        explain, maps = explainers[name], first[name]
        row = {}
        if "deletion" in metrics or "insertion" in metrics:
            curves = P.deletion_insertion(model, images, maps, classes, steps=steps, baseline=baseline, grid=grid,
                                          **opts)
            result.curves[name] = curves
            for k in ("deletion", "insertion"):
                if k in metrics:
                    row[k] = _summary(getattr(curves, f"{k}_auc"))
        if "road" in metrics:
            row["road"] = _summary(P.road(model, images, maps, classes, percentiles=percentiles, seed=seed,
                                          **opts).combined)
        if "average_drop" in metrics or "increase_in_confidence" in metrics:
            conf = P.confidence(model, images, maps, classes, **opts)
            if "average_drop" in metrics:
                row["average_drop"] = _summary(conf.drop * 100)
            if "increase_in_confidence" in metrics:
                row["increase_in_confidence"] = _summary(conf.increase.float() * 100)
        if "infidelity" in metrics:
            row["infidelity"] = _summary(P.infidelity(model, images, maps, classes, samples=samples, seed=seed,
                                                      **opts))
        if "max_sensitivity" in metrics:
            row["max_sensitivity"] = _summary(P.max_sensitivity(lambda x, c: explain(model, x, c), images, classes,
                                                                samples=samples, seed=seed, **opts))
        result.metrics[name] = row
        if "sanity" in metrics:
            result.sanity[name] = randomisation_test(model, images, explain, layers=sanity_layers, seed=seed)
    return result
