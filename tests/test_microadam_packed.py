"""The packed path (large tensors stepped together) against the per-tensor path and the SPEC."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import dpmicroadam.optim.microadam as micro_module
from dpmicroadam.optim import MicroAdam
from dpmicroadam.optim.kernels import Hyper
from dpmicroadam.optim.packed import make_pack, packable
from dpmicroadam.optim.reference import ReferenceMicroAdam

# Whole blocks only, whole blocks plus a tail, tail only (shorter than a block), one block.
SHAPES = [(3, 256), (40, 16), (6, 32), (256,), (2, 5, 64)]
HYPER = dict(lr=0.02, window_size=3, density=0.05, topk_block_size=256, quant_bucket_size=64)


def _run(monkeypatch, packed: bool, steps: int = 7, dtype=torch.float32, **kw):
    monkeypatch.setattr(micro_module, "MIN_PACK", 2 if packed else 10**9)
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
    opt = MicroAdam(params, **{**HYPER, **kw})
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if i == 2 and step == 4:  # no gradient: left out of that step's pack
                p.grad = None
        opt.step()
    return params, opt


@pytest.mark.parametrize("ef_bits", [None, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_packed_is_bit_identical_to_per_tensor_path(monkeypatch, ef_bits, dtype, weight_decay):
    calls = []
    real = micro_module.packed_step
    monkeypatch.setattr(micro_module, "packed_step", lambda *a: calls.append(len(a[1])) or real(*a))
    kw = dict(ef_bits=ef_bits, dtype=dtype, weight_decay=weight_decay)
    packed, opt_p = _run(monkeypatch, True, **kw)
    single, opt_s = _run(monkeypatch, False, **kw)
    assert calls and max(calls) == len(SHAPES) and min(calls) == len(SHAPES) - 1
    for a, b in zip(packed, single):
        assert torch.equal(a, b)
        state_a, state_b = opt_p.state[a], opt_s.state[b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            if key in ("indices", "values"):  # the same selection, possibly in another order
                order_a, order_b = state_a["indices"].sort(1).indices, state_b["indices"].sort(1)
                assert torch.equal(state_a["indices"].gather(1, order_a), order_b.values)
                continue
            assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("ef_bits", [None, 4])
def test_packed_matches_float64_reference(ef_bits):
    gen = torch.Generator().manual_seed(5)
    theta0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    hyper = dict(HYPER, ef_bits=ef_bits, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)
    params = [t.clone().requires_grad_() for t in theta0]
    opt = MicroAdam(params, value_dtype=torch.float64, **hyper)
    refs = [ReferenceMicroAdam(t.numpy(), **hyper) for t in theta0]
    for _ in range(6):
        for p, ref in zip(params, refs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            ref.step(p.grad.numpy())
        opt.step()
        for p, ref in zip(params, refs):
            np.testing.assert_allclose(p.detach().numpy().reshape(-1), ref.theta, 1e-10, 1e-12)


def overflow_changes_no_state(**kw) -> None:
    """A step whose gradient plus error feedback overflows names the tensor and changes
    nothing (shared with the fused step's tests)."""
    params = [torch.zeros(512, requires_grad=True), torch.zeros(640, requires_grad=True)]
    opt = MicroAdam(params, **{**HYPER, **kw})
    params[0].grad, params[1].grad = torch.ones(512), torch.full((640,), 3e38)
    opt.step()  # most of the 3e38 stay in the error feedback
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    values = [p.detach().clone() for p in params]
    params[0].grad, params[1].grad = torch.ones(512), torch.full((640,), 3e38)
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 .*overflowed"):
        opt.step()
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
        for k, x in before[p].items():
            assert torch.equal(opt.state[p][k], x), k


@pytest.mark.parametrize("ef_bits", [None, 4])
def test_packed_overflow_names_the_member_and_changes_no_state(ef_bits):
    overflow_changes_no_state(ef_bits=ef_bits)


def save_load_continue(shapes, straight_kw, first_kw, resumed_kw, steps=9, saved_at=5):
    """The same gradients stepped straight through (``MicroAdam(**straight_kw)``) and with a
    save after ``saved_at`` steps (``first_kw``) and a load into a new optimizer
    (``resumed_kw``); returns ``(straight, its optimizer, resumed, its optimizer)``. Shared with
    the fused step's tests."""
    gen = torch.Generator().manual_seed(9)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    theta0 = [torch.randn(s, generator=gen) for s in shapes]

    def step(opt, params, g):
        for p, x in zip(params, g):
            p.grad = x.clone()
        opt.step()

    straight = [t.clone().requires_grad_() for t in theta0]
    opt = MicroAdam(straight, **straight_kw)
    for g in grads:
        step(opt, straight, g)
    first = [t.clone().requires_grad_() for t in theta0]
    opt_a = MicroAdam(first, **first_kw)
    for g in grads[:saved_at]:
        step(opt_a, first, g)
    buffer = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "params": [p.detach() for p in first]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt_b = MicroAdam(resumed, **resumed_kw)
    opt_b.load_state_dict(saved["opt"])
    for g in grads[saved_at:]:
        step(opt_b, resumed, g)
    return straight, opt, resumed, opt_b


def test_packed_save_load_continue_is_bit_identical():
    straight, opt, resumed, opt_b = save_load_continue(SHAPES, HYPER, HYPER, HYPER)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(opt_b.state[q][key], value), key


def test_pack_layout_rows_and_tails():
    pack = make_pack((512, 640, 192, 256), 256, 64, 4, 0.05, torch.device("cpu"))
    assert pack.full_rows == 2 + 2 + 0 + 1 and pack.width == 192
    assert [(p.member, p.start, p.length, p.buf) for p in pack.full_parts] == [
        (0, 0, 512, 0),
        (1, 0, 512, 512),
        (3, 0, 256, 1024),
    ]
    assert [(p.member, p.start, p.length, p.buf) for p in pack.tail_parts] == [
        (1, 512, 128, 1280),
        (2, 0, 192, 1280 + 192),
    ]
    assert pack.size == 1280 + 2 * 192
    keeps = [p.keep for p in pack.parts]
    assert keeps == [2 * 13, 2 * 13, 13, 7, 10]  # ceil(0.05 * 256) = 13 per full block


def test_packable_needs_blocks_and_whole_buckets():
    hp = Hyper.from_group(
        dict(
            lr=1e-3,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            window_size=10,
            density=0.01,
            ef_bits=4,
            quant_bucket_size=64,
            topk_block_size=256,
            value_dtype=torch.bfloat16,
        )
    )
    assert packable(torch.zeros(640), hp)
    assert not packable(torch.zeros(650), hp)  # a partial bucket
    assert not packable(torch.zeros(40, 16).t(), hp)  # not contiguous
    whole = Hyper(**{**hp.__dict__, "topk_block_size": None})
    assert not packable(torch.zeros(640), whole)
    exact = Hyper(**{**hp.__dict__, "ef_bits": None})
    assert packable(torch.zeros(650), exact)


def test_short_tails_are_not_padded_to_a_long_one():
    from dpmicroadam.optim.packed import pack_members

    # tails 0, 4000, 100, 600 with blocks of 4096: 100 * 8 < 4000, so that tensor steps alone
    assert pack_members([8192, 4000, 4196, 600], 4096) == [True, True, False, True]
