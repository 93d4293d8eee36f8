"""Loads the compiled extension; says why when it cannot, and lets callers fall back to the reference."""

from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (torch before the extension: its symbols must be loaded first)

_C = None
load_error: BaseException | None = None
_backends: frozenset[str] = frozenset()  # read once: torch.compile traces has_backend, not a pybind call

if os.environ.get("LIGHTNING_VIS_NO_EXTENSION") == "1":
    load_error = RuntimeError("disabled by LIGHTNING_VIS_NO_EXTENSION=1")
else:
    try:
        from lightning_vis import _C  # noqa: F811  (registers torch.ops.lightning_vis.*)
    except Exception as e:  # ImportError, or OSError / undefined symbols from a build against another torch
        load_error = e
        warnings.warn(
            f"lightning_vis: the compiled extension lightning_vis._C could not be loaded ({type(e).__name__}: {e}). "
            "Falling back to the pure-torch reference kernels, which are correct but slower. Build it with "
            "`pip install --no-build-isolation -e .` (or `make build`) against the torch you run.",
            RuntimeWarning,
            stacklevel=2,
        )
if _C is not None:
    _backends = frozenset(_C.backends())


def backends() -> list[str]:
    """Backends of the compiled kernels available in this process: e.g. ['cpu', 'cuda'], or [] without them."""
    return sorted(_backends)


def has_backend(device_type: str) -> bool:
    return device_type in _backends


def build_info() -> str:
    if _C is None:
        return f"lightning_vis._C not loaded ({load_error}); using the pure-torch reference kernels"
    cuda = f", built with CUDA {_C.cuda_version}" if _C.cuda_version else ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
    return f"lightning_vis._C backends: {', '.join(_C.backends())}{cuda}; torch {torch.__version__}; {gpu}"
