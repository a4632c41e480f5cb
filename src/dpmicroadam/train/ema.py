"""Exponential moving average of parameters (De et al., arXiv 2204.13650)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """θ̄ ← d·θ̄ + (1 − d)·θ with warm-up decay d_t = min(decay, (1 + t) / (10 + t)).

    Post-processing of the released parameters: it costs no privacy.
    """

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)
        self.updates += 1

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Evaluate with the averaged weights, then put the live ones back."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state has a different number of parameters")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
