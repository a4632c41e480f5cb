"""MicroAdam on a GPU: a correctness smoke test, then step time and state size on WRN-16-4 shapes.

One short prepared script (well under 5 minutes on one GPU). It prints one JSON line per check
and per configuration; step-time ratios are against ``torch.optim.AdamW(foreach=True)`` measured
in the same run, for fp32 and bf16 parameters. ``--device cpu`` runs the same code quickly here::

    python benchmarks/gpu_microadam.py                 # on a CUDA machine
    python benchmarks/gpu_microadam.py --device cpu --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_microadam import CONFIGS, git_commit, measure, wrn16_4_shapes  # noqa: E402

from dpmicroadam.optim import MicroAdam  # noqa: E402


def _smoke(device: torch.device) -> dict:
    """The fast path on ``device`` against the ground-truth loop on the CPU (float64)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 70), (5000,), (17,), (), (64, 3, 3, 3)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [
        [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(12)
    ]
    worst = {}
    for ef_bits in (None, 4):
        results = []
        for dev, impl in ((device, "fast"), (torch.device("cpu"), "loop")):
            params = [t.to(dev).requires_grad_() for t in init]
            opt = MicroAdam(
                params, lr=1e-2, density=0.05, window_size=5, ef_bits=ef_bits, value_dtype=torch.float64,
                topk_block_size=4096, quant_bucket_size=256, implementation=impl,
            )  # fmt: skip
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.to(dev)
                opt.step()
            results.append([p.detach().cpu() for p in params])
        worst[str(ef_bits)] = max(float((a - b).abs().max()) for a, b in zip(*results))
    ok = all(v < 1e-9 for v in worst.values())
    return {
        "check": "fast path on device vs loop on cpu (float64, 12 steps)",
        "max_abs_diff": worst,
        "ok": ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_microadam.py: CUDA is not available; pass --device cpu to try it here."
        )
    start = time.perf_counter()
    print(
        json.dumps({"commit": git_commit(), "torch": torch.__version__, **_smoke(device)}),
        flush=True,
    )
    shapes = wrn16_4_shapes()
    names = ["adamw_foreach", "microadam_default", "microadam_exact_ef", "microadam_dense_1d"]
    for dtype in (torch.float32, torch.bfloat16):
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):  # alternate configurations: drift hits all alike
            for name in names:
                runs.setdefault(name, []).append(
                    measure(name, CONFIGS[name], shapes, device, dtype, args.steps)
                )
        base = statistics.median(r["median_ms"] for r in runs["adamw_foreach"])
        for rows in runs.values():
            row = dict(rows[-1])
            row["median_ms"] = round(statistics.median(r["median_ms"] for r in rows), 3)
            row["ratio_to_adamw"] = round(row["median_ms"] / base, 2)
            row.pop("cpu_ms", None)
            print(json.dumps(row), flush=True)
    print(json.dumps({"total_seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
