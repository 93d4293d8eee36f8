"""The fft_image operator against its pure-torch reference: values and gradients on random configurations (odd
and non-square sizes, 1 or 3 channels, clips, with and without colour mixing and sigmoid), gradcheck in float64,
opcheck, torch.compile, clear errors, and CPU == CUDA where a GPU exists."""

import random

import pytest
import torch

import lightning_vis.ops as O
from lightning_vis.ops import reference as R
from lightning_vis.params import frequency_scale, lucid_color_matrix


def config(rng: random.Random):
    nd = rng.choice([2, 2, 3])
    size = [rng.randint(1, 6) for _ in range(nd - 2)] + [rng.randint(1, 17), rng.randint(1, 17)]
    c = rng.choice([1, 3])
    return size, c, rng.random() < 0.8, rng.random() < 0.8, rng.randint(1, 3)


def tensors(size, c, colored, b, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    freq = (*size[:-1], size[-1] // 2 + 1)
    spec = torch.randn(b, c, *freq, 2, generator=g, dtype=torch.float64).to(device, dtype)
    scale = frequency_scale(size, 1.0).to(device, dtype)
    color = lucid_color_matrix().to(device, dtype) if colored else None
    return spec, scale, color


@pytest.mark.parametrize("seed", range(40))
def test_values_and_gradients_match_the_reference(seed):
    size, c, colored, sig, b = config(random.Random(seed))
    spec, scale, color = tensors(size, c, colored, b, seed=seed)
    spec.requires_grad_(True)
    ours = O.fft_image(spec, size, scale=scale, color=color, sigmoid=sig)
    ref = R.fft_image(spec, scale, color if color is not None else spec.new_empty(0), size, sig)
    assert ours.shape == (b, c, *size)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(ours)
    (g1,) = torch.autograd.grad(ours, spec, grad)
    (g2,) = torch.autograd.grad(ref, spec, grad)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("size,c,colored,sig", [((5, 4), 3, True, True), ((3, 7), 1, False, True),
                                                ((2, 3, 4), 3, True, False), ((6, 6), 3, False, True)])
def test_gradcheck_float64(size, c, colored, sig):
    spec, scale, color = tensors(size, c, colored, 2, dtype=torch.float64)
    spec.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: O.fft_image(s, size, scale=scale, color=color, sigmoid=sig), (spec,))


def test_batched_equals_unbatched_and_opcheck_and_compile():
    size = [9, 6]
    spec, scale, color = tensors(size, 3, True, 4)
    full = O.fft_image(spec, size, scale=scale, color=color)
    for i in range(4):
        torch.testing.assert_close(O.fft_image(spec[i:i + 1], size, scale=scale, color=color)[0], full[i])
    torch.library.opcheck(torch.ops.lightning_vis.fft_image, (spec.requires_grad_(True), scale, color, size, True))
    compiled = torch.compile(lambda s: O.fft_image(s, size, scale=scale, color=color), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(spec.detach()), full)


@pytest.mark.parametrize("args,pattern", [
    (lambda s, sc, c: (s[..., :1], sc, c, [8, 8], True), "half spectrum"),
    (lambda s, sc, c: (s, sc[:2], c, [8, 8], True), "scale must have"),
    (lambda s, sc, c: (s, sc, c[:2], [8, 8], True), "3x3"),
    (lambda s, sc, c: (s, sc, c, [8], True), r"\(H, W\) or \(T, H, W\)"),
    (lambda s, sc, c: (s.to(torch.int32), sc, c, [8, 8], True), "float32 or float64"),
    (lambda s, sc, c: (torch.randn(1, 2, 8, 5, 2), sc, c, [8, 8], True), "1 or 3 channels"),
])
def test_errors(args, pattern):
    spec, scale, color = tensors([8, 8], 3, True, 1)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.lightning_vis.fft_image(*args(spec, scale, color))


cuda = pytest.mark.skipif(not (torch.cuda.is_available() and O.has_backend("cuda")),
                          reason="needs a GPU and the CUDA kernels (never in CI)")


@cuda
@pytest.mark.parametrize("seed", range(12))
def test_cuda_equals_cpu(seed):
    size, c, colored, sig, b = config(random.Random(100 + seed))
    spec, scale, color = tensors(size, c, colored, b, seed=seed)
    dspec, dscale = spec.cuda().requires_grad_(True), scale.cuda()
    dcolor = color.cuda() if color is not None else None
    out = O.fft_image(dspec, size, scale=dscale, color=dcolor, sigmoid=sig)
    cpu_spec = spec.clone().requires_grad_(True)
    ref = O.fft_image(cpu_spec, size, scale=scale, color=color, sigmoid=sig)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(ref)
    (g1,) = torch.autograd.grad(out, dspec, grad.cuda())
    (g2,) = torch.autograd.grad(ref, cpu_spec, grad)
    torch.testing.assert_close(g1.cpu(), g2, atol=1e-5, rtol=1e-4)


@cuda
def test_cuda_gradcheck_and_large_batch():
    size = [7, 10]
    spec, scale, color = tensors(size, 3, True, 2, dtype=torch.float64, device="cuda")
    spec.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: O.fft_image(s, size, scale=scale, color=color), (spec,))
    big, sc, col = tensors([128, 128], 3, True, 64, device="cuda")
    out = O.fft_image(big, [128, 128], scale=sc, color=col)
    torch.testing.assert_close(out, R.fft_image(big, sc, col, [128, 128], True), atol=1e-5, rtol=1e-4)


def test_fp32_under_autocast():
    """Under mixed precision the FFT stays float32: the same values as outside autocast."""
    from lightning_vis.params import fft_image as param_image

    spec, _, _ = tensors([12, 10], 3, True, 2)
    plain = param_image(spec, (12, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = param_image(spec.to(torch.bfloat16), (12, 10))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, param_image(spec.to(torch.bfloat16).float(), (12, 10)))
    assert (mixed - plain).abs().max() < 0.05  # only the bf16 rounding of the spectrum differs
