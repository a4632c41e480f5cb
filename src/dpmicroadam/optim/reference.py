"""A slow float64 reference of MicroAdam written straight from SPEC section 1.

NumPy only, one tensor, explicit loops over blocks, buckets and window slots. It shares no code
with :class:`dpmicroadam.optim.MicroAdam`, so tests and benchmarks can check the optimizer
against it. Ties in top-k go to the lower index (a stable sort).
"""

from __future__ import annotations

import math

import numpy as np


def _keep(density: float, length: int) -> int:
    return max(1, min(length, math.ceil(round(density * length, 9))))


def reference_quantize(x: np.ndarray, bits: int, bucket_size: int) -> np.ndarray:
    """Quantize then decode ``x`` bucket by bucket (returns the decoded values)."""
    levels = 2**bits - 1
    out = np.empty_like(x)
    for start in range(0, x.size, bucket_size):
        bucket = x[start : start + bucket_size]
        lo, hi = bucket.min(), bucket.max()
        s = (hi - lo) / levels
        if s > 0:
            code = np.floor((bucket - lo) / s + 0.5)
            out[start : start + bucket_size] = lo + code * s
        else:
            out[start : start + bucket_size] = lo
    return out


class ReferenceMicroAdam:
    """MicroAdam on one flat float64 array, step by step.

    Args:
        theta: initial parameter values (copied, flattened).
        lr, betas, eps, weight_decay, window_size, density: as in SPEC.
        ef_bits: None for exact error feedback, else 4 or 8.
        quant_bucket_size: entries per quantization bucket.
        topk_block_size: block length for top-k, None for the whole tensor.
    """

    def __init__(
        self,
        theta: np.ndarray,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window_size: int = 10,
        density: float = 0.01,
        ef_bits: int | None = None,
        quant_bucket_size: int = 1024,
        topk_block_size: int | None = None,
    ) -> None:
        self.theta = np.array(theta, dtype=np.float64).reshape(-1)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m, self.density, self.ef_bits = window_size, density, ef_bits
        self.bucket, self.block = quant_bucket_size, topk_block_size
        d = self.theta.size
        self.ef = np.zeros(d)
        self.slots: list[tuple[np.ndarray, np.ndarray] | None] = [None] * window_size
        self.t = 0
        self.last_selected: np.ndarray = np.zeros(0, dtype=np.int64)
        self.last_update: np.ndarray = np.zeros(d)

    def step(self, grad: np.ndarray) -> np.ndarray:
        """Apply one step with gradient ``grad``; returns the new parameter values."""
        self.t += 1
        t, (b1, b2) = self.t, self.betas
        d = self.theta.size
        a = np.asarray(grad, dtype=np.float64).reshape(-1) + self.ef  # 1
        block = d if self.block is None else self.block  # 2
        selected = []
        for start in range(0, d, block):
            part = np.abs(a[start : start + block])
            k = _keep(self.density, part.size)
            selected.extend(start + np.argsort(-part, kind="stable")[:k])
        idx = np.array(sorted(selected), dtype=np.int64)
        self.slots[(t - 1) % self.m] = (idx, a[idx].copy())
        a[idx] = 0.0  # 3
        self.ef = a if self.ef_bits is None else reference_quantize(a, self.ef_bits, self.bucket)
        big_m, big_s = np.zeros(d), np.zeros(d)  # 4
        for i, slot in enumerate(self.slots):
            if slot is None:
                continue
            r = (t - 1 - i) % self.m
            big_m[slot[0]] += b1**r * slot[1]
            big_s[slot[0]] += b2**r * slot[1] ** 2
        c1 = (1 - b1) / (1 - b1**t)  # 5
        c2 = (1 - b2) / (1 - b2**t)
        u = c1 * big_m / (np.sqrt(c2 * big_s) + self.eps)
        self.theta = self.theta * (1 - self.lr * self.weight_decay) - self.lr * u  # 6
        self.last_selected, self.last_update = idx, u
        return self.theta.copy()
