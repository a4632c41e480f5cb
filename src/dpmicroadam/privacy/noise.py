"""Gaussian noise from the library's own generator.

Noise is drawn on the CPU from a private ``torch.Generator`` and then moved to the tensor's
device. This costs a host-to-device copy per release, and buys two things: the same seed gives
the same noise on CPU and GPU, and the generator state is a plain CPU byte tensor that
round-trips through ``state_dict`` (a CUDA generator's state is device-specific).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["GaussianNoise"]


def _fresh_seed() -> int:
    return secrets.randbits(63)


class GaussianNoise:
    """Seeded source of isotropic Gaussian noise.

    Args:
        seed: Seed of the generator. ``None`` draws one from OS entropy; it is kept in
            ``state_dict`` (through the generator state), so a run can still be resumed.
        secure: Draw a fresh seed from OS entropy (``secrets``) before *every* ``sample_like``
            call and refuse to be seeded or restored, so that no file or seed lets anyone
            replay the noise. The samples themselves still come from torch's CPU generator
            (Mersenne Twister) and floating-point Gaussian sampling; this is not a
            cryptographically secure sampler (see Mironov, "On significance of the least
            significant bits for differential privacy", CCS 2012).

    Raises:
        ValueError: If ``seed`` is given together with ``secure=True``.
        TypeError: If ``seed`` is not an int.
    """

    def __init__(self, seed: int | None = None, secure: bool = False) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if secure and seed is not None:
            raise ValueError(
                f"seed={seed!r} cannot be combined with secure=True: secure noise is seeded "
                "from OS entropy only. Pass seed=None, or secure=False for reproducible noise."
            )
        self.secure = bool(secure)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(_fresh_seed() if seed is None else seed)

    def sample_like(self, tensors: Sequence[torch.Tensor], std: float) -> list[torch.Tensor]:
        """Draw ``N(0, std^2)`` noise shaped like each tensor.

        The generator advances by the same amount whatever ``std`` is (also 0), so the stream
        of draws depends only on the shapes.

        Args:
            tensors: Reference tensors; each sample has its shape, device and dtype.
            std: Standard deviation, finite and ``>= 0``.

        Returns:
            One noise tensor per reference tensor, in order.

        Raises:
            ValueError: If ``std`` is negative or not finite.
        """
        std = float(std)
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"std must be finite and >= 0, got {std!r}")
        if self.secure:
            self._generator.manual_seed(_fresh_seed())
        out = []
        for t in tensors:
            # float64 parameters get float64 noise; everything else float32, cast afterwards.
            dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
            z = torch.randn(t.shape, generator=self._generator, dtype=dtype, device="cpu")
            out.append(z.mul_(std).to(device=t.device, dtype=t.dtype))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Return the generator state (uint8 CPU tensor); secure noise stores no state."""
        if self.secure:
            return {"secure": True}
        return {"secure": False, "generator_state": self._generator.get_state().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator state saved by ``state_dict``.

        Args:
            state: A dict from ``state_dict``.

        Raises:
            ValueError: If the secure flags differ (secure noise is never restored, and a
                secure checkpoint has no state to give to reproducible noise).
        """
        saved_secure = bool(state.get("secure", False))
        if saved_secure != self.secure:
            raise ValueError(
                f"cannot load a noise state saved with secure={saved_secure} into noise with "
                f"secure={self.secure}; create GaussianNoise with secure={saved_secure}"
            )
        if self.secure:
            return  # nothing to restore: secure noise reseeds from OS entropy.
        gen_state = state["generator_state"]
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8:
            raise TypeError(
                f"state['generator_state'] must be a uint8 tensor, got {type(gen_state).__name__}"
            )
        self._generator.set_state(gen_state.cpu())
