"""Gaussian noise from the library's own generators, drawn where the gradients live.

Noise is drawn tensor by tensor, on the tensor's own device, from a private ``torch.Generator``
of that device, and added in place (:meth:`GaussianNoise.add_`): no host-to-device copy and never
more than one tensor's noise in memory at a time (a 7B model would otherwise hold 28 GB of fp32
noise at once). CPU tensors draw from the CPU generator exactly as before, so seeded CPU runs are
unchanged. A device's generator is seeded, the first time it is used, with a number drawn from
the CPU generator; every generator's state round-trips through ``state_dict`` (so a resumed GPU
run draws the same noise). The same seed gives different (equally distributed) noise on CPU and
GPU.
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


def _check_std(std: float) -> float:
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    return std


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
        self._device_generators: dict[str, torch.Generator] = {}

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self._generator
        key = str(device)
        gen = self._device_generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
            gen.manual_seed(_fresh_seed() if self.secure else seed)
            self._device_generators[key] = gen
        return gen

    def new_release(self) -> None:
        """Call once per release: secure noise reseeds every generator from OS entropy."""
        if self.secure:
            self._generator.manual_seed(_fresh_seed())
            for gen in self._device_generators.values():
                gen.manual_seed(_fresh_seed())

    def _draw(self, t: torch.Tensor, std: float) -> torch.Tensor:
        # float64 tensors get float64 noise; everything else float32, cast afterwards.
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        gen = self._generator_for(t.device)
        z = torch.randn(t.shape, generator=gen, dtype=dtype, device=t.device)
        return z.mul_(std)

    @torch.no_grad()
    def add_(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        """``tensor += N(0, std^2 I)`` in place, drawn on ``tensor``'s device; returns it."""
        std = _check_std(std)
        z = self._draw(tensor, std)
        return tensor.add_(z if z.dtype == tensor.dtype else z.to(tensor.dtype))

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
        std = _check_std(std)
        self.new_release()
        return [self._draw(t, std).to(t.dtype) for t in tensors]

    def state_dict(self) -> dict[str, Any]:
        """The generators' states (uint8 CPU tensors); secure noise stores no state."""
        if self.secure:
            return {"secure": True}
        state: dict[str, Any] = {
            "secure": False,
            "generator_state": self._generator.get_state().clone(),
        }
        if self._device_generators:
            state["device_states"] = {
                key: gen.get_state().clone() for key, gen in self._device_generators.items()
            }
        return state

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
        self._device_generators = {}
        for key, dev_state in state.get("device_states", {}).items():
            device = torch.device(key)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue  # resumed without that device: its generator is seeded anew on use
            gen = torch.Generator(device=device)
            gen.set_state(dev_state.cpu())
            self._device_generators[key] = gen
