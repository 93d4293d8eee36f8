"""Feature visualization: the Fourier parameterization, transforms and objectives against hand computations,
seeds, the ReLU fixes, rendering on a trained digits CNN, video and ViT layers, DeepDream, errors."""

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_vis as lv
from lightning_vis import objectives as O
from lightning_vis.featureviz import ReluFix, Transforms, gaussian_blur
from lightning_vis.hooks import hook_counts
from lightning_vis.params import (ImageParam, color_matrix_from, fft_image, fft_spectrum_from_image, frequency_scale,
                                  lucid_color_matrix, spectrum_shape)


def test_frequency_scale_by_hand():
    s = frequency_scale((4, 4))
    assert s.shape == (4, 3)
    assert s[0, 0] == 4 and s[0, 1] == 4 and s[1, 0] == 4  # |f| = 0 and 1/4 both clamp to 1/4
    assert math.isclose(float(s[1, 1]), 4 / math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(float(s[2, 2]), 1 / math.sqrt(0.5), rel_tol=1e-6)  # |f| = sqrt(0.5^2 + 0.5^2)


@pytest.mark.parametrize("size,channels", [((8, 8), 3), ((7, 10), 3), ((9, 5), 1), ((3, 6, 7), 3)])
def test_fft_image_inverts_and_matches_its_definition(size, channels):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, channels, *size, generator=g) * 0.8 + 0.1
    spec = fft_spectrum_from_image(img)
    assert spec.shape == (2, channels, *spectrum_shape(size), 2)
    torch.testing.assert_close(fft_image(spec, size), img, atol=1e-5, rtol=1e-4)
    # the definition, step by step
    nd = len(size)
    raw = torch.fft.irfftn(torch.view_as_complex(spec) * frequency_scale(size), s=size, dim=tuple(range(-nd, 0)),
                           norm="ortho") / 4
    if channels == 3:
        raw = torch.einsum("ij,bj...->bi...", lucid_color_matrix(), raw)
    torch.testing.assert_close(fft_image(spec, size), torch.sigmoid(raw))


def test_fft_image_gradcheck_float64():
    spec = torch.randn(1, 3, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: fft_image(s, (5, 4)).double(), (spec,))


def test_lucid_color_matrix_and_estimated_one():
    m = lucid_color_matrix()
    assert math.isclose(float(m.norm(dim=0).max()), 1.0, rel_tol=1e-6)
    g = torch.Generator().manual_seed(1)
    base = torch.rand(500, 1, generator=g)
    imgs = torch.cat([base, base * 0.5 + 0.1 * torch.rand(500, 1, generator=g), torch.rand(500, 1, generator=g)], 1)
    est = color_matrix_from(imgs[..., None, None])
    cov = torch.cov(imgs.t().double()).float()
    assert torch.allclose(est, est.t(), atol=1e-6)  # a symmetric square root
    sq = est @ est
    torch.testing.assert_close(sq / sq.abs().max(), cov / cov.abs().max(), atol=1e-4, rtol=1e-3)  # est^2 ~ cov
    assert math.isclose(float(est.norm(dim=0).max()), 1.0, rel_tol=1e-6)


def test_transforms_are_seeded_per_element_and_jitter_is_a_shift():
    x = torch.rand(3, 3, 20, 20)
    t = Transforms.standard()
    a = t(x, torch.Generator().manual_seed(5))
    b = t(x, torch.Generator().manual_seed(5))
    c = t(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 3, 44, 44)  # padded by 12
    same = x[:1].expand(3, -1, -1, -1)
    out = t(same, torch.Generator().manual_seed(5))
    assert not torch.allclose(out[0], out[1])  # different randomness per element
    # pure jitter by an integer shift is a translation: the interior equals the shifted input
    jit = Transforms(jitter=3)
    gen = torch.Generator().manual_seed(0)
    shift = torch.randint(-3, 4, (1, 2), generator=torch.Generator().manual_seed(0))[0]
    y = jit(x[:1], gen)
    dy, dx = int(shift[0]), int(shift[1])
    torch.testing.assert_close(y[0, :, 4:16, 4:16], x[0, :, 4 + dy:16 + dy, 4 + dx:16 + dx], atol=1e-5, rtol=1e-5)


def test_gaussian_blur_by_hand():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1
    y = gaussian_blur(x, 1.0)
    k = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / 2)
    k = k / k.sum()
    torch.testing.assert_close(y[0, 0, 1:8, 1:8], k[:, None] * k[None, :])
    assert math.isclose(float(y.sum()), 1.0, rel_tol=1e-5)


def test_objectives_against_hand_computation():
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    acts = {"l": a}
    out = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    torch.testing.assert_close(O.channel("l", [1, 2])(acts), torch.tensor([a[0, 1].mean(), a[1, 2].mean()]))
    torch.testing.assert_close(O.neuron("l", 0)(acts), a[:, 0, 1, 1])
    torch.testing.assert_close(O.neuron("l", 2, (0, 1))(acts), a[:, 2, 0, 1])
    torch.testing.assert_close(O.layer("l")(acts), a.pow(2).flatten(1).mean(1))
    torch.testing.assert_close(O.class_logit([2, 0])(acts, out), torch.tensor([3.0, 4.0]))
    v = torch.tensor([1.0, 0.0, -1.0])
    torch.testing.assert_close(O.direction("l", v)(acts), (a[:, 0] - a[:, 2]).flatten(1).mean(1))
    combo = O.channel("l", 0) - 0.5 * O.layer("l") + 2
    torch.testing.assert_close(combo(acts), a[:, 0].flatten(1).mean(1) - 0.5 * a.pow(2).flatten(1).mean(1) + 2)
    torch.testing.assert_close(O.channel("l", 0).on(1)(acts), torch.tensor([0.0, a[1, 0].mean()]))
    # diversity: identical Gram matrices -> -1 each; orthogonal ones -> 0
    same = {"l": torch.ones(2, 2, 1, 1)}
    torch.testing.assert_close(O.diversity("l")(same), torch.tensor([-1.0, -1.0]))
    ortho = {"l": torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)}
    torch.testing.assert_close(O.diversity("l")(ortho), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="unit 3 out of range"):
        O.channel("l", 3)(acts)
    with pytest.raises(ValueError, match="outside"):
        O.neuron("l", 0, (2, 0))(acts)


def test_redirected_relu_and_leaky_substitution():
    x = torch.tensor([[-1.0, 2.0], [-1.0, -2.0]], requires_grad=True)
    with ReluFix("redirect"):
        y = F.relu(x)
    g = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]])
    (gx,) = torch.autograd.grad(y, x, g)
    # row 0 has a live unit: the plain ReLU gradient; row 1 is all dead: gradient passed where it pushes up (g<0)
    torch.testing.assert_close(gx, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    h = x * 1
    with ReluFix("redirect"):
        out = nn.ReLU(inplace=True)(h)  # in place: same values, same gradient
    assert out is h
    torch.testing.assert_close(torch.autograd.grad(h, x, g)[0], gx)
    with ReluFix("redirect"):  # ReLU6 too: the same rule below zero, the clip above
        y6 = nn.ReLU6()(x * 4)
    (g6,) = torch.autograd.grad(y6, x, g)
    # row 0: 8 > 6 is clipped, so no gradient gets through anywhere and the redirect applies there too
    torch.testing.assert_close(g6, torch.tensor([[-4.0, 0.0], [-4.0, 0.0]]))
    relu = nn.ReLU()
    with ReluFix("leaky"):
        z = relu(x)
    torch.testing.assert_close(z, F.leaky_relu(x, 0.01))
    torch.testing.assert_close(relu(x), F.relu(x))  # nothing patched after the context


def digits_cnn():
    """A small CNN trained for a few seconds on scikit-learn's handwritten digits (16x16)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float)[:, None] / 16, size=16, mode="bilinear")
    y = torch.tensor(d.target)
    net = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 8, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                    conv2=nn.Conv2d(8, 16, 3, padding=1), relu2=nn.ReLU(),
                                    gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 10)))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(4):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    net.zero_grad(set_to_none=True)
    return net.eval(), x


@pytest.fixture(scope="module")
def trained():
    return digits_cnn()


@pytest.mark.parametrize("param", ["fft", "pixel"])
def test_a_rendered_channel_excites_its_unit_more_than_any_digit(trained, param):
    net, x = trained
    with torch.no_grad():
        real = net.relu2(net.conv2(net.pool1(net.relu1(net.conv1(x))))).mean((2, 3))  # (N, 16)
    channels = [c for c in range(16) if real[:, c].max() > 1][:4]  # units that real digits do drive
    res = lv.render(net, ("relu2", channels), size=16, channels=1, steps=256, param=param, transforms="none",
                    progress=False, seed=1)
    assert res.images.shape == (len(channels), 1, 16, 16)
    assert 0 <= float(res.images.min()) and float(res.images.max()) <= 1
    with torch.no_grad():
        got = net.relu2(net.conv2(net.pool1(net.relu1(net.conv1(res.images))))).mean((2, 3))
    for i, c in enumerate(channels):
        assert got[i, c] > real[:, c].max(), (c, float(got[i, c]), float(real[:, c].max()))
    assert (res.losses[-1] > res.losses[0]).all()


def test_same_seed_same_image_and_settings_are_json(trained):
    net, _ = trained
    before = hook_counts(net)
    net.train()
    kw = dict(size=(12, 14), channels=1, steps=5, progress=False)
    a = lv.render(net, ("conv2", [0, 3]), seed=3, **kw)
    b = lv.render(net, ("conv2", [0, 3]), seed=3, **kw)
    c = lv.render(net, ("conv2", [0, 3]), seed=4, **kw)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (2, 1, 12, 14) and a.losses.shape == (5, 2)
    settings = json.loads(json.dumps(a.settings))
    assert settings["size"] == [12, 14] and settings["seed"] == 3 and settings["transforms"]["pad"] == 12
    assert net.training and hook_counts(net) == before and all(p.grad is None for p in net.parameters())
    chunked = lv.render(net, ("conv2", [0, 3]), seed=3, chunk_size=1, **kw)
    assert chunked.images.shape == (2, 1, 12, 14)


def test_render_many_units_with_diversity_and_class_objective(trained):
    net, _ = trained
    obj = O.channel("relu2", [1, 1, 1]) + 0.5 * O.diversity("relu2")
    res = lv.render(net, obj, batch=3, size=16, channels=1, steps=4, progress=False)
    assert res.images.shape == (3, 1, 16, 16)
    res = lv.render(net, O.class_logit(7), batch=2, size=16, channels=1, steps=4, progress=False)
    assert res.losses.shape == (4, 2)


def test_video_and_vit_layers():
    torch.manual_seed(0)
    net3d = nn.Sequential(OrderedDict(conv=nn.Conv3d(3, 4, 3, padding=1), relu=nn.ReLU()))
    res = lv.render(net3d, ("relu", [0, 1]), size=(4, 12, 12), steps=3, progress=False)
    assert res.images.shape == (2, 3, 4, 12, 12)
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=3).eval()
    layer = "encoder.layers.encoder_layer_0"
    res = lv.render(vit, O.neuron(layer, [0, 5], (1, 0)), batch=2, size=16, steps=3, transforms="none",
                    progress=False)
    assert res.images.shape == (2, 3, 16, 16) and res.losses.shape == (3, 2)


def test_deep_dream_amplifies_the_layer(trained):
    net, x = trained
    img = x[0]
    dream = lv.deep_dream(net, img, "relu1", octaves=2, steps=5, lr=0.05, jitter=1, progress=False)
    assert dream.shape == img.shape and 0 <= float(dream.min()) and float(dream.max()) <= 1
    with torch.no_grad():
        before = net.relu1(net.conv1(img[None])).pow(2).mean()
        after = net.relu1(net.conv1(dream[None])).pow(2).mean()
    assert after > before
    tiled = lv.deep_dream(net, img, "relu1", octaves=1, steps=2, tile=8, progress=False)
    assert tiled.shape == img.shape


@pytest.mark.parametrize("call,pattern", [
    (lambda n: lv.render(n, ("conv9", [0]), steps=1, progress=False), "conv1|conv2"),
    (lambda n: lv.render(n, ("conv2", [99]), steps=1, channels=1, progress=False), "unit 99 out of range"),
    (lambda n: lv.render(n, "conv2", steps=1), "Objective or \\(layer, channels\\)"),
    (lambda n: lv.render(n, ("conv2", [0]), steps=0), "steps must be >= 1"),
    (lambda n: lv.render(n, ("conv2", [0]), param="wavelet", steps=1, channels=1, progress=False),
     "'fft' or 'pixel'"),
    (lambda n: ImageParam(1, 2, (4, 4)), "1 or 3 channels"),
])
def test_errors(trained, call, pattern):
    net, _ = trained
    before = hook_counts(net)
    with pytest.raises((ValueError, KeyError), match=pattern):
        call(net)
    assert hook_counts(net) == before
