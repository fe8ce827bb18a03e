"""How many threads torch may use in this process.

torch sizes its intra-op pool by the cores it can see, and in a container that is every core of the
node, not the container's CPU limit: a worker limited to 2 CPUs on a 64-core node would run 64
OpenMP threads, and each op would then wait at its barrier for threads the kernel has throttled
(on this project's 2-core machines two threads on two busy cores already made small ops ~100x
slower, docs/benchmarks.md). So the default is the CPU limit of the cgroup, rounded down, never
more than the cores this process may run on. ``WORKER_MODEL__THREADS`` overrides it.

The pipeline's decode threads (``WORKER_BATCH__DECODE_THREADS``, ``decode_threads``) follow the same limit
on a GPU worker, where decoding JPEGs is the CPU's whole job; on a CPU worker they keep their small fixed
number, because there the model's torch threads need those same cores.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
MAX_AUTO_DECODE_THREADS = 64  # 64 cores decode ~6,000 photos/s (docs/benchmarks.md): more than one GPU takes


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit (in cores) of this process's cgroup, or None when there is none."""
    try:  # cgroup v2: "max 100000" (no limit) or "<quota> <period>"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:  # cgroup v1: a quota of -1 means no limit
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(root: Path = CGROUP_ROOT) -> int:
    cores = usable_cores()
    limit = cgroup_cpu_limit(root)
    if limit is None:
        return cores
    # Rounded down: a thread more than the quota is throttled, and the others wait for it at every op.
    return max(1, min(cores, math.floor(limit)))


def apply_threads(requested: int) -> int:
    """Set torch's intra-op threads (0 = ``default_threads()``); returns the number set."""
    threads = requested or default_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch uses %d thread(s)%s", threads, "" if requested else " (the CPU limit of this container)")
    return threads


# Decode threads of a CPU worker: the model's torch threads take the container's cores (default_threads),
# and decoding with draft mode is a few per cent of the CPU next to them (docs/benchmarks.md), so two threads
# keep it ahead of the model without taking cores from it.
CPU_DECODE_THREADS = 2


def decode_threads(requested: int, *, on_cuda: bool, root: Path = CGROUP_ROOT) -> int:
    """The pipeline's decode threads: ``requested``, or for 0 (auto) the default for where the model runs.

    On CUDA the GPU captions far faster than one core decodes JPEGs (docs/benchmarks.md, "Decoding on the
    CPU"), so every core the container may use decodes, but one, left to the process's own loop (the
    batcher and the model thread launching kernels, Kafka or HTTP I/O); never fewer than one.
    """
    if requested:
        return requested
    if not on_cuda:
        return CPU_DECODE_THREADS
    # Capped: a pod with no CPU limit sees the node's cores (hundreds on a big node), and threads past what
    # one GPU can take only cost memory and contention.
    return min(MAX_AUTO_DECODE_THREADS, max(1, default_threads(root) - 1))
