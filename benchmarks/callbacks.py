"""Overhead of the Lightning callbacks, measured against the same trainer without them, in one run.

    python -m benchmarks.callbacks [--quick] [--json PATH]

- train: seconds per training step of a digits-sized CNN (32 px, batch 64) with the scheduled callbacks attached
  but not due (ActivationMaps, Deconvnet, Attribution, FeatureVisualization with every_n_epochs far away): what
  they cost between their runs. Goal: <= 2%. The end-to-end difference of two trainers is at the machine's noise
  level (a few %, also with empty callbacks), so the time spent inside our hooks is measured too, and judged.
- validate: one validation epoch of ResNet-18 (64 px, 8 batches of 32) with DatasetExamples and FilterHealth
  collecting from 4 layers, against the bare epoch. Goal: <= 15%.
Median of --reps rounds, with and without taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import kernels


def _module(pl, net):
    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)
    return M()


def _trainer(pl, callbacks, **kw):
    import tempfile

    # a folder of its own: the callbacks' files (topk.pt, ...) go under default_root_dir/lightning_vis, which from the
    # repository's root would be the package itself
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=callbacks, default_root_dir=tempfile.mkdtemp(), **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="out/benchmarks/callbacks.json")
    args = ap.parse_args(argv)
    import lightning.pytorch as pl
    import torchvision

    from lightning_vis import callbacks as C

    reps = 1 if args.quick else args.reps
    torch.manual_seed(0)
    steps = 4 if args.quick else 40
    x, y = torch.rand(64 * steps, 1, 32, 32), torch.randint(0, 10, (64 * steps,))
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    images = x[:4]
    far = dict(every_n_epochs=10_000, on_fit_end=False)

    def digits_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 10))

    class StepClock(pl.Callback):
        """Time from the start of step 1 to the end of the last step (trainer set-up and step 0 left out)."""

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 1:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.t1 = time.perf_counter()

    own = []  # seconds spent inside our callbacks' hooks, per fit

    def timed(fn, acc):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[0] += time.perf_counter() - t
        return call

    def fit(with_callbacks: bool) -> float:
        clock = StepClock()
        cbs = [C.ActivationMaps(images, ["net.3", "net.6"], **far), C.Deconvnet(images, ["net.6"], **far),
               C.Attribution(images, "net.6", **far),
               C.FeatureVisualization("net.6", range(4), image_channels=1, **far)] \
            if with_callbacks else []
        acc = [0.0]
        for cb in cbs:
            for hook in ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                         "on_before_optimizer_step", "on_before_zero_grad"):
                setattr(cb, hook, timed(getattr(cb, hook), acc))
        trainer = _trainer(pl, cbs + [clock], max_epochs=1, limit_val_batches=0)
        trainer.fit(_module(pl, digits_net()), train)
        if with_callbacks:
            own.append(acc[0] / steps)
        return (clock.t1 - clock.t0) / (steps - 1)

    n_val = 2 if args.quick else 8
    vx, vy = torch.rand(32 * n_val, 3, 64, 64), torch.randint(0, 10, (32 * n_val,))
    val = DataLoader(TensorDataset(vx, vy), batch_size=32)
    resnet = torchvision.models.resnet18(num_classes=10)
    layers = ["net.layer1", "net.layer2", "net.layer3", "net.layer4"]

    def validate(with_callbacks: bool) -> float:
        cbs = [C.DatasetExamples(layers, k=9), C.FilterHealth(layers)] if with_callbacks else []
        trainer = _trainer(pl, cbs)
        module = _module(pl, resnet)
        t = time.perf_counter()
        trainer.validate(module, val, verbose=False)
        return time.perf_counter() - t

    rows = []
    for name, fn, goal in (("train step, scheduled callbacks not due", fit, 0.02),
                           ("validation epoch, DatasetExamples + FilterHealth", validate, 0.15)):
        fn(False), fn(True)  # warm-up
        bare, withcb = [], []
        for _ in range(reps):
            bare.append(fn(False))
            withcb.append(fn(True))
        b, w = statistics.median(bare), statistics.median(withcb)
        overhead = w / b - 1
        row = dict(what=name, bare_s=round(b, 5), with_s=round(w, 5), overhead=round(overhead, 4), goal=goal,
                   verdict="PASS" if overhead <= goal else "MISS")
        note = ""
        if fn is fit:  # the end-to-end difference is within the machine's noise: time our hooks themselves
            hooks = statistics.median(own)
            row.update(own_hooks_s_per_step=round(hooks, 7), own_share=round(hooks / b, 5),
                       verdict="PASS" if hooks / b <= goal else "MISS")
            note = f"; inside our hooks: {hooks * 1e6:.1f} us per step = {100 * hooks / b:.2f}% of a step"
        rows.append(row)
        print(f"{row['verdict']}  {name}: {b * 1e3:.2f} ms bare, {w * 1e3:.2f} ms with callbacks: "
              f"{100 * overhead:+.1f}% end to end{note} (goal <= {100 * goal:.0f}%)", flush=True)
    kernels.write_record(args.json, "lightning-vis/benchmarks/callbacks/1", rows,
                         [f"{r['verdict']}  {r['what']}: {100 * r['overhead']:+.1f}%" for r in rows], reps=reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
