"""The callbacks' logic, independent of which Lightning package runs them (``lightning.pytorch`` or
``pytorch_lightning``): each class here is mixed with that package's ``Callback`` by :func:`build`.

Thin adapters: every picture or number comes from a method of lightning_vis; the callbacks decide when to run
it (schedule, rank), how to run it inside a trainer (gradients on, inference mode off, the model and its
``.grad`` left alone: the methods' guard does that), and where its results go (every logger on the trainer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .. import images as im
from ..activations import activation_grid, activations
from ..attribution import grad_cam
from ..dataset import TopK, TopKCollector, _dataset_indices, all_gather_merge
from ..deconv import deconvnet
from ..featureviz import render
from ..health import ActivityCollector

TAG = "lightning_vis"


# ----------------------------------------------------------------------------------------------------------------
# logging to whatever loggers the trainer has


def out_dir(trainer) -> Path:
    """Where files go: the first logger's log_dir, else the trainer's default_root_dir; /lightning_vis."""
    for logger in trainer.loggers:
        d = getattr(logger, "log_dir", None)
        if d:
            return Path(d) / TAG
    return Path(trainer.default_root_dir) / TAG


def log_images(trainer, tag: str, images: Tensor, step: int) -> list[Path]:
    """(N, 3, H, W) images in [0, 1] to every logger: TensorBoard add_images, W&B log_image; a logger without
    images (CSV, ...) gets a PNG grid under its own log dir, a trainer without loggers under default_root_dir.
    Returns the PNG paths."""
    images = images.detach().float().clamp(0, 1).cpu()
    folders = []
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            logger.experiment.add_images(f"{TAG}/{tag}", images, step)
        elif kind == "WandbLogger":
            logger.log_image(key=f"{TAG}/{tag}", images=list(images), step=step)
        else:
            folders.append(Path(getattr(logger, "log_dir", None) or trainer.default_root_dir) / TAG)
    if not trainer.loggers:
        folders.append(out_dir(trainer))
    return [im.save_png(im.grid(images), f / tag / f"step{step:07d}.png") for f in dict.fromkeys(folders)]


def log_scalars(trainer, metrics: dict, step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics({f"{TAG}/{k}": float(v) for k, v in metrics.items()}, step=step)


def _same_size(tiles: list[Tensor]) -> Tensor:
    h = max(t.shape[-2] for t in tiles)
    w = max(t.shape[-1] for t in tiles)
    out = torch.ones(len(tiles), 3, h, w)
    for i, t in enumerate(tiles):
        out[i, :, :t.shape[-2], :t.shape[-1]] = t.expand(3, -1, -1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# scheduled callbacks


class Scheduled:
    """Runs ``run(trainer, module)`` every_n_epochs (at the end of a training epoch), every_n_train_steps, and at
    fit end; on global rank zero only unless rank_zero_only=False (then every rank runs it: shard the work)."""

    def __init__(self, every_n_epochs: int | None = 1, every_n_train_steps: int | None = None,
                 on_fit_end: bool = True, rank_zero_only: bool = True):
        self.every_n_epochs, self.every_n_train_steps = every_n_epochs, every_n_train_steps
        self.run_on_fit_end, self.rank_zero_only = on_fit_end, rank_zero_only
        self.runs = 0

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}{self._key_extra()}"

    def _key_extra(self) -> str:
        return ""

    def _go(self, trainer, pl_module, final: bool = False):
        if self.rank_zero_only and not trainer.is_global_zero:
            return
        with torch.inference_mode(False), torch.enable_grad():
            self.run(trainer, pl_module, final)
        self.runs += 1


    def on_train_epoch_end(self, trainer, pl_module):
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._go(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._go(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if self.run_on_fit_end:
            self._go(trainer, pl_module, final=True)

    def run(self, trainer, pl_module, final: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _on(images: Tensor, module) -> Tensor:
    p = next(module.parameters(), None)
    return images.to(p.device) if p is not None else images


class ActivationMapsMixin(Scheduled):
    """Per sample image and layer: the grid of every filter's activation map."""

    def __init__(self, images: Tensor, layers, *, scale: str = "per_image", max_filters: int | None = 64, **kw):
        super().__init__(**kw)
        self.images, self.layers, self.scale, self.max_filters = images, layers, scale, max_filters

    def run(self, trainer, pl_module, final):
        acts, _ = activations(pl_module, _on(self.images, pl_module), self.layers)
        for layer, a in acts.items():
            if a.dim() < 3:
                continue
            grids = [activation_grid(a, i, self.scale, max_filters=self.max_filters) for i in range(a.shape[0])]
            log_images(trainer, f"activations/{layer}", _same_size(grids), trainer.global_step)


class DeconvnetMixin(Scheduled):
    """Per sample image and layer: the image, then the deconvnet (or guided) reconstructions of its top_k features."""

    def __init__(self, images: Tensor, layers, *, top_k: int = 3, rule: str = "deconvnet", **kw):
        super().__init__(**kw)
        self.images, self.layers, self.top_k, self.rule = images, layers, top_k, rule

    def run(self, trainer, pl_module, final):
        rec = deconvnet(pl_module, _on(self.images, pl_module), self.layers, top_k=self.top_k, rule=self.rule)
        shown = im.to_display(self.images.cpu())
        for layer, r in rec.images.items():
            rows = [im.grid(torch.cat([shown[i:i + 1], im.signed_rgb(r[i].cpu())]), ncol=r.shape[1] + 1)
                    for i in range(r.shape[0])]
            log_images(trainer, f"{self.rule}/{layer}", _same_size(rows), trainer.global_step)


class AttributionMixin(Scheduled):
    """Per sample image: a CAM overlay (method of lightning_vis.grad_cam) of the target class (default: top)."""

    def __init__(self, images: Tensor, layer: str, *, method: str = "gradcam", target=None, **kw):
        super().__init__(**kw)
        self.images, self.layer, self.method, self.target = images, layer, method, target

    def _key_extra(self):
        return f"[{self.layer},{self.method}]"

    def run(self, trainer, pl_module, final):
        cam = grad_cam(pl_module, _on(self.images, pl_module), self.layer, self.target, method=self.method)
        shown = im.to_display(self.images.cpu())
        tiles = [im.overlay(shown[i], cam.maps[i].cpu()) for i in range(len(shown))]
        log_images(trainer, f"{self.method}/{self.layer}", torch.stack(tiles), trainer.global_step)


class FeatureVisualizationMixin(Scheduled):
    """Renders channels of a layer on schedule, logs the grid, and keeps every render: at fit end each channel's
    evolution across epochs is written as a strip (PNG) and a GIF, and logged ("the vision sharpens")."""

    def __init__(self, layer: str, channels, *, size=64, steps: int = 64, seed: int = 0, image_channels: int = 3,
                 preprocess=None, render_kwargs: dict | None = None, **kw):
        super().__init__(**kw)
        self.layer, self.channels = layer, list(channels)
        self.size, self.steps, self.seed, self.image_channels = size, steps, seed, image_channels
        self.preprocess, self.render_kwargs = preprocess, render_kwargs or {}
        self.history: list[tuple[int, Tensor]] = []  # (epoch, (n, C, H, W) renders)

    def _key_extra(self):
        return f"[{self.layer}]"

    def run(self, trainer, pl_module, final):
        """On rank zero, all channels in one batched render; or, with rank_zero_only=False under DDP, sharded:
        rank r renders channels r, r + world, ... and rank zero gathers them."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        mine = list(range(rank, len(self.channels), world)) if not self.rank_zero_only else \
            list(range(len(self.channels)))
        imgs = render(pl_module, (self.layer, [self.channels[i] for i in mine]), size=self.size, steps=self.steps,
                      seed=self.seed + rank, channels=self.image_channels, preprocess=self.preprocess,
                      progress=False, **self.render_kwargs).images if mine else None
        if not self.rank_zero_only and world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, (mine, imgs))
            if rank != 0:
                return
            by_pos = {i: img for pos, part in gathered if part is not None for i, img in zip(pos, part)}
            imgs = torch.stack([by_pos[i] for i in range(len(self.channels))])
        if imgs.dim() == 5:  # clips: the middle frame
            imgs = imgs[:, :, imgs.shape[2] // 2]
        if not self.history or self.history[-1][0] != trainer.current_epoch or final:
            self.history.append((trainer.current_epoch, imgs))
        log_images(trainer, f"feature_viz/{self.layer}", imgs.expand(-1, 3, -1, -1), trainer.global_step)
        if final:
            self.write_evolution(trainer)

    def write_evolution(self, trainer) -> list[Path]:
        """Per channel: renders across epochs as a strip PNG and a GIF under the log dir; all strips logged."""
        if not self.history:
            return []
        folder = out_dir(trainer) / "evolution" / self.layer
        stack = torch.stack([h[1] for h in self.history], 1).expand(-1, -1, 3, -1, -1)  # (n, epochs, 3, H, W)
        files = []
        for c, frames in zip(self.channels, stack):
            files.append(im.save_png(im.grid(frames, ncol=len(frames)), folder / f"channel{c}.png"))
            files.append(im.save_gif(frames, folder / f"channel{c}.gif", fps=2))
        log_images(trainer, f"evolution/{self.layer}", stack.flatten(0, 1), trainer.global_step)
        return files

    def state_dict(self):
        return {"history": [(e, t.clone()) for e, t in self.history], "runs": self.runs}

    def load_state_dict(self, state):
        self.history = [(e, t) for e, t in state.get("history", [])]
        self.runs = state.get("runs", 0)


# ----------------------------------------------------------------------------------------------------------------
# collected from the validation batches the trainer already runs


def _input_of(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class _ValidationCollector:
    """Hooks the layers for the validation epoch (not the sanity check), feeds each batch to a collector."""

    def __init__(self, every_n_epochs: int = 1):
        self.every_n_epochs = every_n_epochs
        self._collector = None

    def _active(self, trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer, pl_module):
        if self._active(trainer):
            self._collector = self.make_collector(pl_module).attach()
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            try:
                self._order = _dataset_indices(loader)
            except ValueError:
                self._order = None
            self._seen = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self._collector is not None and dataloader_idx == 0:
            self._collector.before(_input_of(batch))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._collector is not None and dataloader_idx == 0:
            n = _input_of(batch).shape[0]
            idx = torch.tensor(self._order[self._seen:self._seen + n]) if self._order is not None \
                else torch.arange(self._seen, self._seen + n)
            self._collector.add(idx)
            self._seen += n

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._collector is None:
            return
        self._collector.detach()
        self.finish(trainer, pl_module)
        self._collector = None

    def teardown(self, trainer, pl_module, stage):
        if self._collector is not None:
            self._collector.detach()
            self._collector = None


class DatasetExamplesMixin(_ValidationCollector):
    """The top-k validation inputs of every channel of the layers, collected from the validation batches the
    trainer runs (no extra pass), merged exactly across DDP ranks; ``result`` (a lightning_vis.TopK) is saved
    under the log dir (topk.pt: {"epoch", "result": TopK.state_dict()}) and in checkpoints."""

    def __init__(self, layers, *, k: int = 9, score: str = "max", every_n_epochs: int = 1):
        super().__init__(every_n_epochs)
        self.layers, self.k, self.score = layers, k, score
        self.result = None

    @property
    def state_key(self):
        return f"DatasetExamples[{self.layers}]"

    def make_collector(self, pl_module):
        return TopKCollector(pl_module, self.layers, self.k, self.score)

    def finish(self, trainer, pl_module):
        self.result = all_gather_merge(self._collector.result())
        if trainer.is_global_zero:
            path = out_dir(trainer) / "topk.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"epoch": trainer.current_epoch, "result": self.result.state_dict()}, path)

    def state_dict(self):
        return {"result": self.result.state_dict() if self.result is not None else None}

    def load_state_dict(self, state):
        saved = state.get("result")
        self.result = TopK.from_state_dict(saved) if saved is not None else None


class FilterHealthMixin(_ValidationCollector):
    """Per layer, every validation epoch: the share of dead channels, noise-only and duplicate filters, the median
    active fraction, logged as scalars (activity merged across DDP ranks); ``report`` keeps the last one."""

    def __init__(self, layers, *, threshold: float = 0.0, every_n_epochs: int = 1):
        super().__init__(every_n_epochs)
        self.layers, self.threshold = layers, threshold
        self.report = None

    @property
    def state_key(self):
        return f"FilterHealth[{self.layers}]"

    def make_collector(self, pl_module):
        return ActivityCollector(pl_module, self.layers, self.threshold)

    def finish(self, trainer, pl_module):
        import torch.distributed as dist

        col = self._collector
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (col.stats, col.seen))
            merged: dict = {}
            for stats, _ in parts:
                for name, (a, t, c, m) in stats.items():
                    s = merged.setdefault(name, [0, 0.0, 0, torch.full_like(m, float("-inf"))])
                    s[0], s[1], s[2], s[3] = s[0] + a, s[1] + t, s[2] + c, torch.maximum(s[3], m)
            col.stats, col.seen = merged, sum(p[1] for p in parts)
        self.report = col.report()
        metrics = {}
        for name, h in self.report.layers.items():
            metrics[f"health/{name}/dead_fraction"] = float(h.dead.float().mean())
            metrics[f"health/{name}/noise_only"] = int(h.noise_only.sum())
            metrics[f"health/{name}/duplicate_pairs"] = len(h.duplicates)
            metrics[f"health/{name}/median_active"] = float(h.active_fraction.median())
        if trainer.is_global_zero:
            log_scalars(trainer, metrics, trainer.global_step)


def build(pl, module: str) -> dict:
    """The callback classes for one Lightning package (its module with a ``Callback`` class), to be exposed as
    attributes of `module` (so that they pickle, e.g. for ddp_spawn)."""
    base = pl.Callback
    classes = {}
    for name, mixin in (("ActivationMaps", ActivationMapsMixin), ("Deconvnet", DeconvnetMixin),
                        ("Attribution", AttributionMixin), ("FeatureVisualization", FeatureVisualizationMixin),
                        ("DatasetExamples", DatasetExamplesMixin), ("FilterHealth", FilterHealthMixin)):
        classes[name] = type(name, (mixin, base), {"__doc__": mixin.__doc__, "__module__": module})

    class Visualize(base):
        """Several callbacks configured at once: activation maps and deconvnet of `images` on `layers`, CAMs on
        `cam_layer`, feature visualizations of `channels` of `viz_layer`, dataset examples and filter health of
        `layers`; each part is left out when what it needs is not given. Hooks are forwarded to every part."""

        def __init__(self, images: Tensor | None = None, layers=None, *, cam_layer: str | None = None,
                     viz_layer: str | None = None, channels=None, k: int = 9, every_n_epochs: int = 1,
                     render_kwargs: dict | None = None):
            parts = []
            if images is not None and layers is not None:
                parts += [classes["ActivationMaps"](images, layers, every_n_epochs=every_n_epochs),
                          classes["Deconvnet"](images, layers, every_n_epochs=every_n_epochs)]
            if images is not None and cam_layer is not None:
                parts.append(classes["Attribution"](images, cam_layer, every_n_epochs=every_n_epochs))
            if viz_layer is not None and channels is not None:
                parts.append(classes["FeatureVisualization"](viz_layer, channels, every_n_epochs=every_n_epochs,
                                                             **(render_kwargs or {})))
            if layers is not None:
                parts += [classes["DatasetExamples"](layers, k=k), classes["FilterHealth"](layers)]
            self.parts = parts

        def state_dict(self):
            return {p.state_key: p.state_dict() for p in self.parts}

        def load_state_dict(self, state):
            for p in self.parts:
                if p.state_key in state:
                    p.load_state_dict(state[p.state_key])

    def forward(hook):
        def call(self, *args, **kwargs):
            for p in self.parts:
                getattr(p, hook)(*args, **kwargs)
        return call

    for hook in ("on_train_epoch_end", "on_train_batch_end", "on_fit_end", "on_validation_epoch_start",
                 "on_validation_batch_start", "on_validation_batch_end", "on_validation_epoch_end", "teardown"):
        setattr(Visualize, hook, forward(hook))
    Visualize.__module__ = module
    classes["Visualize"] = Visualize
    return classes
