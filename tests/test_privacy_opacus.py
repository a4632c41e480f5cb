"""With σ = 0 our clipped gradient equals Opacus' (an independent implementation)."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from dpmicroadam.privacy import PrivateGradient, VmapEngine
from privacy_models import make_case, per_row_ce

# Opacus' hooks warn when the input does not require grad; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def opacus_grads(model, x, y, clip, expected_batch_size, reduction):
    """p.grad after Opacus' clipping with noise_multiplier=0 (flat clipping)."""
    gsm = GradSampleModule(model, loss_reduction=reduction)
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=expected_batch_size,
        loss_reduction=reduction,
    )
    optimizer.zero_grad()
    losses = per_row_ce(gsm(x), y)
    (losses.sum() if reduction == "sum" else losses.mean()).backward()
    assert optimizer.pre_step()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    gsm._close()
    return grads


@pytest.mark.parametrize("name", ["cnn", "plaincnn"])
def test_clipped_sum_equals_opacus(name):
    model, x, y = make_case(name, b=8)
    engine = VmapEngine(model, per_row_ce)
    _, norms = engine.clipped_sum(x, y, 1.0)
    clip = float(norms.median())  # some examples clipped, some not
    assert (norms > clip).any() and (norms < clip).any()
    sums, _ = engine.clipped_sum(x, y, clip)
    # loss_reduction="sum": Opacus leaves the clipped sum in p.grad.
    theirs = opacus_grads(model, x, y, clip, expected_batch_size=8, reduction="sum")
    # Opacus clips by C / (norm + 1e-6) where we use C / norm: each clipped example may
    # differ by at most 1e-6 * C / norm in L2, so the sums differ by at most the total.
    slack = sum(1e-6 * clip / float(n) for n in norms if n > clip)
    gap = torch.cat([(a - b).flatten() for a, b in zip(sums, theirs)]).norm()
    scale = torch.cat([a.flatten() for a in sums]).norm()
    assert float(gap) <= slack + 1e-12
    assert float(scale) > 1e3 * slack  # the comparison is not vacuous


def test_release_equals_opacus_mean_over_expected_batch_size():
    model, x, y = make_case("cnn", b=6)
    engine = VmapEngine(model, per_row_ce)
    clip, expected = 0.05, 10  # realized 6 examples, expected 10: both divide by 10
    release = PrivateGradient(engine.params, clip, 0.0, expected_batch_size=expected)
    sums, norms = engine.clipped_sum(x, y, clip)
    assert (norms > clip).any()
    release.accumulate(sums, 6)
    release.release()
    ours = [p.grad.clone() for p in engine.params]
    model.zero_grad(set_to_none=True)
    theirs = opacus_grads(model, x, y, clip, expected_batch_size=expected, reduction="mean")
    gap = torch.cat([(a - b).flatten() for a, b in zip(ours, theirs)]).norm()
    scale = torch.cat([a.flatten() for a in ours]).norm()
    assert float(gap) <= 1e-4 * float(scale)
