"""Noise calibration: the σ that meets a target (ε, δ) for a fixed sample rate and step count."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from dpmicroadam.accounting._validate import (
    check_accountant,
    check_delta_range,
    check_epsilon,
    check_sample_rate,
    check_steps,
)
from dpmicroadam.accounting.epsilon import _epsilon

MAX_NOISE_MULTIPLIER = 1e3
"""Default upper end of the search. The noise in the released (averaged) gradient has norm
≈ σ·C·sqrt(d)/B against a signal of norm at most C; at σ = 1000 with B = 10⁵ examples per step
and d = 10⁶ parameters that is 10·C, so no useful model trains. A budget that needs more noise
cannot be met usefully: change the budget, the steps or the sample rate instead."""

MIN_NOISE_MULTIPLIER = 0.05
"""Lower end of the search. Below it ε is in the hundreds or more for any useful run, and the
PLD grids become large; a budget met at σ = 0.05 returns 0.05."""

START_FLOOR = 0.3
"""The search starts at no smaller σ than this. The PLD's grid grows as σ shrinks: one ε at
σ = 0.05 took 8.3 s here, at 0.2 1.2 s, near 0.45 0.5 s. The closed-form start (below) assumes
amplification by subsampling is linear in q, which fails for few steps: ε = 8 in 3 steps at
q = 0.045 starts at 0.047 against an answer of 0.445, and the search spent 12 of its 12.2 s
below 0.3 (2.9 s with this floor; 1.3 s since the one-step PLD is built on arrays). Answers
below the floor are still found: the search steps down to them."""

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

    A bracketing search on log σ (Newton-like steps to bracket the root, then interpolation
    safeguarded by bisection), using that ε decreases in σ; typically 5-10 ε evaluations. The
    returned σ is always one whose ε was computed with :func:`epsilon` (same accountant, same
    discretization) and found ``<= target_epsilon``: the budget is never exceeded, unlike
    checking ε once per epoch. Results are cached per argument tuple.

    ε(σ) is smooth for PLD, so ε(returned σ) is within ~0.1 % of the target. With RDP and very
    small ε or q, ε(σ) can drop steeply where the best Rényi order changes, so ε may land a few
    percent under the target while σ is still minimal to ``rtol``.

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
    delta = check_delta_range(target_delta, "target_delta")
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

    return _calibrate(eps_target, delta, q, t, kind, float(max_noise_multiplier), float(rtol))


@functools.lru_cache(maxsize=256)
def _calibrate(
    eps_target: float, delta: float, q: float, t: int, kind: str, sigma_max: float, rtol: float
) -> float:
    """Search on validated arguments (cached: the CLI and the mechanism may both ask)."""

    def gap(sigma: float) -> float:
        """log(ε(σ) / target): <= 0 exactly when σ meets the budget."""
        eps = _epsilon(sigma, q, t, delta, kind)
        return math.log(eps / eps_target) if eps > 0 else -math.inf

    bracket = _bracket(gap, eps_target, delta, q, t, kind, sigma_max)
    if bracket is None:
        return MIN_NOISE_MULTIPLIER
    return _shrink(gap, *bracket, rtol)


Point = tuple[float, float]  # (log σ, gap)


def _bracket(
    gap: Callable[[float], float],
    eps_target: float,
    delta: float,
    q: float,
    t: int,
    kind: str,
    sigma_max: float,
) -> tuple[Point, Point] | None:
    """(lo, hi): lo fails the budget, hi meets it; None when even the smallest σ meets it."""
    # 1. Bracket: lo fails the budget, hi meets it. Start from the Gaussian-mechanism-like
    #    guess q·sqrt(2T·log(1.25/δ))/ε, or START_FLOOR if larger, and take Newton-like steps
    #    in log σ. log ε falls at least as fast as log σ rises (slope <= -1: ε ~ 1/σ for large
    #    σ, ~1/σ² for small), so a step of 1.1·gap/|slope| with the slope estimate starting at 1
    #    crosses the root and two evaluations usually bracket it.
    x_min, x_max = math.log(MIN_NOISE_MULTIPLIER), math.log(sigma_max)
    guess = q * math.sqrt(2.0 * t * math.log(1.25 / delta)) / eps_target
    x = min(max(math.log(max(guess, START_FLOOR)), x_min), x_max)
    f = gap(math.exp(x))
    lo = hi = None  # (log σ, gap) of the largest failing and the smallest meeting σ seen
    slope = 1.0  # magnitude of d gap / d log σ
    while True:
        if f > 0 and (lo is None or x > lo[0]):
            lo = (x, f)
        if f <= 0 and (hi is None or x < hi[0]):
            hi = (x, f)
        if lo is not None and hi is not None:
            return lo, hi
        if hi is None and x >= x_max:
            raise ValueError(
                f"no noise_multiplier up to max_noise_multiplier={sigma_max:g} meets "
                f"target_epsilon={eps_target:g} at target_delta={delta:g} with "
                f"sample_rate={q:g} and steps={t} ({kind} accountant: "
                f"ε={_epsilon(sigma_max, q, t, delta, kind):.4g} there); raise "
                "target_epsilon, or lower steps or sample_rate (smaller expected_batch_size)"
            )
        if lo is None and x <= x_min:
            return None
        step = 1.1 * f / slope if math.isfinite(f) else math.copysign(math.log(4.0), f)
        step = math.copysign(min(max(abs(step), math.log(1.01)), math.log(4.0)), step)
        x_new = min(max(x + step, x_min), x_max)
        f_new = gap(math.exp(x_new))
        if math.isfinite(f) and math.isfinite(f_new) and f_new < f:
            slope = max((f - f_new) / (x_new - x), 0.5)
        x, f = x_new, f_new


def _shrink(gap: Callable[[float], float], lo: Point, hi: Point, rtol: float) -> float:
    """Shrink the bracket until hi/lo <= 1 + rtol; return hi's σ (it meets the budget)."""
    # 2. Shrink the bracket to hi/lo <= 1 + rtol. log ε is nearly linear in log σ, so
    #    interpolate the root and probe just above and just below it: when the interpolation
    #    is good (after a round or two) one round closes the bracket. Any round that fails to
    #    halve the bracket is followed by a bisection step, so this is never much slower
    #    than bisection.
    (x_lo, f_lo), (x_hi, f_hi) = lo, hi
    width = math.log1p(rtol)
    bisect_next = False
    while x_hi - x_lo > width:
        span = x_hi - x_lo
        usable = math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo > f_hi
        if bisect_next or not usable or span <= 2 * width:
            x_mid = (x_lo + x_hi) / 2
            f_mid = gap(math.exp(x_mid))
            if f_mid <= 0:
                x_hi, f_hi = x_mid, f_mid
            else:
                x_lo, f_lo = x_mid, f_mid
            bisect_next = False
            continue
        root = x_hi - f_hi * span / (f_hi - f_lo)
        root = min(max(root, x_lo + width), x_hi - width)
        x_up = min(root + width / 2, x_hi - width / 4)
        f_up = gap(math.exp(x_up))
        if f_up > 0:
            x_lo, f_lo = x_up, f_up
        else:
            x_hi, f_hi = x_up, f_up
            x_down = max(x_up - width, x_lo + width / 4)
            f_down = gap(math.exp(x_down))
            if f_down <= 0:
                x_hi, f_hi = x_down, f_down
            else:
                x_lo, f_lo = x_down, f_down
        bisect_next = x_hi - x_lo > span / 2
    return math.exp(x_hi)
