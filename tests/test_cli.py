"""The command line: `account`, `train --json`, and error messages with exit code 2."""

from __future__ import annotations

import json

import pytest

from dpmicroadam.accounting import epsilon
from dpmicroadam.cli import main


def test_account_epsilon_matches_library(capsys):
    assert (
        main(
            [
                "account",
                "--noise-multiplier",
                "1.0",
                "--sample-rate",
                "0.01",
                "--steps",
                "1000",
                "--delta",
                "1e-5",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == pytest.approx(epsilon(1.0, 0.01, 1000, 1e-5))
    assert out["epsilon"] == pytest.approx(1.828, abs=0.02)


def test_account_calibrates_sigma_from_batch_and_epochs(capsys):
    assert (
        main(
            [
                "account",
                "--epsilon",
                "3",
                "--batch-size",
                "500",
                "--dataset-size",
                "50000",
                "--epochs",
                "10",
                "--accountant",
                "rdp",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 1000
    assert out["epsilon"] <= 3.0
    assert out["epsilon"] == pytest.approx(3.0, rel=0.02)


def test_train_json_prints_one_object_only(tmp_path, capsys):
    code = main(
        ["train", "--steps", "10", "--batch-size", "64", "--json", "--out", str(tmp_path / "run")]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout)  # the whole stdout is one JSON document
    assert stdout.strip().count("\n") == 0
    assert summary["steps"] == 10


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'; choose one of digits"),
        (["train", "--optimizer", "lamb"], "choose one of dp-microadam"),
        (["account", "--noise-multiplier", "1", "--steps", "10"], "--sample-rate"),
        (
            ["account", "--epsilon", "0.001", "--sample-rate", "0.5", "--steps", "100000"],
            "ε|epsilon|budget",
        ),
    ],
)
def test_errors_exit_2_with_a_message(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    import re

    assert re.search(match, err), err
