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

A top-level ``command = "finetune"`` runs `dpmicroadam finetune` instead of `train` (the keys are
then FinetuneConfig fields). A block may say which settings a ``"tuned"`` value must share with
the tuning run it is taken from, e.g. ``tuned_by = ["optimizer", "trainable", "epsilon"]``
(default: the optimizer only), and ``tuned_from`` the tag of the rows it is chosen from
(default ``"tune"``). A non-private optimizer (adam, sgd, microadam) in a grid drops the
privacy settings of ``[base]`` (ε, δ, C, ...), which do not apply to it. A study is meant to be
reproduced: a run's ``noise_seed`` is its ``seed`` unless set (its summary then says that the
guarantee assumes the seed stays secret). ``--jobs N`` runs N runs at once, each in a fresh
process with its own threads, so each run's peak memory is its own; the runs of consecutive blocks
without ``"tuned"`` values share the workers, and a block with one waits for every earlier run.
``--plan`` runs nothing and prints what each block still has to run, with an estimate of its time
(:mod:`dpmicroadam.study.plan`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import math
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from dpmicroadam.study.report import best_matching, summarize, write_report
from dpmicroadam.train import CHECKPOINT, Run, TrainingDiverged, resolve_config
from dpmicroadam.train.checks import PRIVACY_SETTINGS
from dpmicroadam.train.names import PUBLIC_OPTIMIZERS

COLUMNS = [
    "run_id",
    "tag",
    "status",
    "dataset",
    "trainable",
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
    "trainable_parameters",
    "train_size",
    "optimizer_state_bytes",
    "peak_memory_mb",
    "seconds_per_step",
    "width",
    "adam_eps_noise",
    "topk_block",
    "density_head",
    "ef_rounding",
    "settings",  # the run's settings as given (JSON): what "tuned" copies from a tuning run
    "code",  # the code that ran it: git commit (+modified) or package version; "a then b" on resume
]
CODE_FILE = "code.txt"
COMMANDS = ("train", "finetune")


TUNABLE = ("lr", "momentum", "clip_norm", "density", "window_size", "lr_schedule")


def load_sweep(path: str | Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Read a sweep file: (name, base settings, grid blocks) in file order."""
    spec = _read_spec(path)
    name = spec.get("name", Path(path).stem)
    base = {k.replace("-", "_"): v for k, v in spec.get("base", {}).items()}
    blocks = [{k.replace("-", "_"): v for k, v in b.items()} for b in spec.get("grid", [])]
    if not blocks:
        raise ValueError(f"{str(path)!r} has no [[grid]] block; add at least one")
    return name, base, blocks


def _read_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist")
    with path.open("rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"sweep file {str(path)!r} is not valid TOML: {err}") from None


SWEEP_KEYS = ("tag", "tuned_by", "tuned_from")


def check_sweep(
    path: str | Path, command: str, base: dict[str, Any], blocks: list[dict[str, Any]]
) -> None:
    """Check every key and value of a sweep file against the config's fields before any run.

    Raises:
        ValueError: Naming the file, the block and the key (an unknown key, a value of the
            wrong type, or ``"tuned"`` where it is not allowed).
    """
    import dataclasses

    from dpmicroadam.train.checks import check_types
    from dpmicroadam.train.config import TrainConfig

    if command == "finetune":
        from dpmicroadam.finetune.config import FinetuneConfig as cls
    else:
        cls = TrainConfig
    names = {f.name for f in dataclasses.fields(cls)}
    for where, table in [("[base]", base)] + [
        (f"[[grid]] {i}", b) for i, b in enumerate(blocks, 1)
    ]:
        for key, value in table.items():
            if key in SWEEP_KEYS:
                continue
            if key not in names:
                raise ValueError(
                    f"sweep file {str(path)!r} {where}: unknown key {key!r}; valid keys: "
                    f"{sorted(names - {'defaults_source'})}"
                )
            for v in (
                value if isinstance(value, list) and key not in ("labels", "head") else [value]
            ):
                if v == "tuned":
                    if key not in TUNABLE:
                        raise ValueError(
                            f"sweep file {str(path)!r} {where}: 'tuned' is not allowed for {key!r}; "
                            f"only for {TUNABLE}"
                        )
                    continue
                check_types(cls, {key: v}, f"sweep file {str(path)!r} {where}")
    tags_so_far: set[str] = set()
    for i, block in enumerate(blocks, 1):
        source = str(block.get("tuned_from", "tune"))
        if _uses_tuned(block) and source not in tags_so_far:
            raise ValueError(
                f"sweep file {str(path)!r} [[grid]] {i}: takes 'tuned' values from the rows tagged "
                f"{source!r}, but no earlier block has tag = {source!r}; put the tuning block "
                "first or set tuned_from to its tag"
            )
        tags_so_far.add(str(block.get("tag", "")))


def sweep_command(path: str | Path) -> str:
    """The command a sweep file runs: ``train`` (default) or ``finetune``."""
    command = _read_spec(path).get("command", "train")
    if command not in COMMANDS:
        raise ValueError(f"{str(path)!r}: command = {command!r}; use one of {COMMANDS}")
    return command


def expand_block(
    base: dict[str, Any],
    block: dict[str, Any],
    rows: list[dict[str, str]],
    unmatched: list[dict[str, Any]] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The runs of one grid block: the Cartesian product of its list values.

    A value ``"tuned"`` (for lr, momentum, clip_norm, density, window_size, lr_schedule) takes the
    setting of that optimizer's best mean validation accuracy among the finished ``tune`` rows, so
    later blocks use what the tuning found, never the test split. Blocks whose tuned values are not
    known yet yield no runs; the ``tuned_by`` values they looked for are appended to ``unmatched``.
    """
    block = dict(block)
    tag = str(block.pop("tag", "grid"))
    tuned_by = block.pop("tuned_by", ["optimizer"])
    tuned_from = str(block.pop("tuned_from", "tune"))
    if not isinstance(tuned_by, list) or not all(isinstance(k, str) for k in tuned_by):
        raise ValueError(f"tuned_by must be a list of setting names, got {tuned_by!r}")
    keys = sorted(block)
    values = [v if isinstance(v, list) else [v] for v in (block[k] for k in keys)]
    records = summarize(rows) if rows else []
    runs = []
    for combo in itertools.product(*values):
        settings = {**base, **dict(zip(keys, combo))}
        tuned = [k for k, v in settings.items() if v == "tuned"]
        if tuned:
            settings.setdefault("optimizer", "dp-microadam")
            wanted = {k: settings.get(k) for k in tuned_by}
            rec = best_matching(records, wanted, tag=tuned_from)
            if rec is None:
                if unmatched is not None and wanted not in unmatched:
                    unmatched.append(wanted)
                continue
            given = json.loads(rec["settings"]) if rec.get("settings") else None
            for k in tuned:
                if k not in TUNABLE:
                    raise ValueError(f"'tuned' is not allowed for {k!r}; only for {TUNABLE}")
                if given is None:  # an older CSV without the settings column
                    settings[k] = _typed(rec[k])
                elif k in given:
                    settings[k] = given[k]
                else:  # the tuning run left it at its default: so does this run (same run id)
                    del settings[k]
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
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict[str, str]]:
    """Run every missing run of a sweep, appending one CSV row per run; returns all rows.

    Args:
        jobs: Runs at once (each in a fresh process); 1 runs them here, one after another.
            Consecutive blocks without "tuned" values share the pool (:func:`block_groups`).
        threads: torch threads per run (default: the CPU count divided by ``jobs``).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an int >= 1, got {jobs!r}")
    command = sweep_command(path)
    name, base, blocks = load_sweep(path)
    check_sweep(path, command, base, blocks)
    results_dir = Path(results_dir)
    runs_dir = results_dir / "runs" / name
    runs_dir.mkdir(parents=True, exist_ok=True)
    csv_path = results_dir / f"{name}.csv"
    ran = 0
    for group in block_groups(blocks):
        rows = read_rows(csv_path)
        finished = {(r["tag"], r["run_id"]) for r in rows}
        planned = set(finished)
        todo: list[tuple[str, dict[str, Any]]] = []
        for b in group:
            block = blocks[b]
            unmatched: list[dict[str, Any]] = []
            runs = expand_block(base, block, rows, unmatched)
            keys = [(t, run_id(st)) for t, st in runs]
            mine = []
            for key, run in zip(keys, runs, strict=True):
                if key not in planned:  # done, or planned by an earlier block
                    planned.add(key)
                    mine.append(run)
            for wanted in unmatched:
                print(
                    f"sweep {name} block {b + 1}: no finished {block.get('tuned_from', 'tune')!r} "
                    "row with "
                    + ", ".join(f"{k}={v}" for k, v in wanted.items())
                    + " to take 'tuned' values from: those runs are skipped",
                    file=sys.stderr,
                    flush=True,
                )
            n_done = sum(key in finished for key in keys)
            shared = len(runs) - n_done - len(mine)
            print(
                f"sweep {name} block {b + 1}/{len(blocks)} ({block.get('tag', 'grid')}): "
                f"{len(runs)} runs, {n_done} done, "
                + (f"{shared} also in an earlier block, " if shared else "")
                + f"{len(mine)} to run",
                file=sys.stderr,
                flush=True,
            )
            todo += mine
        if limit is not None:
            todo = todo[: max(0, limit - ran)]
        for i, row in enumerate(_execute(todo, runs_dir, command, progress, jobs, threads), 1):
            _append(csv_path, row)
            ran += 1
            print(
                f"[{i}/{len(todo)}] {tag_of(row)} {row['run_id']} {row['optimizer']} "
                f"{row['trainable'] or ''} eps={row['target_epsilon']} C={row['clip_norm']} "
                f"lr={row['lr']} density={row['density']} seed={row['seed']}: {row['status']} "
                f"val={row['val_accuracy']} test={row['test_accuracy']} ({row['wall_seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
    rows = read_rows(csv_path)
    write_report(rows, results_dir, name)
    return rows


def block_groups(blocks: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of the blocks whose runs can share the ``--jobs`` pool, in file order.

    A block with a ``"tuned"`` value needs every earlier block's rows, so it starts a new group;
    a block without one needs nothing and joins the group before it (so that a one-run block does
    not leave the other workers idle).
    """
    groups: list[list[int]] = []
    for i, block in enumerate(blocks):
        if _uses_tuned(block) or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def _uses_tuned(block: dict[str, Any]) -> bool:
    return any(v == "tuned" or (isinstance(v, list) and "tuned" in v) for v in block.values())


def tag_of(row: dict[str, Any]) -> str:
    return str(row["tag"])


def _execute(
    todo: list[tuple[str, dict[str, Any]]],
    runs_dir: Path,
    command: str,
    progress: bool,
    jobs: int,
    threads: int | None,
) -> Any:
    """Yield one row per run, in the order they finish."""
    if jobs == 1 or len(todo) <= 1:
        for tag, settings in todo:
            yield _run_one(tag, settings, runs_dir, progress, command, threads)
        return
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    per_run = threads or max(1, (os.cpu_count() or 1) // jobs)
    # The runs' intra-op threads fill the cores: the noise draw ahead would only compete.
    draw_ahead = jobs * per_run < (os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = [
            pool.submit(_run_one, tag, settings, runs_dir, False, command, per_run, draw_ahead)
            for tag, settings in todo
        ]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _run_one(
    tag: str,
    settings: dict[str, Any],
    runs_dir: Path,
    progress: bool,
    command: str = "train",
    threads: int | None = None,
    draw_ahead: bool = True,
) -> dict[str, Any]:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if not draw_ahead:  # this process (one run) only: no core is left for the noise worker
        from ..privacy.noise import GaussianNoise

        GaussianNoise.prefetch = False
    rid = run_id(settings)
    out = runs_dir / rid
    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        return _row(rid, tag, "ok", settings, {**summary, "code": _codes_of(out)})
    resume = (out / CHECKPOINT).exists()
    given = {**settings, "out": str(out), "resume": resume, "progress": progress}
    given.setdefault("noise_seed", given.get("seed", 0))  # a study is reproducible
    if given.get("optimizer") in PUBLIC_OPTIMIZERS:  # a non-private baseline of a private grid
        for key in PRIVACY_SETTINGS:
            given.pop(key, None)
    if command == "finetune":
        from dpmicroadam.finetune import finetune_run, resolve_finetune_config

        cfg = resolve_finetune_config(given)
        run = finetune_run(cfg).fit
    else:
        cfg = resolve_config(given)
        run = Run(cfg).fit
    # only once the settings passed their checks: a refused run leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    with (out / CODE_FILE).open("a") as fh:  # one line per start: a resumed run lists both
        fh.write(code_version() + "\n")
    start = time.perf_counter()
    try:
        return _row(rid, tag, "ok", settings, {**run(), "code": _codes_of(out)})
    except TrainingDiverged:
        summary = {"optimizer": cfg.optimizer, "wall_seconds": time.perf_counter() - start}
        return _row(rid, tag, "diverged", settings, {**summary, "code": _codes_of(out)})


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code running now: the git commit of the source tree (``+modified`` when its ``src/``
    differs from that commit), else the installed package's version."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "src"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()  # fmt: skip
        if head:
            return head + ("+modified" if changed else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "dpmicroadam " + version("dpmicroadam")
    except PackageNotFoundError:
        return "unknown"


def _codes_of(out: Path) -> str:
    try:
        lines = [ln for ln in (out / CODE_FILE).read_text().splitlines() if ln.strip()]
    except OSError:
        return ""  # a run finished before code.txt existed
    return " then ".join(dict.fromkeys(lines))


def _row(
    rid: str, tag: str, status: str, settings: dict[str, Any], summary: dict[str, Any]
) -> dict[str, Any]:
    merged = {**settings, **{k: v for k, v in summary.items() if v is not None}}
    row = {c: merged.get(c, "") for c in COLUMNS}
    row.update(run_id=rid, tag=tag, status=status)
    row["settings"] = json.dumps(settings, sort_keys=True, default=str)
    row["target_epsilon"] = summary.get("target_epsilon", settings.get("epsilon", ""))
    if row["train_size"] == "" and "train_size" in summary:
        row["train_size"] = summary["train_size"]
    for key in ("val_accuracy", "test_accuracy", "epsilon", "wall_seconds", "seconds_per_step"):
        v = row.get(key)
        if isinstance(v, float):
            row[key] = round(v, 5) if math.isfinite(v) else ""
    return row


def _append(csv_path: Path, row: dict[str, Any]) -> None:
    new = not csv_path.exists()
    if not new:
        with csv_path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != COLUMNS:  # an older file: rewrite it once with the current columns
            old = read_rows(csv_path)
            tmp = csv_path.with_name(csv_path.name + ".tmp")
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows({c: r.get(c, "") for c in COLUMNS} for r in old)
            tmp.replace(csv_path)
    with csv_path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
