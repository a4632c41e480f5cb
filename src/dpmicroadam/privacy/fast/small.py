"""Embedding and the affine terms of LayerNorm / GroupNorm.

* Embedding: an example's gradient is the scatter of its output gradients into the rows of the
  tokens it used, g_i[v] = Σ_{t: x_t = v} e_t. Its squared norm is Σ_v ‖Σ_{t: x_t=v} e_t‖²,
  computed for all examples at once by grouping (example, token) pairs; the clipped sum adds the
  grouped rows, scaled by their example's factor, back into the table. Cost O(T·dim) per
  example whatever the vocabulary size.
* LayerNorm / GroupNorm: g_i(weight) = Σ_t x̂_t ⊙ e_t and g_i(bias) = Σ_t e_t over positions
  (and views), with x̂ the normalized input recomputed from the stored input. These are small
  and instantiated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .owner import Owner, cat, chunks, weighted_sum

# The normalized input times the output gradient is formed this many entries at a time
# (1 MiB in float32): a whole 64-example activation (16 MiB for WRN-16-4's 64 channels at 32x32)
# as one temporary cost 19.8 ms against 3.0-3.6 ms in chunks (ad hoc, 1 thread), mostly
# page faults of fresh allocations of that size.
NORM_CHUNK_ELEMENTS = 2**18


class EmbeddingOwner(Owner):
    """``nn.Embedding`` without ``max_norm`` or ``scale_grad_by_freq``."""

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        n = b * k
        vocab, dim = self.module.weight.shape
        idx, grads = [], []
        for r in self.records:
            x = self.rows(r.args[0] if r.args else r.kwargs["input"], n)
            e = self.rows(r.grads[0], n)
            idx.append(x.reshape(b, -1))
            grads.append(e.reshape(b, -1, dim))
        x = torch.cat(idx, 1) if len(idx) > 1 else idx[0]
        e = torch.cat(grads, 1) if len(grads) > 1 else grads[0]
        if self.module.padding_idx is not None:
            e = e * (x != self.module.padding_idx).unsqueeze(-1).to(e.dtype)
        example = torch.arange(b, device=x.device).unsqueeze(1)
        keys = (example * vocab + x).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = e.new_zeros(unique.shape[0], dim).index_add_(0, inverse, e.reshape(-1, dim))
        self._rows, self._example, self._token = rows, unique // vocab, unique % vocab
        return e.new_zeros(b).index_add_(0, self._example, rows.square().sum(1))

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        scaled = self._rows * factors.to(self._rows.dtype)[self._example].unsqueeze(1)
        table = torch.zeros_like(self.module.weight).index_add_(0, self._token, scaled)
        return [table]

    def reset(self) -> None:
        super().reset()
        self._rows = self._example = self._token = None


class _AffineNormOwner(Owner):
    """Shared book-keeping: per-example weight/bias gradients, instantiated."""

    def normalized(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_example(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """Sums a (b·K, ...) tensor over everything but the example and the affine shape."""
        raise NotImplementedError

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        n = b * k
        weight, bias = self.module.weight, self.module.bias
        self._grads = {}
        for r in self.records:
            a = self.rows(r.args[0] if r.args else r.kwargs["input"], n).detach()
            e = self.rows(r.grads[0], n)
            if self.trainable(weight):
                g = self._weight_term(a, e, b, k)
                self._grads["weight"] = self._grads.get("weight", 0) + g
            if self.trainable(bias):
                g = self.per_example(e, b)
                self._grads["bias"] = self._grads.get("bias", 0) + g
        sq = self.records[0].grads[0].new_zeros(b)
        for g in self._grads.values():
            sq = sq + g.square().flatten(1).sum(1)
        return sq

    def _weight_term(self, a: torch.Tensor, e: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """Per-example Σ_t x̂_t ⊙ e_t, in chunks of whole examples."""
        parts = []
        for sl in chunks(b, k * a[0].numel(), NORM_CHUNK_ELEMENTS):
            rows = slice(sl.start * k, sl.stop * k)
            parts.append(self.per_example(self.normalized(a[rows]) * e[rows], sl.stop - sl.start))
        return cat(parts)

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for _, p in self.params:
            key = "weight" if p is self.module.weight else "bias"
            out.append(weighted_sum(factors, self._grads[key]).reshape(p.shape))
        return out

    def reset(self) -> None:
        super().reset()
        self._grads = {}


class LayerNormOwner(_AffineNormOwner):
    """``nn.LayerNorm`` with elementwise affine terms."""

    def normalized(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.layer_norm(a, m.normalized_shape, None, None, m.eps)

    def per_example(self, t: torch.Tensor, b: int) -> torch.Tensor:
        shape = self.module.normalized_shape
        return t.reshape(b, -1, *shape).sum(1)


class GroupNormOwner(_AffineNormOwner):
    """``nn.GroupNorm`` with affine terms (one gain and bias per channel)."""

    def normalized(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.group_norm(a, m.num_groups, None, None, m.eps)

    def per_example(self, t: torch.Tensor, b: int) -> torch.Tensor:
        channels = self.module.num_channels
        return t.reshape(b, -1, channels, t[0, 0].numel()).sum((1, 3))
