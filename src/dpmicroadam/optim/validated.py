"""A torch optimizer whose param groups are validated when created and when added."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer


class ValidatedOptimizer(Optimizer):
    """Runs ``validate_group`` on the defaults and on every group added later.

    A group that fails validation is not kept, so the optimizer never holds bad hyper-parameters.
    """

    validate_group: Callable[[dict], None]

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        type(self).validate_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, filling defaults, and validate its hyper-parameters."""
        super().add_param_group(param_group)
        try:
            type(self).validate_group(self.param_groups[-1])
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
