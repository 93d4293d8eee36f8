"""Where the model looks in each picture: class activation maps, saliency maps, integrated gradients (and
GradientShap, input x gradient), occlusion and LRP, overlaid on the picture (a GIF of overlays for a clip), and
Zeiler and Fergus' occlusion study (their Figure 7), with a JSON index of the classes explained."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import images as im
from ..attribution import (CAM_METHODS, COMPOSITES, default_cam_layer, grad_cam, gradient_shap, guided_backprop,
                           input_x_gradient, integrated_gradients, lrp, occlusion, saliency)
from ..attribution.attnlrp import COMPOSITES as ATTN_COMPOSITES
from ..attribution.gradients import BASELINES
from ..attribution.perturbation import OUTPUTS, placement_counts
from ..occlusion_study import MAX_PROJECTIONS, occlusion_study
from ._common import (CliError, Output, _one_layer, _overrides, _parse_target, _per_picture, add_layout_args,
                      add_model_args, add_target_args, read_labels, say)

#: `ig --method`: the library function of each
PATH_METHODS = {"ig": integrated_gradients, "gradient-shap": gradient_shap, "input-x-gradient": input_x_gradient}


def _explained(result, names, path):
    if result.targets is None:
        return {}
    cls = int(result.targets[0])
    name = names[cls] if names and cls < len(names) else str(cls)
    say(f"{path.name}: explaining class {cls} ({name}), score {float(result.scores[0]):.3f}")
    return {"class": cls, "name": name, "score": round(float(result.scores[0]), 4)}


def _write_view(out: Output, shown, heat, rel: str, extra: list[torch.Tensor] = (), scaled: bool = False) -> list[str]:
    """Image | heat overlay (| extra images) as one PNG; clips as a GIF of overlays and a PNG frame strip.
    scaled: heat is already in [0, 1]."""
    if shown.dim() == 4:  # (3, T, H, W) clip and (T, h, w) heat
        frames = im.video_overlay(shown, heat)
        gif = out.gif(frames, Path(rel).with_suffix(".gif"))
        strip = out.png(im.grid(torch.cat([shown.transpose(0, 1), frames]), ncol=frames.shape[0]), rel)
        return [gif, strip]
    tiles = [shown, im.overlay(shown, heat, scale=not scaled)] + [t.to(shown.device) for t in extra]
    return [out.png(im.grid(torch.stack(tiles), ncol=len(tiles)), rel)]


def _input_view(out: Output, shown, maps, rel: str, signed: bool = False) -> list[str]:
    """An attribution of the input's shape (C, *grid) as the strongest channel at each position over the picture
    (clipped at its 99th percentile for a still) and, with signed, the attribution itself in colour (grey: 0)."""
    heat = maps.abs().amax(0)
    if shown.dim() == 4:
        return _write_view(out, shown, heat, rel)
    extra = list(im.signed_rgb(maps[None])) if signed else []
    return _write_view(out, shown, im.clip_percentile(heat), rel, extra, scaled=True)


def _each_picture(args, model, categories, transform, index: str, explain) -> None:
    """The run of every explaining command: the class to explain (--target, --labels), then for each picture of
    --images explain(out, stem, path, x, shown, target, names) -> its entry in the JSON index `index`."""
    names = read_labels(args, categories)
    target = _parse_target(args, names)
    _per_picture(args, model, transform, index,
                 lambda out, stem, path, x, shown: explain(out, stem, path, x, shown, target, names))


def cmd_cam(args, model, categories, transform):
    layer = _one_layer(model, args.layer, "--layer") if args.layer is not None else None
    ov = _overrides(args, model)

    def explain(out, stem, path, x, shown, target, names):
        nonlocal layer
        if layer is None:  # the default: the last layer with maps (a class-token ViT's last norm1)
            layer = default_cam_layer(model, x[None])
            say(f"--layer not given: explaining {layer!r}")
        cam = grad_cam(model, x[None], layer, target, method=args.method, **ov)
        extra = list(im.signed_rgb(cam.guided)) if cam.guided is not None else []
        files = _write_view(out, shown, cam.maps[0], f"{stem}_{args.method}.png", extra)
        return {"layer": cam.layer, **_explained(cam, names, path), "files": files}
    _each_picture(args, model, categories, transform, f"{args.method}.json", explain)


def cmd_saliency(args, model, categories, transform):
    def explain(out, stem, path, x, shown, target, names):
        if args.method == "guided":
            res = guided_backprop(model, x[None], target)
        else:
            res = saliency(model, x[None], target, samples=args.samples if args.method == "smoothgrad" else 0,
                           seed=args.seed)
        files = _input_view(out, shown, res.maps[0], f"{stem}_{args.method}.png", signed=args.method == "guided")
        return {**_explained(res, names, path), "files": files}
    _each_picture(args, model, categories, transform, f"{args.method}.json", explain)


def _baseline(spec: str):
    """--baseline: zeros, blur, uniform, or a number (every input value replaced by it)."""
    if spec in BASELINES:
        return spec
    try:
        value = float(spec)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise CliError(f"--baseline {spec!r}: expected {', '.join(BASELINES)} or a finite number")
    return value


def _rounded(values, digits: int = 6):
    """Nested lists of floats (a tensor's tolist()) rounded for a JSON index."""
    return [_rounded(v, digits) for v in values] if isinstance(values, list) else round(values, digits)


def cmd_ig(args, model, categories, transform):
    baseline = _baseline(args.baseline)
    method = PATH_METHODS[args.method]
    options = {"ig": {"baseline": baseline, "steps": args.steps, "seed": args.seed},
               "gradient-shap": {"baselines": baseline, "samples": args.samples, "seed": args.seed},
               "input-x-gradient": {}}[args.method]

    def explain(out, stem, path, x, shown, target, names):
        res = method(model, x[None], target, **options)
        files = _input_view(out, shown, res.maps[0], f"{stem}_{args.method}.png", signed=True)
        entry = {**_explained(res, names, path), "files": files}
        if res.delta is not None:  # completeness: the attributions' sum minus the score's difference
            entry["baseline_score"] = round(float(res.baseline_scores[0]), 6)
            entry["delta"] = round(float(res.delta[0]), 6)
        return entry
    _each_picture(args, model, categories, transform, f"{args.method}.json", explain)


def cmd_occlusion(args, model, categories, transform):
    baseline = _baseline(args.baseline)
    if args.stride is not None and args.stride > args.window:
        raise CliError(f"--stride {args.stride}: larger than --window {args.window}, positions between windows would "
                       "never be occluded")

    def explain(out, stem, path, x, shown, target, names):
        res = occlusion(model, x[None], target, window=args.window, stride=args.stride, baseline=baseline,
                        output=args.output)
        files = _write_view(out, shown, res.maps[0], f"{stem}_occlusion.png")
        return {**_explained(res, names, path), "window": list(res.window), "stride": list(res.stride),
                "output": args.output, "grid": _rounded(res.grid[0].tolist()), "files": files}
    _each_picture(args, model, categories, transform, "occlusion.json", explain)


MAX_STUDY_PLACEMENTS = 4096  # squares of one occlusion study: a forward pass each


def cmd_occlusion_study(args, model, categories, transform):
    baseline = _baseline(args.baseline)
    layer = None if args.layer is None else _one_layer(model, args.layer, "--layer")
    stride = args.stride if args.stride is not None else max(1, args.window // 2)
    if stride > args.window:
        raise CliError(f"--stride {args.stride}: larger than --window {args.window}, positions between squares would "
                       "never be occluded")

    def explain(out, stem, path, x, shown, target, names):
        if x.dim() != 3:
            raise CliError(f"{path.name}: the occlusion study takes still images (a GIF with several frames is a clip)")
        h, w = x.shape[1:]
        if args.window > min(h, w):
            raise CliError(f"--window {args.window}: larger than the {h}x{w} input of {path.name}")
        count = math.prod(placement_counts((h, w), (args.window,) * 2, (stride,) * 2))
        if count > MAX_STUDY_PLACEMENTS:
            raise CliError(f"--window {args.window} --stride {stride}: {count} placements of the square on the {h}x{w} "
                           f"input, over {MAX_STUDY_PLACEMENTS} (a forward pass each); raise the stride or the window")
        study = occlusion_study(model, x, layer, window=args.window, stride=stride, target=target,
                                baseline=baseline, projections=args.projections, rule=args.rule)
        figure = out.final(study.save(out.path(f"{stem}_occlusion_study.png"), class_names=names))
        label = [[names[c] if names and c < len(names) else int(c) for c in row] for row in study.label.tolist()]
        return {"file": str(path), "layer": study.layer, "channel": study.channel, "target": study.target,
                "class": names[study.target] if names and study.target < len(names) else None,
                "window": list(study.window), "stride": list(study.stride),
                "reference": {"activation": round(study.reference[0], 6), "probability": round(study.reference[1], 6)},
                "activation": _rounded(study.activation.tolist()), "probability": _rounded(study.probability.tolist()),
                "label": label, "files": [figure]}
    _each_picture(args, model, categories, transform, "occlusion_study.json", explain)


def _input_bounds(transform, channels: int):
    """The lowest and highest input values (per channel): the model's normalisation of 0 and 1, or 0 and 1."""
    if transform is None or not hasattr(transform, "mean"):
        return 0.0, 1.0
    mean, std = torch.tensor(transform.mean), torch.tensor(transform.std)
    return ((0 - mean) / std)[:channels], ((1 - mean) / std)[:channels]


def cmd_lrp(args, model, categories, transform):
    def explain(out, stem, path, x, shown, target, names):
        low, high = _input_bounds(transform, x.shape[0])
        res = lrp(model, x[None], target, composite=args.composite, low=low, high=high)  # None: lrp picks one
        maps = res.maps[0].detach()  # lrp's maps of some composites still carry their graph
        files = _input_view(out, shown, maps, f"{stem}_lrp.png", signed=True)
        return {**_explained(res, names, path), "composite": res.method.removeprefix("lrp-"),
                "relevance": round(float(maps.sum()), 6), "files": files}
    _each_picture(args, model, categories, transform, "lrp.json", explain)


def add_commands(sub) -> None:
    """cam, saliency, ig, occlusion, lrp."""
    p = sub.add_parser("cam", help="class activation maps (Grad-CAM family) overlaid on each image or clip")
    add_model_args(p, with_layers=False)
    p.add_argument("--layer", help="the layer to explain (a conv layer or a token block); default: the last layer "
                                   "with maps (for a class-token ViT its last block's norm1)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam")
    add_target_args(p)
    add_layout_args(p)
    p.set_defaults(run=cmd_cam)
    p = sub.add_parser("saliency", help="saliency maps (gradient, SmoothGrad or guided backprop) on each image")
    add_model_args(p, with_layers=False)
    p.add_argument("--method", choices=["gradient", "smoothgrad", "guided"], default="gradient")
    p.add_argument("--samples", type=int, default=25, help="SmoothGrad noisy copies (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="SmoothGrad noise seed (default %(default)s)")
    add_target_args(p)
    p.set_defaults(run=cmd_saliency)
    p = sub.add_parser("ig", help="integrated gradients (or GradientShap, input x gradient) on each image")
    add_model_args(p, with_layers=False)
    p.add_argument("--method", choices=list(PATH_METHODS), default="ig")
    p.add_argument("--steps", type=int, default=50, help="integration steps, Gauss-Legendre (default %(default)s)")
    p.add_argument("--baseline", default="zeros", help=f"the reference input: {', '.join(BASELINES)} or a number "
                                                       "(gradient-shap: the baseline drawn from; default %(default)s)")
    p.add_argument("--samples", type=int, default=5, help="GradientShap draws per image (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the uniform baseline and GradientShap's draws "
                                                       "(default %(default)s)")
    add_target_args(p)
    p.set_defaults(run=cmd_ig)
    p = sub.add_parser("occlusion", help="occlusion (Zeiler and Fergus): the drop of the class score as a window "
                                         "of baseline values slides over each image")
    add_model_args(p, with_layers=False)
    p.add_argument("--window", type=int, default=16, help="the occluder's side in input pixels (default %(default)s)")
    p.add_argument("--stride", type=int, help="pixels between placements (default: half the window)")
    p.add_argument("--baseline", default="zeros", help=f"the occluder's values: {', '.join(BASELINES)} or a number "
                                                       "(default %(default)s)")
    p.add_argument("--output", choices=OUTPUTS, default="score",
                   help="what drops: the class score, or its probability (softmax) (default %(default)s)")
    add_target_args(p)
    p.set_defaults(run=cmd_occlusion)
    p = sub.add_parser("occlusion-study", help="Zeiler and Fergus' occlusion study (their Figure 7) of each image: "
                                               "per placement of a grey square, the strongest feature map's "
                                               "activation and projection, the class probability and the top label")
    add_model_args(p, with_layers=False)
    p.add_argument("--layer", help="the layer whose strongest feature map is followed (default: the CAM layer, the "
                                   "last layer with maps over the input)")
    p.add_argument("--window", type=int, default=32, help="the square's side in input pixels (default %(default)s)")
    p.add_argument("--stride", type=int, help="pixels between placements (default: half the window)")
    p.add_argument("--baseline", default="zeros", help=f"the square's values: {', '.join(BASELINES)} or a number "
                                                       "(default %(default)s: grey for a normalised input)")
    p.add_argument("--projections", type=int, default=9,
                   help=f"placements whose projection is drawn, spread evenly (at most {MAX_PROJECTIONS}; "
                        "default %(default)s)")
    p.add_argument("--rule", choices=["deconvnet", "guided"], default="deconvnet",
                   help="the projection's backward rule (default %(default)s)")
    add_target_args(p)
    p.set_defaults(run=cmd_occlusion_study)
    p = sub.add_parser("lrp", help="layer-wise relevance propagation (convolutional and attention nets) on each "
                                     "image")
    add_model_args(p, with_layers=False)
    p.add_argument("--composite", choices=(*COMPOSITES, *ATTN_COMPOSITES),
                   help="the rules by layer type: zennit's composites of the same names for convolutional nets, "
                        "attnlrp / cp-lrp for attention models (default: attnlrp where the model has attention "
                        "layers, else epsilon-plus-flat)")
    add_target_args(p)
    p.set_defaults(run=cmd_lrp)
