"""One MicroAdam step on one tensor: the ground-truth loop and the fast vectorized path.

Both functions implement SPEC section 1 on the same state layout, so a run may switch between
them. ``loop_step`` is written to be read next to the SPEC (one block, one bucket, one window
slot at a time); ``fast_step`` vectorizes blocks and buckets, accumulates the window moments with
one scatter-add each and updates only the coordinates present in the window. Tests hold the
fast path to the loop and both to :mod:`dpmicroadam.optim.reference`.

State of one parameter (tensors only):
    ``step``     int64 0-d tensor on the CPU, the number of steps taken.
    ``indices``  (window_size, k_total) block-local indices (int16 for blocks <= 32768 entries).
    ``values``   (window_size, k_total) signed selected values in ``value_dtype``.
    ``ef``       exact error feedback (``ef_bits=None``), float32 (float64 for float64 params);
    or ``ef_codes`` (packed uint8 codes), ``ef_min``, ``ef_max`` (per bucket) when quantized.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .quantize import (
    bucket_bytes,
    dequantize,
    num_buckets,
    pack_bucket,
    packed_numel,
    quantize_,
    unpack_bucket,
)
from .topk import INT16_BLOCK, BlockLayout, blockwise_topk, make_layout

AUTO_BLOCK_SIZE = INT16_BLOCK


@dataclass(frozen=True)
class Hyper:
    """The hyper-parameters of one param group, read once per step."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    window_size: int
    density: float
    ef_bits: int | None
    quant_bucket_size: int
    topk_block_size: int | None
    value_dtype: torch.dtype
    ef_rounding: str = "nearest"

    @classmethod
    def from_group(cls, group: dict) -> Hyper:
        block = group["topk_block_size"]
        return cls(
            lr=float(group["lr"]),
            beta1=float(group["betas"][0]),
            beta2=float(group["betas"][1]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            window_size=int(group["window_size"]),
            density=float(group["density"]),
            ef_bits=group["ef_bits"],
            quant_bucket_size=int(group["quant_bucket_size"]),
            topk_block_size=AUTO_BLOCK_SIZE if block == "auto" else block,
            value_dtype=group["value_dtype"],
            ef_rounding=group.get("ef_rounding", "nearest"),
        )

    def layout(self, numel: int) -> BlockLayout:
        return make_layout(numel, self.density, self.topk_block_size)


def compute_dtype(p: Tensor) -> torch.dtype:
    """Arithmetic (and exact error-feedback) dtype: float64 for float64 params, else float32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def init_state(p: Tensor, hp: Hyper, layout: BlockLayout) -> dict[str, Tensor]:
    """Fresh state: empty window, zero error feedback."""
    dev, comp, d = p.device, compute_dtype(p), p.numel()
    shape = (hp.window_size, layout.k_total)
    state = {
        "step": torch.zeros((), dtype=torch.int64),
        "indices": torch.zeros(shape, dtype=layout.index_dtype, device=dev),
        "values": torch.zeros(shape, dtype=hp.value_dtype, device=dev),
    }
    if hp.ef_bits is None:
        state["ef"] = torch.zeros(d, dtype=comp, device=dev)
    else:
        nb = num_buckets(d, hp.quant_bucket_size)
        state["ef_codes"] = torch.zeros(
            packed_numel(d, hp.ef_bits, hp.quant_bucket_size), dtype=torch.uint8, device=dev
        )
        state["ef_min"] = torch.zeros(nb, dtype=comp, device=dev)
        state["ef_max"] = torch.zeros(nb, dtype=comp, device=dev)
    return state


@functools.lru_cache(maxsize=4096)
def _expected_layout(
    numel: int, window: int, k_total: int, ef_bits: int | None, bucket: int
) -> tuple[tuple[int, int], int, int]:
    """(window shape, packed code bytes, buckets) of a tensor's state; cached (every step)."""
    if ef_bits is None:
        return (window, k_total), 0, 0
    return (window, k_total), packed_numel(numel, ef_bits, bucket), num_buckets(numel, bucket)


def check_state(
    state: dict[str, Tensor], p: Tensor, hp: Hyper, layout: BlockLayout, name: str
) -> None:
    """Refuse a state whose layout no longer matches the group's structural hyper-parameters."""
    shape, packed, buckets = _expected_layout(
        p.numel(), hp.window_size, layout.k_total, hp.ef_bits, hp.quant_bucket_size
    )
    indices, values = state["indices"], state["values"]
    ok = indices.shape == shape and values.shape == shape
    ok = ok and values.dtype == hp.value_dtype and indices.dtype == layout.index_dtype
    if hp.ef_bits is None:
        ok = ok and "ef" in state and state["ef"].numel() == p.numel()
    else:
        ok = ok and "ef_codes" in state and state["ef_codes"].numel() == packed
        ok = ok and state["ef_min"].numel() == buckets
    if not ok:
        raise ValueError(
            f"MicroAdam: the state of {name} does not match window_size={hp.window_size}, "
            f"density={hp.density}, topk_block_size={hp.topk_block_size}, ef_bits={hp.ef_bits}, "
            f"quant_bucket_size={hp.quant_bucket_size}, value_dtype={hp.value_dtype}; these cannot "
            "change once the optimizer has stepped. Build a new optimizer instead."
        )


def raise_overflow(name: str) -> None:
    raise ValueError(
        f"MicroAdam: gradient plus error feedback of {name} overflowed to inf/NaN; lower the "
        "learning rate or clip gradients. The state of this parameter was left untouched."
    )


def moment_weights(hp: Hyper, t: int, filled: int, comp: torch.dtype, dev) -> tuple[Tensor, Tensor]:
    """(beta1**age, beta2**age) of the filled slots, as (filled, 1) columns; cached."""
    return _weights(
        hp.beta1,
        hp.beta2,
        hp.window_size,
        (t - 1) % hp.window_size,
        filled,
        comp,
        torch.device(dev),
    )


@functools.lru_cache(maxsize=256)
def _weights(
    beta1: float,
    beta2: float,
    m: int,
    newest: int,
    filled: int,
    comp: torch.dtype,
    dev: torch.device,
):
    ages = [(newest - i) % m for i in range(filled)]
    w1 = torch.tensor([beta1**r for r in ages], dtype=comp, device=dev)[:, None]
    w2 = torch.tensor([beta2**r for r in ages], dtype=comp, device=dev)[:, None]
    return w1, w2


def moment_terms(v: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """``beta1**age * v`` and ``beta2**age * v**2`` of a ``(filled, k)`` window."""
    return v * w1, v * v * w2


def window_moments(
    scratch: Tensor, idx: Tensor, m_terms: Tensor, s_terms: Tensor
) -> tuple[Tensor, Tensor]:
    """M and S (SPEC step 4) at every window entry, using ``scratch`` at those coordinates only.

    ``idx``, ``m_terms`` and ``s_terms`` are flat and list every coordinate's slots in slot
    order, so each coordinate's sum runs over the slots in order, as in the ground-truth loop.
    """
    # A dense memset is several times cheaper than zeroing the scattered coordinates.
    scratch.zero_().scatter_add_(0, idx, m_terms)
    big_m = scratch.index_select(0, idx)
    scratch.zero_().scatter_add_(0, idx, s_terms)
    return big_m, scratch.index_select(0, idx)


def sparse_update(
    flat: Tensor, idx: Tensor, big_m: Tensor, big_s: Tensor, hp: Hyper, t: int
) -> None:
    """SPEC steps 5-6 at the window's coordinates; ``big_m`` and ``big_s`` are consumed.

    ``theta - lr * c1 * M / (sqrt(c2 S) + eps)`` in one fused pass (the ground truth forms
    ``u`` first; the two agree to rounding). Duplicate indices (a coordinate in several slots)
    all write the same value.
    """
    denom = denominator_(big_s, hp, t)
    if hp.weight_decay != 0:
        flat.mul_(1 - hp.lr * hp.weight_decay)
    apply_update(flat, idx, big_m, denom, step_size(hp, t))


def denominator_(big_s: Tensor, hp: Hyper, t: int) -> Tensor:
    """``sqrt(c2 S) + eps``, computed in place in ``big_s``."""
    return big_s.mul_(bias_corrections(hp, t)[1]).sqrt_().add_(hp.eps)


def step_size(hp: Hyper, t: int) -> float:
    """``-lr * c1``, the factor of ``M / denominator`` in the update."""
    return -hp.lr * bias_corrections(hp, t)[0]


def apply_update(flat: Tensor, idx: Tensor, big_m: Tensor, denom: Tensor, step: float) -> None:
    """``theta[idx] += step * M / denom``; ``flat`` may have a lower precision than ``denom``."""
    theta = flat.index_select(0, idx)
    if theta.dtype == denom.dtype:
        theta.addcdiv_(big_m, denom, value=step)
    else:
        theta = torch.addcdiv(theta.to(denom.dtype), big_m, denom, value=step)
    flat.scatter_(0, idx, theta.to(flat.dtype))


def bias_corrections(hp: Hyper, t: int) -> tuple[float, float]:
    return (1 - hp.beta1) / (1 - hp.beta1**t), (1 - hp.beta2) / (1 - hp.beta2**t)


def _write_slot(state: dict[str, Tensor], t: int, local: Tensor, values: Tensor) -> None:
    slot = (t - 1) % state["indices"].shape[0]
    state["indices"][slot].copy_(local)
    state["values"][slot].copy_(values)
    state["step"].fill_(t)


def loop_step(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    hp: Hyper,
    layout: BlockLayout,
    name: str,
    dither: Tensor | None = None,
) -> None:
    """Ground truth: SPEC section 1 one block, bucket and window slot at a time.

    ``dither``: uniform draws in [0, 1), one per entry, for stochastic rounding of the error
    feedback (``None``: round to nearest, as SPEC).
    """
    t = int(state["step"]) + 1
    comp, d = compute_dtype(p), p.numel()
    # 1. a <- g + dequant(e)
    e = state["ef"].clone() if hp.ef_bits is None else _dequantize_loop(state, hp, d, comp)
    a = grad.reshape(-1).to(comp) + e
    # 2. top-k by |a| in every block
    local = torch.empty(layout.k_total, dtype=torch.int64, device=p.device)
    for start, length, k, col in layout.blocks():
        local[col : col + k] = torch.topk(a[start : start + length].abs(), k, sorted=False).indices
    glob = local + layout.column_offsets(p.device)
    values = a[glob]
    if not torch.isfinite(values).all():
        raise_overflow(name)
    # 3. a[sel] <- 0; e <- quant(a), one bucket at a time
    a[glob] = 0
    if hp.ef_bits is None:
        state["ef"].copy_(a)
    else:
        _quantize_loop(a, state, hp, dither)
    _write_slot(state, t, local, values)
    # 4. moments from the window
    big_m = torch.zeros(d, dtype=comp, device=p.device)
    big_s = torch.zeros(d, dtype=comp, device=p.device)
    offsets = layout.column_offsets(p.device)
    for i in range(min(t, hp.window_size)):
        r = (t - 1 - i) % hp.window_size
        idx = state["indices"][i].long() + offsets
        v = state["values"][i].to(comp)
        big_m[idx] += hp.beta1**r * v
        big_s[idx] += hp.beta2**r * v * v
    # 5. u = c1 M / (sqrt(c2 S) + eps); zero off the window
    c1, c2 = bias_corrections(hp, t)
    u = c1 * big_m / (torch.sqrt(c2 * big_s) + hp.eps)
    # 6. theta <- theta (1 - lr wd) - lr u
    flat = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
    if hp.weight_decay != 0:
        flat.mul_(1 - hp.lr * hp.weight_decay)
    flat.copy_((flat.to(comp) - hp.lr * u).to(p.dtype))
    if not p.is_contiguous():
        p.copy_(flat.view_as(p))


def _dequantize_loop(state: dict[str, Tensor], hp: Hyper, d: int, comp: torch.dtype) -> Tensor:
    levels, q = 2**hp.ef_bits - 1, hp.quant_bucket_size
    e = torch.empty(d, dtype=comp, device=state["ef_codes"].device)
    byte = 0
    for b, start in enumerate(range(0, d, q)):
        length = min(q, d - start)
        nbytes = bucket_bytes(length, hp.ef_bits)
        codes = unpack_bucket(state["ef_codes"][byte : byte + nbytes], hp.ef_bits, length)
        byte += nbytes
        lo, hi = state["ef_min"][b], state["ef_max"][b]
        s = (hi - lo) / levels
        e[start : start + length] = lo + codes.to(comp) * s
    return e


def _quantize_loop(
    a: Tensor, state: dict[str, Tensor], hp: Hyper, dither: Tensor | None = None
) -> None:
    levels, q = 2**hp.ef_bits - 1, hp.quant_bucket_size
    packed = []
    for b, start in enumerate(range(0, a.numel(), q)):
        x = a[start : start + q]
        lo, hi = x.min(), x.max()
        s = (hi - lo) / levels
        if s <= 0:
            code = torch.zeros_like(x)
        elif dither is None:
            code = torch.floor((x - lo) / s + 0.5)
        else:  # stochastic rounding: unbiased, never above the top level
            code = torch.floor((x - lo) / s + dither[start : start + q]).clamp(max=levels)
        packed.append(pack_bucket(code.to(torch.uint8), hp.ef_bits))
        state["ef_min"][b] = lo
        state["ef_max"][b] = hi
    state["ef_codes"].copy_(torch.cat(packed))


def fast_step(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    hp: Hyper,
    layout: BlockLayout,
    name: str,
    dither: Tensor | None = None,
) -> None:
    """Vectorized step: 2-D block top-k, bucketed quantization, sparse window update.

    ``dither`` as in :func:`loop_step`.

    One dense temporary of the parameter's size (``a``); after quantization it is reused to
    accumulate the window moments at the window's coordinates only.
    """
    t = int(state["step"]) + 1
    comp, d, dev = compute_dtype(p), p.numel(), p.device
    g = grad.reshape(-1)
    if hp.ef_bits is None:
        a = torch.add(state["ef"], g.to(comp))
    else:
        a = dequantize(
            state["ef_codes"], state["ef_min"], state["ef_max"], hp.ef_bits, hp.quant_bucket_size, d
        )
        a.add_(g)
    local, glob = blockwise_topk(a, layout)
    values = a.index_select(0, glob)
    if not torch.isfinite(values).all():
        raise_overflow(name)
    a.index_fill_(0, glob, 0)
    if hp.ef_bits is None:
        scratch, state["ef"] = state["ef"], a
    else:
        state["ef_codes"], state["ef_min"], state["ef_max"] = quantize_(
            a, hp.ef_bits, hp.quant_bucket_size, dither
        )
        scratch = a
    _write_slot(state, t, local, values)
    filled = min(t, hp.window_size)
    idx = (state["indices"][:filled].long() + layout.column_offsets(dev)).reshape(-1)
    m_terms, s_terms = moment_terms(
        state["values"][:filled].to(comp), *moment_weights(hp, t, filled, comp, dev)
    )
    big_m, big_s = window_moments(scratch, idx, m_terms.reshape(-1), s_terms.reshape(-1))
    flat = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
    sparse_update(flat, idx, big_m, big_s, hp, t)
    if not p.is_contiguous():
        p.copy_(flat.view_as(p))
