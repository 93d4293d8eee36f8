"""fft_image: the batched FFT image parameterization as a compiled operator (operator 3).

    out = sigmoid(color @ irfftn(view_as_complex(spectrum) * scale, size, norm="ortho") / 4)

spectrum (B, C, *freq, 2) real (C 1 or 3; freq = size[:-1] + (size[-1] // 2 + 1,)), scale (*freq), color a 3x3
matrix or None; size (H, W) or (T, H, W). The FFTs are ATen's (pocketfft on CPU, cuFFT on GPU); the scaling,
the colour mixing and the sigmoid are fused around them, forward and backward (the exact adjoint of the onesided
inverse FFT). float32 and float64; under autocast the spectrum stays float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _loader, reference

__all__ = ["fft_image"]


def fft_image(spectrum: Tensor, size, *, scale: Tensor, color: Tensor | None = None, sigmoid: bool = True) -> Tensor:
    """See the module docstring. Uses the compiled operator where the extension has the device's backend, else
    the pure-torch reference (same values, same gradients)."""
    size = [int(v) for v in size]
    if spectrum.dtype not in (torch.float32, torch.float64):
        spectrum = spectrum.float()
    scale = scale.to(spectrum.device, spectrum.dtype)
    col = color.to(spectrum.device, spectrum.dtype) if color is not None else spectrum.new_empty(0)
    if _loader.has_backend(spectrum.device.type):
        return torch.ops.lightning_vis.fft_image(spectrum, scale, col, size, sigmoid)
    return reference.fft_image(spectrum, scale, col, size, sigmoid)


def _register() -> None:
    lib = "lightning_vis::"

    def freq_shape(size):
        return [*size[:-1], size[-1] // 2 + 1]

    @torch.library.register_fake(lib + "fft_image")
    def _(spectrum, scale, color, size, sigmoid):
        torch._check(list(spectrum.shape[2:-1]) == freq_shape(size),
                     lambda: f"fft_image: spectrum {list(spectrum.shape)} does not fit size {list(size)}")
        return spectrum.new_empty([spectrum.shape[0], spectrum.shape[1], *size])

    @torch.library.register_fake(lib + "fft_image_backward")
    def _(grad, out, scale, color, size, sigmoid):
        return out.new_empty([out.shape[0], out.shape[1], *freq_shape(size), 2])

    def setup(ctx, inputs, output):
        _, scale, color, size, sigmoid = inputs
        ctx.size, ctx.sigmoid = size, sigmoid
        ctx.save_for_backward(output, scale, color)

    def backward(ctx, grad):
        out, scale, color = ctx.saved_tensors
        g = torch.ops.lightning_vis.fft_image_backward(grad, out, scale, color, ctx.size, ctx.sigmoid)
        return g, None, None, None, None

    torch.library.register_autograd(lib + "fft_image", backward, setup_context=setup)


if _loader._C is not None:
    _register()
