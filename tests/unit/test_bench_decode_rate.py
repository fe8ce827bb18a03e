"""bench.decode_rate on a few tiny JPEGs: every row decodes what the worker would, the report counts the
cores a GPU worker needs from the per-core rate. Nothing here asserts a speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench import decode_rate
from bench.workload import realistic_jpegs


def test_the_rows_make_a_224_input_from_a_photo(tmp_path: Path) -> None:
    (path,) = realistic_jpegs(tmp_path, 1, (160, 120))
    data = path.read_bytes()
    for fn in (decode_rate.draft_on, decode_rate.draft_off):
        image = fn(data)
        assert getattr(image, "size", None) == (224, 224)
    array = decode_rate.worker_path(data)
    assert isinstance(array, np.ndarray) and array.shape == (3, 224, 224) and array.dtype == np.float32
    assert float(array.min()) >= -1.0 and float(array.max()) <= 1.0  # normalised with mean = std = 0.5


def test_cores_needed_round_up_and_add_the_loop() -> None:
    assert decode_rate.cores_needed(100.0, 2500) == {"decode_cores": 25.0, "cores_with_the_loop": 26}
    assert decode_rate.cores_needed(120.0, 4000) == {"decode_cores": 33.3, "cores_with_the_loop": 35}


def test_the_bench_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    argv = ["--images", "2", "--size", "96x64", "--rounds", "1", "--passes", "1", "--work", str(tmp_path / "w")]
    assert decode_rate.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["name"] for row in result["rows"]] == list(decode_rate.ROWS)
    assert all(row["images_per_cpu_s"] > 0 and len(row["rounds_images_per_cpu_s"]) == 1 for row in result["rows"])
    assert set(result["gpu_worker_cores_for"]) == {"2500 images/s", "4000 images/s"}
    assert "load_average_1min_at_start" in result["machine"] and "load_average_1min_at_end" in result["machine"]
    assert result["what"].startswith("96x64")
