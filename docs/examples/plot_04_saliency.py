"""
Saliency and SmoothGrad
=======================

``lv.saliency`` is the absolute input gradient of the target's score (``samples=0``), or its average over noisy
copies of the input (SmoothGrad, ``samples=25``, seeded). ``target`` is a class for all, one per input, or a
callable (see :doc:`/guide/targets`).
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea"], size=224)
x = demo.normalize(images)
plain = lv.saliency(model, x)
smooth = lv.saliency(model, x, samples=16, seed=0)
print(tuple(plain.maps.shape), classes[plain.targets[0]])

fig, axes = plt.subplots(1, 3, figsize=(12, 4))
axes[0].imshow(lv.images.to_uint8(images[0]))
for ax, res, title in ((axes[1], plain, "gradient"), (axes[2], smooth, "SmoothGrad (16 samples)")):
    heat = lv.images.clip_percentile(res.maps[0].amax(0, keepdim=True))[0]
    ax.imshow(heat, cmap="gray")
    ax.set_title(title)
for ax in axes:
    ax.axis("off")
