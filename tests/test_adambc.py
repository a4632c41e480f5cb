"""AdamBC against a hand computation and against Adam without eps."""

from __future__ import annotations

import math

import pytest
import torch

from dpmicroadam.optim import AdamBC


def test_matches_hand_computation_including_the_floor():
    lr, b1, b2, gamma, noise, wd = 0.1, 0.9, 0.99, 1e-4, 0.5, 0.01
    grads = [[1.0, -0.2], [0.5, 0.1], [-2.0, 0.05]]
    p = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    opt = AdamBC([p], lr=lr, betas=(b1, b2), gamma=gamma, noise_std=noise, weight_decay=wd)
    theta, m, v = [0.3, -0.7], [0.0, 0.0], [0.0, 0.0]
    floored = []
    for t, g in enumerate(grads, start=1):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            corrected = v[i] / (1 - b2**t) - noise**2
            floored.append(corrected < gamma)
            theta[i] = theta[i] * (1 - lr * wd) - lr * (m[i] / (1 - b1**t)) / math.sqrt(
                max(corrected, gamma)
            )
        torch.testing.assert_close(
            p.detach(), torch.tensor(theta, dtype=torch.float64), rtol=1e-12, atol=0
        )
    assert any(floored) and not all(floored)  # both branches of the max were exercised


def test_no_noise_and_tiny_gamma_is_adam_without_eps():
    gen = torch.Generator().manual_seed(0)
    ours = [
        torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
        for s in [(5, 3), (4,)]
    ]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    opt = AdamBC(ours, lr=1e-2, gamma=1e-300, noise_std=0.0)
    ref = torch.optim.Adam(theirs, lr=1e-2, eps=0.0)
    for _ in range(20):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g, g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_noise_std_enlarges_steps_on_noisy_gradients():
    noise = 1.0
    moved = {}
    for ns in (0.0, noise):
        p = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
        opt = AdamBC([p], lr=1e-3, noise_std=ns, gamma=1e-8)
        g_gen = torch.Generator().manual_seed(2)
        for _ in range(50):
            p.grad = 0.1 + noise * torch.randn(1000, generator=g_gen, dtype=torch.float64)
            opt.step()
        moved[ns] = -p.detach().mean().item()
    assert moved[noise] > 3 * moved[0.0] > 0


def test_hyper_parameters_live_in_param_groups_and_skip_none_grads():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    opt = AdamBC([{"params": [a]}, {"params": [b], "noise_std": 0.2}], lr=0.1)
    assert opt.param_groups[1]["noise_std"] == 0.2 and opt.param_groups[0]["noise_std"] == 0.0
    a.grad = torch.ones(3)
    opt.step()
    assert b not in opt.state and torch.equal(b, torch.zeros(3))
    sd = opt.state_dict()
    fresh = AdamBC(
        [
            {"params": [torch.zeros(3, requires_grad=True)]},
            {"params": [torch.zeros(3, requires_grad=True)]},
        ]
    )
    fresh.load_state_dict(sd)
    assert fresh.param_groups[1]["noise_std"] == 0.2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lr", -1.0),
        ("gamma", 0.0),
        ("gamma", -1e-9),
        ("noise_std", -0.1),
        ("weight_decay", -1.0),
        ("betas", (0.9, 1.0)),
    ],
)
def test_bad_arguments(name, value):
    with pytest.raises(ValueError, match=name.split("[")[0]) as info:
        AdamBC([torch.zeros(2, requires_grad=True)], **{name: value})
    shown = value[1] if name == "betas" else value
    assert repr(shown) in str(info.value)
