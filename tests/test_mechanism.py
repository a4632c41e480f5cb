"""The thin layer: one config drives sampler, noise and accountant, and they cannot disagree."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpmicroadam.accounting import PrivacyWarning
from dpmicroadam.accounting import epsilon as epsilon_of
from dpmicroadam.mechanism import BudgetExhausted, DPConfig, DPMechanism, NonFiniteGradientError


def per_row_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def data(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def config(**kw) -> DPConfig:
    base = dict(
        dataset_size=64,
        expected_batch_size=16.0,
        clip_norm=1.0,
        target_delta=1e-5,
        noise_multiplier=1.0,
        physical_batch_size=5,
        noise_seed=3,
    )
    base.update(kw)
    return DPConfig(**base)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_calibrated_config_never_exceeds_target():
    cfg = config(noise_multiplier=None, target_epsilon=2.0, steps=200)
    assert cfg.noise_multiplier > 0
    eps = epsilon_of(cfg.noise_multiplier, cfg.sample_rate, 200, 1e-5)
    assert eps <= 2.0
    assert eps > 1.9  # calibrated, not just any large σ


def test_noise_std_derived_from_clip_norm_and_expected_batch():
    mech = DPMechanism(config(clip_norm=0.5, noise_multiplier=2.0), tiny_model(), per_row_ce)
    assert mech.noise_std == pytest.approx(2.0 * 0.5 / 16.0)
    assert mech.sample_rate == pytest.approx(16 / 64)


def test_no_clip_no_noise_gives_plain_mean_gradient():
    model = tiny_model()
    x, y = data()
    mech = DPMechanism(
        config(clip_norm=math.inf, noise_multiplier=0.0, normalize="realized"), model, per_row_ce
    )
    idx = mech.sample()
    assert idx.numel() > 0
    mech.privatize(x[idx], y[idx])
    released = grads(model)
    model.zero_grad()
    per_row_ce(model(x[idx]), y[idx]).mean().backward()
    for r, p in zip(released, model.parameters()):
        torch.testing.assert_close(r, p.grad, rtol=1e-5, atol=1e-7)


def test_batches_must_come_from_the_mechanism():
    mech = DPMechanism(config(), tiny_model(), per_row_ce)
    x, y = data()
    with pytest.raises(RuntimeError, match="sample"):
        mech.privatize(x[:4], y[:4])
    idx = mech.sample()
    with pytest.raises(RuntimeError, match="twice"):
        mech.sample()
    with pytest.raises(ValueError, match="drew"):
        mech.privatize(x[: idx.numel() + 1], y[: idx.numel() + 1])


def test_shuffled_loader_declared_poisson_is_refused():
    mech = DPMechanism(config(), tiny_model(), per_row_ce)
    x, y = data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True
    )
    with pytest.raises(ValueError, match="not a Poisson sampler"):
        mech.check_sampler(loader)
    mech.check_sampler(mech.sampler)  # its own sampler is accepted


def test_each_release_is_one_accountant_event_and_empty_batches_count():
    mech = DPMechanism(config(expected_batch_size=0.01), tiny_model(), per_row_ce)
    x, y = data()
    sizes = []
    for _ in range(5):
        idx = mech.sample()
        sizes.append(idx.numel())
        mech.privatize(x[idx], y[idx])
    assert 0 in sizes  # q = 0.01/64: batches are almost always empty
    assert mech.accountant.steps == 5
    # an empty batch still releases noise
    assert any(float(p.grad.abs().sum()) > 0 for p in mech.params)


def test_same_seed_same_run_and_state_round_trip():
    x, y = data()

    def run(mech, steps):
        out = []
        for _ in range(steps):
            idx = mech.sample()
            mech.privatize(x[idx], y[idx])
            out.append((idx.clone(), [g.clone() for g in grads(mech.model)]))
        return out

    a = DPMechanism(config(), tiny_model(), per_row_ce)
    b = DPMechanism(config(), tiny_model(), per_row_ce)
    ra = run(a, 6)
    rb = run(b, 3)
    state = b.state_dict()
    c = DPMechanism(config(), tiny_model(), per_row_ce)
    c.load_state_dict(state)
    rc = run(c, 3)
    for (ia, ga), (ib, gb) in zip(ra, rb + rc):
        assert torch.equal(ia, ib)
        for u, v in zip(ga, gb):
            assert torch.equal(u, v)
    assert c.accountant.steps == 6
    other = DPMechanism(config(noise_seed=4), tiny_model(), per_row_ce)
    assert not torch.equal(run(other, 1)[0][1][0], ra[0][1][0])


def test_non_finite_gradient_releases_nothing():
    model = tiny_model()
    mech = DPMechanism(config(expected_batch_size=60.0), model, per_row_ce)
    x, y = data()
    x[:] = float("nan")
    idx = mech.sample()
    with pytest.raises(NonFiniteGradientError, match="nothing was released"):
        mech.privatize(x[idx], y[idx])
    assert mech.accountant.steps == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(clip_norm=0.0), "clip_norm"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(target_delta=0.0), "target_delta"),
        (dict(target_delta=1.0), "target_delta"),
        (dict(expected_batch_size=100.0), "expected_batch_size"),
        (dict(expected_batch_size=None, sample_rate=1.5), "sample_rate"),
        (dict(noise_multiplier=None, target_epsilon=-1.0, steps=10), "target_epsilon"),
        (dict(noise_multiplier=None, target_epsilon=1.0), "steps"),
        (dict(noise_multiplier=1.0, target_epsilon=1.0, steps=10), "exactly one"),
        (dict(augmult=0), "augmult"),
        (dict(normalize="mean"), "normalize"),
    ],
)
def test_bad_config_names_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_impossible_budget_is_refused():
    with pytest.raises(ValueError):
        config(noise_multiplier=None, target_epsilon=1e-4, steps=10_000, expected_batch_size=60.0)


def test_large_delta_warns():
    with pytest.warns(Warning, match="1/N|record"):
        config(target_delta=0.1)


def test_batchnorm_is_refused_by_name():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"1.*BatchNorm1d.*GroupNorm|BatchNorm1d"):
        DPMechanism(config(), model, per_row_ce)


# ---------------------------------------------------------------------- the budget and secrecy


def _release(mech, x, y):
    idx = mech.sample()
    mech.privatize(x[idx], y[idx])


@pytest.mark.parametrize(
    "kw", [dict(steps=3), dict(noise_multiplier=None, target_epsilon=8.0, steps=3)]
)
def test_a_release_past_the_budget_is_refused(kw):
    mech = DPMechanism(config(**kw), tiny_model(), per_row_ce)
    x, y = data()
    for _ in range(3):
        _release(mech, x, y)
    spent = mech.epsilon()
    with pytest.raises(BudgetExhausted, match=r"3 of 3 steps released \(ε = ") as err:
        mech.sample()
    assert f"{spent:.4g}" in str(err.value)
    if kw.get("target_epsilon"):
        assert "target ε = 8" in str(err.value) and spent <= 8.0
    assert mech.accountant.steps == 3  # nothing more was released or accounted
    restored = DPMechanism(config(**kw), tiny_model(), per_row_ce)
    restored.load_state_dict(mech.state_dict())
    with pytest.raises(BudgetExhausted):  # a resumed mechanism keeps the count
        restored.sample()


def test_noise_and_sampling_are_secret_by_default():
    """Without noise_seed two mechanisms draw different batches and noise (OS entropy)."""
    x, y = data()
    a = DPMechanism(config(noise_seed=None), tiny_model(), per_row_ce)
    b = DPMechanism(config(noise_seed=None), tiny_model(), per_row_ce)
    assert a.seed_is_secret and b.seed_is_secret
    batches_a = [a.sample() for _ in range(1)]
    batches_b = [b.sample() for _ in range(1)]
    a.privatize(x[batches_a[0]], y[batches_a[0]])
    b.privatize(x[batches_b[0]], y[batches_b[0]])
    assert not all(torch.equal(p, q) for p, q in zip(grads(a.model), grads(b.model)))
    assert "seed" not in {
        k for k, v in a.config.to_dict().items() if v is not None and k != "noise_seed"
    }
    assert a.config.noise_seed is None  # the entropy seed is never written into the config
    # ... and the state round-trips, so a resumed run continues the same secret streams
    c = DPMechanism(config(noise_seed=None), tiny_model(), per_row_ce)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.sample(), a.sample())


def test_secure_noise_does_not_sample_from_a_public_seed():
    """secure_noise with the default seeding: two runs draw different Poisson batches."""
    a = DPMechanism(config(noise_seed=None, secure_noise=True), tiny_model(), per_row_ce)
    b = DPMechanism(config(noise_seed=None, secure_noise=True), tiny_model(), per_row_ce)
    draws_a = torch.cat([a.sampler.sample() for _ in range(20)])
    draws_b = torch.cat([b.sampler.sample() for _ in range(20)])
    assert not torch.equal(draws_a, draws_b)


def test_realized_normalization_warns():
    with pytest.warns(PrivacyWarning, match="does not cover"):
        DPMechanism(config(normalize="realized"), tiny_model(), per_row_ce)
