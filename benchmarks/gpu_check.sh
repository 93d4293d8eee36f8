#!/usr/bin/env bash
# Everything that needs a GPU, as ONE call on the device tool's H100 (a lend is 15 minutes of device time with the
# machine's start-up of ~1-2 minutes; give the call timeout_s=600 and keep the rest to rerun it once):
#   1. build the extension for sm_90 against the torch found there (MAX_JOBS = its cores; ~2-3 min on 16 cores)
#   2. the CUDA test suite: CUDA == CPU on fresh random geometries with a poisoned allocator, gradcheck, opcheck,
#      streams, the 64-bit index path, fft_image (tests/test_pool_cuda.py, tests/test_fft_image.py), and the CPU
#      pooling tests beside them (~1-2 min)
#   3. the kernel benchmark, CUDA rows (ANCHORS.md shapes, CUDA events, L2 flushed; ~1-2 min), with its goal lines
#   4. the methods benchmark against the peers, only if the time left allows (their wheels must be carried)
# Each step runs under `timeout` within GPU_CHECK_BUDGET_S (default 540 s for the whole script); the logs, the
# JSON and a one-screen summary are left in $OUT (or ./out). The tail of the output is the summary.
#   device run: bash benchmarks/gpu_check.sh            (timeout_s=600)
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LIGHTNING_VIS_CUDA=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
budget=${GPU_CHECK_BUDGET_S:-540}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

step() {  # step NAME MIN_SECONDS FUNCTION: runs FUNCTION with the time left, unless less than MIN_SECONDS is left
  local name=$1 min=$2 fn=$3
  local t0=$SECONDS rc
  if [ "$(left)" -lt "$min" ]; then
    note "SKIP  $name: $(left) s left of the ${budget} s budget (needs ~${min} s)"
    return 0
  fi
  timeout --signal=INT --kill-after=10 "$(left)" bash -o pipefail -c "$fn"
  rc=$?
  note "$( [ $rc -eq 0 ] && echo 'OK  ' || echo "FAIL") $name: rc=$rc, $((SECONDS - t0)) s"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ)"
} 2>&1 | tee "$out/gpu.txt"

build() {
  if ! python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
    tail -30 "$out/build.log"
    return 1
  fi
  python3 -c "import lightning_vis.ops as O; print(O.build_info()); assert 'cuda' in O.backends()" |
    tee -a "$out/gpu.txt"
}

tests() {
  python3 -m pytest -q -p no:cacheprovider -rs tests/test_pool_cuda.py tests/test_fft_image.py tests/test_pool.py \
    tests/test_pool_registration.py >"$out/tests.log" 2>&1
  local rc=$?
  tail -15 "$out/tests.log"
  return $rc
}

bench() {
  python3 -m benchmarks.kernels --device cuda --json "$out/kernels-gpu.json" >"$out/bench.log" 2>&1
  local rc=$?
  sed -n '/^op /,$p' "$out/bench.log"
  return $rc
}

methods() {
  python3 -m benchmarks.methods --device cuda --json "$out/methods-gpu.json" >"$out/methods.log" 2>&1
  local rc=$?
  tail -25 "$out/methods.log"
  return $rc
}

export out
export -f build tests bench methods
step build 200 build || { note "the build failed: see build.log"; cat "$summary"; exit 1; }
step "CUDA tests" 90 tests
step "kernel benchmark" 90 bench
step "methods benchmark" 180 methods

echo
echo "== summary ($((SECONDS - start)) s of ${budget} s) =="
cat "$summary"
grep -E "^(PASS|MISS)" "$out/bench.log" 2>/dev/null
grep -E "passed|failed" "$out/tests.log" 2>/dev/null | tail -1
