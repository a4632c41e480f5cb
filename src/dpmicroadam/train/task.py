"""What a run trains on: the data splits and the model, plus the one evaluation function.

A :class:`Task` is built once per run (by :func:`default_task` for `train`, or by a feature's
``build_task`` hook). Every split, seeded initialization and evaluation in the package goes
through the functions here, so validation splits and initial weights agree across features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpmicroadam.data import load_dataset, split_validation
from dpmicroadam.mechanism import derive_seed
from dpmicroadam.models import build_model
from dpmicroadam.train.config import TrainConfig

__all__ = [
    "VAL_SPLIT_SEED",
    "Task",
    "cross_entropy_per_row",
    "default_task",
    "evaluate",
    "per_row_losses",
    "seeded_init",
    "validation_split",
]

VAL_SPLIT_SEED = (
    20240521  # one fixed validation split for every run: tuning compares like with like
)


@dataclass
class Task:
    """The splits (inputs of any shape whose first dimension indexes examples) and the model.

    Attributes:
        eval_batch_size: Examples per evaluation forward (text models need fewer).
        info: Extra fields for the run's summary (e.g. label names).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    model: nn.Module
    eval_batch_size: int = 1024
    info: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse splits whose inputs and labels disagree, or an empty training split."""
        for name in ("train", "val", "test"):
            x, y = getattr(self, f"x_{name}"), getattr(self, f"y_{name}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"the {name} split has {x.shape[0]} inputs but {y.shape[0]} labels"
                )
        if self.y_train.numel() == 0:
            raise ValueError("the training split is empty; give a dataset with training examples")
        if self.y_test.numel() == 0:
            raise ValueError("the test split is empty; give a dataset with test examples")


def cross_entropy_per_row(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def validation_split(
    x: torch.Tensor, y: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: the run's fixed validation split (0: none)."""
    return split_validation(x, y, fraction, seed=VAL_SPLIT_SEED)


@contextlib.contextmanager
def seeded_init(cfg: TrainConfig) -> Iterator[None]:
    """Seed the global RNG from the run's seed for building a model, then restore it.

    Model constructors (ours, transformers' new heads, LoRA) draw from the global RNG; this
    makes the initial weights a function of ``cfg.seed`` without touching the caller's RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        yield


def default_task(cfg: TrainConfig) -> Task:
    """`train`'s task: a dataset of ``dpmicroadam.data`` and a model of ``dpmicroadam.models``."""
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    x_tr, y_tr, x_val, y_val = validation_split(data.x_train, data.y_train, cfg.val_fraction)
    kwargs = {"width": cfg.width} if cfg.width != 1 else {}
    with seeded_init(cfg):
        model = build_model(cfg.model, tuple(data.input_shape), data.num_classes, **kwargs)
    x_test = data.x_test
    if torch.device(cfg.device).type == "cpu":
        # Our models take channels-last images (a Task of another builder is left as it is: a
        # model of its own may ``view`` its input).
        x_tr, x_val, x_test = (image_layout(x) for x in (x_tr, x_val, x_test))
    return Task(x_tr, y_tr, x_val, y_val, x_test, data.y_test, model)


def image_layout(x: torch.Tensor) -> torch.Tensor:
    """Image tensors on CPU, (N, C, H, W) or (N, K, C, H, W) augmented views, channels-last;
    other tensors as they are.

    Convolutions and pooling run in the layout of their input, and on CPU the channels-last
    kernels are the fast ones: the tanh CNN's step on 28x28 images took 5.8 ms against 11.5 ms
    (``max_pool2d`` alone 0.3 against 2 ms), the 32x32 tanh CNN's 202 against 238 ms, and
    WRN-16-4's the same (1 thread, 64 examples, non-private). The values are unchanged; only
    their order in memory is (with one channel, not even that: only the strides, which decide
    the kernels). Only on CPU: on a GPU the layout's effect was never measured here.
    """
    if x.device.type != "cpu" or x.dim() not in (4, 5) or not x.is_floating_point():
        return x
    if x.stride(-3) == 1:  # already channels-last
        return x
    *lead, c, h, w = x.shape
    out = torch.empty((*lead, h, w, c), dtype=x.dtype, device=x.device).movedim(-1, -3)
    return out.copy_(x)


@torch.no_grad()
def per_row_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, correct)`` per example, in eval mode, ``batch_size`` examples per forward."""
    was_training = model.training
    model.eval()
    losses, correct = [], []
    try:
        for start in range(0, int(y.numel()), batch_size):
            out = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            losses.append(cross_entropy_per_row(out, target).double())
            correct.append(out.argmax(1) == target)
    finally:
        model.train(was_training)
    if not losses:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(losses), torch.cat(correct)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """(accuracy, mean loss) on ``(x, y)``; NaN for an empty split."""
    if y.numel() == 0:
        return float("nan"), float("nan")
    losses, correct = per_row_losses(model, x, y, batch_size)
    return float(correct.double().mean()), float(losses.mean())
