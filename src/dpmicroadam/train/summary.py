"""The summary of a finished run (``summary.json``, ``--json``)."""

from __future__ import annotations

import math
import resource
from typing import TYPE_CHECKING, Any

import torch

from dpmicroadam.optim import state_bytes

if TYPE_CHECKING:  # pragma: no cover
    from dpmicroadam.train.run import Run

__all__ = ["peak_memory_mb", "run_summary"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA's max allocated, or the max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _noise_seed(run: Run) -> int | str | None:
    if run.mechanism is None:
        return None
    return "secret (OS entropy)" if run.mechanism.seed_is_secret else run.cfg.noise_seed


def guarantee(run: Run) -> str:
    """What ε means for this run and what must stay secret for it to hold."""
    mech, cfg = run.mechanism, run.cfg
    if mech is None:
        return "not private (a non-private optimizer)"
    if mech.noise_multiplier == 0:
        return "not private: σ = 0 adds no noise (ε is infinite)"
    secret = "the training data and the checkpoint (noise and sampling state)"
    if not mech.seed_is_secret:
        secret += f" and --noise-seed {cfg.noise_seed}"
    text = (
        f"(ε, δ)-DP for one training example (added or removed, with all its augmented views), "
        f"as long as {secret} stay secret; the model weights, summary and config may be published"
    )
    if cfg.normalize == "realized":
        text += (
            ". NOT covered: --normalize realized divides by the realized batch size, which the "
            "accountant does not analyse; ε is that of the expected-batch mechanism"
        )
    return text


def run_summary(run: Run, last: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy, ε spent with how it was accounted, the settings, memory and time."""
    cfg, mech = run.cfg, run.mechanism
    eps = mech.epsilon() if mech else None
    n_params = sum(p.numel() for p in run.params)
    opt_bytes = state_bytes(run.optimizer)
    return {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "optimizer": cfg.optimizer,
        "private": mech is not None and mech.noise_multiplier > 0,
        "guarantee": guarantee(run),
        "test_accuracy": last.get("test_accuracy"),
        "val_accuracy": last.get("val_accuracy"),
        "epsilon": eps if eps is not None and math.isfinite(eps) else None,
        "target_epsilon": cfg.epsilon if mech else None,
        "delta": cfg.delta if mech else None,
        "accountant": cfg.accountant if mech else None,
        # the per-example gradient engine actually used (--engine auto resolves here)
        "engine": mech.engine.kind if mech else None,
        "noise_multiplier": mech.noise_multiplier if mech else None,
        "sample_rate": mech.sample_rate if mech else cfg.batch_size / run.n,
        "batch_size": cfg.batch_size,
        "steps": run.total_steps,
        "epochs": run.total_steps * cfg.batch_size / run.n,
        "clip_norm": cfg.clip_norm if mech else None,
        "lr": cfg.lr,
        "lr_schedule": cfg.lr_schedule,
        "momentum": cfg.momentum,
        "density": cfg.density,
        "window_size": cfg.window_size,
        "augmult": cfg.augmult,
        "ema": cfg.ema,
        "seed": cfg.seed,
        "noise_seed": _noise_seed(run),
        "train_size": run.n,
        "val_size": int(run.y_val.numel()),
        "test_size": int(run.y_test.numel()),
        "parameters": n_params,
        "optimizer_state_bytes_per_param": opt_bytes / max(1, n_params),
        "optimizer_state_bytes": opt_bytes,
        # measured in this process: after a resume, over the steps run since
        "seconds_per_step": run.step_seconds / run.steps_timed if run.steps_timed else None,
        "peak_memory_mb": peak_memory_mb(run.device),
        "wall_seconds": round(run.state.wall_seconds, 2),
        "defaults_source": cfg.defaults_source,
        "out": str(run.out),
        "world_size": run.dist.world_size,
        **run.task.info,
    }
