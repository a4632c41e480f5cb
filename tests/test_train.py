"""`dpmicroadam train` end to end on digits: outputs, budget, exact resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpmicroadam.train import ResumeMismatch, Run, TrainingDiverged, train
from dpmicroadam.train.checkpoint import load_checkpoint
from dpmicroadam.train.config import resolve_config

# A fixed noise seed: these tests compare separate runs (an interrupted one with an uninterrupted
# one); the default, secret seeding is tested in tests/test_errors.py and below.
FAST = dict(dataset="digits", steps=24, batch_size=64, eval_every=6, progress=False, noise_seed=0)


def run_cfg(tmp_path: Path, name: str, **kw):
    settings = {**FAST, "out": str(tmp_path / name), **kw}
    if settings.get("optimizer") in ("adam", "sgd", "microadam"):
        settings.pop("noise_seed")  # a non-private run has no noise
    return resolve_config(settings)


def test_default_run_writes_the_report(tmp_path):
    summary = train(run_cfg(tmp_path, "a"))
    out = tmp_path / "a"
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoint.pt",
        "accuracy.png",
        "epsilon.png",
    ):
        assert (out / name).is_file(), name
    for key in (
        "dataset",
        "model",
        "optimizer",
        "test_accuracy",
        "epsilon",
        "delta",
        "accountant",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clip_norm",
        "seed",
        "wall_seconds",
        "optimizer_state_bytes_per_param",
    ):
        assert key in summary, key
    assert summary["optimizer"] == "dp-microadam"
    assert summary["steps"] == 24
    assert 0 < summary["epsilon"] <= 8.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12, 18, 24]
    assert all(r["epsilon"] <= 8.0 for r in rows)
    assert rows == sorted(rows, key=lambda r: r["epsilon"])
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"]
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.parametrize("epsilon", [0.5, 3.0])
def test_epsilon_spent_never_exceeds_target(tmp_path, epsilon):
    s = train(run_cfg(tmp_path, "e", epsilon=epsilon, optimizer="dp-sgd", lr=0.5))
    assert s["epsilon"] <= epsilon
    assert s["epsilon"] > 0.95 * epsilon


def _final_params(out: Path) -> list[torch.Tensor]:
    return list(load_checkpoint(out / "checkpoint.pt")["model"].values())


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(ef_rounding="stochastic"),
        dict(optimizer="dp-adambc", lr=1e-3, ema=0.99),
        dict(optimizer="dp-sgd", lr=0.5, momentum=0.9, lr_schedule="cosine", augmult=2),
        dict(optimizer="adam", lr=1e-3),
    ],
    ids=[
        "dp-microadam",
        "dp-microadam-stochastic-rounding",
        "dp-adambc-ema",
        "dp-sgd-augmult",
        "adam",
    ],
)
def test_resume_is_bit_identical(tmp_path, extra):
    full = train(run_cfg(tmp_path, "full", checkpoint_every=6, **extra))
    cut = run_cfg(tmp_path, "cut", checkpoint_every=6, **extra)
    assert Run(cut).fit(stop_at=15) is None  # "killed" 3 steps after a checkpoint
    resumed = train(run_cfg(tmp_path, "cut", checkpoint_every=6, resume=True, **extra))
    for a, b in zip(_final_params(tmp_path / "full"), _final_params(tmp_path / "cut")):
        assert torch.equal(a, b)
    for key in ("test_accuracy", "epsilon", "val_accuracy", "steps"):
        assert full[key] == resumed[key], key
    rows_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    rows_cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k != "wall_seconds"} for r in rows_full]
    assert strip == [
        {k: v for k, v in json.loads(r).items() if k != "wall_seconds"} for r in rows_cut
    ]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    args = [
        "--steps",
        "60",
        "--batch-size",
        "64",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "20",
        "--no-progress",
        "--json",
        "--noise-seed",  # compared with a separate, uninterrupted run
        "0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run(
        [sys.executable, "-m", "dpmicroadam", "train", *args, "--out", str(tmp_path / "ref")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    ref_summary = json.loads(ref.stdout)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpmicroadam", "train", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        ckpt = out / "checkpoint.pt"
        if ckpt.exists():
            try:
                if 5 <= load_checkpoint(ckpt)["step"] < 55:
                    break
            except Exception:  # noqa: BLE001 - a checkpoint being replaced; try again
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(out / "checkpoint.pt")["step"]
    assert step_at_kill < 60
    res = subprocess.run(
        [sys.executable, "-m", "dpmicroadam", "train", *args, "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    summary = json.loads(res.stdout)
    for key in ("test_accuracy", "epsilon", "noise_multiplier", "steps"):
        assert summary[key] == ref_summary[key], key
    for a, b in zip(_final_params(tmp_path / "ref"), _final_params(out)):
        assert torch.equal(a, b)


def test_resume_with_changed_config_names_the_fields(tmp_path):
    Run(run_cfg(tmp_path, "r")).fit(stop_at=6)
    with pytest.raises(ResumeMismatch, match=r"lr: .*0\.5.*clip_norm|clip_norm.*lr"):
        Run(run_cfg(tmp_path, "r", resume=True, lr=0.5, clip_norm=3.0))


def test_existing_run_is_not_overwritten(tmp_path):
    Run(run_cfg(tmp_path, "o")).fit(stop_at=6)
    with pytest.raises(ValueError, match="--resume"):
        Run(run_cfg(tmp_path, "o"))


def test_diverging_run_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = run_cfg(tmp_path, "d", optimizer="sgd", lr=1e38, checkpoint_every=1, steps=40)
    with pytest.raises(TrainingDiverged, match="checkpoint"):
        train(cfg)
    state = load_checkpoint(tmp_path / "d" / "checkpoint.pt")
    assert 1 <= state["step"] < 40
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_batch_larger_than_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch"):
        Run(run_cfg(tmp_path, "b", batch_size=100_000))


def test_npz_dataset_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(300, 8, 8), dtype=np.uint8)
    y = (x.mean(axis=(1, 2)) > 127).astype(np.int64)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    s = train(run_cfg(tmp_path, "n", dataset=f"npz:{path}", batch_size=32, delta=1e-3))
    assert s["test_size"] == 60
    assert s["epsilon"] <= 8.0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dataset="imagenet"), "digits.*fashion-mnist"),
        (dict(model="resnet"), "mlp.*cnn.*wrn16-4"),
        (dict(optimizer="adagrad"), "dp-microadam.*dp-sgd"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(clip_norm=0.0), "clip-norm"),
        (dict(lr_schedule="step"), "constant.*cosine"),
        (dict(epsilon=3.0, noise_multiplier=1.0), "not both"),
        (dict(bogus=1), "unknown config keys"),
    ],
)
def test_bad_config_lists_valid_choices(kw, match):
    with pytest.raises(ValueError, match=match):
        resolve_config({**FAST, **kw})


def test_toml_config_and_flags_win(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('optimizer = "dp-sgd"\nlr = 0.25\nclip-norm = 0.5\n')
    cfg = resolve_config({"config": str(path), "lr": 0.75})
    assert (cfg.optimizer, cfg.lr, cfg.clip_norm) == ("dp-sgd", 0.75, 0.5)


def test_recipe_resolves():
    cfg = resolve_config({"recipe": "cifar10-wrn16-4"})
    assert (cfg.model, cfg.batch_size, cfg.augmult, cfg.ema, cfg.lr) == (
        "wrn16-4",
        4096,
        16,
        0.999,
        1e-3,
    )


def test_secret_seeding_resumes_the_same_streams(tmp_path):
    """With OS-entropy seeds, two resumptions of one checkpoint compute the same steps."""
    import shutil

    cfg = {k: v for k, v in FAST.items() if k != "noise_seed"}
    first = tmp_path / "a"
    Run(resolve_config({**cfg, "out": str(first), "checkpoint_every": 6})).fit(stop_at=8)
    shutil.copytree(first, tmp_path / "b")
    for name in ("a", "b"):
        train(resolve_config({**cfg, "out": str(tmp_path / name), "checkpoint_every": 6,
                              "resume": True}))  # fmt: skip
    for a, b in zip(_final_params(tmp_path / "a"), _final_params(tmp_path / "b"), strict=True):
        assert torch.equal(a, b)


def test_noise_drawn_ahead_resumes_bit_identical_and_equals_drawn_in_place(tmp_path, monkeypatch):
    """End to end, with the next release's noise drawn ahead on a worker thread (forced on):
    killed and resumed equals uninterrupted, and both equal a run drawing its noise in place."""
    import dpmicroadam.privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "_cores", lambda: torch.get_num_threads() + 1)
    monkeypatch.setattr(noise_module, "PREFETCH_MIN_ELEMENTS", 1)
    ahead_calls = []
    draw_ahead = noise_module.GaussianNoise._draw_ahead

    def counting(self, plan):
        ahead_calls.append(plan)
        return draw_ahead(self, plan)

    monkeypatch.setattr(noise_module.GaussianNoise, "_draw_ahead", counting)
    full = train(run_cfg(tmp_path, "full", checkpoint_every=6))
    assert len(ahead_calls) == full["steps"]  # one draw ahead per release
    assert Run(run_cfg(tmp_path, "cut", checkpoint_every=6)).fit(stop_at=15) is None
    train(run_cfg(tmp_path, "cut", checkpoint_every=6, resume=True))
    monkeypatch.setattr(noise_module.GaussianNoise, "prefetch", False)
    train(run_cfg(tmp_path, "in-place", checkpoint_every=6))
    finals = [_final_params(tmp_path / name) for name in ("full", "cut", "in-place")]
    for a, b, c in zip(*finals, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
