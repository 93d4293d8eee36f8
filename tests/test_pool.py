"""max_pool_with_switches and unpool on the CPU kernels: against torch's own ops, autograd, the pure-torch
reference and hand-computed tensors."""

import pytest
import torch
import torch.nn.functional as F

import lightning_vis.ops as O
from lightning_vis.ops import reference as R

from ._pool_cases import POOL, UNPOOL, degenerate, random_case, torch_pool

N_RANDOM = 640  # about 560 of these are configurations torch accepts


def run_case(case, device="cpu"):
    x = case.make_input(device)
    expected = torch_pool(case, x)
    kw = {} if case.batched else {"spatial_dims": case.nd}
    return x, expected, kw


def test_random_configurations_match_torch():
    valid = rejected = 0
    for seed in range(N_RANDOM):
        case = random_case(seed)
        x, expected, kw = run_case(case)
        if isinstance(expected, RuntimeError):
            with pytest.raises(RuntimeError):
                O.max_pool_with_switches(x, case.k, case.s, case.p, case.d, case.ceil_mode, **kw)
            rejected += 1
            continue
        ref_v, ref_i = expected
        values, switches = O.max_pool_with_switches(x, case.k, case.s, case.p, case.d, case.ceil_mode, **kw)
        assert values.shape == ref_v.shape and values.dtype == ref_v.dtype, case
        torch.testing.assert_close(values, ref_v, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{case}\n{m}")
        assert switches.dtype == O.switch_dtype(case.k), case
        size = x.shape[-case.nd:]
        idx = O.switches_to_indices(switches, size, case.k, case.s, case.p, case.d)
        assert torch.equal(idx, ref_i), f"{case}\n{idx}\n{ref_i}"
        if not degenerate(case):  # torch's index of a window wholly in the padding has no inverse
            assert torch.equal(O.indices_to_switches(ref_i, size, case.k, case.s, case.p, case.d), switches), case
        if case.layout == "channels_last" and case.batched and not x.is_contiguous():
            assert values.movedim(1, -1).is_contiguous() and switches.movedim(1, -1).is_contiguous(), case
        valid += 1
    assert valid >= 500, (valid, rejected)
    assert rejected > 0  # the sampler also exercises what torch rejects


def test_unpool_is_the_gradient_of_max_pool():
    compared = 0
    for seed in range(N_RANDOM, N_RANDOM + 300):
        case = random_case(seed)
        case.dtype, case.data, case.batched = torch.float64, "normal", True
        x = case.make_input().requires_grad_()
        ref = torch_pool(case, x)
        if isinstance(ref, RuntimeError):
            continue
        g = torch.randn_like(ref[0])
        _, switches = O.max_pool_with_switches(x.detach(), case.k, case.s, case.p, case.d, case.ceil_mode)
        out = O.unpool(g, switches, case.k, case.s, case.p, case.d, output_size=x.shape)
        torch.testing.assert_close(out, R.unpool(g, switches, case.k, case.s, case.p, case.d, x.shape[2:]),
                                   msg=lambda m: f"{case}\n{m}")
        if not degenerate(case):
            (grad,) = torch.autograd.grad(ref[0], x, g)
            torch.testing.assert_close(out, grad, msg=lambda m: f"{case}\n{m}")
            compared += 1
    assert compared >= 200


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unpool_low_precision_against_reference(dtype):
    for seed in range(20):
        case = random_case(1000 + seed)
        case.dtype, case.data = dtype, "normal"
        x = case.make_input()
        if not case.batched:
            x = x.unsqueeze(0)
        if isinstance(torch_pool(case, x), RuntimeError):
            continue
        v, s = O.max_pool_with_switches(x, case.k, case.s, case.p, case.d, case.ceil_mode)
        g = torch.randn(v.shape).to(dtype)
        out = O.unpool(g, s, case.k, case.s, case.p, case.d, output_size=x.shape)
        torch.testing.assert_close(out, R.unpool(g, s, case.k, case.s, case.p, case.d, x.shape[2:]))


def test_unpool_equals_max_unpool_without_overlap():
    for nd, shape, k in [(1, (2, 3, 16), 2), (2, (2, 4, 8, 12), (2, 3)), (3, (1, 3, 4, 6, 8), 2), (2, (1, 2, 9, 9), 3)]:
        x = torch.randn(shape)
        v, i = POOL[nd](x, k, return_indices=True)
        _, s = O.max_pool_with_switches(x, k, spatial_dims=nd)
        expected = UNPOOL[nd](v, i, k, output_size=x.shape[2:])
        assert torch.equal(O.unpool(v, s, k, output_size=x.shape[2:], spatial_dims=nd), expected)


def test_hand_computed_ties_nan_and_infinities():
    # first maximum wins a tie; the last NaN wins; an all -inf window points at its first cell
    x = torch.tensor([[[[1.0, 3.0, float("nan"), 1.0, -float("inf"), -float("inf")],
                        [3.0, 2.0, 5.0, float("nan"), -float("inf"), -float("inf")]]]])
    v, s = O.max_pool_with_switches(x, 2)
    assert torch.equal(s, torch.tensor([[[[1, 3, 0]]]], dtype=torch.uint8))
    assert v[0, 0, 0, 0] == 3 and torch.isnan(v[0, 0, 0, 1]) and v[0, 0, 0, 2] == -float("inf")


def test_hand_computed_overlapping_windows_sum():
    # windows [1 9 2] [9 2 0] [2 0 3] pick cells 1, 1, 4: unpool must add both values landing on cell 1
    x = torch.tensor([[[1.0, 9.0, 2.0, 0.0, 3.0]]])
    v, s = O.max_pool_with_switches(x, 3, 1)
    assert torch.equal(v, torch.tensor([[[9.0, 9.0, 3.0]]]))
    assert torch.equal(s, torch.tensor([[[1, 0, 2]]], dtype=torch.uint8))
    out = O.unpool(torch.tensor([[[1.0, 10.0, 100.0]]]), s, 3, 1, output_size=(5,))
    assert torch.equal(out, torch.tensor([[[0.0, 11.0, 0.0, 0.0, 100.0]]]))


def test_padding_dilation_ceil_mode_hand_computed():
    # L=5, k=2, s=2, p=1, d=2, ceil: windows start at -1, 1, 3 -> cells {1}, {1, 3}, {3} (5 is outside)
    x = torch.tensor([[[4.0, 7.0, 1.0, 8.0, 2.0]]])
    v, s = O.max_pool_with_switches(x, 2, 2, 1, 2, ceil_mode=True)
    ref_v, ref_i = F.max_pool1d(x, 2, 2, 1, 2, ceil_mode=True, return_indices=True)
    assert torch.equal(v, ref_v) and torch.equal(v, torch.tensor([[[7.0, 8.0, 8.0]]]))
    assert torch.equal(s, torch.tensor([[[1, 1, 0]]], dtype=torch.uint8))
    assert torch.equal(O.switches_to_indices(s, (5,), 2, 2, 1, 2), ref_i)


def test_wide_windows_use_int32_switches():
    # an increasing ramp puts every maximum in the last cell of its 17 x 17 window: offset 288 > 255
    x = torch.arange(2 * 3 * 20 * 20, dtype=torch.float32).view(2, 3, 20, 20)
    v, s = O.max_pool_with_switches(x, 17, 3)
    assert s.dtype == torch.int32 and bool((s == 288).all())
    ref_v, ref_i = F.max_pool2d(x, 17, 3, return_indices=True)
    assert torch.equal(v, ref_v)
    assert torch.equal(O.switches_to_indices(s, (20, 20), 17, 3), ref_i)
    g = torch.randn_like(v)
    expected = R.unpool(g, s, (17, 17), (3, 3), (0, 0), (1, 1), (20, 20))
    torch.testing.assert_close(O.unpool(g, s, 17, 3, output_size=x.shape), expected)


def test_batched_equals_unbatched():
    for nd, shape in [(1, (3, 4, 13)), (2, (3, 4, 9, 10)), (3, (3, 2, 5, 6, 7))]:
        x = torch.randn(shape)
        v, s = O.max_pool_with_switches(x, 3, 2, 1, spatial_dims=nd)
        u = O.unpool(v, s, 3, 2, 1, output_size=x.shape, spatial_dims=nd)
        for n in range(shape[0]):
            vn, sn = O.max_pool_with_switches(x[n], 3, 2, 1, spatial_dims=nd)
            assert torch.equal(vn, v[n]) and torch.equal(sn, s[n])
            assert torch.equal(O.unpool(vn, sn, 3, 2, 1, output_size=x.shape[2:], spatial_dims=nd), u[n])


def test_layouts_agree():
    x = torch.randn(2, 5, 13, 11)
    v0, s0 = O.max_pool_with_switches(x, 3, 2, 1)
    xc = x.contiguous(memory_format=torch.channels_last)
    v1, s1 = O.max_pool_with_switches(xc, 3, 2, 1)
    assert v1.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(v0, v1) and torch.equal(s0, s1)
    g = torch.randn_like(v0)
    u0 = O.unpool(g, s0, 3, 2, 1, output_size=x.shape)
    u1 = O.unpool(g.contiguous(memory_format=torch.channels_last), s1, 3, 2, 1, output_size=x.shape)
    assert u1.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(u0, u1)
    x3 = torch.randn(2, 3, 6, 7, 8)
    a = O.max_pool_with_switches(x3, 2)
    b = O.max_pool_with_switches(x3.contiguous(memory_format=torch.channels_last_3d), 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_unpool_is_deterministic_and_fully_written():
    x = torch.randn(4, 8, 31, 29)
    v, s = O.max_pool_with_switches(x, 3, 2, 1)
    outs = []
    for _ in range(3):
        junk = torch.full((4, 8, 31, 29), float("nan"))  # freed memory the next allocation may reuse
        del junk
        outs.append(O.unpool(v, s, 3, 2, 1, output_size=x.shape))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert not torch.isnan(outs[0]).any()


FAST_PATHS = [
    # (kernel, stride, padding, ceil_mode): the shapes the hand-vectorised and fused paths serve
    ((2, 2), (2, 2), (0, 0), False),
    ((2, 2), (2, 2), (0, 0), True),
    ((3, 3), (2, 2), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), True),
    ((2, 2), (2, 2), (1, 1), False),
    ((2, 2), (1, 1), (0, 0), False),
    ((3, 3), (1, 1), (1, 1), False),
    ((2, 3), (2, 2), (0, 1), True),
]


@pytest.mark.parametrize("k,s,p,ceil", FAST_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_paths_every_width(k, s, p, ceil, dtype):
    """Widths 1..40 cover the 8-wide, 4-wide and scalar tails of every row kernel; odd heights the last row."""
    for w in range(1, 41):
        for h in (w % 5 + 2, 7):
            x = torch.randn(2, 3, h, w, dtype=dtype)
            if ceil and x.shape[2] < k[0]:
                continue
            try:
                ref_v, ref_i = F.max_pool2d(x, k, s, p, ceil_mode=ceil, return_indices=True)
            except RuntimeError:
                continue
            for xin in (x, x.contiguous(memory_format=torch.channels_last)):
                v, sw = O.max_pool_with_switches(xin, k, s, p, ceil_mode=ceil)
                assert torch.equal(v, ref_v), (k, s, p, ceil, h, w)
                assert torch.equal(O.switches_to_indices(sw, (h, w), k, s, p), ref_i), (k, s, p, ceil, h, w)
                xg = x.clone().requires_grad_()
                g = torch.randn_like(ref_v)
                (grad,) = torch.autograd.grad(F.max_pool2d(xg, k, s, p, ceil_mode=ceil), xg, g)
                gin = g.contiguous(memory_format=torch.channels_last) if xin is not x else g
                torch.testing.assert_close(O.unpool(gin, sw, k, s, p, output_size=(h, w)), grad)


@pytest.mark.parametrize("k", [(2, 2, 2), (1, 2, 2), (2, 3, 3)])
@pytest.mark.parametrize("ceil", [False, True])
def test_fast_paths_3d(k, ceil):
    for shape in [(2, 3, 4, 6, 8), (1, 2, 5, 7, 19), (1, 2, 3, 9, 33)]:
        x = torch.randn(shape)
        s = tuple(max(1, ki) if ki != 3 else 2 for ki in k)
        p = tuple(1 if ki == 3 else 0 for ki in k)
        ref_v, ref_i = F.max_pool3d(x, k, s, p, ceil_mode=ceil, return_indices=True)
        for xin in (x, x.contiguous(memory_format=torch.channels_last_3d)):
            v, sw = O.max_pool_with_switches(xin, k, s, p, ceil_mode=ceil)
            assert torch.equal(v, ref_v) and torch.equal(O.switches_to_indices(sw, shape[2:], k, s, p), ref_i)
            xg = x.clone().requires_grad_()
            g = torch.randn_like(ref_v)
            (grad,) = torch.autograd.grad(F.max_pool3d(xg, k, s, p, ceil_mode=ceil), xg, g)
            torch.testing.assert_close(O.unpool(g, sw, k, s, p, output_size=shape[2:]), grad)
