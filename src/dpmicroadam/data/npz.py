"""Bring-your-own data: an ``.npz`` file with ``x_train, y_train, x_test, y_test``.

Images are uint8 (scaled by 1/255) or floating point (used as given), in (N, H, W) layout
(one channel) or (N, H, W, C) layout (channels last). They are not standardized: computing a
mean and std from private training data would leak outside the privacy accounting; standardize
with public constants before saving if you want it. Labels are integers in ``[0, num_classes)``
with ``num_classes = max(y_train) + 1``. The file is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from dpmicroadam.data.image_dataset import ImageDataset

_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _images(array: np.ndarray, key: str, path: str) -> torch.Tensor:
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        array = array.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"{path}: {key} has shape {array.shape}; expected (N, H, W) or (N, H, W, C)"
        )
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: {key} contains NaN or infinite values; clean the data")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    raise ValueError(
        f"{path}: {key} has dtype {array.dtype}; images must be uint8 (0..255) or floating point"
    )


def _labels(array: np.ndarray, key: str, path: str, num_images: int) -> np.ndarray:
    if array.ndim != 1 or array.shape[0] != num_images:
        raise ValueError(
            f"{path}: {key} has shape {array.shape}; expected ({num_images},), one integer "
            "label per image"
        )
    if np.issubdtype(array.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(array) | (array != np.round(array)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{path}: {key}[{i}] = {array[i].item()!r} is not an integer; labels must be "
                "integers 0..num_classes-1"
            )
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: {key} has dtype {array.dtype}; labels must be integers")
    labels = array.astype(np.int64)
    negative = np.flatnonzero(labels < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(
            f"{path}: {key}[{i}] = {labels[i]} is negative; labels must be 0..num_classes-1"
        )
    return labels


def load_npz_dataset(path: str | os.PathLike[str]) -> ImageDataset:
    """Load an ``.npz`` dataset (see the module docstring for the layout).

    Args:
        path: The ``.npz`` file.

    Returns:
        An :class:`~dpmicroadam.data.image_dataset.ImageDataset` named ``"npz:<path>"``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on missing arrays, bad shapes, non-finite images, or labels that are not
            integers in range (the message names the array, the index and the value).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"npz dataset {os.fspath(path)!r} not found; pass name='npz:/path/to/file.npz' "
            f"with arrays {', '.join(_KEYS)}"
        )
    where = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{str(path)!r} is not an .npz file (a zip archive of arrays, as numpy.savez writes "
            "it); save the data with numpy.savez(path, x_train=..., y_train=..., x_test=..., "
            "y_test=...)"
        )
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in _KEYS if k not in archive.files]
        if missing:
            raise ValueError(
                f"{where} lacks arrays {missing}; it has {archive.files}, needs {list(_KEYS)}"
            )
        arrays = {k: archive[k] for k in _KEYS}
    x_train = _images(arrays["x_train"], "x_train", where)
    x_test = _images(arrays["x_test"], "x_test", where)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{where}: x_train images are {tuple(x_train.shape[1:])} (C, H, W) but x_test "
            f"images are {tuple(x_test.shape[1:])}; both splits must match"
        )
    y_train = _labels(arrays["y_train"], "y_train", where, x_train.shape[0])
    y_test = _labels(arrays["y_test"], "y_test", where, x_test.shape[0])
    if y_train.size == 0:
        raise ValueError(f"{where}: y_train is empty; need at least one training example")
    num_classes = int(y_train.max()) + 1
    empty = num_classes - len(np.unique(y_train))
    if empty:
        warnings.warn(
            f"{where}: labels range over 0..{num_classes - 1} but {empty} of these "
            f"{num_classes} classes have no training example (a stray label such as "
            f"{int(y_train.max())}?); the model gets {num_classes} outputs",
            UserWarning,
            stacklevel=2,
        )
    out_of_range = np.flatnonzero(y_test >= num_classes)
    if out_of_range.size:
        i = int(out_of_range[0])
        raise ValueError(
            f"{where}: y_test[{i}] = {y_test[i]} is out of range: training labels span "
            f"0..{num_classes - 1} (num_classes = max(y_train) + 1 = {num_classes})"
        )
    c, h, w = (int(s) for s in x_train.shape[1:])
    return ImageDataset(
        name=f"npz:{where}",
        x_train=x_train,
        y_train=torch.from_numpy(y_train),
        x_test=x_test,
        y_test=torch.from_numpy(y_test),
        num_classes=num_classes,
        input_shape=(c, h, w),
    )
