"""Build the optimizer and learning-rate schedule of a run from its config."""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

from dpmicroadam import optim
from dpmicroadam.train.config import TrainConfig


def param_groups(
    params: list[nn.Parameter], cfg: TrainConfig, head: list[nn.Parameter] | None = None
) -> list[dict]:
    """MicroAdam's parameter groups: the default density, ``density_head`` on the classification
    head (``head``), ``density_1d`` on the other 1-D tensors (biases, norm gains).

    Every other optimizer gets one group. Small tensors cost little state, so a denser update
    there is cheap (SPEC §1, "Small tensors"); the paper's setting is both left unset.
    """
    if cfg.optimizer not in ("dp-microadam", "microadam"):
        return [{"params": params}]
    head_ids = {id(p) for p in head or []} if cfg.density_head is not None else set()
    in_head = [p for p in params if id(p) in head_ids]
    rest = [p for p in params if id(p) not in head_ids]
    flat = [p for p in rest if p.ndim < 2] if cfg.density_1d is not None else []
    multi = [p for p in rest if not any(p is q for q in flat)]
    groups: list[dict] = [{"params": multi}] if multi else []
    if flat:
        groups.append({"params": flat, "density": cfg.density_1d})
    if in_head:
        groups.append({"params": in_head, "density": cfg.density_head})
    return groups


def prepare_fused() -> None:
    """Builds (or loads) MicroAdam's fused C++ step now rather than in the first step, saying
    so on stderr when that takes a while (a build: ~16 s, once per machine). Where it cannot be
    built, MicroAdam has warned once and runs its vectorized step."""
    from dpmicroadam.optim import fused

    start = time.perf_counter()
    built = fused.available()
    seconds = time.perf_counter() - start
    if built and seconds > 1:
        print(
            f"note: built MicroAdam's fused C++ step in {seconds:.0f} s "
            "(once per machine and torch installation)",
            file=sys.stderr,
        )


def build_optimizer(
    params: list[nn.Parameter],
    cfg: TrainConfig,
    noise_std: float = 0.0,
    head: list[nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer``; the dp- ones step on the released gradient.

    Args:
        params: Trainable parameters.
        cfg: Run config.
        noise_std: σC/B, the std of the noise in the released gradient (used by DP-AdamBC only).
        head: The classification head's parameters (for ``density_head``).
    """
    groups = param_groups(params, cfg, head)
    name = cfg.optimizer
    eps = adam_eps(cfg, noise_std)
    if name in ("dp-microadam", "microadam"):
        if cfg.microadam_implementation == "fused" and any(p.device.type == "cpu" for p in params):
            prepare_fused()
        return optim.MicroAdam(
            groups,
            lr=cfg.lr,
            eps=eps,
            weight_decay=cfg.weight_decay,
            window_size=cfg.window_size,
            density=cfg.density,
            ef_bits=cfg.ef_bits,
            ef_rounding=cfg.ef_rounding,
            rounding_seed=cfg.seed,
            topk_block_size=None if cfg.topk_block == "whole" else "auto",
            value_dtype=getattr(torch, cfg.microadam_values),
            implementation=cfg.microadam_implementation,
        )
    if name in ("dp-adam", "adam"):
        return torch.optim.AdamW(groups, lr=cfg.lr, eps=eps, weight_decay=cfg.weight_decay)
    if name in ("dp-sgd", "sgd"):
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum or 0.0, weight_decay=cfg.weight_decay
        )
    if name == "dp-adambc":
        return optim.AdamBC(
            groups,
            lr=cfg.lr,
            gamma=cfg.adambc_gamma,
            noise_std=noise_std,
            weight_decay=cfg.weight_decay,
        )
    raise ValueError(f"unknown optimizer {name!r}")  # pragma: no cover - validated in config


DEFAULT_EPS = 1e-8


def adam_eps(cfg: TrainConfig, noise_std: float) -> float:
    """Adam's eps: ``adam_eps_noise · σC/B`` when asked (0: the default), else ``adam_eps``."""
    if cfg.adam_eps_noise is not None:
        return cfg.adam_eps_noise * noise_std if cfg.adam_eps_noise > 0 else DEFAULT_EPS
    return cfg.adam_eps if cfg.adam_eps is not None else DEFAULT_EPS


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """constant, cosine (to 0 at the last step) or warmup-cosine (linear warm-up, then cosine)."""
    warmup = int(cfg.warmup_fraction * total_steps) if cfg.lr_schedule == "warmup-cosine" else 0

    def factor(step: int) -> float:
        if cfg.lr_schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
