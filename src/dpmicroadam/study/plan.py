"""`dpmicroadam sweep CONFIG.toml --plan`: what a sweep still has to run, and roughly how long.

Nothing is run and nothing is written. Per block: its runs, how many are finished, how many
would run now, and how many wait for their tuning (a ``"tuned"`` value whose tuning rows are not
in the CSV yet). A missing run whose settings already ran under another tag costs nothing (its
folder is reused). The time estimate of a missing run is the median wall time of the finished rows
most like it (same mode, model, data, length and batch; the optimizer is the first thing let go),
so it carries the pace of the machine and the ``--jobs`` those rows ran with.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from dpmicroadam.study.sweep import (
    check_sweep,
    expand_block,
    load_sweep,
    read_rows,
    run_id,
    sweep_command,
)

# what a run's cost depends on, most telling first; the estimate drops keys from the end
COST_KEYS = (
    "trainable",
    "model_path",
    "dataset",
    "model",
    "width",
    "train_subset",
    "max_length",
    "epochs",
    "steps",
    "batch_size",
    "augmult",
    "optimizer",
)


# the block keys shown beside its tag
SHOWN = ("trainable", "optimizer", "epsilon", "batch_size", "epochs", "density")


def _brief(value: Any) -> str:
    return "/".join(map(str, value)) if isinstance(value, list) else str(value)


def plan_sweep(path: str | Path, results_dir: str | Path = "results") -> list[dict[str, Any]]:
    """One dict per block, in file order: ``block`` (1-based), ``tag``, ``runs`` (all of the
    block's settings), ``what`` (its main keys), ``done``, ``to_run`` (missing and runnable now, not counted by an earlier
    block), ``waiting`` (missing until their tuning rows exist) and ``seconds`` (estimated time of
    the missing runs, None when no finished row is comparable)."""
    command = sweep_command(path)
    name, base, blocks = load_sweep(path)
    check_sweep(path, command, base, blocks)
    rows = read_rows(Path(results_dir) / f"{name}.csv")
    finished = {(r["tag"], r["run_id"]) for r in rows}
    planned = set(finished)
    costs = _costs(rows)
    reusable = {r["run_id"] for r in rows if r.get("status") == "ok"}  # its folder has a summary
    plan = []
    for i, block in enumerate(blocks, 1):
        tag = str(block.get("tag", "grid"))
        combos = _combos(base, block)
        runs = expand_block(base, block, rows)
        keys = [(t, run_id(st)) for t, st in runs]
        done = sum(k in finished for k in keys)
        todo = []
        for key, (_, settings) in zip(keys, runs, strict=True):
            if key not in planned:
                planned.add(key)
                todo.append(settings)
        waiting = _skipped(combos, [settings for _, settings in runs])
        estimates = [0.0 if run_id(s) in reusable else _estimate(s, costs) for s in todo]
        estimates += [_estimate(s, costs) for s in waiting]
        known = [e for e in estimates if e is not None]
        plan.append(
            {
                "block": i,
                "tag": tag,
                "what": " ".join(_brief(block.get(k)) for k in SHOWN if k in block),
                "runs": len(combos),
                "done": done,
                "to_run": len(todo),
                "waiting": len(waiting),
                "seconds": sum(known) if len(known) == len(estimates) else None,
            }
        )
    return plan


def format_plan(plan: list[dict[str, Any]], name: str) -> str:
    """The plan as a fixed-width table with a total line."""
    lines = [
        f"sweep {name}: plan (nothing is run)",
        f"{'block':>5}  {'tag':<14}{'runs':>5}{'done':>6}{'to run':>8}{'waiting':>9}{'hours':>8}"
        "  settings",
    ]
    for p in plan:
        hours = "-" if not (p["to_run"] or p["waiting"]) else _hours(p["seconds"])
        lines.append(
            f"{p['block']:>5}  {p['tag']:<14}{p['runs']:>5}{p['done']:>6}{p['to_run']:>8}"
            f"{p['waiting']:>9}{hours:>8}  {p['what']}"
        )
    todo = sum(p["to_run"] for p in plan)
    waiting = sum(p["waiting"] for p in plan)
    missing = [p for p in plan if p["to_run"] or p["waiting"]]
    unknown = sum(p["seconds"] is None for p in missing)
    total = sum(p["seconds"] or 0.0 for p in missing)
    lines.append(
        f"total: {todo} to run now, {waiting} waiting for their tuning; about {total / 3600:.1f} "
        "run-hours at the pace of the finished rows (divide by --jobs for the wall time)"
        + (f"; {unknown} block(s) without a comparable finished row not counted" if unknown else "")
    )
    return "\n".join(lines)


def _hours(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 3600:.2f}"


def _combos(base: dict[str, Any], block: dict[str, Any]) -> list[dict[str, Any]]:
    """Every setting of a block, with "tuned" values left as the string "tuned"."""
    own = {k: v for k, v in block.items() if k not in ("tag", "tuned_by", "tuned_from")}
    keys = sorted(own)
    values = [v if isinstance(v, list) else [v] for v in (own[k] for k in keys)]
    return [{**base, **dict(zip(keys, c, strict=True))} for c in itertools.product(*values)]


def _skipped(combos: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The combos that expand_block left out (their tuning is not finished): it keeps the order
    of the combos and only replaces "tuned" values, so the two lists align."""
    out, j = [], 0
    for c in combos:
        fixed = {k: v for k, v in c.items() if v != "tuned"}
        if j < len(runs) and all(runs[j].get(k) == v for k, v in fixed.items()):
            j += 1
        else:
            out.append(c)
    return out


def _costs(rows: list[dict[str, str]]) -> list[tuple[dict[str, str], float]]:
    out = []
    for r in rows:
        try:
            seconds = float(r.get("wall_seconds") or "")
            given = json.loads(r.get("settings") or "{}")
        except ValueError:
            continue
        if r.get("status") == "ok":
            out.append(({k: str(v) for k, v in given.items()}, seconds))
    return out


def _estimate(settings: dict[str, Any], costs: list[tuple[dict[str, str], float]]) -> float | None:
    want = {k: str(v) for k, v in settings.items()}
    for n in range(len(COST_KEYS), 0, -1):
        keys = COST_KEYS[:n]
        same = [s for given, s in costs if all(given.get(k) == want.get(k) for k in keys)]
        if same:
            return statistics.median(same)
    return None
