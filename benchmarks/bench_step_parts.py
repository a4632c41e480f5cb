"""Where a private step's time goes, against the non-private step, at the engine level.

For one model (random data in the CLI's channels-last layout, 1 thread), in one process, this
times ``FastEngine.clipped_sum`` and a non-private forward and backward pass, alternated, at
the batch size given and at one example (where nearly all of the private step is fixed cost:
hooks, the graph check, per-layer bookkeeping), and splits the private step at the given batch
size into: the forward pass with the engine's hooks, the backward pass to the layers' outputs
with the norms computed in its hooks, each layer's norms (``sq_norms``) and clipped sums
(``sums``). One JSON line; ``--out FILE`` appends it. Medians of ``--repeats`` rounds of
``--calls`` calls (the machine is shared and noisy: compare parts measured in the same run).

    python benchmarks/bench_step_parts.py                 # the tanh CNN, 64 examples
    python benchmarks/bench_step_parts.py --model mlp --batch-size 256
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn.functional as F

# this folder is on sys.path when run as a script
from bench_cli import SHAPES, _commit, cpu_name, emit

from dpmicroadam.models.factory import build_model
from dpmicroadam.privacy.fast import FastEngine
from dpmicroadam.train.task import image_layout


def _per_row(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _timed(parts: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[key] += time.perf_counter() - start

    return wrapper


def measure(model_name: str, batch: int, repeats: int, calls: int) -> dict:
    torch.manual_seed(0)
    h, w, c = SHAPES[model_name]
    model = build_model(model_name, (c, h, w), 10)
    # As the CLI holds its data: a few thousand images. (The freed float tensor they are made
    # from raises glibc's mmap threshold, so later per-step buffers of a few MB come from the
    # heap, not from fresh mappings. With 256 images the CNN's private step took 9.5-10.1 ms
    # against 6.5-7.0 ms with 4096, non-private 4.8-7.1 against 4.5-5.0 ms: 3 alternated
    # runs each, fifteenth session.)
    data = image_layout(torch.randn(max(4096, 4 * batch), c, h, w))
    x, y = data[:batch], torch.randint(0, 10, (batch,))
    x1, y1 = data[:1], y[:1]
    engine = FastEngine(model, _per_row)
    parts: dict[str, float] = collections.defaultdict(float)
    for owner in engine._owners:  # noqa: SLF001 (instrumenting the engine's own layers)
        for method in ("sq_norms", "sums"):
            key = f"{owner.name}.{method}"
            setattr(owner, method, _timed(parts, key, getattr(owner, method)))
    grad, finish = torch.autograd.grad, engine._finish  # timed in the private case only

    def plain(xb, yb):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()

    def private(xb, yb):
        engine.clipped_sum(xb, yb, 1.0)

    cases = {
        "nonprivate": lambda: plain(x, y),
        "private": lambda: private(x, y),
        "nonprivate_1": lambda: plain(x1, y1),
        "private_1": lambda: private(x1, y1),
    }
    for fn in cases.values():  # warm-up (and the engine's first-call check)
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    split: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(repeats):
        for name, fn in cases.items():
            parts.clear()
            if name == "private":
                # The engine calls torch.autograd.grad (patched process-wide, so restored below
                # whatever happens) and its own _finish (patched on this instance only).
                torch.autograd.grad = _timed(parts, "backward+hooks", grad)
                engine._finish = _timed(parts, "after forward", finish)
            try:
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - start) / calls)
            finally:
                torch.autograd.grad = grad
                engine.__dict__.pop("_finish", None)
            if name == "private":
                total = times[name][-1] * calls
                split["forward with hooks"].append((total - parts["after forward"]) / calls)
                for key, value in parts.items():
                    split[key].append(value / calls)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    return {
        "bench": "step_parts",
        "commit": _commit(),
        "cpu": cpu_name(),
        "model": model_name,
        "batch_size": batch,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "calls": calls,
        "nonprivate_ms": round(ms["nonprivate"], 3),
        "private_ms": round(ms["private"], 3),
        "ratio": round(ms["private"] / ms["nonprivate"], 3),
        "nonprivate_1_ms": round(ms["nonprivate_1"], 3),
        "private_1_ms": round(ms["private_1"], 3),
        "private_parts_ms": {k: round(1000 * statistics.median(v), 3) for k, v in split.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn", choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append the JSON row to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row = measure(args.model, args.batch_size, args.repeats, args.calls)
    emit(row, args.out)


if __name__ == "__main__":
    main()
