"""What a benchmark reads about the machine it runs on: the process's memory (current and peak RSS, with
a peak that can be reset per row) and the CPU's identity (name, microarchitecture, the flags that set
its limits), so a reader can tell which machine produced a figure."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _status_kb(field_name: str) -> int:
    match = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


_LOAD_PEAK_MB = 0.0  # the high-water mark before the last reset: imports, loading, warm-up


def reset_peak_rss() -> None:
    global _LOAD_PEAK_MB
    _LOAD_PEAK_MB = max(_LOAD_PEAK_MB, peak_rss_mb())
    gc.collect()
    # Resets VmHWM to the current RSS (Linux >= 4.0); elsewhere peaks are cumulative.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def process_peak_rss_mb() -> float:
    """The whole process's peak: imports, loading and warm-up (before the last reset) and what came after."""
    return max(_LOAD_PEAK_MB, peak_rss_mb())


def machine_identity(load_at_start: float) -> dict[str, Any]:
    return {
        "cpu": cpu_identity(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        # Other jobs on the machine slow rows down unevenly: what the run started with, for the reader.
        "load_average_1min_at_start": load_at_start,
    }


# The flags that set a CPU's limits (vector width, bf16/int8 units, AMX), and whether it is a virtual machine
# (a hypervisor may report a masked model number, as the Intel Xeon of bench.families' first run did).
CPU_FLAGS = frozenset(
    {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile", "hypervisor"}
)


def cpu_identity() -> dict[str, Any]:
    """Name, family/model and the microarchitecture where we know it: "AMD EPYC" alone hides whether
    AVX-512 runs on full-width units (Zen 5) or on 256-bit halves (Zen 4), which halves every limit."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"name": platform.processor()}
    family, model = int(fields.get("cpu family", "-1")), int(fields.get("model", "-1"))
    flags = set(fields.get("flags", "").split())
    return {
        "name": fields.get("model name", platform.processor()),
        "family": family,
        "model": model,
        "microarchitecture": amd_microarchitecture(fields.get("vendor_id", ""), family, model),
        "flags": sorted(flags & CPU_FLAGS),
    }


def amd_microarchitecture(vendor: str, family: int, model: int) -> str:
    """AMD's family/model numbers (AMD's processor programming references); "unknown" elsewhere."""
    if vendor != "AuthenticAMD":
        return "unknown"
    if family == 0x1A:
        return "Zen 5"
    if family == 0x19:
        return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "Zen 3"
    if family == 0x17:
        return "Zen / Zen 2"
    return "unknown"
