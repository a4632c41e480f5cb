"""Building a model by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from dpmicroadam.models.cnn import TanhCNN28, TanhCNN32
from dpmicroadam.models.mlp import MLP
from dpmicroadam.models.wrn import WideResNet

MODEL_NAMES = ("mlp", "cnn", "wrn16-4")


def _shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape={tuple(input_shape)!r} must be (C, H, W), e.g. (1, 28, 28)")
    return shape  # type: ignore[return-value]


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build a classifier for images of ``input_shape``.

    Args:
        name: ``"mlp"`` (:class:`~dpmicroadam.models.mlp.MLP`; kwargs ``hidden_sizes``,
            ``activation``), ``"cnn"`` (the tanh CNN: 28x28 or 32x32 inputs only, see
            :mod:`dpmicroadam.models.cnn`), or ``"wrn16-4"``
            (:class:`~dpmicroadam.models.wrn.WideResNet`; kwarg ``groups``).
        input_shape: ``(C, H, W)`` of one example.
        num_classes: Number of output logits, >= 2.
        **kwargs: Extra constructor arguments for the chosen model.

    Returns:
        The model, in training mode, on CPU, float32.

    Raises:
        ValueError: for an unknown name (lists the valid ones), a bad shape or class count,
            or a ``cnn`` on image sizes it is not defined for.
    """
    c, h, w = _shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    if name == "mlp":
        return MLP(c * h * w, num_classes, **kwargs)
    if name == "cnn":
        if (h, w) == (28, 28):
            return TanhCNN28(c, num_classes, **kwargs)
        if (h, w) == (32, 32):
            return TanhCNN32(c, num_classes, **kwargs)
        raise ValueError(
            f"model 'cnn' is defined for 28x28 or 32x32 images, got input_shape={(c, h, w)}; "
            "use 'mlp' for small images such as the 8x8 digits"
        )
    if name == "wrn16-4":
        return WideResNet(depth=16, width=4, num_classes=num_classes, in_channels=c, **kwargs)
    raise ValueError(f"unknown model name={name!r}; valid names: {', '.join(MODEL_NAMES)}")
