"""Tables and plots of a sweep's results (mean ± std over seeds)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

SETTING_KEYS = (
    "dataset",
    "trainable",
    "optimizer",
    "target_epsilon",
    "clip_norm",
    "lr",
    "lr_schedule",
    "momentum",
    "batch_size",
    "epochs",
    "density",
    "window_size",
    "ef_bits",
    "augmult",
    "width",
    "adam_eps_noise",
    "topk_block",
    "density_head",
    "ef_rounding",
)
# For each tag: the column on the x axis of its plot, and whether that axis is logarithmic.
PLOTS = {
    "epsilon": ("target_epsilon", False),
    "clip": ("clip_norm", True),
    "density": ("density", True),
    "tune": ("lr", True),
    "schedule": ("lr_schedule", False),
}


def _f(v: str) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x


def group_rows(rows: list[dict[str, str]]) -> dict[tuple, list[dict[str, str]]]:
    """Rows grouped by (tag, settings without the seed)."""
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["tag"], *(r.get(k, "") for k in SETTING_KEYS))].append(r)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One record per (tag, settings): seeds, val and test accuracy mean ± std, ε spent."""
    out = []
    for key, members in group_rows(rows).items():
        ok = [m for m in members if m["status"] == "ok"]
        val = [v for v in (_f(m["val_accuracy"]) for m in ok) if v is not None]
        test = [v for v in (_f(m["test_accuracy"]) for m in ok) if v is not None]
        eps = [v for v in (_f(m["epsilon"]) for m in ok) if v is not None]
        rec = dict(zip(("tag", *SETTING_KEYS), key))
        rec.update(
            settings=members[0].get("settings", ""),
            seeds=len(members),
            diverged=len(members) - len(ok),
            val=mean_std(val),
            test=mean_std(test),
            epsilon=max(eps) if eps else None,
            wall=sum(_f(m["wall_seconds"]) or 0.0 for m in members),
        )
        out.append(rec)
    return out


def best_by_validation(
    records: list[dict[str, Any]], tag: str = "tune"
) -> dict[str, dict[str, Any]]:
    """For each optimizer, the setting of ``tag`` with the best mean validation accuracy."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["tag"] != tag or r["val"][0] != r["val"][0]:
            continue
        if r["optimizer"] not in best or r["val"][0] > best[r["optimizer"]]["val"][0]:
            best[r["optimizer"]] = r
    return best


# A setting's name in a sweep file -> its column in the CSV, where they differ.
COLUMN_OF = {"epsilon": "target_epsilon"}


def best_matching(
    records: list[dict[str, Any]], wanted: dict[str, Any], tag: str = "tune"
) -> dict[str, Any] | None:
    """The ``tag`` record with the best mean validation accuracy among those matching ``wanted``.

    ``wanted`` maps setting names (``optimizer``, ``trainable``, ``epsilon``, ...) to values; a
    record matches when each equals its column (numbers compared as numbers).
    """
    best = None
    for r in records:
        if r["tag"] != tag or r["val"][0] != r["val"][0]:
            continue
        given = _given(r)
        if not all(_same(_setting(r, given, k), v) for k, v in wanted.items()):
            continue
        if best is None or r["val"][0] > best["val"][0]:
            best = r
    return best


def _given(record: dict[str, Any]) -> dict[str, Any]:
    """The settings the run asked for (its ``settings`` JSON); empty for an older CSV."""
    try:
        return json.loads(record.get("settings") or "{}")
    except ValueError:
        return {}


def _setting(record: dict[str, Any], given: dict[str, Any], key: str) -> Any:
    """What the run asked for, else its CSV column.

    A column can hold a realized value instead: ``epochs`` is the steps' worth of epochs (3.008 for
    ``epochs = 3`` at batch 128), so matching a requested setting against it would find nothing.
    """
    if key in given:
        return given[key]
    return record.get(COLUMN_OF.get(key, key), "")


def _same(column: Any, value: Any) -> bool:
    if value is None:
        return column in ("", None)
    a, b = _f(column), _f(value) if not isinstance(value, bool) else None
    if a is not None and b is not None:
        return a == b
    return str(column) == str(value)


def markdown_table(records: list[dict[str, Any]]) -> str:
    head = (
        "| tag | optimizer | ε target | ε spent | C | lr | schedule | momentum | density | m | "
        "seeds | val acc | test acc |\n|" + "---|" * 13 + "\n"
    )
    lines = []
    for r in sorted(
        records,
        key=lambda r: (
            r["tag"],
            r["optimizer"],
            _f(r["target_epsilon"]) or 0,
            _f(r["clip_norm"]) or 0,
            _f(r["lr"]) or 0,
        ),
    ):
        eps = f"{r['epsilon']:.3f}" if r["epsilon"] is not None else "–"
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(
            f"| {r['tag']} | {r['optimizer']} | {r['target_epsilon']} | {eps} | {r['clip_norm']} | "
            f"{r['lr']} | {r['lr_schedule']} | {r['momentum']} | {r['density']} | "
            f"{r['window_size']} | {r['seeds']}{div} | {_pm(r['val'])} | {_pm(r['test'])} |"
        )
    return head + "\n".join(lines) + "\n"


def _pm(ms: tuple[float, float]) -> str:
    m, s = ms
    if m != m:
        return "–"
    return f"{100 * m:.2f} ± {100 * s:.2f}"


MATCH_KEYS = (
    "lr",
    "clip_norm",
    "density",
    "momentum",
    "target_epsilon",
    "lr_schedule",
    "window_size",
    "epochs",
    "batch_size",
)


def tuned_records(
    rows: list[dict[str, str]], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each optimizer's tuned setting pooled over its seeds (the `tune` run and the `seeds` runs).

    Returned with tag ``"tuned"``; the ε and clipping plots use them as their ε = 3, C = default
    points, so those plots show mean ± std over every seed of the tuned setting.
    """
    out = []
    for opt, best in best_by_validation(records).items():
        same = [
            r
            for r in rows
            if r["tag"] in ("tune", "seeds")
            and r["optimizer"] == opt
            and r["status"] == "ok"
            and all(
                _f(r.get(k, "")) == _f(best.get(k, ""))
                if _f(best.get(k, "")) is not None
                else r.get(k, "") == best.get(k, "")
                for k in MATCH_KEYS
            )
        ]
        val = [_f(r["val_accuracy"]) for r in same]
        test = [_f(r["test_accuracy"]) for r in same]
        out.append(
            {
                **best,
                "tag": "tuned",
                "seeds": len(same),
                "diverged": 0,
                "val": mean_std([v for v in val if v is not None]),
                "test": mean_std([v for v in test if v is not None]),
            }
        )
    return out


def write_report(rows: list[dict[str, str]], results_dir: Path, name: str) -> list[Path]:
    """Write ``<name>.md`` (table) and PNG plots next to the CSV. Returns the written paths."""
    results_dir = Path(results_dir)
    records = summarize(rows)
    from dpmicroadam.plots import plot_learning_curves, plot_sweep

    written = [results_dir / f"{name}.md"]
    best = best_by_validation(records)
    text = f"# Sweep `{name}`\n\n{len(rows)} runs. Mean ± std over seeds, accuracy in %.\n\n"
    if best:
        text += "Best setting per optimizer on the validation split (tag `tune`):\n\n"
        for opt, r in sorted(best.items()):
            text += (
                f"- {opt}: lr {r['lr']}, C {r['clip_norm']}, momentum {r['momentum']}, "
                f"density {r['density']}, m {r['window_size']} → val {_pm(r['val'])}, "
                f"test {_pm(r['test'])}\n"
            )
        text += "\n"
    tuned = tuned_records(rows, records)
    if tuned:
        text += "Tuned setting of each optimizer, pooled over seeds (tag `tuned`):\n\n"
        text += markdown_table(tuned) + "\n"
    text += "All settings:\n\n" + markdown_table(records)
    written[0].write_text(text)
    if records:
        written += plot_sweep(records + tuned, results_dir, name, PLOTS)
        written += plot_learning_curves(rows, results_dir, name)
    return written
