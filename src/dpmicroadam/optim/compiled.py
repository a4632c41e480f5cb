"""``implementation="compiled"``: three stages of the packed step built by ``torch.compile``.

* :func:`front` (SPEC steps 1-3): every member's part is decoded straight into the work buffer,
  the group maxima of the top-k are taken in the same pass, the selected entries are zeroed in
  place and the quantization reads the buffer once;
* :func:`window`: the window's entries, their moment terms and the parameters' values there;
* :func:`update` (steps 5-6): the sparse update, written into the parameters.

The selection itself stays ``torch.topk`` (an ATen call inside the graph), and the window
moments stay eager ``scatter_add_`` calls between :func:`window` and :func:`update`: their
summation order must not depend on threads (resumed runs are bit-identical).

The stages compute what the eager ones in :mod:`dpmicroadam.optim.packed` compute, element by
element, except that Inductor's float32 square root is correctly rounded where torch's CPU
kernel is sometimes one unit in the last place off; so the error feedback and the window are
bit-identical and the parameters agree to rounding. Compiling happens at the first step of every
pack (seconds; Inductor keeps its results on disk, so later processes are faster). If it fails
(no C++ compiler, an Inductor error), one warning is issued, the failure is remembered, and
every step from then on runs the eager stages. :func:`front` and :func:`window` are pure and
:func:`update` writes only after compiling succeeded, so nothing is done twice.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._fallback import give_up
from .topk import SUB_BLOCKS, descend, group_width, select_rows

if TYPE_CHECKING:
    from .packed import Pack

_FAILURE: list[str] = []  # why compiling was given up, once it was
_SECONDS: dict[str, float] = {}  # seconds spent in the first call of every compiled stage
_CALLED: set[tuple[str, int]] = set()


def compile_failure() -> str | None:
    """Why compiling was given up in this process, or None while it works."""
    return _FAILURE[0] if _FAILURE else None


def compile_seconds() -> float:
    """Seconds spent in first calls of compiled stages so far (mostly compiling)."""
    return sum(_SECONDS.values())


def run(name: str, fn: Callable, key: Any, *args: Any, mutates: bool = False) -> Any:
    """``fn(*args)`` compiled, or None if compiling fails or failed before (the caller then
    runs the eager stage). ``key`` names the pack, to time its first call.

    A stage that ``mutates`` its arguments falls back only when its first call fails (when it
    compiles, before it runs): a later failure could come after some writes, so it is raised.
    """
    if _FAILURE:
        return None
    first = (name, id(key)) not in _CALLED
    start = time.perf_counter()
    try:
        out = _compiled(fn)(*args)
    except Exception as err:
        if mutates and not first:
            raise
        give_up(
            _FAILURE, err,
            "MicroAdam(implementation='compiled'): torch.compile failed ({reason}); running "
            "the eager implementation from now on.",
            stacklevel=3,
        )  # fmt: skip
        return None
    if first:
        _CALLED.add((name, id(key)))
        _SECONDS[f"{name}:{id(key)}"] = time.perf_counter() - start
    return out


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True, dynamic=False)


def front(pack: Pack, states: list[dict[str, Tensor]], grads: list[Tensor], comp) -> tuple:
    """Compilable :func:`dpmicroadam.optim.packed.front`, with the same outputs."""
    dev = grads[0].device
    pieces = []
    for p in pack.full_parts:
        pieces.append(_decoded(pack, states[p.member], grads[p.member], p.start, p.length, comp))
    for p in pack.tail_parts:
        pieces.append(_decoded(pack, states[p.member], grads[p.member], p.start, p.length, comp))
        if p.length < pack.width:
            pieces.append(torch.zeros(pack.width - p.length, dtype=comp, device=dev))
    a = torch.cat(pieces)
    local, glob = _select(pack, a)
    values = a[glob]
    finite = torch.isfinite(values).all()
    a = a.index_put((glob,), torch.zeros((), dtype=comp, device=dev))
    ef = (a,) if pack.bits is None else _quantized(pack, a)
    return a, local, values, finite, ef


def _decoded(pack: Pack, state: dict, grad: Tensor, start: int, length: int, comp) -> Tensor:
    """``g + dequant(e)`` of entries ``[start, start + length)`` of one member (whole buckets)."""
    g = grad.reshape(-1)[start : start + length].to(comp)
    if pack.bits is None:
        return state["ef"][start : start + length] + g
    q = pack.bucket
    b0, nb = start // q, length // q
    lo = state["ef_min"][b0 : b0 + nb].view(nb, 1, 1)
    hi = state["ef_max"][b0 : b0 + nb].view(nb, 1, 1)
    step = (hi - lo) / float(2**pack.bits - 1)
    if pack.bits == 8:
        codes = state["ef_codes"][start : start + length].view(nb, 1, q).to(comp)
        return (codes * step + lo + g.view(nb, 1, q)).view(-1)
    h = q // 2
    packed = state["ef_codes"][b0 * h : (b0 + nb) * h].view(nb, 1, h)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=packed.device).view(1, 2, 1)
    codes = ((packed >> shifts) & 15).to(comp)
    return (codes * step + lo + g.view(nb, 2, h)).view(-1)


def _select(pack: Pack, a: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`dpmicroadam.optim.packed.select`, with the group maxima as one fused pass."""
    return select_rows(pack, a, _fused_rows_topk)


def _fused_rows_topk(f: Tensor, k: int) -> Tensor:
    """:func:`dpmicroadam.optim.topk.rows_topk` with the levels of group maxima written out."""
    rows = f.shape[0]
    levels = [f]
    while w := group_width(levels[-1].shape[1], k):
        groups = levels[-1].view(rows, SUB_BLOCKS, w)
        parts = [groups[:, j] for j in range(SUB_BLOCKS)]
        if len(levels) == 1:
            parts = [x.abs() for x in parts]
        best = parts[0]
        for x in parts[1:]:
            best = torch.maximum(best, x)
        levels.append(best)
    return descend(levels, k)


def _quantized(pack: Pack, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`dpmicroadam.optim.quantize.quantize_` of the buffer (whole, even buckets)."""
    q = pack.bucket
    xb = x.view(-1, q)
    lo, hi = xb.amin(dim=1), xb.amax(dim=1)
    step = (hi - lo) / float(2**pack.bits - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.floor((xb - lo[:, None]) / step[:, None] + 0.5)
    if pack.bits == 4:
        codes = codes[:, : q // 2] + codes[:, q // 2 :] * 16
    return codes.to(torch.int32).to(torch.uint8).view(-1), lo, hi


def window(
    pack: Pack, states: list[dict[str, Tensor]], params: list[Tensor], w1: Tensor, w2: Tensor, comp
) -> tuple:
    """Compilable :func:`dpmicroadam.optim.packed.window` over all ``m`` slots, plus the
    parameters' values at the window's entries (full rows, then tail entries).

    ``w1`` and ``w2`` are ``(m, 1)`` with 0 for the slots not filled yet: their entries (index
    0, value 0) add 0 to M and S and leave the parameter as it is, so no shape depends on the
    step count.
    """
    m = states[0]["indices"].shape[0]
    full_idx = tail_idx = full_terms = tail_terms = None
    flats = [p.view(-1) for p in params]
    thetas = []
    if pack.full_parts:
        idx = [states[p.member]["indices"][:, p.col : p.col + p.keep] for p in pack.full_parts]
        val = [states[p.member]["values"][:, p.col : p.col + p.keep] for p in pack.full_parts]
        idx = torch.cat([x.view(m, -1, pack.k_full).transpose(0, 1) for x in idx])
        v = torch.cat([x.view(m, -1, pack.k_full).transpose(0, 1) for x in val]).to(comp)
        full_idx = idx.long().view(pack.full_rows, -1)
        full_terms = ((v * w1).view(pack.full_rows, -1), (v * v * w2).view(pack.full_rows, -1))
        coords = full_idx + pack.full_param
        for p in pack.full_parts:
            r = slice(p.buf // pack.block, (p.buf + p.length) // pack.block)
            thetas.append(flats[p.member][coords[r]].reshape(-1))
    if pack.tail_parts:
        idx = [states[p.member]["indices"][:, p.col : p.col + p.keep] for p in pack.tail_parts]
        val = [states[p.member]["values"][:, p.col : p.col + p.keep] for p in pack.tail_parts]
        local = torch.cat(idx, 1).long()
        tail_idx = (local + pack.tail_buf).view(-1)
        v = torch.cat(val, 1).to(comp)
        tail_terms = ((v * w1).view(-1), (v * v * w2).view(-1))
        coords = local + pack.tail_param
        first = pack.tail_parts[0].sel
        for p in pack.tail_parts:
            c = slice(p.sel - first, p.sel - first + p.keep)
            thetas.append(flats[p.member][coords[:, c]].reshape(-1))
    return full_idx, tail_idx, full_terms, tail_terms, torch.cat(thetas)


def update(
    pack: Pack,
    params: list[Tensor],
    win: tuple,
    sums: tuple[Tensor, Tensor],
    scalars: Tensor,
    decay: bool,
) -> bool:
    """SPEC steps 5-6, in place in ``params``: :func:`dpmicroadam.optim.packed.update` with M
    and S read from ``sums`` (dense, holding them at the window's entries) and the parameters'
    values from ``win`` (read by :func:`window`: reading and writing them in one fused loop
    would see the writes of earlier duplicates).

    ``scalars`` holds ``(c2, eps, -lr * c1, 1 - lr * weight_decay)`` in the compute dtype;
    ``decay`` says whether the last applies (a Python bool: at most two graphs). Returns True.
    """
    full_idx, tail_idx, thetas = win[0], win[1], win[4]
    flats = [p.view(-1) for p in params]
    if decay:
        for f in flats:
            f.mul_(scalars[3])
    start = 0
    if full_idx is not None:
        rows = (pack.full_rows, pack.block)
        big_m = sums[0][: pack.full_rows * pack.block].view(rows).gather(1, full_idx)
        big_s = sums[1][: pack.full_rows * pack.block].view(rows).gather(1, full_idx)
        coords = full_idx + pack.full_param
        for p in pack.full_parts:
            r = slice(p.buf // pack.block, (p.buf + p.length) // pack.block)
            theta = thetas[start : start + coords[r].numel()].view(coords[r].shape)
            start += coords[r].numel()
            _apply(flats[p.member], coords[r], theta, big_m[r], big_s[r], scalars, decay)
    if tail_idx is not None:
        m = tail_idx.numel() // pack.tail_buf.numel()
        big_m = sums[0][tail_idx].view(m, -1)
        big_s = sums[1][tail_idx].view(m, -1)
        coords = tail_idx.view(m, -1) - pack.tail_buf + pack.tail_param
        first = pack.tail_parts[0].sel
        for p in pack.tail_parts:
            c = slice(p.sel - first, p.sel - first + p.keep)
            theta = thetas[start : start + m * p.keep].view(m, p.keep)
            start += m * p.keep
            _apply(flats[p.member], coords[:, c], theta, big_m[:, c], big_s[:, c], scalars, decay)
    return True


def _apply(
    flat: Tensor, idx: Tensor, theta: Tensor, big_m: Tensor, big_s: Tensor, scalars, decay: bool
) -> None:
    """``theta[idx] += step * M / (sqrt(c2 S) + eps)``, rounded as ``kernels.apply_update``."""
    if decay:
        theta = theta * scalars[3]
    denom = (big_s * scalars[0]).sqrt() + scalars[1]
    flat[idx] = (theta.to(denom.dtype) + scalars[2] * big_m / denom).to(flat.dtype)
