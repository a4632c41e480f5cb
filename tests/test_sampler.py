"""PoissonSampler: Binomial batch sizes, per-index inclusion rate, determinism, state, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dpmicroadam.data.sampler import PoissonSampler


def binomial_chi2_pvalue(sizes: np.ndarray, n: int, q: float) -> float:
    """Chi-square goodness of fit of observed batch sizes to Binomial(n, q).

    Bins with expected count < 5 are merged into the two tails.
    """
    draws = len(sizes)
    lo, hi = int(stats.binom.ppf(1e-3, n, q)), int(stats.binom.ppf(1 - 1e-3, n, q))
    edges = np.arange(lo, hi + 1)
    expected = draws * np.concatenate(
        [[stats.binom.cdf(lo - 1, n, q)], stats.binom.pmf(edges, n, q), [stats.binom.sf(hi, n, q)]]
    )
    observed = np.concatenate(
        [[np.sum(sizes < lo)], [np.sum(sizes == k) for k in edges], [np.sum(sizes > hi)]]
    ).astype(float)
    # Merge bins from both ends inward until every expected count is >= 5.
    exp_bins, obs_bins, acc_e, acc_o = [], [], 0.0, 0.0
    for e, o in zip(expected, observed):
        acc_e, acc_o = acc_e + e, acc_o + o
        if acc_e >= 5:
            exp_bins.append(acc_e)
            obs_bins.append(acc_o)
            acc_e = acc_o = 0.0
    exp_bins[-1] += acc_e
    obs_bins[-1] += acc_o
    return float(stats.chisquare(obs_bins, exp_bins).pvalue)


N, Q, DRAWS = 400, 0.05, 3000


@pytest.fixture(scope="module")
def draws() -> list[torch.Tensor]:
    sampler = PoissonSampler(N, Q, seed=1234)
    return [sampler.sample() for _ in range(DRAWS)]


def test_batches_are_sorted_unique_int64_indices(draws: list[torch.Tensor]) -> None:
    for batch in draws[:200]:
        assert batch.dtype == torch.int64 and batch.dim() == 1
        if batch.numel():
            assert torch.all(batch[1:] > batch[:-1])
            assert int(batch[0]) >= 0 and int(batch[-1]) < N


def test_batch_sizes_follow_binomial(draws: list[torch.Tensor]) -> None:
    sizes = np.array([len(b) for b in draws])
    assert binomial_chi2_pvalue(sizes, N, Q) > 1e-3
    assert sizes.mean() == pytest.approx(N * Q, abs=4 * np.sqrt(N * Q * (1 - Q) / DRAWS))
    assert sizes.var() == pytest.approx(N * Q * (1 - Q), rel=0.1)


def test_binomial_check_rejects_fixed_size_batches() -> None:
    """The check above has power: fixed-size (shuffled-loader) batches fail it."""
    sizes = np.full(DRAWS, int(N * Q))
    assert binomial_chi2_pvalue(sizes, N, Q) < 1e-6


def test_each_index_included_with_probability_q(draws: list[torch.Tensor]) -> None:
    counts = torch.zeros(N)
    for batch in draws:
        counts[batch] += 1
    freq = counts.numpy() / DRAWS
    sd = np.sqrt(Q * (1 - Q) / DRAWS)
    assert np.all(np.abs(freq - Q) < 5 * sd)
    # Counts are iid Binomial(DRAWS, Q) across indices: no index is favoured.
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    a, b, c = (PoissonSampler(1000, 0.1, seed=s) for s in (7, 7, 8))
    for _ in range(5):
        x, y, z = a.sample(), b.sample(), c.sample()
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_unseeded_samplers_differ() -> None:
    a, b = PoissonSampler(1000, 0.5), PoissonSampler(1000, 0.5)
    assert not torch.equal(a.sample(), b.sample())


def test_state_round_trip_continues_identically() -> None:
    sampler = PoissonSampler(500, 0.2, seed=3)
    for _ in range(3):
        sampler.sample()
    state = sampler.state_dict()
    expected = [sampler.sample() for _ in range(5)]
    resumed = PoissonSampler(500, 0.2, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.sample(), e) for e in expected)
    # The saved state is a copy: drawing more did not change it.
    again = PoissonSampler(500, 0.2, seed=0)
    again.load_state_dict(state)
    assert torch.equal(again.sample(), expected[0])


@pytest.mark.parametrize(("key", "value"), [("dataset_size", 501), ("sample_rate", 0.25)])
def test_load_refuses_mismatch(key: str, value: object) -> None:
    state = PoissonSampler(500, 0.2, seed=3).state_dict() | {key: value}
    with pytest.raises(ValueError, match=key):
        PoissonSampler(500, 0.2).load_state_dict(state)


def test_load_refuses_missing_generator_state() -> None:
    with pytest.raises(ValueError, match="generator_state"):
        PoissonSampler(500, 0.2).load_state_dict({"dataset_size": 500, "sample_rate": 0.2})


def test_empty_batch_is_possible_and_well_formed() -> None:
    sampler = PoissonSampler(10, 1e-4, seed=0)
    batches = [sampler.sample() for _ in range(20)]
    empty = [b for b in batches if b.numel() == 0]
    assert empty, "with q·N = 1e-3 most batches must be empty"
    assert empty[0].dtype == torch.int64 and empty[0].shape == (0,)


def test_sample_rate_one_takes_everything() -> None:
    assert torch.equal(PoissonSampler(37, 1.0, seed=0).sample(), torch.arange(37))


def test_iteration_with_steps_matches_sample() -> None:
    sampler = PoissonSampler(100, 0.3, seed=5, steps=4)
    assert len(sampler) == 4
    batches = list(sampler)
    ref = PoissonSampler(100, 0.3, seed=5)
    assert len(batches) == 4
    assert all(torch.equal(b, ref.sample()) for b in batches)
    with pytest.raises(TypeError, match="steps"):
        len(PoissonSampler(100, 0.3, seed=5))


def test_public_attributes() -> None:
    sampler = PoissonSampler(50_000, 4096 / 50_000, seed=0)
    assert sampler.is_poisson is True
    assert sampler.sample_rate == 4096 / 50_000
    assert sampler.expected_batch_size == pytest.approx(4096)


def test_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    PoissonSampler(100, 0.5, seed=1).sample()
    PoissonSampler(100, 0.5).sample()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "name"),
    [
        ((0, 0.1), {}, ValueError, "dataset_size"),
        ((10.5, 0.1), {}, TypeError, "dataset_size"),
        ((10, 0.0), {}, ValueError, "sample_rate"),
        ((10, 1.5), {}, ValueError, "sample_rate"),
        ((10, float("nan")), {}, ValueError, "sample_rate"),
        ((10, "0.1"), {}, TypeError, "sample_rate"),
        ((10, 0.1), {"seed": -1}, ValueError, "seed"),
        ((10, 0.1), {"seed": 1.5}, TypeError, "seed"),
        ((10, 0.1), {"steps": -1}, ValueError, "steps"),
    ],
)
def test_bad_arguments_raise(args: tuple, kwargs: dict, exc: type, name: str) -> None:
    with pytest.raises(exc, match=name):
        PoissonSampler(*args, **kwargs)
