"""bench/gpu.py runs only where a GPU is lent; its --device cpu smoke mode keeps it from rotting here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu
from captionfleet.core.static_decoding import StaticDecoding


def test_gpu_bench_runs_end_to_end_in_its_cpu_smoke_mode(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    static_batches: list[int] = []
    generate = StaticDecoding.generate

    def counted(self: StaticDecoding, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        static_batches.append(pixel_values.shape[0])
        return generate(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(StaticDecoding, "generate", counted)
    argv = ["--device", "cpu", "--checkpoint", str(tiny_checkpoint), "--quick", "--images", "4", "--batch", "2"]
    assert gpu.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    # The new rows decode through the static caches: each warmed up once (its one bucket), then every batch of
    # its warm-up run and its timed run (4 rows; 4 images in batches of 2, or 2 per timed end-to-end run).
    assert len(static_batches) > 4 * 2, static_batches
    result = json.loads((tmp_path / "out" / "benchmarks-gpu-quick.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert all(row["images_per_s"] > 0 and not row["error"] for row in rows.values()), rows
    # The new path's rows (named after the default precision, bf16 or fp32 by the CPU): static KV cache from
    # decoded tensors and from JPEGs through the image path, greedy and 4 beams; nvJPEG only on a GPU.
    new = {name: row for name, row in rows.items() if name.startswith("new: ")}
    assert len(new) == 4 and {row["decoding"].split(",")[0] for row in new.values()} == {"greedy", "4 beams"}
    notes = [row["note"] for name, row in new.items() if "end to end" in name]
    assert notes == ["nvJPEG decoded 0 of 4", "nvJPEG decoded 0 of 2"]
    assert [target["row"] for target in result["targets"]] == list(new)
    assert sum(name.startswith("grouped: ") and "4 beams" in name for name in rows) == 2  # batch 2 and 4
    notes = [rows[name]["note"] for name in rows if name.startswith(("grouped: ", "eager: "))]
    assert notes == ["grouped", "grouped", "eager"]  # each row attends as its name says
    assert rows["a model card (1 image/call)"]["vs_model_card"] == 1.0
    assert all(row["limit_images_per_s"] > 0 for row in rows.values())
    assert (tmp_path / "out" / "benchmarks-gpu-quick.png").stat().st_size > 0
    assert "| c captionfleet pipeline" in (tmp_path / "out" / "benchmarks-gpu-quick-table.md").read_text()


def test_gpu_bench_says_where_to_run_it_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="run this on the GPU machine"):
        gpu.Device("cuda")
