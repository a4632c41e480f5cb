"""One MicroAdam step over many small tensors at once (the fast path for biases and norms).

A network has dozens of tensors of a few hundred entries; stepping them one by one costs ~40
tiny torch calls each. Tensors that fit one top-k block and one quantization bucket are
concatenated and stepped together with segment-wise operations. The arithmetic is the same,
element by element, as :func:`dpmicroadam.optim.kernels.fast_step`, and every tensor keeps its
own state in the same layout, so the two paths are interchangeable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import (
    Hyper,
    compute_dtype,
    moment_terms,
    moment_weights,
    raise_overflow,
    sparse_update,
    window_moments,
)
from .topk import keep_count


@dataclass(frozen=True)
class Plan:
    """Index maps for a fixed list of tensor sizes (derived constants, cached)."""

    numels: tuple[int, ...]
    keeps: tuple[int, ...]
    nbytes: tuple[int, ...]
    width: int  # longest tensor
    seg: Tensor  # (D,) tensor number of every entry
    pad_pos: Tensor  # (D,) position in the (n, width) padded matrix
    keep_mask: Tensor  # (n, max k) True where the column rank is < k of the row
    sel_offsets: Tensor  # (K,) start of the tensor of every kept column
    low_dst: Tensor  # (H,) entry stored in the low nibble of every byte
    high_src: Tensor  # bytes that hold a high nibble
    high_dst: Tensor  # entry stored in that high nibble


@functools.lru_cache(maxsize=64)
def make_plan(
    numels: tuple[int, ...], keeps: tuple[int, ...], bits: int | None, device: torch.device
) -> Plan:
    """Index maps for tensors of ``numels`` entries keeping ``keeps`` entries each."""
    n = len(numels)
    d = torch.tensor(numels)
    starts = torch.cumsum(d, 0) - d
    seg = torch.repeat_interleave(torch.arange(n), d)
    within = torch.arange(int(d.sum())) - starts[seg]
    width = max(numels)
    k = torch.tensor(keeps)
    keep_mask = torch.arange(max(keeps))[None, :] < k[:, None]
    sel_offsets = torch.repeat_interleave(starts, k)
    half = (d + 1) // 2
    nbytes = tuple(half.tolist()) if bits == 4 else numels
    low_seg = torch.repeat_interleave(torch.arange(n), half)
    byte_starts = torch.cumsum(half, 0) - half
    low_within = torch.arange(int(half.sum())) - byte_starts[low_seg]
    high_seg = torch.repeat_interleave(torch.arange(n), d - half)
    high_within = (
        torch.arange(int((d - half).sum())) - (torch.cumsum(d - half, 0) - (d - half))[high_seg]
    )

    def dev(x: Tensor) -> Tensor:
        return x.to(device)

    return Plan(
        numels=numels,
        keeps=keeps,
        nbytes=nbytes,
        width=width,
        seg=dev(seg),
        pad_pos=dev(seg * width + within),
        keep_mask=dev(keep_mask),
        sel_offsets=dev(sel_offsets),
        low_dst=dev(starts[low_seg] + low_within),
        high_src=dev(byte_starts[high_seg] + high_within),
        high_dst=dev(starts[high_seg] + half[high_seg] + high_within),
    )


def batchable(p: Tensor, hp: Hyper) -> bool:
    """True if ``p`` fits one top-k block and one quantization bucket."""
    block = p.numel() if hp.topk_block_size is None else hp.topk_block_size
    return p.is_contiguous() and p.numel() <= min(block, hp.quant_bucket_size)


def batched_step(
    names: list[str], params: list[Tensor], grad: Tensor, states: list[dict[str, Tensor]], hp: Hyper
) -> None:
    """Step tensors of equal dtype, device and step count; ``grad`` is their flat concatenation."""
    comp, dev = compute_dtype(params[0]), params[0].device
    numels = tuple(p.numel() for p in params)
    plan = make_plan(numels, tuple(keep_count(hp.density, n) for n in numels), hp.ef_bits, dev)
    t = int(states[0]["step"]) + 1
    a, scratch = _decode(plan, states, grad, hp, comp)
    local, glob = _select(plan, a)
    values = a.index_select(0, glob)
    finite = torch.isfinite(values)
    if not finite.all():
        member = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(plan.keeps))
        raise_overflow(names[int(member[int((~finite).nonzero()[0])])])
    a.index_fill_(0, glob, 0)
    _encode(plan, a, states, hp)
    slot = (t - 1) % hp.window_size
    torch._foreach_copy_([st["indices"][slot] for st in states], list(local.split(plan.keeps)))
    torch._foreach_copy_([st["values"][slot] for st in states], list(values.split(plan.keeps)))
    torch._foreach_add_([st["step"] for st in states], 1)
    _update(plan, params, states, scratch, hp, t)


def _decode(
    plan: Plan, states: list[dict[str, Tensor]], grad: Tensor, hp: Hyper, comp: torch.dtype
) -> tuple[Tensor, Tensor]:
    """SPEC step 1, ``a = g + dequant(e)``; returns ``(a, scratch)`` (the same buffer, or the
    old exact error feedback, which the window moments may overwrite)."""
    if hp.ef_bits is None:
        scratch = torch.cat([st["ef"] for st in states])
        return scratch + grad.to(comp), scratch
    levels = float(2**hp.ef_bits - 1)
    codes = torch.cat([st["ef_codes"] for st in states])
    lo = torch.cat([st["ef_min"] for st in states])
    hi = torch.cat([st["ef_max"] for st in states])
    a = torch.empty(plan.seg.numel(), dtype=comp, device=codes.device)
    if hp.ef_bits == 8:
        a.copy_(codes)
    else:
        a.index_copy_(0, plan.low_dst, (codes & 0x0F).to(comp))
        a.index_copy_(0, plan.high_dst, (codes.index_select(0, plan.high_src) >> 4).to(comp))
    a.mul_(((hi - lo) / levels).index_select(0, plan.seg)).add_(lo.index_select(0, plan.seg))
    return a.add_(grad), a


def _select(plan: Plan, a: Tensor) -> tuple[Tensor, Tensor]:
    """SPEC step 2, top-k by ``|a|`` per tensor: rows of a padded matrix whose padding ranks
    below any magnitude. Returns the tensor-local and the flat indices of the selection."""
    n = len(plan.numels)
    mag = torch.full((n * plan.width,), -1.0, dtype=a.dtype, device=a.device)
    mag.index_copy_(0, plan.pad_pos, a.abs())
    ranked = torch.topk(mag.view(n, plan.width), plan.keep_mask.shape[1], dim=1).indices
    local = ranked[plan.keep_mask]
    return local, local + plan.sel_offsets


def _encode(plan: Plan, a: Tensor, states: list[dict[str, Tensor]], hp: Hyper) -> None:
    """SPEC step 3, ``e = quant(a)`` per tensor (``a`` holds 0 at the selection; consumed)."""
    if hp.ef_bits is None:
        torch._foreach_copy_([st["ef"] for st in states], list(a.split(plan.numels)))
        return
    n, levels = len(plan.numels), float(2**hp.ef_bits - 1)
    lo = torch.full((n,), float("inf"), dtype=a.dtype, device=a.device)
    lo.scatter_reduce_(0, plan.seg, a, "amin")
    hi = torch.full((n,), -float("inf"), dtype=a.dtype, device=a.device)
    hi.scatter_reduce_(0, plan.seg, a, "amax")
    step = (hi - lo) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    a.sub_(lo.index_select(0, plan.seg)).div_(step.index_select(0, plan.seg)).add_(0.5).floor_()
    if hp.ef_bits == 4:
        packed = a.index_select(0, plan.low_dst)
        packed.index_add_(0, plan.high_src, a.index_select(0, plan.high_dst), alpha=16)
    else:
        packed = a
    packed = packed.to(torch.int32).to(torch.uint8)
    torch._foreach_copy_([st["ef_codes"] for st in states], list(packed.split(plan.nbytes)))
    torch._foreach_copy_([st["ef_min"] for st in states], list(lo.split(1)))
    torch._foreach_copy_([st["ef_max"] for st in states], list(hi.split(1)))


def _update(
    plan: Plan,
    params: list[Tensor],
    states: list[dict[str, Tensor]],
    scratch: Tensor,
    hp: Hyper,
    t: int,
) -> None:
    """SPEC steps 4-6: window moments at the window's coordinates, then the sparse update."""
    comp, dev = scratch.dtype, scratch.device
    filled = min(t, hp.window_size)
    idx = torch.cat([st["indices"][:filled] for st in states], dim=1).long()
    idx = idx.add_(plan.sel_offsets).reshape(-1)
    v = torch.cat([st["values"][:filled] for st in states], dim=1).to(comp)
    m_terms, s_terms = moment_terms(v, *moment_weights(hp, t, filled, comp, dev))
    big_m, big_s = window_moments(scratch, idx, m_terms.reshape(-1), s_terms.reshape(-1))
    flat = torch.cat([p.reshape(-1) for p in params])
    sparse_update(flat, idx, big_m, big_s, hp, t)
    torch._foreach_copy_([p.view(-1) for p in params], list(flat.split(plan.numels)))
