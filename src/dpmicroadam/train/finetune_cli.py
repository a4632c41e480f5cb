"""The `dpmicroadam finetune` subcommand (registered by ``dpmicroadam.cli``).

It takes every budget, optimizer and run flag of `train` (copied from the `train` parser, so
the two commands cannot drift apart) plus the fine-tuning flags below. `train`'s ``--model``
and ``--recipe`` do not apply and are refused.
"""

from __future__ import annotations

import argparse
from typing import Any

from dpmicroadam.models.trainable import TRAINABLE_MODES

__all__ = ["FINETUNE_FLAGS", "add_parser", "cmd_finetune"]

# (flag, type, help); the dest is the flag with underscores, a FinetuneConfig field.
FINETUNE_FLAGS: list[tuple[str, Any, str]] = [
    ("--model-path", str, "pretrained transformers model: a local folder or a hub name"),
    ("--train", str, "training data: CSV/TSV (header row) or JSON lines"),
    ("--test", str, "test data (default: a held-out part of --train, see --test-fraction)"),
    ("--text-column", str, "column with the text (default text)"),
    ("--label-column", str, "column with the label (default label); values are mapped to 0..C-1"),
    ("--text-pair-column", str, "column with a second text (sentence-pair tasks)"),
    ("--labels", str, "comma-separated label values in class order (default: sorted values found)"),
    ("--trainable", str, f"which parameters train: {', '.join(TRAINABLE_MODES)} (default all)"),
    ("--max-length", int, "tokens per example, padded or truncated (default 128)"),
    ("--lora-r", int, "LoRA rank (with --trainable lora; default 8)"),
    ("--lora-alpha", float, "LoRA alpha (default 2·r)"),
    ("--test-fraction", float, "share of --train held out for testing when --test is not given"),
    ("--attn-implementation", str, "eager (default) or sdpa"),
    ("--timm-model", str, "a timm model name for the image datasets of train (needs timm)"),
]
_RENAMED = {"train": "train_file", "test": "test_file"}
_NOT_FOR_FINETUNE = {
    "model": "use --model-path (a transformers model) or --timm-model (an image model)",
    "recipe": "the shipped recipes are for `train`; use --config FILE.toml",
}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `finetune` on the ``dpmicroadam`` subparsers object."""
    train_parser = getattr(sub, "choices", {}).get("train")
    parents = [train_parser] if train_parser is not None else []
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model privately (text classifiers, image models)",
        description=(
            "Fine-tune a pretrained model with the training loop of `train`: same budget "
            "handling, checkpoints, metrics, plots and summary.json."
        ),
        parents=parents,
        conflict_handler="resolve",
    )
    p.set_defaults(_train_dests=_dests(train_parser))
    for dest in _NOT_FOR_FINETUNE:  # hidden from --help; refused with a pointer when given
        p.add_argument(f"--{dest}", dest=dest, default=None, help=argparse.SUPPRESS)
    for flag, typ, text in FINETUNE_FLAGS:
        dest = flag[2:].replace("-", "_")
        p.add_argument(flag, dest=_RENAMED.get(dest, dest), type=typ, default=None, help=text)
    p.add_argument(
        "--no-timm-pretrained",
        dest="timm_pretrained",
        action="store_false",
        default=None,
        help="with --timm-model: random initialization instead of pretrained weights",
    )
    p.set_defaults(func=cmd_finetune)
    return p


def _dests(parser: argparse.ArgumentParser | None) -> list[str]:
    if parser is None:
        return []
    return [
        a.dest
        for a in parser._actions  # argparse keeps its actions here; no public accessor exists
        if a.dest not in ("help", "func", argparse.SUPPRESS)
    ]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for dest in args._train_dests:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest in _NOT_FOR_FINETUNE:
            raise ValueError(f"--{dest} does not apply to finetune: {_NOT_FOR_FINETUNE[dest]}")
        given[dest] = value
    if given.pop("no_progress", None):
        given["progress"] = False
    for flag, _, _ in FINETUNE_FLAGS:
        dest = flag[2:].replace("-", "_")
        dest = _RENAMED.get(dest, dest)
        if getattr(args, dest, None) is not None:
            given[dest] = getattr(args, dest)
    if args.timm_pretrained is not None:
        given["timm_pretrained"] = args.timm_pretrained
    if "labels" in given:
        given["labels"] = [s.strip() for s in given["labels"].split(",") if s.strip()]
    return given


def cmd_finetune(args: argparse.Namespace) -> int:
    from dpmicroadam.train.finetune import FinetuneTrainer, resolve_finetune_config
    from dpmicroadam.train.summary import print_summary

    cfg = resolve_finetune_config(_overrides(args))
    if cfg.json:
        cfg.progress = False
    try:
        summary = FinetuneTrainer(cfg).run()
    except ImportError as err:  # an optional extra (transformers, peft, timm) is missing
        raise ValueError(str(err)) from err
    print_summary(summary, cfg.json)
    return 0
