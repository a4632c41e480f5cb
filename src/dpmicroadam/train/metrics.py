"""Metrics sink (JSON lines) and the run's plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON-lines log of evaluations; on resume, rows past the checkpoint are dropped
    (they are recomputed identically)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line torn by a kill: drop it
                        break

    def truncate(self, step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        tmp.replace(self.path)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def plot_run(rows: list[dict[str, Any]], out_dir: str | Path, title: str) -> list[Path]:
    """PNG plots of test accuracy and ε against steps. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
