"""Sites: a static HTML report, the atlas of every unit, and the local web explorer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..attribution import grad_cam
from ._common import (CliError, Inputs, Output, _check_layers, _check_render, _dataset, _one_layer, _preprocess,
                      _Shown, add_fabric_args, add_model_args, launch_fabric, one_line, read_labels)


def cmd_report(args, model, categories, transform):
    from .. import report

    layers = _check_layers(model, args.layers)
    if args.cam_layer:
        args.cam_layer = _one_layer(model, args.cam_layer, "--cam-layer")
    evolution = {}
    for item in args.evolution:
        layer, _, folder = item.partition("=")
        if not folder:
            raise CliError(f"--evolution {item!r}: expected LAYER=DIR")
        if not Path(folder).is_dir():
            raise CliError(f"--evolution {item!r}: {folder!r} is not a folder")
        for name in _check_layers(model, [layer], "--evolution"):  # a glob: every layer it matches
            evolution[name] = Path(folder)
    names = read_labels(args, categories)
    inputs = Inputs(args, model, transform)
    loaded = inputs.usable(keep=True)
    if any(x.dim() != 3 for _, x, _ in loaded):
        raise CliError("report takes still images")
    batch = torch.stack([x for _, x, _ in loaded])
    shown = torch.stack([s for _, _, s in loaded])
    channels = 1 if args.gray else 3
    _check_render(model, layers[0], [0], args.render_size, channels, _preprocess(transform))
    if args.cam_layer:
        grad_cam(model, batch[:1], args.cam_layer)  # a layer without a spatial map fails here, before any work
    with Output(args.out) as out:
        index = report.build(model, batch, shown, [p.name for p, _, _ in loaded], layers, out.stage,
                             cam_layer=args.cam_layer, class_names=names, preprocess=_preprocess(transform),
                             units=args.units, render_steps=args.steps, render_size=args.render_size,
                             image_channels=channels, k=args.k, evolution=evolution,
                             title=f"lightning-vis: {args.model}")
        out.commit()
    print(f"gallery: {out.final(index)} (open it in a browser; no server needed)")


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 32 hex digits)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def cmd_atlas(args, model, categories, transform):
    from .. import atlas
    from ..atlas.digests import describe, digest_of

    if args.layers:
        _check_layers(model, args.layers)
    _, ds = _dataset(args, model, transform)
    x0, _ = ds[0]
    if x0.dim() != 3:
        raise CliError("atlas takes still images (a GIF with several frames is a clip)")
    settings = atlas.Settings(k=args.k, size=args.render_size, steps=args.steps, image_channels=1 if args.gray else 3,
                              batch=args.batch, diverse=args.diverse, negative=not args.no_negative,
                              connections=args.connections, max_units=args.max_units, seed=args.seed)
    fabric = launch_fabric(args)
    if fabric is not None:
        model = model.to(fabric.device)
    # what the inputs are, known before any is read: a resume with a picture changed in place is refused up front
    data_id = {"items": [_file_digest(p) for p in ds.paths], "size": args.size, "gray": args.gray,
               "transform": digest_of(describe(transform))}
    res = atlas.build(model, ds, args.out, args.layers, settings=settings, preprocess=_preprocess(transform),
                      display=_Shown(ds), names=[p.name for p in ds.paths], batch_size=args.batch_size,
                      num_workers=args.workers, title=f"lightning-vis atlas: {args.model}", fabric=fabric,
                      data_id=data_id, evaluation=args.evaluation, evaluate_images=args.evaluate_images,
                      evaluate_options={"methods": args.methods.split(",")} if args.evaluate_images else None)
    if fabric is None or fabric.global_rank == 0:
        print(f"atlas: {res.index} ({len(res.layers)} layers, {res.units} units; {res.rendered} written by this "
              "process; open it in a browser, no server needed)")


def cmd_serve(args, model, categories, transform):
    from ..explorer.server import Explorer, Limits, default_input
    from ..explorer.web import make_server, parse_origin, run_until_interrupted

    folder = Path(args.images)
    if not folder.is_dir():
        raise CliError(f"--images {args.images!r}: not a folder")
    for origin in args.allow_origin:
        try:
            parse_origin(origin)
        except ValueError as e:
            raise CliError(f"--allow-origin {e}") from None
    names = read_labels(args, categories)
    mean = getattr(transform, "mean", None) if transform is not None else None
    std = getattr(transform, "std", None) if transform is not None else None
    to_input, preprocess = default_input(args.size, mean, std, gray=args.gray)
    limits = Limits(threads=args.threads, timeout=args.timeout, cache_bytes=int(args.cache_mb * (1 << 20)))
    explorer = Explorer(model, folder, to_input=to_input, class_names=names, preprocess=preprocess,
                        render_steps=args.render_steps, image_channels=1 if args.gray else 3, name=args.model,
                        limits=limits, evaluation=args.evaluation)
    try:
        server = make_server(explorer, args.host, args.port, allow_origins=args.allow_origin)
    except ValueError as e:  # the origins are checked above: waitress's "Invalid host/port specified"
        raise CliError(f"--host {args.host!r}: not an address to listen on ({one_line(e)}); give an IP address or "
                       "a host name of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    except OSError as e:
        raise CliError(f"--host {args.host!r} --port {args.port}: cannot listen there "
                       f"({e.strerror or one_line(e)})") from None
    skipped = f", {len(explorer.skipped)} files skipped" if explorer.skipped else ""
    run_until_interrupted(server, f"{len(explorer.names())} images{skipped}, {len(explorer.layer_names)} layers")


def add_commands(sub) -> None:
    """report, atlas, serve."""
    p = sub.add_parser("report", help="a static HTML gallery: units (renders, top-k crops, health) and samples")
    add_model_args(p)
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
    add_model_args(p, with_layers=False)
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
    add_fabric_args(p, "the output folder must be shared")
    p.add_argument("--evaluation", metavar="EVALUATE_JSON",
                   help="show this evaluation's verdicts on methods.html (an evaluate.json of lightning-vis evaluate)")
    p.add_argument("--evaluate-images", type=int, default=0,
                   help="or evaluate the methods here, on the first N images (0: no methods page; default %(default)s)")
    p.add_argument("--methods", default="saliency,gradcam,guided-backprop",
                   help="the methods --evaluate-images checks, comma-separated (default %(default)s)")
    p.set_defaults(run=cmd_atlas)

    p = sub.add_parser("serve", help="the local web explorer: layers, images, activation grids, filters, CAMs")
    add_model_args(p, with_images=False)
    p.add_argument("--images", required=True, help="the folder of images to browse")
    p.add_argument("--evaluation", metavar="EVALUATE_JSON",
                   help="show this evaluation's verdicts beside the methods (an evaluate.json of lightning-vis "
                        "evaluate)")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--size", type=int, default=224, help="input size (default %(default)s)")
    p.add_argument("--gray", action="store_true", help="one-channel input (non-torchvision models)")
    p.add_argument("--render-steps", type=int, default=48, help="steps of on-demand feature visualizations")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also serve pages of this origin (http://host:port; repeatable): by default only the "
                        "explorer's own address is answered (Host and Origin checked)")
    p.add_argument("--threads", type=int, default=32,
                   help="HTTP worker threads, more than the people using it at once (default %(default)s)")
    p.add_argument("--timeout", type=float, default=15.0,
                   help="seconds a connection may stay silent before it is closed (default %(default)s)")
    p.add_argument("--cache-mb", type=float, default=1024,
                   help="memory for all caches together, in MB (default %(default)s)")
    p.set_defaults(run=cmd_serve)
