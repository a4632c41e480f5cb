"""Tables and a plot of the Fashion-MNIST scans (results/fashion-mnist-scans.csv) for docs/results.md.

    python studies/scans_report.py [--csv results/fashion-mnist-scans.csv]

At each scan point (batch size, width, eps multiple) each optimizer keeps its best learning rate
on the validation split; the test accuracy of that run is reported with the validation accuracy
that chose it. Writes results/fashion-mnist-scans-summary.md and fashion-mnist-scans-steps.png.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

LABEL = {"dp-microadam": "DP-MicroAdam 1 %", "dp-adam": "DP-Adam"}


def _f(v: str | None) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def best(rows: list[dict[str, str]], tag: str, point: str) -> dict[tuple[str, str], dict]:
    """(point value, optimizer) -> the best-validation row and the mean over its seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if r["tag"] == tag and r["status"] == "ok" and _f(r["val_accuracy"]) is not None:
            groups[(r[point] or "0", r["optimizer"], r["lr"])].append(r)
    out: dict[tuple[str, str], dict] = {}
    for (value, opt, lr), members in groups.items():
        val = statistics.fmean(_f(m["val_accuracy"]) for m in members)
        test = [_f(m["test_accuracy"]) for m in members]
        rec = {
            "lr": lr,
            "val": val,
            "test": test,
            "bytes": _f(members[0]["optimizer_state_bytes_per_param"]),
        }
        if (value, opt) not in out or val > out[(value, opt)]["val"]:
            out[(value, opt)] = rec
    return out


def _pct(values: list[float]) -> str:
    m = 100 * statistics.fmean(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {100 * statistics.stdev(values):.2f}"


def table(cells: dict[tuple[str, str], dict], point: str) -> str:
    values = sorted({v for v, _ in cells}, key=lambda v: _f(v) or 0)
    text = (
        f"| {point} | DP-Adam (lr) val / test | DP-MicroAdam 1 % (lr) val / test | gap (test) |\n"
    )
    text += "|---|---|---|---|\n"
    for v in values:
        a, m = cells.get((v, "dp-adam")), cells.get((v, "dp-microadam"))
        fmt = lambda c: f"{100 * c['val']:.2f} / {_pct(c['test'])} ({c['lr']})" if c else "–"  # noqa: E731
        gap = (
            f"{100 * (statistics.fmean(m['test']) - statistics.fmean(a['test'])):+.2f}"
            if a and m
            else "–"
        )
        text += f"| {v} | {fmt(a)} | {fmt(m)} | {gap} |\n"
    return text


def seeds_table(rows: list[dict[str, str]]) -> str:
    """Mean ± std over the seeds of each ``*-seeds`` block, per point and optimizer."""
    groups: dict[tuple[str, str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if r["tag"].endswith("-seeds") and r["status"] == "ok":
            key = (r["tag"], r["batch_size"], r["width"] or "1", r["adam_eps_noise"] or "0")
            groups[key + (r["optimizer"],)].append(r)  # type: ignore[index]
    if not groups:
        return ""
    text = "## Seeds of the tuned settings (test accuracy, mean ± std)\n\n"
    text += "| block | batch | width | eps multiple | optimizer | lr | seeds | val | test | bytes/param |\n"
    text += "|---|---|---|---|---|---|---|---|---|---|\n"
    for (tag, batch, width, eps, opt), members in sorted(groups.items()):
        val = [_f(m["val_accuracy"]) for m in members]
        test = [_f(m["test_accuracy"]) for m in members]
        lrs = sorted({m["lr"] for m in members})
        text += (
            f"| {tag} | {batch} | {width} | {eps} | {LABEL.get(opt, opt)} | {', '.join(lrs)} | "
            f"{len(members)} | {_pct(val)} | {_pct(test)} | "
            f"{_f(members[0]['optimizer_state_bytes_per_param']):.2f} |\n"
        )
    return text + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="results/fashion-mnist-scans.csv")
    args = ap.parse_args()
    path = Path(args.csv)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    text = f"# Fashion-MNIST scans: {len(rows)} runs (`{path}`)\n\nTest accuracy in %.\n\n"
    sections = {}
    for tag, point, title in (
        ("steps", "batch_size", "Steps: expected batch size (10 epochs, ε = 3)"),
        ("width", "width", "Width: channel multiplier of the CNN (batch 256)"),
        ("eps", "adam_eps_noise", "Adam's eps as a multiple of σC/B (batch 256)"),
    ):
        cells = best(rows, tag, point)
        if tag in ("width", "eps"):  # the multiplier 1 / eps 0 points are the batch-256 steps rows
            base = best(rows, "steps", "batch_size")
            for opt in LABEL:
                if ("256", opt) in base:
                    cells.setdefault(("1" if tag == "width" else "0", opt), base[("256", opt)])
        sections[tag] = cells
        text += f"## {title}\n\n" + table(cells, point) + "\n"
    text += seeds_table(rows)
    fid = [r for r in rows if r["tag"] == "fidelity"]
    if fid:
        text += "## The authors' variant (batch 2048, lr 3e-3, fp32 window values)\n\n"
        text += "| ef_bits | top-k | val | test |\n|---|---|---|---|\n"
        for r in fid:
            text += (
                f"| {r['ef_bits'] or 'none'} | {r['topk_block']} | "
                f"{100 * _f(r['val_accuracy']):.2f} | {100 * _f(r['test_accuracy']):.2f} |\n"
            )
    out = path.parent / "fashion-mnist-scans-summary.md"
    out.write_text(text)
    print(text)
    plot(sections["steps"], path.parent / "fashion-mnist-scans-steps.png")


def plot(cells: dict[tuple[str, str], dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for opt, label in LABEL.items():
        pts = sorted(
            (float(v), 100 * statistics.fmean(c["test"])) for (v, o), c in cells.items() if o == opt
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expected batch size (10 epochs: more steps to the left)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, tanh CNN, ε = 3: lr tuned on validation at each point", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print("wrote", out)


if __name__ == "__main__":
    main()
