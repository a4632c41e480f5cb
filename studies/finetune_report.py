"""Tables and plots of the fine-tuning study (results/finetune-wordnet.csv) for docs/results.md.

    python studies/finetune_report.py [--csv results/finetune-wordnet.csv]

Writes results/finetune-wordnet-summary.md (mode × optimizer × ε, mean ± std over the seeds of
each optimizer's tuned setting, with trainable parameters, optimizer state, peak memory and
seconds per step) and two plots: test accuracy per mode at ε = 8 and 3, and accuracy against
optimizer state. The tuned setting of an optimizer in a mode is its best `tune` row on the
validation split; the test split chooses nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

MODES = ("head", "bias", "lora", "all")
OPTIMIZERS = ("dp-microadam", "dp-microadam+dense-head", "dp-microadam+eps", "dp-adam", "dp-sgd")
LABEL = {
    "dp-microadam": "DP-MicroAdam",
    "dp-microadam+dense-head": "DP-MicroAdam, dense head",
    "dp-microadam+eps": "DP-MicroAdam, eps 3·σC/B (explored)",
    "dp-adam": "DP-Adam",
    "dp-sgd": "DP-SGD",
    "adam": "Adam",
}


def variant(row: dict[str, str]) -> str:
    """The optimizer, told apart by its dense-head and eps options."""
    if row.get("adam_eps_noise") and row["optimizer"] == "dp-microadam":
        return "dp-microadam+eps"
    return row["optimizer"] + ("+dense-head" if row.get("density_head") else "")


# the rows an optimizer's setting is chosen from: the equal-budget `tune` block, or, for the
# eps variant, the `eps` exploration (a larger search, shown as such)
CHOSEN_FROM = {"dp-microadam+eps": "eps"}
SEEDED = ("tune", "seeds", "eps", "eps-seeds")


def _f(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _key(row: dict[str, str]) -> tuple:
    """The run's setting without its seed and ε (what tuning chose)."""
    settings = json.loads(row.get("settings") or "{}")
    settings.pop("seed", None)
    settings.pop("epsilon", None)
    return tuple(sorted((k, str(v)) for k, v in settings.items()))


def tuned(rows: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
    """(mode, optimizer) -> the best `tune` row on validation."""
    best: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        if r["status"] != "ok" or _f(r["val_accuracy"]) is None:
            continue
        if r["tag"] != CHOSEN_FROM.get(variant(r), "tune"):
            continue
        k = (r["trainable"], variant(r))
        if k not in best or _f(r["val_accuracy"]) > _f(best[k]["val_accuracy"]):
            best[k] = r
    return best


def cells(rows: list[dict[str, str]]) -> dict[tuple[str, str, float], dict]:
    """(mode, optimizer, ε) -> test accuracies over the seeds of the tuned setting, and costs."""
    best = tuned(rows)
    out: dict[tuple[str, str, float], dict] = {}
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if r["tag"] in SEEDED and r["status"] == "ok":
            groups[(r["trainable"], variant(r), _f(r["target_epsilon"]), _key(r))].append(r)
    for (mode, opt), rec in best.items():
        for (m, o, eps, key), members in groups.items():
            if (m, o) != (mode, opt) or key != _key(rec):
                continue
            seeds = {r["seed"]: r for r in members}  # the tune row and its seed-0 twin are one run
            tests = [_f(r["test_accuracy"]) for r in seeds.values()]
            out[(mode, opt, eps)] = {
                "test": tests,
                "lr": rec["lr"],
                "state_bytes": _f(members[0]["optimizer_state_bytes"]),
                "trainable": _f(members[0]["trainable_parameters"]),
                "peak_mb": statistics.fmean(_f(r["peak_memory_mb"]) for r in members),
                "sec_per_step": statistics.fmean(_f(r["seconds_per_step"]) for r in members),
            }
    return out


def ceilings(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    best: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["tag"] == "ceiling" and r["status"] == "ok" and _f(r["val_accuracy"]) is not None:
            m = r["trainable"]
            if m not in best or _f(r["val_accuracy"]) > _f(best[m]["val_accuracy"]):
                best[m] = r
    return best


def _pm(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f} ({len(values)})"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    """A markdown table: the header, its separator and one line per row of cells."""
    rule = "|" + "---|" * len(header) + "\n"
    lines = ["| " + " | ".join(cells) + " |\n" for cells in (header, *body)]
    return lines[0] + rule + "".join(lines[1:])


def _mb(b: float | None) -> str:
    if b is None:
        return "–"
    return f"{b / 2**20:.2f} MB" if b >= 2**20 else f"{b / 1024:.1f} kB"


def table(rows: list[dict[str, str]]) -> str:
    c, ceil = cells(rows), ceilings(rows)
    epsilons = sorted({eps for (_, _, eps) in c if eps is not None}, reverse=True)
    head = "| mode | optimizer | lr | " + " | ".join(f"ε = {e:g}" for e in epsilons)
    head += " | trainable params | optimizer state | peak RSS | s/step |\n"
    head += "|" + "---|" * (4 + len(epsilons) + 3) + "\n"
    lines = []
    for mode in MODES:
        for opt in OPTIMIZERS:
            any_cell = next((c[(mode, opt, e)] for e in epsilons if (mode, opt, e) in c), None)
            if any_cell is None:
                continue
            accs = " | ".join(_pm(c.get((mode, opt, e), {}).get("test", [])) for e in epsilons)
            lines.append(
                f"| {mode} | {LABEL[opt]} | {any_cell['lr']} | {accs} | "
                f"{int(any_cell['trainable']):,} | {_mb(any_cell['state_bytes'])} | "
                f"{any_cell['peak_mb']:.0f} MB | {any_cell['sec_per_step']:.2f} |"
            )
        if mode in ceil:
            r = ceil[mode]
            blank = " | ".join("" for _ in epsilons)
            lines.append(
                f"| {mode} | Adam, not private (ceiling) | {r['lr']} | {blank} | "
                f"{int(_f(r['trainable_parameters'])):,} | {_mb(_f(r['optimizer_state_bytes']))} | "
                f"{_f(r['peak_memory_mb']):.0f} MB | {_f(r['seconds_per_step']):.2f} |"
            )
            lines[-1] = lines[-1].replace(
                f"| {blank} |",
                f"| {100 * _f(r['test_accuracy']):.1f} (non-private) |"
                + " |" * (len(epsilons) - 1),
                1,
            )
    return head + "\n".join(lines) + "\n"


def tuning_table(rows: list[dict[str, str]]) -> str:
    """Every `tune` run: validation accuracy per learning rate (ε = 8, seed 0); the chosen one in bold."""
    best = tuned(rows)
    grid: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if r["tag"] == "tune" and r["status"] == "ok" and _f(r["val_accuracy"]) is not None:
            grid[(r["trainable"], variant(r))].append(r)
    text = "| mode | optimizer | validation accuracy (%) at each lr (chosen in bold) |\n|---|---|---|\n"
    for mode in MODES:
        for opt in OPTIMIZERS:
            members = sorted(grid.get((mode, opt), []), key=lambda r: _f(r["lr"]))
            if not members:
                continue
            cells_ = []
            for r in members:
                cell = f"{r['lr']}: {100 * _f(r['val_accuracy']):.1f}"
                cells_.append(f"**{cell}**" if r is best[(mode, opt)] else cell)
            text += f"| {mode} | {LABEL[opt]} | {', '.join(cells_)} |\n"
    return text


def eps_table(rows: list[dict[str, str]]) -> str:
    """The `eps` exploration: eps = k·σC/B against the tuned setting's seed-0 run (ε = 8)."""
    best = tuned(rows)
    explored = [r for r in rows if r["tag"] == "eps" and r["status"] == "ok"]
    if not explored:
        return ""
    text = "| mode | optimizer | eps | lr | val | test |\n|---|---|---|---|---|---|\n"
    for mode in MODES:
        for opt in OPTIMIZERS:
            mine = [r for r in explored if (r["trainable"], r["optimizer"]) == (mode, opt)]
            if not mine or (mode, opt) not in best:
                continue
            for r in [best[(mode, opt)], *sorted(mine, key=lambda r: _f(r["lr"]))]:
                eps = f"{r['adam_eps_noise']}·σC/B" if r.get("adam_eps_noise") else "1e-8"
                text += (
                    f"| {mode} | {LABEL[opt]} | {eps} | {r['lr']} | "
                    f"{100 * _f(r['val_accuracy']):.1f} | {100 * _f(r['test_accuracy']):.1f} |\n"
                )
    return text


def batch32_table(rows: list[dict[str, str]]) -> str:
    """LoRA at expected batch 32 (`b32-*` rows) beside the same optimizers' batch-128 cells."""
    best: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["tag"] == "b32-tune" and r["status"] == "ok" and _f(r["val_accuracy"]) is not None:
            v = variant(r)
            if v not in best or _f(r["val_accuracy"]) > _f(best[v]["val_accuracy"]):
                best[v] = r
    if not best:
        return ""
    seeds: dict[tuple[str, float], dict[str, float]] = defaultdict(dict)
    for r in rows:
        v = variant(r)
        if (r["tag"] in ("b32-tune", "b32-seeds") and r["status"] == "ok" and v in best
                and r["lr"] == best[v]["lr"]):  # fmt: skip
            seeds[(v, _f(r["target_epsilon"]))][r["seed"]] = _f(r["test_accuracy"])
    c128 = cells(rows)
    text = "| optimizer | batch (steps) | lr | ε = 8 | ε = 3 | validation, seed 0, ε = 8 |\n"
    text += "|---|---|---|---|---|---|\n"
    for v in OPTIMIZERS:
        if v not in best:
            continue
        if (m := c128.get(("lora", v, 8.0))) is not None:
            t3 = c128.get(("lora", v, 3.0), {}).get("test", [])
            text += f"| {LABEL[v]} | 128 (235) | {m['lr']} | {_pm(m['test'])} | {_pm(t3)} | |\n"
        r = best[v]
        accs = " | ".join(_pm(list(seeds[(v, e)].values())) for e in (8.0, 3.0))
        text += (
            f"| {LABEL[v]} | 32 ({r['steps']}) | {r['lr']} | {accs} | "
            f"{100 * _f(r['val_accuracy']):.1f} |\n"
        )
    return text


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, and its NullFormatter (imported late:
    the tables need no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    return plt, NullFormatter


def density_cells(rows: list[dict[str, str]]) -> dict[float, dict]:
    """Head mode, DP-MicroAdam per density: the lr chosen on validation among its `density-tune`
    runs (the 1 % point from the main tuning), and the test accuracies of its seeds per ε."""
    best: dict[float, dict[str, str]] = {}
    for r in rows:
        if r["trainable"] != "head" or variant(r) != "dp-microadam" or r["status"] != "ok":
            continue
        if r["tag"] in ("density-tune", "tune") and _f(r["val_accuracy"]) is not None:
            d = _f(r["density"])
            if d not in best or _f(r["val_accuracy"]) > _f(best[d]["val_accuracy"]):
                best[d] = r
    if not any(r["tag"] == "density-tune" for r in best.values()):
        return {}
    out: dict[float, dict] = {}
    for d, rec in best.items():
        seeded = ("density-tune", "density-seeds") if rec["tag"] == "density-tune" else SEEDED
        tests: dict[float, dict[str, float]] = defaultdict(dict)
        for r in rows:
            if (r["tag"] in seeded and r["trainable"] == "head" and variant(r) == "dp-microadam"
                    and r["status"] == "ok" and _key(r) == _key(rec)):  # fmt: skip
                tests[_f(r["target_epsilon"])][r["seed"]] = _f(r["test_accuracy"])
        out[d] = {
            "row": rec,
            "test": {e: list(v.values()) for e, v in tests.items()},
            "state_bytes": _f(rec["optimizer_state_bytes"]),
            "per_param": _f(rec["optimizer_state_bytes_per_param"]),
        }
    return out


def density_table(rows: list[dict[str, str]]) -> str:
    """Head mode: DP-MicroAdam's accuracy and state per density, beside DP-Adam and DP-SGD."""
    dc = density_cells(rows)
    if not dc:
        return ""
    c = cells(rows)
    text = "| optimizer | density | lr | validation (seed 0, ε = 8) | ε = 8 | ε = 3 | optimizer state | bytes/param |\n"
    text += "|---|---|---|---|---|---|---|---|\n"
    for d in sorted(dc):
        cell, r = dc[d], dc[d]["row"]
        accs = " | ".join(_pm(cell["test"].get(e, [])) for e in (8.0, 3.0))
        text += (
            f"| DP-MicroAdam | {100 * d:g} % | {r['lr']} | {100 * _f(r['val_accuracy']):.1f} | "
            f"{accs} | {_mb(cell['state_bytes'])} | {cell['per_param']:.2f} |\n"
        )
    for opt in ("dp-adam", "dp-sgd"):
        if (m := c.get(("head", opt, 8.0))) is not None:
            t3 = c.get(("head", opt, 3.0), {}).get("test", [])
            text += (
                f"| {LABEL[opt]} | dense | {m['lr']} | | {_pm(m['test'])} | {_pm(t3)} | "
                f"{_mb(m['state_bytes'])} | {m['state_bytes'] / m['trainable']:.2f} |\n"
            )
    return text


def mode_density_lines(rows: list[dict[str, str]]) -> list[dict]:
    """Modes other than head: DP-MicroAdam's `density` rows (seed 0, ε = 8, at the lr tuned at
    1 %; `density-seeds` add seeds) beside its tuned 1 % setting. One dict per line: mode,
    density, lr, val (seed 0, ε = 8), t8, t3 (test accuracies), per_param, state_bytes; modes
    without a `density` row are left out."""
    best = tuned(rows)
    c = cells(rows)
    lines = []
    for mode in MODES[1:]:
        mine = [r for r in rows if r["trainable"] == mode and variant(r) == "dp-microadam"
                and r["status"] == "ok"]  # fmt: skip
        scan = [r for r in mine if r["tag"] == "density"]
        if not scan or (mode, "dp-microadam") not in best:
            continue
        one = best[(mode, "dp-microadam")]
        for r in sorted([one, *scan], key=lambda r: -_f(r["density"])):
            if r is one:  # the tuned 1 % setting: its seeds are the main table's cells
                t8, t3 = (c.get((mode, "dp-microadam", e), {}).get("test", []) for e in (8.0, 3.0))
            else:  # a scanned density: its scan row and its seeds, one test value per seed
                by_seed: dict[float, dict[str, float]] = defaultdict(dict)
                for q in mine:
                    if (q["tag"] in ("density", "density-seeds") and q["density"] == r["density"]
                            and q["lr"] == r["lr"]):  # fmt: skip
                        by_seed[_f(q["target_epsilon"])][q["seed"]] = _f(q["test_accuracy"])
                t8, t3 = list(by_seed[8.0].values()), list(by_seed[3.0].values())
            lines.append(dict(mode=mode, density=_f(r["density"]), lr=r["lr"],
                              val=_f(r["val_accuracy"]), t8=t8, t3=t3,
                              per_param=_f(r["optimizer_state_bytes_per_param"]),
                              state_bytes=_f(r["optimizer_state_bytes"])))  # fmt: skip
    return lines


def mode_density_table(rows: list[dict[str, str]]) -> str:
    """:func:`mode_density_lines` as a markdown table."""
    lines = mode_density_lines(rows)
    if not lines:
        return ""
    header = ["mode", "density", "lr", "validation (seed 0, ε = 8)", "ε = 8", "ε = 3",
              "optimizer state", "bytes/param"]  # fmt: skip
    return _markdown(header, [
        [x["mode"], f"{100 * x['density']:g} %", x["lr"], f"{100 * x['val']:.1f}", _pm(x["t8"]),
         _pm(x["t3"]), _mb(x["state_bytes"]), f"{x['per_param']:.2f}"]
        for x in lines
    ])  # fmt: skip


def density_plot(rows: list[dict[str, str]], out: Path) -> Path | None:
    dc = density_cells(rows)
    if not dc:
        return None
    plt, NullFormatter = _pyplot()

    c = cells(rows)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4), dpi=120, sharey=True)
    for ax, eps in zip(axes, (8.0, 3.0), strict=True):
        pts = sorted((cell["state_bytes"], d, cell["test"].get(eps, [])) for d, cell in dc.items())
        pts = [p for p in pts if p[2]]
        ax.errorbar([p[0] for p in pts], [100 * statistics.fmean(p[2]) for p in pts],
                    yerr=[100 * statistics.stdev(p[2]) if len(p[2]) > 1 else 0 for p in pts],
                    fmt="-o", capsize=2, color="C0", label="DP-MicroAdam")  # fmt: skip
        for x, d, t in pts:
            ax.annotate(f"{100 * d:g} %", (x, 100 * statistics.fmean(t)), fontsize=6,
                        xytext=(3, -9), textcoords="offset points")  # fmt: skip
        for j, opt in ((3, "dp-adam"), (4, "dp-sgd")):
            if (m := c.get(("head", opt, eps))) is not None and m["test"]:
                ax.errorbar([m["state_bytes"]], [100 * statistics.fmean(m["test"])],
                            yerr=[100 * statistics.stdev(m["test"]) if len(m["test"]) > 1 else 0],
                            fmt="s", capsize=2, color=f"C{j}", label=LABEL[opt])  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks([5e3, 1e4, 2e4, 5e4, 1e5], ["5 kB", "10 kB", "20 kB", "50 kB", "100 kB"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("optimizer state, 10 010 parameters")
        ax.set_title(f"head mode, 3 epochs, ε = {eps:g}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("DP-MicroAdam's density: memory against accuracy (mean ± std over seeds)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = out / "finetune-wordnet-density.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def epoch_cells(rows: list[dict[str, str]]) -> dict[tuple[str, int, int, float], dict]:
    """(optimizer, epochs, batch, ε) -> test accuracies over the seeds of the setting tuned there.

    The rows of studies/finetune-head-steps.toml: the lr is chosen per optimizer, epoch count and
    batch size on validation (ε = 8, seed 0), from `tune` rows (`eps` rows for the eps variant).
    """
    best: dict[tuple[str, int, int], dict[str, str]] = {}
    for r in rows:
        if r["status"] != "ok" or _f(r["val_accuracy"]) is None:
            continue
        if r["tag"] != CHOSEN_FROM.get(variant(r), "tune"):
            continue
        k = (variant(r), round(_f(r["epochs"])), int(r["batch_size"]))
        if k not in best or _f(r["val_accuracy"]) > _f(best[k]["val_accuracy"]):
            best[k] = r
    out: dict[tuple[str, int, int, float], dict] = {}
    for r in rows:
        if r["tag"] not in SEEDED or r["status"] != "ok":
            continue
        k = (variant(r), round(_f(r["epochs"])), int(r["batch_size"]))
        if k not in best or r["lr"] != best[k]["lr"]:
            continue
        cell = out.setdefault((*k, _f(r["target_epsilon"])),
                              {"seeds": {}, "lr": r["lr"], "steps": int(r["steps"])})  # fmt: skip
        cell["seeds"][r["seed"]] = _f(r["test_accuracy"])  # a tune row = its seed-0 twin
    for cell in out.values():
        cell["test"] = list(cell.pop("seeds").values())
    return out


def _ceilings_by_length(rows: list[dict[str, str]]) -> dict[tuple[int, int], dict[str, str]]:
    best: dict[tuple[int, int], dict[str, str]] = {}
    for r in rows:
        if r["tag"] == "ceiling" and r["status"] == "ok" and _f(r["val_accuracy"]) is not None:
            k = (round(_f(r["epochs"])), int(r["batch_size"]))
            if k not in best or _f(r["val_accuracy"]) > _f(best[k]["val_accuracy"]):
                best[k] = r
    return best


def epochs_table(rows: list[dict[str, str]]) -> str:
    c = epoch_cells(rows)
    if not c:
        return ""
    ceiling = _ceilings_by_length(rows)
    epsilons = sorted({k[3] for k in c}, reverse=True)
    text = "| batch | epochs (steps) | optimizer | lr | "
    text += " | ".join(f"ε = {e:g}" for e in epsilons) + " |\n|" + "---|" * (4 + len(epsilons))
    text += "\n"
    lengths = {(k[2], k[1]) for k in c} | {(b, n) for (n, b) in ceiling}
    for batch, epochs in sorted(lengths, key=lambda bn: (-bn[0], bn[1])):  # batch 128 first
        if (epochs, batch) in ceiling:
            r = ceiling[(epochs, batch)]
            text += (
                f"| {batch} | {epochs} ({r['steps']}) | Adam, not private (ceiling) | {r['lr']} | "
                f"{100 * _f(r['test_accuracy']):.1f} (non-private) |"
                + " |" * (len(epsilons) - 1)
                + "\n"
            )
        for opt in OPTIMIZERS:
            mine = [c[k] for k in c if k[:3] == (opt, epochs, batch)]
            if not mine:
                continue
            accs = " | ".join(
                _pm(c.get((opt, epochs, batch, e), {}).get("test", [])) for e in epsilons
            )
            text += (
                f"| {batch} | {epochs} ({mine[0]['steps']}) | {LABEL[opt]} | {mine[0]['lr']} | "
                f"{accs} |\n"
            )
    return text


def steps_density_table(rows: list[dict[str, str]]) -> str:
    """Head-steps rows: DP-MicroAdam below 1 % density (`density-*` tags) beside its 1 % setting
    and DP-Adam at the same length (batch 128); each density's lr chosen on validation."""
    best: dict[tuple[float, int], dict[str, str]] = {}
    for r in rows:
        if r["tag"] == "density-tune" and r["status"] == "ok" and _f(r["val_accuracy"]) is not None:
            k = (_f(r["density"]), round(_f(r["epochs"])))
            if k not in best or _f(r["val_accuracy"]) > _f(best[k]["val_accuracy"]):
                best[k] = r
    if not best:
        return ""
    tests: dict[tuple[float, int, float], dict[str, float]] = defaultdict(dict)
    for r in rows:
        k = (_f(r["density"]), round(_f(r["epochs"])))
        if (r["tag"] in ("density-tune", "density-seeds") and r["status"] == "ok" and k in best
                and r["lr"] == best[k]["lr"]):  # fmt: skip
            tests[(*k, _f(r["target_epsilon"]))][r["seed"]] = _f(r["test_accuracy"])
    c = epoch_cells(rows)
    per_param = {r["optimizer"] + r["density"]: _f(r["optimizer_state_bytes_per_param"])
                 for r in rows if r["status"] == "ok" and r["tag"] in SEEDED}  # fmt: skip
    text = "| epochs (steps) | optimizer | density | lr | ε = 8 | ε = 3 | bytes/param |\n"
    text += "|---|---|---|---|---|---|---|\n"
    for epochs in sorted({e for _, e in best}):
        for opt in ("dp-adam", "dp-microadam"):
            if (m := c.get((opt, epochs, 128, 8.0))) is None:
                continue
            t3 = c.get((opt, epochs, 128, 3.0), {}).get("test", [])
            dens = "1 %" if opt == "dp-microadam" else "dense"
            bpp = per_param.get(opt + "0.01")  # DP-Adam's rows carry the default density too
            text += (
                f"| {epochs} ({m['steps']}) | {LABEL[opt]} | {dens} | {m['lr']} | "
                f"{_pm(m['test'])} | {_pm(t3)} | {'–' if bpp is None else f'{bpp:.2f}'} |\n"
            )
        for d in sorted((d for d, e in best if e == epochs), reverse=True):
            r = best[(d, epochs)]
            accs = " | ".join(_pm(list(tests[(d, epochs, e)].values())) for e in (8.0, 3.0))
            text += (
                f"| {epochs} ({r['steps']}) | DP-MicroAdam | {100 * d:g} % | {r['lr']} | {accs} | "
                f"{_f(r['optimizer_state_bytes_per_param']):.2f} |\n"
            )
    return text


def _error_feedback(row: dict[str, str]) -> str:
    """How a row keeps MicroAdam's error feedback: "4-bit", "4-bit, stochastic", "8-bit", "exact"."""
    bits = row.get("ef_bits") or "4"
    if bits == "none":
        return "exact (fp32)"
    return f"{bits}-bit" + (", stochastic" if row.get("ef_rounding") == "stochastic" else "")


def _ef_key(row: dict[str, str]) -> tuple[int, float, str]:
    """(epochs, density, error feedback) of a DP-MicroAdam row; DP-Adam's: (epochs, 0.0, "–")."""
    if row["optimizer"] != "dp-microadam":
        return (round(_f(row["epochs"])), 0.0, "–")
    return (round(_f(row["epochs"])), _f(row["density"]), _error_feedback(row))


def ef_lines(rows: list[dict[str, str]]) -> list[dict]:
    """Head-steps rows of the error-feedback diagnosis (`ef-diag`, `ef8-seeds`; at the lr tuned for
    4 bits), the 5/6-bit variants (`ef6-*`) and the 300-epoch runs (`long-*`; each with its own lr
    tuning) beside DP-Adam and DP-MicroAdam's 4-bit setting at the same length and density
    (batch 128).

    One dict per table line, by length: epochs, steps, optimizer, density (%), error feedback,
    lr, test accuracies at ε = 8 and 3 ("t8", "t3"), bytes/param.
    """
    tests: dict[tuple[int, float, str, float], dict[str, float]] = defaultdict(dict)
    info: dict[tuple[int, float, str], dict[str, str]] = {}
    own = {"ef6-tune": "ef6-seeds", "long-tune": "long-seeds"}  # tuned on their own (5/6 bits,
    tuned_lr: dict[tuple[int, float, str], dict[str, str]] = {}  # and 300 epochs)
    for r in rows:
        if r["tag"] in own and r["status"] == "ok" and _f(r["val_accuracy"]) is not None:
            k = _ef_key(r)
            if k not in tuned_lr or _f(r["val_accuracy"]) > _f(tuned_lr[k]["val_accuracy"]):
                tuned_lr[k] = r
    for r in rows:
        mine = r["tag"] in own or r["tag"] in own.values()
        k = _ef_key(r)
        if mine and (k not in tuned_lr or tuned_lr[k]["lr"] != r["lr"]):
            continue
        if (r["tag"] not in ("ef-diag", "ef8-seeds") and not mine) or r["status"] != "ok":
            continue
        info[k] = r
        tests[(*k, _f(r["target_epsilon"]))][r["seed"]] = _f(r["test_accuracy"])
    if not info:
        return []
    adam_own = {k[0]: k for k in info if k[2] == "–"}  # DP-Adam's own rows (300 epochs)
    c = epoch_cells(rows)
    low: dict[tuple[int, float, float], list[float]] = defaultdict(list)  # 4-bit, below 1 %
    low_rows = [r for r in rows if r["tag"] == "density-seeds" and r["status"] == "ok"]
    lows = {(round(_f(r["epochs"])), _f(r["density"])): r["lr"] for r in low_rows}
    low_bytes = {_f(r["density"]): _f(r["optimizer_state_bytes_per_param"]) for r in low_rows}
    for r in low_rows:
        k = (round(_f(r["epochs"])), _f(r["density"]))
        if lows.get(k) == r["lr"]:
            low[(*k, _f(r["target_epsilon"]))].append(_f(r["test_accuracy"]))
    lines = []
    for epochs in sorted({k[0] for k in info}):
        if (m := c.get(("dp-adam", epochs, 128, 8.0))) is not None:
            t3 = c.get(("dp-adam", epochs, 128, 3.0), {}).get("test", [])
            lines.append(dict(epochs=epochs, steps=m["steps"], optimizer="DP-Adam", density=None,
                              ef="–", lr=m["lr"], t8=m["test"], t3=t3, bpp=8.0))  # fmt: skip
        elif (k := adam_own.get(epochs)) is not None:
            lines.append(dict(epochs=epochs, steps=int(info[k]["steps"]), optimizer="DP-Adam",
                              density=None, ef="–", lr=info[k]["lr"],
                              t8=list(tests[(*k, 8.0)].values()),
                              t3=list(tests[(*k, 3.0)].values()), bpp=8.0))  # fmt: skip
        for density in sorted({k[1] for k in info if k[0] == epochs and k[2] != "–"}, reverse=True):
            steps = int(info[next(k for k in info if k[:2] == (epochs, density))]["steps"])
            base = dict(epochs=epochs, steps=steps, optimizer="DP-MicroAdam", density=density)
            if density == 0.01 and (m := c.get(("dp-microadam", epochs, 128, 8.0))):
                t3 = c.get(("dp-microadam", epochs, 128, 3.0), {}).get("test", [])
                lines.append({**base, "ef": "4-bit", "lr": m["lr"], "t8": m["test"], "t3": t3,
                              "bpp": 0.91})  # fmt: skip
            elif (epochs, density, 8.0) in low:
                lines.append({**base, "ef": "4-bit", "lr": lows[(epochs, density)],
                              "t8": low[(epochs, density, 8.0)],
                              "t3": low.get((epochs, density, 3.0), []),
                              "bpp": low_bytes[density]})  # fmt: skip
            for k in sorted((k for k in info if k[:2] == (epochs, density)), key=lambda k: k[2]):
                r = info[k]
                lines.append({**base, "ef": k[2], "lr": r["lr"],
                              "t8": list(tests[(*k, 8.0)].values()),
                              "t3": list(tests[(*k, 3.0)].values()),
                              "bpp": _f(r["optimizer_state_bytes_per_param"])})  # fmt: skip
    return lines


def ef_table(rows: list[dict[str, str]]) -> str:
    """:func:`ef_lines` as a markdown table."""
    lines = ef_lines(rows)
    if not lines:
        return ""
    header = ["epochs (steps)", "optimizer", "density", "error feedback", "lr", "ε = 8", "ε = 3",
              "bytes/param"]  # fmt: skip
    return _markdown(header, [
        [f"{x['epochs']} ({x['steps']})", x["optimizer"],
         "dense" if x["density"] is None else f"{100 * x['density']:g} %", x["ef"], x["lr"],
         _pm(x["t8"]), _pm(x["t3"]), f"{x['bpp']:.2f}"]
        for x in lines
    ])  # fmt: skip


def _own_tuning(rows, tune_tag, seeds_tag, pred):
    """The best `tune_tag` row on validation among the rows `pred` accepts, and the test
    accuracies of its lr in `tune_tag` and `seeds_tag` rows: (best row, {ε: {seed: test}})."""
    ok = [r for r in rows if r["status"] == "ok" and pred(r) and _f(r["val_accuracy"]) is not None]
    tuning = [r for r in ok if r["tag"] == tune_tag]
    if not tuning:
        return None, {}
    best = max(tuning, key=lambda r: _f(r["val_accuracy"]))
    tests: dict[float, dict[str, float]] = defaultdict(dict)
    for r in ok:
        if r["tag"] in (tune_tag, seeds_tag) and r["lr"] == best["lr"]:
            tests[_f(r["target_epsilon"])][r["seed"]] = _f(r["test_accuracy"])
    return best, tests


def eps_choice_lines(rows: list[dict[str, str]], epochs: int = 100) -> list[dict]:
    """Head-steps rows at `epochs` (batch 128): each optimizer with Adam's default eps and with
    eps = 3·σC/B (`eps6-*` tags), each eps with its own four-lr tuning; DP-MicroAdam at 0.5 % with
    6-bit error feedback. `kept` marks each optimizer's best of its eight settings on validation.

    One dict per line: optimizer, eps, lr, val (the tuned row's), t8, t3 (test accuracies), bpp.
    """

    def at(r, opt):
        return (r["optimizer"] == opt and round(_f(r["epochs"]) or 0) == epochs
                and r["batch_size"] == "128")  # fmt: skip

    def adam(noise):
        return lambda r: at(r, "dp-adam") and bool(r.get("adam_eps_noise")) == noise

    def micro(noise):
        return lambda r: (at(r, "dp-microadam") and r["ef_bits"] == "6" and r["density"] == "0.005"
                          and bool(r.get("adam_eps_noise")) == noise)  # fmt: skip

    candidates = [
        ("DP-Adam", "1e-8", ("tune", "seeds"), adam(False)),
        ("DP-Adam", "3·σC/B", ("eps6-tune", "eps6-seeds"), adam(True)),
        ("DP-MicroAdam, 0.5 %, 6-bit EF", "1e-8", ("ef6-tune", "ef6-seeds"), micro(False)),
        ("DP-MicroAdam, 0.5 %, 6-bit EF", "3·σC/B", ("eps6-tune", "eps6-seeds"), micro(True)),
    ]
    lines = []
    for name, eps, (tune_tag, seeds_tag), pred in candidates:
        best, tests = _own_tuning(rows, tune_tag, seeds_tag, pred)
        if best is None:
            continue
        bpp = 8.0 if name == "DP-Adam" else _f(best["optimizer_state_bytes_per_param"])
        lines.append(dict(optimizer=name, eps=eps, lr=best["lr"], val=_f(best["val_accuracy"]),
                          t8=list(tests.get(8.0, {}).values()),
                          t3=list(tests.get(3.0, {}).values()), bpp=bpp))  # fmt: skip
    if not any(x["eps"] != "1e-8" for x in lines):
        return []
    for name in {x["optimizer"] for x in lines}:
        mine = [x for x in lines if x["optimizer"] == name]
        max(mine, key=lambda x: x["val"])["kept"] = True
    return lines


def eps_choice_table(rows: list[dict[str, str]]) -> str:
    """:func:`eps_choice_lines` as a markdown table."""
    lines = eps_choice_lines(rows)
    if not lines:
        return ""
    header = ["optimizer", "Adam's eps", "lr", "validation (seed 0, ε = 8)", "ε = 8", "ε = 3",
              "bytes/param"]  # fmt: skip
    return _markdown(header, [
        [x["optimizer"] + (" **(kept)**" if x.get("kept") else ""), x["eps"], x["lr"],
         f"{100 * x['val']:.2f}", _pm(x["t8"]), _pm(x["t3"]), f"{x['bpp']:.2f}"]
        for x in lines
    ])  # fmt: skip


def ef_plot(rows: list[dict[str, str]], out: Path) -> Path | None:
    """Test accuracy against run length per error-feedback variant (seeded ones only), ε = 8, 3."""
    lines = [x for x in ef_lines(rows) if len(x["t8"]) >= 2]
    if not lines:
        return None
    plt, NullFormatter = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4.2), dpi=120, sharey=True)
    series: dict[str, list[dict]] = defaultdict(list)
    for x in lines:
        dens = "" if x["density"] is None else f" {100 * x['density']:g} %"
        label = x["optimizer"] + dens + ("" if x["ef"] == "–" else f", {x['ef']} EF")
        series[f"{label} ({x['bpp']:.2f} B/param)"].append(x)
    for ax, key, eps in zip(axes, ("t8", "t3"), (8, 3), strict=True):
        for label, pts in series.items():
            pts = [p for p in pts if p[key]]
            if len(pts) < 2:
                continue
            style = "-o" if "DP-Adam" in label else ("--s" if "4-bit" in label else "-^")
            ax.errorbar([p["steps"] for p in pts],
                        [100 * sum(p[key]) / len(p[key]) for p in pts],
                        yerr=[100 * statistics.stdev(p[key]) for p in pts], fmt=style, ms=4, capsize=2,
                        label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("steps (batch 128)")
        ax.set_title(f"head mode, ε = {eps}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=6.5, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path = out / "finetune-head-steps-ef.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def epochs_plot(rows: list[dict[str, str]], out: Path) -> Path | None:
    c = epoch_cells(rows)
    if not c:
        return None
    plt, NullFormatter = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6), dpi=120, sharey=True)
    for ax, eps in zip(axes, (8.0, 3.0), strict=True):
        for j, opt in enumerate(OPTIMIZERS):
            for batch, style in ((128, "-o"), (32, "--s")):
                pts = sorted((cell["steps"], cell["test"]) for (o, _, b, e), cell in c.items()
                             if (o, b, e) == (opt, batch, eps) and cell["test"])  # fmt: skip
                if not pts:
                    continue
                ys = [100 * statistics.fmean(t) for _, t in pts]
                es = [100 * statistics.stdev(t) if len(t) > 1 else 0 for _, t in pts]
                label = LABEL[opt].replace(" (explored)", "")  # equal budget in this study
                ax.errorbar([s for s, _ in pts], ys, yerr=es, fmt=style, capsize=2,
                            color=f"C{j}", label=f"{label}, batch {batch}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks([300, 1000, 3000, 10000], ["300", "1 000", "3 000", "10 000"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("steps (3 to 100 epochs)")
        ax.set_title(f"head mode, ε = {eps:g}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=6)
    fig.suptitle("MiniLM head on WordNet nouns: more steps at a fixed ε (mean ± std over seeds)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    path = out / "finetune-head-steps.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plots(rows: list[dict[str, str]], out: Path) -> list[Path]:
    plt, _ = _pyplot()

    c = cells(rows)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120, sharey=True)
    for ax, eps in zip(axes, (8.0, 3.0), strict=True):
        modes = [m for m in MODES if any((m, o, eps) in c for o in OPTIMIZERS)]
        for j, opt in enumerate(OPTIMIZERS):
            xs, ys, es = [], [], []
            for i, m in enumerate(modes):
                tests = c.get((m, opt, eps), {}).get("test", [])
                if tests:
                    xs.append(i + (j - (len(OPTIMIZERS) - 1) / 2) * 0.16)
                    ys.append(100 * statistics.fmean(tests))
                    es.append(100 * statistics.stdev(tests) if len(tests) > 1 else 0)
            ax.bar(xs, ys, width=0.16, yerr=es, capsize=2, label=LABEL[opt])
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(f"ε = {eps:g}, δ = 1e-5", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.suptitle("MiniLM on WordNet noun supersenses (26 classes): mean over seeds "
                 "(bar: std; the table gives the number of seeds)", fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = out / "finetune-wordnet-modes.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    markers = {"head": "o", "bias": "s", "lora": "^", "all": "D"}
    for (mode, opt, eps), cell in c.items():
        if eps != 8.0 or not cell["test"] or not cell["state_bytes"]:
            continue
        ax.scatter(cell["state_bytes"], 100 * statistics.fmean(cell["test"]),
                   marker=markers[mode], color=f"C{OPTIMIZERS.index(opt)}")  # fmt: skip
        ax.annotate(mode, (cell["state_bytes"], 100 * statistics.fmean(cell["test"])),
                    fontsize=6, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    for j, opt in enumerate(OPTIMIZERS):
        ax.scatter([], [], color=f"C{j}", label=LABEL[opt])
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state (bytes)")
    ax.set_ylabel("test accuracy (%), ε = 8")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "finetune-wordnet-memory.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="results/finetune-wordnet.csv")
    args = ap.parse_args()
    path = Path(args.csv)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    text = (
        f"# Fine-tuning study: {len(rows)} runs (`{path}`)\n\n"
        "Test accuracy in %, mean ± std (number of seeds) of each optimizer's tuned setting "
        "(best validation accuracy among its `tune` runs at ε = 8; ε = 3 and 1 reuse it).\n\n"
        + table(rows)
        + "\nTuning (seed 0, ε = 8, validation split):\n\n"
        + tuning_table(rows)
    )
    if eps := eps_table(rows):
        text += (
            "\nExploration, not equal-budget tuning (seed 0, ε = 8): Adam's eps as a multiple of "
        )
        text += "the released gradient's noise std, against the tuned setting (eps 1e-8):\n\n" + eps
    if b32 := batch32_table(rows):
        text += (
            "\nLoRA at expected batch 32 (3 epochs, 4x the steps of batch 128 for the same "
            "examples and CPU), each optimizer's lr tuned on validation among three (ε = 8, "
            "seed 0); test accuracy in %, mean ± std (seeds):\n\n" + b32
        )
    if dens := density_table(rows):
        text += (
            "\nHead mode, memory against accuracy: DP-MicroAdam's density, each with its lr tuned on "
            "validation among the same six as at 1 % (ε = 8, seed 0); test accuracy in %, mean ± std "
            "(seeds):\n\n" + dens
        )
    if md := mode_density_table(rows):
        text += (
            "\nThe other modes, DP-MicroAdam's density at the lr tuned at 1 % (not re-tuned; the "
            "scan is one run at ε = 8, seed 0, and seeds were added where a density won on "
            "validation); test accuracy in %, mean ± std (seeds):"
            "\n\n" + md
        )
    steps_csv = path.parent / "finetune-head-steps.csv"
    steps_rows: list[dict[str, str]] = []
    if steps_csv.exists():
        with steps_csv.open(newline="") as fh:
            steps_rows = list(csv.DictReader(fh))
    if ep := epochs_table(steps_rows):
        text += (
            f"\nLonger runs in head mode (`{steps_csv}`, studies/finetune-head-steps.toml): the lr "
            "is tuned per optimizer, epoch count and batch size (ε = 8, seed 0, validation); mean ± std "
            "(seeds) of test accuracy in %; here the eps variant gets the same four-lr budget:\n\n"
            + ep
        )
    if sd := steps_density_table(steps_rows):
        text += (
            "\nLonger runs in head mode, density below 1 % (batch 128; each density's lr tuned on "
            "validation among four, ε = 8, seed 0); test accuracy in %, mean ± std (seeds):\n\n"
            + sd
        )
    if ef := ef_table(steps_rows):
        text += (
            "\nLonger runs in head mode: how the error feedback is kept (batch 128; every variant at "
            "the lr tuned for 4 bits at its density and length, except 6 bits, tuned on its own "
            "with the same four-lr budget; ε = 8 and 3, test accuracy in %, mean ± std (seeds)):"
            "\n\n" + ef
        )
    if ec := eps_choice_table(steps_rows):
        text += (
            "\nHead mode at 100 epochs, Adam's eps for both optimizers (batch 128): each eps with "
            "its own four-lr tuning on validation (ε = 8, seed 0), so each optimizer has eight "
            "settings and keeps the best on validation (marked); test accuracy in %, mean ± std "
            "(seeds):\n\n" + ec
        )
    out = path.parent / "finetune-wordnet-summary.md"
    out.write_text(text)
    print(text)
    for p in [
        *plots(rows, path.parent),
        density_plot(rows, path.parent),
        epochs_plot(steps_rows, path.parent),
        ef_plot(steps_rows, path.parent),
    ]:
        if p is not None:
            print("wrote", p)


if __name__ == "__main__":
    main()
