"""
The CAM family and FullGrad
===========================

``lv.grad_cam(model, images, layer, method=...)`` computes Grad-CAM and its variants on any layer with maps (conv
maps, channels-last maps, token layers on their grid); ``layer=None`` picks the last one. From activations and
gradients: ``"gradcam"``, ``"gradcam++"``, ``"layercam"``, ``"hirescam"``, ``"xgradcam"``, ``"shapleycam"`` (with
the Hessian-vector product of the score) and ``"finercam"`` (the target class against the 3 classes nearest to it);
from the activations alone, without a class: ``"eigencam"``, ``"kpcacam"``, ``"fem"``. ``lv.fullgrad`` (FullGrad)
sums the input-gradient and every biased layer's bias-gradient over the whole network instead of one layer. The
methods equal pytorch-grad-cam's (tested). Score-CAM and Ablation-CAM (``"scorecam"``, ``"ablationcam"``) run one
forward pass per channel of the layer: slower, left out here.
"""

import matplotlib.pyplot as plt

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
images = demo.photos(["chelsea", "coffee"], size=224)
x = demo.normalize(images)
methods = ["gradcam", "gradcam++", "layercam", "hirescam", "xgradcam", "shapleycam", "finercam", "eigencam",
           "kpcacam", "fem"]
cams = {m: lv.grad_cam(model, x, "features.18", method=m) for m in methods}
cams["fullgrad"] = lv.fullgrad(model, x)
cam = cams["gradcam"]
print(cam.layer, tuple(cam.low_res.shape), "->", tuple(cam.maps.shape), [classes[t] for t in cam.targets])

# two rows per half of the methods: chelsea above, coffee below
fig, axes = plt.subplots(4, 6, figsize=(15, 10.4))
for k, m in enumerate(["photo", *cams]):
    half, col = divmod(k, 6)
    for row in range(2):
        shown = images[row] if m == "photo" else lv.images.overlay(images[row], cams[m].maps[row])
        axes[2 * half + row, col].imshow(lv.images.to_uint8(shown))
    axes[2 * half, col].set_title(m)
for ax in axes.flat:
    ax.axis("off")

# %%
# A result shows itself: in a notebook (and here) a CAM or an Attribution ending a cell is drawn as its maps;
# ``.show(images=...)`` overlays them on the inputs, ``.save(path)`` writes the PNG.

cams["fullgrad"]
