"""Results that show themselves: in a notebook (``_repr_png_``, and ``_repr_html_`` where a table helps), on screen
(``.show()``, matplotlib) and on disk (``.save(path)``, PNG).

One mixin, :class:`Shows`: a result class adds it and one method, ``_picture(**options)``, which draws the default
picture as a (3, H, W) float image in [0, 1] with the images module (overlays, colour maps, grids) or a matplotlib
figure (lightning_vis.plots). ``show`` and ``save`` take the same options (e.g. ``images=`` for the inputs a map is
overlaid on). Layer "images": no torch.nn logic here, and nothing imports matplotlib until a picture needs it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import images as im

SUFFIXES = (".png",)
STRIP = 8  # rows a 1D map (N, L) is shown with


class NoPicture(ValueError):
    """The result has nothing to draw (a vector layer's attributions, an evaluation without curves); notebooks show
    its text instead."""


class Shows:
    """Adds ``_repr_png_``, ``show()`` and ``save(path)`` to a result class that defines ``_picture(**options)``
    -> (3, H, W) image in [0, 1]."""

    def _picture(self, **options) -> Tensor:  # pragma: no cover - every result class defines it
        raise NotImplementedError

    def _repr_png_(self) -> bytes | None:
        """The default picture as PNG bytes (Jupyter shows it); None where there is nothing to draw."""
        try:
            return im.to_png(self._picture())
        except NoPicture:
            return None

    def show(self, **options):
        """Shows the picture with matplotlib (pyplot, at one screen pixel per image pixel); returns the Figure."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("show() needs matplotlib (pip install matplotlib); save(path) writes the PNG without "
                              "it") from None
        picture = self._picture(**options)
        h, w = picture.shape[-2:]
        fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(im.to_uint8(picture).numpy())
        ax.set_axis_off()
        plt.show()
        return fig

    def save(self, path, **options) -> Path:
        """Writes the picture as a PNG file (path must end in .png); returns the path."""
        suffix = Path(path).suffix.lower()
        if suffix not in SUFFIXES:
            raise ValueError(f"save writes PNG pictures: give a path ending in .png, not {str(path)!r}")
        return im.save_png(self._picture(**options), path)


def html_table(rows: list[list[str]], picture: Tensor | None = None) -> str:
    """An HTML table (the first row its header; cells escaped), with the picture below it inlined as a PNG."""
    head, *body = rows
    cells = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    img = "" if picture is None else \
        f'<img src="data:image/png;base64,{base64.b64encode(im.to_png(picture)).decode()}">'
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{lines}</tbody></table>{img}"


def frames(x: Tensor, spatial: int) -> Tensor:
    """The last `spatial` axes of x as a 2D picture: 2D as they are, 3D (T, H, W) their middle frame, 1D (L) a strip
    of STRIP rows."""
    if spatial == 3:
        return x[..., x.shape[-3] // 2, :, :]
    if spatial == 1:
        return x[..., None, :].expand(*x.shape[:-1], STRIP, x.shape[-1])
    if spatial != 2:
        raise NoPicture(f"no picture of {spatial}-D maps (1D, 2D and 3D maps are drawn)")
    return x


def overlays(heat: Tensor, images: Tensor | None = None) -> Tensor:
    """(N, *grid) maps -> (N, 3, H, W) pictures: each map overlaid on its image (images: (N, C, *grid) model inputs,
    any range, shown min-max scaled; a 2D map of another size is resized to its image) or, without images, min-max
    scaled in the viridis colour map. 3D maps: their middle frame; 1D: a strip."""
    spatial = heat.dim() - 1
    if images is not None and (not isinstance(images, Tensor) or images.dim() != heat.dim() + 1 or
                               images.shape[0] != heat.shape[0] or images.shape[2:] != heat.shape[1:] and spatial != 2):
        raise ValueError(f"images must be the ({heat.shape[0]}, C, *{tuple(heat.shape[1:])}) inputs the maps are of, "
                         f"got {tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    heat = frames(heat.detach().float().cpu(), spatial)
    if images is None:
        return im.colormap(im.normalize(heat), "viridis")
    shown = im.to_display(frames(images.detach().float().cpu(), spatial))
    return torch.stack([im.overlay(s, h) for s, h in zip(shown, heat)])


def heat_picture(heat: Tensor, images: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
    """(N, *grid) maps -> one grid image of their overlays (see overlays); extra: (N, 3, H, W) tiles shown beside
    each map (e.g. Guided Grad-CAM's guided maps)."""
    tiles = overlays(heat, images)
    if extra is not None:
        extra = F.interpolate(extra.float().cpu(), size=tiles.shape[-2:], mode="nearest")
        return im.grid(torch.stack([tiles, extra], 1).flatten(0, 1), ncol=2)
    return im.grid(tiles)


def stack(pictures: list[Tensor]) -> Tensor:
    """(3, h, w) pictures of different sizes one below the other on white, left-aligned."""
    h = sum(p.shape[-2] for p in pictures) + len(pictures) - 1
    w = max(p.shape[-1] for p in pictures)
    out = torch.ones(3, h, w)
    y = 0
    for p in pictures:
        out[:, y:y + p.shape[-2], :p.shape[-1]] = p.expand(3, -1, -1)
        y += p.shape[-2] + 1
    return out

