"""DPMechanism: Poisson sampling, clipping, noise and accounting for one model."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dpmicroadam.accounting import Accountant, PrivacyWarning
from dpmicroadam.data.sampler import PoissonSampler
from dpmicroadam.mechanism.config import DPConfig, derive_seed
from dpmicroadam.privacy import PrivateGradient, make_engine
from dpmicroadam.privacy.per_example import clip_and_sum

__all__ = ["BudgetExhausted", "DPMechanism", "NonFiniteGradientError"]


class BudgetExhausted(RuntimeError):
    """The mechanism has released all the steps of its budget (``DPConfig.steps``)."""


class NonFiniteGradientError(FloatingPointError):
    """A per-example gradient was NaN or infinite: the step was not released."""


class DPMechanism:
    """Poisson sampling, per-example clipping, Gaussian noise and accounting for one model.

    Args:
        config: The privacy configuration; σ is calibrated here when a target ε is given.
        model: The model; every parameter with ``requires_grad`` is trained privately. Modules
            that mix examples (BatchNorm) are refused.
        loss_fn: ``loss_fn(outputs, targets)`` returning per-row losses (``reduction="none"``).
        process_group: For data-parallel training (``dpmicroadam.distributed``): every rank
            draws the same batch from :meth:`sample`, passes only its share to :meth:`privatize`;
            the clipped sums are all-reduced and every rank adds the same noise draw (one draw of
            std σC per step, identical seeds), so the release is identical on every rank.

    Example:
        >>> mech = DPMechanism(DPConfig(dataset_size=N, expected_batch_size=256, clip_norm=1.0,
        ...                             target_epsilon=8, target_delta=1e-5, steps=T), model, loss)
        >>> for _ in range(T):
        ...     idx = mech.sample()
        ...     mech.privatize(x[idx], y[idx])   # writes p.grad
        ...     optimizer.step()
    """

    def __init__(
        self,
        config: DPConfig,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        *,
        process_group: Any = None,
    ) -> None:
        self.config = config
        self.model = model
        self.engine = make_engine(model, loss_fn, kind=config.engine)
        self.params: list[nn.Parameter] = list(self.engine.params)
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        if process_group is not None and config.secure_noise:
            raise ValueError(
                "secure_noise=True with a process_group: each rank would draw different noise and "
                "the replicas would diverge; leave secure_noise off for data-parallel training "
                "(the noise is still seeded from OS entropy unless noise_seed is given)"
            )
        # The seed of the noise and the sampling: from OS entropy unless the caller fixed one.
        # It is never written to the config; only the generators' states reach the checkpoint.
        self.seed_is_secret = config.noise_seed is None
        seed = config.noise_seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
            if process_group is not None:  # every rank must sample and noise alike: use rank 0's
                seed = _broadcast(seed, process_group)
        self.sampler = PoissonSampler(
            config.dataset_size, config.sample_rate, seed=derive_seed(seed, "sampler")
        )
        self.gradient = PrivateGradient(
            self.params,
            clip_norm=config.clip_norm,
            noise_multiplier=config.noise_multiplier,
            expected_batch_size=config.expected_batch_size,
            normalize=config.normalize,
            seed=None if config.secure_noise else derive_seed(seed, "noise"),
            secure_noise=config.secure_noise,
        )
        self.accountant = Accountant(
            config.noise_multiplier, config.sample_rate, accountant=config.accountant
        )
        if config.normalize == "realized":
            warnings.warn(
                "normalize='realized' divides the noisy sum by the realized batch size, which "
                "depends on the data: the accountant's ε is that of the expected-batch mechanism "
                "and does not cover this release (use normalize='expected')",
                PrivacyWarning,
                stacklevel=2,
            )
        self._pending: int | None = None
        self.process_group = process_group

    # ------------------------------------------------------------------ sampling
    @property
    def noise_multiplier(self) -> float:
        return float(self.config.noise_multiplier)

    @property
    def sample_rate(self) -> float:
        return float(self.config.sample_rate)

    @property
    def noise_std(self) -> float:
        """Std of the noise in the released (normalized) gradient: σC/B."""
        return float(self.gradient.noise_std)

    def sample(self) -> torch.Tensor:
        """Draw the next Poisson batch (sorted example indices; may be empty)."""
        if self._pending is not None:
            raise RuntimeError(
                "sample() called twice without privatize(): every drawn batch must be released "
                "(skipping one would make the accountant and the sampler disagree)"
            )
        budget = self.config.steps
        if budget is not None and self.accountant.steps >= budget:
            target = self.config.target_epsilon
            raise BudgetExhausted(
                f"the privacy budget is spent: {self.accountant.steps} of {budget} steps released "
                f"(ε = {self.epsilon():.4g} at δ = {self.config.target_delta:g}"
                + (f", target ε = {target:g}" if target is not None else "")
                + "). Releasing more needs a new DPConfig (more steps or a larger ε) and a new "
                "mechanism; the ε of both then adds up"
            )
        indices = self.sampler.sample()
        self._pending = int(indices.numel())
        return indices

    def check_sampler(self, sampler: Any) -> None:
        """Refuse a batch source that is not this mechanism's Poisson sampler.

        Raises:
            ValueError: when ``sampler`` is e.g. a shuffling DataLoader or a sampler with another rate.
        """
        batch_sampler = getattr(sampler, "batch_sampler", None) or sampler
        if not getattr(batch_sampler, "is_poisson", False):
            raise ValueError(
                f"{type(batch_sampler).__name__} is not a Poisson sampler: the accountant assumes "
                "each example is included independently with probability sample_rate. Use "
                "DPMechanism.sample() (or dpmicroadam.data.PoissonSampler) instead of a shuffled loader"
            )
        rate = getattr(batch_sampler, "sample_rate", None)
        if rate is None or not math.isclose(rate, self.sample_rate, rel_tol=1e-12):
            raise ValueError(
                f"sampler sample_rate={rate!r} differs from the mechanism's {self.sample_rate!r}"
            )

    # ------------------------------------------------------------------ release
    def privatize(self, inputs: Any, targets: torch.Tensor) -> dict[str, float]:
        """Clip, sum, noise and release the gradient of the batch from :meth:`sample`.

        The released gradient is written to ``p.grad`` of every trainable parameter (replacing any
        previous value) and one accountant event is recorded.

        Args:
            inputs: Batch inputs (b, ...), or (b, K, ...) with augmult K views per example.
            targets: Labels (b,).

        Returns:
            Statistics of the step: realized batch size and the fraction of clipped examples
            (computed on private data: do not publish them).
        """
        if self._pending is None:
            raise RuntimeError(
                "privatize() without sample(): batches must come from DPMechanism.sample() so "
                "the accountant's Poisson assumption holds"
            )
        n = _batch_len(inputs)
        # Data-parallel: each rank passes its share; the total is checked after the all-reduce.
        expected = n if self.process_group is not None else self._pending
        if n != expected or int(targets.shape[0]) != n:
            raise ValueError(
                f"the batch has {n} inputs and {int(targets.shape[0])} targets but sample() drew "
                f"{self._pending} indices: pass x[idx], y[idx] for the indices sample() returned"
            )
        clipped, bad = 0, False
        pbs = self.config.physical_batch_size
        augmult = self.config.augmult
        for start in range(0, n, pbs):
            sl = slice(start, min(start + pbs, n))
            sums, norms = self.engine.clipped_sum(
                _slice(inputs, sl), targets[sl], self.config.clip_norm, augmult=augmult
            )
            if not bool(torch.isfinite(norms).all()):
                bad = True
                break
            clipped += int((norms > self.config.clip_norm).sum())
            self.gradient.accumulate(sums, int(norms.shape[0]), owned=True)  # fresh tensors
        if self._any_rank(bad):  # every rank raises together, none waits in the all-reduce
            self.gradient.discard()
            self._pending = None
            raise NonFiniteGradientError(
                "a per-example gradient is NaN or infinite (loss diverged or bad input); "
                "nothing was released. Lower the learning rate or check the data."
            )
        self._reduce_across_ranks()
        if self.gradient.count != self._pending:
            self.gradient.discard()
            self._pending = None
            raise ValueError(
                f"the ranks passed {self.gradient.count} examples in total but sample() drew "
                f"{self._pending}: each rank must pass only its share "
                "(dpmicroadam.distributed.shard(idx, rank, world_size))"
            )
        stats = self.gradient.release()
        self.accountant.step()
        self._pending = None
        return {"batch_size": stats.realized_batch_size, "clipped_fraction": clipped / max(n, 1)}

    def inject_gradients(self, per_example_grads: Sequence[torch.Tensor]) -> None:
        """Add extra examples, given by their gradients, to the pending release (auditing).

        The gradients ``(b, *p.shape)`` (one tensor per trainable parameter) are flat-clipped at
        C here, like the batch's, so each extra example moves the release by at most C/B: the
        sensitivity bound holds whatever is passed. Their count does not enter the release
        (``normalize="expected"`` only). Call between :meth:`sample` and :meth:`privatize`.

        Raises:
            RuntimeError: Outside a pending step.
            ValueError: With ``normalize="realized"``, or a wrong number of tensors.
        """
        if self._pending is None:
            raise RuntimeError("inject_gradients() needs a pending step: call sample() first")
        if self.config.normalize != "expected":
            raise ValueError(
                "inject_gradients() needs normalize='expected': with 'realized' the extra "
                "examples would change the divisor, which is not the analysed release"
            )
        if len(per_example_grads) != len(self.params):
            raise ValueError(
                f"got {len(per_example_grads)} gradient tensors for {len(self.params)} trainable "
                "parameters; pass one (b, *shape) tensor per parameter"
            )
        sums, _ = clip_and_sum(list(per_example_grads), self.config.clip_norm)
        self.gradient.accumulate(sums, 0)

    def _reduce_across_ranks(self) -> None:
        """Data-parallel training: all-reduce the clipped sums (and counts) before the noise."""
        if self.process_group is not None:
            self.gradient.all_reduce(self.process_group)

    def _any_rank(self, flag: bool) -> bool:
        if self.process_group is None:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.params[0].device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(t.item())

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the config's target δ)."""
        return float(self.accountant.epsilon(self.config.target_delta if delta is None else delta))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "gradient": self.gradient.state_dict(),
            "accountant": self.accountant.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._pending is not None:
            raise RuntimeError("cannot load state between sample() and privatize()")
        self.sampler.load_state_dict(state["sampler"])
        self.gradient.load_state_dict(state["gradient"])
        self.accountant.load_state_dict(state["accountant"])


def _broadcast(value: Any, group: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _batch_len(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, dict):
        return _batch_len(next(iter(inputs.values())))
    if isinstance(inputs, Sequence):
        return _batch_len(inputs[0])
    raise TypeError(f"inputs must be a tensor, a dict or a sequence of tensors, got {type(inputs)}")


def _slice(inputs: Any, sl: slice) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[sl]
    if isinstance(inputs, dict):
        return {k: v[sl] for k, v in inputs.items()}
    return type(inputs)(v[sl] for v in inputs)
