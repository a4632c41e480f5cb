"""Step time with glibc's malloc as it comes, against :func:`dpmicroadam.allocator.keep_freed_memory`.

The setting is process-wide and glibc's adaptive threshold depends on what a process freed
before, so each measurement runs in a fresh process: one with ``DPMICROADAM_MALLOC=system``
(glibc's defaults), one that calls ``keep_freed_memory()`` first, alternated ``--repeats`` times.
Each process builds the tanh CNN (28x28, one channel, held channels-last as ``train`` holds
images on CPU) and times, after warm-up steps, the median of ``--steps``:

* ``nonprivate``: forward, mean loss, backward, SGD step;
* ``dp``: ``FastEngine.clipped_sum`` (per-example clipping, no noise) and an SGD step.

Prints one JSON line per process and a summary line with the medians and the ratios, all from
this invocation (the machine is shared and noisy: compare ratios, not seconds). Usage::

    python benchmarks/bench_allocator.py [--steps 60] [--repeats 3] [--batch-size 64]
        [--threads 1] [--out results/benchmarks/allocator_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_cli import _commit  # this folder is on sys.path when run as a script

MODES = ("system", "keep")


def child(args: argparse.Namespace) -> dict:
    from dpmicroadam.allocator import keep_freed_memory

    allocator = keep_freed_memory() if args.child == "keep" else "not called"
    import torch

    from dpmicroadam.models.cnn import TanhCNN28
    from dpmicroadam.privacy.fast.engine import FastEngine
    from dpmicroadam.train.task import image_layout

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TanhCNN28()
    x = image_layout(torch.randn(args.batch_size, 1, 28, 28))
    y = torch.randint(0, 10, (args.batch_size,))
    loss = torch.nn.functional.cross_entropy
    engine = FastEngine(model, lambda out, t: loss(out, t, reduction="none"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def nonprivate() -> None:
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()

    def dp() -> None:
        sums, _ = engine.clipped_sum(x, y, 1.0)
        for p, s in zip(model.parameters(), sums):
            p.grad = s
        opt.step()

    def median_ms(step) -> float:
        for _ in range(5):
            step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    return {
        "mode": args.child,
        "allocator": allocator,
        "nonprivate_ms": round(median_ms(nonprivate), 3),
        "dp_ms": round(median_ms(dp), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append the JSON lines to this file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    base = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads)]
    base += ["--batch-size", str(args.batch_size)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    rows = {mode: [] for mode in MODES}
    lines = []
    for _ in range(args.repeats):
        for mode in MODES:  # alternated: drift hits both alike
            run_env = {**env, "DPMICROADAM_MALLOC": "system" if mode == "system" else ""}
            out = subprocess.run(
                [*base, "--child", mode], env=run_env, capture_output=True, text=True, check=True
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows[mode].append(row)
            lines.append(json.dumps({"bench": "allocator", "commit": _commit(), **row}))
            print(lines[-1], flush=True)
    med = {
        mode: {
            key: statistics.median(r[key] for r in rows[mode]) for key in ("nonprivate_ms", "dp_ms")
        }
        for mode in MODES
    }
    summary = {
        "bench": "allocator",
        "commit": _commit(),
        "model": "cnn",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "median": med,
        "dp_over_nonprivate": {
            m: round(med[m]["dp_ms"] / med[m]["nonprivate_ms"], 3) for m in MODES
        },
        "dp_system_over_keep": round(med["system"]["dp_ms"] / med["keep"]["dp_ms"], 3),
        "nonprivate_system_over_keep": round(
            med["system"]["nonprivate_ms"] / med["keep"]["nonprivate_ms"], 3
        ),
    }
    lines.append(json.dumps(summary))
    print(lines[-1])
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
