"""Keep freed tensor memory in the process (glibc), for scripts that time or run small DP steps.

glibc's ``malloc`` serves a block of 128 KiB or more with fresh ``mmap`` pages and returns them
to the kernel when the block is freed. Its threshold adapts, but only upwards to the largest
``mmap`` block freed so far, so how fast a step runs depends on what the process freed before.
A DP step allocates and frees blocks of megabytes every time (per-example gradients, the
grouped-convolution kernels' scratch), and in a process whose threshold never rose the kernel
zero-fills every page of them again, every step.

Measured on this project's 2-core machine (``benchmarks/bench_allocator.py``, docs/speed.md,
"Twelfth session"): one ``FastEngine`` step of the tanh CNN (64 examples, 1 thread) in a fresh
process took 9.63 ms with glibc's defaults and 6.81 ms after :func:`keep_freed_memory`; the
non-private step stayed at 4.1 ms. A ``dpmicroadam train`` run showed no such difference
(loading the data had already raised the threshold) but a higher peak resident set (Fashion-MNIST
CNN, 300 steps: 985 MB against 906-938 MB), so neither the command line nor the library calls it:
a script may, first thing.

:func:`keep_freed_memory` fixes both thresholds with ``mallopt``: blocks up to 32 MiB come from
the heap, and up to 64 MiB of free heap stays mapped. It is process-wide. Off glibc (macOS,
musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
OPT_OUT = "DPMICROADAM_MALLOC"  # "system": leave malloc as it is, even when asked
# glibc's own settings: whoever set one of these has chosen, and is not overruled.
GLIBC_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "GLIBC_TUNABLES",
)


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # musl has a mallopt that ignores these settings, and no gnu_get_libc_version
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def keep_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> str:
    """Set glibc's mmap and trim thresholds for this process; returns what was done.

    Returns:
        ``"kept"`` when both thresholds were set, otherwise why not: ``"opted out"``
        (``DPMICROADAM_MALLOC=system``), ``"user settings"`` (one of glibc's ``MALLOC_*_``
        variables or ``GLIBC_TUNABLES`` is set), ``"not glibc"``, or ``"refused"`` (glibc
        rejected a value).

    Raises:
        ValueError: ``mmap_threshold`` outside 0..32 MiB (glibc's limit on 64-bit systems) or a
            negative ``trim_threshold``.
    """
    if not 0 <= mmap_threshold <= MMAP_THRESHOLD:
        raise ValueError(
            f"mmap_threshold={mmap_threshold!r} bytes: glibc accepts 0 to {MMAP_THRESHOLD} "
            "(32 MiB); larger blocks are always served by mmap"
        )
    if trim_threshold < 0:
        raise ValueError(f"trim_threshold={trim_threshold!r} bytes: must be >= 0")
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return "opted out"
    if any(name in os.environ for name in GLIBC_VARIABLES):
        return "user settings"
    libc = glibc()
    if libc is None:
        return "not glibc"
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either one ends glibc's adaptation of both; set the trim threshold first.
    if mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        return "refused"
    if mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return "refused"
    return "kept"
