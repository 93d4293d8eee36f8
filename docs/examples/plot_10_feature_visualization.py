"""
Feature visualization
=====================

``lv.render`` optimises an image (a decorrelated Fourier parameterization by default, the compiled
``lightning_vis.ops.fft_image``) to excite a unit, one unit per batch element, under seeded jitter, scale and
rotation. Objectives combine (``lv.objectives.channel(...) + 0.5 * lv.objectives.diversity(...)``). Small and short
here (64 px, 32 steps) to keep the gallery fast; the demo uses 128 px and 96 steps, the atlas 128 steps.
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
res = lv.render(model, ("features.4", range(6)), size=64, steps=32, preprocess=demo.normalize, seed=0,
                progress=False)
print(tuple(res.images.shape), tuple(res.losses.shape), res.settings["param"])

fig, ax = plt.subplots(figsize=(9, 3))
ax.imshow(lv.images.to_uint8(lv.images.grid(res.images, ncol=6)))
ax.set_title("features.4, channels 0-5")
ax.axis("off")

# %%
# A class's logit as the objective: what the network thinks an espresso looks like.
espresso = classes.index("espresso")
res = lv.render(model, lv.objectives.class_logit(espresso), size=64, steps=32, preprocess=demo.normalize, seed=0,
                progress=False)
fig, ax = plt.subplots(figsize=(3, 3))
ax.imshow(lv.images.to_uint8(res.images[0]))
ax.axis("off")
