"""The callbacks' logic, independent of which Lightning package runs them (``lightning.pytorch`` or
``pytorch_lightning``): each class here is mixed with that package's ``Callback`` by :func:`build`.

Thin adapters: every picture or number comes from a method of lightning_vis; the callbacks decide when to run
it (schedule, rank), how to run it inside a trainer (gradients on, inference mode off, the model and its
``.grad`` left alone: the methods' guard does that), and where its results go (every logger on the trainer).

Their life cycle: the configuration is checked when fit starts (layers, channels, what the model takes, where
the input is in a validation batch), before the first training step; whatever they attach to the model is
removed in ``on_exception`` and ``teardown`` as well as at the end of their own work.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import images as im
from ..activations import activation_grid, activations
from ..attribution import (CAM_METHODS, fullgrad, grad_cam, gradient_shap, guided_backprop, input_x_gradient,
                           integrated_gradients, lrp, occlusion, saliency)
from ..dataset import TopK, TopKCollector, _dataset_indices, all_gather_merge
from ..deconv import deconvnet
from ..display import overlays
from ..metrics.evaluate import METHODS as EXPLAIN
from ..featureviz import render
from ..health import ActivityCollector
from ..hooks import RULES, LayerNotFoundError, ModelGuard, resolve_layers
from ..hooks.layout import Layout
from ..batches import find_input

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
    """(N, 3, H, W) images in [0, 1] to every logger: TensorBoard ``add_images``; W&B ``log_image`` (one picture
    each, 8-bit); MLflow ``log_image`` (their grid, 8-bit, under the key and step); a logger without images (CSV,
    ...) gets a PNG grid under its own log dir, a trainer without loggers under default_root_dir.
    Returns the PNG paths."""
    images = images.detach().float().clamp(0, 1).cpu()
    key = f"{TAG}/{tag}"
    folders = []
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            logger.experiment.add_images(key, images, step)
        elif kind == "WandbLogger":  # 8-bit arrays: wandb would min-max stretch float tensors
            logger.log_image(key=key, images=[im.to_uint8(x).numpy() for x in images], step=step)
        elif kind == "MLFlowLogger":
            logger.experiment.log_image(logger.run_id, im.to_uint8(im.grid(images)).numpy(), key=key, step=step)
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
# the life cycle every callback shares: configuration checked when fit starts, clean-up on every way out


def _positive(name: str, value, optional: bool = True):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _eager(module, forward: bool = True):
    """The module as it was before torch.compile, for the callbacks' own work: a compiled backward cannot run
    inside the methods' vmap (nor twice, with donated buffers), and a compiled submodule hides its layers under
    ``_orig_mod``. Lightning's compiled LightningModule gets its original forward back (``_compiler_ctx``), every
    compiled submodule is replaced by its original (``_orig_mod``: same layers, same parameters); both are put
    back afterwards. forward=False: the submodules only."""
    ctx = getattr(module, "_compiler_ctx", None)
    compiled_forward = vars(module).get("forward") if forward and isinstance(ctx, dict) and \
        "original_forward" in ctx else None
    swapped = [(parent, name, child) for parent in list(module.modules()) for name, child in parent._modules.items()
               if isinstance(getattr(child, "_orig_mod", None), torch.nn.Module)]
    try:
        if compiled_forward is not None:
            module.forward = ctx["original_forward"]
        for parent, name, child in swapped:
            parent._modules[name] = child._orig_mod
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child
        if compiled_forward is not None:
            module.forward = compiled_forward


@contextlib.contextmanager
def _callback_work(module):
    """Gradients on, inference mode off (validation runs under it), the global RNGs (CPU and the module's GPU) as
    they were afterwards: a check or a render does not change what training draws next. A compiled module is
    worked on through its original (``_eager``)."""
    p = next(module.parameters(), None)
    devices = [p.device] if p is not None and p.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad(), _eager(module):
        yield


class Lifecycle:
    """Checks the configuration at fit start (``check``, errors re-raised as one clear ValueError naming the
    callback) and releases what the callback holds (``cleanup``) in ``on_exception`` and ``teardown``."""

    #: what to try when the callback's work runs out of memory
    lower = "smaller sizes"

    def describe(self) -> str:
        return type(self).__name__

    def out_of_memory(self, e: BaseException) -> torch.OutOfMemoryError:
        """An out-of-memory error of the callback's work, still a torch.OutOfMemoryError, saying which callback and
        what to try."""
        return torch.OutOfMemoryError(f"{self.describe()}: out of memory, try {self.lower} ({_first_line(e)})")

    def check(self, trainer, pl_module) -> None:
        """Raise on a configuration that cannot work with this model; called before the first training step."""

    def cleanup(self) -> None:
        """Remove whatever the callback attached to the model."""

    def _checked(self, trainer, pl_module, check) -> None:
        try:
            with _callback_work(pl_module):
                check(trainer, pl_module)
        except LayerNotFoundError as e:
            raise LayerNotFoundError(f"{self.describe()}: {e}") from e
        except torch.OutOfMemoryError as e:
            raise self.out_of_memory(e) from e
        except (ValueError, TypeError, RuntimeError, NotImplementedError, IndexError, KeyError) as e:
            raise ValueError(f"{self.describe()}: {_first_line(e)}") from e

    def on_fit_start(self, trainer, pl_module):
        self._checked(trainer, pl_module, self.check)

    def on_exception(self, trainer, pl_module, exception):
        self.cleanup()

    def teardown(self, trainer, pl_module, stage):
        self.cleanup()


# ----------------------------------------------------------------------------------------------------------------
# scheduled callbacks


class Scheduled(Lifecycle):
    """Runs ``run(trainer, module)`` every_n_epochs (at the end of a training epoch), every_n_train_steps, and at
    fit end; on global rank zero only unless rank_zero_only=False (then every rank runs it: shard the work).

    A run at a global step that already had one (the fit end right after the last epoch's run, or both schedules
    on one step) is not repeated: the model is the same, so nothing is logged twice. ``trained_epoch`` is the
    epoch of the last training step seen (the label of what a run shows: after fit, ``current_epoch`` is one
    past it)."""

    def __init__(self, every_n_epochs: int | None = 1, every_n_train_steps: int | None = None,
                 on_fit_end: bool = True, rank_zero_only: bool = True):
        self.every_n_epochs = _positive("every_n_epochs", every_n_epochs)
        self.every_n_train_steps = _positive("every_n_train_steps", every_n_train_steps)
        self.run_on_fit_end, self.rank_zero_only = on_fit_end, rank_zero_only
        self.runs = 0
        self.last_step: int | None = None  # the global step of the last run
        self.trained_epoch: int | None = None

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}{self._key_extra()}"

    def _key_extra(self) -> str:
        return ""

    def epoch(self, trainer) -> int:
        """The epoch the model was last trained in (for a model not trained under this callback: the last
        completed one)."""
        return self.trained_epoch if self.trained_epoch is not None else max(trainer.current_epoch - 1, 0)

    def _go(self, trainer, pl_module, final: bool = False):
        if self.rank_zero_only and not trainer.is_global_zero:
            return
        if self.last_step is None or self.last_step != trainer.global_step:
            try:
                with _callback_work(pl_module):
                    self.run(trainer, pl_module)
            except torch.OutOfMemoryError as e:
                raise self.out_of_memory(e) from e
            self.last_step = trainer.global_step
            self.runs += 1
        if final:
            self.fit_ended(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trained_epoch = trainer.current_epoch
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._go(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._go(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if self.run_on_fit_end:
            self._go(trainer, pl_module, final=True)

    def run(self, trainer, pl_module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit_ended(self, trainer) -> None:
        """After the fit-end run (or its skip)."""


def _on(images: Tensor, module) -> Tensor:
    p = next(module.parameters(), None)
    return images.to(p.device) if p is not None else images


class OnImages(Scheduled):
    """A scheduled method on fixed sample images (any batch: see ``batch_input``); its configuration is checked
    at fit start by running it on the first image."""

    lower = "fewer images"

    def __init__(self, images, *, batch_input=None, **kw):
        super().__init__(**kw)
        self.images = find_input(images, batch_input, what="images")

    def check(self, trainer, pl_module):
        try:
            self.check_images(pl_module)
        except (IndexError, TypeError, KeyError, AttributeError) as e:
            self._check_forward(pl_module, e)
            raise

    def check_images(self, pl_module) -> None:
        """The method run on the first image."""
        self.pictures(pl_module, self.images[:1])

    def _check_forward(self, pl_module, error: BaseException) -> None:
        """After a failed check: whether the model takes the input tensor at all (one pass without gradients, in
        eval mode); a forward that wants the whole batch (a dict, ...) is told so in one line."""
        x = _on(self.images[:1], pl_module)
        try:
            with ModelGuard(pl_module, eval=True), torch.no_grad():
                pl_module(x)
        except Exception as e:  # noqa: BLE001 - whatever the forward raises on a tensor
            if type(e) is not type(error):
                return
            raise ValueError(f"the model's forward does not take the input tensor {tuple(x.shape)} that batch_input= "
                             f"picks out of a batch ({type(e).__name__}: {_first_line(e)}): lightning_vis calls the "
                             "model with that one tensor (its gradients and layer hooks need it), so a forward that "
                             "takes the whole batch (a dict) cannot be explained; make forward take that tensor "
                             "(and unpack the batch in training_step)") from error

    def run(self, trainer, pl_module):
        for tag, pictures in self.pictures(pl_module, self.images):
            log_images(trainer, tag, pictures, trainer.global_step)

    def pictures(self, pl_module, images: Tensor) -> list[tuple[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError


def _explicit(layers) -> set[str]:
    """The layer names given as plain names (not globs, types or modules)."""
    specs = layers if isinstance(layers, (list, tuple, set)) else [layers]
    return {s for s in specs if isinstance(s, str) and not any(c in s for c in "*?[")}


class ActivationMapsMixin(OnImages):
    """Per sample image and layer: the grid of every filter's activation map (a layer named explicitly must give
    maps; layers matched by a glob or type without maps, such as Linear ones, are left out)."""

    lower = "fewer images or layers"

    def __init__(self, images, layers, *, scale: str = "per_image", max_filters: int | None = 64, **kw):
        super().__init__(images, **kw)
        self.layers, self.scale, self.max_filters = layers, scale, max_filters

    def describe(self):
        return f"{type(self).__name__}({self.layers!r})"

    def check_images(self, pl_module):
        acts, _ = activations(pl_module, _on(self.images[:1], pl_module), self.layers)
        flat = [n for n in acts if not acts.has_maps(n) and n in _explicit(self.layers)]
        if flat:
            lay = acts.layouts.get(flat[0])
            why = lay.reason if lay is not None and not isinstance(lay, Layout) else "no maps to show"
            raise ValueError(f"layer {flat[0]!r} gives {tuple(acts[flat[0]].shape)} outputs: {why} (pick a conv or "
                             "token layer)")
        if not any(acts.has_maps(n) for n in acts):
            raise ValueError(f"none of the layers {sorted(acts)} gives maps to show")

    def pictures(self, pl_module, images):
        acts, _ = activations(pl_module, _on(images, pl_module), self.layers)
        return [(f"activations/{layer}",
                 _same_size([activation_grid(a, i, self.scale, max_filters=self.max_filters,
                                             layout=acts.layouts[layer]) for i in range(a.shape[0])]))
                for layer, a in acts.items() if acts.has_maps(layer)]


class DeconvnetMixin(OnImages):
    """Per sample image and layer: the image, then the deconvnet (or guided) reconstructions of its top_k features."""

    lower = "fewer images or a smaller top_k"

    def __init__(self, images, layers, *, top_k: int = 3, rule: str = "deconvnet", **kw):
        super().__init__(images, **kw)
        self.layers, self.top_k, self.rule = layers, _positive("top_k", top_k, optional=False), rule

    def describe(self):
        return f"{type(self).__name__}({self.layers!r}, rule={self.rule!r})"

    def pictures(self, pl_module, images):
        rec = deconvnet(pl_module, _on(images, pl_module), self.layers, top_k=self.top_k, rule=self.rule)
        shown = im.to_display(images.cpu())
        return [(f"{self.rule}/{layer}",
                 _same_size([im.grid(torch.cat([shown[i:i + 1], im.signed_rgb(r[i].cpu())]), ncol=r.shape[1] + 1)
                             for i in range(r.shape[0])]))
                for layer, r in rec.images.items()]


def _occlusion(model, x, target, window=None, stride=None, **options):
    """lv.occlusion with a window of a quarter of each axis by default, refused beyond MAX_PLACEMENTS placements per
    image (the callback runs it every time it is scheduled); whatever else is wrong, occlusion itself refuses."""
    size = tuple(x.shape[2:])

    def per_axis(v):
        return (v,) * len(size) if isinstance(v, int) else tuple(v) if isinstance(v, (list, tuple)) else v

    w = per_axis(tuple(max(1, n // 4) for n in size) if window is None else window)
    s = per_axis(stride) if stride is not None else \
        tuple(max(1, v // 2) for v in w) if isinstance(w, tuple) and all(isinstance(v, int) for v in w) else None
    if isinstance(w, tuple) and isinstance(s, tuple) and len(w) == len(s) == len(size) and \
            all(isinstance(v, int) and v >= 1 for v in w + s):
        count = math.prod(-(-max(n - a, 0) // b) + 1 for n, a, b in zip(size, w, s))
        if count > MAX_PLACEMENTS:
            raise ValueError(f"occlusion with window {w} and stride {s} on {size} inputs takes {count} forward passes "
                             f"per image; the Attribution callback runs at most {MAX_PLACEMENTS}: give a larger "
                             "window or stride in options=")
    return occlusion(model, x, target, window=w, stride=s, **options)


MAX_PLACEMENTS = 256
# method (as the CLI spells it) -> (function(model, inputs, target, **options), takes layer=)
ATTRIBUTION_METHODS = {
    **{m: (lambda model, x, target, method=m, **o: grad_cam(model, x, target=target, method=method, **o), True)
       for m in CAM_METHODS},
    "saliency": (lambda model, x, target, **o: saliency(model, x, target, **o), False),
    "smoothgrad": (lambda model, x, target, samples=16, **o: saliency(model, x, target, samples=samples, **o), False),
    "guided-backprop": (guided_backprop, False),
    "deconvnet": (lambda model, x, target: EXPLAIN["deconvnet"](model, x, target, None, 0)[0], False),
    "integrated-gradients": (integrated_gradients, True),
    "gradient-shap": (gradient_shap, True),
    "input-x-gradient": (input_x_gradient, True),
    "occlusion": (_occlusion, False),
    "lrp": (lrp, False),
    "fullgrad": (fullgrad, False),
}


class AttributionMixin(OnImages):
    """Per sample image: the map of one attribution method overlaid on it, of the target (default: each image's top
    class). method, as the CLI spells it: a CAM method of lightning_vis.grad_cam (layer: its layer, None: grad_cam's
    default), "saliency" or "smoothgrad", "guided-backprop", "deconvnet", "integrated-gradients",
    "gradient-shap", "input-x-gradient" (layer: the layer variant), "occlusion" (window default: a quarter of each
    axis; at most MAX_PLACEMENTS windows per image), "lrp" or "fullgrad". options: keyword arguments of the method
    (e.g. {"steps": 32}, {"composite": "epsilon-gamma-box", "low": -2, "high": 2}, {"window": 8}). A method that
    does not apply to the model is refused at fit start in one line. Maps of the input's shape are shown as each
    position's largest magnitude over the channels (as lightning_vis' results show themselves)."""

    def __init__(self, images, layer: str | None = None, *, method: str = "gradcam", target=None,
                 options: dict | None = None, **kw):
        super().__init__(images, **kw)
        if method not in ATTRIBUTION_METHODS:
            raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(ATTRIBUTION_METHODS)}")
        if layer is not None and not ATTRIBUTION_METHODS[method][1]:
            raise ValueError(f"method {method!r} takes no layer (it explains the input); give layer=None, or a CAM "
                             "method, integrated-gradients, gradient-shap or input-x-gradient for a layer")
        if not isinstance(options or {}, dict) or "layer" in (options or {}):
            raise ValueError(f"options must be a dict of {method}'s keyword arguments (the layer goes in layer=), "
                             f"got {options!r}")
        self.layer, self.method, self.target, self.options = layer, method, target, dict(options or {})

    def describe(self):
        return f"{type(self).__name__}({self.layer!r}, method={self.method!r})"

    def _key_extra(self):
        return f"[{self.layer},{self.method}]"

    def heat(self, pl_module, images: Tensor) -> Tensor:
        """(N, *grid) the maps drawn: the method's result as it shows itself (``_heat``)."""
        layer = {"layer": self.layer} if self.layer is not None else {}
        fn = ATTRIBUTION_METHODS[self.method][0]  # looked up here: a callback holding a lambda would not pickle
        result = fn(pl_module, _on(images, pl_module), self.target, **layer, **self.options)
        return result._heat() if hasattr(result, "_heat") else result.abs().amax(1)  # deconvnet: input gradients

    def pictures(self, pl_module, images):
        tag = self.method if self.layer is None else f"{self.method}/{self.layer}"
        return [(tag, overlays(self.heat(pl_module, images).cpu(), images.cpu()))]


class FeatureVisualizationMixin(Scheduled):
    """Renders channels of a layer on schedule, logs the grid, and keeps one render per trained epoch (the latest):
    at fit end each channel's evolution across epochs is written as a strip (PNG) and a GIF, and logged ("the
    vision sharpens"). The history, labelled with the epoch each render shows, is saved in checkpoints: a run
    resumed from one goes on with it. At fit start one render step of the highest channel checks the layer, the
    channel range and that the model takes ``image_channels``-channel images of this size.

    projections=True (default): Zeiler & Fergus's Figure 4 too. Every validation epoch of the fit, from the batches
    the trainer runs (no extra pass; the input found by ``batch_input``, the dataset index as DatasetExamples finds
    it), each channel's strongest validation example is kept, and its strongest activation projected alone
    (deconvnet(positions="max"), `rule` "deconvnet" or "guided"): a second row of each evolution strip, one tile per
    epoch (blank for an epoch without validation). ``strongest`` holds the last epoch's (epoch, dataset indices,
    projections); ``projection_history`` the tiles."""

    lower = "fewer channels, a smaller size, or a smaller chunk_size in render_kwargs"

    def __init__(self, layer: str, channels, *, size=64, steps: int = 64, seed: int = 0, image_channels: int = 3,
                 preprocess=None, render_kwargs: dict | None = None, projections: bool = True,
                 rule: str = "deconvnet", batch_input=None, **kw):
        super().__init__(**kw)
        self.layer, self.channels = layer, list(channels)
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of channel indices >= 0, got {channels!r}")
        self.size, self.steps, self.seed = size, _positive("steps", steps, optional=False), seed
        self.image_channels = _positive("image_channels", image_channels, optional=False)
        self.preprocess, self.render_kwargs = preprocess, render_kwargs or {}
        self.history: list[tuple[int, Tensor]] = []  # (epoch, (n, C, H, W) renders)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.rule = rule
        self.projector = _StrongestProjections(self, batch_input) if projections else None
        self.strongest: tuple[int, Tensor, Tensor] | None = None  # (epoch, (n,) dataset indices, (n, *input))
        self.projection_history: list[tuple[int, Tensor]] = []  # (epoch, (n, 3, H, W) tiles)

    def describe(self):
        return f"{type(self).__name__}({self.layer!r}, channels {self.channels[0]}..{max(self.channels)})"

    def _key_extra(self):
        return f"[{self.layer}]"

    def _render(self, pl_module, units, steps, seed, image_channels=None):
        return render(pl_module, (self.layer, units), size=self.size, steps=steps, seed=seed,
                      channels=image_channels or self.image_channels, preprocess=self.preprocess, progress=False,
                      **self.render_kwargs).images

    def check(self, trainer, pl_module):
        try:
            self._render(pl_module, [max(self.channels)], 1, self.seed)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            other = 1 if self.image_channels != 1 else 3
            try:
                self._render(pl_module, [max(self.channels)], 1, self.seed, other)
                hint = f": it takes {other}-channel images, so pass image_channels={other}"
            except Exception:  # noqa: BLE001 - only a hint
                hint = ""
            raise ValueError(f"the model does not take {self.image_channels}-channel renders of size {self.size} "
                             f"({_first_line(e)}){hint}") from e

    def run(self, trainer, pl_module):
        """On rank zero, all channels in one batched render; or, with rank_zero_only=False under DDP, sharded:
        rank r renders channels r, r + world, ... and rank zero gathers them."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        mine = list(range(rank, len(self.channels), world)) if not self.rank_zero_only else \
            list(range(len(self.channels)))
        imgs = self._render(pl_module, [self.channels[i] for i in mine], self.steps, self.seed + rank) \
            if mine else None
        if not self.rank_zero_only and world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, (mine, imgs))
            if rank != 0:
                return
            by_pos = {i: img for pos, part in gathered if part is not None for i, img in zip(pos, part)}
            imgs = torch.stack([by_pos[i] for i in range(len(self.channels))])
        if imgs.dim() == 5:  # clips: the middle frame
            imgs = imgs[:, :, imgs.shape[2] // 2]
        epoch = self.epoch(trainer)
        if self.history and self.history[-1][0] == epoch:
            self.history[-1] = (epoch, imgs)  # a later render of the same epoch replaces it
        else:
            self.history.append((epoch, imgs))
        log_images(trainer, f"feature_viz/{self.layer}", imgs.expand(-1, 3, -1, -1), trainer.global_step)

    def fit_ended(self, trainer):
        if trainer.is_global_zero:
            self.write_evolution(trainer)

    def add_projections(self, epoch: int, indices: Tensor, projections: Tensor) -> None:
        """Records one validation epoch's strongest examples and their projections (n, C, *input); the tiles (the
        middle frame of a clip, images.signed_rgb) at the renders' size."""
        self.strongest = (epoch, indices, projections)
        if projections.dim() == 5:
            projections = projections[:, :, projections.shape[2] // 2]
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)[-2:]
        tiles = F.interpolate(im.signed_rgb(projections), size=size, mode="bilinear", align_corners=False)
        self.projection_history = [h for h in self.projection_history if h[0] != epoch] + [(epoch, tiles)]

    def write_evolution(self, trainer) -> list[Path]:
        """Per channel: renders across epochs as a strip PNG (with projections: a second row, the strongest
        activation's projection of the same epochs) and a GIF (renders) under the log dir; all strips logged."""
        if not self.history:
            return []
        folder = out_dir(trainer) / "evolution" / self.layer
        stack = torch.stack([h[1] for h in self.history], 1).expand(-1, -1, 3, -1, -1)  # (n, epochs, 3, H, W)
        rows = stack
        if self.projector is not None:
            tiles, size = dict(self.projection_history), tuple(stack.shape[-2:])
            row = torch.stack([F.interpolate(tiles[e].float(), size=size, mode="bilinear", align_corners=False)
                               if e in tiles else torch.ones_like(stack[:, 0]) for e, _ in self.history], 1)
            rows = torch.cat([stack, row], 1)  # (n, 2 x epochs, 3, H, W): renders, then projections
        files = []
        for c, frames, strip in zip(self.channels, stack, rows):
            files.append(im.save_png(im.grid(strip, ncol=len(frames)), folder / f"channel{c}.png"))
            files.append(im.save_gif(frames, folder / f"channel{c}.gif", fps=2))
        log_images(trainer, f"evolution/{self.layer}", rows.flatten(0, 1), trainer.global_step)
        return files

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        if self.projector is not None:
            self.projector.on_fit_start(trainer, pl_module)

    def cleanup(self):
        if self.projector is not None:
            self.projector.cleanup()

    def state_dict(self):
        return {"history": [(e, t.clone()) for e, t in self.history], "runs": self.runs,
                "last_step": self.last_step, "trained_epoch": self.trained_epoch,
                "projection_history": [(e, t.clone()) for e, t in self.projection_history]}

    def load_state_dict(self, state):
        self.history = [(e, t) for e, t in state.get("history", [])]
        self.projection_history = [(e, t) for e, t in state.get("projection_history", [])]
        self.runs = state.get("runs", 0)
        self.last_step, self.trained_epoch = state.get("last_step"), state.get("trained_epoch")


def _to_projector(hook: str):
    """A FeatureVisualization hook that hands the validation loop's event to its projector (when it has one)."""
    def call(self, *args, **kwargs):
        if self.projector is not None:
            getattr(self.projector, hook)(*args, **kwargs)
    call.__name__ = hook
    return call


for _hook in ("setup", "on_train_start", "on_validation_start", "on_validation_epoch_start",
              "on_validation_batch_start", "on_validation_batch_end", "on_validation_epoch_end"):
    setattr(FeatureVisualizationMixin, _hook, _to_projector(_hook))
del _hook


# ----------------------------------------------------------------------------------------------------------------
# collected from the validation batches the trainer already runs


def _val_loader(trainer):
    loader = trainer.val_dataloaders
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader


def _sample_batch(loader):
    """A batch of the loader's first sample, built the way the loader builds its batches (its dataset and
    collate_fn, no worker started); None where that cannot be done cheaply (iterable datasets) or fails."""
    from torch.utils.data import IterableDataset

    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if dataset is None or collate is None or isinstance(dataset, IterableDataset):
        return None
    try:
        if len(dataset) == 0:
            return None
        with torch.random.fork_rng(devices=[]):
            sample = dataset[0]
            return collate([sample]) if getattr(loader, "_auto_collation", True) else collate(sample)
    except Exception:  # noqa: BLE001 - the user's dataset: the first real batch is checked instead
        return None


class _ValidationCollector(Lifecycle):
    """Hooks the layers for the validation epoch (not the sanity check), feeds each batch's input (found by
    ``batch_input``) to a collector. The layer names are checked at fit start, and where the input is in a
    validation batch before the first training step (on a batch made of the validation set's first sample), then
    again on every real batch; the hooks come off at the epoch's end, on an exception and at teardown. Compiled
    submodules run as their originals while the hooks are on (a compiled graph does not call hooks added after it
    was traced), and are put back with the hooks."""

    lower = "a smaller validation batch size or fewer layers"

    def __init__(self, layers, every_n_epochs: int = 1, batch_input=None):
        self.layers = layers
        self.every_n_epochs = _positive("every_n_epochs", every_n_epochs, optional=False)
        self.batch_input = batch_input
        self._collector = None
        self._originals = contextlib.ExitStack()  # compiled submodules swapped for their originals while hooked
        self._input_checked = False

    def describe(self):
        return f"{type(self).__name__}({self.layers!r})"

    def _active(self, trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def check(self, trainer, pl_module):
        resolve_layers(pl_module, self.layers)
        self.make_collector(pl_module)  # the collector's own arguments (k, score, ...)

    def _check_input(self, trainer, pl_module):
        if self._input_checked:
            return
        batch = _sample_batch(_val_loader(trainer))
        if batch is not None:
            self._checked(trainer, pl_module,
                          lambda t, m: find_input(batch, self.batch_input, what="a validation batch"))
            self._input_checked = True

    def setup(self, trainer, pl_module, stage):
        self._input_checked = False

    def on_train_start(self, trainer, pl_module):
        self._check_input(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn != "fit":  # trainer.validate(): no fit start
            self._checked(trainer, pl_module, self.check)
        if not trainer.sanity_checking:
            self._check_input(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self._active(trainer):
            self._originals.enter_context(_eager(pl_module, forward=False))
            self._collector = self.make_collector(pl_module).attach()
            try:
                self._order = _dataset_indices(_val_loader(trainer))
            except ValueError:
                self._order = None
            self._seen = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self._collector is not None and dataloader_idx == 0:
            x = find_input(batch, self.batch_input, what="the validation batch")
            self._collector.before(x)
            self._n = x.shape[0]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._collector is not None and dataloader_idx == 0:
            n = self._n
            idx = torch.tensor(self._order[self._seen:self._seen + n]) if self._order is not None \
                else torch.arange(self._seen, self._seen + n)
            self._collector.add(idx)
            self._seen += n

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._collector is None:
            return
        self._collector.detach()
        self._originals.close()
        try:
            self.finish(trainer, pl_module)
        except torch.OutOfMemoryError as e:
            raise self.out_of_memory(e) from e
        finally:
            self._collector = None

    def cleanup(self):
        if self._collector is not None:
            self._collector.detach()
            self._collector = None
        self._originals.close()


class DatasetExamplesMixin(_ValidationCollector):
    """The top-k validation inputs of every channel of the layers, collected from the validation batches the
    trainer runs (no extra pass), merged exactly across DDP ranks; ``result`` (a lightning_vis.TopK) is saved
    under the log dir (topk.pt: {"epoch", "result": TopK.state_dict()}) and in checkpoints. projections=n: for the
    first n channels of each layer, Zeiler & Fergus's Figure 2 is logged too (``dataset_examples/<layer>``: a row
    per channel, each top-k example's crop beside its strongest activation projected alone with `rule`, from the
    validation dataset; TopK.projection_grid)."""

    def __init__(self, layers, *, k: int = 9, score: str = "max", every_n_epochs: int = 1, batch_input=None,
                 projections: int | None = None, rule: str = "deconvnet"):
        super().__init__(layers, every_n_epochs, batch_input)
        self.k, self.score = k, score
        self.projections, self.rule = _positive("projections", projections), rule
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
            if self.projections:
                dataset = _val_loader(trainer).dataset
                with _callback_work(pl_module):
                    for layer, entry in self.result.layers.items():
                        grid = self.result.projection_grid(dataset, layer, range(min(self.projections,
                                                                                     entry.scores.shape[0])),
                                                           pl_module, rule=self.rule, batch_input=self.batch_input)
                        log_images(trainer, f"dataset_examples/{layer}", grid[None], trainer.global_step)

    def state_dict(self):
        return {"result": self.result.state_dict() if self.result is not None else None}

    def load_state_dict(self, state):
        saved = state.get("result")
        self.result = TopK.from_state_dict(saved) if saved is not None else None


class _StrongestProjections(_ValidationCollector):
    """A FeatureVisualization callback's Figure 4 row: during each validation epoch of the fit, every channel's
    strongest example (the top 1 of a TopKCollector on the validation batches); at its end, each one's strongest
    activation projected alone (deconvnet(positions="max")), handed to the callback (on global rank zero; under DDP
    the ranks' top examples are merged first)."""

    def __init__(self, owner, batch_input):
        super().__init__(owner.layer, 1, batch_input)
        self.owner = owner

    def describe(self):
        return f"{self.owner.describe()} projections"

    def _active(self, trainer) -> bool:
        return not trainer.sanity_checking and trainer.state.fn == "fit"

    def check(self, trainer, pl_module):
        resolve_layers(pl_module, self.layers)

    def make_collector(self, pl_module):
        return TopKCollector(pl_module, self.layers, 1, "max")

    def finish(self, trainer, pl_module):
        entry = all_gather_merge(self._collector.result()).layers.get(self.layers)
        if not trainer.is_global_zero or entry is None:
            return
        channels = self.owner.channels
        if max(channels) >= entry.indices.shape[0]:
            raise ValueError(f"{self.describe()}: channel {max(channels)} out of range for {self.layers!r}, which "
                             f"has {entry.indices.shape[0]} channels")
        indices = entry.indices[channels, 0]
        dataset = _val_loader(trainer).dataset
        out = []
        with _callback_work(pl_module):
            for c, idx in zip(channels, indices.tolist()):
                x = find_input(dataset[idx], self.batch_input, what=f"dataset[{idx}]")[None]
                rec = deconvnet(pl_module, _on(x, pl_module), self.layers, features=[c], positions="max",
                                rule=self.owner.rule)
                out.append(rec.images[self.layers][0, 0].cpu())
        self.owner.add_projections(trainer.current_epoch, indices, torch.stack(out))


class FilterHealthMixin(_ValidationCollector):
    """Per layer, every validation epoch: the share of dead channels, noise-only and duplicate filters, the median
    active fraction, logged as scalars (activity merged across DDP ranks); ``report`` keeps the last one."""

    def __init__(self, layers, *, threshold: float = 0.0, every_n_epochs: int = 1, batch_input=None):
        super().__init__(layers, every_n_epochs, batch_input)
        self.threshold = threshold
        self.report = None

    @property
    def state_key(self):
        return f"FilterHealth[{self.layers}]"

    def make_collector(self, pl_module):
        return ActivityCollector(pl_module, self.layers, self.threshold)

    def finish(self, trainer, pl_module):
        col = self._collector
        col.all_gather()  # under DDP: every rank's activity, added in rank order
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
        `layers`; each part is left out when what it needs is not given. `images` may be any batch and
        `batch_input` says where the input is in it and in the validation batches (see find_input); renders
        have as many channels as `images` unless render_kwargs say otherwise (size, steps, seed, image_channels and
        preprocess set the FeatureVisualization part; any other key goes on to lv.render, e.g. transforms=).
        every_n_epochs applies to every part. Every hook is forwarded to every part (on_exception and teardown to
        all of them even when one fails)."""

        def __init__(self, images=None, layers=None, *, cam_layer: str | None = None,
                     viz_layer: str | None = None, channels=None, k: int = 9, every_n_epochs: int = 1,
                     render_kwargs: dict | None = None, batch_input=None):
            parts = []
            if images is not None:
                images = find_input(images, batch_input, what="images")
            if images is not None and layers is not None:
                parts += [classes["ActivationMaps"](images, layers, every_n_epochs=every_n_epochs),
                          classes["Deconvnet"](images, layers, every_n_epochs=every_n_epochs)]
            if images is not None and cam_layer is not None:
                parts.append(classes["Attribution"](images, cam_layer, every_n_epochs=every_n_epochs))
            if viz_layer is not None and channels is not None:
                extra = dict(render_kwargs or {})
                # the callback's own settings; everything else is passed on to lv.render (transforms=, ...)
                own = {k: extra.pop(k) for k in ("size", "steps", "seed", "image_channels", "preprocess")
                       if k in extra}
                if images is not None:
                    own.setdefault("image_channels", images.shape[1])
                parts.append(classes["FeatureVisualization"](viz_layer, channels, every_n_epochs=every_n_epochs,
                                                             render_kwargs=extra, batch_input=batch_input, **own))
            if layers is not None:
                parts += [classes["DatasetExamples"](layers, k=k, every_n_epochs=every_n_epochs,
                                                     batch_input=batch_input),
                          classes["FilterHealth"](layers, every_n_epochs=every_n_epochs, batch_input=batch_input)]
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

    def forward_all(hook):
        def call(self, *args, **kwargs):
            errors = []
            for p in self.parts:
                try:
                    getattr(p, hook)(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - every part cleans up; the first error is raised
                    errors.append(e)
            if errors:
                raise errors[0]
        return call

    hooks = [h for h in vars(base) if h.startswith("on_") and callable(getattr(base, h)) and
             h not in ("on_save_checkpoint", "on_load_checkpoint")] + ["setup"]
    for hook in hooks:
        setattr(Visualize, hook, forward(hook))
    for hook in ("on_exception", "teardown"):
        setattr(Visualize, hook, forward_all(hook))
    Visualize.__module__ = module
    classes["Visualize"] = Visualize
    return classes
