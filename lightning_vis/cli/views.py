"""Per-input views: the model's layers, activation grids and deconvnet reconstructions of each picture, and how
layers and the prediction respond as the pictures are translated, scaled or rotated (invariance)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import images as im
from ..activations import activation_grid, activations, top_predictions
from ..deconv import deconvnet
from ..hooks.layout import Layout
from ..hooks.taps import layers as list_layers
from ..invariance import TRANSFORMS, invariance
from ._common import (CliError, Inputs, Output, _check_layers, _explicit, _one_batch, _overrides, _parse_target,
                      _per_picture, add_layout_args, add_model_args, add_target_args, one_line, parse_size,
                      read_labels, say)

LAYERS_REAL_FORWARD = 3 * 1024 * 1024  # `layers`: larger example inputs go through the meta device


def cmd_layers(args, model, categories, transform):
    shape = parse_size(args.input_size, "--input-size", dims=(2, 3, 4), channels_first=True)
    # a real forward pass for ordinary sizes; larger ones on the meta device (shapes only, nothing allocated)
    meta = math.prod(shape) > LAYERS_REAL_FORWARD
    try:
        info = list_layers(model.to("meta") if meta else model, torch.zeros(1, *shape, device="meta" if meta else None),
                           leaves_only=not args.all)
    except NotImplementedError as e:
        raise CliError(f"--input-size {args.input_size!r}: the model cannot run on the meta device ({one_line(e)}); "
                       f"an input of at most {LAYERS_REAL_FORWARD:,} values runs for real") from None
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise CliError(f"--input-size {args.input_size!r}: the model does not take a {tuple([1, *shape])} input "
                       f"({one_line(e)})") from None
    if not info:
        raise CliError(f"{args.model}: no layer ran in the forward pass")
    width = max(len(i.name) for i in info)
    for i in info:
        print(f"{i.name:<{width}}  {i.type:<20} {str(list(i.output_shape) if i.output_shape else '-'):<22} "
              f"{i.layout_text:<24} {i.params:>10,d} params")


def cmd_activations(args, model, categories, transform):
    _check_layers(model, args.layers)
    ov = _overrides(args, model)
    names = read_labels(args, categories)

    def entry(out, stem, path, x, shown):
        acts, logits = activations(model, x[None], args.layers, **ov)
        found = {}
        if logits.dim() == 2:
            found["predictions"] = [{"index": i, "name": n, "p": round(p, 4)} for i, n, p in
                                    top_predictions(logits, min(args.top, logits.shape[1]), names)[0]]
        for layer, a in acts.items():
            lay = acts.layouts.get(layer)
            if not isinstance(lay, Layout) or lay.kind == "vector":
                if layer in _explicit(args.layers):
                    why = f": {lay.reason}" if lay is not None and not isinstance(lay, Layout) else \
                        " has no maps to draw"
                    raise CliError(f"--layers {layer}: its output {tuple(a.shape)}{why} (pick a conv or token "
                                   "layer)")
                continue  # a glob also matched Linear or pooled layers
            # small maps enlarged for display
            f = out.png(activation_grid(a, scale=args.scale, cell=48 if len(lay.grid) == 2 else None, layout=lay),
                        Path(stem) / f"{layer}_activations.png")
            found.setdefault("files", []).append(f)
        top = found.get("predictions", [])[:1]
        if top:
            say(f"{path.name}: {top[0]['name']} ({top[0]['p']:.2f})")
        return found
    _per_picture(args, model, transform, "activations.json", entry)


def cmd_deconv(args, model, categories, transform):
    _check_layers(model, args.layers)
    ov = _overrides(args, model)

    def entry(out, stem, path, x, shown):
        rec = deconvnet(model, x[None], args.layers, top_k=args.top_k, rule=args.rule, **ov)
        found = {}
        for layer, r in rec.images.items():
            if args.heat:  # |reconstruction| summed over channels, coloured over the image
                tiles = [im.overlay(shown, h, alpha=0.6) for h in r[0].float().abs().sum(1)]
            else:
                tiles = list(im.signed_rgb(r[0]))
            f = out.png(im.grid(torch.stack([shown] + tiles), ncol=len(tiles) + 1),
                        Path(stem) / f"{layer}_{args.rule}.png")
            found[layer] = {"features": rec.features[layer][0].tolist(), "file": f}
        return found
    _per_picture(args, model, transform, f"{args.rule}.json", entry)


def _amounts(spec: str | None, transform: str):
    """--amounts: comma-separated; translate: whole pixels DX or DY:DX, scale: factors, rotate: degrees."""
    if spec is None:
        return None
    out = []
    for item in spec.split(","):
        try:
            if transform != "translate":
                out.append(float(item))
                continue
            parts = [int(v) for v in item.split(":")]
            if len(parts) > 2:
                raise ValueError(item)
            out.append(parts[0] if len(parts) == 1 else tuple(parts))
        except ValueError:
            what = "whole pixels DX or DY:DX" if transform == "translate" else "a number"
            raise CliError(f"--amounts {spec!r}: {item.strip()!r} is not {what} (comma-separated, e.g. "
                           f"{'-8,0,8 or -4:4,0:0' if transform == 'translate' else '0.5,1,2'})") from None
    return out


def cmd_invariance(args, model, categories, transform):
    layers = _check_layers(model, args.layers)
    amounts = _amounts(args.amounts, args.transform)
    names = read_labels(args, categories)
    target = _parse_target(args, names)
    inputs = Inputs(args, model, transform)
    _one_batch(inputs, args.max_images)
    loaded = inputs.usable(keep=True)
    if any(x.dim() != 3 for _, x, _ in loaded):
        raise CliError("invariance takes still images (a GIF with several frames is a clip)")
    batch = torch.stack([x for _, x, _ in loaded])
    labels = None if target is None else torch.full((len(loaded),), target)
    res = invariance(model, batch, layers, args.transform, amounts, labels=labels, batch_size=args.batch_size)
    images = {}
    for i, (path, _, _) in enumerate(loaded):
        c = int(res.classes[i])
        images[inputs.key(path)] = {
            "class": c, "name": names[c] if names and c < len(names) else str(c),
            "probability": [round(float(v), 6) for v in res.probabilities[:, i]],
            "predicted": res.predicted[:, i].tolist(),
            "distances": {k: [round(float(v), 6) for v in d[:, i]] for k, d in res.distances.items()}}
    with Output(args.out) as out:
        plot = out.final(res.save(out.path(f"invariance_{args.transform}.png")))
        report = {"transform": res.transform, "amounts": [list(a) if isinstance(a, tuple) else a for a in res.amounts],
                  "layers": list(res.distances), "plot": plot, "images": images}
        if inputs.skipped:
            report["skipped"] = inputs.skipped
        out.text(f"invariance_{args.transform}.json", json.dumps(report, indent=1))
        out.commit()
    print(f"{len(loaded)} images, {len(res.amounts)} amounts of {args.transform}; wrote {out.folder}/")


def add_commands(sub) -> None:
    """layers, activations, deconv, invariance."""
    p = sub.add_parser("layers", help="list the model's layers with type, output shape, layout and parameters")
    add_model_args(p, with_images=False)
    p.add_argument("--input-size", default="3,224,224", help="C,H,W of the example input (default %(default)s)")
    p.add_argument("--all", action="store_true", help="containers too, not only leaf layers")
    p.set_defaults(run=cmd_layers)
    p = sub.add_parser("activations", help="activation grids of layers for each image, and predictions")
    add_model_args(p)
    p.add_argument("--top", type=int, default=5, help="predictions to show (default %(default)s)")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")
    p.add_argument("--scale", choices=["per_image", "shared"], default="per_image")
    add_layout_args(p)
    p.set_defaults(run=cmd_activations)
    p = sub.add_parser("deconv", help="deconvnet (or guided backprop) reconstructions of the top features")
    add_model_args(p)
    p.add_argument("--top-k", type=int, default=3, help="strongest features per layer (default %(default)s)")
    p.add_argument("--rule", choices=["deconvnet", "guided"], default="deconvnet")
    p.add_argument("--heat", action="store_true", help="overlay heat maps on the image instead of RGB")
    add_layout_args(p)
    p.set_defaults(run=cmd_deconv)
    p = sub.add_parser("invariance", help="how layers' features and the class probability change as the images are "
                                          "translated, scaled or rotated (Zeiler and Fergus): curves as PNG and JSON")
    add_model_args(p)
    p.add_argument("--transform", choices=TRANSFORMS, default="translate")
    p.add_argument("--amounts", help="comma-separated: translate: pixels DX or DY:DX; scale: factors; rotate: "
                                     "degrees (default: shifts up to a quarter of the width, 0.5 to 2x, 0 to 360); "
                                     "--amounts=-8,0,8 where the first is negative")
    p.add_argument("--batch-size", type=int, default=64, help="transformed images per forward pass "
                                                              "(default %(default)s)")
    p.add_argument("--max-images", type=int, default=64, help="at most this many pictures (default %(default)s)")
    add_target_args(p)
    p.set_defaults(run=cmd_invariance)
