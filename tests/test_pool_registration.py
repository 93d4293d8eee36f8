"""Operator registration: autograd (gradcheck), fake kernels and schemas (opcheck), torch.compile, errors,
the build's backends and the fallback to the reference when the extension is missing."""

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lightning_vis.ops as O

ops = torch.ops.lightning_vis


def distinct(shape, channels_last=False, strided=False, seed=0):
    """float64 values without ties (finite differences at a tie have no meaning)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for v in shape:
        n *= v
    x = (torch.randperm(n, generator=g).double() / n + 0.01 * torch.rand(n, generator=g, dtype=torch.float64))
    x = x.view(shape)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    if strided:
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=torch.float64)
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x


GRAD_CASES = [
    ((2, 3, 9), dict(kernel_size=3, stride=2, padding=1), {}),
    ((2, 3, 7, 8), dict(kernel_size=2), {}),
    ((2, 3, 7, 8), dict(kernel_size=3, stride=2, padding=1), {}),  # overlapping windows
    ((1, 2, 9, 9), dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True), {}),
    ((2, 4, 6, 7), dict(kernel_size=2, stride=1), dict(channels_last=True)),
    ((2, 3, 6, 7), dict(kernel_size=3, stride=2, padding=1), dict(strided=True)),
    ((1, 2, 4, 5, 6), dict(kernel_size=2, stride=(1, 2, 2)), {}),
    ((1, 2, 4, 5, 6), dict(kernel_size=3, stride=2, padding=1), dict(channels_last=True)),
]


@pytest.mark.parametrize("shape,kw,layout", GRAD_CASES)
def test_gradcheck_max_pool_and_unpool(shape, kw, layout):
    x = distinct(shape, **layout).requires_grad_()
    nd = len(shape) - 2
    assert torch.autograd.gradcheck(lambda t: O.max_pool_with_switches(t, spatial_dims=nd, **kw)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda t: O.max_pool_with_switches(t, spatial_dims=nd, **kw)[0], (x,))
    _, s = O.max_pool_with_switches(x.detach(), spatial_dims=nd, **kw)
    v = torch.randn(s.shape, dtype=torch.float64, requires_grad=True)
    ukw = {k: kw[k] for k in ("kernel_size", "stride", "padding", "dilation") if k in kw}
    assert torch.autograd.gradcheck(lambda t: O.unpool(t, s, output_size=shape, spatial_dims=nd, **ukw), (v,))
    assert torch.autograd.gradgradcheck(lambda t: O.unpool(t, s, output_size=shape, spatial_dims=nd, **ukw), (v,))


def test_gradients_never_touch_parameters():
    conv = torch.nn.Conv2d(3, 4, 3)
    y = conv(torch.randn(2, 3, 10, 10))
    v, s = O.max_pool_with_switches(y, 2)
    (g,) = torch.autograd.grad(v.sum(), y)
    assert conv.weight.grad is None
    assert torch.equal(g, O.unpool(torch.ones_like(v), s, 2, output_size=y.shape))


def _opcheck_args():
    x = torch.randn(2, 3, 8, 9)
    xc = x.contiguous(memory_format=torch.channels_last)
    v, s = ops.max_pool_with_switches(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    return [
        (ops.max_pool_with_switches.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False)),
        (ops.max_pool_with_switches.default, (xc.requires_grad_(), [2, 2], [2, 2], [0, 0], [1, 1], True)),
        (ops.max_pool_with_switches.default, (torch.randn(2, 3, 11, requires_grad=True), [2], [1], [1], [2], False)),
        (ops.unpool.default, (v.clone().requires_grad_(), s, [3, 3], [2, 2], [1, 1], [1, 1], [8, 9])),
        (ops.gather_switches.default, (torch.randn(2, 3, 8, 9, requires_grad=True), s, [3, 3], [2, 2], [1, 1],
                                       [1, 1])),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    op, args = _opcheck_args()[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    def f(x):
        v, s = O.max_pool_with_switches(x, 3, 2, 1)
        return O.unpool(v * 2, s, 3, 2, 1, output_size=x.shape)

    x = torch.randn(2, 3, 10, 11)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize("in_dims", [(0, 0), (1, 1), (0, None)])
def test_vmap_rules_fold_into_the_batch(in_dims):
    """vmap of the three operators (used by autograd.grad(is_grads_batched=True)) equals a loop."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 3, 7, 8, generator=g)  # vmapped dim 0
    k, s, p, d = [3, 3], [2, 2], [1, 1], [1, 1]
    values, switches = torch.vmap(lambda t: ops.max_pool_with_switches(t, k, s, p, d, False))(x)
    for b in range(4):
        v, sw = ops.max_pool_with_switches(x[b], k, s, p, d, False)
        assert torch.equal(values[b], v) and torch.equal(switches[b], sw)
    grads = torch.randn(values.shape, generator=g)
    sw_in = switches if in_dims[1] is not None else switches[0]
    args = [grads.movedim(0, in_dims[0]), sw_in if in_dims[1] in (0, None) else sw_in.movedim(0, in_dims[1])]
    up = torch.vmap(lambda a, b: ops.unpool(a, b, k, s, p, d, [7, 8]), in_dims=in_dims)(*args)
    gathered = torch.vmap(lambda a, b: ops.gather_switches(a, b, k, s, p, d), in_dims=in_dims)(
        up.movedim(0, in_dims[0]), args[1])
    for b in range(4):
        sb = switches[b] if in_dims[1] is not None else switches[0]
        assert torch.equal(up[b], ops.unpool(grads[b], sb, k, s, p, d, [7, 8]))
        assert torch.equal(gathered[b], ops.gather_switches(up[b], sb, k, s, p, d))


BAD = [
    # (call, message pattern)
    (lambda: O.max_pool_with_switches(torch.randn(4, 4), 2, spatial_dims=2), "takes input of shape"),
    (lambda: O.max_pool_with_switches(torch.randn(1, 1, 2, 2), 3), "Output size is too small"),
    (lambda: O.max_pool_with_switches(torch.randn(1, 1, 8, 8), 3, 1, 2), "pad should be at most half"),
    (lambda: O.max_pool_with_switches(torch.randn(1, 1, 8, 8), 0), "kernel_size must be greater than zero"),
    (lambda: O.max_pool_with_switches(torch.randn(1, 1, 8, 8), 2, 0), "stride must be greater than zero"),
    (lambda: O.max_pool_with_switches(torch.ones(1, 1, 8, 8, dtype=torch.long), 2), "dtype.*not supported"),
    (lambda: O.max_pool_with_switches(torch.randn(1, 0, 8, 8), 2), "non-empty channel"),
    (lambda: O.max_pool_with_switches(torch.randn(1, 1, 8, 8), (2, 2, 2, 2)), "1D, 2D or 3D"),
    (lambda: O.max_pool_with_switches(torch.randn(1, 1, 8, 8), (2, 2), (1, 1, 1)), "stride must be one int or 2"),
    (lambda: O.max_pool_with_switches(torch.randn(3, 8, 8), 2), None),  # int kernel on rank 3: a batched 1D pool
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_gives_clear_errors(i):
    call, pattern = BAD[i]
    if pattern is None:  # documented behaviour, not an error
        v, s = call()
        assert v.shape == (3, 8, 4)
        return
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_switches_that_do_not_match_values():
    x = torch.randn(2, 3, 8, 8)
    v, s = O.max_pool_with_switches(x, 2)
    _, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(RuntimeError, match="must be uint8.*indices_to_switches"):
        O.unpool(v, idx, 2)
    with pytest.raises(RuntimeError, match="do not match"):
        O.unpool(v, s[:, :, :3], 2)
    with pytest.raises(RuntimeError, match="cannot come from pooling"):
        O.unpool(v, s, 2, output_size=(20, 20))
    with pytest.raises(RuntimeError, match="output_size must give"):
        O.unpool(v, s, 2, output_size=(8,))


def test_raw_ops_and_fake_kernels_reject_the_same_input():
    bad = (torch.randn(1, 1, 8, 8), [3, 3], [1, 1], [2, 2], [1, 1], False)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        ops.max_pool_with_switches(*bad)
    with FakeTensorMode() as mode:
        fake = (mode.from_tensor(bad[0]),) + bad[1:]
        with pytest.raises(RuntimeError, match="pad should be at most half"):
            ops.max_pool_with_switches(*fake)
    v, s = ops.max_pool_with_switches(torch.randn(1, 1, 8, 8), [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="cannot come from pooling"):
        ops.unpool(v, s, [2, 2], [2, 2], [0, 0], [1, 1], [20, 20])
    with pytest.raises(RuntimeError, match="must be uint8"):
        ops.gather_switches(torch.randn(1, 1, 8, 8), s.int(), [2, 2], [2, 2], [0, 0], [1, 1])


def test_build_has_the_cpu_kernels():
    assert "cpu" in O.backends()
    assert "cpu" in O.build_info()
    if os.environ.get("LIGHTNING_VIS_CUDA") == "1":  # CI forces the CUDA build: it must have compiled
        assert "cuda" in O.backends()


FALLBACK = r"""
import warnings, sys
import torch, torch.nn.functional as F
{setup}
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import lightning_vis.ops as O
assert O.backends() == [], O.backends()
print("WARNED" if any("could not be loaded" in str(m.message) for m in w) else "SILENT")
x = torch.randn(2, 3, 9, 10)
v, s = O.max_pool_with_switches(x, 3, 2, 1)
rv, ri = F.max_pool2d(x, 3, 2, 1, return_indices=True)
assert torch.equal(v, rv) and torch.equal(O.switches_to_indices(s, (9, 10), 3, 2, 1), ri)
g = torch.randn_like(v)
xr = x.clone().requires_grad_()
(ref,) = torch.autograd.grad(F.max_pool2d(xr, 3, 2, 1), xr, g)
torch.testing.assert_close(O.unpool(g, s, 3, 2, 1, output_size=x.shape), ref)
print("OK")
"""


@pytest.mark.parametrize("how", ["env", "broken"])
def test_fallback_to_reference_without_the_extension(how):
    if how == "env":
        env = dict(os.environ, LIGHTNING_VIS_NO_EXTENSION="1")
        setup = ""
    else:  # the extension fails to import: say why, then fall back
        env = dict(os.environ)
        setup = "sys.modules['lightning_vis._C'] = None"
    out = subprocess.run([sys.executable, "-c", FALLBACK.format(setup=setup)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["SILENT", "OK"] if how == "env" else ["WARNED", "OK"])
