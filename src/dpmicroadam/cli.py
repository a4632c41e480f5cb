"""`dpmicroadam` command line: the only module that reads argv.

The flags of `train`, `finetune` and `audit` are generated from their config dataclasses
(:class:`TrainConfig` and its subclasses ``FinetuneConfig`` and ``AuditConfig``): each field's
type, help text and choices live in its metadata, so a setting is declared once and every command
that takes it shows the same flag. A usage error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

from dpmicroadam.train.checkpoint import strict_json
from dpmicroadam.train.checks import field_types
from dpmicroadam.train.config import TrainConfig
from dpmicroadam.train.names import ACCOUNTANTS

EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_IO = 4


# ---------------------------------------------------------------------- the flag table


def config_flags(cls: type, exclude: Sequence[str] = ()) -> list[tuple[str, str, dict[str, Any]]]:
    """``(flag, field, argparse keywords)`` for every field of a config dataclass.

    Built from the fields' metadata (help, choices, flag) and types; ``exclude`` drops fields.
    """
    kinds = field_types(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli") is False or f.name in exclude:
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f)}
        accepted = [t for t in kinds[f.name] if t is not type(None)]
        if accepted == [bool]:
            kw["action"] = argparse.BooleanOptionalAction
        elif list in accepted:
            kw["type"] = _comma_list
            kw["metavar"] = "A,B,..."
        else:
            kw["type"] = next((t for t in (float, int) if t in accepted), str)
            if str in accepted:
                kw["type"] = str  # e.g. ef_bits: 4, 5, 6, 8 or none; checked when resolved
            # Choices are checked when the config is resolved (one message for flags, TOML and
            # Python); the help lists them.
            kw["metavar"] = meta.get("metavar", f.name.upper())
        out.append((flag, f.name, kw))
    return out


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if "choices" in f.metadata:
        text += f": {', '.join(map(str, f.metadata['choices']))}"
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is not None and not isinstance(default, bool):
        text += f" (default {default})"
    return text.replace("%", "%%")


def _comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, exclude: Sequence[str] = ()
) -> list[str]:
    """Add a config class's flags to ``parser``; returns the field names added."""
    names = []
    for flag, name, kw in config_flags(cls, exclude):
        parser.add_argument(flag, **kw)
        names.append(name)
    parser.set_defaults(config_fields=names)
    return names


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (unset flags are left out)."""
    return {k: getattr(args, k) for k in args.config_fields if getattr(args, k) is not None}


# ---------------------------------------------------------------------- commands


def _fit_and_report(cfg: TrainConfig, make_run: typing.Callable[[Any], Any]) -> int:
    if cfg.json:
        cfg.progress = False
    try:
        summary = make_run(cfg).fit()
    except ImportError as err:  # an optional extra (transformers, peft, timm) is missing
        raise ValueError(str(err)) from err
    _report(summary, cfg.json)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dpmicroadam.train import Run, resolve_config

    return _fit_and_report(resolve_config(given_settings(args)), Run)


def cmd_finetune(args: argparse.Namespace) -> int:
    from dpmicroadam.finetune import finetune_run, resolve_finetune_config

    cfg = resolve_finetune_config(given_settings(args))
    if cfg.task == "vision" and cfg.timm_model is None:  # from Python, a module can be given
        raise ValueError(
            "finetune needs a model and its data: --model-path with --train FILE or --dataset "
            "wordnet-nouns (text), or --timm-model NAME with an image --dataset"
        )
    return _fit_and_report(cfg, finetune_run)


def cmd_audit(args: argparse.Namespace) -> int:
    from dpmicroadam.audit import resolve_audit_config, run_audit

    cfg = resolve_audit_config(given_settings(args))
    if cfg.json:
        cfg.progress = False
    result = run_audit(cfg)
    if cfg.json:
        print(json.dumps(result.summary()))
    else:
        print(result.line())
        print(f"results in {result.out} (audit.json, audit_scores.png)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dpmicroadam.study.report import write_report
    from dpmicroadam.study.sweep import load_sweep, read_rows, run_sweep

    if args.plan:
        from dpmicroadam.study.plan import format_plan, plan_sweep

        name, _, _ = load_sweep(args.config)
        print(format_plan(plan_sweep(args.config, args.results_dir), name))
        return 0
    if args.report_only:
        name, _, _ = load_sweep(args.config)
        rows = read_rows(Path(args.results_dir) / f"{name}.csv")
        write_report(rows, Path(args.results_dir), name)
        return 0
    run_sweep(
        args.config,
        args.results_dir,
        limit=args.limit,
        progress=args.progress,
        jobs=args.jobs,
        threads=args.threads,
    )
    return 0


def cmd_account(args: argparse.Namespace) -> int:
    from dpmicroadam.accounting import calibrate_noise_multiplier, epsilon

    q = _sample_rate(args)
    steps = args.steps
    if steps is None:
        if args.epochs is None:
            raise ValueError("give --steps or --epochs")
        if not args.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {args.epochs!r}")
        steps = math.ceil(args.epochs / q)
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
        sigma = args.noise_multiplier
    else:
        sigma = calibrate_noise_multiplier(
            args.epsilon, args.delta, q, steps, accountant=args.accountant
        )
        out["target_epsilon"] = args.epsilon
    out["noise_multiplier"] = sigma
    out["epsilon"] = epsilon(sigma, q, steps, args.delta, accountant=args.accountant)
    if args.json:
        print(json.dumps(strict_json(out)))
    else:
        print(
            f"σ = {sigma:.4f}, q = {q:.6g}, T = {steps}, δ = {args.delta:g}: "
            f"ε = {out['epsilon']:.4f} ({args.accountant.upper()})"
        )
    return 0


def _sample_rate(args: argparse.Namespace) -> float:
    if args.sample_rate is not None:
        return args.sample_rate
    if args.batch_size is None or args.dataset_size is None:
        raise ValueError("give --sample-rate, or --batch-size together with --dataset-size")
    if args.dataset_size < 1:
        raise ValueError(f"--dataset-size must be >= 1, got {args.dataset_size}")
    if not 0 < args.batch_size <= args.dataset_size:
        raise ValueError(
            f"--batch-size must be in (0, --dataset-size={args.dataset_size}], got "
            f"{args.batch_size:g}"
        )
    return args.batch_size / args.dataset_size


# ---------------------------------------------------------------------- output


def summary_lines(s: dict[str, Any]) -> list[str]:
    """Test accuracy, ε spent with how it was accounted, optimizer memory, time and output folder."""
    acc = s.get("test_accuracy")
    line = f"test accuracy {acc:.4f}" if acc is not None else "test accuracy n/a"
    if s.get("private"):
        target = f"target {s['target_epsilon']}, " if s.get("target_epsilon") is not None else ""
        eps = s.get("epsilon")
        eps_text = f"{eps:.3f}" if eps is not None else "inf (σ = 0: not private)"
        line += (
            f" | ε = {eps_text} ({target}δ = {s['delta']:g}, {s['accountant'].upper()}, "
            f"σ = {s['noise_multiplier']:.4f}, q = {s['sample_rate']:.4g}, T = {s['steps']})"
        )
    else:
        line += " | not private"
    model = f"{s['model']} ({s['trainable']})" if s.get("trainable") else f"{s['model']}"
    trains = (
        f"trains {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters · "
        if "trainable_parameters" in s
        else ""
    )
    return [
        f"{s['optimizer']} · {model} · {s['dataset']}: {line}",
        f"{trains}optimizer state {s['optimizer_state_bytes_per_param']:.3f} bytes/param · "
        f"{s['wall_seconds']:.1f} s · results in {s['out']}",
    ]


def _report(summary: dict[str, Any], as_json: bool) -> None:
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 reports
        return
    if as_json:
        print(json.dumps(strict_json(summary)))
    else:
        print("\n".join(summary_lines(summary)))


# ---------------------------------------------------------------------- the parser


class UsageError(Exception):
    """A bad command line (argparse's own errors): one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --model must not silently mean --model-path
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from dpmicroadam.audit.config import AuditConfig
    from dpmicroadam.finetune.config import FinetuneConfig

    parser = _Parser(
        prog="dpmicroadam", description="Differentially private training with DP-MicroAdam."
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    p = sub.add_parser("train", help="train a model (privately with the dp-* optimizers)",
                       description="Train a model; the dp-* optimizers train with DP.")  # fmt: skip
    add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model privately (text classifiers, image models)",
        description="Fine-tune a pretrained model with the run of `train`: same budget "
        "handling, checkpoints, metrics, plots and summary.json.",
    )
    names = add_config_flags(p, FinetuneConfig, exclude=tuple(FinetuneConfig.NOT_FOR_FINETUNE))
    for name in FinetuneConfig.NOT_FOR_FINETUNE:  # refused with a pointer (FinetuneConfig)
        p.add_argument(f"--{name}", dest=name, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_finetune, config_fields=[*names, *FinetuneConfig.NOT_FOR_FINETUNE])

    p = sub.add_parser(
        "audit",
        help="measure a lower bound on ε from one training run with canaries (arXiv 2305.08846)",
        description="Train once exactly as `train` would, with m canaries each included with "
        "probability 1/2, then guess which were included. The number of correct guesses gives a "
        "lower bound on ε at the stated confidence; a bound above the accounted ε means the "
        "mechanism does not do what its accounting assumes. Writes audit.json, audit_scores.npz "
        "and audit_scores.png to --out.",
    )
    add_config_flags(p, AuditConfig, exclude=AuditConfig.NOT_FOR_AUDIT)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("sweep", help="run a resumable grid of runs from a TOML file")
    p.add_argument("config", help="sweep TOML file (see dpmicroadam.study.sweep)")
    p.add_argument("--results-dir", default="results", help="where rows, tables and runs go")
    p.add_argument("--limit", type=int, help="run at most this many missing runs, then stop")
    p.add_argument("--progress", action="store_true", help="show each run's progress bar")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plots")
    p.add_argument(
        "--plan",
        action="store_true",
        help="run nothing: print per block what is done, what would run and an estimate of its time",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    p.add_argument("--threads", type=int, help="torch threads per run (default: CPUs / jobs)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("account", help="ε for σ, or σ for ε (Poisson-subsampled Gaussian)")
    p.add_argument("--noise-multiplier", type=float, help="σ (gives ε)")
    p.add_argument("--epsilon", type=float, help="target ε (gives σ)")
    p.add_argument("--sample-rate", type=float, help="q, the Poisson sampling rate")
    p.add_argument("--batch-size", type=float, help="expected batch size B (with --dataset-size)")
    p.add_argument("--dataset-size", type=int, help="N (with --batch-size: q = B/N)")
    p.add_argument("--steps", type=int, help="number of steps T")
    p.add_argument("--epochs", type=float, help="epochs (T = epochs / q)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="pld", help="default pld")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_account)
    return parser


def _one_line_warning(message: Any, category: type, *args: Any, **kwargs: Any) -> str:
    return f"dpmicroadam: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"dpmicroadam {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as err:
        print(f"dpmicroadam {args.command}: stopped: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except OSError as err:  # a full disk, a folder that went away: one line, nothing half-written
        print(f"dpmicroadam {args.command}: error: {err}", file=sys.stderr)
        return EXIT_IO


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
