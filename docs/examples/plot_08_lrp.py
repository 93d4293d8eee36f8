"""
Layer-wise relevance propagation
================================

``lv.lrp`` redistributes the target's score backwards layer by layer with a composite of rules
(``"epsilon-plus-flat"`` by default; ``"epsilon-gamma-box"`` with the input's bounds ``low=`` / ``high=``). It
equals zennit's composites (tested).
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea", "coffee"], size=224)
rel = lv.lrp(model, demo.normalize(images))
print(tuple(rel.maps.shape), [classes[t] for t in rel.targets])

fig, axes = plt.subplots(2, 2, figsize=(8, 8))
for i in range(2):
    axes[i, 0].imshow(lv.images.to_uint8(images[i]))
    heat = rel.maps[i].sum(0)
    lim = float(heat.abs().quantile(0.995))
    axes[i, 1].imshow(heat, cmap="bwr", vmin=-lim, vmax=lim)
    axes[i, 1].set_title(f"LRP: {classes[rel.targets[i]]}")
for ax in axes.flat:
    ax.axis("off")
