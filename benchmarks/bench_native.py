"""Per-example conv weight gradients: the C kernel against copied patches and a batched matmul.

For each conv below (64 examples, channels-last float32 inputs, 1 thread), times
``ConvCall._patch_products`` with the kernel of ``dpmicroadam.privacy.fast.native`` switched on
and off, alternated ``--repeats`` times in this process, and prints one JSON line per conv with
the two medians and their ratio (the machine is shared and noisy: compare ratios, not seconds).
It first checks that both give the same gradients (to float32 rounding). Usage::

    python benchmarks/bench_native.py [--repeats 7] [--out results/benchmarks/native_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_cli import _commit, emit  # this folder is on sys.path when run as a script

from dpmicroadam.privacy.fast import native
from dpmicroadam.privacy.fast.conv import ConvCall

# (name, in, out, kernel, stride, padding, input size)
CONVS = [
    ("tanh CNN conv 1", 1, 16, 8, 2, 3, 28),
    ("tanh CNN conv 2", 16, 32, 4, 2, 0, 13),
    ("8 -> 16 3x3", 8, 16, 3, 1, 1, 28),
    ("WRN-16-4 16 -> 64 3x3", 16, 64, 3, 1, 1, 32),
    ("32 -> 32 3x3", 32, 32, 3, 1, 1, 32),
    ("WRN-16-4 64 -> 64 3x3", 64, 64, 3, 1, 1, 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="append the JSON rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the kernel runs at one torch thread only
    torch.manual_seed(0)
    n = args.batch_size
    for name, c_in, c_out, size, stride, padding, pixels in CONVS:
        conv = torch.nn.Conv2d(c_in, c_out, size, stride=stride, padding=padding)
        x = torch.randn(n, c_in, pixels, pixels).contiguous(memory_format=torch.channels_last)
        e = torch.randn_like(conv(x))
        call = ConvCall.from_module(conv)

        def run(on: bool, call=call, x=x, e=e) -> torch.Tensor:
            native.ENABLED = on
            try:
                return call._patch_products(x, e, n, 1)
            finally:
                native.ENABLED = True

        if native.conv2d_patch_products(call.zero_padded(x), e, n, 1, (size, size),
                                        (stride, stride)) is None:  # fmt: skip
            raise SystemExit(f"the kernel does not run here: {native.status()}")
        torch.testing.assert_close(run(True), run(False), rtol=1e-4, atol=1e-3)
        reps = max(1, int(0.2 / max(1e-4, _seconds(lambda: run(False)))))
        times: dict[str, list[float]] = {"kernel": [], "matmul": []}
        for _ in range(args.repeats):
            for label, on in (("kernel", True), ("matmul", False)):
                times[label].append(_seconds(lambda on=on: run(on), reps))
        kernel, matmul = (statistics.median(times[k]) for k in ("kernel", "matmul"))
        row = {
            "bench": "native",
            "commit": _commit(),
            "conv": name,
            "batch_size": n,
            "threads": 1,
            "repeats": args.repeats,
            "kernel_ms": round(1000 * kernel, 3),
            "matmul_ms": round(1000 * matmul, 3),
            "matmul_over_kernel": round(matmul / kernel, 3),
            "kernel_status": native.status(),
        }
        emit(row, args.out)


def _seconds(fn, reps: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


if __name__ == "__main__":
    main()
