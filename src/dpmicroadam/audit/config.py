"""The settings of `dpmicroadam audit`: every setting of `train`, plus the canaries."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any

from dpmicroadam.audit.scores import WHITE_BOX_SCORES
from dpmicroadam.train.config import TrainConfig, resolve_config, setting

__all__ = ["AUDIT_MODES", "AuditConfig", "resolve_audit_config"]

AUDIT_MODES = ("white-box", "black-box")


@dataclass
class AuditConfig(TrainConfig):
    """A private training run plus its audit.

    Attributes:
        mode: ``"white-box"`` (gradient canaries, every release observed) or ``"black-box"``
            (input canaries scored by the final model's loss).
        canaries: m, the number of canaries (half of them, in expectation, are included).
        confidence: Confidence of the ε lower bound, e.g. 0.95.
        guesses: r, the number of guesses (half "in" for the top scores, half "out" for the
            bottom). ``None`` tries r ∈ {m/50, m/20, m/10, m/5, m/2, m} and keeps the best, with a
            Bonferroni correction so the stated confidence holds for the reported bound.
        canary_norm: White-box: L2 norm of a canary's gradient before clipping (default 2·C, so
            clipping must bring it down to C).
        score: White-box score: ``"auto"`` (default: both ``"llr"``, the most powerful with
            noise, and ``"detrended"``, the most powerful without, Bonferroni-corrected),
            ``"llr"``, ``"detrended"`` or ``"sum"``; see ``white_box_scores``.
    """

    mode: str = setting("white-box", "canaries in the gradients (white-box) or the inputs "
                        "(black-box)", choices=AUDIT_MODES)  # fmt: skip
    canaries: int = setting(1000, "number of canaries m, each included with probability 1/2")
    confidence: float = setting(0.95, "confidence of the ε lower bound")
    guesses: int | None = setting(None, "number of guesses r (default: best of a small grid, "
                                  "Bonferroni-corrected)")  # fmt: skip
    canary_norm: float | None = setting(None, "white-box: canary gradient norm before clipping "
                                        "(default 2·C)")  # fmt: skip
    score: str = setting("auto", "white-box score: auto (best of llr and detrended), llr, "
                         "detrended or sum", choices=("auto", *WHITE_BOX_SCORES))  # fmt: skip

    TOML_TABLE: typing.ClassVar[str] = "audit"
    # Flags of `train` that an audit does not take: it neither resumes nor checkpoints.
    NOT_FOR_AUDIT: typing.ClassVar[tuple[str, ...]] = ("resume", "eval_every", "checkpoint_every")

    def validate(self, user_set: set[str] | frozenset[str] = frozenset()) -> None:
        super().validate(user_set)
        if not self.private:
            raise ValueError(
                f"optimizer {self.optimizer!r} is not private: an audit needs a dp-* optimizer "
                "(dp-microadam, dp-sgd, dp-adam, dp-adambc)"
            )
        if self.resume:
            raise ValueError("an audit cannot --resume: canary scores are not checkpointed")
        if self.mode not in AUDIT_MODES:
            raise ValueError(f"mode must be one of {AUDIT_MODES}, got {self.mode!r}")
        if self.canaries < 2:
            raise ValueError(f"canaries must be >= 2, got {self.canaries!r}; use e.g. 1000")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {self.confidence!r}")
        if self.guesses is not None and not 1 <= self.guesses <= self.canaries:
            raise ValueError(
                f"guesses={self.guesses!r} must be in [1, canaries={self.canaries}] (or None)"
            )
        if self.score not in (*WHITE_BOX_SCORES, "auto"):
            raise ValueError(f"score must be one of {WHITE_BOX_SCORES}, got {self.score!r}")
        if self.canary_norm is not None and not 0 < self.canary_norm < math.inf:
            raise ValueError(f"canary_norm must be finite and > 0, got {self.canary_norm!r}")
        if self.mode == "white-box" and self.normalize != "expected":
            raise ValueError(
                f"normalize={self.normalize!r}: the white-box audit injects canaries into the "
                "released sum and supports only normalize='expected' (the analysed release)"
            )


def resolve_audit_config(overrides: dict[str, Any] | None = None) -> AuditConfig:
    """Resolve an audit's config like `train`'s (defaults < tuned < recipe < TOML < overrides)."""
    return resolve_config(overrides, AuditConfig)
