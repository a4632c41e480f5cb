"""Poisson sampling of logical batches (SPEC §2, step 1).

Each step includes every one of the N examples independently with probability q, so the batch
size is Binomial(N, q) with mean ``expected_batch_size = q·N``, and an empty batch is a valid
step. This is the sampling the privacy accountant assumes (Poisson-subsampled Gaussian); a
shuffled loader with fixed-size batches is a different mechanism and is not covered.

The sampler owns its ``torch.Generator``; its state is part of :meth:`PoissonSampler.state_dict`
so a resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Iterator
from typing import Any

import torch


class PoissonSampler:
    """Draws sorted index batches by independent Bernoulli(q) inclusion of each example.

    Privacy-relevant guarantee: for each call of :meth:`sample`, example ``i`` is included with
    probability exactly ``sample_rate``, independently of every other example and of all past
    calls (given the generator's secrecy). The caller must account one step per call, including
    calls that return an empty batch, and must not skip, filter or pad batches.

    Args:
        dataset_size: N ≥ 1, the number of training examples.
        sample_rate: q in (0, 1].
        seed: seed of the sampler's own generator; ``None`` seeds it from OS entropy
            (``secrets``), for runs that need not be reproducible.
        steps: if given, iterating the sampler yields exactly this many batches (and
            ``len(sampler) == steps``); otherwise iteration never ends.

    Example:
        >>> sampler = PoissonSampler(50_000, 4096 / 50_000, seed=0)
        >>> batch = sampler.sample()  # sorted int64 indices, about 4096 of them
    """

    is_poisson = True
    """Marks a true Poisson sampler (the privacy layer refuses batch sources without it)."""

    def __init__(
        self,
        dataset_size: int,
        sample_rate: float,
        seed: int | None = None,
        *,
        steps: int | None = None,
    ) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral):
            raise TypeError(f"dataset_size must be an int, got {dataset_size!r}")
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
            raise TypeError(f"sample_rate must be a real number, got {sample_rate!r}")
        if not (0.0 < float(sample_rate) <= 1.0):  # also rejects nan
            raise ValueError(
                f"sample_rate must be in (0, 1] (expected_batch_size / dataset_size), "
                f"got {sample_rate!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if seed is not None and not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0
        ):
            raise ValueError(f"steps must be an int >= 0 or None, got {steps!r}")
        self.dataset_size = int(dataset_size)
        self.sample_rate = float(sample_rate)
        self.steps = None if steps is None else int(steps)
        self.generator = torch.Generator()
        self.generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))

    @property
    def expected_batch_size(self) -> float:
        """B = q·N, the public constant the released gradient sum is divided by."""
        return self.sample_rate * self.dataset_size

    def sample(self) -> torch.Tensor:
        """One Poisson batch: sorted ``int64`` indices in ``[0, dataset_size)``, possibly empty."""
        mask = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
        return mask.nonzero().squeeze(1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        count = 0
        while self.steps is None or count < self.steps:
            yield self.sample()
            count += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError(
                "PoissonSampler has no length: pass steps=... to iterate a fixed number of batches"
            )
        return self.steps

    def state_dict(self) -> dict[str, Any]:
        """``dataset_size``, ``sample_rate`` and the generator state (a uint8 tensor)."""
        return {
            "dataset_size": self.dataset_size,
            "sample_rate": self.sample_rate,
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generator state; refuses a state saved for another N or q.

        Raises:
            ValueError: a key is missing or ``dataset_size``/``sample_rate`` differ (the batches,
                and so the privacy accounting, would silently change).
        """
        missing = {"dataset_size", "sample_rate", "generator_state"} - set(state_dict)
        if missing:
            raise ValueError(f"PoissonSampler state_dict is missing keys {sorted(missing)}")
        for key in ("dataset_size", "sample_rate"):
            mine, theirs = getattr(self, key), state_dict[key]
            if not (mine == theirs or (key == "sample_rate" and math.isclose(mine, theirs))):
                raise ValueError(
                    f"PoissonSampler.load_state_dict: the saved {key}={theirs!r} differs from "
                    f"this sampler's {key}={mine!r}; build the sampler with the saved run's "
                    "settings"
                )
        self.generator.set_state(state_dict["generator_state"].clone())

    def __repr__(self) -> str:
        return (
            f"PoissonSampler(dataset_size={self.dataset_size}, sample_rate={self.sample_rate!r}, "
            f"expected_batch_size={self.expected_batch_size:g})"
        )
