"""Swapping BatchNorm for GroupNorm, which keeps examples independent."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _group_count(num_channels: int, groups: int) -> int:
    return math.gcd(num_channels, groups)


def replace_batchnorm(model: nn.Module, groups: int = 32) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (and SyncBatchNorm) in ``model`` with GroupNorm.

    BatchNorm mixes the examples of a batch, so per-example gradients (and DP clipping) are
    undefined with it. Each replacement uses ``gcd(groups, C)`` groups for C channels (the
    largest count dividing both; 32 for 64 channels, 2 for 10), keeps ``affine`` and ``eps``,
    and copies the affine weight and bias. Running statistics are dropped.

    Args:
        model: The model, modified in place.
        groups: Preferred number of groups, >= 1.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if ``groups`` < 1 or ``model`` is itself a BatchNorm module.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r} must be a positive integer, e.g. 32")
    if isinstance(model, _BatchNorm):
        raise ValueError("model is itself a BatchNorm module; build an nn.GroupNorm instead")
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, _BatchNorm):
                continue
            channels = child.num_features
            norm = nn.GroupNorm(_group_count(channels, groups), channels, child.eps, child.affine)
            if child.affine:
                norm.to(device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                    norm.bias.copy_(child.bias)
            setattr(parent, child_name, norm)
    return model
