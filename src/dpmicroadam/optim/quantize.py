"""Bucketed asymmetric quantization of the error-feedback buffer (SPEC section 1).

A flat tensor is cut into buckets of ``bucket_size`` consecutive entries (the last bucket may
be shorter). Each bucket keeps its ``lo = min`` and ``hi = max``; with ``L = 2**bits - 1`` levels

.. math::

    s = (hi - lo) / L,\\qquad code = \\lfloor (x - lo) / s + 1/2 \\rfloor,\\qquad
    \\hat x = lo + code \\cdot s

so that ``|x - x_hat| <= s / 2``. A constant bucket (``hi == lo``) gets code 0 and decodes to
``lo`` exactly; nothing is ever divided by zero. 4-bit codes are packed two per byte (entry
``2j`` in the low nibble of byte ``j``, entry ``2j + 1`` in the high nibble); 8-bit codes take
one byte each.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (4, 8)


def num_buckets(numel: int, bucket_size: int) -> int:
    """Number of buckets of ``bucket_size`` covering ``numel`` entries."""
    return -(-numel // bucket_size)


def packed_numel(numel: int, bits: int) -> int:
    """Bytes taken by the codes of ``numel`` entries at ``bits`` bits each."""
    return -(-numel // 2) if bits == 4 else numel


def _segments(numel: int, bucket_size: int) -> list[tuple[int, int, int, int]]:
    """(start, bucket_length, bucket_count, first_bucket) for the full buckets, then the tail."""
    n_full, tail = divmod(numel, bucket_size)
    segs = []
    if n_full:
        segs.append((0, bucket_size, n_full, 0))
    if tail:
        segs.append((n_full * bucket_size, tail, 1, n_full))
    return segs


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< 2**bits) into bytes; 4-bit codes go two per byte."""
    if bits == 8:
        return codes
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: a uint8 tensor of ``numel`` codes."""
    if bits == 8:
        return packed
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)
    return out[:numel]


def quantize(x: Tensor, bits: int, bucket_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize a flat tensor per bucket.

    Args:
        x: 1-D floating tensor of finite values.
        bits: 4 or 8.
        bucket_size: entries per bucket (the last bucket may be shorter).

    Returns:
        ``(packed_codes, lo, hi)``: uint8 codes packed as described in the module docstring,
        and the per-bucket minimum and maximum in ``x.dtype``.
    """
    numel = x.numel()
    levels = float(2**bits - 1)
    nb = num_buckets(numel, bucket_size)
    lo = x.new_empty(nb)
    hi = x.new_empty(nb)
    codes = torch.empty(numel, dtype=torch.uint8, device=x.device)
    for start, length, count, b0 in _segments(numel, bucket_size):
        xs = x[start : start + length * count].view(count, length)
        seg_lo, seg_hi = torch.aminmax(xs, dim=1)
        lo[b0 : b0 + count] = seg_lo
        hi[b0 : b0 + count] = seg_hi
        step = (seg_hi - seg_lo) / levels
        # A constant bucket has x - lo == 0, so any positive divisor yields code 0.
        step = torch.where(step > 0, step, torch.ones_like(step))
        q = (xs - seg_lo[:, None]).div_(step[:, None]).add_(0.5)
        # q >= 0 here, so truncation towards zero is the floor of the SPEC formula.
        codes[start : start + length * count].view(count, length).copy_(q.clamp_(max=levels))
    return pack_codes(codes, bits), lo, hi


def dequantize(
    packed: Tensor, lo: Tensor, hi: Tensor, bits: int, bucket_size: int, numel: int
) -> Tensor:
    """Decode codes from :func:`quantize` into a new flat tensor of ``lo.dtype``."""
    levels = float(2**bits - 1)
    codes = unpack_codes(packed, bits, numel)
    out = codes.to(lo.dtype)
    step = (hi - lo) / levels
    for start, length, count, b0 in _segments(numel, bucket_size):
        seg = out[start : start + length * count].view(count, length)
        seg.mul_(step[b0 : b0 + count, None]).add_(lo[b0 : b0 + count, None])
    return out
