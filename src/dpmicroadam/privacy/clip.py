"""Flat per-example clipping: the one clip-factor formula and the checks of its settings.

Clipping example i's gradient (flat over all trainable tensors) at C multiplies it by

    f_i = min(1, C / ‖g_i‖₂)

so that ‖f_i·g_i‖ ≤ C: the sensitivity of the clipped sum under adding or removing one example.
Both per-example engines (vmap and fast) take their factors from :func:`clip_factors`.

The value checks here are the rules of ``dpmicroadam.mechanism.DPConfig`` (which owns them and
calls these functions) and of :class:`~dpmicroadam.privacy.PrivateGradient`; the engines trust
the values they are given.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_augmult", "check_clip_norm", "check_noise_multiplier", "clip_factors"]


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``min(1, C / norm)`` per example; all ones for C = inf (no clipping).

    A zero gradient contributes zero whatever its factor; the lower clamp only avoids 0/0.
    """
    if math.isinf(clip_norm):
        return torch.ones_like(norms)
    # C / n as torch computes it for a number over a tensor (reciprocal, then times C), in place
    # on one fresh tensor: the same values, two tensors fewer a step.
    return norms.clamp_min(1e-30).reciprocal_().mul_(clip_norm).clamp_(max=1.0)


def _number(value: object, name: str) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def check_clip_norm(value: object) -> float:
    """C > 0 (``inf`` allowed: no clipping); raise naming ``clip_norm`` otherwise."""
    c = _number(value, "clip_norm")
    if math.isnan(c) or c <= 0:
        raise ValueError(f"clip_norm must be > 0, got {value!r} (inf disables clipping)")
    return c


def check_noise_multiplier(value: object) -> float:
    """σ ≥ 0 and finite."""
    s = _number(value, "noise_multiplier")
    if not 0 <= s < math.inf:
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {value!r}")
    return s


def check_augmult(value: object) -> int:
    """K ≥ 1, an int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"augmult must be an int >= 1, got {value!r}")
    return value
