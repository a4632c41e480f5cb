"""MicroAdam step time and state size on the parameter shapes of WRN-16-4.

Prints one JSON line per configuration; ratios against ``torch.optim.AdamW(foreach=True)`` are
measured in the same run (these machines are noisy). ``first_step_ms`` is the first step of the
configuration's first run in the process: for ``microadam_compiled`` it includes compiling, and
``compile_s`` is the time spent in the first calls of the compiled stages; for
``microadam_fused``, ``build_s`` is the time spent building or loading its C++ extension. Usage::

    python benchmarks/bench_microadam.py [--device cpu] [--steps 30] [--dtype float32] [--cold]
        [--threads N] [--repeats N] [--configs NAME ...] [--fresh-inductor-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import torch

from dpmicroadam.optim import MicroAdam, compiled, fused, state_bytes


def wrn16_4_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """Trainable tensor shapes of WRN-16-4 with GroupNorm and weight-standardized convs."""
    shapes: list[tuple[int, ...]] = []

    def conv(cin: int, cout: int, k: int) -> None:
        shapes.extend([(cout, cin, k, k), (cout,), (cout,)])  # weight, WS gain, bias

    def norm(c: int) -> None:
        shapes.extend([(c,), (c,)])

    conv(3, 16, 3)
    cin = 16
    for width in (64, 128, 256):
        for block in range(2):
            norm(cin)
            conv(cin, width, 3)
            norm(width)
            conv(width, width, 3)
            if block == 0 and cin != width:
                conv(cin, width, 1)
            cin = width
    norm(cin)
    shapes.extend([(num_classes, cin), (num_classes,)])
    return shapes


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str,
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    shapes: list[tuple[int, ...]],
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    warmup: int = 3,
    cold: bool = False,
) -> dict:
    """Median step time (ms), peak extra memory and state bytes of one optimizer.

    ``cold``: before every timed step, an untimed AdamW step over another copy of the shapes
    sweeps the caches, as the forward and backward pass of a real training step would.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    params = [
        torch.randn(s, generator=gen, device=device).to(dtype).requires_grad_() for s in shapes
    ]
    grads = [
        [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes] for _ in range(4)
    ]
    opt = make(params)
    sweeper = None
    if cold:
        others = [torch.randn_like(p).requires_grad_() for p in params]
        for q, g in zip(others, grads[1]):
            q.grad = g.clone()
        sweeper = torch.optim.AdamW(others, lr=1e-3, foreach=True)
    times, cpu_times, first_ms = [], [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for i in range(warmup + steps):
        for p, g in zip(params, grads[i % len(grads)]):
            p.grad = g
        if sweeper is not None:
            sweeper.step()
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        opt.step()
        _sync(device)
        if i == 0:
            first_ms = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
    numel = sum(p.numel() for p in params)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    sb = state_bytes(opt)
    return {
        "config": name,
        "commit": git_commit(),
        "torch": torch.__version__,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "cold": cold,
        "shape": f"wrn16-4 ({len(shapes)} tensors, {numel} params)",
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "cpu_ms": round(statistics.median(cpu_times), 3),
        "first_step_ms": round(first_ms, 1),
        "peak_extra_mib": None if peak is None else round(peak, 1),
        "state_bytes": sb,
        "bytes_per_param": round(sb / numel, 4),
    }


CONFIGS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "microadam_default": lambda ps: MicroAdam(ps, lr=1e-3),
    "microadam_compiled": lambda ps: MicroAdam(ps, lr=1e-3, implementation="compiled"),
    "microadam_fused": lambda ps: MicroAdam(ps, lr=1e-3, implementation="fused"),
    "microadam_ef8": lambda ps: MicroAdam(ps, lr=1e-3, ef_bits=8),
    "microadam_exact_ef": lambda ps: MicroAdam(ps, lr=1e-3, ef_bits=None),
    "microadam_dense_1d": lambda ps: MicroAdam(
        [
            {"params": [p for p in ps if p.dim() > 1]},
            {"params": [p for p in ps if p.dim() <= 1], "density": 1.0},
        ],
        lr=1e-3,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate all configs this many times"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--cold", action="store_true", help="sweep the caches with another AdamW step before each"
    )
    parser.add_argument(
        "--fresh-inductor-cache",
        action="store_true",
        help="compile into an empty TORCHINDUCTOR_CACHE_DIR (the first compile on a machine)",
    )
    args = parser.parse_args()
    if args.fresh_inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = wrn16_4_shapes()
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name in args.configs:
            results.setdefault(name, []).append(
                measure(name, CONFIGS[name], shapes, device, dtype, args.steps, cold=args.cold)
            )
    baseline = results.get("adamw_foreach", [{"median_ms": float("nan"), "cpu_ms": float("nan")}])
    base = statistics.median(r["median_ms"] for r in baseline)
    cpu_base = statistics.median(r["cpu_ms"] for r in baseline)
    for name, runs in results.items():
        row = dict(runs[-1])
        row["first_step_ms"] = runs[0]["first_step_ms"]
        if name == "microadam_compiled":
            row["compile_s"] = round(compiled.compile_seconds(), 2)
            row["compile_failure"] = compiled.compile_failure()
            row["fresh_inductor_cache"] = args.fresh_inductor_cache
        if name == "microadam_fused":
            row["build_s"] = round(fused.build_seconds(), 2)
            row["build_failure"] = fused.build_failure()
        row["median_ms"] = round(statistics.median(r["median_ms"] for r in runs), 3)
        row["cpu_ms"] = round(statistics.median(r["cpu_ms"] for r in runs), 3)
        row["ratio_to_adamw"] = round(row["median_ms"] / base, 2)
        row["cpu_ratio_to_adamw"] = round(row["cpu_ms"] / cpu_base, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
