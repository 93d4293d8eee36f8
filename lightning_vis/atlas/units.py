"""One chunk of units of a layer: their renders (positive, negative and diverse, in two batched optimisations) and
everything else each unit's folder holds (dataset examples with crops and activation maps, the distribution plot,
health, connections, unit.json, index.html). A unit's folder is written under a temporary name and renamed when
complete: a folder that exists is finished."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import images as im
from .. import objectives, plots
from .._util import model_device
from ..activations import activations
from ..circuits import ExpandedWeights
from ..featureviz import render
from ..health import NOISE_THRESHOLD, noise_flags, render_noise_score
from ..hooks.layout import Layout
from ..receptive import ReceptiveField
from . import site
from .settings import Settings, unit_seeds


@dataclass
class LayerContext:
    """What the unit pages of one layer need, decided before any unit is written."""

    name: str
    slug: str
    type: str
    shape: tuple
    layout: Layout
    units: int  # all units of the layer
    shown: int  # the units the atlas covers (the first `shown`)
    rf: ReceptiveField | None = None
    zero: Tensor | None = None
    weight_noise: Tensor | None = None
    kernel: tuple = ()
    weights_from: str | None = None
    weights_note: str | None = None  # why no module's weights were inspected
    duplicates: dict = field(default_factory=dict)  # unit -> [(other, cosine)]
    dead: Tensor | None = None
    active: Tensor | None = None
    mean: Tensor | None = None
    maximum: Tensor | None = None
    minimum: Tensor | None = None
    selectivity: Tensor | None = None
    selective: set = field(default_factory=set)
    top: object = None  # LayerTopK
    bottom: object = None
    hist: object = None  # LayerHistogram
    inputs: tuple | None = None  # (ExpandedWeights into this layer, source LayerContext)
    outputs: tuple | None = None  # (ExpandedWeights out of this layer, target LayerContext)
    connection_errors: dict = field(default_factory=dict)  # other layer -> why its connections were not computed
    evolution: Path | None = None
    hist_edges: Tensor | None = None
    seen: int = 0


def _round(v: float) -> float | None:
    """6 significant digits: what the files keep (sums over differently sharded data agree to far more); None (JSON
    null) for an infinity or NaN, which strict JSON cannot hold."""
    v = float(v)
    return float(f"{v:.6g}") if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------------------------
# renders


def render_chunk(model: nn.Module, layer: str, units: list[int], s: Settings, preprocess, device=None) -> dict:
    """Positive and negative renders of `units` in one batch, then `s.diverse` diverse renders of each (Lucid's
    diversity among each unit's own renders, the unit's activation normalised by what its positive render
    reached) in a second batch. Each render is seeded by (s.seed, layer, unit, kind) alone: the same image in any
    chunk."""
    n = len(units)
    u = torch.tensor(units)
    kw = dict(size=s.size, steps=s.steps, channels=s.image_channels, preprocess=preprocess, progress=False,
              device=device, **s.render)
    both = torch.cat([u, u]) if s.negative else u
    signs = torch.tensor([1.0] * n + [-1.0] * n if s.negative else [1.0] * n)
    base = objectives.channel(layer, both)

    def signed(acts, out):
        v = base(acts, out)
        return v * signs.to(v)

    res = render(model, objectives.Objective(signed, base.layers, f"+/-channel({layer})"), batch=len(both),
                 seed=unit_seeds(s.seed, layer, units, "positive") + (unit_seeds(s.seed, layer, units, "negative")
                                                                      if s.negative else []), **kw)
    final = res.final_scores()
    out = {"positive": res.images[:n], "positive_score": final[:n],
           "negative": res.images[n:] if s.negative else None, "negative_score": -final[n:] if s.negative else None,
           "diverse": None}
    d = s.diverse
    if d:
        scale = final[:n].abs().clamp_min(1e-6).repeat_interleave(d)
        ch = objectives.channel(layer, u.repeat_interleave(d))
        div = objectives.diversity(layer, group=d)

        def diverse(acts, o):
            v = ch(acts, o)
            return v / scale.to(v) + s.diversity_weight * div(acts, o)

        res = render(model, objectives.Objective(diverse, ch.layers, f"diverse channel({layer})"), batch=n * d,
                     seed=unit_seeds(s.seed, layer, units, "diverse", d), **kw)
        out["diverse"] = res.images.view(n, d, *res.images.shape[1:])
    return out


# ----------------------------------------------------------------------------------------------------------------
# dataset examples


def example_maps(model: nn.Module, inputs, wanted: dict[int, list[int]], layer: str,
                 batch: int) -> dict[tuple[int, int], Tensor]:
    """{(dataset index, unit): (*grid) map of that unit of `layer` for that input} for wanted {index: [units]},
    `batch` inputs at a time. Only the wanted pairs are kept, each in its own storage: memory O(pairs x grid), not
    O(inputs x units x grid) (each unit reads its own top-k and bottom-k inputs only)."""
    out = {}
    device = model_device(model)
    indices = sorted(wanted)
    for i in range(0, len(indices), batch):
        part = indices[i:i + batch]
        x = torch.stack([inputs(j) for j in part]).to(device)
        acts, _ = activations(model, x, [layer])
        maps = acts.maps(layer)
        for b, j in enumerate(part):
            for u in sorted(set(wanted[j])):
                out[(j, u)] = maps[b, u].float().cpu().clone()  # a copy: no view keeps the batch's maps alive
        del acts, maps
    return out


def example_projections(model: nn.Module, inputs, ctx: LayerContext, units: list[int]) -> tuple[dict, str | None]:
    """({(dataset index, unit): projection}, None) or ({}, why not): for each unit and each of its top-k inputs, the
    unit's strongest activation in that input projected alone (TopK.projections: one batched deconvnet pass per
    unit), cropped to that unit's receptive field (signed, the input's channels). A layer without a measured field
    (other than a vector layer, whose projections are whole inputs) has none."""
    from ..dataset import TopK

    if ctx.rf is None and ctx.layout.kind != "vector":
        return {}, "no receptive field was measured for this layer"

    class Indexed:
        def __getitem__(self, i):
            return inputs(i)

    top = TopK(ctx.top.indices.shape[1], "max", {ctx.name: ctx.top})
    out = {}
    try:
        for u in units:
            pairs = top.projections(Indexed(), ctx.name, u, model, rf=ctx.rf)
            for idx, (_, proj) in zip([i for i in ctx.top.indices[u].tolist() if i >= 0], pairs):
                out[(idx, u)] = proj
    except ValueError as e:  # the deconvnet rules cannot reach this layer (a refusal in one line): said on the page
        return {}, str(e)
    return out, None


def _fit(image: Tensor, longest: int) -> Tensor:
    """(C, H, W) scaled so that its longer side is `longest` (whole-factor nearest enlargement for small pictures,
    area reduction for large ones)."""
    h, w = image.shape[-2:]
    if max(h, w) == longest:
        return image
    if max(h, w) < longest:
        f = max(1, longest // max(h, w))
        return image if f == 1 else F.interpolate(image[None], scale_factor=f, mode="nearest")[0]
    size = (max(1, round(h * longest / max(h, w))), max(1, round(w * longest / max(h, w))))
    return F.interpolate(image[None].float(), size=size, mode="area")[0]


def picture_box(box, input_size, picture_size) -> tuple[tuple[int, int], ...]:
    """Box ((lo, hi) per axis, hi exclusive) in model-input coordinates -> the same region of a picture of
    `picture_size` showing that input at another size (each axis scaled on its own; outward to whole pixels)."""
    out = []
    for (lo, hi), n, m in zip(box, input_size, picture_size):
        f = m / n
        a = min(m - 1, max(0, math.floor(lo * f + 1e-9)))
        out.append((a, max(a + 1, min(m, math.ceil(hi * f - 1e-9)))))
    return tuple(out)


def _rgb(x: Tensor) -> Tensor:
    x = x.float()
    return x.expand(3, *x.shape[1:]) if x.shape[0] == 1 else x[:3]


def _box(image: Tensor, box, scale: tuple[float, float], colour=(1.0, 1.0, 1.0)) -> Tensor:
    """Draws the outline of box ((y0, y1), (x0, x1)) (input coordinates, scaled) on a (3, H, W) image."""
    (y0, y1), (x0, x1) = box
    sy, sx = scale
    h, w = image.shape[-2:]
    y0, y1 = max(0, int(y0 * sy)), min(h, max(int(y0 * sy) + 1, int(round(y1 * sy))))
    x0, x1 = max(0, int(x0 * sx)), min(w, max(int(x0 * sx) + 1, int(round(x1 * sx))))
    out = image.clone()
    c = torch.tensor(colour).view(3, 1)
    out[:, y0, x0:x1] = c
    out[:, y1 - 1, x0:x1] = c
    out[:, y0:y1, x0] = c
    out[:, y0:y1, x1 - 1] = c
    return out


# ----------------------------------------------------------------------------------------------------------------
# one unit's folder


def _hist_bins(counts: Tensor, edges: Tensor) -> list:
    """[[lo, hi, count]] of the non-empty bins; the overflow bins' infinite edge is null (unbounded)."""
    nz = counts.nonzero().flatten().tolist()
    return [[_round(edges[i]), _round(edges[i + 1]), int(counts[i])] for i in nz]


def _distribution_plot(ctx: LayerContext, unit: int):
    from ..dataset import Histograms

    h = Histograms(ctx.hist_edges, {ctx.name: ctx.hist}, ctx.seen)
    fig = plots.figure(4.6, 2.5, dpi=90, fixed=True)
    ax = fig.add_subplot()
    edges, values = h.display(ctx.name, unit, "values")
    plots.histogram(edges, values, fig=fig, ax=ax, log=True, label="every position", ylabel="count (log)",
                    xlabel="activation", title=f"{ctx.name} #{unit} over {ctx.seen} inputs")
    _, maxima = h.display(ctx.name, unit, "maxima", edges=edges)
    if float(maxima.sum()) > 0:
        ax.stairs(maxima.tolist(), edges.tolist(), fill=False, color=plots.RED, linewidth=1.2,
                  label="each input's strongest")
        ax.legend(fontsize=7, frameon=False)
    return fig


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the block: a unit's pictures are small tensors, for which intra-op threads only
    cost synchronisation (and, on a busy machine, much more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_unit(root: Path, ctx: LayerContext, unit: int, rendered: dict, i: int, *, settings: Settings,
               display, names, maps: dict[tuple[int, int], Tensor], model_title: str,
               projections: tuple[dict, str | None] = ({}, None)) -> Path:
    """Writes layers/<slug>/<unit>/ (temporary folder, renamed when complete, removed when anything fails: an
    exception, SIGTERM turned into one); returns it."""
    tmp = root / "layers" / ctx.slug / f".{unit}.tmp"
    try:
        with one_thread():
            return _write_unit(root, ctx, unit, rendered, i, settings=settings, display=display, names=names,
                               maps=maps, model_title=model_title, projections=projections)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_unit(root: Path, ctx: LayerContext, unit: int, rendered: dict, i: int, *, settings: Settings,
                display, names, maps: dict[tuple[int, int], Tensor], model_title: str,
                projections: tuple[dict, str | None] = ({}, None)) -> Path:
    final = root / "layers" / ctx.slug / str(unit)
    tmp = final.with_name(f".{unit}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s = settings
    pos = rendered["positive"][i]
    view = (lambda t: im.grid(t.transpose(0, 1), ncol=t.shape[1])) if pos.dim() == 4 else (lambda t: t)
    im.save_png(_rgb(view(pos)), tmp / "render.png")
    h, w = view(pos).shape[-2:]
    rend = {"positive": "render.png", "negative": None, "diverse": [],
            "display": [round(192 * h / max(h, w)), round(192 * w / max(h, w))],
            "scores": {"positive": _round(rendered["positive_score"][i])}}
    if rendered["negative"] is not None:
        im.save_png(_rgb(view(rendered["negative"][i])), tmp / "negative.png")
        rend["negative"] = "negative.png"
        rend["scores"]["negative"] = _round(rendered["negative_score"][i])
    if rendered["diverse"] is not None:
        for d, picture in enumerate(rendered["diverse"][i]):
            im.save_png(_rgb(view(picture)), tmp / f"diverse_{d}.png")
            rend["diverse"].append(f"diverse_{d}.png")
    render_noise = render_noise_score(pos[None] if pos.dim() == 3 else pos[:, pos.shape[1] // 2][None])
    sl = slice(unit, unit + 1)
    noisy = bool(noise_flags(ctx.weight_noise[sl] if ctx.weight_noise is not None else None, ctx.kernel,
                             render_noise, ctx.zero[sl] if ctx.zero is not None else None, NOISE_THRESHOLD,
                             1)[0])
    dups = [{"unit": j, "cosine": c} for j, c in ctx.duplicates.get(unit, []) if j < ctx.shown]
    health = {"dead": bool(ctx.dead[unit]) if ctx.dead is not None else None,
              "zero_weights": bool(ctx.zero[unit]) if ctx.zero is not None else None,
              "weight_noise": _round(ctx.weight_noise[unit]) if ctx.weight_noise is not None else None,
              "render_noise": _round(render_noise[0]), "noisy": noisy, "duplicates": dups,
              "weights_from": ctx.weights_from}
    flags = [f for f, on in (("dead", health["dead"]), ("dup", bool(dups)), ("noisy", noisy),
                             ("selective", unit in ctx.selective)) if on]
    rec = {"layer": ctx.name, "slug": ctx.slug, "unit": unit, "shown": ctx.shown, "render": rend, "health": health,
           "flags": flags, "examples": None, "distribution": None, "connections": {"inputs": None, "outputs": None},
           "evolution": None, "sub": f"{ctx.type}, output {' x '.join(map(str, ctx.shape[1:]))} "
                                     f"({ctx.layout.describe()}), {ctx.units} units"}
    if ctx.top is not None:
        rec["examples"] = {"top": _examples(tmp, ctx, unit, "top", ctx.top, display, names, maps, s,
                                            projections[0]),
                           "bottom": _examples(tmp, ctx, unit, "bottom", ctx.bottom, display, names, maps, s),
                           "projection_error": projections[1]}
    if ctx.hist is not None:
        seen = ctx.seen
        fig = _distribution_plot(ctx, unit)
        plots.save(fig, tmp / "distribution.png")
        w, h = fig.canvas.get_width_height()
        sel = ctx.selectivity[unit] if ctx.selectivity is not None else None
        rec["distribution"] = {
            "plot": "distribution.png", "plot_size": [h, w], "seen": seen, "mean": _round(ctx.mean[unit]),
            "max": _round(ctx.maximum[unit]), "min": _round(ctx.minimum[unit]),
            "active_fraction": _round(ctx.active[unit]), "selectivity": _round(sel) if sel is not None else None,
            "nan": int(ctx.hist.nan[unit]), "bins": {"values": _hist_bins(ctx.hist.values[unit], ctx.hist_edges),
                                                     "maxima": _hist_bins(ctx.hist.maxima[unit], ctx.hist_edges)}}
    for key, pair in (("inputs", ctx.inputs), ("outputs", ctx.outputs)):
        if pair is None or s.connections == 0:
            continue
        weights, other = pair
        if other.name in ctx.connection_errors:
            rec["connections"][key] = {"layer": other.name, "slug": other.slug, "connected": False, "positive": [],
                                       "negative": [], "error": ctx.connection_errors[other.name]}
            continue
        rec["connections"][key] = _connection_record(weights, other, unit, key, s.connections)
    if ctx.evolution is not None and (Path(ctx.evolution) / f"channel{unit}.png").is_file():
        shutil.copyfile(Path(ctx.evolution) / f"channel{unit}.png", tmp / "evolution.png")
        rec["evolution"] = "evolution.png"
    (tmp / "unit.json").write_text(json.dumps(rec, indent=1, sort_keys=True, allow_nan=False) + "\n")
    (tmp / "index.html").write_text(site.unit_page(rec, model_title))
    os.rename(tmp, final)
    return final


def _connection_record(weights: ExpandedWeights, other: LayerContext, unit: int, key: str, n: int) -> dict:
    """The n strongest positive and negative connections of `unit` with units of `other` the atlas covers."""
    w = weights.weights[:, :other.shown] if key == "inputs" else weights.weights[:other.shown]
    strongest = ExpandedWeights(weights.source, weights.target, w, weights.centre, weights.connected).strongest(
        unit, n, direction=key)
    return {"layer": other.name, "slug": other.slug, "connected": weights.connected,
            **{sign: [{"unit": j, "weight": _round(v)} for j, v in items] for sign, items in strongest.items()}}


def _examples(tmp: Path, ctx: LayerContext, unit: int, which: str, entry, display, names, maps, s: Settings,
              projections: dict | None = None) -> list:
    out = []
    for j, (idx, score, pos) in enumerate(zip(entry.indices[unit].tolist(), entry.scores[unit].tolist(),
                                              entry.positions[unit].tolist())):
        if idx < 0:
            continue
        picture = display(idx)
        rec = {"index": idx, "name": names(idx), "score": _round(score), "position": pos, "crop": None,
               "crop_size": None, "map": None, "map_size": None, "projection": None, "projection_size": None}
        proj = (projections or {}).get((idx, unit))
        if proj is not None and proj.dim() == 3:  # Figure 2: the strongest activation projected, on its field
            shown = _fit(im.signed_rgb(proj[None])[0], s.tile)
            im.save_png(shown, tmp / f"{which}_{j}_projection.png")
            rec["projection"], rec["projection_size"] = f"{which}_{j}_projection.png", list(shown.shape[-2:])
        if picture.dim() == 3:
            box = None
            if ctx.rf is not None and len(pos) == 2:  # the field is in model-input pixels; the picture may differ
                box = picture_box(ctx.rf.box(pos), ctx.rf.input_size, tuple(picture.shape[-2:]))
            crop = picture if box is None else picture[:, box[0][0]:box[0][1], box[1][0]:box[1][1]]
            crop = _rgb(_fit(crop, s.tile))
            im.save_png(crop, tmp / f"{which}_{j}.png")
            rec["crop"], rec["crop_size"] = f"{which}_{j}.png", list(crop.shape[-2:])
            m = maps.get((idx, unit))
            if m is not None and m.dim() == 2:  # (h, w): a 2D map over the picture
                heat = m if which == "top" else -m
                shown = _rgb(_fit(picture, 2 * s.tile))
                over = im.overlay(shown, heat)
                if box is not None:
                    over = _box(over, box, (shown.shape[1] / picture.shape[1], shown.shape[2] / picture.shape[2]))
                im.save_png(over, tmp / f"{which}_{j}_map.png")
                rec["map"], rec["map_size"] = f"{which}_{j}_map.png", list(over.shape[-2:])
        out.append(rec)
    return out
