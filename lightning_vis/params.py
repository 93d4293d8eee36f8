"""Image parameterizations for feature visualization: the decorrelated Fourier image ("CDFS": colour-decorrelated,
frequency-scaled spectrum; Olah et al., Lucid) and plain pixels, for images (B, C, H, W) and clips (B, C, T, H, W).

``fft_image`` maps a real spectrum (B, C, *freq, 2) (the half spectrum of ``torch.fft.rfftn``, real and imaginary
parts last) to an image in [0, 1]: spectrum * scale -> inverse real FFT (orthonormal) / 4 -> colour decorrelation
(3 channels) -> sigmoid, by the compiled operator ``lightning_vis.ops.fft_image`` (its pure-torch reference where
the extension is missing). Differentiable; the FFT runs in float32 under mixed precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops

# Lucid's colour correlation: the square root of ImageNet's RGB covariance (SVD), columns normalised by the
# largest column norm.
LUCID_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def lucid_color_matrix() -> Tensor:
    return LUCID_COLOR_SQRT / LUCID_COLOR_SQRT.norm(dim=0).max()


def color_matrix_from(images: Tensor) -> Tensor:
    """A decorrelation matrix estimated from images (N, 3, ...) in [0, 1]: the square root of their RGB
    covariance, normalised as Lucid's."""
    if images.dim() < 3 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, ...), got shape {tuple(images.shape)}")
    flat = images.transpose(0, 1).flatten(1).double()
    cov = torch.cov(flat)
    vals, vecs = torch.linalg.eigh(cov)
    sqrt = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.t()
    return (sqrt / sqrt.norm(dim=0).max()).float()


def spectrum_shape(size) -> tuple[int, ...]:
    """The rfftn half-spectrum shape of a spatial size (H, W) or (T, H, W)."""
    return (*size[:-1], size[-1] // 2 + 1)


def frequency_scale(size, decay_power: float = 1.0) -> Tensor:
    """1 / max(|f|, 1 / max(size)) ** decay_power over the half spectrum: flattens the natural-image 1/f spectrum so
    that every frequency learns at a similar rate."""
    freqs = [torch.fft.fftfreq(n) for n in size[:-1]] + [torch.fft.rfftfreq(size[-1])]
    grid = torch.meshgrid(*freqs, indexing="ij")
    radius = torch.stack(grid).pow(2).sum(0).sqrt()
    return 1.0 / radius.clamp_min(1.0 / max(size)) ** decay_power


def fft_image(spectrum: Tensor, size, *, decay_power: float = 1.0, color: Tensor | None = None,
              decorrelate: bool = True, sigmoid: bool = True) -> Tensor:
    """The parameterization with its frequency scale and colour matrix (Lucid's by default), via ops.fft_image.

    spectrum: (B, C, *spectrum_shape(size), 2) real; size: (H, W) or (T, H, W); C 1 or 3 (decorrelation only for
    3). color: the 3x3 decorrelation matrix (default Lucid's). Returns (B, C, *size) in [0, 1] (sigmoid=False:
    the unsquashed image)."""
    size = tuple(size)
    nd = len(size)
    if spectrum.dim() != nd + 3 or spectrum.shape[-1] != 2 or tuple(spectrum.shape[2:-1]) != spectrum_shape(size):
        raise ValueError(f"spectrum must be (B, C, {', '.join(map(str, spectrum_shape(size)))}, 2) for size "
                         f"{size}, got {tuple(spectrum.shape)}")
    with torch.autocast(spectrum.device.type, enabled=False):
        real = spectrum if spectrum.dtype == torch.float64 else spectrum.float()  # fp32 at least, also under autocast
        scale = frequency_scale(size, decay_power)
        m = None
        if decorrelate and spectrum.shape[1] == 3:
            m = lucid_color_matrix() if color is None else color
        return ops.fft_image(real, size, scale=scale, color=m, sigmoid=sigmoid)


def fft_spectrum_from_image(image: Tensor, *, decay_power: float = 1.0, color: Tensor | None = None,
                            decorrelate: bool = True, eps: float = 1e-4) -> Tensor:
    """The spectrum whose fft_image is `image` (B, C, *size) in (0, 1): logit, inverse decorrelation, FFT,
    unscaled. Start a render from a given picture."""
    size = tuple(image.shape[2:])
    nd = len(size)
    img = torch.logit(image.float().clamp(eps, 1 - eps))
    if decorrelate and image.shape[1] == 3:
        m = (lucid_color_matrix() if color is None else color).to(img)
        img = torch.einsum("ij,bj...->bi...", torch.linalg.inv(m), img)
    spec = torch.fft.rfftn(img * 4, dim=tuple(range(-nd, 0)), norm="ortho")
    spec = spec / frequency_scale(size, decay_power).to(image.device)
    return torch.view_as_real(spec).contiguous()


class ImageParam(torch.nn.Module):
    """A batch of images to optimise: kind "fft" (decorrelated Fourier) or "pixel" (sigmoid of free pixels, or
    raw pixels clamped, as Øygard). ``forward()`` gives (B, C, *size) in [0, 1]. seed: one for the batch, or one
    per image (each image's start then depends on its own seed alone)."""

    def __init__(self, batch: int, channels: int, size, kind: str = "fft", *, sd: float = 0.01, seed: int | list = 0,
                 decay_power: float = 1.0, color: Tensor | None = None, image: Tensor | None = None,
                 device=None):
        super().__init__()
        if kind not in ("fft", "pixel"):
            raise ValueError(f"parameterization must be 'fft' or 'pixel', not {kind!r}")
        if channels not in (1, 3):
            raise ValueError(f"images have 1 or 3 channels, not {channels}")
        self.kind, self.size, self.decay_power = kind, tuple(size), decay_power
        self.register_buffer("color", lucid_color_matrix() if color is None else color.float(), persistent=False)
        seeds = [seed] if isinstance(seed, int) else list(seed)  # one for the batch, or one per image

        def randn(*shape):
            if len(seeds) == 1:
                return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seeds[0]))
            if len(seeds) != batch:
                raise ValueError(f"{len(seeds)} seeds for a batch of {batch}: give one, or one per image")
            return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(v)) for v in seeds])

        if kind == "fft":
            if image is not None:
                init = fft_spectrum_from_image(image.expand(batch, -1, *[-1] * len(self.size)),
                                               decay_power=decay_power, color=self.color)
            else:
                init = randn(channels, *spectrum_shape(self.size), 2) * sd
        else:
            if image is not None:
                init = torch.logit(image.float().clamp(1e-4, 1 - 1e-4)).expand(batch, -1, *self.size).clone()
            else:
                init = randn(channels, *self.size) * sd
        self.data = torch.nn.Parameter(init.to(device) if device is not None else init)

    def forward(self) -> Tensor:
        if self.kind == "fft":
            return fft_image(self.data, self.size, decay_power=self.decay_power, color=self.color)
        return torch.sigmoid(self.data)
