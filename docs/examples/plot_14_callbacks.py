"""
Lightning callbacks in a Trainer
================================

``lightning_vis.callbacks`` log activation maps, deconvnet reconstructions, CAMs, feature visualizations (and each
unit's evolution across epochs), the top-k validation inputs of every unit and filter health to every logger the
trainer has (TensorBoard, W&B, MLflow; PNG files for the others). ``Visualize`` configures them all at once. Here a
small CNN trains on scikit-learn's digits for two short epochs, logging to CSV (so the pictures are written as PNGs).
"""

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.image
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vis import demo
from lightning_vis.callbacks import Visualize
from lightning_vis.featureviz import Transforms


class DigitsCNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(32 * 8 * 8, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


torch.manual_seed(0)
(xt, yt), (xv, yv) = demo.digits_data()  # 32x32 digits in [0, 1]
out = Path(tempfile.mkdtemp())
vis = Visualize(xv[:4], ["net.3"], cam_layer="net.3", viz_layer="net.3", channels=range(4), k=6,
                render_kwargs=dict(size=32, steps=24, transforms=Transforms(pad=2, jitter=2)))
trainer = pl.Trainer(max_epochs=2, limit_train_batches=8, logger=pl.loggers.CSVLogger(out), callbacks=[vis], accelerator="cpu",
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
trainer.fit(DigitsCNN(), DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True),
            DataLoader(TensorDataset(xv, yv), batch_size=120))
print({k: round(float(v), 3) for k, v in trainer.callback_metrics.items()})

# %%
# What the callbacks wrote (the same pictures go to TensorBoard's image panel with a TensorBoardLogger):
pngs = sorted(out.rglob("*.png"))
print(len(pngs), "pictures, e.g.", sorted({p.parent.name for p in pngs}))
shown = [p for p in pngs if "evolution" not in str(p)][-4:]
fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4))
for ax, p in zip(axes, shown):
    ax.imshow(matplotlib.image.imread(str(p)))
    ax.set_title(p.relative_to(out).parent.name + "/" + p.stem, fontsize=8)
    ax.axis("off")
