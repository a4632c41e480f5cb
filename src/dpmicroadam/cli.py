"""`dpmicroadam` command line: the only module that reads argv."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from dpmicroadam.train.config import (
    ACCOUNTANTS,
    DATASETS,
    ENGINES,
    LR_SCHEDULES,
    MODELS,
    OPTIMIZERS,
)

# (flag, type, help); the dest is the flag with underscores, the same name as in SPEC.md and the TOML.
TRAIN_FLAGS: list[tuple[str, Any, str]] = [
    ("--config", str, "TOML file with any of these settings (flags win)"),
    ("--recipe", str, "a shipped recipe, e.g. cifar10-wrn16-4"),
    ("--dataset", str, f"one of {', '.join(DATASETS)} (default digits)"),
    ("--data-dir", str, "folder with the dataset files"),
    ("--model", str, f"one of {', '.join(MODELS)} (default by dataset)"),
    ("--optimizer", str, f"one of {', '.join(OPTIMIZERS)} (default dp-microadam)"),
    ("--epsilon", float, "target ε (default 8); σ is calibrated so ε spent ≤ target"),
    ("--delta", float, "target δ (default 1e-5)"),
    ("--noise-multiplier", float, "σ, instead of --epsilon"),
    ("--accountant", str, f"one of {', '.join(ACCOUNTANTS)} (default pld)"),
    ("--epochs", float, "training length in epochs (expected passes over the data)"),
    ("--steps", int, "training length in optimizer steps (instead of --epochs)"),
    ("--batch-size", float, "expected (logical) batch size B = q·N"),
    ("--physical-batch-size", int, "examples per forward/backward (memory only)"),
    ("--clip-norm", float, "per-example clipping threshold C"),
    ("--lr", float, "learning rate"),
    ("--lr-schedule", str, f"one of {', '.join(LR_SCHEDULES)}"),
    ("--momentum", float, "SGD momentum"),
    ("--weight-decay", float, "decoupled weight decay"),
    ("--window-size", int, "MicroAdam window m"),
    ("--density", float, "MicroAdam top-k density k/d"),
    ("--density-1d", float, "MicroAdam density for 1-D tensors (biases, norm gains)"),
    ("--ef-bits", str, "MicroAdam error-feedback bits: 4, 8 or none (exact)"),
    ("--augmult", int, "augmented views per example K (averaged before clipping)"),
    ("--ema", float, "EMA decay of the weights used for evaluation (with warm-up)"),
    ("--seed", int, "seed of every random stream of the run"),
    ("--val-fraction", float, "fraction of the training data held out for validation"),
    ("--eval-every", int, "evaluate every N steps"),
    ("--checkpoint-every", int, "checkpoint every N steps"),
    ("--engine", str, f"per-example gradient engine: {', '.join(ENGINES)}"),
    ("--normalize", str, "divide by the 'expected' batch size (default) or the 'realized' one"),
    ("--device", str, "cpu, cuda, cuda:1, ..."),
    ("--out", str, "output folder (default runs/<time>-<dataset>-<optimizer>-s<seed>)"),
]
TRAIN_SWITCHES: list[tuple[str, str]] = [
    ("--resume", "continue the run in --out from its last checkpoint"),
    ("--json", "print the summary as one JSON object on stdout, nothing else"),
    ("--download", "download the dataset (with checksum) when it is missing"),
    ("--secure-noise", "seed the noise from OS entropy (not reproducible)"),
    ("--log-train-loss", "log the training loss (computed on private data: not a private output)"),
    ("--no-progress", "hide the progress bar"),
]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for flag, typ, text in TRAIN_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=text)
    for flag, text in TRAIN_SWITCHES:
        p.add_argument(flag, action="store_true", default=None, help=text)


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [f[0][2:].replace("-", "_") for f in TRAIN_FLAGS] + [
        s[0][2:].replace("-", "_") for s in TRAIN_SWITCHES
    ]
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if given.pop("no_progress", None):
        given["progress"] = False
    return given


def cmd_train(args: argparse.Namespace) -> int:
    from dpmicroadam.train.config import resolve_config
    from dpmicroadam.train.loop import train

    cfg = resolve_config(_train_overrides(args))
    if cfg.json:
        cfg.progress = False
    summary = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 reports
        return 0
    from dpmicroadam.train.summary import print_summary

    print_summary(summary, cfg.json)
    return 0


def cmd_account(args: argparse.Namespace) -> int:
    from dpmicroadam.accounting import calibrate_noise_multiplier, epsilon

    if args.sample_rate is None:
        if args.batch_size is None or args.dataset_size is None:
            raise ValueError("give --sample-rate, or --batch-size together with --dataset-size")
        q = args.batch_size / args.dataset_size
    else:
        q = args.sample_rate
    if args.steps is None:
        if args.epochs is None:
            raise ValueError("give --steps or --epochs")
        steps = math.ceil(args.epochs / q)
    else:
        steps = args.steps
    out: dict[str, Any] = {
        "sample_rate": q,
        "steps": steps,
        "delta": args.delta,
        "accountant": args.accountant,
    }
    if (args.noise_multiplier is None) == (args.epsilon is None):
        raise ValueError(
            "give exactly one of --noise-multiplier (to get ε) or --epsilon (to get σ)"
        )
    if args.noise_multiplier is not None:
        out["noise_multiplier"] = args.noise_multiplier
        out["epsilon"] = epsilon(
            args.noise_multiplier, q, steps, args.delta, accountant=args.accountant
        )
    else:
        sigma = calibrate_noise_multiplier(
            args.epsilon, args.delta, q, steps, accountant=args.accountant
        )
        out["target_epsilon"] = args.epsilon
        out["noise_multiplier"] = sigma
        out["epsilon"] = epsilon(sigma, q, steps, args.delta, accountant=args.accountant)
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"σ = {out['noise_multiplier']:.4f}, q = {q:.6g}, T = {steps}, δ = {args.delta:g}: "
            f"ε = {out['epsilon']:.4f} ({args.accountant.upper()})"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpmicroadam",
        description="Differentially private training with DP-MicroAdam.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model (privately with the dp-* optimizers)")
    _add_train_flags(p_train)
    p_train.set_defaults(func=cmd_train)

    p_acc = sub.add_parser("account", help="ε for σ, or σ for ε (Poisson-subsampled Gaussian)")
    p_acc.add_argument("--noise-multiplier", type=float)
    p_acc.add_argument("--epsilon", type=float)
    p_acc.add_argument("--sample-rate", type=float)
    p_acc.add_argument("--batch-size", type=float)
    p_acc.add_argument("--dataset-size", type=int)
    p_acc.add_argument("--steps", type=int)
    p_acc.add_argument("--epochs", type=float)
    p_acc.add_argument("--delta", type=float, default=1e-5)
    p_acc.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
    p_acc.add_argument("--json", action="store_true")
    p_acc.set_defaults(func=cmd_account)
    _add_extra_commands(sub)
    return parser


def _add_extra_commands(sub: Any) -> None:
    """Subcommands built by other parts of the package (sweep, finetune, audit)."""
    import importlib

    for module in (
        "dpmicroadam.train.sweep",
        "dpmicroadam.train.finetune_cli",
        "dpmicroadam.train.audit_cli",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        mod.add_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"dpmicroadam {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"dpmicroadam {args.command}: stopped: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
