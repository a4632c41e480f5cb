"""Size of an optimizer's state."""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by all tensors in ``optimizer.state`` (any torch optimizer).

    Args:
        optimizer: a stepped optimizer (state is created lazily, so it is 0 before step 1).

    Returns:
        The sum of ``numel * element_size`` over every state tensor, step counters included.
    """
    total = 0
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
    return total
