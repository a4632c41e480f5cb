"""keep_freed_memory: what glibc does with a block of 16 MiB, in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpmicroadam import allocator

needs_glibc = pytest.mark.skipif(allocator.glibc() is None, reason="mallopt thresholds are glibc's")

# Allocates and frees one block of 16 MiB with the C library's malloc, after calling
# keep_freed_memory() or not (argv[1]), and reports from mallinfo2 whether the block was an
# mmap block, and how much free memory the heap kept at its top afterwards.
PROBE = r"""
import ctypes, json, sys
from dpmicroadam.allocator import glibc, keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = glibc()
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
result = keep_freed_memory() if sys.argv[1] == "call" else "not called"
before = libc.mallinfo2().hblks
block = libc.malloc(16 * 2**20)
mmapped = libc.mallinfo2().hblks - before
ctypes.memset(block, 1, 16 * 2**20)  # touch every page
libc.free(block)
print(json.dumps({"result": result, "mmapped": mmapped, "keepcost": libc.mallinfo2().keepcost}))
"""


def probe(call: bool, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    clean.pop(allocator.OPT_OUT, None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "call" if call else "skip"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@needs_glibc
def test_a_freed_block_stays_in_the_heap_after_keep_freed_memory():
    kept = probe(call=True)
    assert kept["result"] == "kept"
    assert kept["mmapped"] == 0  # served from the heap
    assert kept["keepcost"] >= 16 * 2**20  # and still mapped after free: no page faults next time
    # glibc's defaults, in the same kind of fresh process: an mmap block, unmapped on free
    default = probe(call=False)
    assert default["result"] == "not called"
    assert default["mmapped"] == 1
    assert default["keepcost"] < 16 * 2**20


@needs_glibc
def test_opting_out_and_glibc_settings_leave_malloc_alone():
    out = probe(call=True, DPMICROADAM_MALLOC="system")
    assert out["result"] == "opted out" and out["mmapped"] == 1
    # a user's own glibc setting is theirs: here it asks for mmap from 1 MiB up
    out = probe(call=True, MALLOC_MMAP_THRESHOLD_=str(2**20))
    assert out["result"] == "user settings" and out["mmapped"] == 1


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"mmap_threshold": 33 * 2**20}, "mmap_threshold=34603008"),
        ({"mmap_threshold": -1}, "mmap_threshold=-1"),
        ({"trim_threshold": -5}, "trim_threshold=-5"),
    ],
)
def test_bad_thresholds_are_refused_by_name(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        allocator.keep_freed_memory(**kwargs)
