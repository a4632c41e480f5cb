"""DP against non-private time per step through the real `dpmicroadam train` entry point.

What users pay is the whole run, not the DP step alone: start-up, ε for the progress bar,
evaluations and checkpoints. For each model, this times ``dpmicroadam train`` (``cli.main``, the
entry point of the command, called in this process after a warm-up run so that import time does
not blur millisecond steps; ``--subprocess`` starts a fresh process per run instead) for 1 and for
``--steps`` steps, on the same random npz data, privately (``dp-sgd``) and not (``sgd``).
Start-up and the final evaluation cancel in the difference, so

    per_step = (time(steps) - time(1)) / (steps - 1)

and the printed ratio is DP per_step / non-private per_step, from runs interleaved in the same
invocation (the machine is shared and noisy: compare ratios, not seconds). Each repeat times a
DP and a non-private run back to back, so each repeat also gives a paired ratio; the row carries
their median, a 95 % bootstrap interval of it (:func:`paired_interval`), issue 16's goal for the
model and a verdict (:func:`verdict`): ``met`` only if the whole interval is at or below the goal,
``missed`` only if it is wholly above, else ``unsettled``. In this process,
garbage is collected and the ε caches are cleared before each timed run, so each run pays for
its ε as a fresh one does (``--keep-epsilon-cache``: as before the fourteenth session, when
later repeats got it free). One JSON line per model; ``--out FILE`` appends
them.

    python benchmarks/bench_cli.py                       # mlp, cnn, wrn16-4; 21 steps; batch 64
    python benchmarks/bench_cli.py --models mlp --repeats 5
    python benchmarks/bench_cli.py --models cnn --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {"mlp": (28, 28, 1), "cnn": (28, 28, 1), "wrn16-4": (32, 32, 3)}  # N x H x W x C npz
GOALS = {"mlp": 1.6, "cnn": 1.3, "wrn16-4": 1.3}  # issue 16: DP / non-private per step, CLI level


def paired_interval(
    dp: list[float], plain: list[float], level: float = 0.95, draws: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """Median of the paired ratios dp[r] / plain[r] and a percentile bootstrap interval of it.

    Repeats are resampled with replacement, ``draws`` times, with a fixed seed (so a row can be
    recomputed from its runs). Pairing keeps a slow stretch of the machine, which hits both runs
    of a repeat, from widening the interval as much as it would for independent samples.

    Returns:
        ``(median, low, high)``.

    Raises:
        ValueError: for lists of different lengths, fewer than 2 repeats, or a per-step time
            that is not positive (a 1-step run that took longer than the long run: rerun with
            more steps).
    """
    if len(dp) != len(plain) or len(dp) < 2:
        raise ValueError(
            f"need two equally long lists of at least 2 repeats, got {len(dp)} and {len(plain)}"
        )
    if min(plain) <= 0 or min(dp) <= 0:
        raise ValueError(
            "a per-step time is not positive (the 1-step run took longer than the long one): "
            "rerun with more --steps"
        )
    ratios = np.asarray(dp, dtype=float) / np.asarray(plain, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, size=(draws, ratios.size), replace=True), axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return float(np.median(ratios)), float(low), float(high)


def verdict(low: float, high: float, goal: float) -> str:
    """``met`` if the whole interval is at or below ``goal``, ``missed`` if wholly above it,
    else ``unsettled``."""
    if high <= goal:
        return "met"
    if low > goal:
        return "missed"
    return "unsettled"


def emit(row: dict, out: str | None) -> None:
    """Prints ``row`` as one JSON line and, with ``out``, appends it to that file."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows: rows of
    different machines differ by more than their intervals (the sixteenth session's AMD EPYC
    ran the tanh CNN's non-private CLI step in 11.4 ms, the fifteenth's machine in 5.3 ms)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def make_data(folder: Path, shape: tuple[int, ...], n_train: int, n_test: int) -> Path:
    rng = np.random.default_rng(0)
    path = folder / f"data-{'x'.join(map(str, shape))}.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        y_train=np.arange(n_train) % 10,
        x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        y_test=np.arange(n_test) % 10,
    )
    return path


def time_run(dataset: str, model: str, optimizer: str, steps: int, args, out: Path) -> float:
    argv = [
        sys.executable, "-m", "dpmicroadam", "train", "--dataset", dataset,
        "--model", model, "--optimizer", optimizer, "--steps", str(steps),
        "--batch-size", str(args.batch_size),
        "--lr", "0.1", "--val-fraction", "0.1", "--no-progress", "--json", "--out", str(out),
    ]  # fmt: skip
    if optimizer.startswith("dp-"):
        argv += ["--noise-multiplier", "1.0", "--clip-norm", "1.0"]
    if args.subprocess:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        subprocess.run(argv, check=True, env=env, capture_output=True)
        return time.perf_counter() - start
    import contextlib
    import io

    from dpmicroadam.cli import main as cli_main

    # The earlier runs' garbage is collected first, so that a full collection of this process's
    # many objects does not fall inside a timed run (measured: the MLP's 1-step DP run took
    # 0.40 s instead of 0.19 s at the first and fifth of six repeats of 61 steps; 0.31 s at the
    # first, which also computes ε for 1 step afresh, and 0.23 s at the fifth with this).
    gc.collect()
    if not args.keep_epsilon_cache:
        # A fresh `dpmicroadam train` computes ε afresh; this process's caches (per step count,
        # the one-step PLD and its tail moments) would serve every repeat after the first for free.
        import importlib

        importlib.import_module("dpmicroadam.accounting.epsilon").clear_caches()  # the module
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(argv[3:])
    elapsed = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"dpmicroadam {' '.join(argv[3:])} exited with {code}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--out", help="append the JSON rows to this file")
    parser.add_argument("--subprocess", action="store_true", help="a fresh process per run")
    parser.add_argument(
        "--keep-epsilon-cache", action="store_true",
        help="let ε computed by an earlier run of this process serve later ones (as up to "
        "the fourteenth session's rows; a fresh run pays for its ε)",
    )  # fmt: skip
    parser.add_argument(
        "--dataset",
        help="a dataset `train` knows (e.g. fashion-mnist) instead of the random npz data",
    )
    args = parser.parse_args()
    if not args.subprocess:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model in args.models:
            if args.dataset:
                data = args.dataset
            else:
                npz = make_data(folder, SHAPES[model], args.train_size, args.test_size)
                data = f"npz:{npz}"
            per_step: dict[str, list[float]] = {"dp-sgd": [], "sgd": []}
            for optimizer in ("dp-sgd", "sgd"):  # warm-up: caches, lazy imports
                time_run(data, model, optimizer, 2, args, folder / f"warm-{model}-{optimizer}")
            for r in range(args.repeats):
                for optimizer in ("dp-sgd", "sgd"):  # interleaved: drift hits both alike
                    t = {
                        s: time_run(
                            data, model, optimizer, s, args, folder / f"{model}-{optimizer}-{s}-{r}"
                        )
                        for s in (1, args.steps)
                    }
                    per_step[optimizer].append((t[args.steps] - t[1]) / (args.steps - 1))
            dp, plain = statistics.median(per_step["dp-sgd"]), statistics.median(per_step["sgd"])
            try:
                paired, low, high = paired_interval(per_step["dp-sgd"], per_step["sgd"])
                judged = verdict(low, high, GOALS[model])
            except ValueError as err:  # keep the row (and the runs) of a long benchmark
                paired = low = high = None
                judged = f"not computed: {err}"
            row = {
                "bench": "cli",
                "commit": _commit(),
                "cpu": cpu_name(),
                "model": model,
                "dataset": args.dataset or "random npz",
                "batch_size": args.batch_size,
                "steps": args.steps,
                "threads": args.threads,
                "repeats": args.repeats,
                "epsilon_cache": "kept" if args.keep_epsilon_cache else "cleared",
                "dp_ms_per_step": round(1000 * dp, 2),
                "nonprivate_ms_per_step": round(1000 * plain, 2),
                "ratio": round(dp / plain, 3),
                "paired_ratio": None if paired is None else round(paired, 3),
                "paired_ratio_ci95": None if low is None else [round(low, 3), round(high, 3)],
                "goal": GOALS[model],
                "verdict": judged,
                "dp_runs_ms": [round(1000 * v, 1) for v in per_step["dp-sgd"]],
                "nonprivate_runs_ms": [round(1000 * v, 1) for v in per_step["sgd"]],
            }
            emit(row, args.out)


if __name__ == "__main__":
    main()
