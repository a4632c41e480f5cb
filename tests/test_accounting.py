"""Accounting: golden values (SPEC §2, §4), agreement with Opacus, calibration, Accountant."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import time
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant

import dpmicroadam.accounting.accountant as accountant_module
from dpmicroadam.accounting import (
    ACCOUNTANTS,
    Accountant,
    PrivacyWarning,
    calibrate_noise_multiplier,
    check_delta,
    epsilon,
)

CIFAR_Q = 4096 / 50_000  # SPEC §4: N = 50 000, B = 4096

# (σ, q, T, δ): a small grid spanning small/large ε and sample rates.
GRID = [
    (1.0, 0.01, 1000, 1e-5),
    (3.0, CIFAR_Q, 3066, 1e-5),
    (0.8, 0.004, 2000, 1e-6),
    (2.0, 0.02, 500, 1e-5),
]


# ---------------------------------------------------------------- golden values (SPEC)


@pytest.mark.parametrize(("kind", "expected"), [("pld", 1.828), ("rdp", 2.101)])
def test_spec_reference_values(kind: str, expected: float) -> None:
    assert epsilon(1.0, 0.01, 1000, 1e-5, accountant=kind) == pytest.approx(expected, abs=2e-3)


def test_spec_cifar_sigma3_reaches_eps8_after_3066_steps() -> None:
    eps = [epsilon(3.0, CIFAR_Q, t, 1e-5, accountant="rdp") for t in (3000, 3066, 3130)]
    assert eps[0] < 8.0 < eps[2]
    assert eps[1] == pytest.approx(8.0, abs=0.01)


def test_spec_cifar_sigma10_875_steps() -> None:
    assert epsilon(10.0, CIFAR_Q, 875, 1e-5, accountant="rdp") == pytest.approx(0.99, abs=0.01)


# ---------------------------------------------------------------- against Opacus


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), GRID)
def test_rdp_agrees_with_opacus_rdp(sigma: float, q: float, steps: int, delta: float) -> None:
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    ref.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when its order grid is too narrow
        expected = ref.get_epsilon(delta)
    ours = epsilon(sigma, q, steps, delta, accountant="rdp")
    # Same analysis; our order grid is wider, so we may only be (slightly) tighter.
    assert ours == pytest.approx(expected, rel=0.02)
    assert ours <= expected * (1 + 1e-4)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), GRID)
def test_pld_agrees_with_opacus_prv(sigma: float, q: float, steps: int, delta: float) -> None:
    from opacus.accountants import PRVAccountant

    ref = PRVAccountant()
    ref.history = [(sigma, q, steps)]
    expected = ref.get_epsilon(delta)
    assert epsilon(sigma, q, steps, delta, accountant="pld") == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), GRID)
def test_pld_is_tighter_than_rdp(sigma: float, q: float, steps: int, delta: float) -> None:
    assert epsilon(sigma, q, steps, delta, "pld") < epsilon(sigma, q, steps, delta, "rdp")


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "interval"),
    [(1.0, 0.01, 1000, 1e-4), (2.0, 0.001, 10_000, 1e-5), (20.0, 0.01, 1000, 1e-5)],
)
def test_pld_is_accurate_upper_bound(sigma: float, q: float, steps: int, interval: float) -> None:
    """Against dp_accounting at a discretization >= 3x finer than our adaptive choice."""
    fine = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    fine.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    reference = fine.get_epsilon(1e-5)
    ours = epsilon(sigma, q, steps, 1e-5, "pld")
    assert ours >= reference - 1e-9  # pessimistic: never below the finer upper bound
    assert ours == pytest.approx(reference, rel=2e-3)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "interval"),
    [(1.0, 0.01, 1, 1e-3), (1.0, 64 / 1800, 50, 5e-4), (0.6, 0.2, 300, 2e-3)],
)
def test_pld_at_equals_pld_accountant_and_its_cache_is_not_mutated(
    sigma: float, q: float, steps: int, interval: float
) -> None:
    """The cached one-step PLD gives PLDAccountant's ε exactly, before and after reuse."""
    from dpmicroadam.accounting.epsilon import _pld_at, _pld_step, dp_event

    def reference(t: int) -> float:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
        acc.compose(dp_event(sigma, q, t))
        return float(acc.get_epsilon(1e-5))

    _pld_step.cache_clear()
    first = _pld_at(sigma, q, steps, 1e-5, interval)
    assert first == reference(steps)
    other = _pld_at(sigma, q, 2 * steps + 1, 1e-5, interval)  # reuses the cached step
    assert _pld_step.cache_info().hits >= 1
    assert other == reference(2 * steps + 1) and other > first
    assert _pld_at(sigma, q, steps, 1e-5, interval) == first


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(1.0, 64 / 1800, 1), (1.0, 64 / 1800, 241), (0.8, 0.01, 3000), (2.0, 1.0, 7)],
)
def test_self_composition_with_cached_tail_moments_is_the_librarys_to_the_bit(
    sigma: float, q: float, steps: int
) -> None:
    """Our self-composition (the Chernoff bounds' moments cached per one-step PLD) gives the
    PMFs of dp_accounting's own ``self_compose`` exactly: the same loss grid, probabilities,
    infinity mass and ε; q = 1 is the symmetric (unsampled) Gaussian PLD."""
    eps_module = importlib.import_module("dpmicroadam.accounting.epsilon")  # not the function

    interval = 1e-3
    one = eps_module._pld_step(sigma, q, interval)
    moments = eps_module._tail_moments(sigma, q, interval)
    assert moments is not None  # a dense PLD: our path runs
    ours, theirs = eps_module._self_compose(one, steps, moments), one.self_compose(steps)
    pairs = [(ours._pmf_remove, theirs._pmf_remove), (ours._pmf_add, theirs._pmf_add)]
    assert ours._symmetric == theirs._symmetric == (q == 1.0)
    for a, b in pairs:
        assert type(a) is type(b)
        assert a._lower_loss == b._lower_loss and a._infinity_mass == b._infinity_mass
        assert a._probs.shape == b._probs.shape and (a._probs == b._probs).all()
    assert ours.get_epsilon_for_delta(1e-5) == theirs.get_epsilon_for_delta(1e-5)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "interval"),
    [
        (1.0, 64 / 1800, 241, 5e-4),
        (0.6, 0.2, 300, 2e-3),
        (2.0, 1.0, 7, 1e-3),
        (5.0, 1e-3, 10, 1e-4),
    ],
)
@pytest.mark.parametrize("delta", [1e-10, 1e-5, 1e-2, 0.3])
def test_pld_at_takes_the_accountants_last_steps_to_the_bit(
    sigma: float, q: float, steps: int, interval: float, delta: float
) -> None:
    """Composing with the accountant's identity PLD and ε for δ, done here without the
    library's loops in Python, give the library's ε exactly (also 0 and for a symmetric PLD)."""
    from dp_accounting.pld import privacy_loss_distribution

    eps_module = importlib.import_module("dpmicroadam.accounting.epsilon")  # not the function

    one = eps_module._pld_step(sigma, q, interval)
    composed = eps_module._self_compose(one, steps, eps_module._tail_moments(sigma, q, interval))
    start = privacy_loss_distribution.identity(value_discretization_interval=interval)
    theirs = start.compose(composed)
    assert eps_module._pld_at(sigma, q, steps, delta, interval) == float(
        theirs.get_epsilon_for_delta(delta)
    )
    identity = start._pmf_remove.to_dense_pmf()
    pairs = [(composed._pmf_remove, theirs._pmf_remove), (composed._pmf_add, theirs._pmf_add)]
    for pmf, their in pairs:
        lower, probs, infinity, step = eps_module._after_identity(identity, pmf)
        assert (lower, infinity, step) == (their._lower_loss, their._infinity_mass, interval)
        assert probs.shape == their._probs.shape and (probs == their._probs).all()


def _library_epsilon(lower, probs, infinity, interval, delta):
    from dp_accounting.pld import pld_pmf

    try:
        return pld_pmf.DensePLDPmf(interval, lower, probs, infinity, True).get_epsilon_for_delta(
            delta
        )
    except OverflowError:
        return "OverflowError"


def test_dense_epsilon_is_the_librarys_on_random_pmfs() -> None:
    """Every outcome of the library's walk, compared by value and type on random PMFs: a loss
    it stops at, ε = 0 (int), ∞ (infinity mass above δ), and its OverflowError."""
    import numpy as np

    eps_module = importlib.import_module("dpmicroadam.accounting.epsilon")  # not the function

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(150):
        n = int(rng.integers(1, 5000))
        probs = rng.random(n) ** rng.uniform(1, 30)
        probs /= probs.sum() * rng.uniform(1, 1.3)
        lower = int(rng.integers(-3000, 3000))
        interval = float(rng.choice([1e-3, 1e-2, 0.37, 1.0, 50.0]))
        infinity = float(rng.choice([0.0, 1e-12, 1e-6, 0.1]))
        for delta in (1e-8, 1e-5, 0.01, 0.5):
            theirs = _library_epsilon(lower, probs, infinity, interval, delta)
            try:
                ours = eps_module._dense_epsilon(lower, probs, infinity, interval, delta)
            except OverflowError:
                ours = "OverflowError"
            assert ours == theirs and type(ours) is type(theirs), (n, lower, interval, delta)
            seen.add(theirs if isinstance(theirs, str) or theirs in (0, math.inf) else "loss")
    assert seen == {"loss", 0, math.inf, "OverflowError"}


def test_dense_epsilon_returns_the_loss_where_the_lower_mass_underflows() -> None:
    """Losses so large that e^{-loss} is 0: the walk returns the loss at which the upper mass
    reaches δ, as the library does (its early return)."""
    import numpy as np

    eps_module = importlib.import_module("dpmicroadam.accounting.epsilon")  # not the function

    probs = np.full(3000, 1 / 3000)
    for lower, delta in [(100, 1e-5), (100, 0.5), (-20, 0.9)]:
        theirs = _library_epsilon(lower, probs, 0.0, 10.0, delta)
        ours = eps_module._dense_epsilon(lower, probs, 0.0, 10.0, delta)
        assert ours == theirs and type(ours) is type(theirs)
    assert eps_module._dense_epsilon(100, probs, 0.0, 10.0, 0.5) == 10.0 * (100 + 1500)


def test_tail_moments_are_computed_once_per_step_pld_and_cleared_with_the_rest() -> None:
    eps_module = importlib.import_module("dpmicroadam.accounting.epsilon")  # not the function

    eps_module.clear_caches()
    first = eps_module._epsilon(1.0, 0.05, 100, 1e-5, "pld")
    misses = eps_module._tail_moments.cache_info().misses
    assert misses >= 2  # the coarse and the fine interval
    eps_module._epsilon(1.0, 0.05, 150, 1e-5, "pld")  # another evaluation, same step PLD
    assert eps_module._tail_moments.cache_info().misses == misses
    eps_module.clear_caches()
    info = [f.cache_info().currsize for f in (eps_module._epsilon, eps_module._pld_step)]
    assert info == [0, 0] and eps_module._tail_moments.cache_info().currsize == 0
    assert eps_module._epsilon(1.0, 0.05, 100, 1e-5, "pld") == first


def test_a_pld_that_is_not_dense_takes_the_librarys_self_composition() -> None:
    """Where the PMF is not dp_accounting's dense one (here the sparse identity), no moments are
    formed and the library composes it."""
    from dp_accounting.pld import privacy_loss_distribution

    eps_module = importlib.import_module("dpmicroadam.accounting.epsilon")  # not the function

    pld = privacy_loss_distribution.identity(value_discretization_interval=1e-3)
    assert eps_module._dense_pmfs(pld) is None
    composed = eps_module._self_compose(pld, 5, None)
    assert composed.get_epsilon_for_delta(1e-5) == pld.self_compose(5).get_epsilon_for_delta(1e-5)


# ---------------------------------------------------------------- shape of ε


@pytest.mark.parametrize("kind", ACCOUNTANTS)
def test_degenerate_cases(kind: str) -> None:
    assert epsilon(0.0, 0.01, 10, 1e-5, kind) == math.inf
    assert epsilon(1.0, 0.01, 0, 1e-5, kind) == 0.0
    assert epsilon(0.0, 0.01, 0, 1e-5, kind) == 0.0


@pytest.mark.parametrize("kind", ACCOUNTANTS)
def test_epsilon_is_monotone(kind: str) -> None:
    base = epsilon(1.5, 0.02, 400, 1e-5, kind)
    assert epsilon(2.0, 0.02, 400, 1e-5, kind) < base  # more noise
    assert epsilon(1.5, 0.03, 400, 1e-5, kind) > base  # larger batches
    assert epsilon(1.5, 0.02, 500, 1e-5, kind) > base  # more steps
    assert epsilon(1.5, 0.02, 400, 1e-4, kind) < base  # looser delta


# ---------------------------------------------------------------- calibration

CALIBRATION_CASES = [
    ("pld", 8.0, 1e-5, CIFAR_Q, 3000),
    ("pld", 1.0, 1e-5, 0.01, 1000),
    ("pld", 3.0, 1e-6, 0.004, 2500),
    ("rdp", 8.0, 1e-5, CIFAR_Q, 1000),
    ("rdp", 0.5, 1e-5, 0.02, 3000),
]


@pytest.mark.parametrize(("kind", "target", "delta", "q", "steps"), CALIBRATION_CASES)
def test_calibration_inverts_epsilon(
    kind: str, target: float, delta: float, q: float, steps: int
) -> None:
    sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant=kind)
    spent = epsilon(sigma, q, steps, delta, kind)
    assert spent <= target  # never overshoots
    assert spent >= 0.99 * target  # and does not waste budget
    # Minimal up to the tolerance: a bit less noise would exceed the budget.
    assert epsilon(sigma / 1.003, q, steps, delta, kind) > target


@pytest.mark.slow
@pytest.mark.parametrize("kind", ACCOUNTANTS)
@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
@pytest.mark.parametrize(("q", "steps"), [(0.001, 5000), (0.01, 300), (CIFAR_Q, 3000), (1.0, 20)])
def test_calibration_never_overshoots_grid(kind: str, target: float, q: float, steps: int) -> None:
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, accountant=kind)
    spent = epsilon(sigma, q, steps, 1e-5, kind)
    assert spent <= target
    assert epsilon(sigma / 1.003, q, steps, 1e-5, kind) > target
    if kind == "pld":  # smooth in σ (RDP can step down where the best order changes)
        assert spent >= 0.99 * target


def test_calibration_of_few_steps_does_not_search_far_below_its_answer(monkeypatch) -> None:
    """ε = 8 in 3 steps at q = 0.045 needs σ ≈ 0.445; the closed-form start (0.047) spent 8 s
    on one PLD at σ = 0.05. The search starts at START_FLOOR, and still finds answers below it."""
    from dpmicroadam.accounting import calibration

    asked: list[float] = []
    real = calibration._epsilon

    def spy(sigma, *args):
        asked.append(sigma)
        return real(sigma, *args)

    monkeypatch.setattr(calibration, "_epsilon", spy)
    sigma = calibration._calibrate(8.0, 1e-5, 0.045, 3, "pld", 1e3, 1e-3)
    assert 0.4 < sigma < 0.5 and epsilon(sigma, 0.045, 3, 1e-5) <= 8.0
    assert min(asked) >= calibration.START_FLOOR
    asked.clear()
    low = calibration._calibrate(40.0, 1e-5, 0.045, 3, "rdp", 1e3, 1e-3)  # the answer: ≈ 0.22
    assert low < calibration.START_FLOOR and epsilon(low, 0.045, 3, 1e-5, "rdp") <= 40.0
    assert epsilon(low / 1.003, 0.045, 3, 1e-5, "rdp") > 40.0


def test_calibration_is_cached() -> None:
    args = (4.0, 1e-5, 0.02, 700)
    first = calibrate_noise_multiplier(*args)
    start = time.perf_counter()
    assert calibrate_noise_multiplier(*args) == first
    assert time.perf_counter() - start < 0.01


def test_calibration_matches_spec_cifar_point() -> None:
    # SPEC §4: σ = 3 reaches ε = 8 after ≈3066 steps (RDP), so calibrating ε = 8 there gives ≈3.
    sigma = calibrate_noise_multiplier(8.0, 1e-5, CIFAR_Q, 3066, accountant="rdp")
    assert sigma == pytest.approx(3.0, rel=2e-3)


def test_calibration_impossible_budget_raises() -> None:
    with pytest.raises(ValueError, match=r"target_epsilon=0\.001.*steps=10000.*raise"):
        calibrate_noise_multiplier(1e-3, 1e-5, 1.0, 10_000)


def test_calibration_respects_max_noise_multiplier() -> None:
    # The answer is σ ≈ 1.42 (PLD).
    with pytest.raises(ValueError, match="max_noise_multiplier=1.2"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 1000, max_noise_multiplier=1.2)
    sigma = calibrate_noise_multiplier(1.0, 1e-5, 0.01, 1000, max_noise_multiplier=3.0)
    assert sigma < 3.0


# ---------------------------------------------------------------- validation

BAD_EPSILON_ARGS = [
    ((-1.0, 0.01, 10, 1e-5), ValueError, "noise_multiplier"),
    ((1.0, 0.0, 10, 1e-5), ValueError, "sample_rate"),
    ((1.0, 1.5, 10, 1e-5), ValueError, "sample_rate"),
    ((1.0, 0.01, -1, 1e-5), ValueError, "steps"),
    ((1.0, 0.01, 2.5, 1e-5), TypeError, "steps"),
    ((1.0, 0.01, 10, 0.0), ValueError, "delta"),
    ((1.0, 0.01, 10, 1.0), ValueError, "delta"),
    ((float("nan"), 0.01, 10, 1e-5), ValueError, "noise_multiplier"),
    (("1", 0.01, 10, 1e-5), TypeError, "noise_multiplier"),
]


@pytest.mark.parametrize(("args", "exc", "name"), BAD_EPSILON_ARGS)
def test_epsilon_rejects_bad_args(args: tuple, exc: type, name: str) -> None:
    with pytest.raises(exc, match=name):
        epsilon(*args)


def test_unknown_accountant_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'pld', 'rdp'.*'prv'"):
        epsilon(1.0, 0.01, 10, 1e-5, accountant="prv")
    with pytest.raises(ValueError, match="accountant"):
        Accountant(1.0, 0.01, accountant="moments")


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0.0, 1e-5, 0.01, 100), "target_epsilon"),
        ((-2.0, 1e-5, 0.01, 100), "target_epsilon"),
        ((1.0, 2.0, 0.01, 100), "target_delta"),
        ((1.0, 1e-5, 0.0, 100), "sample_rate"),
        ((1.0, 1e-5, 0.01, 0), "steps"),
    ],
)
def test_calibration_rejects_bad_args(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        calibrate_noise_multiplier(*args)


# ---------------------------------------------------------------- Accountant


def test_accountant_matches_function_and_counts_steps() -> None:
    acc = Accountant(1.0, 0.01, accountant="rdp")
    assert acc.steps == 0 and acc.epsilon(1e-5) == 0.0
    acc.step()
    acc.step(999)
    assert acc.steps == 1000
    assert acc.epsilon(1e-5) == epsilon(1.0, 0.01, 1000, 1e-5, "rdp")
    with pytest.raises(ValueError, match="n"):
        acc.step(-1)


def test_accountant_computes_only_when_steps_change(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = accountant_module._epsilon

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(accountant_module, "_epsilon", counting)
    acc = Accountant(1.3, 0.02, accountant="pld")
    acc.step(50)
    first = acc.epsilon(1e-5)
    for _ in range(100):
        assert acc.epsilon(1e-5) == first
    assert len(calls) == 1
    acc.step()
    assert acc.epsilon(1e-5) > first
    assert len(calls) == 2


def test_accountant_state_round_trip() -> None:
    acc = Accountant(2.0, 0.05, accountant="pld")
    acc.step(123)
    state = acc.state_dict()
    assert all(isinstance(v, (int, float, str)) for v in state.values())
    other = Accountant(2.0, 0.05, accountant="pld")
    other.load_state_dict(state)
    assert other.steps == 123
    assert other.epsilon(1e-5) == acc.epsilon(1e-5)


@pytest.mark.parametrize(
    ("key", "value"),
    [("noise_multiplier", 2.5), ("sample_rate", 0.1), ("accountant", "rdp")],
)
def test_accountant_load_refuses_mismatch(key: str, value: object) -> None:
    state = Accountant(2.0, 0.05).state_dict() | {key: value}
    with pytest.raises(ValueError, match=key):
        Accountant(2.0, 0.05).load_state_dict(state)


def test_accountant_load_refuses_missing_keys() -> None:
    with pytest.raises(ValueError, match="steps"):
        Accountant(2.0, 0.05).load_state_dict({"noise_multiplier": 2.0})


# ---------------------------------------------------------------- delta check, no torch


def test_check_delta_warns_when_delta_allows_publishing_a_record() -> None:
    with pytest.warns(PrivacyWarning, match="publishing a record"):
        check_delta(1e-4, 50_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_delta(1e-5, 50_000) == 1e-5
    with pytest.raises(ValueError, match="delta"):
        check_delta(0.0, 10)
    with pytest.raises(ValueError, match="dataset_size"):
        check_delta(1e-5, 0)


def test_accounting_does_not_import_torch() -> None:
    code = "import sys, dpmicroadam.accounting; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("q", [0.01, 0.3, 1 - math.exp(-0.5 - 1e-12), 1.0])
@pytest.mark.parametrize(("sigma", "interval"), [(0.45, 2e-3), (1.0, 1e-3), (4.0, 1e-3)])
def test_one_step_pld_on_arrays_is_the_librarys_to_the_bit(
    sigma: float, q: float, interval: float
) -> None:
    """gaussian_step_pld against from_gaussian_mechanism: the same PMFs, both adjacencies; at
    q = 1 − e^(−0.5 − 1e-12) the grid point ε = 0.5 lies within 1e-9 of the ADD bound
    −log(1 − q), where the inverse is taken as −∞ (as the library does)."""
    from dp_accounting.pld import privacy_loss_distribution

    from dpmicroadam.accounting.gaussian_pld import gaussian_step_pld

    ours = gaussian_step_pld(sigma, q, interval)
    theirs = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=interval, sampling_prob=q
    )
    for kind in ("_pmf_remove", "_pmf_add"):
        a, b = (getattr(pld, kind).to_dense_pmf() for pld in (ours, theirs))
        assert a._lower_loss == b._lower_loss and a._infinity_mass == b._infinity_mass
        assert a._probs.shape == b._probs.shape and np.array_equal(a._probs, b._probs)
