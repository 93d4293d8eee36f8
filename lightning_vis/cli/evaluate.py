"""Which method to trust on this model: `lightning-vis evaluate` (lightning_vis.metrics.evaluate)."""

from __future__ import annotations

import torch

from ._common import (CliError, Inputs, Output, _dataset, _one_batch, _parse_target, add_fabric_args, add_model_args,
                      add_target_args, launch_fabric, parse_size, read_labels)


def add_commands(sub) -> None:
    """`lightning-vis evaluate`: which method to trust on this model (lightning_vis.metrics.evaluate on the images
    of --images, as one batch; with --batch-size or several processes, metrics.evaluate_dataset over every image,
    batch by batch, sharded by Lightning Fabric as the atlas is): evaluate.json, curves.png, cascade.png and
    index.html in --out, the table printed."""
    from ..metrics import METHODS, METRICS, evaluate, evaluate_dataset

    def run(args, model, categories, transform):
        methods = [m for m in args.methods.split(",") if m]
        metrics = [m for m in args.metrics.split(",") if m]
        for given, known, flag in ((methods, METHODS, "--methods"), (metrics, METRICS, "--metrics")):
            bad = [m for m in given if m not in known] or ([] if given else ["(none)"])
            if bad:
                raise CliError(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(known)} (comma-separated)")
        names = read_labels(args, categories)
        target = _parse_target(args, names)
        cells = None if args.cells is None else tuple(parse_size(args.cells, "--cells"))
        options = dict(target=target, layer=args.layer, steps=args.steps, seed=args.seed, grid=cells)
        if args.batch_size is not None or (args.devices, args.num_nodes, args.strategy) != ("1", 1, "auto"):
            fabric = launch_fabric(args)
            if fabric is not None:
                model = model.to(fabric.device)
            _, ds = _dataset(args, model, transform)
            result = evaluate_dataset(model, ds, methods, metrics, fabric=fabric, batch_size=args.batch_size or 16,
                                      num_workers=args.workers, **options)
            if fabric is not None and fabric.global_rank != 0:
                return
        else:
            inputs = Inputs(args, model, transform)
            _one_batch(inputs, args.max_images)
            batch = [x for _, x, _ in inputs]
            if len({tuple(x.shape) for x in batch}) > 1:
                raise CliError("--images: the pictures have different input shapes after the model's transform "
                               f"({', '.join(sorted({str(tuple(x.shape)) for x in batch}))}); evaluate needs one "
                               "shape")
            result = evaluate(model, torch.stack(batch), methods, metrics, **options)
        with Output(args.out) as out:
            result.save(out.path("evaluate.json").parent)
            out.commit()
        print(result.table())
        for m in result.sanity:
            print(f"{m}: {result.verdict(m)['reason']}")
        print(f"wrote {out.folder}/")

    p = sub.add_parser("evaluate", help="which method to trust: faithfulness metrics and sanity checks per method, "
                                        "beside a random map")
    add_model_args(p, with_layers=False)
    p.add_argument("--methods", default="saliency,gradcam,guided-backprop",
                   help=f"comma-separated, from {', '.join(METHODS)} (random maps on each method's grid are always "
                        "added; default %(default)s)")
    p.add_argument("--metrics", default="deletion,insertion,road,average_drop,increase_in_confidence,sanity",
                   help=f"comma-separated, from {', '.join(METRICS)} (default %(default)s)")
    p.add_argument("--layer", help="the CAM methods' layer (default: the last layer with maps)")
    p.add_argument("--steps", type=int, default=20, help="deletion / insertion steps (default %(default)s)")
    p.add_argument("--cells", help="H,W (or T,H,W): the grid of cells deletion / insertion remove, each axis dividing "
                                   "the input's (default: a token model's patch grid, from its layout; else pixels)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default %(default)s)")
    p.add_argument("--max-images", type=int, default=64,
                   help="at most this many pictures in the one-batch mode (default %(default)s)")
    p.add_argument("--batch-size", type=int,
                   help="evaluate every picture, this many at a time (the random map and the sanity test's random "
                        "logit are drawn per batch); default: all of them as one batch")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes with --batch-size")
    add_fabric_args(p, "each evaluates its share of the batches")
    add_target_args(p)
    p.set_defaults(run=run)
