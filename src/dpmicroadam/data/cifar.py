"""Reading the CIFAR-10 python-version files without trusting pickle.

The official ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/data_batch_1..5`` and
``test_batch``: Python 2 pickles of dicts with ``b"data"`` (N x 3072 uint8, each row a 3x32x32
image in channel, row, column order) and ``b"labels"`` (a list of ints).

Pickle can run arbitrary code, so these files are read with :class:`SafeUnpickler`, which
resolves only the few globals that rebuild numpy arrays. The tarball is read in place (members
are never extracted to disk, so there is no path-traversal risk).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

# (module, name) pairs a numpy-array pickle needs; "numpy.core" is numpy<2's name of
# "numpy._core". _codecs.encode appears in pickles of bytes written by Python 3 (protocol 2).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def _numpy_core_module(module: str) -> Any:
    candidates = [module]
    if module.startswith("numpy.core."):
        candidates.insert(0, "numpy._core." + module[len("numpy.core.") :])
    elif module.startswith("numpy._core."):
        candidates.append("numpy.core." + module[len("numpy._core.") :])
    for name in candidates:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise pickle.UnpicklingError(f"cannot import {module!r}")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild plain containers and numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError` naming it, so a malicious file cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR-10 batches contain only "
                "numpy arrays and lists; this file is not a genuine CIFAR-10 batch"
            )
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(_numpy_core_module(module) if "core" in module else np, name)


def safe_load_pickle(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler` (``encoding="bytes"``, as CIFAR needs)."""
    return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()


def _parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load_pickle(data)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(
            f"{where} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'"
        )
    images = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{where}: b'data' has dtype {images.dtype} and shape {images.shape}; expected "
            "uint8 of shape (N, 3072)"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{where}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images.reshape(-1, 3, 32, 32), labels


def cifar10_candidates(data_dir: str | os.PathLike[str]) -> list[Path]:
    """The paths where the CIFAR-10 files are looked for, in order."""
    data_dir = Path(data_dir)
    return [data_dir / CIFAR10_FOLDER, data_dir / CIFAR10_ARCHIVE]


def read_cifar10(
    source: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 from the extracted folder or the official tarball.

    Args:
        source: ``.../cifar-10-batches-py`` (a folder) or ``.../cifar-10-python.tar.gz``.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images N x 3 x 32 x 32, int64 labels.

    Raises:
        FileNotFoundError: if a batch is missing.
        ValueError: if a batch is malformed.
        pickle.UnpicklingError: if a batch references anything but numpy arrays.
    """
    source = Path(source)
    names = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
    raw: dict[str, bytes] = {}
    if source.is_dir():
        for name in names:
            path = source / name
            if not path.is_file():
                raise FileNotFoundError(f"CIFAR-10 batch {os.fspath(path)!r} is missing")
            raw[name] = path.read_bytes()
    else:
        with tarfile.open(source, "r:*") as archive:
            for name in names:
                member = f"{CIFAR10_FOLDER}/{name}"
                try:
                    handle = archive.extractfile(member)
                except KeyError:
                    handle = None
                if handle is None:
                    raise FileNotFoundError(f"{os.fspath(source)!r} has no member {member!r}")
                raw[name] = handle.read()
    train = [_parse_batch(raw[n], f"{source}/{n}") for n in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _parse_batch(raw[CIFAR10_TEST_BATCH], f"{source}/{CIFAR10_TEST_BATCH}")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test
