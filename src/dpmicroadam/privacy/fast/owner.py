"""The per-module unit of the fast engine: an owner of trainable parameters and its rule."""

from __future__ import annotations

import torch
from torch import nn

from .capture import Record, expand_rows, is_shared_call, make_record

# Upper bound on the elements of one transient per-example tensor (a chunk of instantiated
# gradients, Gram matrices or unfolded inputs): 2**22 float32 entries = 16 MiB. Small, because
# layers are processed during the backward pass, when the activations are still in memory.
CHUNK_ELEMENTS = 2**22

# An instantiated layer keeps its per-example gradients (making its clipped sum a cheap weighted
# sum) instead of its input and output gradient (needed for the matmul sum) when they hold at
# most this many times as many entries: 1.0 keeps whichever is smaller, minimising memory.
KEEP_RATIO = 1.0

# A conv layer whose per-example gradients for the whole call are this small is instantiated and
# kept even beyond KEEP_RATIO: its clipped sum is then a weighted sum instead of a second
# weight-gradient kernel, and on small layers that kernel and the ghost norm's unfold cost more
# than the memory (the 26 k-parameter tanh CNN: its `dpmicroadam train` DP step 1-16 % faster in
# interleaved pairs, docs/speed.md). The entries are shared by all the layers of one call:
# 2**20 float32 entries = 4 MiB in all.
KEEP_SMALL_ELEMENTS = 2**20


class KeepBudget:
    """The per-example gradient entries one engine call may still keep under KEEP_SMALL_ELEMENTS."""

    def __init__(self, entries: int) -> None:
        self.left = entries

    def take(self, entries: int) -> bool:
        """Reserves ``entries`` if they fit in what is left; returns whether they did."""
        if entries > self.left:
            return False
        self.left -= entries
        return True


def cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat(parts, dim)``, without a copy when there is one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def add_up(parts) -> torch.Tensor:
    """The parts (at least one) added up in order; unlike ``sum()``, without first adding the
    first to 0 (a full pass over a per-example gradient tensor)."""
    it = iter(parts)
    total = next(it)
    for part in it:
        total = total + part
    return total


def chunks(b: int, per_example: int, elements: int | None = None):
    """Yields slices over ``b`` examples so that each chunk holds about ``elements`` entries
    (default CHUNK_ELEMENTS)."""
    size = max(1, (elements or CHUNK_ELEMENTS) // max(1, per_example))
    for start in range(0, b, size):
        yield slice(start, min(b, start + size))


class Owner:
    """A module and the trainable parameters whose per-example gradients it is responsible for.

    Subclasses implement one gradient rule. The engine drives them in three phases per call:
    forward (hooks fill :attr:`records`), :meth:`sq_norms` once the output gradients are known,
    then :meth:`sums` with the per-example clip factors.

    Args:
        name: Qualified module name, for error messages.
        module: The module whose forward is recorded.
        params: ``(name, parameter)`` pairs this owner computes gradients for, in the order its
            :meth:`sums` returns them.
    """

    def __init__(self, name: str, module: nn.Module, params: list[tuple[str, nn.Parameter]]):
        self.name = name
        self.module = module
        self.params = params
        self.records: list[Record] = []
        self.views = 1  # K of the current call, set by the engine before the forward pass
        self.batch_rows = 0  # b·K rows of the current call, set by the engine likewise
        self.keep_budget = KeepBudget(0)  # shared by the owners of one call, set by the engine

    def install(self) -> list:
        """Registers the forward hook(s); returns the handles to remove."""

        def hook(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return None
            n = self.batch_rows
            if n > 1 and is_shared_call(args, kwargs, output):
                # A call on data shared by all examples (BERT's (1, L) position ids): give every
                # example its own copy of the output, so the backward pass yields per-example
                # output gradients; check_graph verifies that the copies are only added to
                # other tensors of the graph.
                args, kwargs = expand_rows((args, kwargs), n)
                output = output.expand(n, *output.shape[1:])
                self.records.append(make_record(args, kwargs, output, shared=True))
                return output
            self.records.append(make_record(args, kwargs, output))
            return None

        return [self.module.register_forward_hook(hook, with_kwargs=True)]

    def reset(self) -> None:
        """Drops everything stored for the last call."""
        self.records = []

    def trainable(self, tensor: torch.Tensor | None) -> bool:
        """Whether ``tensor`` is one of this owner's parameters."""
        return tensor is not None and any(tensor is p for _, p in self.params)

    def rows(self, tensor: torch.Tensor, n: int) -> torch.Tensor:
        """Checks that ``tensor`` is batch-first with ``n`` rows.

        Raises:
            ValueError: naming the module, when the leading dimension is not the batch.
        """
        if tensor.dim() == 0 or tensor.shape[0] != n:
            raise ValueError(
                f"module {self.name!r} got a tensor of shape {tuple(tensor.shape)} whose first "
                f"dimension is not the batch of {n} rows; the fast engine needs batch-first "
                "inputs and outputs in every layer: use engine='vmap'"
            )
        return tensor

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        """Per-example squared gradient norm over this owner's parameters, shape ``(b,)``."""
        raise NotImplementedError

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        """Σ_i factors[i]·g_i for each parameter in :attr:`params` (same order)."""
        raise NotImplementedError


def weighted_sum(factors: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    """Σ_i factors[i] · per_example[i] over the leading dimension."""
    # A vector-matrix product, as few torch calls as can be (each costs ~5-10 µs in a step, a
    # dozen sums a step on small models): none to cast or reshape where nothing needs it.
    f = factors if factors.dtype == per_example.dtype else factors.to(per_example.dtype)
    if per_example.dim() == 2:
        return torch.matmul(f, per_example)
    rows = per_example.reshape(per_example.shape[0], -1)
    return torch.matmul(f, rows).reshape(per_example.shape[1:])
