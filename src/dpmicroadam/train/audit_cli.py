"""`dpmicroadam audit`: train once with canaries and print an empirical lower bound on ε."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from dpmicroadam.train.audit import AUDIT_MODES

AUDIT_FLAGS: list[tuple[str, Any, str]] = [
    ("--mode", str, f"one of {', '.join(AUDIT_MODES)} (default white-box)"),
    ("--canaries", int, "number of canaries m, each included with probability 1/2 (default 1000)"),
    ("--confidence", float, "confidence of the ε lower bound (default 0.95)"),
    ("--guesses", int, "number of guesses r (default: best of a small grid, Bonferroni-corrected)"),
    ("--canary-norm", float, "white-box: canary gradient norm before clipping (default 2·C)"),
    (
        "--score",
        str,
        "white-box score: auto (default: best of llr and detrended), llr, detrended or sum",
    ),
]


# TrainConfig fields that an audit does not take as flags.
_SKIPPED = {"defaults_source", "resume", "eval_every", "checkpoint_every", "progress"}


def _train_fields() -> list[tuple[str, Any]]:
    """(field, argparse type or "switch") for every TrainConfig field an audit accepts.

    Built from the dataclass (this module may not import ``dpmicroadam.cli``), so a new training
    setting is an audit flag too.
    """
    from dpmicroadam.train.config import TrainConfig

    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIPPED:
            continue
        kind = str(f.type)
        if kind.startswith("bool"):
            out.append((f.name, "switch"))
        elif "str" in kind:
            out.append((f.name, str))
        elif "float" in kind:
            out.append((f.name, float))
        elif "int" in kind:
            out.append((f.name, int))
        else:
            out.append((f.name, str))
    return out


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `dpmicroadam audit` (the training flags of `train`, plus the audit's own)."""
    p = sub.add_parser(
        "audit",
        help="measure a lower bound on ε from one training run with canaries (arXiv 2305.08846)",
        description=(
            "Train once exactly as `train` would, with m canaries each included with probability "
            "1/2, then guess which were included. The number of correct guesses gives a lower "
            "bound on ε at the stated confidence; a bound above the accounted ε means the "
            "mechanism does not do what its accounting assumes. Writes audit.json, "
            "audit_scores.npz and audit_scores.png to --out."
        ),
    )
    for name, typ in _train_fields():
        flag = "--" + name.replace("_", "-")
        if typ == "switch":
            p.add_argument(flag, action="store_true", default=None, help="as for `train`")
        else:
            p.add_argument(flag, type=typ, default=None, help="as for `train`")
    p.add_argument("--no-progress", action="store_true", default=None, help="hide the progress bar")
    for flag, typ, text in AUDIT_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=text)
    p.set_defaults(func=cmd_audit)
    return p


def cmd_audit(args: argparse.Namespace) -> int:
    from dpmicroadam.train.audit import AuditConfig, run_audit
    from dpmicroadam.train.config import resolve_config

    audit_keys = [f[0][2:].replace("-", "_") for f in AUDIT_FLAGS]
    audit = AuditConfig(
        **{k: getattr(args, k) for k in audit_keys if getattr(args, k, None) is not None}
    )
    given = {
        name: getattr(args, name)
        for name, _ in _train_fields()
        if getattr(args, name, None) is not None
    }
    if args.no_progress:
        given["progress"] = False
    cfg = resolve_config(given)
    if cfg.json:
        cfg.progress = False
    result = run_audit(cfg, audit)
    if cfg.json:
        print(json.dumps(result.summary()))
    else:
        print(result.line())
        print(f"results in {result.out} (audit.json, audit_scores.png)")
    return 0
