"""Bucketed asymmetric quantization of the error-feedback buffer (SPEC section 1).

A flat tensor is cut into buckets of ``bucket_size`` consecutive entries (the last bucket may
be shorter). Each bucket keeps its ``lo = min`` and ``hi = max``; with ``L = 2**bits - 1`` levels

.. math::

    s = (hi - lo) / L,\\qquad code = \\lfloor (x - lo) / s + 1/2 \\rfloor,\\qquad
    \\hat x = lo + code \\cdot s

so that ``|x - x_hat| <= s / 2``. With stochastic rounding (``dither``: one uniform draw
``u`` in [0, 1) per entry) the code is ``min(floor((x - lo) / s + u), L)`` instead: unbiased,
``E[x_hat] = x``, with ``|x - x_hat| < s``. Rounding to nearest has a dead zone: an
error-feedback entry that grows by less than ``s / 2`` per step, while one large entry of its
bucket keeps ``s`` wide, is rounded back to the same code every step and its gradient is lost.
A constant bucket (``hi == lo``) gets code 0 and decodes to ``lo`` exactly; nothing is ever
divided by zero.

Packing: 8-bit codes take one byte each. 4-bit codes go two per byte *within a bucket*: a bucket
of ``n`` entries takes ``h = ceil(n / 2)`` bytes, byte ``j`` holding entry ``j`` in its low nibble
and entry ``j + h`` (if any) in its high nibble. Splitting buckets in halves rather than
interleaving keeps every packing operation on contiguous memory. 5- and 6-bit codes (an
extension of SPEC: finer error feedback at under 1 byte) go eight to ``bits`` bytes: a bucket of
``n`` entries is padded with zero codes to a multiple of 8, and each group of eight codes
``c_0 .. c_7`` is the little-endian integer ``sum c_i << (bits * i)`` written in ``bits`` bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (4, 5, 6, 8)
GROUPED_BITS = (5, 6)  # packed eight codes to ``bits`` bytes (an extension of SPEC)


def num_buckets(numel: int, bucket_size: int) -> int:
    """Number of buckets of ``bucket_size`` covering ``numel`` entries."""
    return -(-numel // bucket_size)


def bucket_bytes(length: int, bits: int) -> int:
    """Bytes taken by the codes of one bucket of ``length`` entries."""
    if bits == 4:
        return -(-length // 2)
    if bits == 8:
        return length
    return bits * -(-length // 8)


def _pack_groups(codes: Tensor, bits: int) -> Tensor:
    """Integer codes ``(..., n)`` -> uint8 ``(..., bits * ceil(n / 8))``, eight codes per group."""
    n = codes.shape[-1]
    pad = -n % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    groups = codes.to(torch.int64).view(*codes.shape[:-1], -1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(-1, keepdim=True)
    out = (words >> torch.arange(bits, device=codes.device, dtype=torch.int64) * 8) & 0xFF
    return out.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def _unpack_groups(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of :func:`_pack_groups`: uint8 ``(..., nbytes)`` -> int64 codes ``(..., length)``."""
    groups = packed.to(torch.int64).view(*packed.shape[:-1], -1, bits)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (groups << shifts).sum(-1, keepdim=True)
    codes = (words >> torch.arange(8, device=packed.device, dtype=torch.int64) * bits) & (
        2**bits - 1
    )
    return codes.reshape(*packed.shape[:-1], -1)[..., :length]


def packed_numel(numel: int, bits: int, bucket_size: int) -> int:
    """Bytes taken by the codes of ``numel`` entries."""
    n_full, tail = divmod(numel, bucket_size)
    return n_full * bucket_bytes(bucket_size, bits) + bucket_bytes(tail, bits)


def _segments(numel: int, bucket_size: int, bits: int) -> list[tuple[int, int, int, int, int]]:
    """(start, bucket_length, bucket_count, first_bucket, first_byte): full buckets, then tail."""
    n_full, tail = divmod(numel, bucket_size)
    segs = []
    if n_full:
        segs.append((0, bucket_size, n_full, 0, 0))
    if tail:
        segs.append(
            (n_full * bucket_size, tail, 1, n_full, n_full * bucket_bytes(bucket_size, bits))
        )
    return segs


def pack_bucket(codes: Tensor, bits: int) -> Tensor:
    """Pack the uint8 codes of one bucket (see the module docstring for the layout)."""
    if bits == 8:
        return codes.clone()
    if bits in GROUPED_BITS:
        return _pack_groups(codes, bits)
    h = -(-codes.numel() // 2)
    out = codes[:h].clone()
    out[: codes.numel() - h] |= codes[h:] << 4
    return out


def unpack_bucket(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of :func:`pack_bucket`: the ``length`` uint8 codes of one bucket."""
    if bits == 8:
        return packed.clone()
    if bits in GROUPED_BITS:
        return _unpack_groups(packed, bits, length).to(torch.uint8)
    h = -(-length // 2)
    return torch.cat([packed & 0x0F, packed[: length - h] >> 4])


def quantize_(
    x: Tensor, bits: int, bucket_size: int, dither: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize a flat tensor per bucket, using ``x`` itself as scratch (its values are lost).

    Args:
        x: 1-D contiguous floating tensor of finite values; overwritten.
        bits: 4, 5, 6 or 8.
        bucket_size: entries per bucket (the last bucket may be shorter).
        dither: ``None`` to round to nearest, or uniform draws in [0, 1), one per entry of ``x``
            (same shape and dtype), for stochastic rounding.

    Returns:
        ``(packed_codes, lo, hi)``: uint8 codes packed as described in the module docstring,
        and the per-bucket minimum and maximum in ``x.dtype``.
    """
    numel = x.numel()
    levels = float(2**bits - 1)
    nb = num_buckets(numel, bucket_size)
    lo, hi = x.new_empty(nb), x.new_empty(nb)
    packed = torch.empty(packed_numel(numel, bits, bucket_size), dtype=torch.uint8, device=x.device)
    for start, length, count, b0, p0 in _segments(numel, bucket_size, bits):
        xs = x[start : start + length * count].view(count, length)
        seg_lo, seg_hi = lo[b0 : b0 + count], hi[b0 : b0 + count]
        torch.amin(xs, dim=1, out=seg_lo)
        torch.amax(xs, dim=1, out=seg_hi)
        step = (seg_hi - seg_lo) / levels
        # A constant bucket has x - lo == 0, so any positive divisor yields code 0.
        step = torch.where(step > 0, step, torch.ones_like(step))
        xs.sub_(seg_lo[:, None]).div_(step[:, None])
        if dither is None:
            xs.add_(0.5).floor_()
        else:
            xs.add_(dither[start : start + length * count].view(count, length))
            xs.floor_().clamp_(max=levels)  # (hi - lo) / s may round to just above L
        nbytes = bucket_bytes(length, bits)
        if bits in GROUPED_BITS:
            packed[p0 : p0 + count * nbytes].view(count, nbytes).copy_(_pack_groups(xs, bits))
            continue
        if bits == 4:
            # low + 16 * high is exact in floating point (at most 255)
            xs[:, : length - nbytes].add_(xs[:, nbytes:], alpha=16)
            xs = xs[:, :nbytes]
        # float -> int32 -> uint8 is much faster on CPU than float -> uint8
        packed[p0 : p0 + count * nbytes].view(count, nbytes).copy_(xs.to(torch.int32))
    return packed, lo, hi


def quantize(x: Tensor, bits: int, bucket_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`quantize_` but leaves ``x`` untouched."""
    return quantize_(x.reshape(-1).clone(), bits, bucket_size)


def dequantize(
    packed: Tensor, lo: Tensor, hi: Tensor, bits: int, bucket_size: int, numel: int
) -> Tensor:
    """Decode codes from :func:`quantize` into a new flat tensor of ``lo.dtype``."""
    levels = float(2**bits - 1)
    out = torch.empty(numel, dtype=lo.dtype, device=lo.device)
    step = (hi - lo) / levels
    for start, length, count, b0, p0 in _segments(numel, bucket_size, bits):
        seg = out[start : start + length * count].view(count, length)
        nbytes = bucket_bytes(length, bits)
        codes = packed[p0 : p0 + count * nbytes].view(count, nbytes)
        if bits == 8:
            seg.copy_(codes)
        elif bits in GROUPED_BITS:
            seg.copy_(_unpack_groups(codes, bits, length))
        else:
            seg[:, :nbytes].copy_(codes & 0x0F)
            seg[:, nbytes:].copy_(codes[:, : length - nbytes] >> 4)
        seg.mul_(step[b0 : b0 + count, None]).add_(lo[b0 : b0 + count, None])
    return out
