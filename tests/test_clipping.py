"""Flat clipping: degenerate identities and the sensitivity bound of the clipped sum."""

from __future__ import annotations

import math

import pytest
import torch

from dpmicroadam.privacy import PrivateGradient, VmapEngine, make_engine
from privacy_models import CASES, make_case, per_row_ce

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def flat_norm(tensors):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def diff(a, b):
    return [x - y for x, y in zip(a, b)]


@pytest.mark.parametrize("name", CASES)
def test_no_clipping_no_noise_is_plain_mean_gradient(name):
    model, x, y = make_case(name, b=6)
    engine = VmapEngine(model, per_row_ce)
    release = PrivateGradient(engine.params, math.inf, 0.0, expected_batch_size=6, seed=0)
    sums, _ = engine.clipped_sum(x, y, clip_norm=math.inf)
    release.accumulate(sums, 6)
    release.release()
    private = [p.grad.clone() for p in engine.params]
    model.zero_grad()
    per_row_ce(model(x), y).mean().backward()
    for got, p in zip(private, engine.params):
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("augmult", [1, 3])
def test_clipped_sum_matches_manual_clipping(augmult):
    model, x, y = make_case("wscnn", b=6, augmult=augmult)
    engine = VmapEngine(model, per_row_ce)
    grads = engine.per_example_grads(x, y, augmult)
    norms = torch.stack(
        [torch.tensor(flat_norm([g[i] for g in grads]), dtype=torch.float64) for i in range(6)]
    )
    clip = float(norms.median())  # half the examples are clipped, half are not
    sums, got_norms = engine.clipped_sum(x, y, clip, augmult)
    torch.testing.assert_close(got_norms, norms)
    for j, s in enumerate(sums):
        want = sum(grads[j][i] * min(1.0, clip / float(norms[i])) for i in range(6))
        torch.testing.assert_close(s, want)
    # Each example's clipped contribution has norm at most C.
    for i in range(6):
        one, _ = engine.clipped_sum(x[i : i + 1], y[i : i + 1], clip, augmult)
        assert flat_norm(one) <= clip * (1 + 1e-9)


def test_zero_gradient_example_is_harmless():
    model = torch.nn.Linear(4, 3, bias=False).double()
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0  # example 0 has an exactly zero gradient: no 0/0 in its clip factor
    y = torch.tensor([1, 2])
    engine = VmapEngine(model, per_row_ce)
    sums, norms = engine.clipped_sum(x, y, 0.01)
    assert float(norms[0]) == 0.0 and float(norms[1]) > 0.01
    alone, _ = engine.clipped_sum(x[1:], y[1:], 0.01)
    assert torch.isfinite(sums[0]).all()
    torch.testing.assert_close(sums[0], alone[0])


def adversarial(model, x, augmult):
    """An example with a huge gradient: scaled-up input labelled with its least likely class."""
    x_adv = x[:1] * 1e4
    with torch.no_grad():
        logits = model(x_adv[0] if augmult > 1 else x_adv)
    return x_adv, logits.mean(0, keepdim=True).argmin(1)


@pytest.mark.parametrize("engine_kind", ["vmap", "fast"])
@pytest.mark.parametrize("augmult", [1, 3])
@pytest.mark.parametrize("name", ["mlp", "plaincnn"])
def test_sensitivity_add_remove_replace(name, augmult, engine_kind):
    clip = 0.3
    model, x, y = make_case(name, b=6, augmult=augmult, seed=1)
    engine = make_engine(model, per_row_ce, kind=engine_kind)
    x_adv, y_adv = adversarial(model, x, augmult)
    _, adv_norm = engine.clipped_sum(x_adv, y_adv, clip, augmult)
    assert float(adv_norm[0]) > 100 * clip  # the bound is really exercised by clipping
    base, _ = engine.clipped_sum(x, y, clip, augmult)

    def moved(x2, y2):
        return flat_norm(diff(engine.clipped_sum(x2, y2, clip, augmult)[0], base))

    for extra_x, extra_y in [(x_adv, y_adv), (x[2:3] * -3, y[2:3])]:
        added = moved(torch.cat([x, extra_x]), torch.cat([y, extra_y]))
        assert added <= clip * (1 + 1e-9)
        replaced = moved(torch.cat([x[:-1], extra_x]), torch.cat([y[:-1], extra_y]))
        assert replaced <= 2 * clip * (1 + 1e-9)
    for i in range(6):
        keep = [k for k in range(6) if k != i]
        assert moved(x[keep], y[keep]) <= clip * (1 + 1e-9)
    # The adversarial example alone moves the sum by exactly C: the bound is tight.
    added = moved(torch.cat([x, x_adv]), torch.cat([y, y_adv]))
    assert added == pytest.approx(clip, rel=1e-9)
