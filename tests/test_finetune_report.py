"""The fine-tuning report chooses each optimizer's setting on validation only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "studies" / "finetune_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("finetune_report", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(tag, optimizer, lr, val, test, *, eps=8.0, seed=0, noise="", bits="", density="0.01"):
    return {
        "tag": tag,
        "status": "ok",
        "optimizer": optimizer,
        "epochs": "100.0064",
        "batch_size": "128",
        "lr": str(lr),
        "val_accuracy": str(val),
        "test_accuracy": str(test),
        "target_epsilon": str(eps),
        "seed": str(seed),
        "adam_eps_noise": noise,
        "ef_bits": bits,
        "density": density,
        "optimizer_state_bytes_per_param": "0.959" if optimizer == "dp-microadam" else "8.0",
    }


def test_eps_choice_keeps_each_optimizers_best_validation_and_only_its_lrs_seeds(report):
    micro = dict(bits="6", density="0.005")
    rows = [
        # DP-Adam, default eps: 0.01 wins on validation although 0.03 tests higher
        _row("tune", "dp-adam", 0.01, 0.60, 0.61),
        _row("tune", "dp-adam", 0.03, 0.59, 0.70),
        _row("seeds", "dp-adam", 0.01, 0.0, 0.62, seed=1),
        _row("seeds", "dp-adam", 0.01, 0.0, 0.58, eps=3.0),
        # DP-Adam, eps at the noise level: worse on validation, not kept
        _row("eps6-tune", "dp-adam", 0.1, 0.58, 0.99, noise="3.0"),
        # DP-MicroAdam, 6-bit at 0.5 %: the noise eps wins on validation
        _row("ef6-tune", "dp-microadam", 0.01, 0.605, 0.60, **micro),
        _row("eps6-tune", "dp-microadam", 0.1, 0.61, 0.612, noise="3.0", **micro),
        _row("eps6-tune", "dp-microadam", 0.3, 0.50, 0.90, noise="3.0", **micro),
        _row("eps6-seeds", "dp-microadam", 0.1, 0.0, 0.614, seed=1, noise="3.0", **micro),
        _row("eps6-seeds", "dp-microadam", 0.3, 0.0, 0.95, seed=1, noise="3.0", **micro),
        # 4-bit rows at 1 % are not part of this comparison
        _row("tune", "dp-microadam", 0.01, 0.99, 0.99),
    ]
    lines = report.eps_choice_lines(rows)
    kept = {(x["optimizer"], x["eps"]) for x in lines if x.get("kept")}
    assert kept == {("DP-Adam", "1e-8"), ("DP-MicroAdam, 0.5 %, 6-bit EF", "3·σC/B")}
    by = {(x["optimizer"], x["eps"]): x for x in lines}
    adam = by[("DP-Adam", "1e-8")]
    assert (adam["lr"], sorted(adam["t8"]), adam["t3"]) == ("0.01", [0.61, 0.62], [0.58])
    micro_kept = by[("DP-MicroAdam, 0.5 %, 6-bit EF", "3·σC/B")]
    assert sorted(micro_kept["t8"]) == [0.612, 0.614]  # not the 0.3 rows
    assert micro_kept["bpp"] == pytest.approx(0.959)
    assert "(kept)" in report.eps_choice_table(rows)


def test_eps_choice_is_empty_without_noise_eps_rows(report):
    rows = [_row("tune", "dp-adam", 0.01, 0.60, 0.61)]
    assert report.eps_choice_lines(rows) == []
    assert report.eps_choice_table(rows) == ""


def _mode_row(tag, mode, lr, val, test, density="0.01", head="", eps=8.0, seed=0):
    settings = {"trainable": mode, "lr": lr, "density": float(density), "seed": seed}
    return {
        "tag": tag,
        "status": "ok",
        "trainable": mode,
        "optimizer": "dp-microadam",
        "adam_eps_noise": "",
        "density_head": head,
        "lr": str(lr),
        "density": density,
        "target_epsilon": str(eps),
        "seed": str(seed),
        "settings": json.dumps({**settings, "density_head": head} if head else settings),
        "val_accuracy": str(val),
        "test_accuracy": str(test),
        "optimizer_state_bytes": "1000",
        "optimizer_state_bytes_per_param": "0.9",
        "trainable_parameters": "1111",
        "peak_memory_mb": "1",
        "seconds_per_step": "1",
    }


def test_mode_density_scan_sits_beside_the_validation_tuned_one_percent_row(report):
    rows = [
        _mode_row("tune", "bias", 0.01, 0.40, 0.41),
        _mode_row("tune", "bias", 0.03, 0.30, 0.90),  # higher test, lower validation: not chosen
        _mode_row("tune", "bias", 0.1, 0.45, 0.44, head="1.0"),  # the dense-head variant
        _mode_row("seeds", "bias", 0.01, 0.0, 0.39, eps=3.0),
        _mode_row("density", "bias", 0.01, 0.35, 0.36, density="0.002"),
        _mode_row("density", "bias", 0.01, 0.42, 0.43, density="0.05"),
        _mode_row("density-seeds", "bias", 0.01, 0.0, 0.45, density="0.05", seed=1),
        _mode_row("density-seeds", "bias", 0.01, 0.0, 0.33, density="0.05", eps=3.0),
        _mode_row("density", "lora", 0.01, 0.5, 0.5, density="0.05"),  # lora has no tune row
    ]
    lines = report.mode_density_lines(rows)
    got = [(x["mode"], x["density"], x["lr"], sorted(x["t8"]), x["t3"]) for x in lines]
    assert got == [
        ("bias", 0.05, "0.01", [0.43, 0.45], [0.33]),
        ("bias", 0.01, "0.01", [0.41], [0.39]),
        ("bias", 0.002, "0.01", [0.36], []),
    ]
    assert "| bias | 0.2 % |" in report.mode_density_table(rows)
    assert report.mode_density_table(rows[:3]) == ""
