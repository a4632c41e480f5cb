"""A plain multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def default_hidden_sizes(in_features: int) -> tuple[int, ...]:
    """Hidden widths used when none are given: (128,) up to 256 inputs, else (512, 512)."""
    return (128,) if in_features <= 256 else (512, 512)


class MLP(nn.Module):
    """Flatten, then ``Linear -> activation`` per hidden layer, then a linear classifier.

    Args:
        in_features: Number of input features (C*H*W for images).
        num_classes: Number of output logits.
        hidden_sizes: Width of each hidden layer; defaults to :func:`default_hidden_sizes`.
        activation: ``"tanh"`` (bounded activations suit DP-SGD, Papernot et al.,
            arXiv 2007.14191) or ``"relu"``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: Sequence[int] | None = None,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
            )
        sizes = tuple(default_hidden_sizes(in_features) if hidden_sizes is None else hidden_sizes)
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"hidden_sizes={sizes!r} must be positive integers")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in sizes:
            layers += [nn.Linear(width, int(size)), _ACTIVATIONS[activation]()]
            width = int(size)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
