"""
Deconvnet (Zeiler and Fergus)
=============================

``lv.deconvnet`` sends each image's strongest features of a layer back to pixel space, through the network's
rectifiers and max-pool switches (one forward pass, then all the targets at once). ``rule="guided"`` gives the
guided-backprop reconstruction of the same features.
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea"], size=224)
rec = lv.deconvnet(model, demo.normalize(images), ["features.4", "features.10"], top_k=3)
print({k: tuple(v.shape) for k, v in rec.images.items()})  # (N, k, 3, 224, 224) per layer
print(rec.features)  # which channels were the strongest

# %%
# Each row: a layer's three strongest features of the cat, back in pixels (signed, shown around grey).
fig, axes = plt.subplots(2, 3, figsize=(9, 6))
for row, layer in enumerate(rec.images):
    shown = lv.images.signed_rgb(rec.images[layer][0])  # (3, 3, H, W): each centred at grey
    for col in range(3):
        axes[row, col].imshow(lv.images.to_uint8(shown[col]))
        axes[row, col].set_title(f"{layer} #{int(rec.features[layer][0, col])}")
        axes[row, col].axis("off")
