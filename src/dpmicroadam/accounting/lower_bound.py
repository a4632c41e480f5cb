r"""The one-run auditing bound: an empirical lower bound on ε from canary guesses (no torch).

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", arXiv 2305.08846.

Setting: m canaries, each included in the training set independently with probability 1/2
(S_i ∈ {−1, +1}). After one training run the auditor guesses S_i for r of them (abstaining on the
others) and gets v right. If the run is (ε, δ)-DP, the number of correct guesses W satisfies
(the paper's main theorem, with δ)

.. math::

    \Pr[W \ge v] \;\le\; f(v) + 2 m \delta \max_{i=1..v} \frac{f(v-i) - f(v)}{i},
    \qquad f(u) = \Pr_{W' \sim \mathrm{Bin}(r,\, e^\varepsilon / (1 + e^\varepsilon))}[W' \ge u].

So an observed v whose bound is at most α = 1 − confidence rejects "the run is (ε, δ)-DP" at that
confidence. The ε lower bound is the supremum of the ε that are rejected; the bound is increasing
in ε, so it is found by bisection.

For δ = 0 and all r guesses correct the bound is q^r with q = e^ε/(1+e^ε), which gives the best
lower bound r guesses can ever certify:

.. math::

    \varepsilon_{\max}(r, \alpha) = -\log\big(\alpha^{-1/r} - 1\big).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["audit_p_value", "epsilon_lower_bound", "max_epsilon_lower_bound"]


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or int(value) != value:
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"need 0 <= v (correct guesses) <= r (guesses) <= m (canaries), got m={m}, r={r}, "
            f"v={v}; count only the canaries you did not abstain on in r"
        )
    if m < 1:
        raise ValueError(f"m (number of canaries) must be >= 1, got {m}")


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0 <= d < 1 or math.isnan(d):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return d


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0 < c < 1 or math.isnan(c):
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    return c


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[≥ v correct of r guesses] if the run were (ε, δ)-DP.

    Args:
        m: Number of canaries (each included with probability 1/2).
        r: Number of guesses made (canaries not abstained on).
        v: Number of correct guesses.
        epsilon: ε ≥ 0 of the null hypothesis.
        delta: δ ≥ 0 of the null hypothesis.

    Returns:
        The bound of arXiv 2305.08846 (main theorem), capped at 1.

    Raises:
        ValueError: On counts out of order, ε < 0, or δ outside [0, 1).
    """
    _check_counts(m, r, v)
    delta = _check_delta(delta)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if v == 0:
        return 1.0
    q = float(stats.logistic.cdf(epsilon))  # e^ε/(1+e^ε), stable for large ε
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0:
        return min(1.0, tail)
    # f(v−i) − f(v) = P[v−i <= Bin < v] for i = 1..v, the slack the δ term pays for.
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    slack = np.max(np.cumsum(below) / np.arange(1, v + 1))
    return min(1.0, tail + 2.0 * m * delta * float(slack))


def epsilon_lower_bound(
    m: int,
    r: int,
    v: int,
    confidence: float = 0.95,
    delta: float = 0.0,
    *,
    tol: float = 1e-6,
) -> float:
    """Largest ε the observed guesses reject at the given confidence (0 if none).

    Args:
        m: Number of canaries.
        r: Number of guesses (not abstained).
        v: Number of correct guesses.
        confidence: Probability, over the canaries' inclusion, that the statement "the run is not
            (ε, δ)-DP for any ε below the returned value" holds, e.g. 0.95.
        delta: δ of the hypotheses tested (the run's target δ).
        tol: Absolute precision of the bisection.

    Returns:
        The ε lower bound (≥ 0), within ``tol`` below the exact supremum.

    Raises:
        ValueError: On bad counts, confidence outside (0, 1), or δ outside [0, 1).
    """
    _check_counts(m, r, v)
    alpha = 1.0 - _check_confidence(confidence)
    delta = _check_delta(delta)
    if audit_p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(m, r, v, hi, delta) <= alpha:
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:  # every ε is rejected: only possible for bad inputs, already excluded
            return math.inf  # pragma: no cover
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if audit_p_value(m, r, v, mid, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def max_epsilon_lower_bound(r: int, confidence: float = 0.95) -> float:
    """Best ε lower bound r guesses can certify (all correct, δ = 0): −log(α^{−1/r} − 1).

    Use it to size an audit: with r guesses no outcome can show more than this.

    Raises:
        ValueError: On r < 1 or confidence outside (0, 1).
    """
    if isinstance(r, bool) or int(r) != r or r < 1:
        raise ValueError(f"r (number of guesses) must be an int >= 1, got {r!r}")
    alpha = 1.0 - _check_confidence(confidence)
    return max(0.0, -math.log(math.expm1(-math.log(alpha) / r)))
