"""`dpmicroadam sweep CONFIG.toml`: a resumable grid of `train` runs with a results table and plots.

The TOML file has a name, a ``[base]`` table of train settings and one or more ``[[grid]]`` blocks;
each block is a Cartesian product of its list-valued keys (scalars are fixed), and may carry a
``tag`` that says what it studies ("tune", "epsilon", "clip", "schedule", "density")::

    name = "fashion-mnist"
    [base]
    dataset = "fashion-mnist"
    epochs = 10
    [[grid]]
    tag = "tune"
    optimizer = "dp-sgd"
    lr = [1.0, 2.0, 4.0]
    momentum = 0.9

Finished runs (same settings) are skipped, an interrupted run resumes from its checkpoint, and one
row per run is appended to ``results/<name>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from dpmicroadam.train.config import resolve_config
from dpmicroadam.train.loop import CHECKPOINT, TrainingDiverged, train

COLUMNS = [
    "run_id",
    "tag",
    "status",
    "optimizer",
    "target_epsilon",
    "epsilon",
    "delta",
    "accountant",
    "noise_multiplier",
    "clip_norm",
    "lr",
    "lr_schedule",
    "momentum",
    "batch_size",
    "epochs",
    "steps",
    "density",
    "window_size",
    "ef_bits",
    "augmult",
    "seed",
    "val_accuracy",
    "test_accuracy",
    "optimizer_state_bytes_per_param",
    "wall_seconds",
]


TUNABLE = ("lr", "momentum", "clip_norm", "density", "window_size", "lr_schedule")


def load_sweep(path: str | Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Read a sweep file: (name, base settings, grid blocks) in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist")
    with path.open("rb") as fh:
        spec = tomllib.load(fh)
    name = spec.get("name", path.stem)
    base = {k.replace("-", "_"): v for k, v in spec.get("base", {}).items()}
    blocks = [{k.replace("-", "_"): v for k, v in b.items()} for b in spec.get("grid", [])]
    if not blocks:
        raise ValueError(f"{str(path)!r} has no [[grid]] block; add at least one")
    return name, base, blocks


def expand_block(
    base: dict[str, Any], block: dict[str, Any], rows: list[dict[str, str]]
) -> list[tuple[str, dict[str, Any]]]:
    """The runs of one grid block: the Cartesian product of its list values.

    A value ``"tuned"`` (for lr, momentum, clip_norm, density, window_size, lr_schedule) takes the
    setting of that optimizer's best mean validation accuracy among the finished ``tune`` rows, so
    later blocks use what the tuning found, never the test split. Blocks whose tuned values are not
    known yet yield no runs.
    """
    from dpmicroadam.train.report import best_by_validation, summarize

    block = dict(block)
    tag = str(block.pop("tag", "grid"))
    keys = sorted(block)
    values = [v if isinstance(v, list) else [v] for v in (block[k] for k in keys)]
    best = best_by_validation(summarize(rows)) if rows else {}
    runs = []
    for combo in itertools.product(*values):
        settings = {**base, **dict(zip(keys, combo))}
        tuned = [k for k, v in settings.items() if v == "tuned"]
        if tuned:
            rec = best.get(settings.get("optimizer", "dp-microadam"))
            if rec is None:
                continue
            for k in tuned:
                if k not in TUNABLE:
                    raise ValueError(f"'tuned' is not allowed for {k!r}; only for {TUNABLE}")
                settings[k] = _typed(rec[k])
        runs.append((tag, settings))
    return runs


def _typed(v: str) -> Any:
    if v == "":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def run_id(settings: dict[str, Any]) -> str:
    """A short stable id of a run's settings (order-independent)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run_sweep(
    path: str | Path,
    results_dir: str | Path = "results",
    *,
    limit: int | None = None,
    progress: bool = False,
) -> list[dict[str, str]]:
    """Run every missing run of a sweep, appending one CSV row per run; returns all rows."""
    name, base, blocks = load_sweep(path)
    results_dir = Path(results_dir)
    runs_dir = results_dir / "runs" / name
    runs_dir.mkdir(parents=True, exist_ok=True)
    csv_path = results_dir / f"{name}.csv"
    ran = 0
    for b, block in enumerate(blocks, 1):
        rows = read_rows(csv_path)
        done = {(r["tag"], r["run_id"]) for r in rows}
        runs = expand_block(base, block, rows)
        todo = [(t, st) for t, st in runs if (t, run_id(st)) not in done]
        print(
            f"sweep {name} block {b}/{len(blocks)} ({block.get('tag', 'grid')}): {len(runs)} runs, "
            f"{len(runs) - len(todo)} done, {len(todo)} to run",
            file=sys.stderr,
            flush=True,
        )
        for i, (tag, settings) in enumerate(todo, 1):
            if limit is not None and ran >= limit:
                break
            row = _run_one(tag, settings, runs_dir, progress)
            _append(csv_path, row)
            ran += 1
            print(
                f"[{i}/{len(todo)}] {tag} {row['run_id']} {row['optimizer']} "
                f"eps={row['target_epsilon']} C={row['clip_norm']} lr={row['lr']} "
                f"density={row['density']} seed={row['seed']}: {row['status']} "
                f"val={row['val_accuracy']} test={row['test_accuracy']} ({row['wall_seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
    rows = read_rows(csv_path)
    from dpmicroadam.train.report import write_report

    write_report(rows, results_dir, name)
    return rows


def _run_one(tag: str, settings: dict[str, Any], runs_dir: Path, progress: bool) -> dict[str, Any]:
    rid = run_id(settings)
    out = runs_dir / rid
    if (out / "summary.json").exists():
        return _row(rid, tag, "ok", settings, json.loads((out / "summary.json").read_text()))
    resume = (out / CHECKPOINT).exists()
    cfg = resolve_config({**settings, "out": str(out), "resume": resume, "progress": progress})
    start = time.perf_counter()
    try:
        return _row(rid, tag, "ok", settings, train(cfg))
    except TrainingDiverged:
        summary = {"optimizer": cfg.optimizer, "wall_seconds": time.perf_counter() - start}
        return _row(rid, tag, "diverged", settings, summary)


def _row(
    rid: str, tag: str, status: str, settings: dict[str, Any], summary: dict[str, Any]
) -> dict[str, Any]:
    merged = {**settings, **{k: v for k, v in summary.items() if v is not None}}
    row = {c: merged.get(c, "") for c in COLUMNS}
    row.update(run_id=rid, tag=tag, status=status)
    row["target_epsilon"] = summary.get("target_epsilon", settings.get("epsilon", ""))
    for key in ("val_accuracy", "test_accuracy", "epsilon", "wall_seconds"):
        v = row.get(key)
        if isinstance(v, float):
            row[key] = round(v, 5) if math.isfinite(v) else ""
    return row


def _append(csv_path: Path, row: dict[str, Any]) -> None:
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="run a resumable grid of train runs from a TOML file")
    p.add_argument("config", help="sweep TOML file (see dpmicroadam.train.sweep)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--limit", type=int, help="run at most this many missing runs, then stop")
    p.add_argument("--progress", action="store_true", help="show each run's progress bar")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plots")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.report_only:
        from dpmicroadam.train.report import write_report

        name, _, _ = load_sweep(args.config)
        write_report(
            read_rows(Path(args.results_dir) / f"{name}.csv"), Path(args.results_dir), name
        )
        return 0
    run_sweep(args.config, args.results_dir, limit=args.limit, progress=args.progress)
    return 0
