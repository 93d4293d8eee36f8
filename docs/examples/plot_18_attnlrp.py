"""
AttnLRP on a vision transformer
===============================

``lv.lrp`` on a model with attention layers uses AttnLRP (Achtibat et al. 2024; composite ``"attnlrp"``, equal to
lxt 2.1's, tested) by default: relevance goes through the softmax, the attention's products and the layer norms,
so the map sums to the target's score up to what biases absorb. ``composite="cp-lrp"`` is Ali et al.'s variant
(the attention weights held constant). Here a small timm ViT built from its config with **random weights** (no
weights can be downloaded on this machine): the maps show the API, the shapes and the conservation, not what a
trained ViT looks at; give it your trained ViT and the same line draws its relevance.
"""

import matplotlib.pyplot as plt
import timm
import torch

import lightning_vis as lv
from lightning_vis import demo

torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=112, depth=4).eval()
images = demo.photos(["chelsea", "astronaut"], size=112)
x = demo.normalize(images)
rels = {c: lv.lrp(vit, x, composite=c) for c in ("attnlrp", "cp-lrp")}
rel = rels["attnlrp"]
print(tuple(rel.maps.shape), "relevance sums", [round(float(s), 3) for s in rel.maps.sum((1, 2, 3))],
      "scores", [round(float(s), 3) for s in rel.scores])

fig, axes = plt.subplots(2, 3, figsize=(9, 6))
for i in range(2):
    axes[i, 0].imshow(lv.images.to_uint8(images[i]))
    for col, (name, rel) in enumerate(rels.items(), start=1):
        heat = rel.maps[i].sum(0)
        lim = float(heat.abs().quantile(0.995))
        axes[i, col].imshow(heat, cmap="bwr", vmin=-lim, vmax=lim)
        axes[i, col].set_title(name)
for ax in axes.flat:
    ax.axis("off")
