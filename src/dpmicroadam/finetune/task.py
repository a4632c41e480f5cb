"""Fine-tuning tasks: pretrained text classifiers on text files or WordNet, image models.

:class:`FinetuneHooks` plugs into :class:`~dpmicroadam.train.Run`: its ``build_task`` loads the
data and the pretrained model and picks the trainable parameters (``all``, ``bias``, ``head``,
``lora``: a function of the architecture only, so it spends no budget); its ``summary`` adds the
fine-tuning fields.

- Text: a CSV / JSON-lines file (``dpmicroadam.data.text``) or a WordNet supersense task
  (``dpmicroadam.data.wordnet``), tokenized once to a fixed length into an int64 tensor
  (N, 2|3, L), and a ``transformers`` sequence classifier (``dpmicroadam.models.hf``). The label
  mapping is saved to ``<out>/labels.json``.
- Vision: any ``nn.Module`` (``finetune_vision``), or a timm model by name when timm is installed,
  on the image datasets of `train`. BatchNorm is refused (see
  ``dpmicroadam.models.replace_batchnorm``).
- Head mode on a model whose head is one module trains the head on cached features of the frozen
  backbone (``dpmicroadam.finetune.features``): the same computation, far cheaper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpmicroadam.data import load_dataset, split_validation
from dpmicroadam.data.text import encode_texts, load_text_table
from dpmicroadam.data.wordnet import WORDNET_DATASETS, load_wordnet
from dpmicroadam.finetune.config import FinetuneConfig
from dpmicroadam.models.hf import load_hf_classifier, load_hf_tokenizer
from dpmicroadam.models.trainable import head_module, select_trainable, trainable_count
from dpmicroadam.train import Run, RunHooks, Task
from dpmicroadam.train.task import seeded_init, validation_split

__all__ = ["FinetuneHooks", "timm_model"]

SUBSET_SEED = 20241203  # --train-subset keeps the same examples in every run
TEST_SPLIT_SEED = 20240607  # the held-out test part of a training file is the same for every run
TEXT_EVAL_BATCH = 64  # examples per evaluation forward (transformer activations grow with L²)


class FinetuneHooks(RunHooks):
    """Build the fine-tuning task of a :class:`FinetuneConfig`.

    Args:
        model: For vision runs from Python: the module to fine-tune (trained in place).
        data: For vision runs from Python: ``(x_train, y_train, x_test, y_test)`` tensors.
    """

    def __init__(
        self, model: nn.Module | None = None, data: tuple[torch.Tensor, ...] | None = None
    ) -> None:
        self.model = model
        self.data = data
        self.label_names: list[str] | None = None
        self.total_parameters: int | None = None
        self.feature_cache: str | None = None

    def build_task(self, run: Run) -> Task:
        cfg = run.cfg
        if not isinstance(cfg, FinetuneConfig):
            raise TypeError(
                "fine-tuning needs a FinetuneConfig (from resolve_finetune_config), got "
                f"{type(cfg).__name__}"
            )
        return self._text_task(cfg) if cfg.task == "text" else self._vision_task(cfg)

    # ------------------------------------------------------------------ text
    def _text_task(self, cfg: FinetuneConfig) -> Task:
        tokenizer = load_hf_tokenizer(cfg.model_path)
        if cfg.dataset in WORDNET_DATASETS:
            train, test = load_wordnet(cfg.dataset, cfg.data_dir)
            self.label_names = train.label_names
            x = encode_texts(tokenizer, train.texts, None, cfg.max_length)
            x_test = encode_texts(tokenizer, test.texts, None, cfg.max_length)
            return self._text_model(cfg, x, train.labels, x_test, test.labels)
        cols = dict(
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            text_pair_column=cfg.text_pair_column,
        )
        table = load_text_table(cfg.train_file, labels=cfg.labels, **cols)
        self.label_names = table.label_names
        x = encode_texts(tokenizer, table.texts, table.pairs, cfg.max_length)
        y = table.labels
        if cfg.test_file is not None:
            test = load_text_table(cfg.test_file, labels=table.label_names, **cols)
            x_test = encode_texts(tokenizer, test.texts, test.pairs, cfg.max_length)
            y_test = test.labels
        else:
            x, y, x_test, y_test = split_validation(x, y, cfg.test_fraction, seed=TEST_SPLIT_SEED)
        return self._text_model(cfg, x, y, x_test, y_test)

    def _text_model(
        self,
        cfg: FinetuneConfig,
        x: torch.Tensor,
        y: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
    ) -> Task:
        x_tr, y_tr, x_val, y_val = validation_split(x, y, cfg.val_fraction)
        x_tr, y_tr = _subset(x_tr, y_tr, cfg.train_subset)
        with seeded_init(cfg):  # the new head (and LoRA's A matrices) come from the global RNG
            model = load_hf_classifier(
                cfg.model_path,
                len(self.label_names or []),
                attn_implementation=cfg.attn_implementation,
                label_names=self.label_names,
            )
            model = _select(model, cfg)
        task = Task(x_tr, y_tr, x_val, y_val, x_test, y_test, model, TEXT_EVAL_BATCH)
        if _use_feature_cache(model, cfg):
            return self._cached_head_task(task, cfg)
        return task

    def _cached_head_task(self, task: Task, cfg: FinetuneConfig) -> Task:
        """Frozen-backbone features of every split, and the head alone as the model to train."""
        from dpmicroadam.finetune.features import cached_features

        name, head = head_module(task.model)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        features = {
            part: cached_features(
                task.model, name, getattr(task, f"x_{part}"), cache_dir, desc=part
            )
            for part in ("train", "val", "test")
        }
        self.total_parameters = sum(p.numel() for p in task.model.parameters())
        self.feature_cache = name
        return Task(
            features["train"], task.y_train, features["val"], task.y_val,
            features["test"], task.y_test, head,
        )  # fmt: skip

    # ------------------------------------------------------------------ vision
    def _vision_task(self, cfg: FinetuneConfig) -> Task:
        if self.data is not None:
            x, y, x_test, y_test = self.data
            num_classes = int(max(int(y.max()), int(y_test.max())) + 1)
        else:
            data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
            x, y, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
            num_classes = data.num_classes
        x_tr, y_tr, x_val, y_val = validation_split(x, y, cfg.val_fraction)
        with seeded_init(cfg):
            model = self.model
            if model is None:
                model = timm_model(cfg.timm_model, num_classes, pretrained=cfg.timm_pretrained)
            model = _select(model, cfg)
        return Task(x_tr, y_tr, x_val, y_val, x_test, y_test, model)

    # ------------------------------------------------------------------ outputs
    def started(self, run: Run) -> None:
        cfg = run.cfg
        if self.label_names is None or not run.dist.is_main:
            return
        record = {
            "label_column": cfg.label_column,
            "labels": self.label_names,
            "mapping": {name: i for i, name in enumerate(self.label_names)},
            "source": "given (--labels)"
            if cfg.labels is not None
            else "the lexicographer files of WordNet"
            if cfg.dataset in WORDNET_DATASETS
            else "the distinct values of the training file (the label set is treated as public)",
        }
        (run.out / "labels.json").write_text(json.dumps(record, indent=2))

    def summary(self, run: Run, summary: dict[str, Any]) -> None:
        cfg = run.cfg
        trained, total = trainable_count(run.model)
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


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of a fixed permutation (public, data-independent)."""
    if n is None or n >= y.numel():
        return x, y
    perm = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(SUBSET_SEED))
    keep = perm[:n].sort().values
    return x[keep], y[keep]


def _select(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    return select_trainable(
        model, cfg.trainable, head=cfg.head, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha
    )


def _use_feature_cache(model: nn.Module, cfg: FinetuneConfig) -> bool:
    if cfg.trainable != "head" or cfg.cache_features is False:
        return False
    found = head_module(model)
    if found is None and cfg.cache_features:
        raise ValueError(
            "--cache-features: the head of this model is not one module called once; "
            "drop --cache-features"
        )
    return found is not None


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
            "to dpmicroadam.finetune.finetune_vision instead"
        ) from err
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
