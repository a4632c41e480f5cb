"""Plain torch optimizers: MicroAdam and AdamBC. They know nothing about privacy."""

from .microadam import MicroAdam
from .state import state_bytes

__all__ = ["MicroAdam", "state_bytes"]
