"""Private fine-tuning of pretrained models on top of the run API of ``dpmicroadam.train``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpmicroadam.finetune.config import FINETUNE_DEFAULTS, FinetuneConfig, resolve_finetune_config
from dpmicroadam.finetune.task import FinetuneHooks, timm_model
from dpmicroadam.train import Run

__all__ = [
    "FINETUNE_DEFAULTS",
    "FinetuneConfig",
    "FinetuneHooks",
    "finetune",
    "finetune_run",
    "finetune_vision",
    "resolve_finetune_config",
    "timm_model",
]


def finetune_run(
    cfg: FinetuneConfig,
    *,
    model: nn.Module | None = None,
    data: tuple[torch.Tensor, ...] | None = None,
) -> Run:
    """A :class:`~dpmicroadam.train.Run` of a fine-tuning config (call ``fit()`` on it)."""
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(
            f"cfg must be a FinetuneConfig (from resolve_finetune_config), got {type(cfg).__name__}"
        )
    return Run(cfg, FinetuneHooks(model=model, data=data))


def finetune(**kw: Any) -> dict[str, Any]:
    """Fine-tune a pretrained model privately and return the run's summary.

    Keywords are :class:`FinetuneConfig` fields (the flags of `dpmicroadam finetune` with
    underscores), e.g. ``finetune(model_path="path/to/minilm", train_file="train.csv",
    trainable="bias", epsilon=8)`` or ``finetune(dataset="wordnet-nouns",
    model_path="all-MiniLM-L6-v2", trainable="head")``.
    """
    return finetune_run(resolve_finetune_config(kw)).fit()


def finetune_vision(
    model: nn.Module,
    dataset: str | tuple[torch.Tensor, ...] = "digits",
    **kw: Any,
) -> dict[str, Any]:
    """Fine-tune any image model privately on a dataset of `train` or on given tensors.

    Args:
        model: The module (trained in place). BatchNorm is refused for private optimizers:
            convert it with ``dpmicroadam.models.replace_batchnorm(model)`` first.
        dataset: A dataset name of `train` (``digits``, ``cifar10``, ...), or
            ``(x_train, y_train, x_test, y_test)`` tensors.
        **kw: :class:`FinetuneConfig` fields (``trainable``, ``head``, ``epsilon``, ...).

    Returns:
        The summary (also in ``<out>/summary.json``).
    """
    if isinstance(dataset, str):
        cfg = resolve_finetune_config({**kw, "dataset": dataset})
        return finetune_run(cfg, model=model).fit()
    if not (isinstance(dataset, tuple) and len(dataset) == 4):
        raise TypeError(
            "dataset must be a dataset name or a tuple (x_train, y_train, x_test, y_test), got "
            f"{type(dataset).__name__}"
        )
    cfg = resolve_finetune_config(kw, dataset_label="custom")
    return finetune_run(cfg, model=model, data=dataset).fit()
