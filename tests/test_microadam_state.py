"""MicroAdam state: save/load/continue is bit-identical, dtypes survive, bytes are counted."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from dpmicroadam.optim import MicroAdam, state_bytes


def _params(gen: torch.Generator, dtype=torch.float32) -> list[torch.Tensor]:
    shapes = [(40, 30), (70,), (), (3, 5, 7)]
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _grads(gen: torch.Generator, params) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _make(params, **kw):
    kw = {"lr": 1e-2, "window_size": 4, "density": 0.1, "topk_block_size": 256, **kw}
    return MicroAdam(
        [{"params": params[:2]}, {"params": params[2:], "density": 1.0, "weight_decay": 0.1}],
        **kw,
    )


@pytest.mark.parametrize("ef_bits", [None, 4, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_continue_is_bit_identical(ef_bits, dtype):
    gen = torch.Generator().manual_seed(1)
    params = _params(gen, dtype)
    grads = [_grads(gen, params) for _ in range(12)]
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt = _make(params, ef_bits=ef_bits)
    for g in grads:
        _step(opt, params, g)

    opt_a = _make(twin, ef_bits=ef_bits)
    for g in grads[:7]:
        _step(opt_a, twin, g)
    buffer = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "params": [p.detach() for p in twin]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt_b = _make(
        resumed, ef_bits=ef_bits, lr=0.5, density=0.5
    )  # hyper-parameters come from the dict
    opt_b.load_state_dict(saved["opt"])
    for g in grads[7:]:
        _step(opt_b, resumed, g)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    for p, q in zip(params, resumed):
        for key, value in opt.state[p].items():
            other = opt_b.state[q][key]
            assert other.dtype == value.dtype, key
            assert torch.equal(other, value), key


def test_loaded_state_keeps_its_dtypes():
    gen = torch.Generator().manual_seed(2)
    params = _params(gen)
    opt = _make(params)
    _step(opt, params, _grads(gen, params))
    fresh = _make([p.detach().clone().requires_grad_() for p in params])
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in fresh.param_groups[0]["params"]:
        state = fresh.state[p]
        assert state["values"].dtype == torch.bfloat16
        assert state["indices"].dtype == torch.int16
        assert state["ef_codes"].dtype == torch.uint8
        assert state["step"].dtype == torch.int64
    assert state_bytes(fresh) == state_bytes(opt)


def test_state_dict_without_version_is_refused():
    gen = torch.Generator().manual_seed(3)
    params = _params(gen)
    opt = _make(params)
    sd = opt.state_dict()
    assert sd["format_version"] == 1
    del sd["format_version"]
    with pytest.raises(ValueError, match="format_version"):
        _make(params).load_state_dict(sd)


def test_state_is_tensors_only_and_groups_hold_no_tensors():
    gen = torch.Generator().manual_seed(4)
    params = _params(gen)
    opt = _make(params)
    _step(opt, params, _grads(gen, params))
    for state in opt.state.values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    for group in opt.param_groups:
        assert not any(isinstance(v, torch.Tensor) for k, v in group.items() if k != "params")


def test_state_bytes_counts_layout():
    p = torch.zeros(100_000, requires_grad=True)
    opt = MicroAdam([p])
    assert state_bytes(opt) == 0
    p.grad = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    opt.step()
    # 3 blocks of 32768 keep 328 each, the 1696-entry tail keeps 17; int16 + bf16 = 4 bytes.
    k = 3 * 328 + 17
    buckets = 98  # ceil(100000 / 1024)
    expected = 10 * k * 4 + 50_000 + 2 * 4 * buckets + 8
    assert state_bytes(opt) == expected
    assert expected / 100_000 < 0.92


def test_changing_structure_after_stepping_is_refused():
    p = torch.zeros(50, requires_grad=True)
    opt = MicroAdam([p], density=0.1)
    p.grad = torch.ones(50)
    opt.step()
    opt.param_groups[0]["window_size"] = 3
    with pytest.raises(ValueError, match="window_size=3"):
        opt.step()


def test_lr_scheduler_drives_the_group_lr():
    p = torch.zeros(10, requires_grad=True)
    opt = MicroAdam([p], lr=1.0, density=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for _ in range(3):
        p.grad = torch.ones(10)
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.5, 0.25, 0.125]
