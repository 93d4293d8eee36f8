"""The CUDA kernels, run without a GPU: the CUDA-semantics simulator (tests/_cuda_sim.py, csrc/sim/cuda_sim.cpp)
executes the kernels' own bodies (csrc/cuda/*_bodies.h) for every block and thread of the grid the real launcher
plans, against the CPU kernels. Every simulated call checks every memory access (inside the launch's tensors,
aligned, no write to an input) and that every output element is written exactly once (outputs start poisoned).

What the simulator cannot show (concurrency, launch limits, streams, the driver) is tests/test_pool_cuda.py's and
benchmarks/gpu_check.sh's, on a GPU."""

import math
import os
import random

import pytest
import torch

import lightning_vis.ops  # noqa: F401  (registers torch.ops.lightning_vis)

from . import _cuda_sim
from ._pool_cases import (DTYPES, channels_last_cases, check_against_cpu, misalign, random_case, s2_cases,
                          torch_pool, vec_width)

ops = torch.ops.lightning_vis
N_CONFIGS = 960  # random pooling configurations torch accepts (>= 640), each through pool, unpool and gather
H100_MAX_BLOCKS = 132 * 32  # the real launcher's grid cap on an H100 (launch.h)


@pytest.fixture(scope="module")
def sim():
    module = _cuda_sim.load()
    module.configure()
    module.reset()
    yield module
    module.configure()


def simulated(name, *args):
    return getattr(torch.ops.lightning_vis_sim, name)(*args)


def test_random_configurations_match_the_cpu_kernels(sim):
    """>= 640 random geometries (1D/2D/3D, padding, dilation, ceil_mode, planar / channels-last / strided inputs, all
    four dtypes, ties, NaN and infinities), each through pool, unpool and gather. They rotate through three launch
    modes: the real launcher's grid, a grid of one or two blocks (grid-stride loops stride), and forced 64-bit
    index bodies; and every fifth input is moved one element off its 16-byte alignment."""
    sim.configure()
    checked = strided = int64 = 0
    seed = 0
    while checked < N_CONFIGS:
        case = random_case(seed)
        seed += 1
        x = case.make_input()
        if isinstance(torch_pool(case, x), RuntimeError):
            continue
        x = x if case.batched else x.unsqueeze(0)
        if checked % 5 == 2:
            x = misalign(x)
        mode = checked % 3
        tiny = 1 + (checked // 3) % 2  # blocks in the small-grid mode
        sim.configure(max_blocks=tiny if mode == 1 else H100_MAX_BLOCKS, force_int64=mode == 2)
        sim.reset()
        try:
            check_against_cpu(simulated, x, case.k, case.s, case.p, case.d, case.ceil_mode, seed)
        except (AssertionError, RuntimeError) as e:
            raise AssertionError(f"{case} (mode {mode}, offset {x.storage_offset()}): {e}") from e
        plans = sim.plans()
        assert len(plans) == 3, plans
        for plan in plans:
            assert plan["threads"] == 256 and plan["index_bits"] == (64 if mode == 2 else 32), (case, plan)
            want = min(max(1, math.ceil(plan["work"] / 256)), tiny if mode == 1 else H100_MAX_BLOCKS)
            assert plan["blocks"] == want, (case, plan)
            strided += plan["blocks"] * plan["threads"] < plan["work"]
            int64 += plan["index_bits"] == 64
        checked += 1
    sim.configure()
    assert strided >= 60 and int64 >= 3 * (N_CONFIGS // 3), (strided, int64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_s2_fast_paths_every_width(sim, dtype):
    """Planar 2x2/s2 and 3x3/s2/p1 (and their 3D and rectangular forms) at every width up to four vector widths:
    whole and partial groups, rows aligned and not, tiles inside and over the edge, floor and ceil mode."""
    sim.configure()
    sim.reset()
    n = 0
    for x, k, s, p, d, ceil_mode in s2_cases(dtype):
        check_against_cpu(simulated, x, k, s, p, d, ceil_mode, seed=n)
        n += 1
    assert n >= 6 * 2 * 4 * vec_width(dtype)
    counts = sim.path_counts()
    for name in ["pool_s2_k2", "pool_s2_k3", "pool_s2_fixed_rows", "pool_s2_vec_load", "pool_s2_scalar_load",
                 "pool_s2_vec_store", "pool_s2_scalar_store", "unpool_s2_k2", "unpool_s2_k3", "unpool_s2_fixed_rows",
                 "unpool_s2_vec_load", "unpool_s2_scalar_load", "unpool_s2_vec_store", "unpool_s2_scalar_store",
                 "gather_rows", "gather_rows_vec"]:
        assert counts[name] > 0, (name, {k: v for k, v in counts.items() if v})
    kernels = {(pl["kernel"], pl["shape"]) for pl in sim.plans()}
    for want in [("pool_s2_k2", "2x2"), ("pool_s2_k3", "3x3"), ("pool_s2_k2", "2x2x2"), ("pool_s2_k3", "any rows"),
                 ("unpool_s2_k2", "2x2"), ("unpool_s2_k3", "3x3"), ("unpool_s2_k2", "2x2x2"),
                 ("unpool_s2_k3", "any rows"), ("pool_s2_k2", "any rows")]:
        assert want in kernels, (want, kernels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_vector_paths(sim, dtype):
    """Channels last with C a multiple of 16 bytes of elements: one 16-byte access per window cell; C not a multiple,
    or a misaligned tensor: the one-element bodies."""
    sim.configure()
    for x, k, s, p, d, vector in channels_last_cases(dtype):
        sim.reset()
        check_against_cpu(simulated, x, k, s, p, d, False)
        kernels = [pl["kernel"] for pl in sim.plans()]
        if vector:
            assert kernels == ["pool_cl_vec", "unpool_cl_vec", "gather_cl_vec"], (x.shape, kernels)
            counts = sim.path_counts()
            assert counts["pool_cl_vec"] > 0 and counts["unpool_cl_vec"] > 0 and counts["gather_cl_vec"] > 0
        else:
            assert kernels == ["pool_generic", "unpool_generic", "gather_generic"], (x.shape, kernels)


def test_int32_and_wide_windows(sim):
    """int32 switches (a window over 255 cells) through every body that takes them, in both index types."""
    gen = torch.Generator().manual_seed(3)
    for force in (False, True):
        sim.configure(force_int64=force)
        for layout in ("planar", "cl"):
            x = torch.randn(2, 4, 21, 20, generator=gen)
            if layout == "cl":
                x = x.contiguous(memory_format=torch.channels_last)
            sim.reset()
            check_against_cpu(simulated, x, (17, 16), (3, 2), (2, 0), (1, 1), True)
            assert {pl["index_bits"] for pl in sim.plans()} == {64 if force else 32}
    sim.configure()


FFT_DTYPES = [torch.float32, torch.float64]


def fft_config(rng: random.Random):
    nd = rng.choice([2, 2, 3])
    size = [rng.randint(1, 4) for _ in range(nd - 2)] + [rng.randint(1, 13), rng.randint(1, 13)]
    return size, rng.choice([1, 3]), rng.random() < 0.7, rng.random() < 0.7, rng.randint(1, 3)


@pytest.mark.parametrize("dtype", FFT_DTYPES)
def test_fft_image_element_kernels_match_the_cpu(sim, dtype):
    """The fused colour-mixing + sigmoid passes of fft_image, forward and backward, on random sizes (planes a
    multiple of the vector width or not), 1 or 3 channels, with and without the colour matrix and the sigmoid, under
    the real grid, a one-block grid and forced 64-bit indexing."""
    from lightning_vis.params import frequency_scale, lucid_color_matrix

    sim.reset()
    rng = random.Random(11)
    large = [([40, 36], 3, True, True, 2), ([33, 31], 3, False, True, 2)]  # over 256 work items: one block strides
    for i in range(60 + len(large)):
        size, c, colored, sig, b = fft_config(rng) if i < 60 else large[i - 60]
        sim.configure(max_blocks=1 if i % 3 == 0 else H100_MAX_BLOCKS, force_int64=i % 3 == 1)
        g = torch.Generator().manual_seed(i)
        spec = torch.randn(b, c, *size[:-1], size[-1] // 2 + 1, 2, generator=g, dtype=torch.float64).to(dtype)
        scale = frequency_scale(size, 1.0).to(dtype)
        color = lucid_color_matrix().to(dtype) if colored else torch.empty(0, dtype=dtype)
        ref = ops.fft_image(spec, scale, color, size, sig)
        out = torch.ops.lightning_vis_sim.fft_image(spec, scale, color, size, sig)
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out, ref, **tol, msg=lambda m: f"{size} c={c} {colored} {sig}: {m}")
        grad = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dtype)
        torch.testing.assert_close(torch.ops.lightning_vis_sim.fft_image_backward(grad, ref, scale, color, size, sig),
                                   ops.fft_image_backward(grad, ref, scale, color, size, sig), **tol)
    sim.configure()
    counts = sim.path_counts()
    for name in ["fft_mix_vec", "fft_mix_scalar", "fft_mix_back_vec", "fft_mix_back_scalar"]:
        assert counts[name] > 0, (name, counts)
    plans = sim.plans()
    assert any(pl["blocks"] * pl["threads"] < pl["work"] for pl in plans)  # the one-block grid strode
    assert {pl["index_bits"] for pl in plans} == {32, 64}


# One small problem per branch of the kernel bodies: the proof that every fast path runs in CI.
def every_path_cases():
    cl = torch.channels_last
    for dtype in (torch.float32, torch.float16):
        V = vec_width(dtype)
        yield torch.randn(1, 2, 4, 4 * V).to(dtype), (2, 2), (2, 2), (0, 0)              # s2 k2, aligned groups
        yield torch.randn(1, 2, 5, 4 * V + 3).to(dtype), (3, 3), (2, 2), (1, 1)          # s2 k3, tails
        yield misalign(torch.randn(1, 2, 4, 4 * V).to(dtype)), (2, 2), (2, 2), (0, 0)    # misaligned rows
        yield torch.randn(1, 2, 4, 4, 2 * V).to(dtype), (2, 2, 2), (2, 2, 2), (0, 0, 0)  # 2x2x2
        yield torch.randn(1, 2, 3, 5, 2 * V).to(dtype), (3, 3, 3), (2, 2, 2), (1, 1, 1)  # rows not fixed
        yield torch.randn(2, V, 6, 6).to(dtype).contiguous(memory_format=cl), (3, 3), (2, 2), (1, 1)
        yield torch.randn(2, 3, 7, 7).to(dtype), (3, 3), (1, 1), (1, 1)                  # generic
        yield torch.randn(2, V + 1, 6, 6).to(dtype).contiguous(memory_format=cl), (2, 2), (2, 2), (0, 0)  # C % V


def test_every_kernel_path_is_reached(sim):
    """Runs one small problem per branch and requires every branch counter of the bodies to be non-zero."""
    from lightning_vis.params import frequency_scale, lucid_color_matrix

    sim.configure()
    sim.reset()
    for x, k, s, p in every_path_cases():
        check_against_cpu(simulated, x, k, s, p, [1] * len(k), False)
    for size in ([8, 8], [5, 7]):  # planes of 64 (vector) and 35 (scalar) pixels
        spec = torch.randn(2, 3, size[0], size[1] // 2 + 1, 2)
        scale, color = frequency_scale(size, 1.0), lucid_color_matrix()
        out = torch.ops.lightning_vis_sim.fft_image(spec, scale, color, size, True)
        torch.ops.lightning_vis_sim.fft_image_backward(torch.randn_like(out), out, scale, color, size, True)
    counts = sim.path_counts()
    missing = [name for name, n in counts.items() if n == 0]
    assert not missing, f"kernel branches never run: {missing}"


@pytest.mark.parametrize("kind,message", [
    ("out_of_bounds_load", "out-of-bounds 4-byte load: 0 bytes past the end of 'x'"),
    ("misaligned_vector_load", "misaligned 16-byte load at byte 4 of 'x'"),
    ("double_write", "1000 written more than once"),
    ("missed_write", "1 elements never written"),
    ("store_into_input", "store into the input 'x'"),
    ("load_from_output", "load from the output 'y'"),
])
def test_the_checker_catches_each_fault(sim, kind, message):
    """Bodies with one deliberate fault each (compiled into the simulator only) are stopped with a clear message."""
    with pytest.raises(RuntimeError, match="CUDA simulator") as info:
        sim.selftest(kind)
    assert message in str(info.value)
    sim.selftest("none")  # the same body without the fault passes


def test_fp16_conversions_come_from_where_configured(sim):
    """The toolkit's cuda_fp16.h / cuda_bf16.h host conversions where a toolkit is found; the shim elsewhere (CI's
    AddressSanitizer step builds with the shim on purpose: the simulator must run without CUDA)."""
    want = os.environ.get("LIGHTNING_VIS_SIM_HEADERS") or ("cuda" if _cuda_sim.cuda_include() else "shim")
    assert sim.fp16_headers == want
