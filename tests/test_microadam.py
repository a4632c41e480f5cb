"""MicroAdam against SPEC section 1: golden run, Adam identity, argument errors."""

from __future__ import annotations

import pytest
import torch

from dpmicroadam.optim import MicroAdam

IMPLS = ["loop", "fast"]

GOLDEN_GRADS = [
    [0.5, -1.0, 0.25, 2.0, -0.125, 0.75, -1.5, 0.0625],
    [1.0, 0.5, -0.75, 0.25, 1.25, -0.5, 0.1, -2.0],
    [-0.3, 0.9, 0.6, -1.1, 0.2, 1.7, -0.4, 0.05],
    [0.05, -0.6, 1.3, 0.35, -0.9, 0.15, 0.8, -0.2],
    [0.7, 0.2, -0.1, -0.45, 0.55, -1.2, 0.3, 0.9],
]
GOLDEN_SELECTED = [{3, 6}, {0, 7}, {4, 5}, {2, 4}, {3, 5}]
GOLDEN_U1 = [0, 0, 0, 1, 0, 0, -1, 0]
GOLDEN_U2 = [0.744137, 0, 0, 0.670058, 0, 0, -0.670058, -0.744137]
GOLDEN_U5 = [0, 0, 0.491186, -0.545489, 0.089727, 0.130518, 0, 0]
GOLDEN_THETA5 = [-0.179054, 0, -0.107231, -0.164253, -0.083470, -0.129261, 0.218802, 0.179054]


def _golden_run(impl: str, ef_bits: int | None):
    p = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = MicroAdam(
        [p],
        lr=0.1,
        window_size=3,
        density=0.25,
        ef_bits=ef_bits,
        quant_bucket_size=4,
        topk_block_size=None,
        value_dtype=torch.float64,
        implementation=impl,
    )
    updates, selected = [], []
    for g in GOLDEN_GRADS:
        before = p.detach().clone()
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        updates.append((before - p.detach()) / 0.1)
        slot = (int(opt.state[p]["step"]) - 1) % 3
        selected.append(set(opt.state[p]["indices"][slot].tolist()))
    return p.detach(), updates, selected


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_run_exact_ef(impl):
    theta, u, selected = _golden_run(impl, None)
    assert selected == GOLDEN_SELECTED
    f64 = torch.float64
    torch.testing.assert_close(u[0], torch.tensor(GOLDEN_U1, dtype=f64), atol=1e-6, rtol=0)
    torch.testing.assert_close(u[1], torch.tensor(GOLDEN_U2, dtype=f64), atol=1e-6, rtol=0)
    torch.testing.assert_close(u[4], torch.tensor(GOLDEN_U5, dtype=f64), atol=1e-6, rtol=0)
    torch.testing.assert_close(theta, torch.tensor(GOLDEN_THETA5, dtype=f64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_run_4bit_ef_differs_only_at_coordinate_5(impl):
    theta, u, selected = _golden_run(impl, 4)
    assert selected == GOLDEN_SELECTED
    u5 = torch.tensor(GOLDEN_U5, dtype=torch.float64)
    theta5 = torch.tensor(GOLDEN_THETA5, dtype=torch.float64)
    u5[5], theta5[5] = 0.124482, -0.128657
    torch.testing.assert_close(u[4], u5, atol=1e-6, rtol=0)
    torch.testing.assert_close(theta, theta5, atol=1e-6, rtol=0)
    exact_theta, _, _ = _golden_run(impl, None)
    assert (theta - exact_theta).abs()[torch.arange(8) != 5].max() < 1e-6
    assert abs(theta[5] - exact_theta[5]) > 1e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_density_one_equals_adam_within_window(impl, weight_decay):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), ()]
    ours = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    theirs = [t.clone() for t in ours]
    window = 6
    opt = MicroAdam(
        ours,
        lr=0.01,
        weight_decay=weight_decay,
        window_size=window,
        density=1.0,
        ef_bits=None,
        value_dtype=torch.float64,
        implementation=impl,
    )
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=weight_decay, eps=1e-8)
    for _ in range(window):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g, g.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


BAD_ARGS = [
    ("lr", -1e-3),
    ("lr", float("nan")),
    ("density", 0.0),
    ("density", 1.5),
    ("window_size", 0),
    ("window_size", 2.5),
    ("ef_bits", 3),
    ("ef_bits", 16),
    ("betas", (1.0, 0.999)),
    ("betas", (0.9, -0.1)),
    ("eps", 0.0),
    ("eps", -1e-8),
    ("weight_decay", -0.1),
    ("quant_bucket_size", 0),
    ("topk_block_size", 0),
    ("value_dtype", torch.int16),
    ("implementation", "cuda"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ARGS)
def test_bad_arguments_name_argument_and_value(name, value):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=name.split("[")[0]) as info:
        MicroAdam([p], **{name: value})
    if name == "betas":
        value = value[0] if not 0 <= value[0] < 1 else value[1]
    assert repr(value) in str(info.value)


def test_bad_argument_in_param_group_is_refused():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="density=2"):
        MicroAdam([{"params": [a]}, {"params": [b], "density": 2}])
    opt = MicroAdam([a])
    with pytest.raises(ValueError, match="window_size=0"):
        opt.add_param_group({"params": [b], "window_size": 0})
    assert len(opt.param_groups) == 1


def test_tensor_lr_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="lr"):
        MicroAdam([p], lr=torch.tensor(0.1))
