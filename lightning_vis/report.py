"""A static HTML gallery in the spirit of OpenAI Microscope: an index of layers; per layer every unit's feature
visualization, its top-k dataset crops, its health and its evolution across epochs; per sample image the
predictions, activation grids, deconvnet reconstructions and CAM overlays. One folder of PNGs and an index.html
that opens from disk (relative links, no server, no script).

    lv.report.build(model, inputs, shown, names, layers=["features.4", "features.10"], out="out/gallery",
                    cam_layer="features.18", class_names=categories, preprocess=normalize)
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import images as im
from .activations import activation_grid, activations, top_predictions
from .attribution import grad_cam
from .dataset import TopKCollector, scan
from .deconv import deconvnet
from .featureviz import render
from .health import ActivityCollector
from .receptive import receptive_field

CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
header{background:#1f2937;color:#fff;padding:12px 20px}header a{color:#93c5fd;margin-right:14px}
main{padding:16px 20px}h2{border-bottom:1px solid #ddd;padding-bottom:4px}
.units{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:8px}
.card img{image-rendering:pixelated;max-width:100%}.viz{width:100%}
.crops img{width:23%;margin:1%}.badge{display:inline-block;border-radius:3px;padding:0 5px;font-size:12px;
margin-right:4px}.dead{background:#fee2e2}.noise{background:#fef3c7}.ok{background:#dcfce7}
table{border-collapse:collapse}td{padding:2px 8px;border-bottom:1px solid #eee}
.row img{max-width:100%;margin:4px 0}.sample{background:#fff;border:1px solid #e5e7eb;border-radius:6px;
padding:10px;margin-bottom:16px}
"""


def _img(path: str | None, cls: str = "", alt: str = "") -> str:
    if not path:
        return ""
    return f'<img src="{html.escape(path)}" class="{cls}" alt="{html.escape(alt)}">'


def write_gallery(out, *, title: str, layers: dict, samples: list, notes: str = "") -> Path:
    """index.html from already written pictures (paths relative to `out`).

    layers: {name: {"units": [{"channel", "viz", "topk": [paths], "evolution", "health": {...}}], "plots": [...],
    "summary": str}}; samples: [{"name", "image", "predictions": [(name, p)], "activations": {layer: path},
    "deconv": {layer: path}, "cams": {method: path}}]."""
    out = Path(out)
    e = html.escape
    nav = "".join(f'<a href="#layer-{e(n)}">{e(n)}</a>' for n in layers) + '<a href="#samples">samples</a>'
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style>"
             f"</head><body><header><b>{e(title)}</b><br>{nav}</header><main>"]
    if notes:
        parts.append(f"<p>{e(notes)}</p>")
    for name, layer in layers.items():
        parts.append(f'<section id="layer-{e(name)}"><h2>{e(name)}</h2>')
        if layer.get("summary"):
            parts.append(f"<pre>{e(layer['summary'])}</pre>")
        parts.append("".join(_img(p, alt=f"{name} plot") for p in layer.get("plots", [])))
        parts.append('<div class="units">')
        for u in layer.get("units", []):
            h = u.get("health") or {}
            badges = ""
            if h:
                if h.get("dead"):
                    badges += '<span class="badge dead">dead</span>'
                if h.get("noise_only"):
                    badges += '<span class="badge noise">noise-only</span>'
                if not h.get("dead") and not h.get("noise_only"):
                    badges += '<span class="badge ok">healthy</span>'
                badges += f"active {h.get('active_fraction', 0):.2f}"
            c = u["channel"]
            viz = _img(u.get("viz"), "viz", f"feature visualization of unit {c}")
            crops = "".join(_img(p, alt="top-k crop") for p in u.get("topk", []))
            evo = _img(u.get("evolution"), "viz", "evolution across epochs")
            parts.append(f'<div class="card" id="{e(name)}-{c}"><b>unit {c}</b> {badges}{viz}'
                         f'<div class="crops">{crops}</div>{evo}</div>')
        parts.append("</div></section>")
    parts.append('<section id="samples"><h2>samples</h2>')
    for s in samples:
        preds = "".join(f"<tr><td>{e(str(n))}</td><td>{p:.3f}</td></tr>" for n, p in s.get("predictions", []))
        parts.append(f'<div class="sample"><h3>{e(s["name"])}</h3>{_img(s.get("image"), alt=s["name"])}'
                     f"<table>{preds}</table>")
        for kind in ("cams", "activations", "deconv"):
            for label, p in s.get(kind, {}).items():
                parts.append(f'<div class="row"><b>{e(kind)}: {e(label)}</b><br>{_img(p, alt=f"{kind} {label}")}'
                             "</div>")
        parts.append("</div>")
    parts.append("</section></main></body></html>")
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    index.write_text("\n".join(parts))
    return index


def build(model: nn.Module, inputs: Tensor, shown: Tensor, names: Sequence[str], layers: Sequence[str], out, *,
          cam_layer: str | None = None, class_names: Sequence[str] | None = None,
          preprocess: Callable[[Tensor], Tensor] | None = None, units: int = 8, render_steps: int = 64,
          render_size: int = 96, image_channels: int = 3, k: int = 4, evolution: dict[str, Path] | None = None,
          title: str = "lightning-vis gallery", progress: bool = True, samples: int | None = None,
          render_kwargs: dict | None = None) -> Path:
    """Computes everything for the gallery and writes it. inputs: (N, C, H, W) model inputs; shown: (N, 3, H, W)
    the same pictures in [0, 1]; names: one per picture. The top-k examples and filter health are taken over these
    pictures. evolution: {layer: folder with channel<c>.png strips} (from the FeatureVisualization callback).
    samples: how many of the pictures get a sample section (default all). render_kwargs: more for lv.render."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=16)
    collectors = [TopKCollector(model, list(layers), k), ActivityCollector(model, list(layers))]
    scan(model, loader, collectors, desc="top-k and health", progress=progress)  # one pass for both
    topk, health = collectors[0].result(), collectors[1].report()
    layer_pages = {}
    for name in layers:
        n_units = min(units, topk.layers[name].indices.shape[0])
        res = render(model, (name, range(n_units)), size=render_size, steps=render_steps, preprocess=preprocess,
                     channels=image_channels, progress=progress, **(render_kwargs or {}))
        try:
            rf = receptive_field(model, name, tuple(inputs.shape[1:]))
        except ValueError:
            rf = None
        picture_ds = [(shown[i],) for i in range(len(shown))]
        rows = {r["channel"]: r for r in health.table() if r["layer"] == name}
        unit_list = []
        for c in range(n_units):
            viz = im.save_png(_enlarge(res.images[c]), out / "units" / name / f"{c}.png")
            crops = topk.crops(picture_ds, name, c, rf=rf)
            crop_paths = [im.save_png(_enlarge(cr, 64), out / "units" / name / f"{c}_top{j}.png")
                          for j, cr in enumerate(crops)]
            evo = None
            if evolution and name in evolution and (Path(evolution[name]) / f"channel{c}.png").exists():
                evo = out / "units" / name / f"{c}_evolution.png"
                shutil.copy(Path(evolution[name]) / f"channel{c}.png", evo)
            unit_list.append({"channel": c, "viz": _rel(viz, out), "topk": [_rel(p, out) for p in crop_paths],
                              "evolution": _rel(evo, out) if evo else None, "health": rows.get(c)})
        layer_pages[name] = {"units": unit_list, "summary": ""}
    plots = [_rel(p, out) for p in health.plots(out / "health")]
    first = next(iter(layer_pages))
    layer_pages[first]["summary"] = health.summary()
    layer_pages[first]["plots"] = plots
    n_samples = len(names) if samples is None else min(samples, len(names))
    inputs, shown, names = inputs[:n_samples], shown[:n_samples], list(names)[:n_samples]
    sample_pages = []
    acts, logits = activations(model, inputs, list(layers))
    cams = {}
    if cam_layer is not None:
        for method in ("gradcam", "gradcam++", "layercam"):
            cams[method] = grad_cam(model, inputs, cam_layer, method=method).maps
    rec = deconvnet(model, inputs, list(layers), top_k=3)
    preds = top_predictions(logits, min(5, logits.shape[1]), class_names) if logits.dim() == 2 else None
    for i, name in enumerate(names):
        stem = Path(name).stem
        entry = {"name": name, "image": _rel(im.save_png(shown[i], out / "samples" / f"{stem}.png"), out),
                 "predictions": [(n, p) for _, n, p in preds[i]] if preds else [], "activations": {}, "deconv": {},
                 "cams": {}}
        for layer, a in acts.items():
            if a.dim() == 4:
                grid = activation_grid(a, i, max_filters=64, cell=48)
                entry["activations"][layer] = _rel(im.save_png(grid, out / "samples" / f"{stem}_{layer}.png"), out)
        for layer, r in rec.images.items():
            row = im.grid(torch.cat([shown[i:i + 1], im.signed_rgb(r[i])]), ncol=r.shape[1] + 1)
            entry["deconv"][layer] = _rel(im.save_png(row, out / "samples" / f"{stem}_{layer}_deconv.png"), out)
        for method, maps in cams.items():
            entry["cams"][method] = _rel(im.save_png(im.overlay(shown[i], maps[i]),
                                                     out / "samples" / f"{stem}_{method}.png"), out)
        sample_pages.append(entry)
    return write_gallery(out, title=title, layers=layer_pages, samples=sample_pages,
                         notes=f"{len(loader.dataset)} pictures; top-{k} crops and filter health over them.")


def _rel(path, root) -> str | None:
    return None if path is None else str(Path(path).relative_to(root))


def _enlarge(img: Tensor, size: int = 128) -> Tensor:
    img = img.float()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if max(img.shape[-2:]) >= size:
        return img
    return F.interpolate(img[None], size=(size, size), mode="nearest")[0]
