"""Canaries inside an ordinary run, added through the run's hooks.

- :class:`WhiteBoxCanaries`: *Dirac gradient canaries*. Canary i is an example whose gradient
  is ``canary_norm · e_{c_i}`` (one coordinate c_i of the flattened trainable parameters, distinct
  per canary). When it is included *and* drawn by its own Poisson sampler at the run's rate q, its
  gradient goes to :meth:`DPMechanism.inject_gradients` before the release (the mechanism clips
  it like any example), so the same release adds the same noise. The auditor sees every released
  gradient (``after_release``) and scores canary i from the series g̃_t[c_i].
- :class:`BlackBoxCanaries`: *input-space canaries*. Random inputs (per-feature mean and std of the
  training data) with random labels are appended to the training set when included; the score
  is the negative loss of the canary under the final model.
"""

from __future__ import annotations

import numpy as np
import torch

from dpmicroadam.audit.config import AuditConfig
from dpmicroadam.audit.scores import white_box_scores
from dpmicroadam.data.sampler import PoissonSampler
from dpmicroadam.mechanism import derive_seed
from dpmicroadam.train import Run, RunHooks, Task
from dpmicroadam.train.task import per_row_losses

__all__ = ["BlackBoxCanaries", "WhiteBoxCanaries"]

_CANARY_CHUNK = 64  # canary gradients are materialized densely this many at a time


def _included(cfg: AuditConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "audit-inclusion"))
    return torch.rand(cfg.canaries, generator=gen) < 0.5


class WhiteBoxCanaries(RunHooks):
    """Dirac gradient canaries injected into each release; the released values recorded."""

    def __init__(self, cfg: AuditConfig, base: RunHooks | None = None) -> None:
        self.cfg = cfg
        self.base = base or RunHooks()
        self.included = _included(cfg)
        self.trace: list[torch.Tensor] = []  # released g̃_t[c_i] per step, (m,) each

    def build_task(self, run: Run) -> Task:
        task = self.base.build_task(run)
        total = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
        if self.cfg.canaries > total:
            raise ValueError(
                f"canaries={self.cfg.canaries} is more than the model's {total} trainable "
                "coordinates: white-box canaries need one coordinate each; use fewer canaries "
                "or a larger model"
            )
        return task

    def started(self, run: Run) -> None:
        mech, cfg, m = run.mechanism, self.cfg, self.cfg.canaries
        sizes = [p.numel() for p in mech.params]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "audit-canary-coordinates"))
        coords = torch.randperm(sum(sizes), generator=gen)[:m]
        offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()])
        self.param_of = torch.searchsorted(offsets, coords, right=True) - 1
        self.local_of = coords - offsets[self.param_of]
        self.by_param = []
        for j in range(len(sizes)):
            ids = torch.nonzero(self.param_of == j).flatten()
            self.by_param.append((ids, self.local_of[ids]))
        self.sampler = PoissonSampler(
            m, mech.sample_rate, seed=derive_seed(cfg.seed, "audit-canary-sampler")
        )
        self.value = float(cfg.canary_norm or 2.0 * mech.config.clip_norm)
        self.base.started(run)

    def before_release(self, run: Run) -> None:
        drawn = self.sampler.sample()
        drawn = drawn[self.included[drawn]]
        params = run.mechanism.params
        for chunk in drawn.split(_CANARY_CHUNK):
            b = int(chunk.numel())
            grads = [p.new_zeros((b, *p.shape)) for p in params]
            rows = torch.arange(b)
            owner = self.param_of[chunk]
            for j, g in enumerate(grads):
                sel = owner == j
                if bool(sel.any()):
                    g.view(b, -1)[rows[sel], self.local_of[chunk[sel]]] = self.value
            run.mechanism.inject_gradients(grads)

    def after_release(self, run: Run) -> None:
        # p.grad holds exactly the released gradient.
        row = torch.zeros(self.included.numel(), dtype=torch.float32)  # T·m floats kept
        for p, (ids, local) in zip(run.mechanism.params, self.by_param, strict=True):
            if ids.numel():
                row[ids] = p.grad.detach().reshape(-1)[local].to("cpu", torch.float32)
        self.trace.append(row)

    def scores(self, run: Run) -> tuple[dict[str, np.ndarray], np.ndarray]:
        trace = torch.stack(self.trace) if self.trace else torch.zeros(1, self.included.numel())
        mech = run.mechanism
        names = ("llr", "detrended") if self.cfg.score == "auto" else (self.cfg.score,)
        scores = {
            name: white_box_scores(
                trace,
                name,
                unit=mech.config.clip_norm / mech.config.expected_batch_size,
                noise_multiplier=mech.noise_multiplier,
                sample_rate=mech.sample_rate,
            ).numpy()
            for name in names
        }
        return scores, self.included.numpy().copy()


class BlackBoxCanaries(RunHooks):
    """A training set holding the included input-space canaries; scored by their loss."""

    def __init__(self, cfg: AuditConfig, base: RunHooks | None = None) -> None:
        self.cfg = cfg
        self.base = base or RunHooks()
        self.included = _included(cfg)

    def build_task(self, run: Run) -> Task:
        task = self.base.build_task(run)
        m = self.cfg.canaries
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "audit-canaries"))
        labels = [y for y in (task.y_train, task.y_val, task.y_test) if y.numel()]
        num_classes = int(max(int(y.max()) for y in labels)) + 1
        x = task.x_train.float()
        noise = torch.randn((m, *x.shape[1:]), generator=gen)
        self.x = (x.mean(0) + x.std(0) * noise).to(task.x_train.dtype)
        self.y = torch.randint(0, num_classes, (m,), generator=gen)
        task.x_train = torch.cat([task.x_train, self.x[self.included]])
        task.y_train = torch.cat([task.y_train, self.y[self.included]])
        return task

    def started(self, run: Run) -> None:
        self.base.started(run)

    def scores(self, run: Run) -> tuple[dict[str, np.ndarray], np.ndarray]:
        with run.weights():
            losses, _ = per_row_losses(
                run.model, self.x.to(run.device), self.y.to(run.device), run.task.eval_batch_size
            )
        return {"neg-loss": (-losses.cpu()).numpy()}, self.included.numpy().copy()
