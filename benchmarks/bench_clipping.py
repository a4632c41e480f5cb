"""Step time and peak memory of per-example clipping engines against non-private training.

For each model, at one physical batch, times one optimizer step of:

* ``nonprivate``: forward, mean loss, backward, SGD step;
* ``fast``: ``dpmicroadam.privacy.fast.FastEngine`` clipped sum + Gaussian noise + SGD step;
* ``vmap``: ``dpmicroadam.privacy.per_example.VmapEngine`` (torch.func), same release;
* ``opacus_hooks``: Opacus ``GradSampleModule`` + ``DPOptimizer`` (per-sample gradients);
* ``opacus_ghost``: Opacus ``GradSampleModuleFastGradientClipping`` (ghost clipping).

Timing: all engines of one model live in one process and are timed round-robin (one step each
per round, after a warm-up step), so machine load drifts hit them alike; the median over rounds
is reported, with the ratio to the non-private median of the same run.
Memory: each (model, engine) runs again in a fresh subprocess (glibc told to serve blocks of
64 KiB or more by mmap, so freed tensors leave the resident set); ``peak_mb`` is the peak
resident set size during three steps minus the resident size just before the first step (model,
data and optimizer already built): what the step itself allocates at its peak.

Prints one JSON line per (model, engine). Usage::

    python benchmarks/bench_clipping.py                      # all models, all engines
    python benchmarks/bench_clipping.py --models mlp cnn --engines nonprivate fast
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# glibc keeps freed heap blocks in the process and, by default, raises its mmap threshold after
# the first large free; resident size then tracks the allocator's history rather than the live
# tensors. Serving every block >= 64 KiB by mmap makes freed tensors leave the resident set.
MEMORY_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
ENGINES = ("nonprivate", "fast", "vmap", "opacus_hooks", "opacus_ghost")
MODELS = ("mlp", "cnn", "wrn16-4", "transformer")
CLIP_NORM, NOISE = 1.0, 1.0


class SelfAttention(nn.Module):
    """Multi-head self-attention from Linear layers (which every engine here supports)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer encoder layer."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.fc1, self.fc2 = (
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.Linear(hidden, dim),
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    """Token + position embeddings, 2 encoder layers, mean pooling, linear head."""

    def __init__(self, vocab=1000, seq=64, dim=128, heads=4, hidden=256, layers=2, classes=10):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device).expand_as(x).contiguous()
        h = self.tokens(x) + self.positions(pos)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


def build(name: str, batch: int, seed: int = 0):
    """(model, inputs, targets) for one benchmark model."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "transformer":
        model = Transformer()
        x = torch.randint(0, 1000, (batch, 64), generator=g)
    else:
        from dpmicroadam.models import build_model

        shape = (3, 32, 32) if name == "wrn16-4" else (1, 28, 28)
        kwargs = {"hidden_sizes": (512, 512)} if name == "mlp" else {}
        model = build_model(name, shape, 10, **kwargs)
        x = torch.randn((batch, *shape), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, x, y


def per_row_ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def make_step(engine: str, model: nn.Module, x, y):
    """A closure running one optimizer step of ``engine`` on (x, y)."""
    batch = x.shape[0]
    if engine == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            per_row_ce(model(x), y).mean().backward()
            opt.step()

        return step
    if engine in ("fast", "vmap"):
        if engine == "fast":
            from dpmicroadam.privacy.fast import FastEngine as Engine
        else:
            from dpmicroadam.privacy.per_example import VmapEngine as Engine
        clip = Engine(model, per_row_ce)
        opt = torch.optim.SGD(clip.params, lr=0.01)
        gen = torch.Generator().manual_seed(1)

        def step():
            sums, _ = clip.clipped_sum(x, y, CLIP_NORM)
            for p, s in zip(clip.params, sums):
                noise = torch.randn(s.shape, generator=gen, dtype=s.dtype)
                p.grad = s.add_(noise, alpha=NOISE * CLIP_NORM).div_(batch)
            opt.step()

        return step
    if engine == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=0.01),
            noise_multiplier=NOISE,
            max_grad_norm=CLIP_NORM,
            expected_batch_size=batch,
        )

        def step():
            opt.zero_grad(set_to_none=True)
            per_row_ce(gsm(x), y).mean().backward()
            opt.step()

        return step
    if engine == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=CLIP_NORM,
            use_ghost_clipping=True,
        )  # fmt: skip
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=NOISE,
            max_grad_norm=CLIP_NORM, expected_batch_size=batch, loss_reduction="mean",
        )  # fmt: skip
        loss_fn = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), "mean")

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(gsm(x), y).backward()
            opt.step()

        return step
    raise ValueError(f"engine={engine!r}: choose from {ENGINES}")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(name: str, engine: str, batch: int, steps: int = 3) -> dict:
    """Run in a fresh process: peak RSS growth over ``steps`` steps (Linux only).

    The kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5, Linux >= 4.0) once the
    model, data and optimizer are built, so the peak (VmHWM) covers the steps only; ru_maxrss
    cannot be used because a child inherits its parent's mark across exec.
    """
    model, x, y = build(name, batch)
    step = make_step(engine, model, x, y)
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(steps):
        step()
    peak = _status_mb("VmHWM")
    return {"peak_rss_mb": round(peak, 1), "peak_mb": round(peak - before, 1)}


def time_model(name: str, engines: list[str], batch: int, rounds: int) -> dict[str, list[float]]:
    """Round-robin step times (seconds) of every engine on copies of one model."""
    model, x, y = build(name, batch)
    steps = {}
    for engine in engines:
        try:
            step = make_step(engine, copy.deepcopy(model), x, y)
            step()  # warm-up
            steps[engine] = step
        except Exception as err:  # an engine that cannot run this model is reported, not fatal
            print(
                json.dumps({"model": name, "engine": engine, "error": repr(err)[:300]}), flush=True
            )
    times: dict[str, list[float]] = {e: [] for e in steps}
    for _ in range(rounds):
        for engine, step in steps.items():
            start = time.perf_counter()
            step()
            times[engine].append(time.perf_counter() - start)
    return times


def noise_time(name: str, batch: int, reps: int = 5) -> float:
    """Seconds to draw one Gaussian sample per parameter: the floor any DP release pays."""
    model, _, _ = build(name, batch)
    gen = torch.Generator().manual_seed(2)
    shapes = [p.shape for p in model.parameters()]
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for shape in shapes:
            torch.randn(shape, generator=gen)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--batch", type=int, default=64, help="physical batch size")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per engine")
    parser.add_argument("--wrn-rounds", type=int, default=3, help="timed steps on wrn16-4")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory:
        print(json.dumps(measure_memory(args._memory[0], args._memory[1], args.batch)))
        return
    meta = {
        "commit": _commit(),
        "torch": torch.__version__,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "batch": args.batch,
    }
    for name in args.models:
        rounds = args.wrn_rounds if name == "wrn16-4" else args.rounds
        times = time_model(name, args.engines, args.batch, rounds)
        base = statistics.median(times["nonprivate"]) if times.get("nonprivate") else math.nan
        noise = noise_time(name, args.batch)
        meta["noise_ms"] = round(1000 * noise, 2)
        base_mem = None
        for engine, values in times.items():
            median = statistics.median(values)
            row = {
                "model": name,
                "engine": engine,
                **meta,
                "rounds": rounds,
                "median_ms": round(1000 * median, 2),
                "ratio": round(median / base, 3),
                "ratio_ex_noise": round(
                    (median - (0 if engine == "nonprivate" else noise)) / base, 3
                ),
                "samples_per_s": round(args.batch / median, 1),
            }
            if not args.no_memory:
                cmd = [
                    sys.executable,
                    __file__,
                    "--_memory",
                    name,
                    engine,
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, env=MEMORY_ENV)
                if out.returncode == 0:
                    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                    if engine == "nonprivate":
                        base_mem = row["peak_mb"]
                    if base_mem:
                        row["memory_ratio"] = round(row["peak_mb"] / base_mem, 2)
                else:
                    row["memory_error"] = out.stderr.strip().splitlines()[-1][:300]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
