"""One MicroAdam step over many large tensors at once (the fast path for weight tensors).

Stepping a network's large tensors one by one costs dozens of torch calls each, and the calls
on short tails of blocks are mostly overhead. Here every member's dequantized ``a = g + e`` is
written into one work buffer laid out as two matrices:

* ``F`` (``full_rows`` x ``block``): every full top-k block of every member, one per row;
* ``T`` (``tail_rows`` x ``width``): every member's last, partial block (or its only block when
  the tensor is shorter than a block), one per row, padded with zeros up to ``width``.

Members are whole numbers of quantization buckets long and buckets divide blocks, so the buffer
is a sequence of whole buckets (pads are whole buckets too, decoded to 0 and never stored) and
blocks are rows: top-k, quantization and the window moments run once over the buffer. The
arithmetic is that of :func:`dpmicroadam.optim.kernels.fast_step`, element by element, and every
member keeps its own state in the same layout, so the paths are interchangeable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from . import compiled
from .kernels import (
    Hyper,
    apply_update,
    bias_corrections,
    compute_dtype,
    denominator_,
    moment_weights,
    raise_overflow,
    step_size,
)
from .quantize import dequantize, quantize_
from .topk import keep_count, rows_topk, select_rows

MIN_PACK = 2  # fewer large tensors than this take the per-tensor path
MAX_TAIL_PADDING = 8  # a tail is padded to at most this many times its length


@dataclass(frozen=True)
class Part:
    """A contiguous piece of one member: its full blocks, or its tail block."""

    member: int
    start: int  # first entry in the member
    length: int  # entries
    buf: int  # first entry in the work buffer
    col: int  # first window column (block-local index) in the member's state
    keep: int  # entries kept per step
    sel: int  # first entry in the selection (:func:`select` order)


@dataclass(frozen=True, eq=False)
class Pack:
    """Where every member lives in the work buffer (derived constants, cached)."""

    numels: tuple[int, ...]
    block: int
    bucket: int
    bits: int | None
    k_full: int
    full_rows: int
    width: int
    full_parts: tuple[Part, ...]  # in F row order
    tail_parts: tuple[Part, ...]  # in T row order
    tail_valid: Tensor | None  # (tail_rows, width) True on real entries
    tail_keep: Tensor | None  # positions of the kept ranks in the flat (tail_rows, max k)
    tail_buf: Tensor | None  # (sum of tail keeps,) buffer offset of every kept tail entry
    tail_param: Tensor | None  # (sum of tail keeps,) member offset of every kept tail entry
    full_param: Tensor | None  # (full_rows, 1) member offset of every F row
    full_buf: Tensor | None  # (full_rows, 1) buffer offset of every F row
    tail_max_keep: int  # the largest keep of a T row

    @property
    def tail_rows(self) -> int:
        return len(self.tail_parts)

    @property
    def size(self) -> int:
        return self.full_rows * self.block + self.tail_rows * self.width

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.full_parts + self.tail_parts


def packable(p: Tensor, hp: Hyper) -> bool:
    """True if ``p`` may join a pack: blocked top-k and, when quantized, whole buckets."""
    block = hp.topk_block_size
    if block is None or not p.is_contiguous():
        return False
    if hp.ef_bits is None:
        return True
    q = hp.quant_bucket_size
    return block % q == 0 and p.numel() % q == 0 and (hp.ef_bits == 8 or q % 2 == 0)


def pack_members(numels: list[int], block: int) -> list[bool]:
    """Which :func:`packable` tensors to pack: not those whose tail block is so short that
    padding it to the longest tail would cost more than stepping it alone."""
    tails = [n % block for n in numels]
    width = max(tails)
    return [t == 0 or t * MAX_TAIL_PADDING >= width for t in tails]


def _parts(numels: tuple[int, ...], block: int, density: float) -> tuple[list[Part], list[Part]]:
    k_full = keep_count(density, block)
    full, tail = [], []
    rows = sum(n // block for n in numels)
    width = max(n % block for n in numels)
    for i, n in enumerate(numels):
        n_full, rest = divmod(n, block)
        if n_full:
            row = sum(p.length for p in full) // block
            full.append(Part(i, 0, n_full * block, row * block, 0, n_full * k_full, row * k_full))
        if rest:
            row, sel = len(tail), rows * k_full + sum(p.keep for p in tail)
            buf = rows * block + row * width
            tail.append(
                Part(i, n_full * block, rest, buf, n_full * k_full, keep_count(density, rest), sel)
            )
    return full, tail


@functools.lru_cache(maxsize=64)
def make_pack(
    numels: tuple[int, ...],
    block: int,
    bucket: int,
    bits: int | None,
    density: float,
    device: torch.device,
) -> Pack:
    """The layout of a pack of tensors of ``numels`` entries."""
    full, tail = _parts(numels, block, density)
    full_rows, width = sum(p.length for p in full) // block, max(n % block for n in numels)

    def dev(x: Tensor) -> Tensor:
        return x.to(device)

    tail_valid = tail_keep = tail_buf = tail_param = full_param = full_buf = None
    if tail:
        lengths, ks = torch.tensor([p.length for p in tail]), torch.tensor([p.keep for p in tail])
        tail_valid = dev(torch.arange(width)[None, :] < lengths[:, None])
        tail_keep = torch.arange(int(ks.max()))[None, :] < ks[:, None]
        tail_keep = dev(tail_keep.view(-1).nonzero()[:, 0])
        row = torch.repeat_interleave(torch.arange(len(tail)), ks)
        tail_buf = dev(full_rows * block + row * width)
        tail_param = dev(torch.tensor([p.start for p in tail])[row])
    if full:
        first = torch.tensor([p.buf // block for p in full])
        count = torch.tensor([p.length // block for p in full])
        full_param = dev(
            (torch.arange(full_rows) - first.repeat_interleave(count))[:, None] * block
        )
        full_buf = dev(torch.arange(full_rows)[:, None] * block)
    return Pack(
        numels=numels,
        block=block,
        bucket=bucket,
        bits=bits,
        k_full=keep_count(density, block),
        full_rows=full_rows,
        width=width,
        full_parts=tuple(full),
        tail_parts=tuple(tail),
        tail_valid=tail_valid,
        tail_keep=tail_keep,
        tail_buf=tail_buf,
        tail_param=tail_param,
        full_param=full_param,
        full_buf=full_buf,
        tail_max_keep=max((p.keep for p in tail), default=0),
    )


def _in_buffer_order(pack: Pack, xs: list[Tensor], unit: int, pad: Tensor) -> list[Tensor]:
    """Pieces whose concatenation lays out ``xs`` (one flat tensor per member, ``unit`` tensor
    entries per entry) like the work buffer, tail rows padded with ``pad``."""
    pieces = []
    for p in pack.full_parts:
        pieces.append(xs[p.member][p.start // unit : (p.start + p.length) // unit])
    for p in pack.tail_parts:
        pieces.append(xs[p.member][p.start // unit :])
        if p.length < pack.width:
            pieces.append(pad[: (pack.width - p.length) // unit])
    return pieces


def decode(pack: Pack, states: list[dict[str, Tensor]], grads: list[Tensor], comp) -> Tensor:
    """The work buffer ``a = g + dequant(e)`` of every member (SPEC step 1); pads hold 0."""
    dev = grads[0].device
    if pack.bits is None:
        pad = torch.zeros(pack.width, dtype=comp, device=dev)
        a = torch.cat(_in_buffer_order(pack, [st["ef"] for st in states], 1, pad))
    else:
        per_byte = 2 if pack.bits == 4 else 1
        pad_codes = torch.zeros(pack.width // per_byte, dtype=torch.uint8, device=dev)
        pad_range = torch.zeros(pack.width // pack.bucket, dtype=comp, device=dev)
        codes = [st["ef_codes"] for st in states]
        codes = torch.cat(_in_buffer_order(pack, codes, per_byte, pad_codes))
        lo = [st["ef_min"] for st in states]
        lo = torch.cat(_in_buffer_order(pack, lo, pack.bucket, pad_range))
        hi = [st["ef_max"] for st in states]
        hi = torch.cat(_in_buffer_order(pack, hi, pack.bucket, pad_range))
        a = dequantize(codes, lo, hi, pack.bits, pack.bucket, pack.size)
    views = [a[p.buf : p.buf + p.length] for p in pack.parts]
    flat = [g.view(-1) for g in grads]
    torch._foreach_add_(views, [flat[p.member][p.start : p.start + p.length] for p in pack.parts])
    return a


def select(pack: Pack, a: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k by ``|a|`` of every block (SPEC step 2).

    Returns ``(local, glob)``: the block-local index and the buffer position of every kept
    entry, F rows first, then T rows, row by row (the order of ``Part.sel``).
    """
    return select_rows(pack, a, rows_topk)


def front(pack: Pack, states: list[dict[str, Tensor]], grads: list[Tensor], comp) -> tuple:
    """SPEC steps 1-3 without touching the state.

    Returns ``(a, local, values, finite, ef)``: the work buffer (now scratch), the selection
    (block-local indices and values, in ``Part.sel`` order), whether every selected value is
    finite (0-d bool), and the new error feedback in buffer order: ``(codes, lo, hi)`` or
    ``(ef,)``.
    """
    a = decode(pack, states, grads, comp)
    local, glob = select(pack, a)
    values = a.index_select(0, glob)
    finite = torch.isfinite(values).all()
    a.index_fill_(0, glob, 0)
    if pack.bits is None:
        return a, local, values, finite, (a,)
    return a, local, values, finite, quantize_(a, pack.bits, pack.bucket)


def commit(
    pack: Pack, states: list[dict[str, Tensor]], t: int, local: Tensor, values: Tensor, ef: tuple
) -> None:
    """Store the new error feedback and the selection in slot ``(t - 1) mod m``; count the step."""
    units = {"ef": 1, "ef_codes": 2 if pack.bits == 4 else 1, "ef_min": pack.bucket}
    units["ef_max"] = pack.bucket
    keys = ("ef",) if pack.bits is None else ("ef_codes", "ef_min", "ef_max")
    for key, src in zip(keys, ef):
        u = units[key]
        dst = [states[p.member][key][p.start // u : (p.start + p.length) // u] for p in pack.parts]
        torch._foreach_copy_(dst, [src[p.buf // u : (p.buf + p.length) // u] for p in pack.parts])
    slot = (t - 1) % states[0]["indices"].shape[0]
    for key, src in (("indices", local), ("values", values)):
        dst = [states[p.member][key][slot, p.col : p.col + p.keep] for p in pack.parts]
        torch._foreach_copy_(dst, [src[p.sel : p.sel + p.keep] for p in pack.parts])
    torch._foreach_add_([st["step"] for st in states], 1)


def window(pack: Pack, states: list[dict[str, Tensor]], hp: Hyper, t: int, comp) -> tuple:
    """The filled window slots: ``(full_idx, tail_idx, full_terms, tail_terms)``.

    ``full_idx`` is ``(full_rows, filled * k_full)``: the block-local columns of every F row,
    slot-major; ``tail_idx`` the buffer positions of the T entries, ``(filled, tail keeps)``
    flattened. The terms are ``(beta1**age * v, beta2**age * v**2)``, shaped like the indices.
    """
    filled = min(t, hp.window_size)
    w1, w2 = moment_weights(hp, t, filled, comp, states[0]["values"].device)
    full_idx = tail_idx = full_terms = tail_terms = None
    if pack.full_parts:
        v = _gather_full(pack, states, filled, "values").to(comp)
        full_terms = tuple((x * w).view(pack.full_rows, -1) for x, w in ((v, w1), (v * v, w2)))
        full_idx = _gather_full(pack, states, filled, "indices").long().view(pack.full_rows, -1)
    if pack.tail_parts:
        v = _gather_tail(pack, states, filled, "values").to(comp)
        tail_terms = tuple((x * w).view(-1) for x, w in ((v, w1), (v * v, w2)))
        tail_idx = (_gather_tail(pack, states, filled, "indices").long() + pack.tail_buf).view(-1)
    return full_idx, tail_idx, full_terms, tail_terms


def _gather_full(pack: Pack, states, filled: int, key: str) -> Tensor:
    """``key`` of the F rows' filled slots, ``(full_rows, filled, k_full)``."""
    pieces = [
        states[p.member][key][:filled, p.col : p.col + p.keep]
        .view(filled, -1, pack.k_full)
        .transpose(0, 1)
        for p in pack.full_parts
    ]
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces)


def _gather_tail(pack: Pack, states, filled: int, key: str) -> Tensor:
    """``key`` of the T entries' filled slots, ``(filled, sum of tail keeps)``."""
    pieces = [states[p.member][key][:filled, p.col : p.col + p.keep] for p in pack.tail_parts]
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, 1)


def moments(pack: Pack, a: Tensor, win: tuple) -> tuple[list[Tensor], list[Tensor]]:
    """M and S (SPEC step 4) at every window entry, accumulated in ``a`` (consumed).

    Returns ``([M, S] of the F entries, [M, S] of the T entries)``, shaped like their indices.
    Each coordinate sums its slots in slot order, as the ground-truth loop does.
    """
    full_idx, tail_idx, full_terms, tail_terms = win[:4]
    f = a[: pack.full_rows * pack.block].view(pack.full_rows, pack.block)
    full, tail = [], []
    for j in range(2):
        a.zero_()
        if full_idx is not None:
            f.scatter_add_(1, full_idx, full_terms[j])
        if tail_idx is not None:
            a.scatter_add_(0, tail_idx, tail_terms[j])
        if full_idx is not None:
            full.append(f.gather(1, full_idx))
        if tail_idx is not None:
            tail.append(a.index_select(0, tail_idx))
    return full, tail


def window_weights(hp: Hyper, t: int, comp, dev) -> tuple[Tensor, Tensor]:
    """``(beta1**age, beta2**age)`` of all ``m`` slots as ``(m, 1)`` columns, 0 where a slot is
    not filled yet (cached)."""
    m = hp.window_size
    return _padded_weights(hp.beta1, hp.beta2, m, (t - 1) % m, min(t, m), comp, torch.device(dev))


@functools.lru_cache(maxsize=256)
def _padded_weights(beta1, beta2, m, newest, filled, comp, dev) -> tuple[Tensor, Tensor]:
    hp_like = Hyper(0.0, beta1, beta2, 1.0, 0.0, m, 1.0, None, 1, None, torch.float32)
    out = []
    for w in moment_weights(hp_like, newest + 1, filled, comp, dev):
        full = torch.zeros(m, 1, dtype=comp, device=dev)
        full[:filled] = w
        out.append(full)
    return out[0], out[1]


def accumulate(pack: Pack, a: Tensor, win: tuple) -> tuple[Tensor, Tensor]:
    """M and S (SPEC step 4) at the window's entries, in ``a`` (consumed) and a new buffer.

    Like :func:`moments`, each coordinate sums its slots in slot order.
    """
    full_idx, tail_idx, full_terms, tail_terms = win[:4]
    sums = (a, torch.empty_like(a))
    for j, buf in enumerate(sums):
        buf.zero_()
        if full_idx is not None:
            rows = buf[: pack.full_rows * pack.block].view(pack.full_rows, pack.block)
            rows.scatter_add_(1, full_idx, full_terms[j])
        if tail_idx is not None:
            buf.scatter_add_(0, tail_idx, tail_terms[j])
    return sums


def gather_moments(pack: Pack, sums: tuple[Tensor, Tensor], win: tuple) -> tuple:
    """The ``moments`` output read from :func:`accumulate`'s buffers."""
    full_idx, tail_idx = win[0], win[1]
    full, tail = [], []
    for buf in sums:
        if full_idx is not None:
            rows = buf[: pack.full_rows * pack.block].view(pack.full_rows, pack.block)
            full.append(rows.gather(1, full_idx))
        if tail_idx is not None:
            tail.append(buf.index_select(0, tail_idx))
    return full, tail


@functools.lru_cache(maxsize=256)
def tail_order(pack: Pack, filled: int) -> Tensor:
    """Permutation of the flat ``(filled, tail keeps)`` T entries into part-major order."""
    cols = torch.arange(filled * pack.tail_buf.numel()).view(filled, -1)
    first = pack.tail_parts[0].sel
    parts = [cols[:, p.sel - first : p.sel - first + p.keep].reshape(-1) for p in pack.tail_parts]
    return torch.cat(parts).to(pack.tail_buf.device)


def update(pack: Pack, params: list[Tensor], win: tuple, ms: tuple, hp: Hyper, t: int) -> None:
    """SPEC steps 5-6 at the window's coordinates of every member."""
    full_idx, tail_idx = win[0], win[1]
    step = step_size(hp, t)
    flats = [p.view(-1) for p in params]
    if hp.weight_decay != 0:
        torch._foreach_mul_(flats, 1 - hp.lr * hp.weight_decay)
    if full_idx is not None:
        big_m, denom = ms[0][0], denominator_(ms[0][1], hp, t)
        coords = full_idx + pack.full_param
        for p in pack.full_parts:
            rows = slice(p.buf // pack.block, (p.buf + p.length) // pack.block)
            m, d = big_m[rows].view(-1), denom[rows].view(-1)
            apply_update(flats[p.member], coords[rows].view(-1), m, d, step)
    if tail_idx is not None:
        filled = tail_idx.numel() // pack.tail_buf.numel()
        order = tail_order(pack, filled)
        coords = (tail_idx.view(filled, -1) - pack.tail_buf + pack.tail_param).view(-1)
        coords, big_m = coords.index_select(0, order), ms[1][0].index_select(0, order)
        denom = denominator_(ms[1][1].index_select(0, order), hp, t)
        start = 0
        for p in pack.tail_parts:
            span = slice(start, start + filled * p.keep)
            apply_update(flats[p.member], coords[span], big_m[span], denom[span], step)
            start = span.stop


def _overflow_member(pack: Pack, finite: Tensor) -> int:
    first = int((~finite).nonzero()[0])
    return next(p.member for p in pack.parts if p.sel <= first < p.sel + p.keep)


def packed_step(
    names: list, params: list[Tensor], states: list[dict[str, Tensor]], hp: Hyper, jit: bool
) -> None:
    """Step tensors of equal dtype, device and step count that are all :func:`packable`.

    ``jit``: run the stages of :mod:`dpmicroadam.optim.compiled` (eager ones if compiling
    fails).
    """
    dev, comp = params[0].device, compute_dtype(params[0])
    numels = tuple(p.numel() for p in params)
    pack = make_pack(numels, hp.topk_block_size, hp.quant_bucket_size, hp.ef_bits, hp.density, dev)
    t = int(states[0]["step"]) + 1
    grads = [p.grad for p in params]
    out = compiled.run("front", compiled.front, pack, pack, states, grads, comp) if jit else None
    a, local, values, finite, ef = out or front(pack, states, grads, comp)
    if not finite:
        raise_overflow(names[_overflow_member(pack, torch.isfinite(values))])
    commit(pack, states, t, local, values, ef)
    if not jit:
        win = window(pack, states, hp, t, comp)
        update(pack, params, win, moments(pack, a, win), hp, t)
        return
    w1, w2 = window_weights(hp, t, comp, dev)
    win = compiled.run("window", compiled.window, pack, pack, states, params, w1, w2, comp)
    if win is None:
        win = window(pack, states, hp, t, comp)
        update(pack, params, win, moments(pack, a, win), hp, t)
        return
    sums = accumulate(pack, a, win)
    c1, c2 = bias_corrections(hp, t)
    decay = 1 - hp.lr * hp.weight_decay
    scalars = torch.tensor([c2, hp.eps, -hp.lr * c1, decay], dtype=comp, device=dev)
    args = (pack, params, win, sums, scalars, hp.weight_decay != 0)
    if not compiled.run("update", compiled.update, pack, *args, mutates=True):
        update(pack, params, win, gather_moments(pack, sums, win), hp, t)
