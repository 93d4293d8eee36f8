"""invariance(): hand-checkable nets (a global-pool net is blind to circular shifts and quarter turns, a linear
readout's distance is known in closed form), the transforms pixel by pixel, batched == one by one, the plot, errors."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis.invariance import transform_images


def pooled_net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular"), relu=nn.ReLU(),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(6, 4))).eval()


def test_a_global_pool_net_is_blind_to_circular_shifts_and_quarter_turns():
    m = pooled_net()
    x = torch.randn(2, 3, 8, 8)
    inv = lv.invariance(m, x, ["relu", "pool"], "translate", [0, 1, 3, (2, -5)])
    assert inv.distances["relu"].shape == (4, 2)
    assert inv.distances["pool"].abs().max() < 1e-5  # the pooled features do not move
    assert inv.distances["relu"][0].abs().max() == 0  # no shift: the same maps
    assert (inv.distances["relu"][1:] > 1e-2).all()  # the maps themselves move with the image
    p0 = m(x).softmax(1).max(1).values
    torch.testing.assert_close(inv.probabilities, p0.expand(4, -1), atol=1e-5, rtol=0)
    assert torch.equal(inv.classes, m(x).argmax(1)) and torch.equal(inv.predicted, inv.classes.expand(4, -1))
    # a 1x1-conv net has no padding at all: quarter turns only permute its maps' pixels
    one = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 5, 1), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                    flat=nn.Flatten(), head=nn.Linear(5, 3))).eval()
    rot = lv.invariance(one, x, "pool", "rotate", [0, 90, 180, 270, 45])
    assert rot.distances["pool"][:4].abs().max() < 1e-5
    assert rot.distances["pool"][4].min() > 1e-3  # 45 degrees brings in the fill at the corners


def test_distances_equal_a_hand_computed_linear_readout():
    # a net that is one Linear on the flattened image: features of x shifted by d minus those of x = W (Tx - x)
    torch.manual_seed(1)
    m = nn.Sequential(OrderedDict(flat=nn.Flatten(), fc=nn.Linear(16, 3))).eval()
    x = torch.randn(2, 1, 4, 4)
    labels = torch.tensor([2, 0])
    inv = lv.invariance(m, x, ["flat", "fc"], "translate", [(0, 1), (1, 0)], labels=labels, fill=0.0)
    for a, (dy, dx) in enumerate([(0, 1), (1, 0)]):
        shifted = torch.zeros_like(x)
        shifted[..., dy:, dx:] = x[..., :4 - dy, :4 - dx]
        want_flat = (shifted - x).flatten(1).norm(dim=1)
        want_fc = ((shifted - x).flatten(1) @ m.fc.weight.T).norm(dim=1)
        torch.testing.assert_close(inv.distances["flat"][a], want_flat)
        torch.testing.assert_close(inv.distances["fc"][a], want_fc, atol=1e-5, rtol=1e-5)
        probs = m(shifted).softmax(1)
        torch.testing.assert_close(inv.probabilities[a], probs[[0, 1], labels])


def test_transforms_pixel_by_pixel():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 4] = 1.0  # top right
    assert transform_images(x, "rotate", 90.0)[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-5)  # counter-clockwise
    assert transform_images(x, "rotate", -90.0)[0, 0, 4, 4] == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(transform_images(x, "translate", (1, -1)), torch.roll(x, (1, -1), (-2, -1)))
    shifted = transform_images(x, "translate", (0, 1), fill=7.0)
    assert shifted[0, 0, :, 0].tolist() == [7.0] * 5 and shifted[0, 0, 0].sum() == 7.0  # the dot left the image
    y = torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(transform_images(y, "scale", 1.0), y)
    torch.testing.assert_close(transform_images(y, "rotate", 0.0), y)
    # zoom 2x about the centre of a 4x4 ramp z = 4y + x: output pixel i samples input coordinate 1.5 + (i - 1.5) / 2
    # (0.75, 1.25, 1.75, 2.25), where bilinear interpolation of a linear ramp is exact
    z = torch.arange(16.0).reshape(1, 1, 4, 4)
    c = torch.tensor([0.75, 1.25, 1.75, 2.25])
    torch.testing.assert_close(transform_images(z, "scale", 2.0)[0, 0], 4 * c[:, None] + c[None, :])
    # zoom out 0.5x: the corners are the fill
    small = transform_images(torch.ones(1, 1, 8, 8), "scale", 0.5, fill=-1.0)
    assert small[0, 0, 0, 0] == -1.0 and small[0, 0, 4, 4] == 1.0


def test_chunks_of_the_batch_agree():
    m = pooled_net()
    x = torch.randn(3, 3, 8, 8)
    amounts = [0.5, 0.75, 1.0, 1.5, 2.0]
    whole = lv.invariance(m, x, ["relu", "head"], "scale", amounts)
    small = lv.invariance(m, x, ["relu", "head"], "scale", amounts, batch_size=1)
    for name in whole.distances:
        torch.testing.assert_close(small.distances[name], whole.distances[name])
    torch.testing.assert_close(small.probabilities, whole.probabilities)
    assert whole.distances["relu"][2].abs().max() == 0  # scale 1 is the original
    for a, s in enumerate(amounts):  # one amount, one image at a time
        for i in range(3):
            one = lv.invariance(m, x[i:i + 1], "relu", "scale", [s])
            torch.testing.assert_close(one.distances["relu"][0, 0], whole.distances["relu"][a, i], rtol=1e-5,
                                       atol=1e-5)


def test_plot_and_save(tmp_path):
    m = pooled_net()
    inv = lv.invariance(m, torch.randn(2, 3, 8, 8), ["relu", "pool"], "rotate", [0, 30, 60])
    fig = inv.plot()
    assert len(fig.axes) == 3 and fig.axes[2].get_title() == "probability of the class"
    assert [float(v) for v in fig.axes[0].lines[0].get_xdata()] == [0.0, 30.0, 60.0]
    path = inv.save(tmp_path / "inv.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_refused_in_one_line():
    m = pooled_net()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="transform must be one of"):
        lv.invariance(m, x, "relu", "shear")
    with pytest.raises(ValueError, match="whole pixels"):
        lv.invariance(m, x, "relu", "translate", [1.5])
    with pytest.raises(ValueError, match="factors > 0"):
        lv.invariance(m, x, "relu", "scale", [0.0])
    with pytest.raises(ValueError, match="finite numbers"):
        lv.invariance(m, x, "relu", "rotate", [float("nan")])
    with pytest.raises(ValueError, match="give 1 to"):
        lv.invariance(m, x, "relu", "rotate", [])
    with pytest.raises(ValueError, match="batch"):
        lv.invariance(m, x[0], "relu")
    with pytest.raises(ValueError, match="class indices"):
        lv.invariance(m, x, "relu", labels=[9])
    with pytest.raises(ValueError, match=r"\(N, classes\) scores"):
        lv.invariance(m[:2], x, "conv")  # maps, not scores
