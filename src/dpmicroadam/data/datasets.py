"""Image-classification datasets as in-memory tensors.

``load_dataset(name)`` returns an :class:`ImageDataset`: float32 images N x C x H x W,
normalized per channel with fixed, published constants (never statistics of the private
training data, which would leak outside the privacy accounting), and int64 labels.

Datasets and their constants (pixel values are first scaled to [0, 1]):

=================  ==============================  ===============================
name               mean                            std
=================  ==============================  ===============================
``digits``         0.3053                          0.3760
``mnist``          0.1307                          0.3081
``fashion-mnist``  0.2860                          0.3530
``cifar10``        (0.4914, 0.4822, 0.4465)        (0.2470, 0.2435, 0.2616)
``npz:PATH``       0 (no standardization)          1
=================  ==============================  ===============================

``digits`` is scikit-learn's 8x8 digits (values 0..16, scaled by 1/16), split 80/20 stratified
with :data:`DIGITS_SPLIT_SEED`. The other datasets use their official test split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dpmicroadam.data.cifar import cifar10_candidates, read_cifar10
from dpmicroadam.data.download import fetch_dataset_files
from dpmicroadam.data.idx import read_idx
from dpmicroadam.data.image_dataset import ImageDataset
from dpmicroadam.data.npz import load_npz_dataset

DIGITS_SPLIT_SEED = 0
"""Seed of the fixed stratified 80/20 train/test split of the ``digits`` dataset."""

DIGITS_TEST_FRACTION = 0.2

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
"""Per-dataset (mean, std) per channel, applied after scaling pixels to [0, 1]."""

DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "npz:PATH")

SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the files."""

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def default_data_dir(name: str) -> Path:
    """Default folder for a dataset's files: ``~/.cache/dpmicroadam/<name>``.

    For ``fashion-mnist`` the system folder :data:`SYSTEM_FASHION_MNIST_DIR` is used instead
    when it exists.
    """
    if name == "fashion-mnist" and SYSTEM_FASHION_MNIST_DIR.is_dir():
        return SYSTEM_FASHION_MNIST_DIR
    return Path.home() / ".cache" / "dpmicroadam" / name


def _how_to_get(name: str, data_dir: Path) -> str:
    hints = []
    if name == "fashion-mnist":
        hints.append("install them with `apt-get install -y dataset-fashion-mnist`")
    hints.append("point --data-dir (data_dir=...) at the folder holding them")
    hints.append(f"or pass --download (download=True) to fetch them into {os.fspath(data_dir)!r}")
    return "; ".join(hints)


def _missing(name: str, looked: list[Path], data_dir: Path) -> FileNotFoundError:
    where = ", ".join(repr(os.fspath(p)) for p in looked)
    return FileNotFoundError(
        f"dataset {name!r}: files not found; looked for {where}. To get them: "
        f"{_how_to_get(name, data_dir)}"
    )


def _normalize(images: np.ndarray, scale: float, name: str) -> torch.Tensor:
    mean, std = NORMALIZATION[name]
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32) / scale
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # N x 1 x 8 x 8, values 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        images,
        digits.target,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    return ImageDataset(
        name="digits",
        x_train=_normalize(x_tr, 16.0, "digits"),
        y_train=_labels(y_tr),
        x_test=_normalize(x_te, 16.0, "digits"),
        y_test=_labels(y_te),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / (stem + ".gz"), directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _idx_candidates(directory: Path) -> list[Path]:
    return [directory / (s + ext) for s in IDX_FILES.values() for ext in (".gz", "")]


def _load_idx_dataset(name: str, data_dir: Path | None, download: bool) -> ImageDataset:
    directory = data_dir if data_dir is not None else default_data_dir(name)
    found = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    if any(p is None for p in found.values()) and download:
        fetch_dataset_files(name, directory)
        found = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    if any(p is None for p in found.values()):
        looked = _idx_candidates(directory)
        if data_dir is None and name == "fashion-mnist" and directory != SYSTEM_FASHION_MNIST_DIR:
            looked = _idx_candidates(SYSTEM_FASHION_MNIST_DIR) + looked
        raise _missing(name, looked, directory)
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"dataset {name!r}: {split} images have shape {images.shape} and labels "
                f"{labels.shape}; expected (N, H, W) and (N,)"
            )
    h, w = arrays["train_images"].shape[1:]
    return ImageDataset(
        name=name,
        x_train=_normalize(arrays["train_images"][:, None], 255.0, name),
        y_train=_labels(arrays["train_labels"]),
        x_test=_normalize(arrays["test_images"][:, None], 255.0, name),
        y_test=_labels(arrays["test_labels"]),
        num_classes=10,
        input_shape=(1, int(h), int(w)),
    )


def _load_cifar10(data_dir: Path | None, download: bool) -> ImageDataset:
    directory = data_dir if data_dir is not None else default_data_dir("cifar10")
    candidates = cifar10_candidates(directory)
    source = next((p for p in candidates if p.exists()), None)
    if source is None and download:
        fetch_dataset_files("cifar10", directory)
        source = next((p for p in candidates if p.exists()), None)
    if source is None:
        raise _missing("cifar10", candidates, directory)
    x_train, y_train, x_test, y_test = read_cifar10(source)
    return ImageDataset(
        name="cifar10",
        x_train=_normalize(x_train, 255.0, "cifar10"),
        y_train=_labels(y_train),
        x_test=_normalize(x_test, 255.0, "cifar10"),
        y_test=_labels(y_test),
        num_classes=10,
        input_shape=(3, 32, 32),
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> ImageDataset:
    """Load an image-classification dataset into memory.

    Args:
        name: ``"digits"``, ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"npz:PATH"``
            (see :func:`dpmicroadam.data.npz.load_npz_dataset` for the npz layout).
        data_dir: Folder holding the files: IDX files (``.gz`` or raw) for (fashion-)mnist;
            ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` for cifar10. Defaults to
            :func:`default_data_dir`. Ignored for ``digits`` (bundled with scikit-learn) and
            ``npz:PATH``.
        download: Fetch missing files from the official URLs into ``data_dir``; each file's
            published checksum is verified before it is kept.

    Returns:
        The dataset, normalized with the constants in :data:`NORMALIZATION`.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or malformed data.
        FileNotFoundError: when the files are missing (the message lists the paths looked at
            and how to get the files).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
    directory = Path(data_dir) if data_dir is not None else None
    if name.startswith("npz:"):
        return load_npz_dataset(name[len("npz:") :])
    if name == "digits":
        return _load_digits()
    if name in ("mnist", "fashion-mnist"):
        return _load_idx_dataset(name, directory, download)
    if name == "cifar10":
        return _load_cifar10(directory, download)
    raise ValueError(f"unknown dataset name={name!r}; valid names: {', '.join(DATASET_NAMES)}")


def split_validation(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carve a validation split out of the training data with a fixed seed.

    Use the validation split to choose hyper-parameters; the test split is only evaluated.
    Both parts keep the original order of their examples.

    Args:
        x: Training inputs, N x ...
        y: Training labels, N.
        fraction: Share of the N examples that goes to validation, in [0, 1); the count is
            ``round(fraction * N)``, clamped to [1, N - 1]. 0 returns an empty validation split.
        seed: Seed of the private ``torch.Generator`` that draws the permutation.

    Returns:
        ``(x_train, y_train, x_val, y_val)``.

    Raises:
        ValueError: if ``fraction`` is not in [0, 1), N < 2, or x and y disagree in length.
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1), e.g. 0.1")
    if float(fraction) == 0.0:
        return x, y, x[:0], y[:0]
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}; pass matching tensors")
    if n < 2:
        raise ValueError(f"need at least 2 examples to split, got {n}")
    n_val = min(max(round(float(fraction) * n), 1), n - 1)
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    val_idx = perm[:n_val].sort().values.to(x.device)
    train_idx = perm[n_val:].sort().values.to(x.device)
    return x[train_idx], y[train_idx.to(y.device)], x[val_idx], y[val_idx.to(y.device)]
