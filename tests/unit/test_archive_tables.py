"""Tabular archives on local disk: Parquet datasets with images inside and manifests of file:// uris (CSV,
JSONL, Parquet), with a model that answers at once. The http side is in tests/integration."""

from __future__ import annotations

import json
import os
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
    # The caption's confidence, as the other outputs carry it (FakeCaptioner: -1.0 over 2 tokens); none on failures.
    assert [(row["mean_logprob"], row["tokens"]) for row in rows] == [(-1.0, 2), *[(None, None)] * 3, (-1.0, 2)]
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


# Arrow pools counted by a test stay alive: Arrow frees a buffer into the pool it came from.
_POOLS: list[pa.MemoryPool] = []


def test_images_inside_parquet_are_read_a_row_group_at_a_time_and_oversized_ones_never_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from captionfleet.worker import archive_tables

    monkeypatch.setattr(archive_tables, "ROW_GROUP_IMAGE_MAX_BYTES", 7 << 20)
    (tmp_path / "root").mkdir()
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "d.parquet"

    def group(start: int, rows: int) -> pa.Table:  # 1 MiB images that do not compress
        images = [{"bytes": os.urandom(1 << 20), "path": f"{i}.jpg"} for i in range(start, start + rows)]
        return pa.table({"image": images, "label": list(range(start, start + rows)), "extra": ["x" * 1000] * rows})

    with pq.ParquetWriter(path, group(0, 1).schema) as writer:
        for start in range(0, 32, 4):  # eight row groups of 4 MiB
            table = group(start, 4)
            if start == 4:  # one of them has a picture over the 2 MiB limit
                huge = {"bytes": os.urandom(3 << 20), "path": "huge.jpg"}
                table = table.set_column(0, "image", pa.array([huge, *table.column(0).to_pylist()[1:]]))
            writer.write_table(table, row_group_size=4)
        writer.write_table(group(32, 8), row_group_size=8)  # and one of 8 MiB: over the row group limit
    config = settings(tmp_path)
    config.images.max_bytes = 2 << 20
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # counts what Arrow allocates from here on
    _POOLS.append(pool)
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        summary = run_archive_job(
            str(path),
            str(tmp_path / "out"),
            config,
            options=ArchiveOptions(input_format="parquet-images"),
            show_progress=False,
            captioner=FakeCaptioner(),  # type: ignore[arg-type]
        )
    finally:
        pa.set_memory_pool(previous)
    # About twice the largest row group read (its pages, then its values), never the file: 1024-row
    # batches of every column held all 43 MiB of it, twice.
    assert pool.max_memory() < 3 * (7 << 20)
    rows = pq.read_table(tmp_path / "out" / "d.parquet").to_pylist()
    assert [row["label"] for row in rows] == list(range(40)) and rows[4]["image_path"] == "huge.jpg"
    assert rows[4]["error_kind"] == "too_large" and "exceeds the limit of 2097152" in rows[4]["error_message"]
    late = rows[32:]
    assert {row["error_kind"] for row in late} == {"too_large"} and "smaller row groups" in late[0]["error_message"]
    assert [row["image_path"] for row in late] == [f"{i}.jpg" for i in range(32, 40)]
    assert summary.failed_by_kind["too_large"] == 9 and summary.total == 40


def test_a_plain_binary_image_column_is_left_out_of_the_output(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "data").mkdir()
    table = pa.table({"png": pa.array([jpeg_bytes(), b"\xff\xd8\xff" + bytes(3000)], pa.binary()), "n": [1, 2]})
    pq.write_table(table, tmp_path / "data" / "b.parquet")
    config = settings(tmp_path)
    config.images.max_bytes = 2000
    summary = run_archive_job(
        str(tmp_path / "data" / "b.parquet"),
        str(tmp_path / "out"),
        config,
        options=ArchiveOptions(input_format="parquet-images", image_column="png"),
        show_progress=False,
        captioner=FakeCaptioner(),  # type: ignore[arg-type]
    )
    out = pq.read_table(tmp_path / "out" / "b.parquet")
    assert "png" not in out.column_names and out.column("n").to_pylist() == [1, 2]
    assert out.column("error_kind").to_pylist() == [None, "too_large"] and summary.done == 1


def test_a_retry_of_a_table_that_broke_off_never_keeps_the_rows_of_its_older_version(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes())
    (root / "b.jpg").write_bytes(jpeg_bytes((30, 20)))
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps({"uri": (root / n).as_uri()}) + "\n" for n in ("a.jpg", "b.jpg")))
    assert run(tmp_path, src).done == 2
    old_output = (tmp_path / "out" / "m.parquet").read_bytes()
    # The file replaced: two images not there yet, then a line that ends the table early.
    new = [(root / n).as_uri() for n in ("c.jpg", "d.jpg")]
    # (Arrow reads JSON lines a 1 MiB block at a time: the bad line, long, starts the second block.)
    lines = [json.dumps({"uri": uri, "pad": "x" * 400_000}) + "\n" for uri in new]
    src.write_text("".join(lines) + "{not json" + " " * 400_000 + "\n")
    broken = run(tmp_path, src)
    marker = json.loads((tmp_path / "out" / "m.complete.json").read_text())
    assert marker["failed_by_kind"] == {"not_found": 2} and marker["outputs"] == [] and broken.broken
    # The older version's output does not stay beside a marker that lists none.
    assert not (tmp_path / "out" / "m.parquet").exists()

    (tmp_path / "out" / "m.parquet").write_bytes(old_output)  # as a run killed before removing it leaves it
    (root / "c.jpg").write_bytes(jpeg_bytes())
    (root / "d.jpg").write_bytes(jpeg_bytes())
    summary = run(tmp_path, src, retry_failed=frozenset({"not_found"}))
    # A leftover output the marker does not list is not read: both rows are fetched and captioned again.
    assert summary.skipped == 0 and summary.done == 2 and summary.failed == 0
    marker = json.loads((tmp_path / "out" / "m.complete.json").read_text())
    assert marker["captioned"] == 2 and marker["outputs"] == []


def test_an_output_written_before_the_confidence_fields_keeps_a_manifests_own_columns_of_those_names(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes())
    src = tmp_path / "m.jsonl"
    rows = [{"uri": (root / n).as_uri(), "tokens": f"many {n}", "mean_logprob": 3} for n in ("a.jpg", "b.jpg")]
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run(tmp_path, src)
    # As written before the fields were added: the manifest's own columns kept their names, ours were not there.
    out = tmp_path / "out" / "m.parquet"
    table = pq.read_table(out).drop_columns(["tokens", "mean_logprob", "prompt"])
    table = table.rename_columns([name.removeprefix("original_") for name in table.column_names])
    pq.write_table(table, out)

    (root / "b.jpg").write_bytes(jpeg_bytes())
    summary = run(tmp_path, src, retry_failed=frozenset({"not_found"}))
    assert summary.retried == 1 and summary.done == 1
    kept, redone = pq.read_table(out).to_pylist()
    # The manifest's values are not taken for the caption's confidence (a text one could not be at all).
    assert (kept["tokens"], kept["mean_logprob"]) == (None, None) and kept["caption"].startswith("red ")
    assert (redone["tokens"], redone["mean_logprob"]) == (2, -1.0)
    assert [(row["original_tokens"], row["original_mean_logprob"]) for row in (kept, redone)] == [
        ("many a.jpg", 3),
        ("many b.jpg", 3),
    ]
