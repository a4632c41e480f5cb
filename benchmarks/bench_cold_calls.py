"""What one small call costs when it has not run for a while: warm against after a busy pause.

A private step makes many small calls (torch operators on a few dozen numbers, the engine's
Python), each once a step, between long convolutions. Timed in a tight loop they take a few
microseconds; inside a step, many times that. This times three small calls right after one
another (warm) and after the CPU has spent ``pause`` microseconds on something else (a busy
wait that touches next to no memory), in one process, and prints each median and its ratio to
the warm one. On the project's 2-core machine (twenty-third session) a torch addition on 64
numbers took 4.3 µs warm and 132 µs after a 5 ms pause; so a change that removes a few small
calls from a step saves far more than a tight loop says, and the engine-level ratio of
``bench_step_parts.py`` understates the command line's (docs/speed.md, "Twenty-third session").

    python benchmarks/bench_cold_calls.py
    python benchmarks/bench_cold_calls.py --pauses 0 1000 5000 --samples 300
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# this folder is on sys.path when run as a script
from bench_cli import _commit, cpu_name, emit

from dpmicroadam.privacy.clip import clip_factors


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(pauses: list[int], samples: int) -> dict:
    norms = torch.rand(64)
    calls = {
        "torch add (64 numbers)": lambda: norms + 1,
        "clip_factors (64 examples)": lambda: clip_factors(norms, 1.0),
        "python sorted (3 items)": lambda: sorted([3, 1, 2]),
    }
    out: dict[str, dict[str, float]] = {}
    for name, fn in calls.items():
        row: dict[str, float] = {}
        for pause in pauses:
            times = []
            for _ in range(samples):
                _busy(pause * 1e-6)
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            row[f"after_{pause}us_us"] = round(1e6 * statistics.median(times), 2)
        warm = row[f"after_{pauses[0]}us_us"]
        for pause in pauses[1:]:
            row[f"ratio_{pause}us"] = round(row[f"after_{pause}us_us"] / warm, 2)
        out[name] = row
    return {
        "bench": "cold_calls",
        "commit": _commit(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "samples": samples,
        "calls": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pauses", type=int, nargs="+", default=[0, 200, 1000, 5000],
                        help="busy pauses before each timed call, µs; the first is 'warm'")  # fmt: skip
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append the JSON row to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emit(measure(args.pauses, args.samples), args.out)


if __name__ == "__main__":
    main()
