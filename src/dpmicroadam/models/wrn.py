"""WRN-16-4 with GroupNorm and scaled weight standardization (De et al., arXiv 2204.13650).

No BatchNorm (it mixes examples, which per-example clipping forbids) and no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WSConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardization, per output channel.

    .. math::
        \\hat w = \\frac{(w - \\mathrm{mean}(w))\\, g}{\\sqrt{\\max(\\mathrm{fan\\_in}\\cdot
        \\mathrm{var}(w),\\ 10^{-4})}}

    with mean and (biased) variance over the ``fan_in = C_in/groups * kh * kw`` weights of each
    output channel, a learnable gain ``g`` (init 1) and a bias (init 0). Same arguments as
    :class:`torch.nn.Conv2d`; a bias is always used.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["bias"] = True
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels))
        nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        """The weight actually used by the convolution."""
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=1e-4))
        return (w - mean) * scale * self.gain.view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x,
            self.standardized_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class PreActBlock(nn.Module):
    """ReLU -> GroupNorm -> conv3x3 -> ReLU -> GroupNorm -> conv3x3, plus shortcut.

    The shortcut is the identity, or a 1x1 WS projection when the stride or width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = WSConv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = WSConv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = WSConv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.norm1(F.relu(x)))
        out = self.conv2(self.norm2(F.relu(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet with GroupNorm and WS convolutions.

    Stem: 3x3 WS conv to 16 channels. Then 3 groups of ``(depth - 4) // 6`` blocks with widths
    ``16*width, 32*width, 64*width`` and strides 1, 2, 2. Head: ReLU -> GroupNorm -> global
    average pool -> Linear. WRN-16-4 (the defaults) has 2 blocks per group and widths
    64/128/256.

    Args:
        depth: 6n + 4 (16 for WRN-16-4).
        width: Widening factor k.
        num_classes: Number of output logits.
        in_channels: Input image channels.
        groups: GroupNorm groups (must divide every width; 16 by default).
    """

    def __init__(
        self,
        depth: int = 16,
        width: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        groups: int = 16,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth!r} must be 6n + 4 with n >= 1, e.g. 16 or 28")
        widths = [16 * width, 32 * width, 64 * width]
        if any(w % groups for w in [16, *widths]):
            raise ValueError(f"groups={groups!r} must divide all widths {[16, *widths]}")
        blocks_per_group = (depth - 4) // 6
        self.stem = WSConv2d(in_channels, 16, 3, padding=1)
        blocks: list[nn.Module] = []
        channels = 16
        for out_channels, stride in zip(widths, (1, 2, 2)):
            for i in range(blocks_per_group):
                blocks.append(PreActBlock(channels, out_channels, stride if i == 0 else 1, groups))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head_norm = nn.GroupNorm(groups, channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        out = self.head_norm(F.relu(out))
        return self.fc(out.mean(dim=(2, 3)))
