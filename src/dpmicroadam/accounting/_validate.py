"""Argument checks shared by the accounting functions.

Every check raises a ``ValueError`` (or ``TypeError`` for a wrong type) that names the argument,
shows the value and says what is allowed.
"""

from __future__ import annotations

import math
import numbers

ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
"""Accountant kinds understood by :func:`epsilon`: ``"pld"`` (privacy loss distributions, the
default, tight up to discretization and always an upper bound) and ``"rdp"`` (Rényi DP, looser)."""


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return value


def check_noise_multiplier(noise_multiplier: object) -> float:
    sigma = _real("noise_multiplier", noise_multiplier)
    if sigma < 0:
        raise ValueError(
            f"noise_multiplier must be >= 0 (0 means no noise and infinite epsilon), "
            f"got {noise_multiplier!r}"
        )
    return sigma


def check_sample_rate(sample_rate: object) -> float:
    q = _real("sample_rate", sample_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(
            f"sample_rate must be in (0, 1] (the Poisson inclusion probability "
            f"expected_batch_size / dataset_size), got {sample_rate!r}"
        )
    return q


def check_steps(steps: object, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        if isinstance(steps, numbers.Real) and float(steps).is_integer():
            steps = int(steps)
        else:
            raise TypeError(f"{name} must be a whole number of steps, got {steps!r}")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps!r}")
    return steps


def check_delta_range(delta: object, name: str = "delta") -> float:
    d = _real(name, delta)
    if not 0.0 < d < 1.0:
        raise ValueError(
            f"{name} must be in (0, 1) (typically well below 1/dataset_size), got {delta!r}"
        )
    return d


def check_epsilon(epsilon: object, name: str = "target_epsilon") -> float:
    e = _real(name, epsilon)
    if not 0.0 < e < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {epsilon!r}")
    return e


def check_accountant(accountant: object) -> str:
    if not isinstance(accountant, str) or accountant.lower() not in ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {', '.join(repr(a) for a in ACCOUNTANTS)}, "
            f"got {accountant!r}"
        )
    return accountant.lower()
