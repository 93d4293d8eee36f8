"""Builds and loads the CUDA-semantics simulator (csrc/sim/cuda_sim.cpp), a test-only extension that runs the CUDA
kernels' own bodies on the CPU. It is never part of lightning_vis._C: torch's JIT extension loader compiles it with
the host compiler into build/<name>/ the first time (about two minutes on two cores), then only when a source changes.

The fp16 / bf16 conversions come from the CUDA toolkit's cuda_fp16.h / cuda_bf16.h (host code); where there is none,
from csrc/cuda/fp16_host_shim.h, so that the simulator also runs on a machine without CUDA. Environment:
  LIGHTNING_VIS_SIM_HEADERS=cuda|shim   force either (default: the toolkit's when found)
  LIGHTNING_VIS_SIM_ASAN=1              build with AddressSanitizer (libasan must be preloaded; .ci/run does)
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def cuda_include() -> Path | None:
    """The include folder of a CUDA toolkit whose cuda_fp16.h compiles in host code, or None: torch's choice of
    CUDA_HOME first, then the toolkit of torch's CUDA version, then any /usr/local/cuda-*."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [CUDA_HOME, f"/usr/local/cuda-{torch.version.cuda}" if torch.version.cuda else None]
    for c in candidates + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        include = Path(c or "/nonexistent") / "include"
        if all((include / f).exists() for f in ("cuda_fp16.h", "cuda_bf16.h", "crt/host_defines.h")):
            return include
    return None


def load():
    """The simulator module (its operators are torch.ops.lightning_vis_sim.*)."""
    from torch.utils.cpp_extension import load as load_extension

    headers = os.environ.get("LIGHTNING_VIS_SIM_HEADERS", "")
    if headers not in ("", "cuda", "shim"):
        raise ValueError(f"LIGHTNING_VIS_SIM_HEADERS must be 'cuda' or 'shim', got {headers!r}")
    include = cuda_include() if headers != "shim" else None
    if headers == "cuda" and include is None:
        raise RuntimeError("LIGHTNING_VIS_SIM_HEADERS=cuda but no CUDA toolkit with cuda_fp16.h was found "
                           "(set CUDA_HOME)")
    asan = os.environ.get("LIGHTNING_VIS_SIM_ASAN") == "1"
    cflags = ["-O2", "-DLV_CUDA_SIM", "-Wno-unknown-pragmas"]
    ldflags = []
    name = "lightning_vis_cuda_sim"
    if include is not None:
        cflags += ["-DLV_SIM_CUDA_HEADERS", f"-isystem{include}"]
    else:
        name += "_shim"
    if asan:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
        name += "_asan"
    build = ROOT / "build" / name
    build.mkdir(parents=True, exist_ok=True)
    sources = [CSRC / "sim" / "cuda_sim.cpp", CSRC / "pool_common.cpp", CSRC / "fft_image_common.cpp"]
    return load_extension(name, [str(s) for s in sources], extra_cflags=cflags, extra_ldflags=ldflags,
                          extra_include_paths=[str(CSRC)], build_directory=str(build), verbose=False)
