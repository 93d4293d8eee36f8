"""Model factories for the CLI tests (`--model tests.cli_models:tiny_cnn`)."""

from collections import OrderedDict

import torch
from torch import nn


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(inplace=True), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(4, 6, 3, padding=1), relu2=nn.ReLU(), gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
        fc=nn.Linear(6, 3)))


def not_a_model():
    return 42


def tiny_video_cnn():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv3d(3, 4, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool3d(2),
        conv2=nn.Conv3d(4, 6, 3, padding=1), gap=nn.AdaptiveAvgPool3d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3)))


def tiny_vit():
    """A torchvision ViT with a 2x2 patch grid at 32 px (a class token in front), its head not zero."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8,
                            num_classes=3)
    nn.init.normal_(vit.heads.head.weight)
    return vit
