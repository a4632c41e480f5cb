"""Time and peak memory of one logical step of the CIFAR-10 WRN-16-4 recipe.

Runs the recipe's exact private step (Poisson batch → augmult views → per-example clipping in
physical batches → noise → DP-MicroAdam → EMA) on random 32×32 images, and projects the cost of
the full run (the recipe's batch and steps) from the measured per-example time.

CPU, reduced batch:   python benchmarks/cifar10_step.py --batch-size 32 --augmult 16
GPU, full recipe:     python benchmarks/gpu_cifar10_step.py      (same code, --device cuda)

Prints one JSON line per measured configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from dpmicroadam import DPConfig, DPMechanism, MicroAdam
from dpmicroadam.data import augment_views
from dpmicroadam.models import build_model
from dpmicroadam.train.config import load_toml, recipe_path
from dpmicroadam.train.ema import EMA


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(
    device: str, batch_size: int, augmult: int, physical: int, repeats: int, engine: str
) -> dict:
    recipe = load_toml(recipe_path("cifar10-wrn16-4"))
    n = 49_000  # CIFAR-10 training images after the recipe's 2 % validation split
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model("wrn16-4", (3, 32, 32), 10).to(dev)
    mech = DPMechanism(
        DPConfig(
            dataset_size=n,
            expected_batch_size=float(batch_size),
            clip_norm=1.0,
            target_delta=1e-5,
            noise_multiplier=3.0,
            augmult=augmult,
            physical_batch_size=physical,
            seed=0,
            engine=engine,
        ),
        model,
        lambda out, y: F.cross_entropy(out, y, reduction="none"),
    )
    opt = MicroAdam(model.parameters(), lr=recipe["lr"])
    ema = EMA([p for p in model.parameters()], 0.999)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.rand(n, 3, 32, 32)
    y_all = torch.randint(0, 10, (n,))
    times, sizes = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        idx = mech.sample()
        x = augment_views(x_all[idx], augmult, gen, pad=4, flip=True).to(dev)
        mech.privatize(x, y_all[idx].to(dev))
        opt.step()
        ema.update()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:  # the first step warms up kernels and allocators
            times.append(time.perf_counter() - t0)
            sizes.append(int(idx.numel()))
    step_s = statistics.median(times)
    per_example_s = sum(times) / max(1, sum(sizes))
    full_b, full_steps = recipe["batch_size"], recipe["steps"]
    peak = (
        torch.cuda.max_memory_allocated(dev)
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "commit": commit(),
        "torch": torch.__version__,
        "device": str(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "engine": type(mech.engine).__name__,
        "batch_size": batch_size,
        "augmult": augmult,
        "physical_batch_size": physical,
        "median_step_s": round(step_s, 4),
        "per_example_ms": round(1e3 * per_example_s, 3),
        "peak_memory_mb": round(peak / 2**20, 1),
        "memory_kind": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "max RSS",
        "projected_full_step_s": round(per_example_s * full_b, 2),
        "projected_full_run_h": round(per_example_s * full_b * full_steps / 3600, 2),
        "full_recipe": {"batch_size": full_b, "augmult": recipe["augmult"], "steps": full_steps},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augmult", type=int, default=16)
    ap.add_argument("--physical-batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args()
    print(
        json.dumps(
            measure(
                args.device,
                args.batch_size,
                args.augmult,
                args.physical_batch_size,
                args.repeats,
                args.engine,
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
