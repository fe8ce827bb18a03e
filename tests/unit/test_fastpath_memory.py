"""Memory that loading a model freed goes back to the OS instead of staying in the worker's RSS."""

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from captionfleet.core import fastpath
from captionfleet.core.fastpath import return_freed_heap
from captionfleet.core.loading import load_checkpoint


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


# Allocates and frees, round after round, what a decoding step does: large tensors, freed together. 96 MiB
# freed at once: more than glibc's default trim threshold (twice its mmap threshold, at most 64 MiB).
_STEPS = """
import resource, sys, threading, torch
from captionfleet.core.fastpath import reuse_freed_memory
assert reuse_freed_memory()
def step():
    tensors = [torch.ones(1024 * 1024) for _ in range(24)]  # 4 MiB each, every page written
    tensors += [torch.ones(20 * 1024 * 1024) for _ in range(2)]  # 80 MiB: a batch of 32's MLP activations
    del tensors
def rounds():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[1] == "thread":  # as a streaming worker's model thread
    worker = threading.Thread(target=rounds)
    worker.start()
    worker.join()
else:
    rounds()
"""


def _page_faults(where: str) -> int:
    done = subprocess.run([sys.executable, "-c", _STEPS, where], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_freed_tensors_are_reused_not_faulted_in_again() -> None:
    # On the main thread and on another (a streaming worker's model thread: glibc's other arenas mmap any block
    # over 64 MiB, so reuse_freed_memory() keeps one arena).
    # In a fresh process: after reuse_freed_memory() the heap keeps each round's 256 MiB (~65,000 pages), so the
    # rounds fault next to no pages (1,024, or 20,480 where one 80 MiB block found no room once). Without it,
    # glibc's defaults fault 400,000 and more: the 80 MiB blocks are fresh mmaps every round.
    # A regression is 400,000 and more; each time an 80 MiB block finds no room once it costs 20,480.
    for where in ("main", "thread"):
        reused = _page_faults(where)
        assert reused < 150_000, f"{reused} page faults over 10 rounds on the {where} thread: freed memory not kept"


@pytest.mark.parametrize("family", ["vision-encoder-decoder", "blip"])
def test_every_loader_keeps_freed_memory_for_reuse(
    family: str, tiny_checkpoint: Path, tiny_family: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(fastpath, "reuse_freed_memory", lambda: calls.append(True) or True)
    path = tiny_checkpoint if family == "vision-encoder-decoder" else tiny_family(family)
    load_checkpoint(path, device="cpu", precision="fp32")
    assert calls, f"loading a {family} checkpoint left glibc's defaults (reuse_freed_memory not called)"
