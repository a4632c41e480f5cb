r"""Privacy auditing in one training run: an empirical lower bound on ε.

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", arXiv 2305.08846.

m canaries are drawn; each is included in the run independently with probability 1/2. The run is
an ordinary `dpmicroadam train` run (the same :class:`~dpmicroadam.train.Run`, the same
:class:`~dpmicroadam.mechanism.DPMechanism`: sampler, clipping, noise, accountant); the canaries
enter through the run's hooks (``dpmicroadam.audit.canaries``). Afterwards each
canary gets a score, the auditor guesses "included" for the highest scores and "excluded" for the
lowest, abstains on the rest, and :func:`dpmicroadam.accounting.lower_bound.epsilon_lower_bound` turns
the number of correct guesses into an ε that the run provably exceeds with the stated confidence.

Two settings (``dpmicroadam.audit.canaries``): white-box Dirac gradient canaries, scored from
every released gradient (the strongest: it checks the clipping, the release, the noise and the
sampling rate, independently of the model); and black-box input canaries, scored by the final
model's loss (far below the accounted ε: it measures what an attacker who sees the final weights
can show, not the mechanism).

The audit runs in one process. Under torchrun every rank would inject its canaries and the
all-reduce would count them W times, which could report a false violation: it is refused.

What it shows: a lower bound above the accounted ε means the code does not do what the accounting
assumes (a bug). A bound below it shows nothing more: the accounting may still be wrong in ways
these canaries cannot see.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpmicroadam import distributed
from dpmicroadam.audit.canaries import BlackBoxCanaries, WhiteBoxCanaries
from dpmicroadam.audit.config import AUDIT_MODES, AuditConfig, resolve_audit_config
from dpmicroadam.audit.scores import (
    WHITE_BOX_SCORES,
    GuessOutcome,
    guess_and_bound,
    white_box_scores,
)
from dpmicroadam.train import Run, RunHooks

__all__ = [
    "AUDIT_MODES",
    "WHITE_BOX_SCORES",
    "AuditConfig",
    "AuditResult",
    "Auditor",
    "GuessOutcome",
    "guess_and_bound",
    "resolve_audit_config",
    "run_audit",
    "white_box_scores",
]


@dataclass
class AuditResult:
    """Outcome of one audit; ``summary()`` is what goes to ``audit.json``.

    ``tests`` is the number of (score, guess count) choices tried: the bound holds at
    ``confidence`` after the Bonferroni correction for all of them.
    """

    mode: str
    score: str
    epsilon_lower_bound: float
    confidence: float
    accounted_epsilon: float
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    k_pos: int
    k_neg: int
    tests: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    optimizer: str
    test_accuracy: float
    wall_seconds: float
    out: str
    scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    truth: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=bool))

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("scores")
        d.pop("truth")
        for key in ("accounted_epsilon", "epsilon_lower_bound"):
            if not math.isfinite(d[key]):
                d[key] = None if math.isnan(d[key]) else "inf"
        return d

    def line(self) -> str:
        acc = f"{self.accounted_epsilon:.3f}" if math.isfinite(self.accounted_epsilon) else "inf"
        verdict = (
            "VIOLATION: the run leaks more than accounted"
            if self.epsilon_lower_bound > self.accounted_epsilon
            else "consistent with the accounting"
        )
        return (
            f"{self.mode} audit: ε ≥ {self.epsilon_lower_bound:.3f} at "
            f"{100 * self.confidence:g} % confidence (accounted ε = {acc}, δ = {self.delta:g}); "
            f"{self.correct} of {self.guesses} guesses correct on {self.canaries} canaries; "
            f"{verdict}"
        )


class Auditor:
    """One audit run. Build it, optionally inspect ``training`` (the :class:`Run`), then :meth:`run`.

    Args:
        cfg: A resolved :class:`AuditConfig` (a private run plus its canaries).
        base: Hooks of the task to audit (default: `train`'s datasets and models).

    Raises:
        ValueError: Under torchrun (world size > 1), or for a non-private config.
    """

    def __init__(self, cfg: AuditConfig, base: RunHooks | None = None) -> None:
        if not isinstance(cfg, AuditConfig):
            raise TypeError(
                f"cfg must be an AuditConfig (from resolve_audit_config), got {type(cfg).__name__}"
            )
        if distributed.launched_by_torchrun() or distributed.initialized():
            raise ValueError(
                "the audit runs in one process: under torchrun every rank would inject its "
                "canaries and the all-reduce would count them once per rank (a false "
                "violation). Run `dpmicroadam audit` without torchrun"
            )
        self.cfg = cfg
        kind = WhiteBoxCanaries if cfg.mode == "white-box" else BlackBoxCanaries
        self.canaries = kind(cfg, base)
        self.training = Run(cfg, self.canaries)

    def run(self) -> AuditResult:
        start = time.perf_counter()
        run, cfg = self.training, self.cfg
        # The training steps of `train` (sample, privatize, step, schedule, EMA), without its
        # periodic evaluation and checkpoints: the audit needs neither.
        while run.state.step < run.total_steps:
            run.step()
        test_accuracy, _ = run.evaluate("test")
        by_name, truth = self.canaries.scores(run)
        names = list(by_name)
        mech = run.mechanism
        delta = float(mech.config.target_delta)
        matrix = np.stack([by_name[n] for n in names])
        outcome = guess_and_bound(matrix, truth, cfg.confidence, delta, cfg.guesses)
        result = AuditResult(
            mode=cfg.mode,
            score=names[outcome.score_index],
            epsilon_lower_bound=outcome.epsilon_lower_bound,
            confidence=cfg.confidence,
            accounted_epsilon=mech.epsilon(),
            delta=delta,
            canaries=cfg.canaries,
            included=int(truth.sum()),
            guesses=outcome.guesses,
            correct=outcome.correct,
            k_pos=outcome.k_pos,
            k_neg=outcome.k_neg,
            tests=outcome.tested,
            noise_multiplier=mech.noise_multiplier,
            sample_rate=mech.sample_rate,
            steps=run.state.step,
            clip_norm=float(mech.config.clip_norm),
            optimizer=cfg.optimizer,
            test_accuracy=float(test_accuracy),
            wall_seconds=round(time.perf_counter() - start, 2),
            out=str(run.out),
            scores=matrix[outcome.score_index],
            truth=truth,
        )
        out = Path(run.out)
        (out / "audit.json").write_text(json.dumps(result.summary(), indent=2))
        np.savez(
            out / "audit_scores.npz",
            included=truth,
            **{n.replace("-", "_"): by_name[n] for n in names},
        )
        from dpmicroadam.plots import plot_scores

        plot_scores(result, out / "audit_scores.png")
        return result


def run_audit(cfg: AuditConfig) -> AuditResult:
    """Train once with canaries and return the ε lower bound (also written to ``audit.json``).

    Example:
        >>> from dpmicroadam.audit import resolve_audit_config, run_audit
        >>> cfg = resolve_audit_config({"dataset": "digits", "optimizer": "dp-sgd", "epsilon": 2.0,
        ...                             "steps": 200, "batch_size": 64, "canaries": 1000,
        ...                             "out": "runs/audit"})
        >>> print(run_audit(cfg).line())
    """
    return Auditor(cfg).run()
