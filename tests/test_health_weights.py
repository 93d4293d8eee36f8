"""Which module's filters filter health reads for a layer (health._weights_for through weight_health): the layer
itself, the main path of a block (never its shortcut or its squeeze-and-excitation gate), the convolution before an
activation; and None with a reason where no module's filters make the channels."""

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops import SqueezeExcitation

from lightning_vis.health import filter_health, weight_health


def _from(model, name, channels):
    wname, wmod, zero, noise, dups, why = weight_health(model, name, model.get_submodule(name), channels)
    return wname, why


@pytest.mark.parametrize("block, want", [("layer2.0", "layer2.0.conv2"), ("layer3.0", "layer3.0.conv2"),
                                         ("layer1", "layer1.1.conv2"), ("layer1.0", "layer1.0.conv2")])
def test_resnet_blocks_read_their_last_main_path_convolution_not_the_shortcut(block, want):
    m = torchvision.models.resnet18()
    channels = m.get_submodule(want).out_channels
    wname, why = _from(m, block, channels)
    assert (wname, why) == (want, None)
    _, wmod, _, noise, _, _ = weight_health(m, block, m.get_submodule(block), channels)
    assert wmod is m.get_submodule(want) and noise is not None and noise.shape == (channels,)  # 3x3: a spectrum


class SEBottleneck(nn.Module):
    """conv3 makes the channels; the gate's fc2 and the shortcut's conv have as many filters, defined after it."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(4, c, 1)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.se = SqueezeExcitation(c, c)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.shortcut = nn.Sequential(nn.Conv2d(4, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.se(self.conv3(self.conv1(x)))
        return torch.relu(y * self.gate(y).sigmoid() + self.shortcut(x))


def test_squeeze_excitation_and_gates_are_not_the_main_path():
    m = nn.Sequential(SEBottleneck())
    assert _from(m, "0", 8) == ("0.conv3", None)


class OnlyShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.downsample = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1) + self.downsample(x)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_a_block_whose_channels_no_main_path_module_makes_is_refused_with_a_reason():
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), OnlyShortcut())
    wname, why = _from(m, "1", 6)
    assert wname is None and "'1.downsample' is a shortcut branch" in why
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), Concat())
    wname, why = _from(m, "1", 6)
    assert wname is None and "no module inside '1' has 6 output filters" in why
    rep = filter_health(m, DataLoader(TensorDataset(torch.rand(4, 3, 8, 8)), batch_size=2), ["1"], progress=False,
                        layout="channels_first")
    h = rep.layers["1"]
    assert h.weights_from is None and h.weights_note == why and h.zero_weights is None and h.duplicates == []
    assert h.active_fraction.shape == (6,)


def test_an_activation_reads_the_convolution_before_it():
    m = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU())
    assert _from(m, "1", 5) == ("0", None)
    assert _from(m, "0", 5) == ("0", None)
    wname, why = _from(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 5, 3)), "0", 3)
    assert wname is None and "before '0'" in why
