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


@pytest.fixture
def spare_core(monkeypatch):
    """The draw ahead needs a core beyond torch's intra-op threads; pretend there is one (and
    let these tiny releases be drawn ahead)."""
    import dpmicroadam.privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "_cores", lambda: torch.get_num_threads() + 1)
    monkeypatch.setattr(noise_module, "PREFETCH_MIN_ELEMENTS", 1)


def _twin_runs(calls, seed=4):
    """Runs ``calls(noise)`` with the draw ahead on and off; returns both results and the noise."""
    ahead, plain = GaussianNoise(seed=seed), GaussianNoise(seed=seed)
    plain.prefetch = False
    return calls(ahead), calls(plain), ahead


def test_draw_ahead_gives_exactly_the_stream_drawn_in_place(spare_core):
    shapes = [(7, 5), (5,), (3,)]

    def releases(noise):
        out = []
        for _ in range(4):
            ts = [torch.zeros(s) for s in shapes]
            noise.add_each_(ts, 0.5)
            out.append(ts)
        return out

    got, want, noise = _twin_runs(releases)
    assert noise._ahead is not None  # the next release's noise is being drawn ahead
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))
    gen = torch.Generator().manual_seed(4)  # and it is the plain CPU stream, in order
    for ts in want:
        for t in ts:
            assert torch.equal(t, torch.randn(t.shape, generator=gen).mul_(0.5))


def test_anything_else_rewinds_the_draw_ahead(spare_core):
    """Another std, other shapes, a single add_, sample_like: all draw as without a draw ahead."""

    def mixed(noise):
        a, b, c = torch.zeros(6), torch.zeros(4, dtype=torch.float64), torch.zeros(2, 3)
        noise.add_each_([a, b], 1.0)
        noise.add_each_([a, b], 2.0)  # another std
        noise.add_each_([c], 2.0)  # other shapes
        noise.add_(a, 1.0)
        noise.add_each_([c], 2.0)
        s = noise.sample_like([c], 1.0)[0]
        noise.add_each_([c], 2.0)
        noise.add_each_([], 2.0)  # an empty release draws nothing
        noise.add_each_([c], 2.0)
        return [a.clone(), b.clone(), c.clone(), s]

    got, want, _ = _twin_runs(mixed)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_state_saved_with_a_draw_ahead_pending_resumes_bit_for_bit(spare_core):
    params = [torch.nn.Parameter(torch.zeros(9, 4)), torch.nn.Parameter(torch.zeros(4))]

    def release(pg):
        pg.accumulate([torch.ones(9, 4), torch.ones(4)], 2)
        pg.release()
        return [p.grad.clone() for p in params]

    pg = PrivateGradient(params, 1.0, 1.5, 4.0, seed=8)
    release(pg)
    assert pg.noise._ahead is not None
    state = pg.state_dict()
    want = [release(pg) for _ in range(3)]
    resumed = PrivateGradient(params, 1.0, 1.5, 4.0, seed=123)
    resumed.load_state_dict(state)
    got = [release(resumed) for _ in range(3)]
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))
    # The saved state is the one a run without the draw ahead saves at that point.
    plain = PrivateGradient(params, 1.0, 1.5, 4.0, seed=8)
    plain.noise.prefetch = False
    release(plain)
    assert torch.equal(plain.state_dict()["noise"]["generator_state"],
                       state["noise"]["generator_state"])  # fmt: skip


def test_no_draw_ahead_when_secure_too_large_or_small_not_on_the_cpu_or_no_core_free(
    spare_core, monkeypatch
):
    import dpmicroadam.privacy.noise as noise_module

    secure = GaussianNoise(secure=True)
    secure.add_each_([torch.zeros(10)], 1.0)
    assert secure._ahead is None

    def drawn_ahead(*sizes):
        noise = GaussianNoise(seed=1)
        noise.add_each_([torch.zeros(n) for n in sizes], 1.0)
        return noise._ahead is not None

    monkeypatch.setattr(noise_module, "PREFETCH_MAX_ELEMENTS", 15)
    assert not drawn_ahead(10, 6) and drawn_ahead(10, 5)
    monkeypatch.setattr(noise_module, "PREFETCH_MIN_ELEMENTS", 12)
    assert not drawn_ahead(5, 6) and drawn_ahead(6, 6)
    meta = GaussianNoise(seed=1)  # a tensor on another device: drawn there, never ahead
    assert meta._plan([torch.zeros(3), torch.empty(2, device="meta")], 1.0) is None
    monkeypatch.setattr(noise_module, "_cores", torch.get_num_threads)  # every core busy
    busy = GaussianNoise(seed=1)
    busy.add_each_([torch.zeros(10)], 1.0)
    assert busy._ahead is None
