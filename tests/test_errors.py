"""The error contract: every bad input gets one line on stderr, exit code 2, no traceback,
naming the flag, value or file and the fix; nothing is left half-written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dpmicroadam.cli import main

RUN = ["--steps", "2", "--batch-size", "64", "--no-progress"]


def one_line_error(capsys, argv, code=2):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, (argv, rc, err)
    lines = [
        line for line in err.strip().splitlines() if not line.startswith("dpmicroadam: warning")
    ]
    assert len(lines) == 1, err  # one line
    assert "Traceback" not in err
    return lines[0]


def write_npz(path, **over):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (80, 1, 8, 8), dtype=np.uint8),
        y_train=np.arange(80) % 4,
        x_test=rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8),
        y_test=np.arange(20) % 4,
    )
    arrays.update(over)
    np.savez(path, **arrays)
    return path


BAD_FLAGS = [
    (["train", "--device", "tpu"], "--device 'tpu'"),
    (["train", "--device", "cuda:7"], "--device cuda"),
    (["train", "--optimizer", "adam", "--epsilon", "3"], "--epsilon would be ignored"),
    (["train", "--optimizer", "sgd", "--clip-norm", "1"], "--clip-norm would be ignored"),
    (["train", "--steps", "2", "--epochs", "1"], "--steps or --epochs, not both"),
    (["train", "--optimizer", "dp-sgd", "--momentum", "2"], "--momentum must be in [0, 1)"),
    (["train", "--optimizer", "dp-adam", "--momentum", "0.9"], "--momentum 0.9 would be ignored"),
    (["train", "--eval-every", "0"], "--eval-every must be >= 1"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["train", "--clip-norm", "1e300"], "--clip-norm must be at most"),
    (["train", "--clip-norm", "0"], "--clip-norm must be > 0"),
    (["train", "--density-1d", "0"], "--density-1d must be in (0, 1]"),
    (["train", "--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--steps", "2.5"], "--steps: invalid int value"),
    (["train", "--optimizer", "lamb"], "unknown optimizer 'lamb'"),
    (["train", "bogus"], "unrecognized arguments: bogus"),
    (
        [
            "account",
            "--dataset-size",
            "0",
            "--batch-size",
            "1",
            "--noise-multiplier",
            "1",
            "--steps",
            "3",
        ],
        "--dataset-size must be >= 1",
    ),  # fmt: skip
    (["finetune"], "finetune needs a model and its data"),
    (["finetune", "--model", "mlp"], "--model does not apply to finetune"),
    (["finetune", "--model-path", "/no/such/folder", "--train", "t.csv"], "is not a folder"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags(argv, message, capsys, tmp_path):
    line = one_line_error(capsys, argv + ["--out", str(tmp_path / "o")] if argv[0] == "train"
                          and "--resume" not in argv and "bogus" not in argv else argv)  # fmt: skip
    assert message in line, line
    assert not (tmp_path / "o").exists()  # a run refused before its first step leaves no folder


BAD_TOML = [
    ('epsilon = "three"', "epsilon = 'three' has the wrong type; epsilon takes a number"),
    ("steps = 2.5", "steps = 2.5 has the wrong type; steps takes an integer"),
    ('json = "false"', "json = 'false' has the wrong type; json takes true or false"),
    ('progress = "false"', "progress = 'false' has the wrong type"),
    ('secure_noise = "no"', "secure_noise = 'no' has the wrong type"),
    ("lr = true", "lr = True has the wrong type"),
    ("bogus = 1", "unknown config keys ['bogus']"),
    ("epsilon = ", "is not valid TOML"),
]


@pytest.mark.parametrize("body, message", BAD_TOML, ids=[b for b, _ in BAD_TOML])
def test_bad_toml_values_name_the_file_and_the_key(body, message, capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(body + "\n")
    line = one_line_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "o")])
    assert message in line and str(path) in line, line


def test_bad_npz_files(capsys, tmp_path):
    not_zip = tmp_path / "data.npz"
    not_zip.write_bytes(b"this is not a zip archive")
    line = one_line_error(capsys, ["train", "--dataset", f"npz:{not_zip}", *RUN])
    assert "is not an .npz file" in line and str(not_zip) in line
    ints = write_npz(tmp_path / "int32.npz", x_train=np.zeros((80, 1, 8, 8), dtype=np.int32))
    line = one_line_error(capsys, ["train", "--dataset", f"npz:{ints}", *RUN])
    assert "dtype int32" in line and "uint8" in line
    empty = write_npz(tmp_path / "empty.npz", x_test=np.zeros((0, 1, 8, 8), np.uint8),
                      y_test=np.zeros(0, np.int64))  # fmt: skip
    line = one_line_error(capsys, ["train", "--dataset", f"npz:{empty}", *RUN])
    assert "test split is empty" in line and "diverged" not in line


def test_a_stray_label_is_warned_about(capsys, tmp_path):
    labels = np.arange(80) % 10
    labels[3] = 1000
    path = write_npz(tmp_path / "stray.npz", y_train=labels, y_test=np.arange(20) % 10)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="990 of these 1001 classes have no training example"):
        assert main(["train", "--dataset", f"npz:{path}", *RUN, "--out", str(out)]) == 0


def test_warnings_print_as_one_line():
    import warnings

    from dpmicroadam.cli import _one_line_warning

    text = _one_line_warning(UserWarning("a stray label"), UserWarning, "file.py", 3)
    assert text == "dpmicroadam: warning: a stray label\n"
    main(["account", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "10"])
    assert warnings.formatwarning is _one_line_warning  # what the CLI installs


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 50, "truncate"])
def test_damaged_checkpoints_are_refused_safely(content, capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *RUN, "--out", str(out)]) == 0
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if content == "truncate" else content)
    line = one_line_error(capsys, ["train", *RUN, "--out", str(out), "--resume"])
    assert "is damaged or not a dpmicroadam checkpoint" in line
    assert "weights_only" not in line  # never the advice to load it unsafely


def test_out_that_is_a_file_or_unwritable(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = one_line_error(capsys, ["train", *RUN, "--out", str(a_file)])
    assert "is a file, not a folder" in line
    line = one_line_error(capsys, ["train", *RUN, "--out", "/proc/dpmicroadam-run"])
    assert "cannot be written" in line and not os.path.exists("/proc/dpmicroadam-run")


def test_a_full_disk_leaves_no_tmp_file(capsys, tmp_path, monkeypatch):
    import errno

    real_save = torch.save

    def full_disk(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk)
    line = one_line_error(capsys, ["train", *RUN, "--out", str(out)], code=4)
    monkeypatch.setattr(torch, "save", real_save)
    assert "No space left on device" in line and "checkpoint.pt" in line
    assert not list(out.glob("*.tmp"))  # nothing half-written stays behind


def test_resume_of_a_missing_folder_is_an_error(capsys, tmp_path):
    line = one_line_error(capsys, ["train", *RUN, "--out", str(tmp_path / "nope"), "--resume"])
    assert "does not exist, so there is nothing to resume" in line


def test_sigma_zero_summary_is_strict_json_and_not_private(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["train", *RUN, "--noise-multiplier", "0", "--json", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert summary["private"] is False and summary["epsilon"] is None
    assert "not private" in summary["guarantee"]
    on_disk = (out / "summary.json").read_text()
    json.loads(on_disk, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_realized_normalization_is_warned_and_noted(capsys, tmp_path):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="normalize='realized'.*does not cover"):
        assert main(["train", *RUN, "--normalize", "realized", "--json", "--out", str(out)]) == 0
    assert "NOT covered" in json.loads(capsys.readouterr().out)["guarantee"]


def test_the_summary_says_what_must_stay_secret(capsys, tmp_path):
    assert main(["train", *RUN, "--json", "--out", str(tmp_path / "a")]) == 0
    secret = json.loads(capsys.readouterr().out)
    assert secret["noise_seed"] == "secret (OS entropy)"
    assert "checkpoint" in secret["guarantee"] and "--noise-seed" not in secret["guarantee"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["noise_seed"] is None  # the entropy seed is not written anywhere
    assert main(["train", *RUN, "--json", "--noise-seed", "7", "--out", str(tmp_path / "b")]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert fixed["noise_seed"] == 7 and "--noise-seed 7" in fixed["guarantee"]


def test_seed_drives_init_but_not_the_noise(tmp_path):
    """Same --seed, no --noise-seed: same initial weights, different noise (secret)."""
    from dpmicroadam.train import Run, resolve_config

    def run(name, **kw):
        r = Run(resolve_config({"steps": 1, "batch_size": 64, "progress": False,
                                "out": str(tmp_path / name), **kw}))  # fmt: skip
        init = [p.detach().clone() for p in r.model.parameters()]
        r.step()
        return init, [p.detach().clone() for p in r.model.parameters()]

    init_a, after_a = run("a")
    init_b, after_b = run("b")
    assert all(torch.equal(x, y) for x, y in zip(init_a, init_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(after_a, after_b, strict=True))
    _, fixed_1 = run("c", noise_seed=5)
    _, fixed_2 = run("d", noise_seed=5)
    assert all(torch.equal(x, y) for x, y in zip(fixed_1, fixed_2, strict=True))


@pytest.mark.parametrize(
    "body, message",
    [
        (
            '[base]\nepsilon = "three"\n[[grid]]\nlr = [0.1]',
            "[base]: epsilon = 'three' has the wrong type",
        ),
        ("[[grid]]\nsteps = [2, 2.5]", "[[grid]] 1: steps = 2.5 has the wrong type"),
        ("[[grid]]\nbogus = 1", "[[grid]] 1: unknown key 'bogus'"),
        ('[[grid]]\nseed = "tuned"', "'tuned' is not allowed for 'seed'"),
        ("[base]\nlr = 0.1", "has no [[grid]] block"),
    ],
)
def test_bad_sweep_files_are_refused_before_any_run(body, message, capsys, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n' + body + "\n")
    line = one_line_error(capsys, ["sweep", str(path), "--results-dir", str(tmp_path / "r")])
    assert message in line, line
    assert not (tmp_path / "r" / "s.csv").exists()
