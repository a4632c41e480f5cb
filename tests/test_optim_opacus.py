"""MicroAdam as the inner optimizer of Opacus' PrivacyEngine (Opacus clips and noises p.grad)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpmicroadam.optim import AdamBC, MicroAdam

opacus = pytest.importorskip("opacus")


def _loader():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    w = torch.randn(10, generator=gen)
    y = (x @ w > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


def _mean_loss(model, loader) -> float:
    with torch.no_grad():
        return sum(torch.nn.functional.cross_entropy(model(x), y).item() for x, y in loader) / len(
            loader
        )


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: MicroAdam(ps, lr=3e-2, density=0.5, window_size=4),
        lambda ps: AdamBC(ps, lr=3e-2, noise_std=0.3 * 1.0 / 64, gamma=1e-8),
    ],
)
def test_opacus_private_training_with_microadam_lowers_the_loss(make_opt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = make_opt(model.parameters())
    loader = _loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = opacus.PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.3,
            max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(1),
        )
    before = _mean_loss(model, loader)
    steps = 0
    for _ in range(5):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps += 1
    after = _mean_loss(model, loader)
    assert steps >= 10
    assert after < before - 0.05, (before, after)
    inner = optimizer.original_optimizer
    assert all(int(s["step"]) >= 1 for s in inner.state.values())
