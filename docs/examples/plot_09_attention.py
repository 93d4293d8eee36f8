"""
Attention maps of a ViT
=======================

``lv.attention_maps`` records every attention layer's weights from whatever computes them (``nn.MultiheadAttention``,
``F.scaled_dot_product_attention``, an explicit softmax) and puts what the class token attends to on the image's
grid, per head; ``lv.attention_rollout`` multiplies them through the blocks. Here a timm ViT-Tiny built from its
config: **random weights** (no weights can be downloaded on this machine), so the maps show the API and the shapes,
not what a trained ViT looks at; give it your trained ViT and the same two lines draw its attention.
"""

import matplotlib.pyplot as plt
import timm
import torch

import lightning_vis as lv
from lightning_vis import demo

torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
images = demo.photos(["chelsea"], size=224)
x = demo.normalize(images)
maps = lv.attention_maps(vit, x)  # {layer: (N, heads, 14, 14)}
roll = lv.attention_rollout(vit, x)  # (N, 14, 14)
last = list(maps)[-1]
print(len(maps), "attention layers;", last, tuple(maps[last].shape), "rollout", tuple(roll.shape))

fig, axes = plt.subplots(1, 5, figsize=(15, 3))
axes[0].imshow(lv.images.to_uint8(lv.images.overlay(images[0], roll[0])))
axes[0].set_title("rollout")
for h in range(3):
    axes[h + 1].imshow(maps[last][0, h])
    axes[h + 1].set_title(f"{last}, head {h}")
axes[4].imshow(lv.images.to_uint8(lv.images.overlay(images[0], lv.grad_cam(vit, x).maps[0])))
axes[4].set_title("Grad-CAM (layer=None)")
for ax in axes:
    ax.axis("off")
