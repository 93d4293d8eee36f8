"""
Filter health
=============

``lv.filter_health`` finds dead filters (never active), near-duplicates (cosine > 0.95) and noise-only kernels over
a data pass; ``report.summary()`` prints it, ``report.suspicious()`` ranks them, ``report.plots(folder)`` draws them.
"""

import tempfile

import matplotlib.image
import matplotlib.pyplot as plt
from torch.utils.data import DataLoader, TensorDataset

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
pictures = demo.photos(["chelsea", "coffee", "astronaut", "rocket", "brick", "grass"], size=128)
loader = DataLoader(TensorDataset(demo.normalize(pictures)), batch_size=6)
report = lv.filter_health(model, loader, ["features.0.0", "features.1.conv.0.0", "features.2.conv.0.0"],
                          progress=False)
print(report.summary())
print(report.suspicious()[:5])

paths = report.plots(tempfile.mkdtemp())  # PNGs: active fractions per layer, dead / noise / duplicated filters
print([p.name for p in paths])
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, p in zip(axes, [paths[0], paths[-1]]):
    ax.imshow(matplotlib.image.imread(str(p)))
    ax.axis("off")
