"""Feature visualization by optimisation: render what a unit, channel, layer or class responds to, for many units
in one batched optimisation (one unit per batch element), and DeepDream.

    result = lv.render(model, ("features.28", range(16)), size=128, steps=128, seed=0)
    result.images            # (16, 3, 128, 128) in [0, 1]
    lv.render(model, lv.objectives.channel("layer3", 5) + 0.5 * lv.objectives.diversity("layer3"), batch=4)
    # (diversity is minus the renders' similarity: added, it pushes them apart)

Parameterizations (lightning_vis.params): decorrelated Fourier ("fft", Lucid's CDFS) or pixels with Øygard's
schedule (blur width and step size decreasing over the run). Transforms are differentiable and seeded, with
different randomness per batch element. The ReLU gradient fix (Lucid's redirected ReLU for the first steps, or
the seed's leaky-ReLU substitution) is scoped to the run with a TorchFunctionMode: nothing in the model changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import images as im
from ._util import model_device, progress_bar
from .display import Shows, frames
from .hooks import ModelGuard, resolve_layers
from .hooks.checkpoint import ungraded
from .hooks.layout import Layout, LayoutError, LayoutTracer, _first_tensor
from .inputs import image_first
from .objectives import Objective, channel, layer
from .params import ImageParam

# ----------------------------------------------------------------------------------------------------------------
# transforms (differentiable; per-element randomness from a seeded generator)


@dataclass
class Transforms:
    """pad (constant 0.5), then one affine resampling per element: jitter (pixels, both directions), scale
    (factors drawn from a list) and rotation (degrees drawn from a list); then an optional Gaussian blur.
    ``standard()``: Lucid's standard transforms."""

    pad: int = 0
    jitter: int = 0
    scales: Sequence[float] = (1.0,)
    angles: Sequence[float] = (0.0,)
    jitter_after: int = 0  # a second jitter after scaling and rotation (Lucid's final jitter 4)

    @classmethod
    def standard(cls) -> "Transforms":
        return cls(pad=12, jitter=8, scales=tuple(1 + (i - 5) / 50 for i in range(11)), angles=tuple(range(-10, 11)),
                   jitter_after=4)

    @classmethod
    def none(cls) -> "Transforms":
        return cls()

    def __call__(self, x: Tensor, gen: torch.Generator | Sequence[torch.Generator], blur: float = 0.0) -> Tensor:
        """gen: one generator for the batch, or one per element (each element's draws then depend on its own
        generator alone, whatever else is in the batch)."""
        if self.pad:  # the last two (spatial) dims: clips are not padded in time
            x = F.pad(x, [self.pad] * 4, value=0.5)
        b = x.shape[0]
        if self.jitter or self.jitter_after or len(self.scales) > 1 or len(self.angles) > 1 or self.scales[0] != 1 \
                or self.angles[0]:
            nd = x.dim() - 2
            h, w = x.shape[-2:]
            gens = [gen] if isinstance(gen, torch.Generator) else list(gen)
            if len(gens) not in (1, b):
                raise ValueError(f"{len(gens)} generators for a batch of {b}: give one, or one per element")
            per = b if len(gens) == 1 else 1
            draws = [self._draw(g, per) for g in gens]
            shift, scale, angle, after = (torch.cat(d) for d in zip(*draws))
            rad = angle * math.pi / 180
            cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
            # output pixel p samples input A (p + after) + shift: jitter, scale and rotate, then jitter again
            sx = 2 * shift[:, 1] / w + cos * 2 * after[:, 1] / w - sin * 2 * after[:, 0] / h
            sy = 2 * shift[:, 0] / h + sin * 2 * after[:, 1] / w + cos * 2 * after[:, 0] / h
            theta[:, 0, 2], theta[:, 1, 2] = sx, sy
            theta = theta.to(x)
            if nd == 2:
                grid = F.affine_grid(theta, list(x.shape), align_corners=False)
                x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
            else:  # clips: the same 2D transform for every frame of an element
                t = x.shape[2]
                frames = x.transpose(1, 2).flatten(0, 1)
                th = theta.repeat_interleave(t, 0)
                grid = F.affine_grid(th, list(frames.shape), align_corners=False)
                frames = F.grid_sample(frames, grid, padding_mode="reflection", align_corners=False)
                x = frames.view(b, t, *frames.shape[1:]).transpose(1, 2)
        if blur > 0:
            x = gaussian_blur(x, blur)
        return x

    def _draw(self, gen: torch.Generator, b: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """b elements' (shift, scale, angle, shift after) from one generator, in a fixed order."""
        shift = torch.randint(-self.jitter, self.jitter + 1, (b, 2), generator=gen).float() if self.jitter \
            else torch.zeros(b, 2)
        scale = torch.tensor(self.scales)[torch.randint(len(self.scales), (b,), generator=gen)]
        angle = torch.tensor(self.angles, dtype=torch.float)[torch.randint(len(self.angles), (b,), generator=gen)]
        after = torch.randint(-self.jitter_after, self.jitter_after + 1, (b, 2), generator=gen).float() \
            if self.jitter_after else torch.zeros(b, 2)
        return shift, scale, angle, after


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of the last two dims (reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-2:])
    y = F.pad(y, [radius, radius, radius, radius], mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# ReLU gradient fixes


class _RedirectedReLU(torch.autograd.Function):
    """Lucid's redirected ReLU (top: a clipped rectifier, clamp(x, 0, top)): where the gradient through it would
    be zero for a whole element, the gradient is passed where it pushes a unit below zero up."""

    @staticmethod
    def forward(ctx, x, inplace: bool = False, top=None):
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_min_(0) if top is None else x.clamp_(0, top)
        else:
            out = x.clamp_min(0) if top is None else x.clamp(0, top)
        ctx.top = top
        ctx.save_for_backward(out)  # out > 0 (and < top) exactly where the input is
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        alive = out > 0 if ctx.top is None else (out > 0) & (out < ctx.top)
        relu_grad = grad * alive
        redirected = grad * (alive | ((grad < 0) & (out <= 0)))
        dead = relu_grad.flatten(1).abs().amax(1) == 0
        return torch.where(dead.view(-1, *[1] * (out.dim() - 1)), redirected, relu_grad), None, None


class ReluFix(TorchFunctionMode):
    """mode "redirect": ReLUs (and clipped ones: ReLU6, hardtanh(x, 0, top)) use the redirected gradient;
    "leaky": their negative side becomes leaky_relu(0.01) (the seed's substitution); for the context only."""

    _FUNCS = {F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_}

    def __init__(self, mode: str):
        if mode not in ("redirect", "leaky"):
            raise ValueError(f"relu_fix must be 'redirect', 'leaky' or None, not {mode!r}")
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.relu6 or func is F.hardtanh) and isinstance(args[0], Tensor) and args[0].requires_grad:
            names = ("input", "min_val", "max_val", "inplace") if func is F.hardtanh else ("input", "inplace")
            b = {"min_val": 0.0, "max_val": 6.0, "inplace": False, **dict(zip(names, args)), **kwargs}
            if b["min_val"] == 0:  # a clipped rectifier (ReLU6): the fix below, the clip above
                x, top, inplace = b["input"], b["max_val"], bool(b["inplace"])
                if self.mode == "leaky":
                    low = F.leaky_relu(x, 0.01, inplace=inplace)
                    return low.clamp_max_(top) if inplace else low.clamp_max(top)
                return _RedirectedReLU.apply(x, inplace, top)
            return func(*args, **kwargs)
        if func in self._FUNCS and isinstance(args[0], Tensor) and args[0].requires_grad:
            x = args[0]
            inplace = bool(func in (torch.relu_, torch.Tensor.relu_) or kwargs.get("inplace") or
                           (len(args) > 1 and args[1] is True))
            if self.mode == "leaky":
                return F.leaky_relu(x, 0.01, inplace=inplace)
            return _RedirectedReLU.apply(x, inplace)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# render


@dataclass
class RenderResult(Shows):
    images: Tensor  # (N, C, *size) in [0, 1]
    losses: Tensor  # (steps, N) the objective per element per step (to maximise)
    settings: dict = field(default_factory=dict)  # JSON-serialisable

    def _picture(self) -> Tensor:
        """The renders in a grid (3D renders: their middle frame; one channel grey)."""
        x = frames(self.images.detach().float().cpu(), self.images.dim() - 2)
        return im.grid(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3])

    def final_scores(self) -> Tensor:
        return self.losses[-1]


class _Stop(Exception):
    pass


def _run_until(model, names, modules, x, needs_output, keep):
    """Forward until every needed layer has run (the rest of the network is skipped unless the output is needed);
    keep(name, output) -> what is recorded of each layer's first output."""
    acts = {}

    def hook_for(name):
        def hook(module, args, output):
            if name not in acts:
                out = _first_tensor(output)
                if out is None:
                    raise ValueError(f"layer {name!r} returned {type(output).__name__}, not a tensor: pick a layer "
                                     "that returns maps")
                acts[name] = keep(name, out)
            if not needs_output and len(acts) == len(names):
                raise _Stop
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    out = None
    try:
        out = model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in acts]
    if missing:
        raise ValueError(f"layers {missing} did not run in the forward pass")
    return acts, out


def _activations(model, names, modules, x, needs_output, layouts: dict[str, Layout]):
    """The objective's layers as (B, C, *grid) maps by their layouts (tokens on their grid, channels-last moved)."""
    def keep(name, out):
        if not torch.is_grad_enabled():
            raise ungraded("feature visualization", name)
        return layouts[name].to_maps(out)
    return _run_until(model, names, modules, x, needs_output, keep)


def _layouts(model, names, modules, x, needs_output=False, overrides=(None, None)) -> dict[str, Layout]:
    """The layouts of the objective's layers for inputs like x (hooks.layout), from a pass without gradients that
    stops, as the render's own passes do, once those layers ran (a head that takes one input size never runs)."""
    with ModelGuard(model, eval=True), torch.no_grad(), LayoutTracer(model, *overrides) as tracer:
        _run_until(model, names, modules, x.detach(), needs_output, lambda name, out: None)  # hooks after the tracer's
    return {n: tracer.layout(n) for n in names}


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) or (B, C, T, H, W) resized bilinearly in space to `size`."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.dim() == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    b, c, t = x.shape[:3]
    frames = F.interpolate(x.transpose(1, 2).flatten(0, 1), size=size, mode="bilinear", align_corners=False)
    return frames.view(b, t, c, *size).transpose(1, 2)


def _fit(model, names, modules, x, size, input_size, preprocess, needs_output, overrides):
    """(the spatial size fed to the model or None for "as transformed", the layers' layouts). The transformed input
    (padded and jittered: larger than `size`) is tried first; a model that refuses it (a ViT with a fixed input
    size) gets inputs resized to `size` (or input_size when given)."""
    def prepared(s):
        y = _resize(x, s) if s is not None else x
        return preprocess(y) if preprocess is not None else y

    if input_size is not None:
        return tuple(input_size), _layouts(model, names, modules, prepared(tuple(input_size)), needs_output,
                                           overrides)
    try:
        return None, _layouts(model, names, modules, prepared(None), needs_output, overrides)
    except LayoutError:
        raise
    except Exception as first:
        if tuple(x.shape[-2:]) == tuple(size[-2:]):
            raise
        try:
            return tuple(size[-2:]), _layouts(model, names, modules, prepared(tuple(size[-2:])), needs_output,
                                              overrides)
        except Exception:
            raise first from None  # what the model says about the transformed input (e.g. wrong channels)


@torch.enable_grad()  # optimised by gradient: also when called inside the caller's torch.no_grad()
def render(model: nn.Module, objective, *, size: int | Sequence[int] = 128, channels: int = 3, steps: int = 128,
           lr: float | None = None, param: str = "fft", transforms: Transforms | str = "standard",
           preprocess: Callable[[Tensor], Tensor] | None = None, batch: int | None = None, chunk_size: int = 32,
           seed: int | Sequence[int] = 0, relu_fix: str | None = "redirect", relu_fix_steps: int = 16,
           decay_power: float = 1.0,
           blur: tuple[float, float] = (1.0, 0.0), image: Tensor | None = None, device=None,
           input_size: Sequence[int] | None = None, layout=None, grid=None, progress: bool = True) -> RenderResult:
    """Optimise images to maximise `objective`: an Objective, or (layer, channels) to render those channels of
    the layer (one per batch element, in chunks of chunk_size).

    size: H (square), (H, W), or (T, H, W) for video nets (space-time renders). param "fft" (Adam, lr 0.05) or
    "pixel" (Adam, lr decaying from 0.05 to 0.005 with a Gaussian blur of width blur[0] -> blur[1] every step:
    Øygard's schedule). preprocess maps [0, 1] images to what the model expects (e.g. ImageNet normalisation).
    Layers are read through their layout (hooks.layout; layout= / grid= override it): channels-last maps and token
    layers put on their grid.
    input_size: the (H, W) the model is fed; by default the transformed images as they are (larger than `size`:
    padded), and, for a model that refuses them (a ViT or MaxViT with a fixed input size), resized back to `size`.
    The same arguments and seed give the same images. seed: one for the run, or one per image (its start and its
    transforms' randomness then depend on its own seed alone: the same image in any batch, e.g. the atlas's renders
    whatever the number of units rendered together). The model is restored afterwards."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(v) for v in size)
    if len(size) not in (2, 3):
        raise ValueError(f"size must be H, (H, W) or (T, H, W), got {size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if any(v < 1 for v in size):
        raise ValueError(f"size must be positive, got {size}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if input_size is not None:
        input_size = tuple(int(v) for v in ((input_size, input_size) if isinstance(input_size, int) else input_size))
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be (H, W) of positive integers, got {input_size}")
    if isinstance(transforms, str):
        if transforms not in ("standard", "none"):
            raise ValueError(f"transforms must be 'standard', 'none' or a Transforms, not {transforms!r}")
        transforms = Transforms.standard() if transforms == "standard" else Transforms.none()
    image_first(model, "render")
    device = device if device is not None else model_device(model)
    lr = lr if lr is not None else 0.05
    if isinstance(objective, tuple):
        layer_name, units = objective
        units = list(units) if not isinstance(units, int) else [units]
        if not units:
            raise ValueError(f"no channels to render for {layer_name!r}")
        jobs = [(channel(layer_name, units[i:i + chunk_size]), len(units[i:i + chunk_size]))
                for i in range(0, len(units), chunk_size)]
        desc = f"{layer_name}: {len(units)} channels"
    elif isinstance(objective, Objective):
        jobs = [(objective, batch or 1)]
        desc = objective.name
    else:
        raise ValueError("objective must be an Objective or (layer, channels)")
    per_image = not isinstance(seed, int)
    if per_image:
        seed = [int(v) for v in seed]
        if len(seed) != sum(n for _, n in jobs):
            raise ValueError(f"seed: {len(seed)} seeds for {sum(n for _, n in jobs)} images; give one seed, or one per "
                             "image")
    settings = dict(size=list(size), channels=channels, steps=steps, lr=lr, param=param, seed=seed,
                    relu_fix=relu_fix, relu_fix_steps=relu_fix_steps, decay_power=decay_power, blur=list(blur),
                    transforms=dict(pad=transforms.pad, jitter=transforms.jitter, jitter_after=transforms.jitter_after,
                                    scales=list(transforms.scales),
                                    angles=list(transforms.angles)), objective=desc, chunk_size=chunk_size)
    names = list(dict.fromkeys(n for job, _ in jobs for n in job.layers))
    modules = resolve_layers(model, names) if names else {}
    bar = progress_bar(progress, f"render {desc}", total=steps * len(jobs), unit="step")
    images, losses = [], []
    fit, layouts = input_size, None
    with ModelGuard(model, eval=True, freeze=True):
        for j, (obj, n) in enumerate(jobs):
            if per_image:
                first = sum(m for _, m in jobs[:j])
                job_seed = seed[first:first + n]
                gen = [torch.Generator().manual_seed(v) for v in job_seed]
            else:
                job_seed = seed + 1000003 * j
                gen = torch.Generator().manual_seed(job_seed)
            start = None if image is None else (image[None] if image.dim() == len(size) + 1 else image).to(device)
            img_param = ImageParam(n, channels, size, param, seed=job_seed, decay_power=decay_power,
                                   image=start, device=device)
            opt = torch.optim.Adam(img_param.parameters(), lr=lr)
            history = []
            for step in range(steps):
                frac = step / max(1, steps - 1)
                if param == "pixel":
                    for g in opt.param_groups:
                        g["lr"] = lr * (1 - frac) + lr * 0.1 * frac
                sigma = blur[0] * (1 - frac) + blur[1] * frac if param == "pixel" else 0.0
                opt.zero_grad(set_to_none=True)
                x = transforms(img_param(), gen, blur=sigma)
                if step == 0:  # the input size the model takes and the layers' layouts, for this batch size
                    fit, layouts = _fit(model, obj.layers, modules, x, size, fit, preprocess, obj.needs_output,
                                        (layout, grid))
                    settings["input_size"] = list(fit) if fit is not None else list(x.shape[-2:])
                if fit is not None:
                    x = _resize(x, fit)
                if preprocess is not None:
                    x = preprocess(x)
                fixed = relu_fix and (relu_fix == "leaky" or step < relu_fix_steps)
                with ReluFix(relu_fix) if fixed else contextlib.nullcontext():
                    acts, out = _activations(model, obj.layers, modules, x, obj.needs_output, layouts)
                    value = obj(acts, out)
                if value.shape != (n,):
                    raise ValueError(f"objective {obj.name} gave shape {tuple(value.shape)}, not one value per "
                                     f"batch element ({n},)")
                (-value.sum()).backward()
                opt.step()
                history.append(value.detach().cpu())
                bar.update(1)
            with torch.no_grad():
                images.append(img_param().detach().cpu())
            losses.append(torch.stack(history))
    bar.close()
    return RenderResult(torch.cat(images), torch.cat(losses, 1), settings)


@torch.enable_grad()
def deep_dream(model: nn.Module, image: Tensor, layer_name: str, *, octaves: int = 4, octave_scale: float = 1.4,
               steps: int = 20, lr: float = 0.02, tile: int | None = None, jitter: int = 16, seed: int = 0,
               preprocess: Callable[[Tensor], Tensor] | None = None, progress: bool = True) -> Tensor:
    """DeepDream (Mordvintsev et al.; Conveiro's octaves and tiling): gradient ascent on the image's pixels to
    amplify `layer_name`'s activations, from the smallest octave up, each octave keeping the detail it added.
    image: (C, H, W) or (1, C, H, W) in [0, 1]. tile: process the image in tiles of this size (shifted randomly
    every step) to bound memory on large images. Returns (C, H, W) in [0, 1]."""
    image_first(model, "deep_dream")
    if image.dim() == 4:
        image = image[0]
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    modules = resolve_layers(model, layer_name)
    (name,) = modules
    objective = layer(name)
    gen = torch.Generator().manual_seed(seed)
    p = next(model.parameters(), None)
    device = p.device if p is not None else image.device
    base = image.float().to(device)[None]
    shapes = [tuple(max(8, int(round(s / octave_scale ** o))) for s in base.shape[-2:])
              for o in reversed(range(octaves))]
    detail = torch.zeros_like(F.interpolate(base, size=shapes[0], mode="bilinear", align_corners=False))
    bar = progress_bar(progress, f"deep dream {name}", total=octaves * steps, unit="step")
    layouts: dict[tuple, dict] = {}  # per input shape (octaves and tiles change it)
    with ModelGuard(model, eval=True, freeze=True):
        for shape in shapes:
            scaled = F.interpolate(base, size=shape, mode="bilinear", align_corners=False)
            detail = F.interpolate(detail, size=shape, mode="bilinear", align_corners=False)
            for _ in range(steps):
                dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                img = (scaled + detail).roll((dy, dx), (-2, -1)).detach().requires_grad_(True)
                grad = torch.zeros_like(img)
                th = tile or max(shape)
                for y in range(0, shape[0], th):
                    for x in range(0, shape[1], th):
                        piece = img[..., y:y + th, x:x + th]
                        inp = preprocess(piece) if preprocess is not None else piece
                        key = tuple(inp.shape)  # layouts are decided once per tile shape
                        if key not in layouts:
                            layouts[key] = _layouts(model, [name], modules, inp)
                        acts, _ = _activations(model, [name], modules, inp, False, layouts[key])
                        (g,) = torch.autograd.grad(objective(acts).sum(), img)
                        grad += g
                grad = grad.roll((-dy, -dx), (-2, -1))
                detail = detail + lr * grad / grad.abs().mean().clamp_min(1e-8)
                detail = (scaled + detail).clamp(0, 1) - scaled
                bar.update(1)
    bar.close()
    return (F.interpolate(base, size=shapes[-1], mode="bilinear", align_corners=False) + detail).clamp(0, 1)[0].cpu()
