"""Everything that shapes a run's future, with one ``state_dict`` / ``load_state_dict``.

A checkpoint is ``RunState.state_dict()``: model, optimizer, learning-rate schedule, the privacy
mechanism (Poisson sampler, noise generator, accountant) or the plain sampler of a non-private
run, the EMA, the augmentation RNG, the step and the training time so far. Loading it and
continuing gives, on CPU, bit for bit the run that was never interrupted.

The checkpoint holds the noise and sampling generators' states: keep it as secret as the data
(whoever has it can recompute the noise that protects the released model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpmicroadam.data.sampler import PoissonSampler
from dpmicroadam.mechanism import DPMechanism
from dpmicroadam.train.ema import EMA

__all__ = ["RunState"]


@dataclass
class RunState:
    """The mutable state of one run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    mechanism: DPMechanism | None
    sampler: PoissonSampler
    ema: EMA | None
    augment_rng: torch.Generator
    step: int = 0
    wall_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "wall_seconds": self.wall_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "augment_rng": self.augment_rng.get_state(),
        }
        if self.mechanism is not None:
            state["mechanism"] = self.mechanism.state_dict()
        else:
            state["sampler"] = self.sampler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every part (the keys written by :meth:`state_dict`).

        Raises:
            ValueError: If the checkpoint lacks a part this run has (another kind of run).
        """
        needed = ["model", "optimizer", "schedule", "augment_rng", "step", "wall_seconds"]
        needed.append("mechanism" if self.mechanism is not None else "sampler")
        if self.ema is not None:
            needed.append("ema")
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(
                f"the checkpoint lacks {missing}: it was written by another kind of run; "
                "start a new run with another --out"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.mechanism is not None:
            self.mechanism.load_state_dict(state["mechanism"])
        else:
            self.sampler.load_state_dict(state["sampler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.augment_rng.set_state(state["augment_rng"])
        self.step = int(state["step"])
        self.wall_seconds = float(state["wall_seconds"])
