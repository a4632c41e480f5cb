"""Privacy accounting for Poisson-subsampled Gaussian training (no torch import).

- :func:`epsilon`: ε of T steps at noise multiplier σ and sample rate q, for a δ.
- :func:`calibrate_noise_multiplier`: the σ that meets a target (ε, δ) for given q and T.
- :class:`Accountant`: running step count and ε, with ``state_dict``.
- :func:`check_delta` / :class:`PrivacyWarning`: warn when δ ≥ 1/N.
"""

from dpmicroadam.accounting._validate import ACCOUNTANTS
from dpmicroadam.accounting.accountant import Accountant
from dpmicroadam.accounting.calibration import calibrate_noise_multiplier
from dpmicroadam.accounting.delta import PrivacyWarning, check_delta
from dpmicroadam.accounting.epsilon import epsilon
from dpmicroadam.accounting.lower_bound import (
    audit_p_value,
    epsilon_lower_bound,
    max_epsilon_lower_bound,
)

__all__ = [
    "audit_p_value",
    "epsilon_lower_bound",
    "max_epsilon_lower_bound",
    "ACCOUNTANTS",
    "Accountant",
    "PrivacyWarning",
    "calibrate_noise_multiplier",
    "check_delta",
    "epsilon",
]
