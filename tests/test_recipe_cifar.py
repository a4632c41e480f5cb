"""The CIFAR-10 WRN-16-4 recipe end to end on a small fake CIFAR-10 in the real tarball format."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np

from dpmicroadam.cli import main


def write_fake_cifar10(folder, per_batch=12, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as archive:
        for name in names:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, per_batch).tolist()
            blob = pickle.dumps(
                {b"batch_label": b"fake", b"data": data, b"labels": labels}, protocol=2
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))


def test_cifar10_recipe_runs_end_to_end(tmp_path, capsys):
    write_fake_cifar10(tmp_path)
    out = tmp_path / "run"
    # The shipped recipe, shrunk only in size (batch, steps, views) so it fits a unit test.
    code = main(
        [
            "train",
            "--recipe",
            "cifar10-wrn16-4",
            "--data-dir",
            str(tmp_path),
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--augmult",
            "2",
            "--physical-batch-size",
            "4",
            "--val-fraction",
            "0.1",
            "--eval-every",
            "2",
            "--json",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "wrn16-4" and summary["optimizer"] == "dp-microadam"
    assert summary["parameters"] == 2_753_402
    assert summary["ema"] == 0.999 and summary["augmult"] == 2
    assert summary["epsilon"] <= 8.0
    assert summary["optimizer_state_bytes_per_param"] < 0.95
    config = json.loads((out / "config.json").read_text())
    assert config["lr_schedule"] == "constant" and config["clip_norm"] == 1.0
