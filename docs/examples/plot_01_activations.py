"""
Activation maps and predictions
===============================

``lv.activations`` runs one forward pass and returns every requested layer's raw output (with its layout: where the
units, the space and the time are) and the model's output; ``lv.activation_grid`` tiles a layer's maps into one
picture, ``lv.top_predictions`` reads the logits.
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()  # torchvision's MobileNetV2 with its ImageNet weights
images = demo.photos(["chelsea", "coffee"], size=224)  # (2, 3, 224, 224) in [0, 1]
acts, logits = lv.activations(model, demo.normalize(images), ["features.1", "features.4"])

for name in acts:
    print(name, tuple(acts[name].shape), acts.layout(name))
print(lv.top_predictions(logits, 3, classes))

# %%
# Every filter of ``features.4`` for the cat, each scaled on its own (``scale="shared"`` compares them).
fig, axes = plt.subplots(1, 2, figsize=(10, 5))
axes[0].imshow(lv.images.to_uint8(images[0]))
axes[0].set_title("input")
axes[1].imshow(lv.images.to_uint8(lv.activation_grid(acts["features.4"], index=0)))
axes[1].set_title("features.4: 32 filters")
for ax in axes:
    ax.axis("off")
