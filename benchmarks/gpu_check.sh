#!/usr/bin/env bash
# One call on a GPU machine (the device tool's H100): build the extension for sm_90 against the torch found
# there, run the CUDA tests (pooling, fft_image), the CUDA kernel and methods benchmarks, and leave the logs and
# JSON in $OUT (or ./out).
#   device run: bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LIGHTNING_VIS_CUDA=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$out/build.log" || exit 1
python3 -c "import lightning_vis.ops as O; print(O.build_info())" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_pool_cuda.py tests/test_fft_image.py tests/test_pool.py \
  tests/test_pool_registration.py \
  2>&1 | tee "$out/tests.log" | tail -15
python3 -m benchmarks.kernels --device all --json "$out/kernels-gpu.json" 2>&1 | tee "$out/bench.log" | tail -45
# methods against their peers (captum, pytorch-grad-cam, torch-lucent: carry their wheels, else ours-only rows)
python3 -m benchmarks.methods --device cuda --json "$out/methods-gpu.json" 2>&1 | tee "$out/methods.log" | tail -30
