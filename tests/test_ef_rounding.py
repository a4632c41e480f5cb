"""Stochastic rounding of MicroAdam's quantized error feedback (``ef_rounding="stochastic"``)."""

from __future__ import annotations

import copy

import pytest
import torch

from dpmicroadam.optim import MicroAdam
from dpmicroadam.optim.quantize import dequantize, quantize_


def _decode(x: torch.Tensor, bits: int, bucket: int, dither: torch.Tensor | None) -> torch.Tensor:
    codes, lo, hi = quantize_(x.clone(), bits, bucket, dither)
    return dequantize(codes, lo, hi, bits, bucket, x.numel())


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_rounding_is_unbiased_and_within_one_step(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, generator=gen, dtype=torch.float64)
    x[0] = 40.0  # one outlier makes the step wide: most entries fall between two levels
    step = (x.max() - x.min()) / (2**bits - 1)
    draws = torch.stack(
        [
            _decode(x, bits, 256, torch.rand(256, generator=gen, dtype=torch.float64))
            for _ in range(4000)
        ]
    )
    assert ((draws - x).abs() < step).all()
    # the mean of 4000 draws is within 4 standard errors (step / 2 / sqrt(4000)) of x
    assert ((draws.mean(0) - x).abs() < 4 * step / 2 / 4000**0.5).all()
    # rounding to nearest is biased on the same entries: it is a fixed value, never the mean
    nearest = _decode(x, bits, 256, None)
    assert (nearest - x).abs().max() > 0.3 * step


def test_stochastic_rounding_never_leaves_the_code_range():
    x = torch.linspace(-1.0, 1.0, 64)
    # a dither just below 1 on the top entry: (hi - lo) / step may round above the top level
    dither = torch.full((64,), 0.999999)
    codes, lo, hi = quantize_(x.clone(), 4, 64, dither)
    decoded = dequantize(codes, lo, hi, 4, 64, 64)
    assert decoded.max() <= hi + 1e-6 and decoded.min() >= lo - 1e-6


D = 2048
KW = dict(lr=0.1, density=2 / D, quant_bucket_size=D)  # top-2 of one bucket


def _grad(t: int) -> torch.Tensor:
    """Entries 0, 1: huge, always the top 2. Entries 2, 3: +-50 once, then 0, so the bucket's
    range stays [-50, 50] (quantization step 100 / 15). The rest: a drift of 0.1 per step."""
    g = torch.full((D,), 0.1)
    g[0], g[1] = 1000.0, -1000.0
    g[2], g[3] = (50.0, -50.0) if t == 0 else (0.0, 0.0)
    return g


def _run(rounding: str, steps: int, impl: str = "fast", resume_at: int | None = None):
    p = torch.nn.Parameter(torch.zeros(D))
    opt = MicroAdam([p], ef_rounding=rounding, rounding_seed=7, implementation=impl, **KW)
    for t in range(steps):
        if resume_at is not None and t == resume_at:
            saved_p, saved = p.detach().clone(), copy.deepcopy(opt.state_dict())
            p = torch.nn.Parameter(saved_p)
            opt = MicroAdam([p], ef_rounding=rounding, rounding_seed=123, implementation=impl, **KW)
            opt.load_state_dict(saved)
        p.grad = _grad(t)
        opt.step()
    return p.detach().clone(), opt


def _error_feedback(opt: MicroAdam) -> torch.Tensor:
    state = next(iter(opt.state.values()))
    return dequantize(state["ef_codes"], state["ef_min"], state["ef_max"], 4, D, D)


def test_nearest_rounding_loses_small_gradients_that_stochastic_rounding_keeps():
    # 300 steps of drift 0.1 should leave 30 in the error feedback of entries 4.. (never
    # selected). 0.1 is under half a quantization step (3.3): rounded to nearest, those entries
    # are stuck at the level next to 0 from the first step on; rounded stochastically they
    # accumulate the drift in expectation.
    _, near = _run("nearest", 300)
    _, sto = _run("stochastic", 300)
    e_near, e_sto = _error_feedback(near)[4:], _error_feedback(sto)[4:]
    assert e_near.max() < 5.0
    assert abs(e_sto.mean().item() - 30.0) < 1.5


def test_stochastic_rounding_fast_matches_the_loop():
    fast, _ = _run("stochastic", 60, impl="fast")
    loop, _ = _run("stochastic", 60, impl="loop")
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-6)


def test_stochastic_rounding_resumes_exactly_from_a_state_dict():
    whole, opt = _run("stochastic", 80)
    resumed, _ = _run("stochastic", 80, resume_at=35)  # the new optimizer's own seed is replaced
    assert torch.equal(whole, resumed)
    assert "rounding_rngs" in opt.state_dict()
    assert torch.equal(_error_feedback(opt), _error_feedback(_run("stochastic", 80)[1]))


def test_stochastic_rounding_is_seeded():
    _, a = _run("stochastic", 40)
    p = torch.nn.Parameter(torch.zeros(D))
    b = MicroAdam([p], ef_rounding="stochastic", **KW)  # rounding_seed 0 against 7
    for t in range(40):
        p.grad = _grad(t)
        b.step()
    assert not torch.equal(_error_feedback(a), _error_feedback(b))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"ef_rounding": "up"}, "ef_rounding='up'"),
        ({"ef_rounding": "stochastic", "ef_bits": None}, "ef_bits=4 or 8"),
        ({"rounding_seed": 1.5}, "rounding_seed=1.5"),
    ],
)
def test_bad_rounding_settings_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        MicroAdam([torch.nn.Parameter(torch.zeros(4))], **kw)
