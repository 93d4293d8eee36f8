"""Where the model looks in each picture: class activation maps and saliency maps, overlaid on the picture (a GIF of
overlays for a clip), with a JSON index of the classes explained."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import images as im
from ..attribution import CAM_METHODS, default_cam_layer, grad_cam, guided_backprop, saliency
from ._common import (Inputs, Output, _one_layer, _overrides, _parse_target, add_layout_args, add_model_args,
                      add_target_args, read_labels, say)


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


def cmd_cam(args, model, categories, transform):
    layer = _one_layer(model, args.layer, "--layer") if args.layer is not None else None
    ov = _overrides(args, model)
    names = read_labels(args, categories)
    target = _parse_target(args, names)
    inputs = Inputs(args, model, transform)
    report = {}
    with Output(args.out) as out:
        for path, x, shown in inputs:
            if layer is None:  # the default: the last layer with maps (a class-token ViT's last norm1)
                layer = default_cam_layer(model, x[None])
                say(f"--layer not given: explaining {layer!r}")
            cam = grad_cam(model, x[None], layer, target, method=args.method, **ov)
            extra = list(im.signed_rgb(cam.guided)) if cam.guided is not None else []
            files = _write_view(out, shown, cam.maps[0], f"{inputs.stem(path)}_{args.method}.png", extra)
            report[inputs.key(path)] = {"layer": cam.layer, **_explained(cam, names, path), "files": files}
        out.text(f"{args.method}.json", json.dumps(inputs.record_skipped(report), indent=1))
        out.commit()
    print(f"wrote {out.folder}/")


def cmd_saliency(args, model, categories, transform):
    names = read_labels(args, categories)
    target = _parse_target(args, names)
    inputs = Inputs(args, model, transform)
    report = {}
    with Output(args.out) as out:
        for path, x, shown in inputs:
            if args.method == "guided":
                res = guided_backprop(model, x[None], target)
            else:
                res = saliency(model, x[None], target, samples=args.samples if args.method == "smoothgrad" else 0,
                               seed=args.seed)
            heat = res.maps[0].abs().amax(0)  # the strongest channel at each pixel
            extra = list(im.signed_rgb(res.maps[:1])) if args.method == "guided" and shown.dim() == 3 else []
            if shown.dim() == 3:
                heat = im.clip_percentile(heat)
            files = _write_view(out, shown, heat, f"{inputs.stem(path)}_{args.method}.png", extra,
                                scaled=shown.dim() == 3)
            report[inputs.key(path)] = {**_explained(res, names, path), "files": files}
        out.text(f"{args.method}.json", json.dumps(inputs.record_skipped(report), indent=1))
        out.commit()
    print(f"wrote {out.folder}/")


def add_commands(sub) -> None:
    """cam, saliency."""
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
