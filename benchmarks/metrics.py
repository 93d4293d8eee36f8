"""Faithfulness metrics against their peers, side by side in one run, on the same model, images and maps.

    python -m benchmarks.metrics [--device cpu|cuda] [--batch N] [--size PX] [--only road,deletion,infidelity]
                                 [--quick] [--reps R] [--json PATH]

- road: ``metrics.road`` at 9 percentiles (10..90), MoRF and LeRF, against pytorch-grad-cam's ``ROADCombined``
  (18 SciPy sparse solves and 18 one-image forward passes per image), softmax targets, the imputers' noise off on
  both sides so that the numbers can be compared (ROADCombined's combined score, max |difference|).
- deletion: ``metrics.deletion_insertion`` against torch-cam's ``DeletionInsertionMetric`` at the same 20 steps,
  zero baseline, softmax scores, torch-cam given the same maps (its batches of 32; ours of 64).
- infidelity: ``metrics.infidelity`` against ``captum.metrics.infidelity``, 10 samples, the same seeded Gaussian
  perturbation, normalised, one batch of samples each.
The model is torchvision's MobileNetV2 with its ImageNet weights on scikit-image's photos where the demo's weights
package is installed (random weights on noise where not; --quick: a small conv net at 32 px), the maps its Grad-CAM
(features.18) for the top class. Times: median of --reps rounds after a warm-up, the two sides taking turns
(benchmarks.methods.race), in wall-clock seconds or with --clock cpu the process's CPU seconds on one thread (a
shared machine). ratio = peer / ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys

import torch
from torch import nn

from lightning_vis import metrics as M
from lightning_vis.attribution import grad_cam

from .methods import CLOCKS, race, set_clock

SECTIONS = ("road", "deletion", "infidelity")
GOALS = {"road": 10.0, "deletion": 1.0, "infidelity": 1.0}


def _model_and_inputs(quick: bool, batch: int, size: int):
    """(model, CAM layer, inputs, what they are): the quick conv net on noise; else MobileNetV2 with its ImageNet
    weights on scikit-image's photos where the demo's weights package is installed (a real model's scores move
    when pixels are removed, so the check of equal numbers means something), random weights on noise where not."""
    g = torch.Generator().manual_seed(0)
    if quick:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), "2", \
            torch.randn(batch, 3, size, size, generator=g), "a small conv net, random weights"
    from lightning_vis import demo

    try:
        model = demo.mobilenet()[0]
    except SystemExit:  # no weights package
        from torchvision.models import mobilenet_v2

        torch.manual_seed(0)
        return mobilenet_v2(), "features.18", torch.randn(batch, 3, size, size, generator=g), \
            "MobileNetV2, random weights (no weights package)"
    names = (demo.PHOTOS * batch)[:batch]
    return model, "features.18", demo.normalize(demo.photos(names, size)), "MobileNetV2, ImageNet weights, photos"


def _road(model, x, maps, classes):
    from pytorch_grad_cam.metrics import road as pgc_road
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    defaults = pgc_road.NoisyLinearImputer.__init__.__defaults__
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    cams = maps.cpu().numpy()

    def peer():
        pgc_road.NoisyLinearImputer.__init__.__defaults__ = (0.0, defaults[1])  # the noise off, for the check
        try:
            return torch.as_tensor(pgc_road.ROADCombined()(x, cams, targets, model))
        finally:
            pgc_road.NoisyLinearImputer.__init__.__defaults__ = defaults

    def ours():
        return M.road(model, x, maps, classes, noise=0.0).combined.cpu()

    return {"ours": ours, "peer": peer}, "ROADCombined (pytorch-grad-cam), 9 percentiles x MoRF/LeRF"


class GivenMaps:
    """torch-cam's CAM-extractor protocol returning given maps, so that its metrics score the maps under test
    (the benchmark's and the tests' comparisons with DeletionInsertionMetric)."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kw):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def _deletion(model, x, maps, classes):
    from torchcam.metrics import DeletionInsertionMetric

    def peer():
        metric = DeletionInsertionMetric(GivenMaps(model, maps), logits_fn=lambda z: z.softmax(1), steps=20)
        metric.update(x, classes.tolist())
        return torch.tensor([metric.summary()["deletion_auc"], metric.summary()["insertion_auc"]])

    def ours():
        c = M.deletion_insertion(model, x, maps, classes, steps=20)
        return torch.stack([c.deletion_auc.mean(), c.insertion_auc.mean()]).cpu()

    return {"ours": ours, "peer": peer}, "DeletionInsertionMetric (torch-cam), 20 steps"


def _infidelity(model, x, maps, classes):
    from captum.metrics import infidelity

    attr = maps[:, None].expand_as(x).contiguous()

    def peer():
        return infidelity(model, M.gaussian_perturbation(0.1, seed=0), x, attr, target=classes,
                          n_perturb_samples=10, normalize=True).cpu()

    def ours():
        return M.infidelity(model, x, attr, classes, samples=10, batch_size=10 * x.shape[0]).cpu()

    return {"ours": ours, "peer": peer}, "captum.metrics.infidelity, 10 samples"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="a small conv net at 32 px, one round")
    p.add_argument("--json")
    p.add_argument("--clock", choices=CLOCKS, default="wall", help="wall time, or CPU time on one thread (set_clock)")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    if any(s not in SECTIONS for s in only):
        p.error(f"--only takes {', '.join(SECTIONS)}")
    size, reps = (32, 1) if args.quick else (args.size, args.reps)
    set_clock(args.clock)
    model, layer, x, weights = _model_and_inputs(args.quick, args.batch, size)
    model, x = model.to(args.device).eval(), x.to(args.device)
    print(f"{weights}, batch {args.batch} at {size} px, {torch.get_num_threads()} threads, {args.clock} clock",
          flush=True)
    classes = model(x).argmax(1).detach()
    maps = grad_cam(model, x, layer, classes).normalized().detach()
    rows = []
    for section in only:
        fns, peer_name = {"road": _road, "deletion": _deletion, "infidelity": _infidelity}[section](
            model, x, maps, classes)
        times, results = race(args.device, reps, fns)
        diff = float((results["ours"] - results["peer"]).abs().max() / results["peer"].abs().max().clamp_min(1e-12))
        ratio = times["peer"] / times["ours"]
        rows.append({"section": section, "peer": peer_name, "ours_s": times["ours"], "peer_s": times["peer"],
                     "ratio": ratio, "goal": GOALS[section], "diff": diff})
        print(f"{section:10s} ours {times['ours']:8.3f} s  peer {times['peer']:8.3f} s  ratio {ratio:6.2f}x "
              f"(goal >= {GOALS[section]:g}x)  max|diff|/max|peer| {diff:.2e}  [{peer_name}]", flush=True)
    if args.json:
        record = {"schema": "lightning-vis/benchmarks/metrics/1", "device": args.device, "batch": args.batch,
                  "model": weights, "clock": args.clock,
                  "size": size, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
