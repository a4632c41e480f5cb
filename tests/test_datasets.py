"""Dataset loaders on small fake files in the real formats, plus download and split checks."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request

import numpy as np
import pytest
import torch

from dpmicroadam.data import (
    DIGITS_SPLIT_SEED,
    NORMALIZATION,
    download_file,
    load_dataset,
    split_validation,
    verify_file,
)
from dpmicroadam.data import datasets as datasets_module
from dpmicroadam.data.cifar import safe_load_pickle
from dpmicroadam.data.download import REMOTE_FILES, fetch_dataset_files
from dpmicroadam.data.idx import read_idx

IDX_NAMES = {
    "train-images-idx3-ubyte": (3,),
    "train-labels-idx1-ubyte": (1,),
    "t10k-images-idx3-ubyte": (3,),
    "t10k-labels-idx1-ubyte": (1,),
}


def _idx_bytes(array: np.ndarray) -> bytes:
    # Written by hand (not with the library's writer) so the reader is checked against the
    # format itself: magic 0x00 0x00 0x08 ndim, big-endian uint32 sizes, then the bytes.
    header = bytes([0, 0, 0x08, array.ndim])
    for size in array.shape:
        header += int(size).to_bytes(4, "big")
    return header + array.astype(np.uint8).tobytes()


def _fake_mnist(folder, n_train=6, n_test=4, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_load_shapes_labels_values(tmp_path, name, gz):
    arrays = _fake_mnist(tmp_path, gz=gz)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    (mean,), (std,) = NORMALIZATION[name]
    expected = (arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255 - mean) / std
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    good = _idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "bad").write_bytes(b"\x01" + good[1:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "ok").write_bytes(good)
    assert read_idx(tmp_path / "ok").shape == (2, 3)


def test_missing_files_message_names_paths_and_remedies(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    message = str(info.value)
    assert os.fspath(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert os.fspath(tmp_path / "t10k-labels-idx1-ubyte") in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "--data-dir" in message and "--download" in message
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert os.fspath(tmp_path / "cifar-10-python.tar.gz") in str(info.value)
    assert os.fspath(tmp_path / "cifar-10-batches-py") in str(info.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset") as info:
        load_dataset("imagenet")
    for name in ("digits", "mnist", "fashion-mnist", "cifar10", "npz:"):
        assert name in str(info.value)


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    # protocol 2, as the official (Python 2) files; keys are bytes as read with encoding=bytes
    blob = pickle.dumps({b"batch_label": b"fake", b"data": data, b"labels": labels}, protocol=2)
    return blob, data, labels


def _fake_cifar(tmp_path, as_tar):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: _cifar_batch(2, seed) for seed, name in enumerate(names)}
    if as_tar:
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as archive:
            for name, (blob, _, _) in batches.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                archive.addfile(info, io.BytesIO(blob))
    else:
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        for name, (blob, _, _) in batches.items():
            (folder / name).write_bytes(blob)
    return batches


@pytest.mark.parametrize("as_tar", [True, False])
def test_cifar10_tarball_and_folder(tmp_path, as_tar):
    batches = _fake_cifar(tmp_path, as_tar)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    train_labels = sum((batches[f"data_batch_{i}"][2] for i in range(1, 6)), [])
    assert ds.y_train.tolist() == train_labels
    mean, std = NORMALIZATION["cifar10"]
    raw = batches["data_batch_3"][1][1].reshape(3, 32, 32).astype(np.float32) / 255
    expected = (raw - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(ds.x_train[5].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cifar_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_load_pickle(pickle.dumps({b"data": Evil()}, protocol=2))
    good = safe_load_pickle(pickle.dumps({b"data": np.arange(4, dtype=np.uint8)}, protocol=5))
    assert good[b"data"].tolist() == [0, 1, 2, 3]


def _write_npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def test_npz_hw_uint8_and_hwc_float(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 6, 7), dtype=np.uint8)
    name = _write_npz(tmp_path / "a.npz", x, np.array([0, 1, 2, 1, 0]), x[:2], np.array([2, 0]))
    ds = load_dataset(name)
    assert ds.x_train.shape == (5, 1, 6, 7) and ds.input_shape == (1, 6, 7)
    assert ds.num_classes == 3 and ds.y_test.dtype == torch.int64
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), x / 255.0, rtol=1e-6)

    xc = rng.random((4, 6, 7, 3)).astype(np.float32)
    name = _write_npz(tmp_path / "b.npz", xc, np.array([1, 1, 0, 4]), xc[:1], np.array([3]))
    ds = load_dataset(name)
    assert ds.x_train.shape == (4, 3, 6, 7) and ds.num_classes == 5
    # channels-last (N, H, W, C) becomes N x C x H x W without any rescaling of floats
    np.testing.assert_allclose(ds.x_train[2, 1].numpy(), xc[2, :, :, 1])


@pytest.mark.parametrize(
    ("y_train", "y_test", "pattern"),
    [
        (np.array([0, -1, 1]), np.array([0]), r"y_train\[1\] = -1 is negative"),
        (np.array([0.0, 1.5, 1.0]), np.array([0]), r"y_train\[1\] = 1.5 is not an integer"),
        (np.array([0, 1, 1]), np.array([0, 2]), r"y_test\[1\] = 2 is out of range"),
        (np.array(["a", "b", "c"]), np.array([0]), r"labels must be integers"),
    ],
)
def test_npz_bad_labels(tmp_path, y_train, y_test, pattern):
    x = np.zeros((3, 4, 4), dtype=np.uint8)
    name = _write_npz(tmp_path / "bad.npz", x, y_train, x[: len(y_test)], y_test)
    with pytest.raises(ValueError, match=pattern):
        load_dataset(name)


def test_npz_missing_arrays_and_file(tmp_path):
    np.savez(tmp_path / "m.npz", x_train=np.zeros((2, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="y_train"):
        load_dataset(f"npz:{tmp_path / 'm.npz'}")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_digits_split_is_fixed_and_stratified():
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert DIGITS_SPLIT_SEED == 0
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert abs(a.x_train.mean().item()) < 0.05 and abs(a.x_train.std().item() - 1) < 0.05


def test_split_validation_is_deterministic_and_disjoint():
    x = torch.arange(100).float().view(100, 1)
    y = torch.arange(100)
    x_tr, y_tr, x_val, y_val = split_validation(x, y, 0.1, seed=3)
    assert x_tr.shape[0] == 90 and x_val.shape[0] == 10
    assert set(y_tr.tolist()).isdisjoint(y_val.tolist())
    assert sorted(y_tr.tolist() + y_val.tolist()) == list(range(100))
    assert torch.equal(x_val[:, 0].long(), y_val)
    again = split_validation(x, y, 0.1, seed=3)
    assert torch.equal(again[3], y_val)
    other = split_validation(x, y, 0.1, seed=4)
    assert not torch.equal(other[3], y_val)
    with pytest.raises(ValueError, match="fraction"):
        split_validation(x, y, 1.0, seed=0)


def test_verify_file_refuses_mismatch(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    verify_file(path, md5=hashlib.md5(b"hello").hexdigest())
    verify_file(path, sha256=hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify_file(path, sha256=hashlib.sha256(b"hellO").hexdigest())
    with pytest.raises(ValueError, match="checksum is required"):
        verify_file(path)


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(monkeypatch, table):
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        return _FakeResponse(table[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return seen


def test_download_file_verifies_and_renames_atomically(tmp_path, monkeypatch):
    payload = b"x" * 3_000_000
    _serve(monkeypatch, {"http://host/f": payload})
    dest = tmp_path / "sub" / "f"
    download_file("http://host/f", dest, sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    bad = tmp_path / "g"
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_file("http://host/f", bad, md5="0" * 32)
    assert not bad.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]  # no stray temporary file


def test_load_with_download_fetches_official_urls(tmp_path, monkeypatch):
    source = tmp_path / "served"
    arrays = _fake_mnist(source, gz=True)
    table = {}
    fake_remotes = []
    for remote in REMOTE_FILES["mnist"]:
        blob = (source / remote.filename).read_bytes()
        table[remote.url] = blob
        # same official URLs, checksums of our fake files
        fake_remotes.append(
            type(remote)(remote.filename, remote.url, hashlib.md5(blob).hexdigest())
        )
    monkeypatch.setitem(REMOTE_FILES, "mnist", tuple(fake_remotes))
    seen = _serve(monkeypatch, table)
    target = tmp_path / "data"
    ds = load_dataset("mnist", data_dir=target, download=True)
    assert sorted(seen) == sorted(table)
    assert all(url.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for url in seen)
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_download_refuses_files_that_do_not_match_published_checksum(tmp_path, monkeypatch):
    table = {r.url: b"not the real file" for r in REMOTE_FILES["fashion-mnist"]}
    _serve(monkeypatch, table)
    with pytest.raises(ValueError, match="8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        fetch_dataset_files("fashion-mnist", tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    not datasets_module.SYSTEM_FASHION_MNIST_DIR.is_dir(),
    reason="system Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_system_fashion_mnist_loads():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(ds.x_train.mean().item()) < 0.01 and abs(ds.x_train.std().item() - 1) < 0.01
