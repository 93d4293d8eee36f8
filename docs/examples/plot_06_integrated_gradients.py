"""
Integrated gradients, GradientSHAP, input x gradient
====================================================

Path methods: ``lv.integrated_gradients`` integrates the gradient from a baseline (``"zeros"``, ``"blur"``, a
tensor) to the input; ``.delta`` is the completeness error (how far the attributions' sum is from the score's
change). ``lv.gradient_shap`` draws baselines and points on the path (seeded); ``lv.input_x_gradient`` is one step.
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea"], size=160)
x = demo.normalize(images)
ig = lv.integrated_gradients(model, x, baseline="blur", steps=16)
shap = lv.gradient_shap(model, x, baselines=x * 0, samples=8, seed=0)
ixg = lv.input_x_gradient(model, x)
print("completeness error of IG:", float(ig.delta[0]), "score:", float(ig.scores[0]))

fig, axes = plt.subplots(1, 4, figsize=(14, 4))
axes[0].imshow(lv.images.to_uint8(images[0]))
for ax, res, title in ((axes[1], ig, "integrated gradients"), (axes[2], shap, "GradientSHAP"),
                       (axes[3], ixg, "input x gradient")):
    ax.imshow(lv.images.to_uint8(lv.images.signed_rgb(res.maps)[0]))
    ax.set_title(title)
for ax in axes:
    ax.axis("off")
