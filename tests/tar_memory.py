"""Memory held while reading a tar shard, measured in a fresh interpreter (tests/unit/test_archive_tar.py).

tracemalloc counts every thread's allocations, and a thread another test left behind (a server, a pool
winding down) would count as the reader's. This module imports only the reader, so the spawned process
starts in a fraction of a second.
"""

from __future__ import annotations

import io
import multiprocessing
import tarfile
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from captionfleet.worker.connectors.tar_samples import TarReport, iter_samples

T = TypeVar("T")


def in_fresh_process(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a new interpreter."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result(timeout=120)


def peak_reading(data: bytes, max_bytes: int) -> tuple[list[Any], TarReport, int]:
    """The samples of a shard (their keys and refusals), its report, and the most memory held meanwhile."""
    return in_fresh_process(_peak_reading, data, max_bytes)


def tarfile_peak(data: bytes) -> tuple[int, int]:
    """tarfile's own stream reading of the same shard: its members and the most memory held meanwhile."""
    return in_fresh_process(_tarfile_peak, data)


def _peak_reading(data: bytes, max_bytes: int) -> tuple[list[Any], TarReport, int]:
    report = TarReport()
    tracemalloc.start()
    try:
        seen = [
            (s.key, getattr(s, "refusal", None), len(s.members))
            for s in iter_samples(io.BytesIO(data), max_bytes=max_bytes, report=report)
        ]
        return seen, report, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _tarfile_peak(data: bytes) -> tuple[int, int]:
    tracemalloc.start()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as plain:
            members = sum(1 for _ in plain)
        return members, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
