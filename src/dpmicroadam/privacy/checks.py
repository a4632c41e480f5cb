"""Refuse models whose per-example gradients would not be per-example.

A per-example gradient is only private if the loss of example i depends on example i alone.
Batch normalisation breaks this in two ways: in training mode its output mixes the statistics
of the whole batch, and its running statistics (a buffer updated from the batch) end up in the
released model without noise. Both engines (vmap and fast hooks) rely on this check.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

# The dropout modules of torch.nn (their common base class is private).
DROPOUT_TYPES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip

__all__ = ["check_per_example_safe", "find_unsafe_modules", "find_active_randomness"]

_FIX = (
    "Replace it with GroupNorm (dpmicroadam.models.replace_batchnorm converts every "
    "BatchNorm of a model), or LayerNorm for sequence models."
)


def find_unsafe_modules(model: nn.Module) -> list[tuple[str, str, str]]:
    """List the modules that mix examples or learn statistics from the batch.

    Args:
        model: The model to inspect.

    Returns:
        ``(path, class name, reason)`` for each offending module, in ``named_modules`` order.
    """
    found = []
    for path, module in model.named_modules():
        name = path or "<root>"
        if isinstance(module, _BatchNorm):
            # Refused in eval mode too: its running statistics were (or will be) computed
            # from raw batches, outside the per-example clipping.
            found.append((name, type(module).__name__, "normalises with batch statistics"))
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            found.append((name, type(module).__name__, "updates running statistics from the batch"))
    return found


def check_per_example_safe(model: nn.Module) -> None:
    """Raise if the model has a layer that mixes examples of a batch.

    Refused: every ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy BatchNorm, and
    ``InstanceNorm*`` with ``track_running_stats=True``. GroupNorm, LayerNorm and
    InstanceNorm without running statistics normalise each example on its own and are fine.

    Args:
        model: The model to check.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: Naming every offending module path and class, e.g.
            ``layer1.0.bn1 (BatchNorm2d)``, and suggesting GroupNorm.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = find_unsafe_modules(model)
    if found:
        listed = "; ".join(f"{path} ({cls}): {why}" for path, cls, why in found)
        raise ValueError(
            f"model is not safe for per-example gradients (differential privacy needs each "
            f"example's gradient to depend on that example alone): {listed}. {_FIX}"
        )


def find_active_randomness(model: nn.Module) -> list[tuple[str, str]]:
    """List dropout modules that are active (training mode and ``p > 0``).

    Args:
        model: The model to inspect.

    Returns:
        ``(path, class name)`` for each active dropout module.
    """
    found = []
    for path, module in model.named_modules():
        if isinstance(module, DROPOUT_TYPES) and module.training and module.p > 0:
            found.append((path or "<root>", type(module).__name__))
    return found
