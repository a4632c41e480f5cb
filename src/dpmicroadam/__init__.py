"""dpmicroadam: differentially private training with DP-MicroAdam.

Public names are loaded on first use, so that ``import dpmicroadam.accounting`` stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MicroAdam": "dpmicroadam.optim",
    "AdamBC": "dpmicroadam.optim",
    "state_bytes": "dpmicroadam.optim",
    "DPConfig": "dpmicroadam.mechanism",
    "DPMechanism": "dpmicroadam.mechanism",
    "PrivateGradient": "dpmicroadam.privacy",
    "PoissonSampler": "dpmicroadam.data",
    "epsilon": "dpmicroadam.accounting",
    "calibrate_noise_multiplier": "dpmicroadam.accounting",
    "train": "dpmicroadam.train",
    "keep_freed_memory": "dpmicroadam.allocator",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpmicroadam' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
