"""
The atlas: every unit of a model
================================

``lightning_vis.atlas.build`` writes a static site (open its ``index.html`` from disk) with a page per unit: its
feature visualization and negative render, diverse renders, top-k and bottom-k dataset examples with their
receptive-field crops and activation maps, its activation distribution, its health and its strongest connections to
the previous and next layers. ``lightning-vis atlas`` does the same from the command line, on one process or sharded
with Lightning Fabric. A tiny one here: the first 3 units of two early layers over 16 small pictures, short renders.
"""

import tempfile
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import torch
from torch.utils.data import TensorDataset

import lightning_vis.atlas as atlas
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
names = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "brick"]
pictures = demo.photos(names, size=64)
data = TensorDataset(torch.cat([pictures, pictures.flip(-1)]))  # the photos and their mirror images
result = atlas.build(model, data, Path(tempfile.mkdtemp()) / "atlas", ["features.2.conv.0.0", "features.4.conv.0.0"],
                     preprocess=demo.normalize, k=3, size=32, steps=16, diverse=0, max_units=3, batch=3,
                     progress=False)
print(result.units, "units;", {k: round(v, 1) for k, v in result.timings.items()}, "seconds")

# %%
# A unit's folder holds the pictures its page shows:
unit = sorted(p for p in result.index.parent.rglob("*") if p.is_dir() and any(p.glob("*.png")))[0]
pngs = sorted(unit.glob("*.png"))[:4]
print(unit.relative_to(result.index.parent), [p.name for p in sorted(unit.glob("*.png"))])
fig, axes = plt.subplots(1, len(pngs), figsize=(4 * len(pngs), 4))
for ax, p in zip(axes, pngs):
    ax.imshow(matplotlib.image.imread(str(p)))
    ax.set_title(p.name, fontsize=8)
    ax.axis("off")
