"""
The command line
================

``lightning-vis <command> --model ... --weights ... --images folder/ --out folder/`` runs each method on a folder of
pictures: ``layers``, ``activations``, ``deconv``, ``cam``, ``saliency``, ``topk``, ``health``, ``render``, ``dream``,
``report``, ``atlas``, ``evaluate``, ``serve``. ``--model`` is ``torchvision:<name>``, ``package.module:factory``
or a transformers folder (``hf:...``); ``--weights`` a state dict. Here the commands run in this process
(``lightning_vis.cli.main`` takes the same arguments) on the demo's photos.
"""

import tempfile
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import cli, demo

out = Path(tempfile.mkdtemp())
photos = out / "photos"  # two of the demo's photos, 224 px
photos.mkdir()
for name, picture in zip(["chelsea", "coffee"], demo.photos(["chelsea", "coffee"], size=224)):
    lv.images.save_png(picture, photos / f"{name}.png")
model = ["--model", "torchvision:mobilenet_v2", "--weights", demo.weights_file()]

cli.main(["layers", *model, "--input-size", "3,224,224"])

# %%
# ``lightning-vis cam``: the top class's Grad-CAM of every picture in the folder.
cli.main(["cam", *model, "--images", str(photos), "--layer", "features.18", "--out", str(out / "cam")])
pngs = sorted((out / "cam").glob("*.png"))
fig, axes = plt.subplots(1, len(pngs), figsize=(4 * len(pngs), 4))
for ax, p in zip(axes, pngs):
    ax.imshow(matplotlib.image.imread(str(p)))
    ax.set_title(p.name, fontsize=8)
    ax.axis("off")
