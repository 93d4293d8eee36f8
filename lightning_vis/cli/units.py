"""Per-unit views: the pictures that excite each channel most, filter health, feature visualizations and DeepDream."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import images as im
from .._util import model_device
from ..dataset import top_k_examples
from ..featureviz import deep_dream, render
from ..health import filter_health
from ..hooks import ModelGuard, resolve_layers
from ..loading import load_image
from ..receptive import receptive_field
from ._common import (CliError, Output, _check_render, _loader, _one_layer, _overrides, _preprocess, _Shown,
                      add_layout_args, add_model_args, one_line, parse_channels, parse_size)

MAX_DREAM_TILES = 1024  # pieces per DeepDream step (--tile)


def cmd_topk(args, model, categories, transform):
    ov = _overrides(args, model)
    inputs, ds, loader = _loader(args, model, transform)
    res = top_k_examples(model, loader, args.layers, k=args.k, score=args.score, **ov)
    report = {}
    pictures = _Shown(ds)
    with Output(args.out) as out:
        for layer, entry in res.layers.items():
            try:
                rf = receptive_field(model, layer, res.input_shape, max_size=2 * max(res.input_shape[1:]))
            except ValueError:
                rf = None  # token or linear layers: whole pictures
            channels = range(min(args.channels, entry.indices.shape[0]))
            rows = []
            for c in channels:
                crops = res.crops(pictures, layer, c, rf=rf)
                tiles = [torch.nn.functional.interpolate(t[None].float(), size=(args.tile, args.tile),
                                                         mode="bilinear", align_corners=False)[0] for t in crops]
                tiles += [torch.ones(3, args.tile, args.tile)] * (args.k - len(tiles))
                rows += tiles
            f = out.png(im.grid(torch.stack(rows), ncol=args.k), f"{layer}_top{args.k}.png")
            report[layer] = {"file": f, "receptive_field": rf.size if rf else None, "channels": {
                c: [{"image": ds.paths[i].name, "score": round(float(s), 4)}
                    for i, s in zip(entry.indices[c].tolist(), entry.scores[c].tolist()) if i >= 0]
                for c in range(entry.indices.shape[0])}}
        if inputs.skipped:
            report["skipped"] = inputs.skipped
        out.text("topk.json", json.dumps(report, indent=1))
        out.commit()
    print(f"{res.seen} images scanned; one row per channel (first {args.channels}), best first; wrote {out.folder}/")


def cmd_health(args, model, categories, transform):
    ov = _overrides(args, model)
    inputs, ds, loader = _loader(args, model, transform)
    rep = filter_health(model, loader, args.layers, threshold=args.threshold, **ov)
    bad = rep.suspicious()
    with Output(args.out) as out:
        index = {"seen": rep.seen, "table": rep.table(), "suspicious": bad}
        if inputs.skipped:
            index["skipped"] = inputs.skipped
        out.text("health.txt", rep.summary() + "\n")
        rep.plots(out.path("plots"))
        out.text("health.json", json.dumps(index, indent=1))
        out.commit()
    print(rep.summary())
    for r in bad[:args.show]:
        why = [w for w, on in (("dead", r["dead"]), ("noise-only", r["noise_only"]),
                               (f"duplicates {r['duplicate_of']}", r["duplicate_of"])) if on]
        print(f"  {r['layer']} #{r['channel']}: {', '.join(why)} (active {r['active_fraction']:.3f}, "
              f"noise score {r['noise_score']})")
    print(f"{len(bad)} suspicious filters of {sum(len(h.mean) for h in rep.layers.values())}; wrote {out.folder}/")


def cmd_render(args, model, categories, transform):
    args.layer = _one_layer(model, args.layer, "--layer")
    units = parse_channels(args.channels)
    size = parse_size(args.size, "--size")
    size = size if len(size) > 1 else size[0]
    channels, preprocess = 1 if args.gray else 3, _preprocess(transform)
    ov = _overrides(args, model)
    _check_render(model, args.layer, units, size, channels, preprocess, **ov)
    res = render(model, (args.layer, units), size=size, steps=args.steps, param=args.param, seed=args.seed,
                 channels=channels, preprocess=preprocess, chunk_size=args.chunk_size, **ov)
    files = []
    with Output(args.out) as out:
        for u, img in zip(units, res.images):
            if img.dim() == 4:  # a space-time render: (C, T, H, W)
                files.append(out.gif(img.transpose(0, 1), f"{args.layer}_{u}.gif"))
                img = im.grid(img.transpose(0, 1), ncol=img.shape[1])
            files.append(out.png(img, f"{args.layer}_{u}.png"))
        tiles = res.images if res.images.dim() == 4 else res.images[:, :, res.images.shape[2] // 2]
        grid = out.png(im.grid(tiles), f"{args.layer}_grid.png")
        settings = {**res.settings, "model": args.model, "layer": args.layer, "channels": units,
                    "final_objective": [round(float(v), 4) for v in res.final_scores()], "files": files,
                    "grid": grid}
        out.text(f"{args.layer}_render.json", json.dumps(settings, indent=1))
        out.commit()
    print(f"rendered {len(units)} channels of {args.layer}; wrote {out.folder}/")


def _check_dream(model, layer: str, picture, args, preprocess, octave_scale: float = 1.4) -> None:
    """Every input deep_dream will give the model, tried once before the work (a pass without gradients that stops
    at the layer): each octave's image, cut into --tile pieces, the edge pieces included. A model that refuses one
    (too small for its pools, a fixed input size) is a one-line error naming --tile or --octaves."""
    from ..featureviz import _layouts  # the pass deep_dream itself makes to place the layer's units

    h, w = picture.shape[-2:]
    shapes = list(dict.fromkeys(tuple(max(8, int(round(s / octave_scale ** o))) for s in (h, w))
                                for o in reversed(range(args.octaves))))
    modules = resolve_layers(model, layer)
    tried = set()
    for shape in shapes:
        th = args.tile or max(shape)
        count = math.ceil(shape[0] / th) * math.ceil(shape[1] / th)
        if count > MAX_DREAM_TILES:
            raise CliError(f"--tile {args.tile}: cuts the {shape[0]}x{shape[1]} image into {count} pieces per step, "
                           f"over {MAX_DREAM_TILES}: use a larger tile")
        for piece in dict.fromkeys((a, b) for a in (min(th, shape[0]), shape[0] % th or th)
                                   for b in (min(th, shape[1]), shape[1] % th or th)):
            if piece in tried:
                continue
            tried.add(piece)
            x = torch.zeros(1, picture.shape[0], *piece, device=model_device(model))
            try:
                _layouts(model, [layer], modules, preprocess(x) if preprocess else x)
            except (RuntimeError, ValueError, IndexError) as e:
                if piece == shape:
                    raise CliError(f"--octaves {args.octaves}: the model does not take the {piece[0]}x{piece[1]} "
                                   f"image of the smallest octave ({one_line(e)}); use fewer octaves") from None
                raise CliError(f"--tile {args.tile}: the model does not take a {piece[0]}x{piece[1]} piece of the "
                               f"{shape[0]}x{shape[1]} image ({one_line(e)}); use a tile that divides the image "
                               "into pieces the model takes, or no --tile") from None


def cmd_dream(args, model, categories, transform):
    args.layer = _one_layer(model, args.layer, "--layer")
    path = Path(args.image)
    if not path.is_file():
        raise CliError(f"--image {args.image!r}: no such file")
    _, shown = load_image(path, transform, args.size, args.gray)
    if shown.dim() != 3:
        raise CliError(f"--image {args.image!r}: DeepDream takes a still image")
    picture = shown[:1] if args.gray else shown
    preprocess = _preprocess(transform)
    try:
        with ModelGuard(model, eval=True), torch.no_grad():
            model((preprocess(picture[None]) if preprocess else picture[None]).to(model_device(model)))
    except RuntimeError as e:
        raise CliError(f"--image {args.image!r}: the model does not take it as a {tuple(picture.shape)} input "
                       f"({one_line(e)})" + ("; for a one-channel model add --gray" if not args.gray else "")) from None
    _check_dream(model, args.layer, picture, args, preprocess)
    dream = deep_dream(model, picture, args.layer, octaves=args.octaves, steps=args.steps, lr=args.lr,
                       tile=args.tile, seed=args.seed, preprocess=preprocess)
    with Output(args.out) as out:
        f = out.png(im.grid(torch.stack([picture.expand(3, -1, -1), dream.expand(3, -1, -1)]), ncol=2),
                    f"{path.stem}_dream_{args.layer}.png")
        out.commit()
    print(f"wrote {f}")


def add_commands(sub) -> None:
    """topk, health, render, dream."""
    p = sub.add_parser("topk", help="the k images that excite each channel most, cropped to its receptive field")
    add_model_args(p)
    p.add_argument("-k", "--k", type=int, default=9, help="images per channel (default %(default)s)")
    p.add_argument("--score", choices=["max", "mean"], default="max")
    p.add_argument("--channels", type=int, default=16, help="channels drawn per layer (default %(default)s)")
    p.add_argument("--tile", type=int, default=64, help="crop size in the grid (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    add_layout_args(p)
    p.set_defaults(run=cmd_topk)
    p = sub.add_parser("health", help="dead, noise-only and duplicate filters: table, ranked list and plots")
    add_model_args(p)
    p.add_argument("--threshold", type=float, default=0.0, help="a unit is active above this (default 0)")
    p.add_argument("--show", type=int, default=20, help="suspicious filters printed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    add_layout_args(p)
    p.set_defaults(run=cmd_health)

    p = sub.add_parser("render", help="feature visualizations of channels (one PNG each, a grid, the settings)")
    add_model_args(p, with_images=False)
    p.add_argument("--layer", required=True)
    p.add_argument("--channels", default="0-7", help="indices and ranges, e.g. 0-15 or 3,7 (default %(default)s)")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--size", default="128", help="H, or H,W, or T,H,W for video nets (default %(default)s)")
    p.add_argument("--param", choices=["fft", "pixel"], default="fft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=32, help="channels optimised together (default %(default)s)")
    add_layout_args(p)
    p.add_argument("--gray", action="store_true", help="one-channel images (non-torchvision models)")
    p.add_argument("--out", default="out/lightning-vis")
    p.set_defaults(run=cmd_render)
    p = sub.add_parser("dream", help="DeepDream: amplify what a layer sees in an image")
    add_model_args(p, with_images=False)
    p.add_argument("--image", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--octaves", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="steps per octave (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--tile", type=int, default=None, help="tile size for large images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="input size for non-torchvision models")
    p.add_argument("--gray", action="store_true", help="one-channel input (non-torchvision models)")
    p.add_argument("--out", default="out/lightning-vis")
    p.set_defaults(run=cmd_dream)
