"""Tabular archives on local disk: Parquet datasets with images inside and manifests of file:// uris (CSV,
JSONL, Parquet), with a model that answers at once. The http side is in tests/integration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.bulk_archive import ArchiveJobError, ArchiveOptions, run_archive_job
from tests.hostile_images import hostile_corpus, jpeg_bytes
from tests.unit.test_s3_retry import FakeCaptioner


def settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        batch={"max_items": 4, "max_wait_ms": 5},  # type: ignore[arg-type]
        fetch={"file_root": tmp_path / "root", "allowed_buckets": ["images"]},  # type: ignore[arg-type]
    )


def run(tmp_path: Path, src: Path, **options: Any) -> Any:
    model: Any = FakeCaptioner()
    return run_archive_job(
        str(src),
        str(tmp_path / "out"),
        settings(tmp_path),
        options=ArchiveOptions(**options),
        show_progress=False,
        captioner=model,
    )


def test_images_inside_parquet_are_captioned_row_for_row_without_files(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    corpus = {case.name: case for case in hostile_corpus()}
    images = [
        {"bytes": jpeg_bytes(), "path": "a.jpg"},
        {"bytes": corpus["half.jpg"].data, "path": "half.jpg"},
        {"bytes": None, "path": "elsewhere/only-a-path.jpg"},
        {"bytes": corpus["notes.txt"].data, "path": None},
        {"bytes": jpeg_bytes((20, 10)), "path": None},
    ]
    table = pa.table(
        {
            "image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "label": [3, 1, 4, 1, 5],
            "caption": ["old 0", "old 1", "old 2", "old 3", "old 4"],  # named like our field: kept aside
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000.parquet", row_group_size=2)
    summary = run(tmp_path, tmp_path / "data" / "train-00000.parquet", input_format="parquet")
    out = pq.read_table(tmp_path / "out" / "train-00000.parquet")
    assert out.column_names[:3] == ["image_path", "label", "original_caption"]
    rows = out.to_pylist()
    assert [row["label"] for row in rows] == [3, 1, 4, 1, 5]  # one row per input row, in order
    assert [row["original_caption"] for row in rows] == [f"old {i}" for i in range(5)]
    assert [row["error_kind"] for row in rows] == [None, "truncated", "empty", "not_an_image", None]
    assert rows[0]["caption"].startswith("red ") and rows[4]["width"] > 0
    assert "only the path" in rows[2]["error_message"]
    assert summary.done == 2 and summary.failed == 3
    marker = json.loads((tmp_path / "out" / "train-00000.complete.json").read_text())
    assert marker["format"] == "parquet-images" and marker["rows"] == 5


def test_manifests_of_file_uris_keep_their_columns(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes())
    (root / "b.jpg").write_bytes(jpeg_bytes((30, 20)))
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes())
    uris = [
        (root / "a.jpg").as_uri(),
        "",
        (tmp_path / "secret.jpg").as_uri(),  # outside WORKER_FETCH__FILE_ROOT
        "s3://other-bucket/x.jpg",  # not an allowed bucket
        (root / "missing.jpg").as_uri(),
        (root / "b.jpg").as_uri(),
    ]
    expected = [None, "malformed", "forbidden", "forbidden", "not_found", None]
    src = tmp_path / "manifests"
    src.mkdir()
    lines = ["url,caption,similarity"] + [f"{uri},alt text {i},0.{i}" for i, uri in enumerate(uris)]
    (src / "part-0.csv").write_text("\n".join(lines) + "\n")
    (src / "part-1.jsonl").write_text("".join(json.dumps({"uri": u, "n": i}) + "\n" for i, u in enumerate(uris)))
    pq.write_table(pa.table({"link": uris, "key": [f"{i:03d}" for i in range(6)]}), src / "part-2.parquet")

    csv = run(tmp_path, src / "part-0.csv")
    rows = pq.read_table(tmp_path / "out" / "part-0.parquet").to_pylist()
    assert [row["error_kind"] for row in rows] == expected
    assert [row["original_caption"] for row in rows] == [f"alt text {i}" for i in range(6)]
    assert rows[1]["url"] in (None, "") and rows[5]["similarity"] == "0.5"  # CSV columns stay text
    assert "WORKER_FETCH__FILE_ROOT" in rows[2]["error_message"]
    assert csv.done == 2 and csv.failed == 4

    run(tmp_path, src / "part-1.jsonl")
    rows = pq.read_table(tmp_path / "out" / "part-1.parquet").to_pylist()
    assert [row["error_kind"] for row in rows] == expected and [row["n"] for row in rows] == list(range(6))

    with pytest.raises(ArchiveJobError, match="--uri-column"):
        run(tmp_path, src / "part-2.parquet")
    run(tmp_path, src / "part-2.parquet", uri_column="link")
    rows = pq.read_table(tmp_path / "out" / "part-2.parquet").to_pylist()
    assert [row["error_kind"] for row in rows] == expected and rows[5]["key"] == "005"
