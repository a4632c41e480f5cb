"""Fetching dataset files over the network, with checksum verification.

Every file we download has a published checksum; a file whose digest does not match is
refused and never lands at its final path (it is written to a temporary file in the same
folder and renamed atomically only after verification).

Checksums are only verified on download. Files already on disk are trusted as they are: the
Debian ``dataset-fashion-mnist`` package, for instance, ships re-compressed ``.gz`` files whose
bytes (not contents) differ from the official ones.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and its published checksum.

    Attributes:
        filename: Name of the file inside the data folder.
        url: Where to fetch it from.
        md5: Published MD5 hex digest (integrity check, not a security claim), or None.
        sha256: Published SHA-256 hex digest, or None.
    """

    filename: str
    url: str
    md5: str | None = None
    sha256: str | None = None


_FASHION_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"

# Official MD5 digests, as published with each dataset (Fashion-MNIST README, the MNIST
# mirror used by torchvision, the CIFAR-10 page at cs.toronto.edu).
REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            _FASHION_BASE + "train-images-idx3-ubyte.gz",
            md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            _FASHION_BASE + "train-labels-idx1-ubyte.gz",
            md5="25c81989df183df01b3e8a0aad5dffbe",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            _FASHION_BASE + "t10k-images-idx3-ubyte.gz",
            md5="bef4ecab320f06d8554ea6380940ec79",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            _FASHION_BASE + "t10k-labels-idx1-ubyte.gz",
            md5="bb300cfdad3c16e7a12a480ee83cd310",
        ),
    ),
    "mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            _MNIST_BASE + "train-images-idx3-ubyte.gz",
            md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            _MNIST_BASE + "train-labels-idx1-ubyte.gz",
            md5="d53e105ee54ea40749a09fcbcd1e9432",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            _MNIST_BASE + "t10k-images-idx3-ubyte.gz",
            md5="9fb629c4189551a2d022fa330f9573f3",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            _MNIST_BASE + "t10k-labels-idx1-ubyte.gz",
            md5="ec29112dd5afa0611ce80d1b7f02629c",
        ),
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            md5="c58f30108f718f92721af3b95e74349a",
        ),
    ),
}


def _expected(md5: str | None, sha256: str | None) -> tuple[str, str]:
    if sha256 is not None:
        return "sha256", sha256.lower()
    if md5 is not None:
        return "md5", md5.lower()
    raise ValueError("a checksum is required: pass md5=... or sha256=... (the published digest)")


def _new_hash(algorithm: str) -> hashlib._Hash:
    if algorithm == "md5":
        # MD5 is what the datasets publish; it guards against corruption, not against attack.
        return hashlib.md5(usedforsecurity=False)
    return hashlib.new(algorithm)


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Return the hex digest of a file, read in chunks.

    Args:
        path: The file to hash.
        algorithm: ``"sha256"`` or ``"md5"`` (any name hashlib knows).

    Returns:
        The lower-case hex digest.
    """
    digest = _new_hash(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(
    path: str | os.PathLike[str], md5: str | None = None, sha256: str | None = None
) -> None:
    """Check a file against its published checksum.

    Args:
        path: The file to check.
        md5: Expected MD5 hex digest.
        sha256: Expected SHA-256 hex digest (preferred when both are given).

    Raises:
        ValueError: if no checksum is given, or the file's digest differs (the message names
            the file, the expected and the actual digest).
    """
    algorithm, expected = _expected(md5, sha256)
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise ValueError(
            f"checksum mismatch for {os.fspath(path)!r}: expected {algorithm} {expected}, "
            f"got {actual}; the file is corrupt or not the published one - delete it and "
            "download again"
        )


def download_file(
    url: str,
    destination: str | os.PathLike[str],
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``destination``, verifying its checksum before it appears there.

    The bytes go to a temporary file in the destination's folder while being hashed; only a
    matching file is renamed into place (atomically, with ``os.replace``), so an interrupted
    or corrupted download never leaves a file that looks valid.

    Args:
        url: Where to fetch from.
        destination: Final path of the file; its parent folders are created.
        md5: Expected MD5 hex digest.
        sha256: Expected SHA-256 hex digest (preferred when both are given).
        timeout: Socket timeout in seconds.

    Returns:
        The destination path.

    Raises:
        ValueError: if no checksum is given or the downloaded bytes do not match it.
        OSError: on network or file-system errors (``urllib.error.URLError`` included).
    """
    algorithm, expected = _expected(md5, sha256)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = _new_hash(algorithm)
    fd, tmp_name = tempfile.mkstemp(
        prefix=destination.name + ".", suffix=".part", dir=destination.parent
    )
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if actual != expected:
            raise ValueError(
                f"checksum mismatch downloading {url!r}: expected {algorithm} {expected}, got "
                f"{actual}; the file was discarded - retry, or fetch it by hand into "
                f"{os.fspath(destination.parent)!r}"
            )
        os.replace(tmp_name, destination)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return destination


def fetch_dataset_files(dataset: str, data_dir: str | os.PathLike[str]) -> list[Path]:
    """Download every published file of ``dataset`` that is missing from ``data_dir``.

    Args:
        dataset: ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.
        data_dir: Folder to put the files in.

    Returns:
        The paths of all the dataset's files in ``data_dir``.

    Raises:
        ValueError: for a dataset without download support, or on a checksum mismatch.
    """
    if dataset not in REMOTE_FILES:
        raise ValueError(
            f"dataset={dataset!r} cannot be downloaded; downloadable: {sorted(REMOTE_FILES)}"
        )
    paths = []
    for remote in REMOTE_FILES[dataset]:
        path = Path(data_dir) / remote.filename
        if not path.exists():
            download_file(remote.url, path, md5=remote.md5, sha256=remote.sha256)
        paths.append(path)
    return paths
