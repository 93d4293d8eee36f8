"""
Occlusion
=========

``lv.occlusion`` slides a window over the input and records how much the target's score (or probability, or a
unit's activation with ``unit=(layer, channel)``) drops at each placement: Zeiler and Fergus's Figure 7.
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea"], size=160)
occ = lv.occlusion(model, demo.normalize(images), window=32, stride=16, output="probability")
print(tuple(occ.maps.shape), tuple(occ.grid.shape), classes[occ.targets[0]], float(occ.scores[0]))

fig, axes = plt.subplots(1, 3, figsize=(12, 4))
axes[0].imshow(lv.images.to_uint8(images[0]))
axes[1].imshow(occ.grid[0], cmap="viridis")
axes[1].set_title("probability with the window at each placement")
axes[2].imshow(lv.images.to_uint8(lv.images.overlay(images[0], occ.maps[0])))
axes[2].set_title("mean drop per pixel")
for ax in axes:
    ax.axis("off")
