"""`dpmicroadam sweep`: resumable grid, tuned values from validation only, report files."""

from __future__ import annotations

import csv

from dpmicroadam.cli import main
from dpmicroadam.study.report import best_by_validation, summarize
from dpmicroadam.study.sweep import read_rows

SWEEP = """
name = "tiny"
[base]
dataset = "digits"
steps = 4
batch_size = 64
eval_every = 4
[[grid]]
tag = "tune"
optimizer = ["dp-sgd", "dp-microadam"]
lr = [0.001, 0.1]
epsilon = 8.0
[[grid]]
tag = "epsilon"
optimizer = ["dp-sgd", "dp-microadam"]
lr = "tuned"
epsilon = [2.0, 8.0]
"""


def test_sweep_runs_resumes_and_reports(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(SWEEP)
    results = tmp_path / "results"
    assert main(["sweep", str(cfg), "--results-dir", str(results), "--limit", "3"]) == 0
    assert len(read_rows(results / "tiny.csv")) == 3  # stopped after 3 runs, like an interruption
    assert main(["sweep", str(cfg), "--results-dir", str(results)]) == 0
    rows = read_rows(results / "tiny.csv")
    assert len(rows) == 8  # 4 tuning runs + 2 optimizers x 2 epsilons, none repeated
    assert len({(r["tag"], r["run_id"]) for r in rows}) == 8
    best = best_by_validation(summarize(rows))
    for r in rows:
        if r["tag"] == "epsilon":
            assert r["lr"] == best[r["optimizer"]]["lr"]  # chosen on validation accuracy
            assert float(r["epsilon"]) <= float(r["target_epsilon"])
    err = capsys.readouterr().err
    assert "0 to run" in err or "done" in err
    assert main(["sweep", str(cfg), "--results-dir", str(results)]) == 0
    assert len(read_rows(results / "tiny.csv")) == 8  # a third call runs nothing
    for name in ("tiny.md", "tiny-epsilon.png", "tiny-tune.png", "tiny-curves.png"):
        assert (results / name).is_file(), name
    with (results / "tiny.csv").open() as fh:
        header = next(csv.reader(fh))
    for col in (
        "optimizer",
        "target_epsilon",
        "epsilon",
        "delta",
        "accountant",
        "clip_norm",
        "lr",
        "lr_schedule",
        "momentum",
        "batch_size",
        "epochs",
        "density",
        "window_size",
        "seed",
        "val_accuracy",
        "test_accuracy",
        "wall_seconds",
    ):
        assert col in header, col


def test_every_study_file_passes_the_checks_run_before_any_run():
    """The committed studies/*.toml load, name known settings only, and take 'tuned' values from
    a tag that an earlier block produces (else a sweep fails hours in, at the first seeds block)."""
    from pathlib import Path

    from dpmicroadam.study.sweep import check_sweep, load_sweep, sweep_command

    files = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml"))
    assert len(files) >= 3
    for path in files:
        _, base, blocks = load_sweep(path)
        check_sweep(path, sweep_command(path), base, blocks)


def test_a_tuned_block_without_an_earlier_tuning_block_is_refused(tmp_path):
    import pytest

    from dpmicroadam.study.sweep import check_sweep, load_sweep

    path = tmp_path / "s.toml"
    path.write_text(SWEEP.replace('tag = "tune"', 'tag = "first"'))
    _, base, blocks = load_sweep(path)
    with pytest.raises(ValueError, match=r"\[\[grid\]\] 2: .*tagged 'tune'.*no earlier block"):
        check_sweep(path, "train", base, blocks)


EPOCHS_SWEEP = """
name = "ep"
[base]
dataset = "digits"
batch_size = 256
epsilon = 8.0
eval_every = 1000
[[grid]]
tag = "tune"
optimizer = "dp-sgd"
epochs = 1
lr = [0.05, 0.5]
[[grid]]
tag = "seeds"
tuned_by = ["optimizer", "epochs"]
optimizer = "dp-sgd"
epochs = [1, 2]
lr = "tuned"
seed = 1
"""


def test_tuned_values_match_the_requested_epochs_not_the_realized_ones(tmp_path, capsys):
    """The epochs column holds the steps' worth of epochs (not 1.0 here): tuning by epochs must
    still find the epochs = 1 rows, and the epochs = 2 runs, which have no tuning row, are named."""
    cfg = tmp_path / "ep.toml"
    cfg.write_text(EPOCHS_SWEEP)
    results = tmp_path / "results"
    assert main(["sweep", str(cfg), "--results-dir", str(results)]) == 0
    rows = read_rows(results / "ep.csv")
    tune = [r for r in rows if r["tag"] == "tune"]
    assert float(tune[0]["epochs"]) != 1.0  # the case that silently skipped the seeds before
    best = max(tune, key=lambda r: float(r["val_accuracy"]))
    seeds = [r for r in rows if r["tag"] == "seeds"]
    assert [(r["lr"], r["seed"]) for r in seeds] == [(best["lr"], "1")]
    err = capsys.readouterr().err
    assert "block 2: no finished 'tune' row with optimizer=dp-sgd, epochs=2" in err


def test_blocks_without_tuned_values_share_the_pool_and_tuned_ones_wait():
    from dpmicroadam.study.sweep import block_groups

    blocks = [
        {"tag": "tune", "lr": [0.1, 0.3]},
        {"tag": "tune", "lr": 1.0},  # one run: joins the block before, no idle worker
        {"tag": "seeds", "lr": "tuned", "seed": [0, 1]},  # needs the rows above
        {"tag": "ceiling", "optimizer": "adam"},
        {"tag": "more", "lr": ["tuned"]},
    ]
    assert block_groups(blocks) == [[0, 1], [2, 3], [4]]


POOLED_SWEEP = """
name = "pooled"
[base]
dataset = "digits"
steps = 3
batch_size = 64
eval_every = 3
epsilon = 8.0
[[grid]]
tag = "tune"
optimizer = "dp-sgd"
lr = [0.1, 0.3]
[[grid]]
tag = "tune"
optimizer = "dp-sgd"
lr = [0.3, 1.0]
[[grid]]
tag = "seeds"
optimizer = "dp-sgd"
lr = "tuned"
seed = [0, 1]
"""


def test_pooled_blocks_run_a_shared_setting_once_and_tuned_blocks_see_every_row(tmp_path, capsys):
    cfg = tmp_path / "pooled.toml"
    cfg.write_text(POOLED_SWEEP)
    results = tmp_path / "results"
    assert main(["sweep", str(cfg), "--results-dir", str(results), "--jobs", "2"]) == 0
    rows = read_rows(results / "pooled.csv")
    tune = [r for r in rows if r["tag"] == "tune"]
    assert sorted(float(r["lr"]) for r in tune) == [0.1, 0.3, 1.0]  # lr 0.3 once, not twice
    best = max(tune, key=lambda r: float(r["val_accuracy"]))
    seeds = [r for r in rows if r["tag"] == "seeds"]
    assert sorted(r["seed"] for r in seeds) == ["0", "1"]
    assert {r["lr"] for r in seeds} == {best["lr"]}  # chosen among all three tuning runs
    err = capsys.readouterr().err
    assert "block 2/3 (tune): 2 runs, 0 done, 1 also in an earlier block, 1 to run" in err


def test_each_row_names_the_code_that_ran_it(tmp_path):
    import subprocess
    from pathlib import Path

    from dpmicroadam.study.sweep import _codes_of, code_version

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(SWEEP)
    results = tmp_path / "results"
    assert main(["sweep", str(cfg), "--results-dir", str(results), "--limit", "1"]) == 0
    (row,) = read_rows(results / "tiny.csv")
    assert row["code"] == code_version() != ""
    repo = Path(__file__).resolve().parents[1]
    git = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if git.returncode == 0:  # a git checkout: the commit, marked when src/ differs from it
        assert row["code"].split("+")[0] == git.stdout.strip()[:12]
    # a run that another code resumed names both, in order
    run_dir = results / "runs" / "tiny" / row["run_id"]
    (run_dir / "code.txt").write_text("aaaa\nbbbb\naaaa\n")
    assert _codes_of(run_dir) == "aaaa then bbbb"


def test_a_run_refused_by_its_checks_leaves_no_folder(tmp_path):
    import pytest

    from dpmicroadam.study.sweep import _run_one, run_id

    settings = {"dataset": "digits", "steps": 4, "batch_size": 64, "optimizer": "dp-sgd"}
    settings["lr"] = -0.1
    with pytest.raises(ValueError, match="lr"):
        _run_one("tune", settings, tmp_path, progress=False)
    assert not (tmp_path / run_id(settings)).exists()
    settings["lr"] = 0.1  # the same call with a valid lr does run, and records its code
    row = _run_one("tune", settings, tmp_path, progress=False)
    assert row["status"] == "ok"
    assert (tmp_path / run_id(settings) / "code.txt").read_text().strip() == row["code"]


def test_plan_counts_what_the_sweep_then_runs_and_runs_nothing(tmp_path, capsys):
    from dpmicroadam.study.plan import plan_sweep

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(SWEEP)
    results = tmp_path / "results"
    csv_path = results / "tiny.csv"

    def counts():
        return [(p["runs"], p["done"], p["to_run"], p["waiting"]) for p in plan_sweep(cfg, results)]

    assert main(["sweep", str(cfg), "--results-dir", str(results), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "4 to run now, 4 waiting for their tuning" in out
    assert not csv_path.exists() and not (results / "runs").exists()  # nothing ran or was made
    assert counts() == [(4, 0, 4, 0), (4, 0, 0, 4)]
    assert all(p["seconds"] is None for p in plan_sweep(cfg, results))  # nothing to measure by

    assert main(["sweep", str(cfg), "--results-dir", str(results), "--limit", "1"]) == 0
    (first,) = read_rows(csv_path)
    # dp-sgd has a tuning row now, so its two ε runs can run; dp-microadam's still wait
    assert counts() == [(4, 1, 3, 0), (4, 0, 2, 2)]
    plan = plan_sweep(cfg, results)
    assert plan[0]["seconds"] == 3 * float(first["wall_seconds"])  # the one finished row's pace
    assert main(["sweep", str(cfg), "--results-dir", str(results)]) == 0
    assert len(read_rows(csv_path)) == 1 + 3 + 4  # what the plan counted, once the tuning ended
    assert counts() == [(4, 4, 0, 0), (4, 4, 0, 0)]


def test_parallel_runs_that_fill_the_cores_draw_their_noise_in_place(tmp_path, monkeypatch):
    """A run of a sweep whose jobs fill the cores turns the noise draw ahead off (it would only
    compete with the other runs), and its noise is still the plain stream: same result."""
    import torch

    from dpmicroadam.privacy.noise import GaussianNoise
    from dpmicroadam.study.sweep import _run_one

    monkeypatch.setattr(GaussianNoise, "prefetch", True)
    settings = {"dataset": "digits", "steps": 3, "batch_size": 64, "optimizer": "dp-sgd"}
    ahead = _run_one("tune", settings, tmp_path / "a", progress=False, threads=1)
    assert GaussianNoise.prefetch
    in_place = _run_one("tune", settings, tmp_path / "b", progress=False, threads=1,
                        draw_ahead=False)  # fmt: skip
    assert not GaussianNoise.prefetch
    weights = [
        torch.load(tmp_path / d / row["run_id"] / "checkpoint.pt", weights_only=True)["model"]
        for d, row in (("a", ahead), ("b", in_place))
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
