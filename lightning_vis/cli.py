"""lightning-vis command line: layers, activation grids, deconvnet reconstructions, CAMs and saliency maps.

    lightning-vis layers --model torchvision:mobilenet_v2 --weights mobilenet_v2.pth
    lightning-vis activations --model torchvision:vgg16 --weights vgg16.pth --images photos/ --layers features.28
    lightning-vis deconv --model mypkg.nets:make_net --images a.png --layers conv2 --top-k 3 --out out/
    lightning-vis cam --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layer features.18
    lightning-vis cam --model torchvision:r3d_18 --images clip.gif --layer layer4 (video: a GIF in, a GIF out)
    lightning-vis saliency --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --method guided
    lightning-vis topk --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layers features.10 -k 9
    lightning-vis health --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layers 'features.*'
    lightning-vis render --model torchvision:mobilenet_v2 --weights w.pth --layer features.10 --channels 0-15
    lightning-vis dream --model torchvision:mobilenet_v2 --weights w.pth --image photo.png --layer features.7
    lightning-vis report --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layers features.10
    lightning-vis atlas --model torchvision:vgg16 --weights w.pth --images photos/ --devices 2 --strategy ddp
    lightning-vis serve --model torchvision:mobilenet_v2 --weights w.pth --images photos/
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from . import images as im
from ._util import progress_bar
from .activations import activation_grid, activations, top_predictions
from .attribution import CAM_METHODS, grad_cam, guided_backprop, saliency
from .dataset import top_k_examples
from .deconv import deconvnet
from .featureviz import deep_dream, render
from .health import filter_health
from .receptive import receptive_field
from .hooks import LayerNotFoundError, resolve_layers
from .hooks.taps import layers as list_layers

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def progress(iterable, desc: str, total: int | None = None):
    return progress_bar(True, desc, total=total, unit="img", iterable=iterable)


def load_model(spec: str, weights: str | None = None) -> tuple[nn.Module, list[str] | None, object]:
    """'torchvision:<name>' (random weights unless --weights; ImageNet class names and preprocessing from
    torchvision's metadata, no download) or 'package.module:factory' (called with no arguments).
    Returns (model in eval mode, class names or None, preprocessing transform or None)."""
    if ":" not in spec:
        raise CliError(f"--model {spec!r}: expected 'torchvision:<name>' or 'package.module:factory'")
    source, name = spec.split(":", 1)
    categories, transform = None, None
    if source == "torchvision":
        import torchvision

        available = torchvision.models.list_models()
        if name not in available:
            import difflib
            close = difflib.get_close_matches(name, available, n=5)
            raise CliError(f"torchvision has no model {name!r}; did you mean {', '.join(close) or '...'}?")
        model = torchvision.models.get_model(name, weights=None)
        try:
            meta_weights = torchvision.models.get_model_weights(name).DEFAULT
            categories = meta_weights.meta.get("categories")
            transform = meta_weights.transforms()
        except (ValueError, AttributeError):
            pass
    else:
        try:
            factory = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError) as e:
            raise CliError(f"--model {spec!r}: cannot import {name!r} from {source!r} ({e})") from e
        model = factory()
        if not isinstance(model, nn.Module):
            raise CliError(f"--model {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise CliError(f"--weights {weights!r}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CliError(f"--weights {weights!r} do not fit {spec}: {str(e).splitlines()[0]}") from e
    return model.eval(), categories, transform


def image_paths(args_images: list[str]) -> list[Path]:
    paths = []
    for a in args_images:
        p = Path(a)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise CliError(f"--images {a!r}: no such file or folder")
    if not paths:
        raise CliError(f"--images {args_images}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return paths


def load_image(path: Path, transform, size: int, gray: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input, the same picture displayable in [0, 1]): (C, H, W) and (3, H, W) for an image; a GIF with
    several frames is a clip: (C, T, H, W) and (3, T, H, W), for video models."""
    from PIL import Image, ImageSequence
    import numpy as np

    try:
        pil = Image.open(path)
        frames = [f.convert("L" if gray and transform is None else "RGB") for f in ImageSequence.Iterator(pil)]
    except OSError as e:
        raise CliError(f"{path}: not an image ({e})") from e
    if transform is None:
        frames = [f.resize((size, size)) for f in frames]
    arrs = [torch.from_numpy(np.asarray(f).copy()).float() / 255 for f in frames]
    pics = torch.stack([a[None] if a.dim() == 2 else a.permute(2, 0, 1) for a in arrs])  # (T, C, H, W)
    video = len(frames) > 1
    if transform is not None:
        x = transform(pics if video else pics[0])  # torchvision's video presets take (T, C, H, W) -> (C, T, H, W)
        view = (-1, 1, 1, 1) if video else (-1, 1, 1)
        mean, std = torch.tensor(transform.mean).view(view), torch.tensor(transform.std).view(view)
        return x, (x * std + mean).clamp(0, 1)
    x = pics.transpose(0, 1) if video else pics[0]
    return x, x.expand(3, *x.shape[1:])


def cmd_layers(args, model, categories, transform):
    shape = [int(v) for v in args.input_size.split(",")]
    info = list_layers(model, torch.zeros(1, *shape), leaves_only=not args.all)
    width = max(len(i.name) for i in info)
    for i in info:
        print(f"{i.name:<{width}}  {i.type:<20} {str(list(i.output_shape) if i.output_shape else '-'):<22} "
              f"{i.params:>10,d} params")


def _run_images(args, model, categories, layers=None):
    if layers is None:
        layers = args.layers
    if layers:
        resolve_layers(model, layers)  # unknown names fail here, with suggestions, before any work
    paths = image_paths(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = categories
    if getattr(args, "labels", None):
        if not Path(args.labels).is_file():
            raise CliError(f"--labels {args.labels!r}: no such file")
        names = Path(args.labels).read_text().splitlines()
    return paths, out, names


def cmd_activations(args, model, categories, transform):
    paths, out, names = _run_images(args, model, categories)
    report = {}
    for path in progress(paths, "activations"):
        x, _ = load_image(path, transform, args.size, args.gray)
        acts, logits = activations(model, x[None], args.layers)
        entry = {}
        if logits.dim() == 2:
            entry["predictions"] = [{"index": i, "name": n, "p": round(p, 4)}
                                    for i, n, p in top_predictions(logits, min(args.top, logits.shape[1]), names)[0]]
        for layer, a in acts.items():
            if a.dim() < 3:
                continue
            f = out / path.stem / f"{layer}_activations.png"
            # small maps enlarged for display
            im.save_png(activation_grid(a, scale=args.scale, cell=48 if a.dim() == 4 else None), f)
            entry.setdefault("files", []).append(str(f))
        report[path.name] = entry
        top = entry.get("predictions", [])[:1]
        if top:
            print(f"{path.name}: {top[0]['name']} ({top[0]['p']:.2f})")
    (out / "activations.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}/")


def cmd_deconv(args, model, categories, transform):
    paths, out, _ = _run_images(args, model, categories)
    report = {}
    for path in progress(paths, "deconv"):
        x, shown = load_image(path, transform, args.size, args.gray)
        rec = deconvnet(model, x[None], args.layers, top_k=args.top_k, rule=args.rule)
        entry = {}
        for layer, r in rec.images.items():
            if args.heat:  # |reconstruction| summed over channels, coloured over the image
                tiles = [im.overlay(shown, h, alpha=0.6) for h in r[0].float().abs().sum(1)]
            else:
                tiles = list(im.signed_rgb(r[0]))
            f = out / path.stem / f"{layer}_{args.rule}.png"
            im.save_png(im.grid(torch.stack([shown] + tiles), ncol=len(tiles) + 1), f)
            entry[layer] = {"features": rec.features[layer][0].tolist(), "file": str(f)}
        report[path.name] = entry
    (out / f"{args.rule}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}/")


def _parse_target(args, names):
    """--target: a class index or a class name (from --labels or torchvision's list); None: the top class."""
    if args.target is None:
        return None
    if args.target.lstrip("-").isdigit():
        return int(args.target)
    if names and args.target in names:
        return names.index(args.target)
    import difflib
    close = difflib.get_close_matches(args.target, names or [], n=3)
    raise CliError(f"--target {args.target!r}: not a class index or a known class name"
                   + (f"; did you mean {', '.join(close)}?" if close else ""))


def _explained(result, names, path):
    if result.targets is None:
        return {}
    cls = int(result.targets[0])
    name = names[cls] if names and cls < len(names) else str(cls)
    print(f"{path.name}: explaining class {cls} ({name}), score {float(result.scores[0]):.3f}")
    return {"class": cls, "name": name, "score": round(float(result.scores[0]), 4)}


def _write_view(shown, heat, f: Path, extra: list[torch.Tensor] = (), scaled: bool = False) -> list[str]:
    """Image | heat overlay (| extra images) as one PNG; clips as a GIF of overlays and a PNG frame strip.
    scaled: heat is already in [0, 1]."""
    if shown.dim() == 4:  # (3, T, H, W) clip and (T, h, w) heat
        frames = im.video_overlay(shown, heat)
        gif = im.save_gif(frames, f.with_suffix(".gif"))
        strip = im.save_png(im.grid(torch.cat([shown.transpose(0, 1), frames]), ncol=frames.shape[0]), f)
        return [str(gif), str(strip)]
    tiles = [shown, im.overlay(shown, heat, scale=not scaled)] + [t.to(shown.device) for t in extra]
    return [str(im.save_png(im.grid(torch.stack(tiles), ncol=len(tiles)), f))]


def cmd_cam(args, model, categories, transform):
    paths, out, names = _run_images(args, model, categories, [args.layer])
    target = _parse_target(args, names)
    report = {}
    for path in progress(paths, args.method):
        x, shown = load_image(path, transform, args.size, args.gray)
        cam = grad_cam(model, x[None], args.layer, target, method=args.method)
        extra = list(im.signed_rgb(cam.guided)) if cam.guided is not None else []
        files = _write_view(shown, cam.maps[0], out / f"{path.stem}_{args.method}.png", extra)
        report[path.name] = {"layer": cam.layer, **_explained(cam, names, path), "files": files}
    (out / f"{args.method}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}/")


def cmd_saliency(args, model, categories, transform):
    paths, out, names = _run_images(args, model, categories, [])
    target = _parse_target(args, names)
    report = {}
    for path in progress(paths, args.method):
        x, shown = load_image(path, transform, args.size, args.gray)
        if args.method == "guided":
            res = guided_backprop(model, x[None], target)
        else:
            res = saliency(model, x[None], target, samples=args.samples if args.method == "smoothgrad" else 0,
                           seed=args.seed)
        heat = res.maps[0].abs().amax(0)  # the strongest channel at each pixel
        extra = list(im.signed_rgb(res.maps[:1])) if args.method == "guided" and shown.dim() == 3 else []
        if shown.dim() == 3:
            heat = im.clip_percentile(heat)
        files = _write_view(shown, heat, out / f"{path.stem}_{args.method}.png", extra, scaled=shown.dim() == 3)
        report[path.name] = {**_explained(res, names, path), "files": files}
    (out / f"{args.method}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}/")


class ImageFiles(torch.utils.data.Dataset):
    """The images of --images as a dataset: (input, displayable picture) per file, in sorted order."""

    def __init__(self, paths, transform, size, gray):
        self.paths, self.transform, self.size, self.gray = paths, transform, size, gray

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.transform, self.size, self.gray)


def _loader(args, model, categories, transform):
    paths, out, names = _run_images(args, model, categories)
    ds = ImageFiles(paths, transform, args.size, args.gray)
    return ds, torch.utils.data.DataLoader(ds, batch_size=args.batch_size), out


def cmd_topk(args, model, categories, transform):
    ds, loader, out = _loader(args, model, categories, transform)
    res = top_k_examples(model, loader, args.layers, k=args.k, score=args.score)
    report = {}
    pictures = _Shown(ds)
    for layer, entry in res.layers.items():
        try:
            rf = receptive_field(model, layer, res.input_shape)
        except ValueError:
            rf = None  # token or linear layers: whole pictures
        channels = range(min(args.channels, entry.indices.shape[0]))
        rows = []
        for c in channels:
            crops = res.crops(pictures, layer, c, rf=rf)
            tiles = [torch.nn.functional.interpolate(t[None].float(), size=(args.tile, args.tile), mode="bilinear",
                                                     align_corners=False)[0] for t in crops]
            tiles += [torch.ones(3, args.tile, args.tile)] * (args.k - len(tiles))
            rows += tiles
        f = im.save_png(im.grid(torch.stack(rows), ncol=args.k), out / f"{layer}_top{args.k}.png")
        report[layer] = {"file": str(f), "receptive_field": rf.size if rf else None, "channels": {
            c: [{"image": ds.paths[i].name, "score": round(float(s), 4)}
                for i, s in zip(entry.indices[c].tolist(), entry.scores[c].tolist()) if i >= 0]
            for c in range(entry.indices.shape[0])}}
    (out / "topk.json").write_text(json.dumps(report, indent=1))
    print(f"{res.seen} images scanned; one row per channel (first {args.channels}), best first; wrote {out}/")


class _Shown:
    """dataset[i] -> the displayable picture of image i (crops are cut from what people look at)."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, i):
        return self.ds[i][1]


def cmd_health(args, model, categories, transform):
    ds, loader, out = _loader(args, model, categories, transform)
    rep = filter_health(model, loader, args.layers, threshold=args.threshold)
    print(rep.summary())
    bad = rep.suspicious()
    for r in bad[:args.show]:
        why = [w for w, on in (("dead", r["dead"]), ("noise-only", r["noise_only"]),
                               (f"duplicates {r['duplicate_of']}", r["duplicate_of"])) if on]
        print(f"  {r['layer']} #{r['channel']}: {', '.join(why)} (active {r['active_fraction']:.3f}, "
              f"noise score {r['noise_score']})")
    (out / "health.json").write_text(json.dumps({"seen": rep.seen, "table": rep.table(), "suspicious": bad},
                                                indent=1))
    (out / "health.txt").write_text(rep.summary() + "\n")
    rep.plots(out / "plots")
    print(f"{len(bad)} suspicious filters of {sum(len(h.mean) for h in rep.layers.values())}; wrote {out}/")


def parse_channels(spec: str) -> list[int]:
    """'0-15', '3,7,9' or '0-3,8' -> channel indices."""
    out = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise CliError(f"--channels {spec!r}: expected indices and ranges such as 0-15 or 3,7,9") from None
    return out


def _preprocess(transform):
    """[0, 1] images -> the model's input normalisation (torchvision's metadata), or unchanged."""
    if transform is None or not hasattr(transform, "mean"):
        return None
    mean, std = torch.tensor(transform.mean), torch.tensor(transform.std)

    def pre(x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean.to(x).view(view)) / std.to(x).view(view)
    return pre


def cmd_render(args, model, categories, transform):
    resolve_layers(model, args.layer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    units = parse_channels(args.channels)
    size = [int(v) for v in args.size.split(",")]
    res = render(model, (args.layer, units), size=size if len(size) > 1 else size[0], steps=args.steps,
                 param=args.param, seed=args.seed, channels=1 if args.gray else 3, preprocess=_preprocess(transform),
                 chunk_size=args.chunk_size)
    files = []
    for u, img in zip(units, res.images):
        if img.dim() == 4:  # a space-time render: (C, T, H, W)
            files.append(str(im.save_gif(img.transpose(0, 1), out / f"{args.layer}_{u}.gif")))
            img = im.grid(img.transpose(0, 1), ncol=img.shape[1])
        files.append(str(im.save_png(img, out / f"{args.layer}_{u}.png")))
    tiles = res.images if res.images.dim() == 4 else res.images[:, :, res.images.shape[2] // 2]
    grid = im.save_png(im.grid(tiles), out / f"{args.layer}_grid.png")
    settings = {**res.settings, "model": args.model, "layer": args.layer, "channels": units,
                "final_objective": [round(float(v), 4) for v in res.final_scores()], "files": files,
                "grid": str(grid)}
    (out / f"{args.layer}_render.json").write_text(json.dumps(settings, indent=1))
    print(f"rendered {len(units)} channels of {args.layer}; wrote {out}/")


def cmd_dream(args, model, categories, transform):
    resolve_layers(model, args.layer)
    path = Path(args.image)
    if not path.is_file():
        raise CliError(f"--image {args.image!r}: no such file")
    _, shown = load_image(path, transform, args.size, args.gray)
    if shown.dim() != 3:
        raise CliError(f"--image {args.image!r}: DeepDream takes a still image")
    out = Path(args.out)
    picture = shown[:1] if args.gray else shown
    dream = deep_dream(model, picture, args.layer, octaves=args.octaves, steps=args.steps, lr=args.lr,
                       tile=args.tile, seed=args.seed, preprocess=_preprocess(transform))
    f = im.save_png(im.grid(torch.stack([picture.expand(3, -1, -1), dream.expand(3, -1, -1)]), ncol=2),
                    out / f"{path.stem}_dream_{args.layer}.png")
    print(f"wrote {f}")


def cmd_report(args, model, categories, transform):
    from . import report

    paths, out, names = _run_images(args, model, categories)
    loaded = [load_image(p, transform, args.size, args.gray) for p in paths]
    if any(x.dim() != 3 for x, _ in loaded):
        raise CliError("report takes still images")
    inputs = torch.stack([x for x, _ in loaded])
    shown = torch.stack([s for _, s in loaded])
    evolution = {}
    for item in args.evolution:
        layer, _, folder = item.partition("=")
        if not folder:
            raise CliError(f"--evolution {item!r}: expected LAYER=DIR")
        evolution[layer] = Path(folder)
    index = report.build(model, inputs, shown, [p.name for p in paths], args.layers, out, cam_layer=args.cam_layer,
                         class_names=names, preprocess=_preprocess(transform), units=args.units,
                         render_steps=args.steps, render_size=args.render_size,
                         image_channels=1 if args.gray else 3, k=args.k, evolution=evolution,
                         title=f"lightning-vis: {args.model}")
    print(f"gallery: {index} (open it in a browser; no server needed)")


def cmd_atlas(args, model, categories, transform):
    from . import atlas
    from .atlas.comm import make_fabric

    for flag, value, low in (("-k", args.k, 1), ("--steps", args.steps, 1), ("--batch", args.batch, 1),
                             ("--diverse", args.diverse, 0), ("--connections", args.connections, 0),
                             ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--num-nodes", args.num_nodes, 1),
                             ("--max-units", 1 if args.max_units is None else args.max_units, 1)):
        if value < low:
            raise CliError(f"{flag} {value}: must be >= {low}")
    if not 8 <= args.render_size <= 4096:
        raise CliError(f"--render-size {args.render_size}: must be between 8 and 4096")
    devices = args.devices if args.devices == "auto" else int(args.devices) if args.devices.isdigit() else None
    if devices is None or devices == 0:
        raise CliError(f"--devices {args.devices!r}: a positive number of devices per node, or 'auto'")
    if args.layers:
        resolve_layers(model, args.layers)
    paths = image_paths(args.images)
    ds = ImageFiles(paths, transform, args.size, args.gray)
    x0, _ = ds[0]
    if x0.dim() != 3:
        raise CliError("atlas takes still images (a GIF with several frames is a clip)")
    settings = atlas.Settings(k=args.k, size=args.render_size, steps=args.steps, image_channels=1 if args.gray else 3,
                              batch=args.batch, diverse=args.diverse, negative=not args.no_negative,
                              connections=args.connections, max_units=args.max_units, seed=args.seed)
    try:
        fabric = make_fabric(devices, args.num_nodes, args.strategy, args.accelerator)
    except ImportError:
        if (devices, args.num_nodes, args.strategy) != (1, 1, "auto"):
            raise CliError("more than one process needs Lightning Fabric: pip install lightning") from None
        fabric = None
    if fabric is not None:
        model = model.to(fabric.device)
    res = atlas.build(model, ds, args.out, args.layers, settings=settings, preprocess=_preprocess(transform),
                      display=_Shown(ds), names=[p.name for p in paths], batch_size=args.batch_size,
                      num_workers=args.workers, title=f"lightning-vis atlas: {args.model}", fabric=fabric)
    if fabric is None or fabric.global_rank == 0:
        print(f"atlas: {res.index} ({len(res.layers)} layers, {res.units} units; {res.rendered} written by this "
              "process; open it in a browser, no server needed)")


def cmd_serve(args, model, categories, transform):
    from .explorer.server import Explorer, default_input, make_server, run_until_interrupted

    folder = Path(args.images)
    if not folder.is_dir():
        raise CliError(f"--images {args.images!r}: not a folder")
    names = categories
    if args.labels:
        if not Path(args.labels).is_file():
            raise CliError(f"--labels {args.labels!r}: no such file")
        names = Path(args.labels).read_text().splitlines()
    mean = getattr(transform, "mean", None) if transform is not None else None
    std = getattr(transform, "std", None) if transform is not None else None
    to_input, preprocess = default_input(args.size, mean, std, gray=args.gray)
    explorer = Explorer(model, folder, to_input=to_input, class_names=names, preprocess=preprocess,
                        render_steps=args.render_steps, image_channels=1 if args.gray else 3, name=args.model)
    try:
        server = make_server(explorer, args.host, args.port)
    except OSError as e:
        raise CliError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    run_until_interrupted(server, f"{len(explorer.names())} images, {len(explorer.layer_names)} layers")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lightning-vis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, with_images=True, with_layers=True):
        p.add_argument("--model", required=True, help="torchvision:<name> or package.module:factory")
        p.add_argument("--weights", help="a state_dict file (.pth) to load into the model")
        if with_images:
            p.add_argument("--images", nargs="+", required=True, help="image files or folders (a GIF: a clip)")
            if with_layers:
                p.add_argument("--layers", nargs="+", required=True, help="layer names, globs (features.*) ")
            p.add_argument("--out", default="out/lightning-vis", help="output folder (default %(default)s)")
            p.add_argument("--size", type=int, default=224, help="input size for non-torchvision models")
            p.add_argument("--gray", action="store_true", help="one-channel input (non-torchvision models)")

    p = sub.add_parser("layers", help="list the model's layers with type, output shape and parameters")
    common(p, with_images=False)
    p.add_argument("--input-size", default="3,224,224", help="C,H,W of the example input (default %(default)s)")
    p.add_argument("--all", action="store_true", help="containers too, not only leaf layers")
    p.set_defaults(run=cmd_layers)
    p = sub.add_parser("activations", help="activation grids of layers for each image, and predictions")
    common(p)
    p.add_argument("--top", type=int, default=5, help="predictions to show (default %(default)s)")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")
    p.add_argument("--scale", choices=["per_image", "shared"], default="per_image")
    p.set_defaults(run=cmd_activations)
    p = sub.add_parser("deconv", help="deconvnet (or guided backprop) reconstructions of the top features")
    common(p)
    p.add_argument("--top-k", type=int, default=3, help="strongest features per layer (default %(default)s)")
    p.add_argument("--rule", choices=["deconvnet", "guided"], default="deconvnet")
    p.add_argument("--heat", action="store_true", help="overlay heat maps on the image instead of RGB")
    p.set_defaults(run=cmd_deconv)

    def targeted(p):
        p.add_argument("--target", help="class index or name to explain (default: each image's top class)")
        p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")

    p = sub.add_parser("cam", help="class activation maps (Grad-CAM family) overlaid on each image or clip")
    common(p, with_layers=False)
    p.add_argument("--layer", required=True, help="the layer to explain (a conv layer or a token block)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam")
    targeted(p)
    p.set_defaults(run=cmd_cam)
    p = sub.add_parser("saliency", help="saliency maps (gradient, SmoothGrad or guided backprop) on each image")
    common(p, with_layers=False)
    p.add_argument("--method", choices=["gradient", "smoothgrad", "guided"], default="gradient")
    p.add_argument("--samples", type=int, default=25, help="SmoothGrad noisy copies (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="SmoothGrad noise seed (default %(default)s)")
    targeted(p)
    p.set_defaults(run=cmd_saliency)

    p = sub.add_parser("topk", help="the k images that excite each channel most, cropped to its receptive field")
    common(p)
    p.add_argument("-k", "--k", type=int, default=9, help="images per channel (default %(default)s)")
    p.add_argument("--score", choices=["max", "mean"], default="max")
    p.add_argument("--channels", type=int, default=16, help="channels drawn per layer (default %(default)s)")
    p.add_argument("--tile", type=int, default=64, help="crop size in the grid (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(run=cmd_topk)
    p = sub.add_parser("health", help="dead, noise-only and duplicate filters: table, ranked list and plots")
    common(p)
    p.add_argument("--threshold", type=float, default=0.0, help="a unit is active above this (default 0)")
    p.add_argument("--show", type=int, default=20, help="suspicious filters printed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(run=cmd_health)

    p = sub.add_parser("render", help="feature visualizations of channels (one PNG each, a grid, the settings)")
    common(p, with_images=False)
    p.add_argument("--layer", required=True)
    p.add_argument("--channels", default="0-7", help="indices and ranges, e.g. 0-15 or 3,7 (default %(default)s)")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--size", default="128", help="H, or H,W, or T,H,W for video nets (default %(default)s)")
    p.add_argument("--param", choices=["fft", "pixel"], default="fft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=32, help="channels optimised together (default %(default)s)")
    p.add_argument("--gray", action="store_true", help="one-channel images (non-torchvision models)")
    p.add_argument("--out", default="out/lightning-vis")
    p.set_defaults(run=cmd_render)
    p = sub.add_parser("dream", help="DeepDream: amplify what a layer sees in an image")
    common(p, with_images=False)
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

    p = sub.add_parser("report", help="a static HTML gallery: units (renders, top-k crops, health) and samples")
    common(p)
    p.add_argument("--cam-layer", help="layer for the CAM overlays of the samples")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")
    p.add_argument("--units", type=int, default=8, help="units rendered per layer (default %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="render steps (default %(default)s)")
    p.add_argument("--render-size", type=int, default=96)
    p.add_argument("-k", "--k", type=int, default=4, help="top-k crops per unit (default %(default)s)")
    p.add_argument("--evolution", nargs="*", default=[], metavar="LAYER=DIR",
                   help="evolution strips written by the FeatureVisualization callback, per layer")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("atlas", help="an atlas of every unit (renders, dataset examples, activation distributions, "
                                     "health, connections): a static site, on one process or many (Lightning Fabric)")
    common(p, with_layers=False)
    p.add_argument("--layers", nargs="+", help="layer names or globs (default: every convolution and linear layer)")
    p.add_argument("-k", "--k", type=int, default=9, help="top-k and bottom-k images per unit (default %(default)s)")
    p.add_argument("--steps", type=int, default=128, help="render steps (default %(default)s)")
    p.add_argument("--render-size", type=int, default=128, help="render size in pixels (default %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="units rendered together (default %(default)s)")
    p.add_argument("--diverse", type=int, default=4, help="diverse renders per unit, 0: none (default %(default)s)")
    p.add_argument("--no-negative", action="store_true", help="no negative renders")
    p.add_argument("--connections", type=int, default=6,
                   help="strongest connections shown per sign and direction, 0: none (default %(default)s)")
    p.add_argument("--max-units", type=int, help="only the first units of each layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass over the data")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--devices", default="1", help="processes (devices) per node, or 'auto' (default %(default)s)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (the output folder must be shared)")
    p.add_argument("--strategy", choices=["auto", "ddp"], default="auto",
                   help="ddp: one process per device, started by Lightning's launcher")
    p.add_argument("--accelerator", choices=["auto", "cpu", "cuda", "gpu", "mps"], default="auto")
    p.set_defaults(run=cmd_atlas)

    p = sub.add_parser("serve", help="the local web explorer: layers, images, activation grids, filters, CAMs")
    common(p, with_images=False)
    p.add_argument("--images", required=True, help="the folder of images to browse")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--size", type=int, default=224, help="input size (default %(default)s)")
    p.add_argument("--gray", action="store_true", help="one-channel input (non-torchvision models)")
    p.add_argument("--render-steps", type=int, default=48, help="steps of on-demand feature visualizations")
    p.set_defaults(run=cmd_serve)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, categories, transform = load_model(args.model, args.weights)
        args.run(args, model, categories, transform)
    except (CliError, LayerNotFoundError, ValueError) as e:
        print(f"lightning-vis {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
