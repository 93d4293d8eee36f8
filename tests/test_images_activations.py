"""Image utilities against hand-computed values; activation maps and predictions on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lightning_vis as lv
from lightning_vis import images as im
from lightning_vis.hooks import Layout, LayoutError, hook_counts

from .test_hooks import tiny


def test_normalize_per_image_and_shared():
    x = torch.tensor([[[0.0, 2.0], [4.0, 8.0]], [[1.0, 1.5], [2.0, 3.0]]])
    per = im.normalize(x, "per_image")
    torch.testing.assert_close(per[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(per[1], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    shared = im.normalize(x, "shared")
    torch.testing.assert_close(shared[1], torch.tensor([[0.125, 0.1875], [0.25, 0.375]]))
    assert torch.equal(im.normalize(torch.full((2, 2), 3.0)), torch.zeros(2, 2))  # flat map: no NaN
    with pytest.raises(ValueError, match="per_image' or 'shared"):
        im.normalize(x, "global")


def test_colormap_endpoints_and_interpolation():
    x = torch.tensor([[0.0, 0.5, 1.0]])
    rgb = im.colormap(x, "gray")
    assert rgb.shape == (3, 1, 3)
    torch.testing.assert_close(rgb[:, 0, 1], torch.tensor([0.5, 0.5, 0.5]))
    v = im.colormap(x, "viridis")
    torch.testing.assert_close(v[:, 0, 0], torch.tensor([0x44, 0x01, 0x54]) / 255)
    torch.testing.assert_close(v[:, 0, 2], torch.tensor([0xFD, 0xE7, 0x25]) / 255)
    torch.testing.assert_close(v[:, 0, 1], torch.tensor([0x21, 0x91, 0x8C]) / 255)  # the middle anchor
    with pytest.raises(ValueError, match="available: viridis"):
        im.colormap(x, "rainbow")


def test_grid_layout():
    maps = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 2, 2) / 10
    g = im.grid(maps, pad=1, pad_value=1.0)
    assert g.shape == (1, 2 * 3 + 1, 3 * 3 + 1)  # ceil(sqrt(5)) = 3 columns, 2 rows
    assert g[0, 1, 1] == 0.0 and g[0, 1, 4] == pytest.approx(0.1) and g[0, 4, 1] == pytest.approx(0.3)
    assert g[0, 4, 7] == 1.0  # the empty sixth cell is padding
    assert g[0, 0, 0] == 1.0
    with pytest.raises(ValueError, match="N > 0"):
        im.grid(torch.zeros(0, 2, 2))


def test_overlay_blends_and_resizes():
    image = torch.rand(3, 8, 8)
    heat = torch.rand(2, 2)
    torch.testing.assert_close(im.overlay(image, heat, alpha=0.0), image)
    full = im.overlay(image, heat, alpha=1.0, cmap="gray")
    up = F.interpolate(heat[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(full[0], im.normalize(up))


def test_save_png_round_trip(tmp_path):
    img = torch.rand(3, 5, 7)
    path = im.save_png(img, tmp_path / "a" / "x.png")
    back = torch.from_numpy(__import__("numpy").array(Image.open(path)))
    assert torch.equal(back, im.to_uint8(img))
    gray = im.save_png(torch.rand(1, 4, 4), tmp_path / "g.png")
    assert Image.open(gray).mode == "L"


def test_activations_match_the_layers_and_restore_the_model():
    m = tiny().train()
    x = torch.randn(2, 3, 8, 8)
    acts, logits = lv.activations(m, x, ["features.0", "features.3", "classifier"])
    assert list(acts) == ["features.0", "features.3", "classifier"]
    conv = F.conv2d(x, m.features[0].weight, m.features[0].bias, padding=1)
    torch.testing.assert_close(acts["features.0"], conv)
    torch.testing.assert_close(acts["classifier"], logits)
    assert all(mod.training for mod in m.modules()) and hook_counts(m) == 0
    assert m.features[4].num_batches_tracked.item() == 0  # ran in eval mode
    g = lv.activation_grid(acts["features.3"], index=1)
    assert g.shape == (3, 2 * 5 + 1, 3 * 5 + 1)  # 6 filters of 4x4: 3 columns x 2 rows of 4x4 cells, 1px padding
    assert lv.activation_grid(acts["features.3"], max_filters=4, ncol=4).shape == (3, 6, 21)
    with pytest.raises(IndexError, match="out of range"):
        lv.activation_grid(acts["features.3"], index=2)
    with pytest.raises(ValueError, match="activation maps need"):
        lv.activation_grid(acts["classifier"])


def test_activation_grid_1d_and_3d():
    a1 = torch.randn(1, 4, 10)
    assert lv.activation_grid(a1, ncol=1, layout=Layout("channels_first", (10,))).shape == (3, 4 * 2 + 1, 12)
    a3 = torch.randn(1, 2, 5, 3, 3)
    g = lv.activation_grid(a3, scale="shared", cmap="gray", ncol=2, layout=Layout("channels_first", (5, 3, 3)))
    expected = im.normalize(a3[0, :, 2], "shared")
    torch.testing.assert_close(g[0, 1:4, 1:4], expected[0])


def test_top_predictions():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    top = lv.top_predictions(logits, k=2, class_names=["cat", "dog", "emu"])
    p = torch.tensor([1.0, 3.0, 2.0]).softmax(0)
    assert [(i, n) for i, n, _ in top[0]] == [(1, "dog"), (2, "emu")]
    assert top[0][0][2] == pytest.approx(float(p[1]))
    assert top[1][0][:2] == (2, "emu") and math.isclose(sum(q for *_, q in lv.top_predictions(logits, 3)[1]), 1.0,
                                                         rel_tol=1e-6)
    with pytest.raises(ValueError, match="between 1 and the number of classes"):
        lv.top_predictions(logits, k=4)
    assert len(lv.top_predictions(logits)[0]) == 3  # the default 5 clipped to the 3 classes
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        lv.top_predictions(logits, class_names=["a", "b"])


def test_activation_grid_cell_sizes():
    import torch.nn.functional as F

    from lightning_vis.activations import activation_grid

    a = torch.randn(1, 6, 7, 10)
    enlarged = F.interpolate(a, scale_factor=5, mode="nearest")  # 10 px wide -> at least 48: a factor of 5
    torch.testing.assert_close(activation_grid(a, cell=48), activation_grid(enlarged))
    assert activation_grid(a, cell=(20, 30)).shape == (3, 1 + 2 * 21, 1 + 3 * 31)
    big = torch.randn(1, 4, 64, 64)
    shrunk = activation_grid(big, cell=(16, 16))
    assert shrunk.shape == (3, 1 + 2 * 17, 1 + 2 * 17)
    assert torch.equal(activation_grid(big, cell=(64, 64)), activation_grid(big))
