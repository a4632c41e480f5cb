"""Reading IDX files (the MNIST / Fashion-MNIST format), gzipped or raw.

Layout: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimension sizes, then the data in C order. Only type ``0x08`` (unsigned byte) is used by these
datasets and accepted here.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

_UBYTE = 0x08


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file of unsigned bytes.

    Args:
        path: The file; names ending in ``.gz`` are decompressed.

    Returns:
        A uint8 array of the shape stored in the header.

    Raises:
        ValueError: if the magic number, the element type or the payload size is wrong.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path!r} is not an IDX file (bad magic number {data[:4].hex()!r})")
    if data[2] != _UBYTE:
        raise ValueError(
            f"{path!r} stores IDX element type 0x{data[2]:02x}; only unsigned bytes (0x08) "
            "are supported"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path!r} is truncated: header needs {header} bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise ValueError(
            f"{path!r} holds {len(data) - header} data bytes but its header {shape} needs "
            f"{expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in ``.gz``).

    Args:
        path: Destination file.
        array: A uint8 array of 1 to 255 dimensions.

    Raises:
        TypeError: if ``array`` is not uint8.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"array.dtype={array.dtype}; IDX writing supports uint8 only")
    path = os.fspath(path)
    header = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array).tobytes())
