"""The small tanh CNNs of Papernot et al. (arXiv 2007.14191) and Tramèr & Boneh (2011.11660).

For 28x28 one-channel images (MNIST, Fashion-MNIST), 26 010 parameters with 10 classes::

    conv 1->16, 8x8, stride 2, padding 3 -> tanh -> maxpool 2, stride 1
    conv 16->32, 4x4, stride 2           -> tanh -> maxpool 2, stride 1
    flatten (32*4*4 = 512) -> linear 512->32 -> tanh -> linear 32->num_classes

For 32x32 images (CIFAR-10), the published CIFAR-10 architecture of the same papers
(≈551 k parameters with 3 channels and 10 classes)::

    [conv 3x3 pad 1 -> tanh] x 2 (32 channels) -> maxpool 2
    [conv 3x3 pad 1 -> tanh] x 2 (64 channels) -> maxpool 2
    [conv 3x3 pad 1 -> tanh] x 2 (128 channels) -> maxpool 2
    flatten (128*4*4 = 2048) -> linear 2048->128 -> tanh -> linear 128->num_classes

Other image sizes (e.g. the 8x8 digits) are refused: use ``mlp`` there.
"""

from __future__ import annotations

import torch
from torch import nn


class TanhCNN28(nn.Module):
    """The 26 k-parameter tanh CNN for 28x28 images, or a wider one.

    Args:
        in_channels: Input channels (1 for MNIST-like data).
        num_classes: Number of output logits.
        width: Channel multiplier of both convolutions and of the hidden linear layer (1: the
            published network; 2: ~102 k parameters; 4: ~400 k).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 1) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an int >= 1, got {width!r}")
        c1, c2, hidden = 16 * width, 32 * width, 32 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(c1, c2, 4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TanhCNN32(nn.Module):
    """The tanh CNN for 32x32 images (CIFAR-10 in Papernot et al., Tramèr & Boneh).

    Args:
        in_channels: Input channels (3 for CIFAR-10).
        num_classes: Number of output logits.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for out in (32, 64, 128):
            layers += [
                nn.Conv2d(width, out, 3, padding=1),
                nn.Tanh(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.Tanh(),
                nn.MaxPool2d(2, stride=2),
            ]
            width = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, 128),
            nn.Tanh(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
