"""MicroAdam's paths against the float64 SPEC reference and against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmicroadam.optim import MicroAdam
from dpmicroadam.optim.reference import ReferenceMicroAdam

# (shape, topk_block_size, quant_bucket_size): smaller than a block, not a multiple of the block,
# 0-d, exactly one block, many blocks with a short tail, whole-tensor top-k.
CASES = [
    ((5,), 64, 16),
    ((130,), 64, 16),
    ((), 64, 16),
    ((8, 8), 64, 64),
    ((3, 7, 11), 50, 32),
    ((1000,), None, 100),
]


@pytest.mark.parametrize("impl", ["loop", "fast"])
@pytest.mark.parametrize("ef_bits", [None, 4, 6, 8])
@pytest.mark.parametrize(("shape", "block", "bucket"), CASES)
def test_matches_float64_reference(impl, ef_bits, shape, block, bucket):
    gen = torch.Generator().manual_seed(hash((shape, block)) % 1000)
    theta0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    hyper = dict(
        lr=0.05,
        betas=(0.8, 0.99),
        eps=1e-6,
        weight_decay=0.01,
        window_size=3,
        density=0.13,
        ef_bits=ef_bits,
        quant_bucket_size=bucket,
        topk_block_size=block,
    )
    p = theta0.clone().requires_grad_()
    opt = MicroAdam([p], value_dtype=torch.float64, implementation=impl, **hyper)
    ref = ReferenceMicroAdam(theta0.numpy(), **hyper)
    for _ in range(7):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        p.grad = g
        opt.step()
        expected = ref.step(g.numpy())
        np.testing.assert_allclose(p.detach().numpy().reshape(-1), expected, rtol=1e-10, atol=1e-12)


def _multi_group_run(impl: str, dtype: torch.dtype, steps: int = 6):
    gen = torch.Generator().manual_seed(7)
    shapes = [(300,), (17, 3), (), (4, 4, 4), (9,)]
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    opt = MicroAdam(
        [
            {"params": params[:2], "topk_block_size": 100},
            {"params": params[2:4], "density": 1.0, "ef_bits": None, "weight_decay": 0.05},
            {"params": params[4:], "ef_bits": 8, "lr": 3e-3},
        ],
        lr=1e-2,
        window_size=4,
        density=0.05,
        quant_bucket_size=32,
        implementation=impl,
    )
    for step in range(steps):
        for i, p in enumerate(params):
            # parameter 3 has no gradient on odd steps: it must be skipped untouched
            p.grad = (
                None if (i == 3 and step % 2) else torch.randn(p.shape, generator=gen).to(dtype)
            )
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fast_path_matches_loop_path(dtype):
    fast, opt_fast = _multi_group_run("fast", dtype)
    loop, opt_loop = _multi_group_run("loop", dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    for a, b in zip(fast, loop):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(fast, loop):
        sa, sb = opt_fast.state[a], opt_loop.state[b]
        assert sa.keys() == sb.keys()
        assert int(sa["step"]) == int(sb["step"])
        if "ef" in sa:
            torch.testing.assert_close(sa["ef"], sb["ef"], rtol=tol, atol=tol)


def test_parameter_without_grad_is_skipped_and_untouched():
    a = torch.randn(20).requires_grad_()
    b = torch.randn(20).requires_grad_()
    opt = MicroAdam([a, b], density=0.2)
    a.grad, b.grad = torch.randn(20), torch.randn(20)
    opt.step()
    snapshot = {k: v.clone() for k, v in opt.state[b].items()}
    b_before = b.detach().clone()
    b.grad = None
    a.grad = torch.randn(20)
    opt.step()
    assert torch.equal(b, b_before)
    for k, v in snapshot.items():
        assert torch.equal(opt.state[b][k], v)
    assert int(opt.state[a]["step"]) == 2
    c = torch.randn(5).requires_grad_()
    opt.add_param_group({"params": [c]})
    opt.step()
    assert c not in opt.state


def test_non_contiguous_parameter():
    base = torch.randn(6, 8, dtype=torch.float64)
    p = base.t().contiguous().t().requires_grad_()  # same values, non-contiguous strides
    q = base.clone().requires_grad_()
    assert not p.is_contiguous()
    opts = [MicroAdam([x], density=0.2, value_dtype=torch.float64) for x in (p, q)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        g = torch.randn(6, 8, generator=gen, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("ef_bits", [None, 4, 8])  # 5 and 6 bits are never batched
def test_batched_small_tensors_match_loop_and_reference(ef_bits, monkeypatch):
    import dpmicroadam.optim.microadam as micro_module

    calls = []
    real = micro_module.batched_step
    monkeypatch.setattr(
        micro_module, "batched_step", lambda *a: calls.append(len(a[1])) or real(*a)
    )
    gen = torch.Generator().manual_seed(11)
    sizes = [1, 2, 3, 7, 16, 33, 40, 64]
    theta0 = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
    hyper = dict(
        lr=0.02,
        window_size=3,
        density=0.2,
        ef_bits=ef_bits,
        quant_bucket_size=64,
        topk_block_size=64,
    )
    runs = {}
    for impl in ("fast", "loop"):
        params = [t.clone().requires_grad_() for t in theta0]
        opt = MicroAdam(
            params, value_dtype=torch.float64, implementation=impl, weight_decay=0.1, **hyper
        )
        refs = [ReferenceMicroAdam(t.numpy(), weight_decay=0.1, **hyper) for t in theta0]
        g_gen = torch.Generator().manual_seed(12)
        for step in range(6):
            for i, (p, ref) in enumerate(zip(params, refs)):
                g = torch.randn(p.shape, generator=g_gen, dtype=torch.float64)
                if i % 3 == 1 and step % 2:  # skipped: step counts diverge, batches split
                    p.grad = None
                    continue
                p.grad = g
                ref.step(g.numpy())
            opt.step()
            for p, ref in zip(params, refs):
                np.testing.assert_allclose(p.detach().numpy(), ref.theta, rtol=1e-10, atol=1e-12)
        runs[impl] = params
    for a, b in zip(runs["fast"], runs["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert calls and max(calls) == len(sizes) and min(calls) < len(sizes)


def test_batched_non_finite_names_the_member():
    params = [torch.zeros(n, requires_grad=True) for n in (3, 5, 7)]
    opt = MicroAdam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    params[2].grad[4] = float("nan")
    with pytest.raises(ValueError, match=r"parameter 2 of param group 0 \(shape \(7,\)\)"):
        opt.step()
    assert not opt.state
