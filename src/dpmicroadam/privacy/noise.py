"""Gaussian noise from the library's own generators, drawn where the gradients live.

Noise is drawn tensor by tensor, on the tensor's own device, from a private ``torch.Generator``
of that device, and added in place (:meth:`GaussianNoise.add_`): no host-to-device copy and never
more than one tensor's noise in memory at a time (a 7B model would otherwise hold 28 GB of fp32
noise at once). CPU tensors draw from the CPU generator exactly as before, so seeded CPU runs are
unchanged. A device's generator is seeded, the first time it is used, with a number drawn from
the CPU generator; every generator's state round-trips through ``state_dict`` (so a resumed GPU
run draws the same noise). The same seed gives different (equally distributed) noise on CPU and
GPU.

On the CPU, one release's noise is drawn *ahead*: when a release has added its noise, a worker
thread draws the next release's (same shapes, same std, the same generator in the same order)
while the forward and backward pass run, so the draw, one Gaussian per parameter from torch's
single-threaded Mersenne Twister, leaves the critical path (:meth:`GaussianNoise.add_each_`).
The stream is exactly the one drawn in place would be: whenever anything else is about to use
the generator (another shape, another std, a single ``add_``, ``load_state_dict``), the draw
ahead is waited for and the generator is rewound to the state it had before it, and
``state_dict`` saves that earlier state, so the saved state and every later draw are bit for bit
those of a run without it. It holds one release's noise between steps, so it is used only up to
``PREFETCH_MAX_ELEMENTS`` entries, and from ``PREFETCH_MIN_ELEMENTS`` (a smaller draw costs less
than handing it over), never with ``secure=True`` (which reseeds from OS entropy at
each release) or on other devices, and only when torch's intra-op threads leave a core free for
the worker (with every core busy, the worker only competes with them: measured, no faster).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["GaussianNoise", "PREFETCH_MAX_ELEMENTS", "PREFETCH_MIN_ELEMENTS"]

# Largest release (in entries) whose noise is drawn ahead: 16 MiB of float32 held between steps.
PREFETCH_MAX_ELEMENTS = 2**22

# Smallest release drawn ahead: below it, handing the draw to the worker costs more than the draw.
# Measured (1 thread, a release after ~13 ms of matmuls, ad hoc): 26 k entries (the tanh CNN)
# 0.45 ms a release drawn ahead against 0.25 ms in place; 2**16 entries 0.42 against 0.49 ms;
# 2**17 0.45 against 0.79 ms; 669 k (the MLP) 0.83 against 3.35 ms.
PREFETCH_MIN_ELEMENTS = 2**16


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

    # Draw the next release's CPU noise ahead (module docstring); False draws it in place.
    prefetch = True

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
        self._executor: ThreadPoolExecutor | None = None
        # Pending draw ahead: (what it draws, generator state before it, its future).
        self._ahead: tuple[tuple, torch.Tensor, Future] | None = None

    def _settle(self) -> None:
        """Drop a pending draw ahead and rewind the generator to the state before it."""
        if self._ahead is not None:
            _, before, future = self._ahead
            self._ahead = None
            future.exception()  # wait for the worker to be done with the generator
            self._generator.set_state(before)

    def _plan(self, tensors: Sequence[torch.Tensor], std: float) -> tuple | None:
        """What a draw ahead for these tensors would draw, or None if it is not used for them."""
        if not self.prefetch or self.secure or torch.get_num_threads() >= _cores():
            return None  # off, secure, or no core left for the worker to draw on
        if any(t.device.type != "cpu" for t in tensors):
            return None
        if not PREFETCH_MIN_ELEMENTS <= sum(t.numel() for t in tensors) <= PREFETCH_MAX_ELEMENTS:
            return None
        return (std, *((tuple(t.shape), _draw_dtype(t)) for t in tensors))

    def _draw_ahead(self, plan: tuple) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="dpmicroadam-noise")
        before = self._generator.get_state()
        gen, std = self._generator, plan[0]

        def draw() -> list[torch.Tensor]:
            return [torch.randn(shape, generator=gen, dtype=dtype).mul_(std)
                    for shape, dtype in plan[1:]]  # fmt: skip

        self._ahead = (plan, before, self._executor.submit(draw))

    def _generator_for(self, device: torch.device) -> torch.Generator:
        self._settle()
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
            self._settle()
            self._generator.manual_seed(_fresh_seed())
            for gen in self._device_generators.values():
                gen.manual_seed(_fresh_seed())

    def _draw(self, t: torch.Tensor, std: float) -> torch.Tensor:
        gen = self._generator_for(t.device)
        z = torch.randn(t.shape, generator=gen, dtype=_draw_dtype(t), device=t.device)
        return z.mul_(std)

    @torch.no_grad()
    def add_each_(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        """One release: ``t += N(0, std^2 I)`` for each tensor in order, in place.

        The same draws as ``new_release()`` followed by ``add_(t, std)`` for each tensor; on the
        CPU the next release's noise is then drawn ahead (module docstring).
        """
        std = _check_std(std)
        self.new_release()
        plan = self._plan(tensors, std)
        if self._ahead is not None and self._ahead[0] != plan:
            self._settle()  # drawn for other shapes or another std: rewind, draw in place
        drawn = None
        if self._ahead is not None:
            drawn = self._ahead[2].result()
            self._ahead = None
        for j, t in enumerate(tensors):
            z = drawn[j] if drawn is not None else self._draw(t, std)
            t.add_(z if z.dtype == t.dtype else z.to(t.dtype))
            del z  # on a device, one tensor's noise at a time
        if plan is not None:
            self._draw_ahead(plan)

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
        # With a draw ahead pending, the state before it is the one a run without it would have.
        current = self._ahead[1] if self._ahead is not None else self._generator.get_state()
        state: dict[str, Any] = {"secure": False, "generator_state": current.clone()}
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
        self._settle()
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


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _draw_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 tensors get float64 noise; everything else float32, cast afterwards.
    return torch.float64 if t.dtype == torch.float64 else torch.float32
