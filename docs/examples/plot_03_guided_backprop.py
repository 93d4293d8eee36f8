"""
Guided backpropagation
======================

``lv.guided_backprop`` is the gradient of the target class's score with respect to the input, where every ReLU
passes back only positive gradients where its input was positive. ``target=None`` explains the top class.
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea", "coffee"], size=224)
gb = lv.guided_backprop(model, demo.normalize(images))
print(tuple(gb.maps.shape), [classes[t] for t in gb.targets])

shown = lv.images.signed_rgb(gb.maps)  # each centred at grey, scaled by its 99.5th percentile
fig, axes = plt.subplots(2, 2, figsize=(8, 8))
for i in range(2):
    axes[i, 0].imshow(lv.images.to_uint8(images[i]))
    axes[i, 1].imshow(lv.images.to_uint8(shown[i]))
    axes[i, 1].set_title(f"guided backprop: {classes[gb.targets[i]]}")
for ax in axes.flat:
    ax.axis("off")
