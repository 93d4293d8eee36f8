"""The gallery: the atlas (lightning_vis.atlas) of a few layers over a handful of pictures, plus a page of samples
(per picture: predictions, activation grids, deconvnet reconstructions and CAM overlays), linked from the atlas's
model page. Static files with relative links: it opens from disk.

    lv.report.build(model, inputs, shown, names, layers=["features.4", "features.10"], out="out/gallery",
                    cam_layer="features.18", class_names=categories, preprocess=normalize)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import images as im
from .activations import activation_grid, activations, top_predictions
from .atlas import build as build_atlas
from .atlas.site import e, img, page, url, write_if_changed
from .attribution import grad_cam
from .deconv import deconvnet


def write_samples(out, samples: list[dict], title: str) -> Path:
    """samples.html from already written pictures (relative URLs from `out`, quoted: site.url("samples", name)):
    [{"name", "image", "predictions": [(name, p)], "activations": {layer: url}, "deconv": {layer: url},
    "cams": {method: url}}]."""
    out = Path(out)
    parts = []
    for s in samples:
        preds = "".join(f"<tr><td>{e(n)}</td><td class=num>{p:.3f}</td></tr>" for n, p in s.get("predictions", []))
        parts.append(f'<h2 id="{e(url(s["name"]))}">{e(s["name"])}</h2><div class="renders"><figure>'
                     f'{img(s["image"], s["name"], cls="px")}<figcaption>the picture</figcaption></figure>'
                     + (f"<table><tr><th>class</th><th class=num>p</th></tr>{preds}</table>" if preds else "")
                     + "</div>")
        for kind, what in (("cams", "class activation map"), ("activations", "activation maps"),
                           ("deconv", "deconvnet: the picture, then its 3 strongest features")):
            for label, path in s.get(kind, {}).items():
                parts.append(f'<h3>{e(what)}: {e(label)}</h3><div class="plots">{img(path, f"{kind} {label}")}</div>')
    body = "".join(parts) or '<p class="muted">no samples</p>'
    index = out / "samples.html"
    write_if_changed(index, page(f"samples - {title}", [(title, "index.html"), ("samples", None)], body, 0))
    return index


def build(model: nn.Module, inputs: Tensor, shown: Tensor, names: Sequence[str], layers: Sequence[str], out, *,
          cam_layer: str | None = None, class_names: Sequence[str] | None = None,
          preprocess: Callable[[Tensor], Tensor] | None = None, units: int | None = 8, render_steps: int = 64,
          render_size: int = 96, image_channels: int = 3, k: int = 4, evolution: dict[str, Path] | None = None,
          title: str = "lightning-vis gallery", progress: bool = True, samples: int | None = None,
          render_kwargs: dict | None = None, **atlas_kwargs) -> Path:
    """The atlas of the first `units` units (None: all) of `layers` over these pictures, and a samples page;
    returns the atlas's index.html. inputs: (N, C, H, W) model inputs; shown: (N, 3, H, W) the same pictures in
    [0, 1]; names: one per picture. Top-k and bottom-k examples, distributions and health are taken over these
    pictures. evolution: {layer: folder with channel<c>.png strips} (from the FeatureVisualization callback).
    samples: how many of the pictures get a sample section (default all). render_kwargs: more for lv.render;
    atlas_kwargs: more for lightning_vis.atlas.build (diverse, batch, connections, fabric, ...)."""
    out = Path(out)
    atlas_kwargs.setdefault("diverse", 2)
    res = build_atlas(model, torch.utils.data.TensorDataset(inputs), out, list(layers), k=k, size=render_size,
                      steps=render_steps, image_channels=image_channels, max_units=units, preprocess=preprocess,
                      display=shown, names=list(names), title=title, links=[("samples", "samples.html")],
                      evolution=evolution, progress=progress, render=dict(render_kwargs or {}), **atlas_kwargs)
    n_samples = len(names) if samples is None else min(samples, len(names))
    inputs, shown, names = inputs[:n_samples], shown[:n_samples], list(names)[:n_samples]
    acts, logits = activations(model, inputs, list(layers))
    cams = {}
    if cam_layer is not None:
        for method in ("gradcam", "gradcam++", "layercam"):
            cams[method] = grad_cam(model, inputs, cam_layer, method=method).maps
    rec = deconvnet(model, inputs, list(layers), top_k=3)
    preds = top_predictions(logits, min(5, logits.shape[1]), class_names) if logits.dim() == 2 else None
    entries = []
    for i, name in enumerate(names):
        stem = f"{i}_{Path(name).stem}"[:60]

        def save(picture, suffix):
            path = out / "samples" / f"{stem}{suffix}.png"
            im.save_png(picture, path)
            return url("samples", path.name)  # a URL: a name with '#', '?' or '%' still reaches its file

        entry = {"name": name, "image": save(shown[i], ""), "predictions": [(n, p) for _, n, p in preds[i]]
                 if preds else [], "activations": {}, "deconv": {}, "cams": {}}
        for j, layer in enumerate(acts):
            if acts.has_maps(layer) and acts.layout(layer).spatial_dims == 2:
                grid = activation_grid(acts[layer], i, max_filters=64, cell=48, layout=acts.layout(layer))
                entry["activations"][layer] = save(grid, f"_act{j}")
        for j, (layer, r) in enumerate(rec.images.items()):
            row = im.grid(torch.cat([shown[i:i + 1], im.signed_rgb(r[i])]), ncol=r.shape[1] + 1)
            entry["deconv"][layer] = save(row, f"_deconv{j}")
        for method, maps in cams.items():
            entry["cams"][method] = save(im.overlay(shown[i], maps[i]), f"_{method.replace('+', 'p')}")
        entries.append(entry)
    write_samples(out, entries, title)
    return res.index
