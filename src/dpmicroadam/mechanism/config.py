"""The privacy configuration of a run: one :class:`DPConfig`, checked in one place."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

from dpmicroadam.accounting import calibrate_noise_multiplier, check_delta
from dpmicroadam.privacy.clip import check_augmult, check_clip_norm, check_noise_multiplier

__all__ = ["DPConfig", "check_privacy_settings", "derive_seed"]

FLOAT32_MAX = 3.4028234663852886e38


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose ("sampler", "noise", ...) derived from the run's seed.

    Independent streams for independent purposes, all reproducible from the one seed.
    """
    digest = hashlib.sha256(f"dpmicroadam:{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_privacy_settings(
    clip_norm: object,
    augmult: object,
    noise_multiplier: object | None,
    target_epsilon: object | None,
    target_delta: object,
) -> tuple[float, int, float | None]:
    """The rules on C, K, σ, ε and δ of :class:`DPConfig`, in one place.

    ``dpmicroadam train`` calls it when it resolves its flags (before any data is loaded); the
    per-example engines and the release trust values that passed it.

    Returns:
        ``(clip_norm, augmult, noise_multiplier)`` as checked.

    Raises:
        ValueError: Naming the setting and the accepted range.
    """
    c = check_clip_norm(clip_norm)
    if math.isfinite(c) and c > FLOAT32_MAX:
        raise ValueError(
            f"clip_norm must be at most {FLOAT32_MAX:.3g} (float32), got {clip_norm!r}: "
            "the gradients and the noise σC would overflow; typical values are 0.1 to 10"
        )
    k = check_augmult(augmult)
    if not isinstance(target_delta, int | float) or not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
    if target_epsilon is not None and not (
        isinstance(target_epsilon, int | float) and 0 < target_epsilon < math.inf
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    sigma = None if noise_multiplier is None else check_noise_multiplier(noise_multiplier)
    if sigma is not None and math.isinf(c) and sigma > 0:
        raise ValueError(
            f"clip_norm=inf with noise_multiplier={sigma:g}: unclipped gradients have unbounded "
            "sensitivity; set a finite clip_norm"
        )
    return c, k, sigma


@dataclass
class DPConfig:
    """Everything that shapes the privacy of a run (names as in SPEC.md).

    Give either ``expected_batch_size`` or ``sample_rate``; either ``noise_multiplier`` or
    ``target_epsilon`` (then ``steps`` is required and σ is calibrated so that ε ≤ target).

    The budget: ``steps`` releases (when given), never more. With ``target_epsilon`` the steps
    are those σ was calibrated for, so ε spent stays ≤ target. A release past the budget raises
    :class:`~dpmicroadam.mechanism.BudgetExhausted`; spending more takes a new config and a new
    mechanism (a new accountant), never a silent overrun.

    ``noise_seed``: ``None`` (default) seeds the noise and the Poisson sampling from OS entropy;
    their generators' state then lives only in the mechanism's ``state_dict`` (the checkpoint),
    which must stay as secret as the data. An int makes runs reproducible, and the guarantee then
    assumes that the int stays secret too (whoever knows it can recompute the noise and the batches).
    """

    dataset_size: int
    clip_norm: float
    target_delta: float
    expected_batch_size: float | None = None
    sample_rate: float | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    steps: int | None = None
    augmult: int = 1
    physical_batch_size: int = 256
    noise_seed: int | None = None
    accountant: str = "pld"
    normalize: str = "expected"
    secure_noise: bool = False
    engine: str = "auto"

    def __post_init__(self) -> None:
        """Every check of clip_norm, augmult, σ and q lives here; the engines trust these values."""
        if not isinstance(self.dataset_size, int) or self.dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive int, got {self.dataset_size!r}")
        if (self.expected_batch_size is None) == (self.sample_rate is None):
            raise ValueError(
                "give exactly one of expected_batch_size or sample_rate, got "
                f"expected_batch_size={self.expected_batch_size!r}, sample_rate={self.sample_rate!r}"
            )
        if self.expected_batch_size is not None:
            if not 0 < self.expected_batch_size <= self.dataset_size:
                raise ValueError(
                    f"expected_batch_size={self.expected_batch_size!r} must be in (0, dataset_size="
                    f"{self.dataset_size}]; use a smaller batch size or more data"
                )
            self.sample_rate = self.expected_batch_size / self.dataset_size
        else:
            if not 0 < self.sample_rate <= 1:
                raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
            self.expected_batch_size = self.sample_rate * self.dataset_size
        if self.physical_batch_size < 1:
            raise ValueError(f"physical_batch_size must be >= 1, got {self.physical_batch_size!r}")
        if self.normalize not in ("expected", "realized"):
            raise ValueError(f"normalize must be 'expected' or 'realized', got {self.normalize!r}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier or target_epsilon, got "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}"
            )
        self.clip_norm, self.augmult, _ = check_privacy_settings(
            self.clip_norm, self.augmult, self.noise_multiplier, self.target_epsilon,
            self.target_delta,
        )  # fmt: skip
        if self.target_epsilon is not None:
            if self.steps is None or self.steps < 1:
                raise ValueError(
                    f"target_epsilon needs the number of steps to calibrate σ, got steps={self.steps!r}"
                )
            self.noise_multiplier = calibrate_noise_multiplier(
                self.target_epsilon,
                self.target_delta,
                self.sample_rate,
                self.steps,
                accountant=self.accountant,
            )
        _, _, self.noise_multiplier = check_privacy_settings(
            self.clip_norm, self.augmult, self.noise_multiplier, None, self.target_delta
        )
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise ValueError(f"steps must be an int >= 1 (the budget), got {self.steps!r}")
        if self.noise_multiplier > 0 and not math.isfinite(
            self.noise_multiplier * self.clip_norm / self.expected_batch_size
        ):
            raise ValueError(
                f"clip_norm={self.clip_norm:g} is too large: the noise std σC/B overflows"
            )
        check_delta(self.target_delta, self.dataset_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
