"""Every plot of the package, in one module imported only when a plot is drawn.

matplotlib is imported inside each function (with the non-interactive Agg backend), so importing
the training loop, the mechanism or the core packages never imports it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from dpmicroadam.audit.run import AuditResult

__all__ = ["plot_learning_curves", "plot_run", "plot_scores", "plot_sweep"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_run(rows: list[dict[str, Any]], out_dir: str | Path, title: str) -> list[Path]:
    """PNG plots of test accuracy and ε against steps. Returns the written paths."""
    plt = _pyplot()

    out_dir = Path(out_dir)
    steps = [r["step"] for r in rows]
    written = []
    for key, label, name in (
        ("test_accuracy", "test accuracy", "accuracy.png"),
        ("epsilon", "ε spent", "epsilon.png"),
    ):
        ys = [r.get(key) for r in rows]
        if not any(y is not None for y in ys):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot(steps, ys, marker="o", ms=3)
        if key == "test_accuracy" and any(r.get("val_accuracy") is not None for r in rows):
            ax.plot(steps, [r.get("val_accuracy") for r in rows], marker=".", ms=3, alpha=0.6)
            ax.legend(["test", "validation"], fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def plot_sweep(
    records: list[dict[str, Any]],
    results_dir: Path,
    name: str,
    specs: dict[str, tuple[str, bool]],
) -> list[Path]:
    """One PNG per tag of ``specs`` (tag -> (x column, log axis)): test accuracy per optimizer."""
    plt = _pyplot()

    written = []
    for tag, (xkey, xlog) in specs.items():
        recs = [r for r in records if r["tag"] == tag and r["test"][0] == r["test"][0]]
        if tag in ("epsilon", "clip"):  # the tuned setting is the ε = 3 / default-C point
            recs += [r for r in records if r["tag"] == "tuned"]
        if not recs:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
        by_opt: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in recs:
            by_opt[r["optimizer"] if tag != "tune" else f"{r['optimizer']}"].append(r)
        for opt, rs in sorted(by_opt.items()):
            if tag == "tune":  # best test-free view: validation accuracy against lr, per optimizer
                pts = defaultdict(list)
                for r in rs:
                    pts[_num(r["lr"])].append(r["val"][0])
                xs = sorted(pts)
                ax.plot(xs, [max(pts[x]) for x in xs], marker="o", label=opt)
                continue
            # Several settings at one x (e.g. two lrs per density): show the best on validation.
            best_at: dict[str, dict[str, Any]] = {}
            for r in rs:
                if r[xkey] not in best_at or r["val"][0] > best_at[r[xkey]]["val"][0]:
                    best_at[r[xkey]] = r
            rs = list(best_at.values())
            if xkey == "lr_schedule":
                xs = [r[xkey] for r in rs]
            else:
                rs = sorted(rs, key=lambda r: _num(r[xkey]) or 0)
                xs = [_num(r[xkey]) for r in rs]
            ax.errorbar(
                xs,
                [100 * r["test"][0] for r in rs],
                yerr=[100 * r["test"][1] for r in rs],
                marker="o",
                capsize=3,
                label=opt,
            )
        if xlog:
            ax.set_xscale("log")
        ax.set_xlabel(xkey if tag != "tune" else "lr (best over other settings)")
        ax.set_ylabel("validation accuracy" if tag == "tune" else "test accuracy (%)")
        ax.set_title(f"{name}: {tag}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = results_dir / f"{name}-{tag}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def plot_learning_curves(rows: list[dict[str, str]], results_dir: Path, name: str) -> list[Path]:
    """Test accuracy against epoch for the best-validation run of each optimizer."""
    plt = _pyplot()

    best: dict[str, dict[str, str]] = {}
    for r in rows:
        v = _num(r["val_accuracy"])
        if (
            r["status"] == "ok"
            and v is not None
            and (
                r["optimizer"] not in best or v > (_num(best[r["optimizer"]]["val_accuracy"]) or 0)
            )
        ):
            best[r["optimizer"]] = r
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    drew = False
    for opt, r in sorted(best.items()):
        path = results_dir / "runs" / name / r["run_id"] / "metrics.jsonl"
        if not path.exists():
            continue
        pts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ax.plot(
            [p["epoch"] for p in pts],
            [100 * p["test_accuracy"] for p in pts],
            marker=".",
            label=f"{opt} (ε={r['target_epsilon']}, lr={r['lr']})",
        )
        drew = True
    if not drew:
        plt.close(fig)
        return []
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{name}: learning curves of the best-validation runs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = results_dir / f"{name}-curves.png"
    fig.savefig(out)
    plt.close(fig)
    return [out]


def plot_scores(result: AuditResult, path: str | Path) -> Path:
    """Histogram of canary scores, included vs excluded, with the guess thresholds."""
    plt = _pyplot()

    scores, truth = result.scores, result.truth
    fig, ax = plt.subplots(figsize=(6, 3.5))
    finite = scores[np.isfinite(scores)]
    bins = np.linspace(finite.min(), finite.max(), 50) if finite.size else 10
    ax.hist(scores[truth], bins=bins, alpha=0.6, label=f"included ({int(truth.sum())})")
    ax.hist(scores[~truth], bins=bins, alpha=0.6, label=f"excluded ({int((~truth).sum())})")
    ranked = np.sort(scores)[::-1]
    if result.k_pos:
        ax.axvline(ranked[result.k_pos - 1], color="k", ls="--", lw=0.8)
    if result.k_neg:
        ax.axvline(ranked[len(ranked) - result.k_neg], color="k", ls=":", lw=0.8)
    ax.set_xlabel(f"canary score ({result.score})")
    ax.set_ylabel("canaries")
    ax.set_title(
        f"{result.mode}: ε ≥ {result.epsilon_lower_bound:.2f} "
        f"(accounted {result.accounted_epsilon:.2f})",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
