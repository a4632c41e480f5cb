"""The statistics of ``benchmarks/bench_cli.py``: the paired ratio, its interval and the verdict."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cli.py"
_SPEC = importlib.util.spec_from_file_location("bench_cli", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_paired_interval_is_the_median_of_paired_ratios():
    dp = [12.0, 10.0, 30.0, 11.0, 9.0]
    plain = [10.0, 10.0, 10.0, 10.0, 10.0]
    med, low, high = bench.paired_interval(dp, plain)
    assert med == pytest.approx(1.1)  # ratios 1.2, 1.0, 3.0, 1.1, 0.9
    assert low <= med <= high
    assert low >= 0.9 and high <= 3.0  # medians of resamples stay within the ratios


def test_pairing_cancels_a_drift_that_hits_both_runs_of_a_repeat():
    # The machine slows by up to 3x across repeats; each repeat's DP run is 1.25x its partner.
    slow = np.linspace(1.0, 3.0, 15)
    plain = list(5.0 * slow)
    dp = list(6.25 * slow)
    med, low, high = bench.paired_interval(dp, plain)
    assert med == pytest.approx(1.25) and low == pytest.approx(1.25) and high == pytest.approx(1.25)


def test_interval_narrows_with_more_repeats_and_is_reproducible():
    rng = np.random.default_rng(1)
    plain = list(rng.uniform(5, 7, 40))
    dp = [p * r for p, r in zip(plain, rng.uniform(1.1, 1.5, 40))]
    _, lo_few, hi_few = bench.paired_interval(dp[:6], plain[:6])
    _, lo_many, hi_many = bench.paired_interval(dp, plain)
    assert hi_many - lo_many < hi_few - lo_few
    assert bench.paired_interval(dp, plain) == bench.paired_interval(dp, plain)


@pytest.mark.parametrize(
    "low, high, goal, expected",
    [(1.1, 1.3, 1.3, "met"), (1.31, 1.5, 1.3, "missed"), (1.2, 1.4, 1.3, "unsettled"),
     (1.3, 1.3, 1.3, "met")],
)  # fmt: skip
def test_verdict(low, high, goal, expected):
    assert bench.verdict(low, high, goal) == expected


@pytest.mark.parametrize(
    "dp, plain, match",
    [([1.0], [1.0], "at least 2"), ([1.0, 2.0], [1.0], "equally long"),
     ([1.0, 2.0], [1.0, -0.5], "more --steps"), ([0.0, 2.0], [1.0, 1.0], "not positive")],
)  # fmt: skip
def test_paired_interval_refuses_what_it_cannot_judge(dp, plain, match):
    with pytest.raises(ValueError, match=match):
        bench.paired_interval(dp, plain)


def test_cpu_name_reads_the_model_name(monkeypatch, tmp_path):
    """Rows name the CPU (machines differ by more than the intervals): /proc/cpuinfo's model
    name where there is one, else platform's answer."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: Acme\nmodel name\t: Acme Z80 @ 4 MHz\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path, *a, **k),
    )
    assert bench.cpu_name() == "Acme Z80 @ 4 MHz"
    info.write_text("processor\t: 0\n")
    monkeypatch.setattr(bench.platform, "processor", lambda: "")
    monkeypatch.setattr(bench.platform, "machine", lambda: "riscv64")
    assert bench.cpu_name() == "riscv64"


def test_goals_cover_every_model():
    assert set(bench.GOALS) == set(bench.SHAPES)


def _load_benchmark(name):
    """A script of benchmarks/ as a module (its folder on sys.path while it loads, as when run)."""
    import sys

    sys.path.insert(0, str(_PATH.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, _PATH.parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(_PATH.parent))
    return module


def test_step_parts_times_every_layer_of_the_private_step():
    parts = _load_benchmark("bench_step_parts")
    row = parts.measure("cnn", batch=4, repeats=1, calls=1)
    names = ["features.0", "features.3", "classifier.1", "classifier.3"]  # TanhCNN28's layers
    expected = {f"{n}.{m}" for n in names for m in ("sq_norms", "sums")}
    split = row["private_parts_ms"]
    assert expected | {"forward with hooks", "backward+hooks", "after forward"} == set(split)
    assert all(v >= 0 for v in split.values())
    assert sum(split[f"{n}.sums"] for n in names) <= split["after forward"]
    assert row["private_ms"] > 0 and row["nonprivate_ms"] > 0
    assert row["cpu"] == bench.cpu_name()


def test_cold_calls_times_each_call_warm_and_after_each_pause():
    cold = _load_benchmark("bench_cold_calls")
    row = cold.measure([0, 300], samples=3)
    assert row["bench"] == "cold_calls" and len(row["calls"]) == 3
    for times in row["calls"].values():
        assert set(times) == {"after_0us_us", "after_300us_us", "ratio_300us"}
        assert times["after_0us_us"] > 0
        assert times["ratio_300us"] == round(times["after_300us_us"] / times["after_0us_us"], 2)


def _plot_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_cli.py"
    spec = importlib.util.spec_from_file_location("plot_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(model, median, low, high, verdict, **extra):
    import json

    row = {"bench": "cli", "commit": "abc1234", "model": model, "steps": 241, "repeats": 31,
           "goal": bench.GOALS[model], "paired_ratio": median, "paired_ratio_ci95": [low, high],
           "verdict": verdict, **extra}  # fmt: skip
    return json.dumps(row)


def test_verdict_plot_takes_the_rows_with_an_interval_in_order(tmp_path):
    plot = _plot_module()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join([
            '{"bench": "cli", "model": "cnn", "ratio": 2.0}',  # before intervals: skipped
            _row("cnn", 1.4, 1.3, 1.5, "missed"),
            '{"bench": "step_parts", "model": "cnn"}',  # another benchmark: skipped
            _row("mlp", 1.2, 1.1, 1.3, "met", cpu="AMD EPYC"),
            "",
            _row("cnn", 1.25, 1.2, 1.35, "unsettled"),
        ])
    )  # fmt: skip
    got = plot.verdict_rows(rows)
    assert sorted(got) == ["cnn", "mlp"]
    assert [r["paired_ratio"] for r in got["cnn"]] == [1.4, 1.25]
    out = plot.plot_verdicts(got, tmp_path / "figs" / "verdicts.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_plot_refuses_bad_rows_naming_the_line(tmp_path):
    plot = _plot_module()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(_row("cnn", 1.4, 1.3, 1.5, "missed") + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        plot.verdict_rows(rows)
    rows.write_text(_row("cnn", 1.6, 1.3, 1.5, "missed") + "\n")
    with pytest.raises(ValueError, match="line 1: median 1.6 outside"):
        plot.verdict_rows(rows)
    with pytest.raises(ValueError, match="no bench_cli row"):
        plot.plot_verdicts({}, tmp_path / "empty.png")
