"""Privacy loss of DP-SGD-style training: ε of T Poisson-subsampled Gaussian steps.

The mechanism (SPEC §2): each step samples every example independently with probability
``q = sample_rate``, sums the per-example gradients clipped to norm C, and adds Gaussian noise
of std σ·C (``σ = noise_multiplier``). Unit of privacy: one example; neighbouring datasets
differ by adding or removing one example; the sensitivity of the clipped sum is C, so one step
is a Poisson-subsampled Gaussian mechanism with noise multiplier σ. T steps compose adaptively.

Two accountants from ``dp_accounting`` (Google's accounting library) do the analysis:

- ``"pld"`` (default): privacy loss distributions (Koskela et al., arXiv 1906.03049;
  Doroshenko et al., arXiv 2207.04380) with the *pessimistic* discretization, so the returned ε
  is an upper bound on the true ε of the mechanism. The discretization interval is refined
  until halving it moves ε by less than about 1e-3·max(ε, 0.1) (see :func:`_pld_epsilon`).
- ``"rdp"``: Rényi DP (Mironov, arXiv 1702.07476; Mironov et al., arXiv 1908.10530) over a wide
  grid of orders, with the conversion of Canonne et al. (arXiv 2004.00010). Looser than PLD.

This module does not import torch: it works on plain Python numbers.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from dpmicroadam.accounting._validate import (
    check_accountant,
    check_delta_range,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)

# Rényi orders: fine from 1.5 to 3 (large ε), every 0.1 to 11, integers to 128, every 4 to 256,
# then sparse up to 8192 (tiny ε). Fractional orders are the expensive ones, so they stop at 11. Orders below
# 1.5 only help for ε in the tens, where RDP is loose anyway, and dp_accounting's series for them
# often fails to converge (slow, and the order is then dropped with a logged warning).
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {1.5 + x / 20 for x in range(0, 30)}
        | {3.0 + x / 10 for x in range(0, 80)}
        | {float(a) for a in range(11, 129)}
        | {float(a) for a in range(132, 257, 4)}
        | {320.0, 384.0, 512.0, 768.0, 1024.0, 2048.0, 4096.0, 8192.0}
    )
)

# PLD discretization: start at 1e-3 and halve while the estimated discretization error is
# above PLD_RTOL·max(ε, PLD_EPS_FLOOR). The pessimistic estimate converges from above roughly
# quadratically in the interval, so the error of the finer value is ≈ (coarse − fine) / 3.
PLD_START_INTERVAL = 1e-3
PLD_MIN_INTERVAL = 1e-6
PLD_RTOL = 1e-3
PLD_EPS_FLOOR = 0.1


def dp_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event for ``steps`` Poisson-subsampled Gaussian steps."""
    step = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """ε spent by ``steps`` Poisson-subsampled Gaussian steps, for a given δ.

    Guarantee: training with per-example clipping to C, Poisson sampling with rate
    ``sample_rate`` and Gaussian noise of std ``noise_multiplier``·C on the clipped sum, for
    ``steps`` steps, is (ε, δ)-DP under add/remove-one-example adjacency, with ε the returned
    value (an upper bound for ``"pld"``; an upper bound with RDP's slack for ``"rdp"``).

    Args:
        noise_multiplier: σ ≥ 0; 0 means no noise (ε = inf unless ``steps`` is 0).
        sample_rate: q in (0, 1].
        steps: T ≥ 0 optimizer steps (one per logical batch).
        delta: δ in (0, 1).
        accountant: ``"pld"`` (default, tight) or ``"rdp"``.

    Returns:
        ε as a float; ``0.0`` for ``steps == 0``, ``math.inf`` for ``noise_multiplier == 0``.

    Raises:
        ValueError: an argument is out of range or the accountant is unknown.
        TypeError: an argument has the wrong type.

    Example:
        >>> round(epsilon(1.0, 0.01, 1000, 1e-5, accountant="rdp"), 3)
        2.101
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    t = check_steps(steps)
    d = check_delta_range(delta)
    kind = check_accountant(accountant)
    return _epsilon(sigma, q, t, d, kind)


@functools.lru_cache(maxsize=4096)
def _epsilon(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    """Cached core of :func:`epsilon` on validated arguments."""
    if steps == 0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    if math.isinf(sigma):
        return 0.0
    if kind == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant(RDP_ORDERS)
        acc.compose(dp_event(sigma, q, steps))
        return float(acc.get_epsilon(delta))
    return _pld_epsilon(sigma, q, steps, delta)


@functools.lru_cache(maxsize=32)
def _pld_step(
    sigma: float, q: float, interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """The PLD of one Poisson-subsampled Gaussian step (pessimistic, add-or-remove-one).

    Building it walks the whole discretization grid in Python (about 2/3 of a PLD ε), and it
    does not depend on the step count, so a run that asks for ε at every evaluation builds it
    once per interval. Built exactly as ``PLDAccountant`` builds it; PLD objects are immutable
    (composition returns new ones), so sharing the cached one is safe.
    """
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=interval, sampling_prob=q
    )


def _pld_at(sigma: float, q: float, steps: int, delta: float, interval: float) -> float:
    """PLD ε at one interval: what ``PLDAccountant(interval).compose(dp_event(...))`` gives."""
    one = _pld_step(sigma, q, interval)
    pld = privacy_loss_distribution.identity(value_discretization_interval=interval)
    pld = pld.compose(one.self_compose(steps))
    return float(pld.get_epsilon_for_delta(delta))


def _pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """PLD ε with the discretization refined until it no longer matters (to ~1e-3 relative).

    Every value computed is a pessimistic upper bound, so stopping early never under-reports ε;
    the refinement only removes slack. The interval needed depends on how small the per-step
    privacy loss is (large σ or small q needs a finer grid), which is cheap exactly there.
    """
    interval = PLD_START_INTERVAL
    coarse = _pld_at(sigma, q, steps, delta, 2 * interval)
    fine = _pld_at(sigma, q, steps, delta, interval)
    while (
        math.isfinite(fine)
        and (coarse - fine) / 3 > PLD_RTOL * max(fine, PLD_EPS_FLOOR)
        and interval / 2 >= PLD_MIN_INTERVAL
    ):
        interval /= 2
        coarse, fine = fine, _pld_at(sigma, q, steps, delta, interval)
    # Both values are valid upper bounds; keep the smaller in case rounding made the finer
    # one come out larger.
    return min(coarse, fine)
