"""The error-feedback quantizer and MicroAdam's handling of non-finite gradients."""

from __future__ import annotations

import pytest
import torch

from dpmicroadam.optim import MicroAdam
from dpmicroadam.optim.quantize import dequantize, pack_bucket, quantize, unpack_bucket


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize(
    ("numel", "bucket"), [(1, 4), (7, 4), (1000, 64), (1024, 1024), (33, 100), (50, 7)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_error_is_at_most_half_a_step(bits, numel, bucket, dtype):
    gen = torch.Generator().manual_seed(numel)
    x = (
        torch.randn(numel, generator=gen, dtype=dtype)
        * torch.rand(numel, generator=gen, dtype=dtype)
        * 10
    )
    packed, lo, hi = quantize(x, bits, bucket)
    assert packed.dtype == torch.uint8
    lengths = [min(bucket, numel - s) for s in range(0, numel, bucket)]
    per_bucket = {4: lambda n: -(-n // 2), 8: lambda n: n}.get(bits, lambda n: bits * -(-n // 8))
    assert packed.numel() == sum(per_bucket(n) for n in lengths)
    y = dequantize(packed, lo, hi, bits, bucket, numel)
    assert y.dtype == dtype
    for b, start in enumerate(range(0, numel, bucket)):
        xb, yb = x[start : start + bucket], y[start : start + bucket]
        assert lo[b] == xb.min() and hi[b] == xb.max()
        half_step = (hi[b] - lo[b]) / (2**bits - 1) / 2
        slack = 4 * torch.finfo(dtype).eps * xb.abs().max()
        assert (xb - yb).abs().max() <= half_step + slack


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_constant_bucket_decodes_exactly(bits):
    x = torch.cat([torch.full((16,), 0.3), torch.full((16,), -7.25), torch.zeros(5)])
    packed, lo, hi = quantize(x, bits, 16)
    y = dequantize(packed, lo, hi, bits, 16, x.numel())
    assert torch.equal(y, x)
    assert torch.isfinite(y).all()


def test_extremes_of_a_bucket_decode_exactly():
    x = torch.tensor([-1.0, 0.2, 3.0, 0.7, 2.9, -0.99])
    y = dequantize(*quantize(x, 4, 6), 4, 6, 6)
    assert y[0] == -1.0 and y[2] == 3.0


@pytest.mark.parametrize("length", [1, 2, 11, 12])
def test_nibble_packing_splits_a_bucket_in_halves(length):
    codes = torch.randint(
        0, 16, (length,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    packed = pack_bucket(codes, 4)
    half = -(-length // 2)
    assert packed.numel() == half
    if length > 1:
        assert packed[0] == codes[0] | (codes[half] << 4)
    assert packed[half - 1] & 0x0F == codes[half - 1]
    assert torch.equal(unpack_bucket(packed, 4, length), codes)


@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("length", [1, 7, 8, 9, 64])
def test_five_and_six_bit_codes_go_eight_to_bits_bytes(bits, length):
    codes = torch.randint(
        0, 2**bits, (length,), dtype=torch.uint8, generator=torch.Generator().manual_seed(length)
    )
    packed = pack_bucket(codes, bits)
    assert packed.numel() == bits * -(-length // 8)
    # the first group, little-endian: code i sits at bits [bits * i, bits * (i + 1))
    word = sum(int(b) << (8 * j) for j, b in enumerate(packed[:bits].tolist()))
    assert [(word >> (bits * i)) & (2**bits - 1) for i in range(min(8, length))] == codes[
        :8
    ].tolist()
    assert torch.equal(unpack_bucket(packed, bits, length), codes)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_vectorized_packing_matches_bucket_packing(bits):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    packed, lo, hi = quantize(x, bits, 64)
    expected = []
    for b, start in enumerate(range(0, 1000, 64)):
        part = x[start : start + 64]
        s = (hi[b] - lo[b]) / (2**bits - 1)
        codes = torch.floor((part - lo[b]) / s + 0.5).to(torch.uint8)
        expected.append(pack_bucket(codes, bits))
    assert torch.equal(packed, torch.cat(expected))


@pytest.mark.parametrize("impl", ["fast", "loop"])
@pytest.mark.parametrize("ef_bits", [4, None])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_raises_naming_parameter_and_leaves_state(impl, ef_bits, bad):
    a = torch.randn(40).requires_grad_()
    b = torch.randn(3, 5).requires_grad_()
    opt = MicroAdam(
        [{"params": [a]}, {"params": [b]}], density=0.2, ef_bits=ef_bits, implementation=impl
    )
    a.grad, b.grad = torch.randn(40), torch.randn(3, 5)
    opt.step()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in (a, b)}
    values = {p: p.detach().clone() for p in (a, b)}
    a.grad = torch.randn(40)
    b.grad = torch.randn(3, 5)
    b.grad[1, 2] = bad
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 \(shape \(3, 5\)\)"):
        opt.step()
    for p in (a, b):
        assert torch.equal(p, values[p])
        for k, v in before[p].items():
            assert torch.equal(opt.state[p][k], v)
            if v.is_floating_point():
                assert torch.isfinite(opt.state[p][k]).all()


def test_overflow_of_gradient_plus_error_feedback_never_stores_nan():
    p = torch.zeros(8).requires_grad_()
    opt = MicroAdam([p], density=0.125, ef_bits=None)
    p.grad = torch.tensor([0.0, 0, 0, 0, 0, 0, 3e38, 3.4e38])
    opt.step()  # 3.4e38 is selected, 3e38 stays in the error feedback
    p.grad = torch.tensor([0.0, 0, 0, 0, 0, 0, 3e38, 0])
    with pytest.raises(ValueError, match="overflowed"):
        opt.step()
    assert torch.isfinite(opt.state[p]["ef"]).all()
