"""Block-wise top-k selection by magnitude (SPEC section 1, step 2).

A flattened tensor of ``numel`` entries is split into blocks of ``block_size`` entries (the last
block may be shorter; ``block_size=None`` means one block over the whole tensor). Each block of
length ``L`` keeps ``ceil(density * L)`` entries of largest ``|a|``. Indices are stored *local to
their block*, so a block of at most 32768 entries fits int16 indices; the selection of block
``b`` occupies a fixed range of columns, so the global index is recovered from the column.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

INT16_BLOCK = 32768  # local indices 0..32767 fit int16


@functools.lru_cache(maxsize=4096)
def keep_count(density: float, length: int) -> int:
    """``ceil(density * length)``, robust to float noise such as ``0.07 * 100 = 7.000000000000001``."""
    return max(1, min(length, math.ceil(round(density * length, 9))))


@dataclass(frozen=True)
class BlockLayout:
    """How one flattened tensor is split for top-k.

    Attributes:
        numel: entries of the tensor.
        block_size: length of a full block.
        n_full: number of full blocks.
        k_full: entries kept per full block.
        tail: length of the last, partial block (0 if none).
        k_tail: entries kept in the partial block.
    """

    numel: int
    block_size: int
    n_full: int
    k_full: int
    tail: int
    k_tail: int

    @property
    def k_total(self) -> int:
        """Entries kept per step over the whole tensor."""
        return self.n_full * self.k_full + self.k_tail

    @property
    def index_dtype(self) -> torch.dtype:
        """Smallest signed integer dtype that holds a local index."""
        longest = self.block_size if self.n_full else self.tail
        if longest <= INT16_BLOCK:
            return torch.int16
        if longest <= 2**31:
            return torch.int32
        return torch.int64

    def blocks(self) -> list[tuple[int, int, int, int]]:
        """(start, length, k, first_column) of every block, in order."""
        out = []
        for b in range(self.n_full):
            out.append((b * self.block_size, self.block_size, self.k_full, b * self.k_full))
        if self.tail:
            out.append(
                (self.n_full * self.block_size, self.tail, self.k_tail, self.n_full * self.k_full)
            )
        return out

    def column_offsets(self, device: torch.device | str = "cpu") -> Tensor:
        """int64 offset of the block of every stored column: global = local + offset (cached)."""
        return _column_offsets(self, torch.device(device))


@functools.lru_cache(maxsize=1024)
def _column_offsets(layout: BlockLayout, device: torch.device) -> Tensor:
    cols = torch.arange(layout.k_total, device=device)
    offsets = torch.div(cols, max(layout.k_full, 1), rounding_mode="floor") * layout.block_size
    if layout.k_tail:
        offsets[layout.n_full * layout.k_full :] = layout.n_full * layout.block_size
    return offsets


@functools.lru_cache(maxsize=4096)
def make_layout(numel: int, density: float, block_size: int | None) -> BlockLayout:
    """Layout for a tensor of ``numel`` entries; ``block_size=None`` is whole-tensor top-k."""
    if block_size is None or numel <= block_size:
        return BlockLayout(numel, numel, 0, 0, numel, keep_count(density, numel))
    n_full, tail = divmod(numel, block_size)
    k_tail = keep_count(density, tail) if tail else 0
    return BlockLayout(numel, block_size, n_full, keep_count(density, block_size), tail, k_tail)


SUB_BLOCKS = 4  # each level of the selection looks at 1 / SUB_BLOCKS of the entries


def rows_topk(x: Tensor, k: int, signed: bool = True) -> Tensor:
    """Column indices of the ``k`` largest ``|x|`` (``x`` if not ``signed``) of every row.

    Exact, and faster than one ``torch.topk`` over long rows: split each row of length ``n``
    into ``w = n / SUB_BLOCKS`` strided groups (entries ``j, j + w, j + 2w, ...``), select the
    ``k`` groups of largest maximum (recursively), then the ``k`` largest entries among the
    ``SUB_BLOCKS * k`` candidates. If an entry outside the chosen groups beat the k-th
    candidate, its group's maximum would beat all ``k`` chosen maxima, which are ``k``
    distinct candidates: a contradiction. So the result is a valid top-k, ties included.

    Args:
        x: 2-D tensor (rows, n).
        k: entries per row, ``1 <= k <= n``.
        signed: rank by magnitude (True) or by value (False, for non-negative input).

    Returns:
        int64 tensor (rows, k), in no particular order.
    """
    levels = [x]
    while group_width(levels[-1].shape[1], k):
        groups = levels[-1].view(levels[-1].shape[0], SUB_BLOCKS, -1)
        best = groups.amax(dim=1)
        if signed and len(levels) == 1:
            best = torch.maximum(best, groups.amin(dim=1).neg_())
        levels.append(best)
    return descend(levels, k, signed)


def group_width(n: int, k: int) -> int:
    """Width of the strided groups a row of ``n`` is split into, or 0 if it is not split."""
    w = n // SUB_BLOCKS
    return 0 if n % SUB_BLOCKS or w < 4 * k else w


def descend(levels: list[Tensor], k: int, signed: bool = True) -> Tensor:
    """Top-k from the group maxima of :func:`rows_topk`: ``levels[0]`` is the input, each next
    level the maxima (of ``|x|`` if ``signed``) of the previous one's strided groups."""
    top = levels[-1].abs() if signed and len(levels) == 1 else levels[-1]
    chosen = torch.topk(top, k, dim=1, sorted=False).indices
    for depth in range(len(levels) - 2, -1, -1):
        rows, n = levels[depth].shape
        w = n // SUB_BLOCKS
        groups = levels[depth].view(rows, SUB_BLOCKS, w)
        cand = groups.gather(2, chosen[:, None, :].expand(rows, SUB_BLOCKS, k))
        cand = cand.reshape(rows, SUB_BLOCKS * k)
        if signed and depth == 0:
            cand = cand.abs()
        pick = torch.topk(cand, k, dim=1, sorted=False).indices
        chosen = torch.div(pick, k, rounding_mode="floor") * w + chosen.gather(1, pick % k)
    return chosen


def blockwise_topk(a: Tensor, layout: BlockLayout) -> tuple[Tensor, Tensor]:
    """Select the ``k`` largest ``|a|`` of every block, vectorized over the full blocks.

    Args:
        a: flat tensor of ``layout.numel`` entries.
        layout: from :func:`make_layout`.

    Returns:
        ``(local_idx, global_idx)``, both int64 of ``layout.k_total`` entries, ordered by block.
    """
    parts = []
    if layout.n_full:
        full = a[: layout.n_full * layout.block_size].view(layout.n_full, layout.block_size)
        parts.append(rows_topk(full, layout.k_full).reshape(-1))
    if layout.tail:
        tail = a[layout.n_full * layout.block_size :].view(1, layout.tail)
        parts.append(rows_topk(tail, layout.k_tail).reshape(-1))
    local = parts[0] if len(parts) == 1 else torch.cat(parts)
    return local, local + layout.column_offsets(a.device)


def tail_topk(t: Tensor, valid: Tensor, max_keep: int, keep: Tensor) -> Tensor:
    """Top-k of the rows of a padded matrix of tail blocks (the packed step's T rows).

    Padding ranks below every real magnitude; ``keep`` picks, in the flat ``(rows, max_keep)``
    ranking, the ranks each row really keeps. Returns their row-local indices.
    """
    mag = torch.where(valid, t.abs(), -1.0)
    ranked = torch.topk(mag, max_keep, dim=1).indices
    return ranked.view(-1).index_select(0, keep)


def select_rows(pack: Any, a: Tensor, full_topk: Any) -> tuple[Tensor, Tensor]:
    """Top-k of every block of a packed buffer: F rows with ``full_topk(rows, k)``, T rows with
    :func:`tail_topk`. Returns ``(local, glob)``: block-local indices and buffer positions, F rows
    first, then T rows (see ``dpmicroadam.optim.packed.Pack``)."""
    locs, globs = [], []
    if pack.full_rows:
        f = a[: pack.full_rows * pack.block].view(pack.full_rows, pack.block)
        full_local = full_topk(f, pack.k_full)
        locs.append(full_local.view(-1))
        globs.append((full_local + pack.full_buf).view(-1))
    if pack.tail_rows:
        t = a[pack.full_rows * pack.block :].view(pack.tail_rows, pack.width)
        tail_local = tail_topk(t, pack.tail_valid, pack.tail_max_keep, pack.tail_keep)
        locs.append(tail_local)
        globs.append(tail_local + pack.tail_buf)
    if len(locs) == 1:
        return locs[0], globs[0]
    return torch.cat(locs), torch.cat(globs)
