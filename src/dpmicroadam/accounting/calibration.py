"""Noise calibration: the σ that meets a target (ε, δ) for a fixed sample rate and step count."""

from __future__ import annotations

import math

from dpmicroadam.accounting._validate import (
    check_accountant,
    check_delta,
    check_epsilon,
    check_sample_rate,
    check_steps,
)
from dpmicroadam.accounting.analysis import _epsilon

MAX_NOISE_MULTIPLIER = 1e3
"""Default upper end of the search. At σ = 1000 the noise std on the averaged gradient is
1000·C/B: even with B = 10⁵ examples per step it is 1 % of C per coordinate-direction, which
drowns any realistic gradient. A budget that needs more noise than this cannot train anything
useful; change the budget, the steps or the sample rate instead."""

MIN_NOISE_MULTIPLIER = 0.05
"""Lower end of the search. Below it ε is in the hundreds or more for any useful run, and the
PLD grids become large; a budget met at σ = 0.05 returns 0.05."""

RTOL = 1e-3


def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    *,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    rtol: float = RTOL,
) -> float:
    """Smallest σ (to relative tolerance ``rtol``) whose ε stays within ``target_epsilon``.

    Bisection on log σ, using that ε decreases in σ. The returned σ is always one whose ε was
    computed with :func:`epsilon` (same accountant, same discretization) and found
    ``<= target_epsilon``: the budget is never exceeded, unlike checking ε once per epoch.

    Args:
        target_epsilon: ε budget, > 0.
        target_delta: δ in (0, 1).
        sample_rate: Poisson inclusion probability q in (0, 1].
        steps: number of optimizer steps T ≥ 1 the budget must cover.
        accountant: ``"pld"`` (default) or ``"rdp"``, as for :func:`epsilon`.
        max_noise_multiplier: give up above this σ (see :data:`MAX_NOISE_MULTIPLIER`).
        rtol: stop when the bracket ``[lo, hi]`` has ``hi / lo − 1 <= rtol``; ``hi`` is returned.

    Returns:
        σ with ``epsilon(σ, sample_rate, steps, target_delta, accountant) <= target_epsilon``
        and, unless σ is :data:`MIN_NOISE_MULTIPLIER`, σ/(1 + rtol) exceeding the budget.

    Raises:
        ValueError: an argument is out of range, or no σ up to ``max_noise_multiplier`` meets
            the budget.
    """
    eps_target = check_epsilon(target_epsilon, "target_epsilon")
    delta = check_delta(target_delta, "target_delta")
    q = check_sample_rate(sample_rate)
    t = check_steps(steps)
    kind = check_accountant(accountant)
    if t == 0:
        raise ValueError(
            "steps must be >= 1 to calibrate noise_multiplier (with 0 steps nothing is "
            "released and any noise meets the budget), got 0"
        )
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    if not (
        isinstance(max_noise_multiplier, (int, float))
        and MIN_NOISE_MULTIPLIER < max_noise_multiplier < math.inf
    ):
        raise ValueError(
            f"max_noise_multiplier must be a finite number above {MIN_NOISE_MULTIPLIER}, "
            f"got {max_noise_multiplier!r}"
        )

    def meets(sigma: float) -> bool:
        return _epsilon(sigma, q, t, delta, kind) <= eps_target

    # Bracket [lo, hi] with lo failing the budget and hi meeting it, starting from a guess.
    # The Gaussian-mechanism-like guess q·sqrt(T·2·log(1.25/δ))/ε is usually within ~2×.
    guess = q * math.sqrt(2.0 * t * math.log(1.25 / delta)) / eps_target
    guess = min(max(guess, MIN_NOISE_MULTIPLIER), float(max_noise_multiplier))
    if meets(guess):
        hi = guess
        lo = hi / 2
        while meets(lo):
            if lo <= MIN_NOISE_MULTIPLIER:
                return MIN_NOISE_MULTIPLIER
            hi, lo = lo, max(lo / 2, MIN_NOISE_MULTIPLIER)
    else:
        lo = guess
        hi = min(lo * 2, float(max_noise_multiplier))
        while not meets(hi):
            if hi >= max_noise_multiplier:
                raise ValueError(
                    f"no noise_multiplier up to max_noise_multiplier={max_noise_multiplier:g} "
                    f"meets target_epsilon={eps_target:g} at target_delta={delta:g} with "
                    f"sample_rate={q:g} and steps={t} ({kind} accountant: "
                    f"ε={_epsilon(float(max_noise_multiplier), q, t, delta, kind):.4g} there); "
                    "raise target_epsilon, or lower steps or sample_rate (smaller "
                    "expected_batch_size)"
                )
            lo, hi = hi, min(hi * 2, float(max_noise_multiplier))
    while hi / lo - 1 > rtol:
        mid = math.sqrt(lo * hi)
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi
