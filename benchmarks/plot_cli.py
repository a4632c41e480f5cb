"""Plot the verdicts of ``bench_cli.py``: each row's median paired ratio and its 95 % interval.

The rows of ``results/benchmarks/cli_cpu.jsonl`` that carry an interval (from the fifteenth
session on) are drawn in the order they were written, one panel per model, against the model's
goal (issue 16). A row is ``met`` only if its whole interval lies at or below the goal, ``missed``
only if wholly above; the picture shows how far the intervals of one code on one machine move
from row to row, and which CPU each row ran on.

    python benchmarks/plot_cli.py                      # writes results/benchmarks/cli_verdicts.png
    python benchmarks/plot_cli.py --rows R.jsonl --out F.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "results" / "benchmarks" / "cli_cpu.jsonl"
OUT = ROOT / "results" / "benchmarks" / "cli_verdicts.png"
MODELS = ("mlp", "cnn", "wrn16-4")
COLOURS = {"met": "tab:green", "unsettled": "tab:orange", "missed": "tab:red"}


def verdict_rows(path: Path) -> dict[str, list[dict]]:
    """The rows with an interval, per model, in file order (other rows are skipped).

    Raises:
        ValueError: naming the line of a row that is not JSON, or whose interval is not two
            numbers around its median.
    """
    rows: dict[str, list[dict]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err})") from err
        if row.get("bench") != "cli" or "paired_ratio_ci95" not in row:
            continue
        low, high = row["paired_ratio_ci95"]
        if not low <= row["paired_ratio"] <= high:
            raise ValueError(
                f"{path}, line {number}: median {row['paired_ratio']} outside its interval "
                f"[{low}, {high}]"
            )
        rows.setdefault(row["model"], []).append(row)
    return rows


def plot_verdicts(rows: dict[str, list[dict]], out: Path) -> Path:
    """One panel per model: medians with 95 % intervals, coloured by verdict, the goal dashed.

    Raises:
        ValueError: if there is no row to draw.
    """
    if not any(rows.values()):
        raise ValueError("no bench_cli row with an interval to plot")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if rows.get(m)] + sorted(set(rows) - set(MODELS))
    # Each panel as wide as its rows need (a tick label every 0.32 inch), at least 4.2 inches.
    widths = [max(4.2, 1.2 + 0.32 * len(rows[m])) for m in models]
    fig, axes = plt.subplots(
        1, len(models), figsize=(sum(widths), 3.8), squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )  # fmt: skip
    for ax, model in zip(axes[0], models):
        entries = rows[model]
        for i, row in enumerate(entries):
            low, high = row["paired_ratio_ci95"]
            median = row["paired_ratio"]
            colour = COLOURS.get(row.get("verdict"), "tab:gray")
            marker = "s" if row.get("cpu") else "o"
            ax.errorbar(
                i, median, yerr=[[median - low], [high - median]], fmt=marker, color=colour,
                capsize=3,
            )  # fmt: skip
        ax.axhline(entries[0]["goal"], color="black", linestyle="--", linewidth=1, label="goal")
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels(
            [f"{r['commit']}\n{r['steps']}×{r['repeats']}" for r in entries], fontsize=7,
            rotation=60,
        )  # fmt: skip
        ax.set_title(model)
        ax.set_ylabel("DP / non-private time per step")
    handles = [
        plt.Line2D([], [], color=c, marker="o", linestyle="", label=v) for v, c in COLOURS.items()
    ]
    handles.append(plt.Line2D([], [], color="gray", marker="s", linestyle="", label="CPU named"))
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="goal"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(
        "dpmicroadam train, DP against non-private: median paired ratio and 95 % interval",
        y=0.935, fontsize=9,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, default=ROWS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    print(plot_verdicts(verdict_rows(args.rows), args.out))


if __name__ == "__main__":
    main()
