"""Build of lightning-vis and its compiled extension lightning_vis._C.

The C++ CPU kernels are always built. The CUDA kernels are built when torch is a CUDA build and an nvcc
whose major.minor matches torch.version.cuda is found (CUDA_HOME, PATH, /usr/local/cuda-<ver>,
/usr/local/cuda). Environment:
  LIGHTNING_VIS_CUDA=0/1   force the CUDA kernels off / on (on fails loudly if they cannot be built)
  TORCH_CUDA_ARCH_LIST     archs to build for; default: torch's own archs when a GPU is present, else 9.0
  MAX_JOBS                 parallel compile jobs (default: number of cores)
Install with `pip install --no-build-isolation -e .` so that the build sees the installed torch.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"lightning-vis build: {msg}", file=sys.stderr, flush=True)


try:
    import torch
except ImportError as e:  # pragma: no cover - explained, not handled
    raise SystemExit(
        "lightning-vis: torch must be installed before building (pip install torch), and the build must see it: "
        "use `pip install --no-build-isolation .`"
    ) from e


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    if torch.version.cuda:
        candidates.append(f"/usr/local/cuda-{torch.version.cuda}")
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:  # a toolkit root has nvcc and the runtime headers (PATH may hold only an nvcc shim)
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.exists(
                os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def decide_cuda():
    """(build_cuda, cuda_home, nvcc_version, reason)."""
    forced = os.environ.get("LIGHTNING_VIS_CUDA")
    if forced == "0":
        return False, None, None, "LIGHTNING_VIS_CUDA=0"
    problems = []
    cuda_home = find_cuda_home()
    ver = nvcc_version(cuda_home) if cuda_home else None
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if not cuda_home or not ver:
        problems.append("no nvcc found (set CUDA_HOME)")
    elif torch.version.cuda and ver != torch.version.cuda:
        problems.append(f"nvcc {ver} at {cuda_home} does not match torch's CUDA {torch.version.cuda}: "
                        "install the matching toolkit or torch build")
    if problems:
        if forced == "1":
            raise SystemExit("lightning-vis: LIGHTNING_VIS_CUDA=1 but the CUDA kernels cannot be built: "
                             + "; ".join(problems))
        return False, cuda_home, ver, "; ".join(problems)
    return True, cuda_home, ver, "LIGHTNING_VIS_CUDA=1" if forced == "1" else "torch is a CUDA build and nvcc matches"


def pip_cuda_include_dirs():
    """Headers of the nvidia-* pip packages torch depends on (cusparse.h and friends live only there)."""
    major = (torch.version.cuda or "").split(".")[0]
    dirs = []
    for base in sys.path:
        nv = os.path.join(base, "nvidia")
        if not os.path.isdir(nv):
            continue
        preferred = os.path.join(nv, f"cu{major}", "include")
        if major and os.path.isdir(preferred):
            dirs.append(preferred)
        dirs += [d for d in sorted(glob.glob(os.path.join(nv, "*", "include"))) if d != preferred]
        break
    return dirs


def default_arch_list():
    if torch.cuda.is_available():
        archs = sorted({a.split("_")[1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")}, key=int)
        if archs:
            return ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)
    return "9.0"


build_cuda, cuda_home, cuda_ver, reason = decide_cuda()
if build_cuda:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


class Build(BuildExtension):
    """Object files in a fixed folder per configuration (an editable install would use a fresh temp dir), unless
    --build-temp names one: ninja rebuilds only what changed. The backends built are also written to
    build/backends.txt."""

    def finalize_options(self):
        given = self.build_temp is not None  # --build-temp (e.g. .ci/run's instrumented build) wins
        super().finalize_options()
        if not given:
            self.build_temp = os.path.join(ROOT, "build", "temp-cuda" if build_cuda else "temp-cpu")

    def run(self):
        super().run()
        os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
        with open(os.path.join(ROOT, "build", "backends.txt"), "w") as f:
            f.write(summary + "\n")


sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
extra = {"cxx": ["-O3", "-fopenmp"]}
define_macros = []
include_dirs = [os.path.join(ROOT, "csrc")]
if build_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = ["-O3", "-lineinfo"]
    define_macros += [("LIGHTNING_VIS_WITH_CUDA", None), ("LIGHTNING_VIS_CUDA_VERSION", f'"{cuda_ver}"')]
    # After the toolkit's own headers (-idirafter): only what the toolkit lacks is taken from the pip packages.
    extra["cxx"] += [f"-idirafter{d}" for d in pip_cuda_include_dirs()]
    ext = CUDAExtension("lightning_vis._C", sources, extra_compile_args=extra, define_macros=define_macros,
                        include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    summary = (f"backends: cpu, cuda (nvcc {cuda_ver} at {cuda_home}, TORCH_CUDA_ARCH_LIST="
               f"{os.environ['TORCH_CUDA_ARCH_LIST']}; {reason})")
else:
    ext = CppExtension("lightning_vis._C", sources, extra_compile_args=extra, include_dirs=include_dirs,
                       extra_link_args=["-fopenmp"])
    summary = f"backends: cpu only (CUDA kernels not built: {reason})"
summary += f"; torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']}, {len(sources)} sources"
log(summary)

setup(
    packages=find_packages(include=["lightning_vis", "lightning_vis.*"]),
    package_data={"lightning_vis.explorer": ["page.html"]},
    ext_modules=[ext],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
