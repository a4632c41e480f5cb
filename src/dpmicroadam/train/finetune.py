"""Private fine-tuning of pretrained models: text classifiers (transformers) and vision models.

The same loop as `dpmicroadam train` (Poisson sampling, per-example clipping, noise, accounting,
checkpoints, metrics, plots, ``summary.json``): :class:`FinetuneTrainer` only overrides
``build_task`` to supply the data and the pretrained model.

- Text: a CSV / JSON-lines file is read (``dpmicroadam.data.text``), tokenized once to a fixed
  length into an int64 tensor (N, 2|3, L), and a ``transformers`` sequence classifier
  (``dpmicroadam.models.hf``) is trained on it. The label mapping is saved to
  ``<out>/labels.json``.
- Vision: any ``nn.Module`` (``finetune_vision``), or a timm model by name when timm is
  installed, on the image datasets of `train`. BatchNorm is refused (see
  ``dpmicroadam.models.replace_batchnorm``).

Which parameters train (``trainable``: all, bias, head, lora) depends on the architecture only, so
it spends no budget. The test split is a file, or a held-out part of the training file drawn with
a fixed seed; the validation split is carved from the rest as in `train`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpmicroadam.data import load_dataset, split_validation
from dpmicroadam.data.text import encode_texts, load_text_table
from dpmicroadam.data.wordnet import WORDNET_DATASETS, load_wordnet
from dpmicroadam.mechanism import derive_seed
from dpmicroadam.models.hf import load_hf_classifier, load_hf_tokenizer
from dpmicroadam.models.trainable import (
    TRAINABLE_MODES,
    head_module,
    select_trainable,
    trainable_count,
)
from dpmicroadam.privacy import check_per_example_safe
from dpmicroadam.train.config import TrainConfig, load_toml, resolve_config
from dpmicroadam.train.loop import VAL_SPLIT_SEED, Trainer

__all__ = [
    "FINETUNE_DEFAULTS",
    "FinetuneConfig",
    "FinetuneTrainer",
    "finetune",
    "finetune_vision",
    "resolve_finetune_config",
]

SUBSET_SEED = 20241203  # --train-subset keeps the same examples in every run
TEST_SPLIT_SEED = 20240607  # the held-out test part of a training file is the same for every run
EVAL_CHUNK = 64  # examples per evaluation forward (transformer activations grow with L²)

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


@dataclass
class FinetuneConfig(TrainConfig):
    """`dpmicroadam train`'s settings plus what fine-tuning needs (flags with dashes)."""

    model_path: str | None = None
    train_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    labels: list[str] | None = None
    trainable: str = "all"
    head: list[str] | None = None
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: float | None = None
    test_fraction: float = 0.2
    attn_implementation: str = "eager"
    timm_model: str | None = None
    timm_pretrained: bool = True
    train_subset: int | None = None
    cache_features: bool | None = None
    cache_dir: str | None = None

    @property
    def task(self) -> str:
        if self.train_file is not None or self.dataset in WORDNET_DATASETS:
            return "text"
        return "vision"


_FT_FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)} - {
    f.name for f in dataclasses.fields(TrainConfig)
}


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
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given.get("recipe"):
        raise ValueError(
            f"recipe={given['recipe']!r}: the shipped recipes are for `train`; fine-tuning takes "
            "its settings from flags or a --config TOML file"
        )
    layered: dict[str, Any] = {}
    if given.get("config"):
        raw = load_toml(given["config"])
        if isinstance(raw.get("finetune"), dict):  # a [finetune] table, else top-level keys
            raw = {k.replace("-", "_"): v for k, v in raw["finetune"].items()}
        layered.update(raw)
    layered.update(given)
    ft = {k: layered.pop(k) for k in list(layered) if k in _FT_FIELDS}
    layered.pop("config", None)
    text = ft.get("train_file") is not None or layered.get("dataset") in WORDNET_DATASETS
    if text and layered.get("augmult", 1) != 1:
        raise ValueError(
            f"augmult={layered['augmult']!r}: text fine-tuning has no augmentations; use 1"
        )
    dataset = layered.get("dataset", "digits")
    user_set = set(layered)
    for key, value in FINETUNE_DEFAULTS.items():
        layered.setdefault(key, value)
    # Validate the shared fields with `train`'s resolver; its dataset and model names are
    # placeholders here (text data and pretrained models are not in its lists).
    placeholder = "digits" if text or dataset_label is not None else dataset
    base = resolve_config({**layered, "dataset": placeholder, "model": "mlp"})
    values = {k: v for k, v in dataclasses.asdict(base).items() if k != "defaults_source"}
    train_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key, source in base.defaults_source.items():
        if source != "built-in default":  # tuned for `train`'s models, not for fine-tuning
            values[key] = train_defaults[key]
    cfg = FinetuneConfig(**values, **ft)
    cfg.config = given.get("config")
    cfg.defaults_source = {
        k: "built-in fine-tuning default" for k in FINETUNE_DEFAULTS if k not in user_set
    }
    if cfg.train_file is not None:
        cfg.dataset = f"text:{Path(cfg.train_file).name}"
    elif text:
        cfg.dataset = dataset
    elif dataset_label is not None:
        cfg.dataset = dataset_label
    cfg.model = _model_label(cfg)
    _validate(cfg)
    return cfg


def _model_label(cfg: FinetuneConfig) -> str:
    if cfg.model_path is not None:
        return Path(str(cfg.model_path)).name or str(cfg.model_path)
    if cfg.timm_model is not None:
        return f"timm:{cfg.timm_model}"
    return "custom"


def _validate(cfg: FinetuneConfig) -> None:
    if cfg.trainable not in TRAINABLE_MODES:
        raise ValueError(
            f"--trainable {cfg.trainable!r} is unknown; choose one of {', '.join(TRAINABLE_MODES)}"
        )
    if (
        isinstance(cfg.max_length, bool)
        or not isinstance(cfg.max_length, int)
        or cfg.max_length < 2
    ):
        raise ValueError(f"--max-length must be an int >= 2, got {cfg.max_length!r}")
    if not isinstance(cfg.lora_r, int) or cfg.lora_r < 1:
        raise ValueError(f"--lora-r must be an int >= 1, got {cfg.lora_r!r}")
    if not 0 < cfg.test_fraction < 1:
        raise ValueError(f"--test-fraction must be in (0, 1), got {cfg.test_fraction!r}")
    if cfg.attn_implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"--attn-implementation {cfg.attn_implementation!r}: use 'eager' or 'sdpa' (both "
            "trace under vmap with the prepared 4-D mask)"
        )
    if cfg.task == "text" and cfg.model_path is None:
        raise ValueError("text fine-tuning needs --model-path (a local folder or a hub name)")
    if cfg.train_subset is not None and (
        isinstance(cfg.train_subset, bool)
        or not isinstance(cfg.train_subset, int)
        or cfg.train_subset < 2
    ):
        raise ValueError(f"--train-subset must be an int >= 2, got {cfg.train_subset!r}")
    if cfg.cache_features and cfg.trainable != "head":
        raise ValueError(
            f"--cache-features needs --trainable head (got {cfg.trainable!r}): only a frozen "
            "backbone's features are a fixed function of each example"
        )
    if cfg.train_file is not None and cfg.dataset in WORDNET_DATASETS:
        raise ValueError("give either --train FILE or --dataset wordnet-*, not both")
    if cfg.task == "text" and cfg.timm_model is not None:
        raise ValueError("--timm-model is for image datasets; drop --train or --timm-model")
    if cfg.test_file is not None and cfg.task != "text":
        raise ValueError("--test FILE needs --train FILE (text fine-tuning)")


class FinetuneTrainer(Trainer):
    """The `train` loop on a pretrained model.

    Args:
        cfg: A resolved :class:`FinetuneConfig`.
        model: For vision runs from Python: the module to fine-tune (trained in place).
        data: For vision runs from Python: ``(x_train, y_train, x_test, y_test)`` tensors
            (default: ``cfg.dataset`` through ``load_dataset``).
        stop_after: Tests only: stop as if killed after this many steps.
    """

    def __init__(
        self,
        cfg: FinetuneConfig,
        *,
        model: nn.Module | None = None,
        data: tuple[torch.Tensor, ...] | None = None,
        stop_after: int | None = None,
    ) -> None:
        if not isinstance(cfg, FinetuneConfig):
            raise TypeError(
                f"cfg must be a FinetuneConfig (from resolve_finetune_config), got {type(cfg).__name__}"
            )
        self._given_model = model
        self._given_data = data
        self.label_names: list[str] | None = None
        self.total_parameters: int | None = None
        self.feature_cache: str | None = None
        super().__init__(cfg, stop_after=stop_after)

    # ------------------------------------------------------------------ task
    def build_task(self) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        if self.cfg.task == "text":
            return self._text_task()
        return self._vision_task()

    def _text_task(self) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        cfg = self.cfg
        tokenizer = load_hf_tokenizer(cfg.model_path)
        if cfg.dataset in WORDNET_DATASETS:
            train_wn, test_wn = load_wordnet(cfg.dataset, cfg.data_dir)
            self.label_names = train_wn.label_names
            x = encode_texts(tokenizer, train_wn.texts, None, cfg.max_length)
            x_test = encode_texts(tokenizer, test_wn.texts, None, cfg.max_length)
            y, y_test = train_wn.labels, test_wn.labels
            return self._text_model(x, y, x_test, y_test)
        cols = dict(
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            text_pair_column=cfg.text_pair_column,
        )
        train = load_text_table(cfg.train_file, labels=cfg.labels, **cols)
        self.label_names = train.label_names
        x = encode_texts(tokenizer, train.texts, train.pairs, cfg.max_length)
        y = train.labels
        if cfg.test_file is not None:
            test = load_text_table(cfg.test_file, labels=train.label_names, **cols)
            x_test = encode_texts(tokenizer, test.texts, test.pairs, cfg.max_length)
            y_test = test.labels
        else:
            x, y, x_test, y_test = split_validation(x, y, cfg.test_fraction, seed=TEST_SPLIT_SEED)
        return self._text_model(x, y, x_test, y_test)

    def _text_model(
        self, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        cfg = self.cfg
        x_tr, y_tr, x_val, y_val = self._val_split(x, y)
        x_tr, y_tr = self._subset(x_tr, y_tr)
        self._save_labels()
        with torch.random.fork_rng(devices=[]):
            # The new head (and LoRA's A matrices) are drawn from the global RNG: seed it from
            # the run's seed, without touching the caller's RNG state.
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            model = load_hf_classifier(
                cfg.model_path,
                len(self.label_names or []),
                attn_implementation=cfg.attn_implementation,
                label_names=self.label_names,
            )
            model = self._select(model)
        splits = (x_tr, y_tr, x_val, y_val, x_test, y_test)
        if self._use_feature_cache(model):
            return self._cached_head_task(model, splits)
        return splits, model

    def _subset(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``train_subset`` examples of a fixed permutation (public, data-independent)."""
        n = self.cfg.train_subset
        if n is None or n >= y.numel():
            return x, y
        perm = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(SUBSET_SEED))
        keep = perm[:n].sort().values
        return x[keep], y[keep]

    def _use_feature_cache(self, model: nn.Module) -> bool:
        cfg = self.cfg
        if cfg.trainable != "head" or cfg.cache_features is False:
            return False
        found = head_module(model)
        if found is None and cfg.cache_features:
            raise ValueError(
                "--cache-features: the head of this model is not one module called once; "
                "drop --cache-features"
            )
        return found is not None

    def _cached_head_task(
        self, model: nn.Module, splits: tuple[torch.Tensor, ...]
    ) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        """Frozen-backbone features of every split, and the head alone as the model to train."""
        from dpmicroadam.train.features import cached_features

        name, head = head_module(model)
        cache_dir = Path(self.cfg.cache_dir) if self.cfg.cache_dir else None
        xs = [
            cached_features(model, name, x, cache_dir, desc=part)
            for x, part in zip(splits[0::2], ("train", "val", "test"), strict=True)
        ]
        self.total_parameters = sum(p.numel() for p in model.parameters())
        self.feature_cache = name
        return (xs[0], splits[1], xs[1], splits[3], xs[2], splits[5]), head

    def _vision_task(self) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        cfg = self.cfg
        if self._given_data is not None:
            x, y, x_test, y_test = self._given_data
            num_classes = int(max(int(y.max()), int(y_test.max())) + 1)
        else:
            data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
            x, y, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
            num_classes = data.num_classes
        x_tr, y_tr, x_val, y_val = self._val_split(x, y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            model = self._given_model
            if model is None:
                model = timm_model(cfg.timm_model, num_classes, pretrained=cfg.timm_pretrained)
            if cfg.private:
                check_per_example_safe(model)
            model = self._select(model)
        return (x_tr, y_tr, x_val, y_val, x_test, y_test), model

    def _val_split(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.cfg.val_fraction == 0:
            return x, y, x[:0], y[:0]
        return split_validation(x, y, self.cfg.val_fraction, seed=VAL_SPLIT_SEED)

    def _select(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        return select_trainable(
            model, cfg.trainable, head=cfg.head, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha
        )

    def _save_labels(self) -> None:
        cfg = self.cfg
        record = {
            "label_column": cfg.label_column,
            "labels": self.label_names,
            "mapping": {name: i for i, name in enumerate(self.label_names or [])},
            "source": "given (--labels)"
            if cfg.labels is not None
            else "the distinct values of the training file (the label set is treated as public)",
        }
        (self.out / "labels.json").write_text(json.dumps(record, indent=2))

    # ------------------------------------------------------------------ eval, report
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(accuracy, mean loss), in chunks of ``EVAL_CHUNK`` examples to bound memory."""
        n = int(y.numel())
        if n <= EVAL_CHUNK:
            return super().evaluate(x, y)
        correct, loss = 0.0, 0.0
        for start in range(0, n, EVAL_CHUNK):
            xs, ys = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
            acc, mean_loss = super().evaluate(xs, ys)
            correct += acc * ys.numel()
            loss += mean_loss * ys.numel()
        return correct / n, loss / n

    def _summary(self, last: dict[str, Any], wall: float) -> dict[str, Any]:
        summary = super()._summary(last, wall)
        trained, total = trainable_count(self.model)
        cfg = self.cfg
        summary.update(
            task=cfg.task,
            trainable=cfg.trainable,
            trainable_parameters=trained,
            total_parameters=self.total_parameters or total,
            feature_cache=self.feature_cache,
            train_subset=cfg.train_subset,
            model_path=cfg.model_path,
            timm_model=cfg.timm_model,
        )
        if cfg.task == "text":
            summary.update(
                labels=self.label_names,
                max_length=cfg.max_length,
                attn_implementation=cfg.attn_implementation,
                train_file=cfg.train_file,
                test_file=cfg.test_file,
            )
        if cfg.trainable == "lora":
            summary["lora_r"] = cfg.lora_r
        return summary


def timm_model(name: str | None, num_classes: int, pretrained: bool = True) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head (timm is an optional extra).

    Raises:
        ValueError: If ``name`` is None.
        ImportError: If timm is not installed (it also pulls torchvision).
    """
    if name is None:
        raise ValueError(
            "vision fine-tuning needs a model: pass model= to finetune_vision, or --timm-model NAME"
        )
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"--timm-model {name!r} needs the optional 'timm' package (pip install timm; it pulls "
            "torchvision, which must match your torch build). From Python, pass any nn.Module "
            "to dpmicroadam.train.finetune.finetune_vision instead"
        ) from err
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)


def finetune(**kw: Any) -> dict[str, Any]:
    """Fine-tune a pretrained model privately and return the run's summary.

    Keywords are :class:`FinetuneConfig` fields (the flags of `dpmicroadam finetune` with
    underscores), e.g. ``finetune(model_path="path/to/minilm", train_file="train.csv",
    trainable="bias", epsilon=8)``.
    """
    return FinetuneTrainer(resolve_finetune_config(kw)).run()


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
        return FinetuneTrainer(cfg, model=model).run()
    if not (isinstance(dataset, tuple) and len(dataset) == 4):
        raise TypeError(
            "dataset must be a dataset name or a tuple (x_train, y_train, x_test, y_test), got "
            f"{type(dataset).__name__}"
        )
    cfg = resolve_finetune_config(kw, dataset_label="custom")
    return FinetuneTrainer(cfg, model=model, data=dataset).run()
