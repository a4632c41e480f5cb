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
  The T-fold self-composition of the one-step PLD is formed here, as the library forms it and
  equal to its result bit for bit, except that the moments of its Chernoff tail bounds are
  computed once per one-step PLD instead of at every composition (:func:`_self_compose`); so are
  the accountant's last steps, composing with its identity PLD and ε for δ, vectorised here
  where the library loops in Python (:func:`_pld_at`); and so is the one-step PLD, whose
  grid the library walks in Python (:mod:`~dpmicroadam.accounting.gaussian_pld`).
- ``"rdp"``: Rényi DP (Mironov, arXiv 1702.07476; Mironov et al., arXiv 1908.10530) over a wide
  grid of orders, with the conversion of Canonne et al. (arXiv 2004.00010). Looser than PLD.

This module does not import torch: it works on plain Python numbers.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_pmf, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import fft, signal, special

from dpmicroadam.accounting._validate import (
    check_accountant,
    check_delta_range,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)
from dpmicroadam.accounting.gaussian_pld import gaussian_step_pld

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

    What ``PLDAccountant`` builds, bit for bit, on arrays where the library walks the
    discretization grid in Python (:mod:`~dpmicroadam.accounting.gaussian_pld`: 3.9 against
    26.0 s over 126 grids). It does not depend on the step count, so a run that asks for ε at
    every evaluation builds it once per interval. PLD objects are immutable (composition
    returns new ones), so sharing the cached one is safe.
    """
    return gaussian_step_pld(sigma, q, interval)


def clear_caches() -> None:
    """Forgets every cached ε, one-step PLD and tail moment (what a fresh process starts with)."""
    _epsilon.cache_clear()
    _pld_step.cache_clear()
    _tail_moments.cache_clear()


def _pld_at(sigma: float, q: float, steps: int, delta: float, interval: float) -> float:
    """PLD ε at one interval: what ``PLDAccountant(interval).compose(dp_event(...))`` gives.

    On the dense PLDs this module composes itself, the accountant's last two steps (composing
    with its identity PLD, then ε for δ) run here too, vectorised and equal to the library's
    result bit for bit (:func:`_after_identity`, :func:`_dense_epsilon`); the library's loops
    over the PMF in Python took 2/3 of an ε at an evaluation (ad hoc profile).
    """
    one = _pld_step(sigma, q, interval)
    moments = _tail_moments(sigma, q, interval)
    pld = privacy_loss_distribution.identity(value_discretization_interval=interval)
    identity = pld._pmf_remove.to_dense_pmf()  # noqa: SLF001 (the PLD accountant's start)
    if moments is None or not identity._pessimistic_estimate:  # noqa: SLF001
        return float(pld.compose(_self_compose(one, steps, moments)).get_epsilon_for_delta(delta))
    eps = [
        _dense_epsilon(*_after_identity(identity, _self_compose_pmf(pmf, steps, orders, logs)),
                       delta)
        for pmf, orders, logs in moments
    ]  # fmt: skip
    return float(max(eps))  # as PrivacyLossDistribution.get_epsilon_for_delta: (remove, add)


# What PrivacyLossDistribution.compose truncates by default (as the accountant composes).
COMPOSE_TAIL = 1e-15


def _after_identity(identity, pmf) -> tuple:
    """``(lower_loss, probs, infinity_mass, interval)`` of ``identity.compose(pmf)`` for dense
    PMFs with the pessimistic estimate (the accountant's), with the library's FFT convolution
    and tail truncation (its prefix search, a loop in Python there, is a running sum here: the
    same additions in the same order)."""
    a, b = identity, pmf
    lower = a._lower_loss + b._lower_loss  # noqa: SLF001
    probs = signal.fftconvolve(a._probs, b._probs)  # noqa: SLF001
    infinity = a._infinity_mass + b._infinity_mass - a._infinity_mass * b._infinity_mass  # noqa: SLF001
    half = COMPOSE_TAIL / 2
    left = _prefix_to_truncate(probs, half)
    right = max(len(probs) - _prefix_to_truncate(np.flip(probs), half), left + 1)
    left_mass, right_mass = np.sum(probs[:left]), np.sum(probs[right:])
    kept = probs[left:right]
    kept[0] += left_mass  # pessimistic: the left tail onto the smallest loss kept
    return lower + left, kept, infinity + right_mass, a._discretization  # noqa: SLF001


def _prefix_to_truncate(values: np.ndarray, threshold: float) -> int:
    """The first index at which the running sum of ``values`` exceeds ``threshold``, else the
    length (dp_accounting's prefix search: its sum adds the same values in the same order)."""
    over = np.flatnonzero(np.cumsum(values) > threshold)
    return int(over[0]) if over.size else len(values)


def _dense_epsilon(
    lower_loss: int, probs: np.ndarray, infinity_mass: float, interval: float, delta: float
) -> float:
    """The smallest ε whose hockey-stick divergence is at most δ, for a dense PMF: what
    ``DensePLDPmf.get_epsilon_for_delta`` returns, bit for bit, without its loop in Python.

    The library walks the losses from the largest down, adding each probability to the upper
    mass and e^{-loss}·probability to the lower one, and stops at the first loss at or below
    log((upper − δ)/lower). Here the losses (the library's repeated subtraction of the interval)
    and both masses are running sums (``np.cumsum`` adds in order, as the loop does); e^{-loss}
    is ``math.exp``'s, in blocks, only as far as the walk goes; and the stopping test is
    screened with ``np.log`` and decided with ``math.log``.
    """
    if infinity_mass > delta:
        return math.inf
    n = len(probs)
    if n == 0:
        return 0  # the loop runs no step, and infinity_mass <= delta
    upper_loss = (lower_loss + n - 1) * interval
    losses = np.cumsum(np.concatenate(([upper_loss], np.full(n - 1, -interval))))
    if losses[-1] < -700:  # e^{-loss} may overflow, where the library raises: let it
        pmf = pld_pmf.DensePLDPmf(interval, lower_loss, probs, infinity_mass, True)
        return pmf.get_epsilon_for_delta(delta)
    probs = np.flip(probs)
    upper = np.cumsum(np.concatenate(([infinity_mass], probs)))  # before the k-th loss: upper[k]
    lower_before = 0.0
    start, block = 0, 1024
    while start < n:
        stop = min(n, start + block)
        loss = losses[start:stop]
        terms = np.fromiter(map(math.exp, (-loss).tolist()), float, stop - start)
        lower = np.cumsum(np.concatenate(([lower_before], terms * probs[start:stop])))
        up = upper[start : stop + 1]
        # the walk stops before adding loss j if log((upper − δ)/lower) ≥ loss (screened: np.log
        # is within a few ulp of math.log; candidates are decided by math.log, in order)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = (up[:-1] - delta) / lower[:-1]
            screen = (up[:-1] > delta) & (lower[:-1] > 0)
            screen &= np.log(ratio) >= loss - 1e-9 * (1 + np.abs(loss))
        stops = (j for j in np.flatnonzero(screen) if math.log(ratio[j]) >= loss[j])
        first_stop = next(stops, None)
        # ... and it returns max(0, loss) after adding loss j if the upper mass reached δ while
        # the lower one is still exactly 0 (e^{-loss} underflowed)
        underflow = np.flatnonzero((up[1:] >= delta) & (lower[1:] == 0))
        if underflow.size and (first_stop is None or underflow[0] < first_stop):
            return max(0, float(loss[underflow[0]]))
        if first_stop is not None:
            mass_upper, mass_lower = up[first_stop], lower[first_stop]
            break
        lower_before = lower[-1]
        start, block = stop, 2 * block
    else:
        mass_upper, mass_lower = upper[n], lower_before
    if mass_upper <= mass_lower + delta:
        return 0
    return math.log((mass_upper - delta) / mass_lower)


# What PrivacyLossDistribution.self_compose truncates by default, and the orders of its Chernoff
# tail bounds (in units of 1/len(probs)): both as dp_accounting uses them, so that the result is
# the library's to the bit (tests/test_accounting.py).
SELF_COMPOSE_TAIL = 1e-15
CHERNOFF_ORDERS = tuple(k for k in range(-20, 21) if k)


@functools.lru_cache(maxsize=32)
def _tail_moments(sigma: float, q: float, interval: float) -> tuple | None:
    """``(pmf, orders, log E[e^{λX}] at each order λ)`` of the one-step PLD's loss index X, one
    per dense PMF (remove, add), or None where the PLD is not the dense one this module knows how to
    compose (the library's own self-composition then runs).

    ``dp_accounting`` computes them afresh at every self-composition (two PMFs × 40
    ``scipy.special.logsumexp`` calls, 0.3 ms each, mostly call overhead: 70 % of an ε at 200
    steps, ad hoc), though they depend only on the one-step PLD, which is cached here.
    """
    pmfs = _dense_pmfs(_pld_step(sigma, q, interval))
    if pmfs is None:
        return None
    moments = []
    for pmf in pmfs:
        probs = pmf._probs  # noqa: SLF001 (dp_accounting's dense PMF)
        index = np.arange(len(probs))
        orders = np.array(CHERNOFF_ORDERS, dtype=float) / len(probs)
        log_mgfs = [special.logsumexp(index * order, b=probs) for order in orders]
        moments.append((pmf, orders, log_mgfs))
    return tuple(moments)


def _dense_pmfs(pld) -> list | None:
    """The PLD's (remove, add) dense PMFs (one if symmetric), or None for any other kind."""
    try:
        pmfs = [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]  # noqa: SLF001
        for pmf in pmfs:
            if type(pmf) is not pld_pmf.DensePLDPmf:
                return None
            # the attributes _self_compose_pmf reads (AttributeError if a version lacks one)
            pmf._probs, pmf._lower_loss, pmf._infinity_mass  # noqa: B018, SLF001
            pmf._discretization, pmf._pessimistic_estimate  # noqa: B018, SLF001
    except AttributeError:
        return None
    return pmfs


def _self_compose(one, steps: int, moments):
    """``one.self_compose(steps)``, with the Chernoff bounds' moments taken from ``moments``
    (:func:`_tail_moments` of ``one``; None: the library's own self-composition).

    The T-fold self-convolution of a PMF over loss indices 0..L-1 is formed by one FFT; only
    the indices within the Chernoff bounds of the sum of T draws are kept: for an order λ,
    P(S ≥ u) ≤ exp(T·log E[e^{λX}] − λu), so the mass above u = (T·log E[e^{λX}] + log(2/τ))/λ
    (λ > 0), and below it for λ < 0, is at most τ/2 each; the truncated mass τ and the
    composed infinity mass 1 − (1 − m)^T go to infinity (pessimistic).
    """
    if moments is None:
        return one.self_compose(steps)
    composed = [_self_compose_pmf(pmf, steps, orders, logs) for pmf, orders, logs in moments]
    return privacy_loss_distribution.PrivacyLossDistribution(*composed)


def _self_compose_pmf(pmf, steps: int, orders, log_mgfs):
    """One dense PMF composed ``steps`` times with itself (see :func:`_self_compose`)."""
    probs = pmf._probs  # noqa: SLF001 (dp_accounting's dense PMF, checked by _dense_pmfs)
    low, high = 0, (len(probs) - 1) * steps
    log_two_over_tail = math.log(2 / SELF_COMPOSE_TAIL)
    for order, log_mgf in zip(orders, log_mgfs):
        bound = (steps * log_mgf + log_two_over_tail) / order
        if not math.isfinite(bound):
            continue
        if order > 0:
            high = min(high, math.ceil(bound))
        else:
            low = max(low, math.floor(bound))
    length = high - low + 1
    size = fft.next_fast_len(max(length, len(probs)))
    cyclic = np.real(fft.ifft(fft.fft(probs, size) ** steps))
    kept = np.array(np.roll(cyclic, -low)[:length])
    infinity = SELF_COMPOSE_TAIL - math.expm1(steps * math.log1p(-pmf._infinity_mass))  # noqa: SLF001
    return pld_pmf.DensePLDPmf(
        pmf._discretization, pmf._lower_loss * steps + low, kept, infinity,  # noqa: SLF001
        pmf._pessimistic_estimate,  # noqa: SLF001
    )  # fmt: skip


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
