"""The captioner inside Ray Data: ``map_batches(BatchCaptioner, ...)`` on a local Ray runtime with the
tiny model; failure kinds, row order and the model version come through."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captionfleet.core.captioner import Captioner
from tests.hostile_images import hostile_corpus, jpeg_bytes

ray = pytest.importorskip("ray", reason="ray is a dev extra: pip install -e '.[dev]'")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # The worktree first on the actors' path: they import this checkout's captionfleet, as the driver does.
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WORKER_MODEL__THREADS": "1"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
        _temp_dir=os.environ.get("RAY_TMPDIR", "/tmp/ray"),
    )
    try:
        yield
    finally:
        ray.shutdown()


def test_map_batches_captions_a_parquet_image_dataset(local_ray: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from captionfleet.worker.batch_udf import BatchCaptioner

    corpus = {case.name: case for case in hostile_corpus()}
    images = [
        {"bytes": jpeg_bytes(), "path": "a.jpg"},
        {"bytes": corpus["half.jpg"].data, "path": "half.jpg"},
        {"bytes": corpus["notes.txt"].data, "path": "notes.txt"},
        {"bytes": corpus["bomb.png"].data, "path": "bomb.png"},
        {"bytes": None, "path": "only-a-path.jpg"},
        *({"bytes": jpeg_bytes((20 + i, 16)), "path": f"{i}.jpg"} for i in range(7)),
    ]
    expected = [None, "truncated", "not_an_image", "too_large", "empty"] + [None] * 7
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(images, type=kind), "n": list(range(12))}), tmp_path / "ds.parquet")

    ds = ray.data.read_parquet(str(tmp_path / "ds.parquet"))
    captioned = ds.map_batches(
        BatchCaptioner,
        fn_constructor_kwargs={"model": str(tiny_checkpoint), "num_beams": 1, "max_new_tokens": 8, "device": "cpu"},
        batch_size=4,
        concurrency=1,
    )
    rows: list[dict[str, Any]] = sorted(captioned.take_all(), key=lambda row: row["n"])
    assert [row["n"] for row in rows] == list(range(12))
    assert [row["error_kind"] for row in rows] == expected
    version = Captioner.from_dir(tiny_checkpoint, device="cpu").version
    assert {row["model_version"] for row in rows} == {version}
    assert all(isinstance(row["caption"], str) for row, kind in zip(rows, expected, strict=True) if kind is None)
    assert all(row["caption"] is None and row["error_message"] for row in rows if row["error_kind"])
