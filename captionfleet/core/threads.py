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
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
MAX_AUTO_DECODE_THREADS = 64  # 64 cores decode ~6,000 photos/s (docs/benchmarks.md): more than one GPU takes


def own_cgroups(proc_cgroup: Path = PROC_SELF_CGROUP) -> tuple[str | None, dict[str, str]]:
    """This process's cgroup paths from ``/proc/self/cgroup``: the v2 path (the ``0::/path`` line) and the v1
    path of each controller hierarchy (``4:cpu,cpuacct:/path`` gives ``{"cpu,cpuacct": "/path"}``)."""
    v2: str | None = None
    v1: dict[str, str] = {}
    try:
        text = proc_cgroup.read_text()
    except OSError:  # not Linux, or /proc not mounted
        return None, {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2 = path
        elif controllers:
            v1[controllers] = path
    return v2, v1


def _up_to(root: Path, path: str | None) -> list[Path]:
    """``root/<path>`` and each of its parents up to ``root`` itself, deepest first; only ``root`` when the
    path is unknown or would step out of ``root``."""
    parts = [part for part in (path or "").split("/") if part]
    if any(part in (".", "..") for part in parts):
        parts = []
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(directory: Path) -> float | None:
    """cgroup v2's ``cpu.max``: "max 100000" (no limit) or "<quota> <period>"; raises when unreadable."""
    quota, period = (directory / "cpu.max").read_text().split()[:2]
    if quota == "max" or int(period) <= 0:
        return None
    return int(quota) / int(period)


def _v1_limit(directory: Path) -> float | None:
    """cgroup v1's CFS quota and period; a quota of -1 means no limit; raises when unreadable."""
    quota_us = int((directory / "cpu.cfs_quota_us").read_text())
    period_us = int((directory / "cpu.cfs_period_us").read_text())
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def _tightest(directories: list[Path], read: Callable[[Path], float | None]) -> tuple[bool, float | None]:
    """(whether any of the directories had the limit files, the smallest limit among them)."""
    found, limits = False, []
    for directory in directories:
        try:
            limit = read(directory)
        except (OSError, ValueError, IndexError):
            continue
        found = True
        if limit is not None:
            limits.append(limit)
    return found, min(limits, default=None)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, *, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPU limit (in cores) of this process's cgroup, or None when there is none.

    The process's own cgroup comes from ``/proc/self/cgroup``: with a private cgroup namespace (containerd,
    Docker on cgroup v2) it is ``/`` and the limit sits in the files at the root of the mount, but a container
    that shares the host's cgroup namespace, or a process moved into a child cgroup, reads
    ``/system.slice/docker-<id>.scope`` or ``/kubepods/.../<container>`` there, and the root of the mount is
    the node's, with no limit. The kernel enforces the quota of every cgroup from the process's up to the root,
    so the limit is the smallest among them; a path that is not under the mount (a v1 container sees only its
    own cgroup mounted at the controller's directory) leaves the root's files, as before.
    """
    v2_path, v1_paths = own_cgroups(proc_cgroup)
    found, limit = _tightest(_up_to(root, v2_path), _v2_limit)
    if found:
        return limit
    # cgroup v1: the cpu controller's hierarchy, mounted at root/cpu (a link to cpu,cpuacct on most systems).
    cpu_hierarchies = [(name, path) for name, path in v1_paths.items() if "cpu" in name.split(",")] or [("cpu", "/")]
    for name, path in cpu_hierarchies:
        for mount in dict.fromkeys(("cpu", name)):
            found, limit = _tightest(_up_to(root / mount, path), _v1_limit)
            if found:
                return limit
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(root: Path = CGROUP_ROOT, *, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    cores = usable_cores()
    limit = cgroup_cpu_limit(root, proc_cgroup=proc_cgroup)
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
