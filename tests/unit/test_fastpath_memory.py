"""Memory that loading a model freed goes back to the OS instead of staying in the worker's RSS."""

import sys
from pathlib import Path

import pytest

from captionfleet.core.fastpath import return_freed_heap


def _anonymous_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon and glibc's malloc_trim are Linux's")
def test_freed_heap_pages_are_returned() -> None:
    # 64 KiB blocks stay below glibc's mmap threshold, so they live on the heap; freeing every other one
    # leaves holes that free() alone does not hand back (only a free top of the heap is trimmed).
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    for block in blocks:
        block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touch every page: resident
    kept = blocks[1::2]
    del blocks
    before = _anonymous_mb()
    assert return_freed_heap()
    returned = before - _anonymous_mb()
    assert returned > 40, f"only {returned:.0f} MB of ~94 MB of freed heap went back"
    assert len(kept) == 1500  # the other half is still in use, untouched
