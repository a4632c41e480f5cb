"""Per-module fallback: per-example gradients of one module's parameters by ``torch.func``.

For a module the fast rules do not cover, the engine records its inputs and the gradients of
the loss with respect to its outputs e during the single backward pass, then computes, for
each example i, g_i = ∂/∂θ Σ ⟨module(θ, x_i), e_i⟩ with ``vmap`` over examples of ``grad``
of a ``functional_call``. This is exact because, for a fixed e, that inner product has the same
gradient in θ as the loss itself. Only this module's parameters are instantiated per example.

Tensor inputs whose first dimension is the batch of rows are split per example (the K views of
an example stay together); other inputs are passed unchanged. A module that uses randomness
(dropout) in training mode is recomputed with fresh randomness, so its gradient does not match
the forward pass: put such modules in eval mode or use the vmap engine.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from .owner import Owner, weighted_sum


class FallbackOwner(Owner):
    """Any module owning trainable parameters; covers its whole sub-tree's parameters."""

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        n = b * k
        names = [name for name, _ in self.params]
        values = {name: p.detach() for name, p in self.params}
        total = None
        for r in self.records:
            grads = self._per_example(r, values, names, b, k, n)
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
        self._grads = total
        sq = total[0].new_zeros(b)
        for g in total:
            sq = sq + g.square().flatten(1).sum(1)
        return sq

    def _per_example(self, record, values, names, b, k, n) -> list[torch.Tensor]:
        module = self.module
        index = record.leaf_index

        def split(t):
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n:
                return t.detach().reshape(b, k, *t.shape[1:])
            return t

        def dim_of(t):
            return 0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None

        inputs = (record.args, record.kwargs)
        if not any(dim_of(t) == 0 for t in tree_flatten(inputs)[0]):
            # Each example's rows of the output must come from that example's rows of an
            # input; otherwise (a call on one example's unbatched tensors, say) row i of the
            # output is not example i, and splitting it as if it were would give wrong norms
            # silently (when the output's first size happens to equal the batch).
            raise ValueError(
                f"module {self.name!r} was called without a tensor input whose first dimension "
                f"is the batch of {n} rows (per-example or unbatched calls); the fast engine "
                "needs batch-first inputs and outputs in every layer: use engine='vmap'"
            )
        batched = tree_map(split, inputs)
        in_dims = tree_map(dim_of, inputs)
        out_grads = [self.rows(g, n).reshape(b, k, *g.shape[1:]) for g in record.grads]

        def inner(params, example, e):
            args, kwargs = example
            leaves, _ = tree_flatten(functional_call(module, params, args, kwargs))
            return sum((leaves[i] * g).sum() for i, g in zip(index, e))

        per = vmap(grad(inner), in_dims=(None, in_dims, 0), randomness="different")
        out = per(values, batched, out_grads)
        return [out[name] for name in names]

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        return [weighted_sum(factors, g) for g in self._grads]

    def reset(self) -> None:
        super().reset()
        self._grads = None
