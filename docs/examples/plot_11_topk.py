"""
Top-k dataset examples and receptive fields
===========================================

``lv.top_k_examples`` makes one streaming pass over a ``DataLoader`` and keeps, for every unit of the chosen layers,
the k inputs that excite it most (exact, merged across DDP ranks); ``.crops`` cuts each input to the unit's
receptive field (``lv.receptive_field`` measures it by gradient).
"""

import matplotlib.pyplot as plt
from torch.utils.data import DataLoader, TensorDataset

import lightning_vis as lv
from lightning_vis import demo

model, classes, _ = demo.mobilenet()
names = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "brick"]
pictures = demo.photos(names, size=96)
dataset = TensorDataset(demo.normalize(pictures))
topk = lv.top_k_examples(model, DataLoader(dataset, batch_size=4), ["features.10"], k=4, progress=False)
print(lv.receptive_field(model, "features.10", (3, 96, 96)))
print("channel 0's top inputs:", [names[i] for i in topk.layers["features.10"].indices[0]])

# %%
# The receptive-field crops of the top 4 pictures of channels 0-3 (shown un-normalized).
fig, axes = plt.subplots(4, 4, figsize=(8, 8))
for c in range(4):
    crops = topk.crops(TensorDataset(pictures), "features.10", c, model=model)
    for j in range(4):
        axes[c, j].imshow(lv.images.to_uint8(crops[j]))
        axes[c, j].axis("off")
    axes[c, 0].set_title(f"channel {c}", loc="left")
