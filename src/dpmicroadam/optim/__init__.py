"""Plain torch optimizers: MicroAdam and AdamBC. They know nothing about privacy."""

from .adambc import AdamBC
from .microadam import MicroAdam
from .state import state_bytes

__all__ = ["AdamBC", "MicroAdam", "state_bytes"]
