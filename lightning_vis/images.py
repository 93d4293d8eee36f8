"""Image utilities used by methods, callbacks and interfaces: normalisation, grids, colour maps, overlays, PNG.
Tensors are float images in [0, 1], channels first; no torch.nn logic here."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# Colour maps as evenly spaced anchor colours, linearly interpolated (viridis and magma from their published
# endpoints and quartiles; jet as the classic blue-cyan-yellow-red ramp).
_CMAPS = {
    "viridis": ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"],
    "magma": ["#000004", "#51127c", "#b73779", "#fc8961", "#fcfdbf"],
    "jet": ["#00007f", "#0000ff", "#00ffff", "#7fff7f", "#ffff00", "#ff0000", "#7f0000"],
    "gray": ["#000000", "#ffffff"],
}


def _anchors(name: str) -> Tensor:
    if name not in _CMAPS:
        raise ValueError(f"unknown colour map {name!r}; available: {', '.join(_CMAPS)}")
    return torch.tensor([[int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)] for h in _CMAPS[name]])


def normalize(x: Tensor, mode: str = "per_image", eps: float = 1e-8) -> Tensor:
    """Min-max scale to [0, 1]. x: (..., H, W). mode "per_image": every (H, W) map on its own scale (filters
    look alike, whatever their strength); "shared": one scale for all (filters can be compared)."""
    x = x.float()
    if mode == "shared":
        lo, hi = x.min(), x.max()
    elif mode == "per_image":
        flat = x.flatten(-2)
        lo, hi = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
    else:
        raise ValueError(f"mode must be 'per_image' or 'shared', not {mode!r}")
    return ((x - lo) / (hi - lo).clamp_min(eps)).clamp(0, 1)


def clip_percentile(x: Tensor, q: float = 0.99) -> Tensor:
    """Non-negative maps scaled to [0, 1] by their q-quantile, clipped: a few extreme pixels (typical of
    gradients) would otherwise leave everything else dark."""
    x = x.float()
    top = x.flatten().quantile(q) if x.numel() <= 1 << 24 else x.flatten()[::x.numel() // (1 << 24) + 1].quantile(q)
    return (x / top.clamp_min(1e-12)).clamp(0, 1)


def colormap(x: Tensor, name: str = "viridis") -> Tensor:
    """x: (..., H, W) in [0, 1] -> (..., 3, H, W) colours."""
    anchors = _anchors(name).to(x.device)
    pos = x.float().clamp(0, 1) * (len(anchors) - 1)
    i0 = pos.floor().long().clamp(max=len(anchors) - 2)
    t = (pos - i0)[..., None]
    rgb = anchors[i0] * (1 - t) + anchors[i0 + 1] * t  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def grid(images: Tensor, ncol: int | None = None, pad: int = 1, pad_value: float = 1.0) -> Tensor:
    """Tiles (N, H, W) or (N, C, H, W) images into one (C, H', W') image, row by row; ncol defaults to
    ceil(sqrt(N))."""
    if images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"grid takes (N, H, W) or (N, C, H, W) images with N > 0, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    # every tile padded on its top and left, the grid then padded on the bottom and right: one reshape, no loop
    tiles = torch.full((nrow * ncol, c, h + pad, w + pad), pad_value, dtype=images.dtype)
    tiles[:n, :, pad:, pad:] = images
    rows = tiles.view(nrow, ncol, c, h + pad, w + pad).permute(2, 0, 3, 1, 4).reshape(c, nrow * (h + pad),
                                                                                      ncol * (w + pad))
    out = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, dtype=images.dtype)
    out[:, :-pad or None, :-pad or None] = rows
    return out


def overlay(image: Tensor, heat: Tensor, alpha: float = 0.5, cmap: str = "jet", scale: bool = True) -> Tensor:
    """A heat map (h, w), of any size, resized to the image (3, H, W), min-max scaled (unless scale=False: heat
    already in [0, 1]), coloured and blended."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"overlay takes a (1|3, H, W) image, got shape {tuple(image.shape)}")
    if heat.dim() != 2:
        raise ValueError(f"overlay takes an (h, w) heat map, got shape {tuple(heat.shape)}")
    heat = F.interpolate(heat.float()[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    colour = colormap(normalize(heat) if scale else heat, cmap)
    return (1 - alpha) * image.float().expand(3, -1, -1).to(colour.device) + alpha * colour


def video_overlay(video: Tensor, heat: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """A clip (1|3, T, H, W) and its heat map (T', h, w) -> (T, 3, H, W) frames, the heat resized in time and
    space and scaled once for the whole clip (frames can be compared)."""
    if video.dim() != 4 or heat.dim() != 3:
        raise ValueError(f"video_overlay takes a (C, T, H, W) clip and a (T, h, w) map, got {tuple(video.shape)} "
                         f"and {tuple(heat.shape)}")
    heat = F.interpolate(heat.float()[None, None], size=video.shape[1:], mode="trilinear", align_corners=False)[0, 0]
    heat = normalize(heat.flatten(0, 1), "shared").view_as(heat)
    return torch.stack([overlay(video[:, t], heat[t], alpha, cmap, scale=False) for t in range(video.shape[1])])


def save_gif(frames: Tensor, path, fps: float = 8.0) -> Path:
    """Writes (T, 1|3, H, W) float frames in [0, 1] as a looping GIF; returns the path."""
    from PIL import Image

    if frames.dim() != 4 or frames.shape[0] == 0:
        raise ValueError(f"save_gif takes (T, C, H, W) frames with T > 0, got shape {tuple(frames.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pics = [Image.fromarray(to_uint8(f.expand(3, -1, -1)).numpy()) for f in frames]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=round(1000 / fps), loop=0)
    return path


def to_uint8(image: Tensor) -> Tensor:
    """(C, H, W) float in [0, 1] -> (H, W, C) uint8."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(0, -1).cpu()


def to_png(image: Tensor) -> bytes:
    """A (1|3, H, W) float image in [0, 1] as PNG bytes."""
    from PIL import Image

    arr = to_uint8(image).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Tensor, path) -> Path:
    """Writes a (1|3, H, W) float image in [0, 1] as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_png(image))
    return path


def bar_chart(values, title: str = "", bar_labels=None, x_labels=None, size=(480, 240)) -> Tensor:
    """A bar chart (matplotlib, lightning_vis.plots) as a (3, H, W) image of `size` (W, H) pixels: each bar's value
    next to it, labels under the bars (bar_labels; horizontal bars when there are many or long ones) or along the
    axis (x_labels: first, middle, last). All-zero values say so instead of drawing an empty panel."""
    from . import plots

    values = [float(v) for v in values]
    if not values:
        raise ValueError("bar_chart needs at least one value")
    w, h = size
    fig = plots.figure(w / 100, h / 100, dpi=100)
    plots.bar_chart(values, bar_labels, title=title, fig=fig)
    if x_labels and not bar_labels:
        ax = fig.axes[0]
        n = len(values)
        ax.set_xticks([-0.5, (n - 1) / 2, n - 0.5][:len(x_labels)], list(x_labels)[:3], fontsize=8)
    return plots.to_image(fig)


def signed_rgb(r: Tensor, percentile: float = 0.995) -> Tensor:
    """(k, C, H, W) signed maps (reconstructions, gradients) -> displayable images: each centred at grey and scaled
    by a high percentile of its magnitude (a few extreme pixels would otherwise leave the rest grey), clipped to
    [0, 1]; one channel shown grey, more than three cut to three."""
    r = r.float()
    scale = r.flatten(1).abs().quantile(percentile, dim=1).clamp_min(1e-12)[:, None, None, None]
    out = (0.5 + 0.5 * r / scale).clamp(0, 1)
    return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out[:, :3]


def to_display(images: Tensor) -> Tensor:
    """(N, C, H, W) model inputs (any range) -> (N, 3, H, W) in [0, 1]: each image min-max scaled as a whole."""
    x = images.float()
    flat = x.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
