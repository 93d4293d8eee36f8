"""CUDA kernels against the CPU kernels and torch, on fresh random inputs each run, with the allocator
poisoned so that an output element the kernel forgets to write shows up; every fast path of the bodies (the same
cases as the simulator's, tests/test_cuda_sim.py), streams, gradcheck, opcheck and the 64-bit index path. Skipped
without a GPU (CI runs the kernels' bodies through the simulator instead)."""

import os

import pytest
import torch
import torch.nn.functional as F

import lightning_vis.ops as O

from ._pool_cases import DTYPES, channels_last_cases, check_against_cpu, misalign, random_case, s2_cases, torch_pool
from .conftest import requires_cuda

pytestmark = requires_cuda
ops = torch.ops.lightning_vis


def poison():
    """Fill a large block with 0xFF and free it: the next outputs are carved from it (NaN floats, 255 switches)."""
    t = torch.empty(512 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    del t


def test_cuda_equals_cpu_on_fresh_random_configurations():
    base = int.from_bytes(os.urandom(4), "little")
    checked = 0
    for i in range(300):
        case = random_case(base + i)
        x = case.make_input()
        if isinstance(torch_pool(case, x), RuntimeError):
            continue
        kw = {} if case.batched else {"spatial_dims": case.nd}
        args = (case.k, case.s, case.p, case.d, case.ceil_mode)
        v_cpu, s_cpu = O.max_pool_with_switches(x, *args, **kw)
        poison()
        v, s = O.max_pool_with_switches(x.cuda(), *args, **kw)
        msg = f"base seed {base}: {case}"
        torch.testing.assert_close(v.cpu(), v_cpu, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{msg}\n{m}")
        assert torch.equal(s.cpu(), s_cpu), msg
        size = x.shape[-case.nd:]
        g = torch.randn(v_cpu.shape).to(case.dtype)
        u_cpu = O.unpool(g, s_cpu, case.k, case.s, case.p, case.d, output_size=size, **kw)
        poison()
        u = O.unpool(g.cuda(), s, case.k, case.s, case.p, case.d, output_size=size, **kw)
        torch.testing.assert_close(u.cpu(), u_cpu, msg=lambda m: f"{msg}\n{m}")
        assert torch.equal(u, O.unpool(g.cuda(), s, case.k, case.s, case.p, case.d, output_size=size, **kw)), msg
        checked += 1
    assert checked >= 200


def on_gpu(name, *args):
    """The CUDA operator on copies of the arguments (off their alignment where the CPU tensors are), poisoned
    allocator, results back on the CPU."""
    dev = [(misalign(a.cuda()) if a.data_ptr() % 16 else a.cuda()) if isinstance(a, torch.Tensor) else a for a in args]
    poison()
    out = getattr(ops, name)(*dev)
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fast_paths_equal_cpu(dtype):
    for i, (x, k, s, p, d, ceil_mode) in enumerate(s2_cases(dtype)):
        check_against_cpu(on_gpu, x, k, s, p, d, ceil_mode, seed=i)
    for x, k, s, p, d, _ in channels_last_cases(dtype):
        check_against_cpu(on_gpu, x, k, s, p, d, False)


def test_cuda_gather_equals_cpu():
    x = torch.randn(3, 5, 17, 19)
    v, s = O.max_pool_with_switches(x, 3, 2, 1)
    grad = torch.randn(3, 5, 17, 19)
    expected = ops.gather_switches(grad, s, [3, 3], [2, 2], [1, 1], [1, 1])
    poison()
    got = ops.gather_switches(grad.cuda(), s.cuda(), [3, 3], [2, 2], [1, 1], [1, 1])
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("shape,k,s,p", [((2, 3, 9, 10), 3, 2, 1), ((1, 2, 4, 6, 5), 2, 1, 0)])
def test_cuda_gradcheck(shape, k, s, p):
    n = 1
    for v in shape:
        n *= v
    x = (torch.randperm(n).double() / n).view(shape).cuda().requires_grad_()
    nd = len(shape) - 2
    assert torch.autograd.gradcheck(lambda t: O.max_pool_with_switches(t, k, s, p, spatial_dims=nd)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda t: O.max_pool_with_switches(t, k, s, p, spatial_dims=nd)[0], (x,))


def test_cuda_opcheck():
    x = torch.randn(2, 3, 8, 9, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.max_pool_with_switches.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False))
    v, s = ops.max_pool_with_switches(x.detach(), [3, 3], [2, 2], [1, 1], [1, 1], False)
    torch.library.opcheck(ops.unpool.default, (v.requires_grad_(), s, [3, 3], [2, 2], [1, 1], [1, 1], [8, 9]))


def test_cuda_runs_on_the_current_stream():
    x = torch.randn(8, 16, 64, 64, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        v, s = O.max_pool_with_switches(x, 2)
        u = O.unpool(v, s, 2)
    stream.synchronize()
    ref_v, ref_i = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(v, ref_v) and torch.equal(u, F.max_unpool2d(ref_v, ref_i, 2))


def test_cuda_int64_index_path():
    # more than 2**30 input elements: the kernels switch to 64-bit index arithmetic
    x = torch.randn(2, 4, 16384, 8200, device="cuda", dtype=torch.float16)
    v, s = O.max_pool_with_switches(x, 2)
    ref_v, ref_i = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(v, ref_v)
    assert torch.equal(O.switches_to_indices(s, x.shape[2:], 2), ref_i)
    del ref_i
    u = O.unpool(v, s, 2, output_size=x.shape)
    assert torch.equal(u, F.max_unpool2d(v, O.switches_to_indices(s, x.shape[2:], 2), 2, output_size=x.shape[2:]))
