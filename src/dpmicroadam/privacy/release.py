"""Release of the private gradient: noisy, normalised sum of clipped per-example gradients."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .clip import check_clip_norm, check_noise_multiplier
from .noise import GaussianNoise

__all__ = ["PrivateGradient", "ReleaseStats", "NORMALIZE_MODES"]

NORMALIZE_MODES = ("expected", "realized")


@dataclass(frozen=True)
class ReleaseStats:
    """What one ``release()`` did.

    Attributes:
        realized_batch_size: Examples accumulated since the last release (may be 0).
        divisor: What the noisy sum was divided by (B, or the realized size).
        noise_std: Std of the noise in the released gradient, σC / divisor.
    """

    realized_batch_size: int
    divisor: float
    noise_std: float


class PrivateGradient:
    r"""Accumulates clipped per-example gradient sums and releases them with Gaussian noise.

    .. math::

        \tilde g = \frac{1}{B}\Big(\sum_{i \in \text{batch}} \mathrm{clip}_C(g_i)
                   + \mathcal N(0, \sigma^2 C^2 I)\Big)

    written into ``p.grad``; any optimizer may then ``step()`` (post-processing).
    (Abadi et al., arXiv 1607.00133; normalisation by the expected batch size as in
    De et al., arXiv 2204.13650.)

    Guarantee: the unit of privacy is one example together with all its K augmented views
    (their gradients are averaged before clipping). Neighbouring datasets differ by adding
    or removing one example. Each example contributes one term of L2 norm ≤ C to the sum, so
    the sum's L2 sensitivity is C and the noise std σC is derived from it here (never given
    separately). One ``release()`` is one Poisson-subsampled Gaussian mechanism with noise
    multiplier σ *only if the caller*: (1) samples the batch by Poisson sampling with rate
    q = B / N; (2) passes only sums produced by flat clipping at this ``clip_norm`` (one term
    per example); (3) records one accountant event (σ, q) per release, including releases of
    empty batches. ``normalize="realized"`` divides by the realized batch size, which depends
    on the data; it is not covered by that analysis and must be requested explicitly.

    Args:
        params: Parameters receiving the gradient, in the order of the sums passed to
            ``accumulate`` (an engine's ``params``).
        clip_norm: C > 0, the clipping threshold the sums were clipped at. ``inf`` (no
            clipping, no privacy) is only allowed with ``noise_multiplier=0``.
        noise_multiplier: σ ≥ 0.
        expected_batch_size: B = qN > 0, a public constant.
        normalize: ``"expected"`` (divide by B) or ``"realized"`` (divide by the number of
            examples accumulated, at least 1).
        seed: Seed of the noise generator (None: from OS entropy, saved in ``state_dict``).
        secure_noise: Reseed the noise from OS entropy at every release; see ``GaussianNoise``.

    Raises:
        ValueError: On C ≤ 0, σ < 0, B ≤ 0, an unknown ``normalize``, or C = inf with σ > 0.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        normalize: str = "expected",
        seed: int | None = None,
        secure_noise: bool = False,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty; pass the parameters that receive the gradient")
        self.clip_norm = check_clip_norm(clip_norm)
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.expected_batch_size = _check(
            expected_batch_size, "expected_batch_size", lambda v: 0 < v < math.inf, "> 0"
        )
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if math.isinf(self.clip_norm) and self.noise_multiplier > 0:
            raise ValueError(
                f"clip_norm=inf with noise_multiplier={noise_multiplier!r}: unclipped gradients "
                "have unbounded sensitivity; set a finite clip_norm or noise_multiplier=0"
            )
        self.normalize = normalize
        self.noise = GaussianNoise(seed=seed, secure=secure_noise)
        self._sums = [torch.zeros_like(p, dtype=_acc_dtype(p.dtype)) for p in self.params]
        self._count = 0
        # Nothing accumulated since the last release: the buffers' contents are stale (the last
        # released values, or sums handed over by the caller) and count as zeros.
        self._empty = True

    @property
    def sum_std(self) -> float:
        """Std σC of the noise added to the clipped sum (derived from the sensitivity C)."""
        return self.noise_multiplier * self.clip_norm if self.noise_multiplier > 0 else 0.0

    @property
    def noise_std(self) -> float:
        """Std σC/B of the noise in the released gradient (with B the expected batch size)."""
        return self.sum_std / self.expected_batch_size

    @property
    def count(self) -> int:
        """Examples accumulated since the last release."""
        return self._count

    def accumulate(self, sums: Sequence[torch.Tensor], count: int, owned: bool = False) -> None:
        """Add one micro-batch's clipped sum.

        Args:
            sums: One tensor per parameter, shaped like it (an engine's ``clipped_sum``).
            count: Number of examples in the micro-batch (≥ 0).
            owned: The caller hands the tensors over (nothing else refers to them, as with the
                fresh tensors an engine returns): the first micro-batch of a release is then
                kept as the accumulator itself (no copy) and the noise is added to it in place.

        Raises:
            ValueError: On a wrong number or shape of sums, or a negative count.
        """
        if isinstance(count, bool) or int(count) != count or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        if len(sums) != len(self._sums):
            raise ValueError(
                f"sums has {len(sums)} tensors but there are {len(self._sums)} parameters; "
                "pass one sum per parameter in the order of params"
            )
        for j, (acc, s) in enumerate(zip(self._sums, sums)):
            if s.shape != acc.shape:
                raise ValueError(
                    f"sums[{j}] has shape {tuple(s.shape)}, parameter {j} has {tuple(acc.shape)}"
                )
        for j, (acc, s) in enumerate(zip(self._sums, sums)):  # validated first: none half-added
            if not self._empty:
                acc.add_(s.to(device=acc.device, dtype=acc.dtype))
            elif owned and _adoptable(s, acc):
                self._sums[j] = s
            else:
                acc.copy_(s)
        self._empty = False
        self._count += int(count)

    def _zero_if_empty(self) -> None:
        if self._empty:
            for acc in self._sums:
                acc.zero_()
            self._empty = False

    def discard(self) -> None:
        """Drop the pending sum without releasing anything (e.g. after a non-finite gradient)."""
        for acc in self._sums:
            acc.zero_()  # un-noised data: not left in memory
        self._empty = True
        self._count = 0

    def all_reduce(self, group: Any = None) -> None:
        """Sum the pending clipped sums and counts over the ranks of a process group.

        Call once per step on every rank, before ``release()``. Every rank then adds the
        *same* noise (the generators must share a seed), so the replicas stay identical and
        the noise is counted once; secure noise differs per rank and is refused.

        Args:
            group: A ``torch.distributed`` process group (None: the default group).

        Raises:
            ValueError: With ``secure_noise=True``.
        """
        if self.noise.secure:
            raise ValueError(
                "secure_noise=True draws different noise on each rank, so data-parallel "
                "replicas would diverge; use a shared seed (secure_noise=False) with all_reduce"
            )
        import torch.distributed as dist

        self._zero_if_empty()  # a rank that passed no micro-batch contributes zeros
        for acc in self._sums:
            dist.all_reduce(acc, group=group)
        count = torch.tensor([self._count], dtype=torch.int64, device=self._sums[0].device)
        dist.all_reduce(count, group=group)
        self._count = int(count.item())

    def release(self) -> ReleaseStats:
        """Write the noisy, normalised sum into ``p.grad``, then zero the sum.

        ``p.grad`` is overwritten (not accumulated into). Called for every sampled batch,
        also an empty one (the release is then pure noise).

        Returns:
            The realized batch size, the divisor and the released noise std.
        """
        count = self._count
        divisor = self.expected_batch_size if self.normalize == "expected" else max(count, 1)
        self._zero_if_empty()  # an empty batch: the release is pure noise
        # Tensor by tensor, in place, on the parameters' devices: one tensor's noise at a time
        # (on the CPU the next release's noise is then drawn ahead; GaussianNoise).
        self.noise.add_each_(self._sums, self.sum_std)
        for p, acc in zip(self.params, self._sums):
            if p.grad is None:
                p.grad = acc.div_(divisor).to(p.dtype, copy=True)
            elif p.grad.dtype == acc.dtype and p.grad.device == acc.device:
                torch.div(acc, divisor, out=p.grad)  # the same division, no extra copy
            else:
                p.grad.copy_(acc.div_(divisor))
        self._empty = True  # the buffers now hold released (noisy) values, not private data
        self._count = 0
        return ReleaseStats(count, float(divisor), self.sum_std / divisor)

    def state_dict(self) -> dict[str, Any]:
        """Noise generator state and the settings (to check on load).

        Raises:
            ValueError: If a sum is pending: it is un-noised private data and must not be
                written to a checkpoint; call ``release()`` first.
        """
        if not self._empty and (self._count or any(bool(acc.any()) for acc in self._sums)):
            raise ValueError(
                f"{self._count} example(s) accumulated but not released: the pending sum is "
                "un-noised data and is never saved; call release() before state_dict()"
            )
        return {
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "expected_batch_size": self.expected_batch_size,
            "normalize": self.normalize,
            "noise": self.noise.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the noise generator; the settings must match this object's.

        Raises:
            ValueError: If a setting differs (the accounting would no longer hold).
        """
        for key in ("clip_norm", "noise_multiplier", "expected_batch_size", "normalize"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint has {key}={state[key]!r} but this PrivateGradient has "
                    f"{key}={getattr(self, key)!r}; build it with the checkpoint's settings"
                )
        self.noise.load_state_dict(state["noise"])
        self.discard()


def _adoptable(s: torch.Tensor, acc: torch.Tensor) -> bool:
    """Whether a handed-over sum can serve as the accumulator as it is."""
    return (
        s.dtype == acc.dtype
        and s.device == acc.device
        and s.shape == acc.shape
        and s.is_contiguous()
        and not s.requires_grad
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums of many clipped gradients in bf16/fp16 lose the small ones; accumulate in fp32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check(value: float, name: str, ok, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(v) or not ok(v):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v
