"""impute: ROAD's linear imputer as a compiled operator (operator 4, CPU).

    out = images, with every pixel where ``known`` is False replaced by the weighted mean of its 8 neighbours
    (1/6 across, 1/12 diagonal, neighbours outside the image left out)

images (B, C, H, W), known (B, H, W) bool: one sparse symmetric positive definite system per image (the same for
every channel), solved to a relative residual of ``tol`` by conjugate gradients preconditioned with a multigrid
V-cycle. The compiled kernel (float32 on a CPU: each image's solve in fused, vectorised loops, images over threads)
and the pure-torch reference (:func:`lightning_vis.ops.reference.impute`: every other device and dtype, all systems
of a batch at once) run the same algorithm. pytorch-grad-cam's NoisyLinearImputer solves the same system with
SciPy's sparse LU (without its noise: the same values).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _loader, reference

__all__ = ["impute"]

# bytes of images the pure-torch solver solves at once on a CPU, its state in the caches (MobileNetV2's ROAD at 224 px
# on one thread: 20 images in solves of 4 took 3.9 s, all at once 6.7 s); the kernel solves each image on its own,
# the images over threads, and a GPU all of them together
REFERENCE_CPU_BYTES = 2 << 20


def impute(images: Tensor, known: Tensor, tol: float = 1e-5, max_iter: int = 1000) -> Tensor:
    """See the module docstring. Every image must keep at least one pixel (the caller checks)."""
    known = known.bool()
    if images.device.type == "cpu" and images.dtype == torch.float32 and _loader.has_backend("cpu"):
        return torch.ops.lightning_vis.impute(images, known, float(tol), int(max_iter))
    step = max(1, REFERENCE_CPU_BYTES // max(1, images[0].numel() * images.element_size())) \
        if images.device.type == "cpu" and len(images) else len(images)
    if step >= len(images):
        return reference.impute(images, known, tol, max_iter)
    return torch.cat([reference.impute(images[i:i + step], known[i:i + step], tol, max_iter)
                      for i in range(0, len(images), step)])


def _register() -> None:
    @torch.library.register_fake("lightning_vis::impute")
    def _(images, known, tol, max_iter):
        torch._check(images.dim() == 4 and tuple(known.shape) == (images.shape[0], *images.shape[2:]),
                     lambda: f"impute: images (B, C, H, W) and known (B, H, W), got {list(images.shape)} and "
                             f"{list(known.shape)}")
        return torch.empty_like(images, memory_format=torch.contiguous_format)


if _loader._C is not None:
    _register()
