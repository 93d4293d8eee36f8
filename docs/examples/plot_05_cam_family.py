"""
The CAM family
==============

``lv.grad_cam(model, images, layer, method=...)`` computes Grad-CAM and its variants on any layer with maps (conv
maps, channels-last maps, token layers on their grid); ``layer=None`` picks the last one. The methods equal
pytorch-grad-cam's (tested). Score-CAM and Ablation-CAM (``"scorecam"``, ``"ablationcam"``) run one forward pass per
channel of the layer: slower, left out here.
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea", "coffee"], size=224)
x = demo.normalize(images)
methods = ["gradcam", "gradcam++", "layercam", "hirescam", "xgradcam", "eigencam"]
cams = {m: lv.grad_cam(model, x, "features.18", method=m) for m in methods}
cam = cams["gradcam"]
print(cam.layer, tuple(cam.low_res.shape), "->", tuple(cam.maps.shape), [classes[t] for t in cam.targets])

fig, axes = plt.subplots(2, len(methods), figsize=(3 * len(methods), 6))
for col, m in enumerate(methods):
    for row in range(2):
        axes[row, col].imshow(lv.images.to_uint8(lv.images.overlay(images[row], cams[m].maps[row])))
        axes[row, col].axis("off")
    axes[0, col].set_title(m)
