"""PrivateGradient: the release formula, zeroing, normalisation, state, validation."""

from __future__ import annotations

import math

import pytest
import torch

from dpmicroadam.privacy import GaussianNoise, PrivateGradient


def make_params():
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(3, 4, generator=g)),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]


def random_sums(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]


def test_release_formula_and_stats():
    params = make_params()
    sigma, clip, batch = 0.8, 1.5, 32.0
    pg = PrivateGradient(params, clip, sigma, batch, seed=5)
    s1, s2 = random_sums(1), random_sums(2)
    pg.accumulate(s1, 7)
    pg.accumulate(s2, 4)
    stats = pg.release()
    noise = GaussianNoise(seed=5).sample_like(s1, sigma * clip)
    for p, a, b, z in zip(params, s1, s2, noise):
        torch.testing.assert_close(p.grad, (a + b + z) / batch)
    assert stats.realized_batch_size == 11
    assert stats.divisor == batch
    assert stats.noise_std == pytest.approx(sigma * clip / batch) == pytest.approx(pg.noise_std)
    assert pg.count == 0


def test_sum_is_zeroed_after_release_and_grad_overwritten():
    params = make_params()
    pg = PrivateGradient(params, 1.0, 0.0, 10, seed=0)
    pg.accumulate(random_sums(1), 3)
    pg.release()
    assert all(p.grad.abs().sum() > 0 for p in params)
    stats = pg.release()  # nothing accumulated: must release zeros, not the old sum
    assert stats.realized_batch_size == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_empty_batch_releases_pure_noise():
    params = make_params()
    pg = PrivateGradient(params, 2.0, 1.0, 4, seed=9)
    pg.accumulate([torch.zeros(3, 4), torch.zeros(5)], 0)
    pg.release()
    noise = GaussianNoise(seed=9).sample_like([p.detach() for p in params], 2.0)
    for p, z in zip(params, noise):
        torch.testing.assert_close(p.grad, z / 4)


def test_realized_normalisation_is_explicit():
    params = make_params()
    sums = random_sums(3)
    default = PrivateGradient(params, 1.0, 0.0, 100)
    assert default.normalize == "expected"
    realized = PrivateGradient(params, 1.0, 0.0, 100, normalize="realized")
    realized.accumulate(sums, 8)
    stats = realized.release()
    assert stats.divisor == 8
    for p, s in zip(params, sums):
        torch.testing.assert_close(p.grad, s / 8)
    assert realized.release().divisor == 1  # empty batch: divide by 1, never by 0


def test_float64_and_bfloat16_params():
    p64 = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    pbf = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    pg = PrivateGradient([p64, pbf], 1.0, 1.0, 2, seed=0)
    pg.accumulate([torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.bfloat16)], 1)
    pg.release()
    assert p64.grad.dtype == torch.float64 and pbf.grad.dtype == torch.bfloat16


def test_state_round_trip_continues_noise_and_refuses_pending_sum():
    params = make_params()
    pg = PrivateGradient(params, 1.0, 1.2, 16, seed=4)
    pg.accumulate(random_sums(1), 2)
    with pytest.raises(ValueError, match="2 example\\(s\\) accumulated but not released"):
        pg.state_dict()
    pg.release()
    state = pg.state_dict()
    pg.accumulate(random_sums(2), 2)
    pg.release()
    expected = [p.grad.clone() for p in params]

    other = make_params()
    restored = PrivateGradient(other, 1.0, 1.2, 16, seed=123)
    restored.load_state_dict(state)
    restored.accumulate(random_sums(2), 2)
    restored.release()
    for p, e in zip(other, expected):
        assert torch.equal(p.grad, e)
    mismatched = PrivateGradient(other, 1.0, 1.0, 16)
    with pytest.raises(ValueError, match="noise_multiplier=1.2 but this PrivateGradient has"):
        mismatched.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"clip_norm": 0.0}, ValueError, "clip_norm must be > 0, got 0.0"),
        ({"clip_norm": -1}, ValueError, "clip_norm must be > 0, got -1"),
        ({"clip_norm": float("nan")}, ValueError, "clip_norm must be > 0, got nan"),
        ({"noise_multiplier": -0.5}, ValueError, "noise_multiplier must be >= 0.*got -0.5"),
        ({"expected_batch_size": 0}, ValueError, "expected_batch_size must be > 0, got 0"),
        ({"expected_batch_size": -3.0}, ValueError, "expected_batch_size must be > 0, got -3.0"),
        ({"normalize": "mean"}, ValueError, "normalize must be one of .* got 'mean'"),
        ({"clip_norm": math.inf}, ValueError, "clip_norm=inf with noise_multiplier=1.0"),
        ({"clip_norm": "one"}, TypeError, "clip_norm must be a number, got 'one'"),
        ({"seed": 1, "secure_noise": True}, ValueError, "seed=1 cannot be combined"),
    ],
)
def test_validation_table(kwargs, exc, message):
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 8.0} | kwargs
    with pytest.raises(exc, match=message):
        PrivateGradient(make_params(), **args)


def test_accumulate_errors():
    pg = PrivateGradient(make_params(), 1.0, 1.0, 8)
    with pytest.raises(ValueError, match="sums has 1 tensors but there are 2 parameters"):
        pg.accumulate([torch.zeros(3, 4)], 1)
    with pytest.raises(ValueError, match=r"sums\[1\] has shape \(4,\), parameter 1 has \(5,\)"):
        pg.accumulate([torch.zeros(3, 4), torch.zeros(4)], 1)
    with pytest.raises(ValueError, match="count must be an int >= 0, got -1"):
        pg.accumulate(random_sums(0), -1)
    with pytest.raises(ValueError, match="params is empty"):
        PrivateGradient([], 1.0, 1.0, 8)


def test_rejected_accumulate_leaves_the_sum_untouched():
    params = make_params()
    pg = PrivateGradient(params, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"sums\[1\]"):
        pg.accumulate([torch.ones(3, 4), torch.ones(2)], 1)
    pg.release()
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_discard_drops_the_pending_sum():
    params = make_params()
    pg = PrivateGradient(params, 1.0, 0.0, 4.0)
    pg.accumulate(random_sums(1), 3)
    pg.discard()
    assert pg.count == 0
    pg.state_dict()  # nothing pending any more
    pg.release()
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_all_reduce_single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        params = make_params()
        pg = PrivateGradient(params, 1.0, 0.0, 2.0)
        sums = random_sums(1)
        pg.accumulate(sums, 3)
        pg.all_reduce()
        assert pg.count == 3
        pg.release()
        for p, s in zip(params, sums):
            torch.testing.assert_close(p.grad, s / 2)
        with pytest.raises(ValueError, match="secure_noise=True draws different noise"):
            PrivateGradient(params, 1.0, 1.0, 2.0, secure_noise=True).all_reduce()
    finally:
        dist.destroy_process_group()


def test_handed_over_sums_are_adopted_and_never_leak_into_a_later_release(tmp_path):
    """accumulate(owned=True) keeps the first micro-batch's tensors as the accumulator; the
    release is bit for bit the copying one's, and what the buffers held is never released again."""
    import torch.distributed as dist

    def run(owned):
        params = make_params()
        pg = PrivateGradient(params, 1.5, 0.8, 32.0, seed=5)
        first = [s.clone() for s in random_sums(1)]
        pg.accumulate(first, 7, owned=owned)
        adopted = all(a is s for a, s in zip(pg._sums, first))
        pg.accumulate(random_sums(2), 4, owned=owned)  # added into the adopted tensors
        pg.release()
        grads = [p.grad.clone() for p in params]
        pg.state_dict()  # the buffers hold released values: nothing pending
        pg.release()  # nothing accumulated: pure noise, none of the old sums
        empty = [p.grad.clone() for p in params]
        pg.accumulate(random_sums(3), 2, owned=owned)
        pg.discard()
        pg.release()  # discarded: pure noise again
        discarded = [p.grad.clone() for p in params]
        return adopted, grads, empty, discarded

    (adopted, *got), (copied, *want) = run(True), run(False)
    assert adopted and not copied
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))
    stream = GaussianNoise(seed=5)
    shapes = [torch.empty(3, 4), torch.empty(5)]
    expected = [(a + b + z) / 32.0 for a, b, z in
                zip(random_sums(1), random_sums(2), stream.sample_like(shapes, 1.2))]  # fmt: skip
    for kind, values in zip(("empty", "discarded"), got[1:]):
        for v, z in zip(values, stream.sample_like(shapes, 1.2), strict=True):
            assert torch.equal(v, z / 32.0), kind
    for g, e in zip(got[0], expected, strict=True):
        torch.testing.assert_close(g, e)
    # A rank that passed nothing all-reduces zeros, not the buffers' stale values.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        params = make_params()
        pg = PrivateGradient(params, 1.0, 0.0, 2.0)
        pg.accumulate(random_sums(1), 3, owned=True)
        pg.release()
        pg.all_reduce()  # (with more ranks, the sum the others receive)
        assert all(torch.count_nonzero(acc) == 0 for acc in pg._sums)
        pg.release()
        assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    finally:
        dist.destroy_process_group()
