"""Layer 1: the Python face of the compiled kernels (torch.ops.lightning_vis.*), with their pure-torch
references in :mod:`lightning_vis.ops.reference`."""

from . import reference
from ._loader import backends, build_info, has_backend
from .fft import fft_image
from .impute import impute
from .pool import indices_to_switches, max_pool_with_switches, switch_dtype, switches_to_indices, unpool

__all__ = [
    "backends",
    "build_info",
    "fft_image",
    "has_backend",
    "impute",
    "indices_to_switches",
    "max_pool_with_switches",
    "reference",
    "switch_dtype",
    "switches_to_indices",
    "unpool",
]
