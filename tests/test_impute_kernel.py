"""The imputer operator (lightning_vis.ops.impute, ROAD's linear imputation): the compiled CPU kernel against
pytorch-grad-cam's NoisyLinearImputer without its noise (SciPy's sparse LU: the exact solution), against the
pure-torch reference solver, batched against unbatched, clear errors, opcheck. Runs again under AddressSanitizer in
CI (.ci/run), with only lightning_vis.ops importable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lightning_vis.ops as O
from lightning_vis.ops import reference

pytestmark = pytest.mark.skipif(not O.has_backend("cpu"), reason="the compiled extension is not loaded")


def peer(img: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    return NoisyLinearImputer(noise=0)(img, known.float())


def masks(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random pixels (a fraction per image) and thresholded smooth maps (ROAD's blobs), at least one pixel kept."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(b):
        if i % 2:
            smooth = F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(h, w), mode="bilinear")[0, 0]
            k = smooth < smooth.flatten().quantile(0.1 + 0.8 * torch.rand(1, generator=g).item())
        else:
            k = torch.rand(h, w, generator=g) < 0.02 + 0.9 * torch.rand(1, generator=g).item()
        k.view(-1)[torch.randint(h * w, (1,), generator=g)] = True
        out.append(k)
    return torch.stack(out)


SHAPES = [(1, 1), (1, 9), (7, 1), (2, 2), (3, 5), (4, 4), (20, 17), (17, 20), (31, 32), (64, 57)]


@pytest.mark.parametrize("h,w", SHAPES)
def test_kernel_equals_pytorch_grad_cams_imputer(h, w):
    g = torch.Generator().manual_seed(h * 100 + w)
    imgs = torch.randn(4, 3, h, w, generator=g)
    known = masks(4, h, w, seed=h + w)
    ours = O.impute(imgs, known, tol=1e-7)
    for i in range(4):
        assert (ours[i] - peer(imgs[i], known[i])).abs().max() < 1e-4, i
    k = known[:, None].expand_as(imgs)
    assert torch.equal(ours[k], imgs[k])  # the known pixels pass through untouched


def test_kernel_equals_the_reference_solver_batched_and_unbatched():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(6, 2, 45, 38, generator=g)
    known = masks(6, 45, 38, seed=2)
    ours = torch.ops.lightning_vis.impute(imgs, known, 1e-8, 1000)
    ref = reference.impute(imgs.double(), known, 1e-10, 1000).float()
    assert (ours - ref).abs().max() < 1e-5
    one = torch.cat([torch.ops.lightning_vis.impute(imgs[i:i + 1], known[i:i + 1], 1e-8, 1000) for i in range(6)])
    assert torch.equal(ours, one)
    single = torch.ops.lightning_vis.impute(imgs[:, :1].contiguous(), known, 1e-8, 1000)
    assert (single - ours[:, :1]).abs().max() < 1e-5  # a channel's solve does not depend on the others


def test_dispatch_compiled_for_float32_reference_otherwise():
    imgs = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    known = masks(2, 12, 10, seed=3)
    want = torch.stack([peer(imgs[i], known[i]) for i in range(2)])
    for x in (imgs, imgs.double()):
        got = O.impute(x, known, tol=1e-7)
        assert got.dtype == x.dtype and (got.float() - want).abs().max() < 1e-4
    assert torch.equal(O.impute(imgs, torch.ones(2, 12, 10, dtype=torch.bool)), imgs)  # nothing to impute


def test_reference_solver_converges_in_few_steps_on_even_grids():
    """The coarse grid reaches one point past an even fine grid: without it the bottom row and right column, where
    a large hole meets the image's edge, were left to the smoother (ROAD's 224 px masks took 25-29 steps, now 6)."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 96, 96, generator=g, dtype=torch.float64)
    known = torch.zeros(2, 96, 96, dtype=torch.bool)
    known[0, 10:20, 5:30] = True  # a small known blob, far from the bottom-right corner
    known[1, 40:44, 40:44] = True
    got = reference.impute(imgs, known, 1e-12, 8)
    for i in range(2):
        assert (got[i].float() - peer(imgs[i].float(), known[i])).abs().max() < 1e-4


@pytest.mark.parametrize("args,match", [
    ((torch.randn(3, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), 1e-5, 10), "must be \\(B, C, H, W\\)"),
    ((torch.randn(1, 3, 8, 8), torch.ones(1, 8, 7, dtype=torch.bool), 1e-5, 10), "known must be \\(B, H, W\\)"),
    ((torch.randn(1, 3, 8, 8), torch.ones(1, 8, 8), 1e-5, 10), "known must be bool"),
    ((torch.randn(1, 3, 8, 8).double(), torch.ones(1, 8, 8, dtype=torch.bool), 1e-5, 10), "must be float32"),
    ((torch.randn(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), 1e-5, 10), "every pixel removed"),
    ((torch.randn(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), -1.0, 10), "must be >= 0"),
])
def test_bad_input_gives_clear_errors(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lightning_vis.impute(*args)


def test_opcheck():
    imgs = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.lightning_vis.impute.default, (imgs, masks(2, 9, 11, seed=4), 1e-6, 200))
