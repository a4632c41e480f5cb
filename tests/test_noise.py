"""Gaussian noise: distribution, seeding, state round-trip, secure mode."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from dpmicroadam.privacy import GaussianNoise, PrivateGradient


def test_ks_released_noise_has_std_sigma_c_over_b():
    sigma, clip, batch = 1.3, 0.7, 50.0
    param = torch.nn.Parameter(torch.zeros(40_000))
    release = PrivateGradient([param], clip, sigma, batch, seed=3)
    release.accumulate([torch.zeros(40_000)], 0)  # zero gradient: the release is pure noise
    release.release()
    values = param.grad.double().numpy()
    std = sigma * clip / batch
    assert release.noise_std == pytest.approx(std)
    assert stats.kstest(values, "norm", args=(0.0, std)).pvalue > 1e-3
    for wrong in (2 / 3 * std, 3 / 2 * std):
        assert stats.kstest(values, "norm", args=(0.0, wrong)).pvalue < 1e-6


def test_same_seed_same_noise_other_seed_other_noise():
    shapes = [torch.empty(3, 4), torch.empty(5, dtype=torch.float64)]
    a = GaussianNoise(seed=7).sample_like(shapes, 2.0)
    b = GaussianNoise(seed=7).sample_like(shapes, 2.0)
    c = GaussianNoise(seed=8).sample_like(shapes, 2.0)
    for x, y, z, ref in zip(a, b, c, shapes):
        assert x.shape == ref.shape and x.dtype == ref.dtype
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_std_zero_advances_the_stream_like_any_std():
    shapes = [torch.empty(10)]
    n1, n2 = GaussianNoise(seed=1), GaussianNoise(seed=1)
    assert torch.count_nonzero(n1.sample_like(shapes, 0.0)[0]) == 0
    n2.sample_like(shapes, 5.0)
    assert torch.equal(n1.sample_like(shapes, 1.0)[0], n2.sample_like(shapes, 1.0)[0])


def test_state_round_trip_continues_the_stream():
    shapes = [torch.empty(6, 2)]
    noise = GaussianNoise(seed=11)
    noise.sample_like(shapes, 1.0)
    state = noise.state_dict()
    assert state["generator_state"].dtype == torch.uint8
    expected = [noise.sample_like(shapes, 1.0)[0] for _ in range(3)]
    restored = GaussianNoise(seed=999)
    restored.load_state_dict(state)
    got = [restored.sample_like(shapes, 1.0)[0] for _ in range(3)]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    # Without a seed the seed comes from OS entropy, but the state still round-trips.
    unseeded = GaussianNoise()
    again = GaussianNoise()
    again.load_state_dict(unseeded.state_dict())
    assert torch.equal(unseeded.sample_like(shapes, 1.0)[0], again.sample_like(shapes, 1.0)[0])


def test_secure_mode_refuses_seed_and_restore():
    with pytest.raises(ValueError, match="seed=3 cannot be combined with secure=True"):
        GaussianNoise(seed=3, secure=True)
    secure = GaussianNoise(secure=True)
    state = secure.state_dict()
    assert "generator_state" not in state
    with pytest.raises(ValueError, match="secure=False into noise with secure=True"):
        secure.load_state_dict(GaussianNoise(seed=1).state_dict())
    with pytest.raises(ValueError, match="secure=True into noise with secure=False"):
        GaussianNoise(seed=1).load_state_dict(state)
    shapes = [torch.empty(8)]
    before = secure.state_dict()
    secure.load_state_dict(before)  # accepted, restores nothing
    assert not torch.equal(secure.sample_like(shapes, 1.0)[0], secure.sample_like(shapes, 1.0)[0])


@pytest.mark.parametrize("std", [-1.0, float("nan"), float("inf")])
def test_bad_std(std):
    with pytest.raises(ValueError, match="std must be finite and >= 0"):
        GaussianNoise(seed=0).sample_like([torch.empty(2)], std)


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed must be an int"):
        GaussianNoise(seed=1.5)


def test_release_draws_tensor_by_tensor_like_the_cpu_stream():
    """The release adds, tensor by tensor and in place, exactly the CPU generator's stream."""
    from dpmicroadam.privacy import PrivateGradient

    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    pg = PrivateGradient(params, clip_norm=1.5, noise_multiplier=2.0, expected_batch_size=8.0,
                         seed=21)  # fmt: skip
    sums = [torch.randn(3, 4), torch.randn(5)]
    pg.accumulate([s.clone() for s in sums], 3)
    pg.release()
    gen = torch.Generator().manual_seed(21)
    for p, s in zip(params, sums, strict=True):
        z = torch.randn(s.shape, generator=gen, dtype=torch.float32).mul_(2.0 * 1.5)
        assert torch.equal(p.grad, (s + z) / 8.0)


def test_add_is_in_place_and_keeps_the_dtype():
    noise = GaussianNoise(seed=5)
    t = torch.zeros(1000, dtype=torch.float64)
    same = noise.add_(t, 2.0)
    assert same is t and t.dtype == torch.float64 and 1.8 < float(t.std()) < 2.2
    with pytest.raises(ValueError, match="std must be finite"):
        noise.add_(t, float("nan"))
