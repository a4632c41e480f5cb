"""Per-example gradient norms and clipped sums for layers that are a matmul over positions.

For a layer y_t = W a_t (+ b) applied at positions t = 1..T of one example (sequence positions,
conv output pixels after unfolding, the K augmented views), the example's weight gradient is
g = Σ_t e_t a_tᵀ with e_t = ∂L/∂y_t. Its squared norm is computed either

* by the ghost norm (Goodfellow 2015; Li et al. arXiv 2110.05679):
  ‖g‖² = Σ_{s,t} (a_s·a_t)(e_s·e_t), cost T²(D+P) per example, or
* by instantiation: form g (P×D) and square it, cost T·P·D per example,

whichever is cheaper for the layer's shape (the mixed rule of Bu et al., arXiv 2210.00038).
The clipped sum Σ_i c_i g_i is then one matmul of the stored activations with the output
gradients scaled by c_i ("book-keeping", same paper), or a weighted sum of the instantiated
per-example gradients when keeping those costs no more memory than the activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .owner import KEEP_RATIO, Owner, cat, chunks, weighted_sum

Getter = Callable[[slice], tuple[torch.Tensor, torch.Tensor]]


def use_ghost(positions: int, d_in: int, d_out: int) -> bool:
    """Whether the ghost norm is cheaper than instantiation, per example and group.

    Compares the norm's own cost, T²(D+P) against T·P·D multiply-adds. Counting the clipped sum
    as well (free for kept gradients) would favour instantiation more often, but measured on CPU
    the b small per-example matmuls of instantiation run well below the speed of the one large
    matmul the book-keeping sum does, so the simpler rule is also the faster one.
    """
    return positions * (d_in + d_out) <= d_in * d_out


def matmul_sq_norms(
    get: Getter, b: int, groups: int, positions: int, d_in: int, d_out: int, keep: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example squared norms of g_i = Σ_t e_{i,t} a_{i,t}ᵀ, one matrix per group.

    Args:
        get: Returns, for a slice of examples, activations ``(n, groups, positions, d_in)`` and
            output gradients ``(n, groups, positions, d_out)``.
        b: Number of examples.
        groups: Independent blocks of the weight (conv groups; 1 for Linear).
        positions: T, positions per example.
        d_in: D, input features per group.
        d_out: P, output features per group.
        keep: Return the instantiated per-example gradients (only when instantiating).

    Returns:
        ``(sq, g)``: squared norms ``(b,)`` and, if instantiated and ``keep``, the per-example
        gradients ``(b, groups, d_out, d_in)``; otherwise ``None``.
    """
    ghost = use_ghost(positions, d_in, d_out)
    kept = None
    sq = None
    if ghost:
        per = groups * positions * (2 * positions + d_in + d_out)
    else:
        per = groups * (positions * (d_in + d_out) + d_out * d_in)
    parts = []
    for sl in chunks(b, per):
        a, e = get(sl)
        if positions == 1:
            part = (a.square().sum(-1) * e.square().sum(-1)).sum((1, 2))
        elif ghost:
            part = ((a @ a.mT) * (e @ e.mT)).sum((1, 2, 3))
        else:
            g = e.mT @ a
            part = torch.linalg.vector_norm(g.flatten(1), dim=1).square()
            if keep and sl.stop - sl.start == b:
                kept = g
            elif keep:
                if kept is None:
                    kept = g.new_empty((b, groups, d_out, d_in))
                kept[sl] = g
        parts.append(part)
    sq = torch.cat(parts) if len(parts) > 1 else parts[0]
    return sq, kept


class LinearOwner(Owner):
    """``nn.Linear`` (any leading shape ``(N, ..., D)``; positions are the middle dimensions)."""

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        n = b * k
        weight, bias = self.module.weight, self.module.bias
        acts, outs = [], []
        for r in self.records:
            a = r.args[0] if r.args else r.kwargs["input"]
            a = self.rows(a, n).detach()
            e = self.rows(r.grads[0], n)
            if k == 1 and len(self.records) == 1 and a.dim() == 2 and e.dim() == 2:
                return self._rank_one_sq_norms(a, e)  # one position per example, as it is
            acts.append(a.reshape(b, -1, a.shape[-1]))
            outs.append(e.reshape(b, -1, e.shape[-1]))
        a, e = cat(acts, 1), cat(outs, 1)
        if a.shape[1] == 1:
            return self._rank_one_sq_norms(a[:, 0], e[:, 0])
        sq = e.new_zeros(b)
        self._grad_w = self._act = None
        if self.trainable(weight):
            _, positions, d_in = a.shape
            d_out = e.shape[-1]
            keep = d_in * d_out <= KEEP_RATIO * positions * (d_in + d_out)

            def get(sl):
                return a[sl].unsqueeze(1), e[sl].unsqueeze(1)

            sq_w, self._grad_w = matmul_sq_norms(get, b, 1, positions, d_in, d_out, keep)
            sq = sq + sq_w
            if self._grad_w is None:
                self._act = (a, e)
        self._grad_b = None
        if self.trainable(bias):
            self._grad_b = e.sum(1)
            sq = sq + self._grad_b.square().sum(1)
        return sq

    def _rank_one_sq_norms(self, a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """One position per example (no sequence): g_i = e_i a_iᵀ, so ‖g_i‖² = ‖e_i‖²‖a_i‖²,
        and the bias gradient is e_i itself; the sums take the matmul path. ``a`` (b, D) and
        ``e`` (b, P)."""
        e_sq = e.square().sum(1)
        sq = None
        self._grad_w = self._act = self._grad_b = None
        if self.trainable(self.module.weight):
            self._act = (a, e)  # 2-d: sums() takes Σ_i f_i e_i a_iᵀ as one matmul
            sq = a.square().sum(1) * e_sq
        if self.trainable(self.module.bias):
            self._grad_b = e
            sq = e_sq if sq is None else sq + e_sq
        return sq if sq is not None else e.new_zeros(e.shape[0])

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for _, p in self.params:
            if p is self.module.weight:
                if self._grad_w is not None:
                    out.append(weighted_sum(factors, self._grad_w[:, 0]))
                else:
                    a, e = self._act
                    f = factors if factors.dtype == e.dtype else factors.to(e.dtype)
                    if e.dim() == 2:  # one position per example (_rank_one_sq_norms)
                        out.append(torch.mm(e.mT * f, a))
                    else:
                        ce = e * f[:, None, None]
                        out.append(ce.reshape(-1, e.shape[-1]).mT @ a.reshape(-1, a.shape[-1]))
            else:
                out.append(weighted_sum(factors, self._grad_b))
        return out

    def reset(self) -> None:
        super().reset()
        self._grad_w = self._grad_b = self._act = None
