"""Result parts, resume decisions, --retry-failed and compaction, on the in-memory S3 (no server).

The whole S3 job runs here with a fake model: what it writes, what a rerun skips, and what
supersedes what. tests/integration/test_bulk_s3.py repeats the important cases on a real server.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import pytest
from PIL import Image

from captionfleet.core.failures import EXIT_TEMPFAIL, EXIT_USAGE, exit_for_access_error
from captionfleet.core.s3 import S3AccessError
from captionfleet.core.settings import BulkS3Settings, S3Settings, WorkerSettings
from captionfleet.worker.bulk_s3 import S3JobError, S3JobOptions, run_s3_caption_job
from captionfleet.worker.bulk_s3_index import ShardIndex
from captionfleet.worker.connectors.s3_listing import S3Object
from captionfleet.worker.connectors.s3_parts import MARKER_NAME, PartRef, PartStore, S3ResultSink, decode_part
from captionfleet.worker.connectors.s3_reader import S3Item
from captionfleet.worker.messages import Result
from captionfleet.worker.sharding import ShardSpec, shard_of
from tests.unit.test_s3_fake import FakeS3, client_error, read_timeout
from tests.unit.test_s3_retry import FakeCaptioner


def png(red: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (red, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def settings(**bulk: Any) -> WorkerSettings:
    base = {"rows_per_part": 4, "retry_attempts": 2, "retry_base_s": 0.0, "fetch_concurrency": 2}
    return WorkerSettings(
        s3=S3Settings(endpoint_url="http://fake-s3"),
        bulk=BulkS3Settings(**{**base, **bulk}),
        batch={"max_items": 3, "max_wait_ms": 5},  # type: ignore[arg-type]
    )


def archive() -> FakeS3:
    """20 good images in two folders, an empty one, a text file and a truncated PNG."""
    s3 = FakeS3()
    s3.buckets.add("out")
    for i in range(20):
        s3.put("src", f"imgs/{'a' if i % 2 else 'b/deep'}/{i:02d}.png", png(i + 10))
    s3.put("src", "imgs/empty.png", b"")
    s3.put("src", "imgs/notes.txt", b"just text")
    s3.put("src", "imgs/broken.png", png(1)[:40])
    s3.put("src", "elsewhere/ignored.png", png(2))
    return s3


def all_rows(s3: FakeS3, bucket: str = "out", prefix: str = "res/") -> list[dict[str, Any]]:
    rows = []
    for (b, key), data in sorted(s3.objects.items()):
        if b == bucket and key.startswith(prefix) and "/part-" in key:
            rows.extend(decode_part(data, key.rsplit(".", 1)[1]))
    return rows


def marker(s3: FakeS3, shard: ShardSpec, prefix: str = "res/") -> dict[str, Any]:
    return dict(json.loads(s3.objects[("out", f"{prefix}{shard.name}/{MARKER_NAME}")]))


def run(s3: FakeS3, captioner: FakeCaptioner | None = None, **options: Any) -> Any:
    config = options.pop("settings", None) or settings()
    return run_s3_caption_job(
        "s3://src/imgs",
        "s3://out/res",
        config,
        options=S3JobOptions(**options),
        show_progress=False,
        captioner=captioner or FakeCaptioner(),  # type: ignore[arg-type]
        client=s3,
    )


# -- parts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parts_are_numbered_on_from_what_exists_and_read_back(fmt: str) -> None:
    s3 = FakeS3()
    s3.buckets.add("out")
    store = PartStore(s3, "out", "res/shard-00000-of-00001", fmt=fmt)
    row = {"key": "k", "etag": '"e"', "model_version": "v", "error_kind": None, "size": 3}
    first = store.write_part([row], "run1")
    again = PartStore(s3, "out", "res/shard-00000-of-00001/", fmt=fmt)
    second = again.write_part([{**row, "key": "k2"}], "run2")
    assert (first.seq, second.seq) == (0, 1)
    assert [p.name for p in again.list_parts()] == [f"part-000000-run1.{fmt}", f"part-000001-run2.{fmt}"]
    assert again.read(second, ["key", "etag"]) == [{"key": "k2", "etag": '"e"'}]
    assert again.drop_rows(first, {0}) == 0  # nothing left: the part is deleted
    assert [p.name for p in again.list_parts()] == [f"part-000001-run2.{fmt}"]


def test_sink_uploads_whole_parts_with_the_listing_facts_and_clears_the_marker_first() -> None:
    s3 = FakeS3()
    s3.put("out", f"res/{MARKER_NAME}", b"{}")
    written: list[tuple[PartRef, int]] = []
    store = PartStore(s3, "out", "res/")
    sink = S3ResultSink(
        store, run_id="abc", rows_per_part=3, on_part=lambda part, rows: written.append((part, len(rows)))
    )
    for i in range(7):
        obj = S3Object("src", f"k{i}", f'"etag{i}"', 100 + i)
        sink.track(S3Item(obj, future=None))  # type: ignore[arg-type]
    sink.write(
        [
            Result(
                id=f"k{i}",
                uri=f"s3://src/k{i}",
                model_version="v",
                caption="c",
                mean_logprob=-0.5,
                tokens=i,
                prompt=f"prompt {i}" if i % 2 else None,
            )
            for i in range(7)
        ]
    )
    assert [n for _, n in written] == [3, 3]  # full parts go as soon as they are full
    assert ("out", f"res/{MARKER_NAME}") not in s3.objects
    sink.close()
    assert [n for _, n in written] == [3, 3, 1]
    rows = [row for part, _ in written for row in store.read(part)]
    assert [(r["key"], r["etag"], r["size"], r["run_id"]) for r in rows] == [
        (f"k{i}", f'"etag{i}"', 100 + i, "abc") for i in range(7)
    ]
    assert [(r["mean_logprob"], r["tokens"], r["prompt"]) for r in rows] == [
        (-0.5, i, f"prompt {i}" if i % 2 else None) for i in range(7)
    ]


# -- resume decisions and superseding ------------------------------------------------------------------


def index_of(*rows: tuple[str, str, str, str | None]) -> ShardIndex:
    index = ShardIndex()
    for seq, (key, etag, version, kind) in enumerate(rows):
        index.add(
            PartRef(f"part-{seq:06d}-r.parquet", seq, "parquet"),
            [dict(zip(ShardIndex.COLUMNS, (key, etag, version, kind), strict=True))],
        )
    return index


def test_done_means_same_key_same_etag_same_model_version() -> None:
    index = index_of(("k", '"e1"', "v1", None), ("bad", '"e"', "v1", "decode"))
    same = S3Object("b", "k", '"e1"', 1)
    assert index.decide(same, "v1", False, None) == "skip"
    assert index.decide(S3Object("b", "k", '"e2"', 1), "v1", False, None) == "todo"  # content changed
    assert index.decide(same, "v2", False, None) == "todo"  # a new model version is a new run
    assert index.decide(same, "v2", True, None) == "skip"  # ... unless asked otherwise
    assert index.decide(S3Object("b", "new", '"e"', 1), "v1", False, None) == "todo"
    failed = S3Object("b", "bad", '"e"', 1)
    assert index.decide(failed, "v1", False, None) == "skip"  # a failure row is an answer
    assert index.decide(failed, "v1", False, frozenset()) == "retry"  # --retry-failed
    assert index.decide(failed, "v1", False, frozenset({"decode", "timeout"})) == "retry"
    assert index.decide(failed, "v1", False, frozenset({"timeout"})) == "skip"
    assert index.decide(same, "v1", False, frozenset()) == "skip"  # captions are never retried


def test_superseded_rows() -> None:
    index = index_of(
        ("retried", '"e"', "v1", "timeout"),
        ("changed", '"old"', "v1", None),
        ("two-models", '"e"', "v1", None),
        ("retried", '"e"', "v1", None),
        ("changed", '"new"', "v1", None),
        ("two-models", '"e"', "v2", None),
    )
    assert index.superseded() == {"part-000000-r.parquet": {0}, "part-000001-r.parquet": {0}}


# -- the whole job -------------------------------------------------------------------------------------


def expected_kinds() -> dict[str, str | None]:
    kinds: dict[str, str | None] = {f"imgs/{'a' if i % 2 else 'b/deep'}/{i:02d}.png": None for i in range(20)}
    kinds.update({"imgs/empty.png": "empty", "imgs/notes.txt": "not_an_image", "imgs/broken.png": "truncated"})
    return kinds


def test_three_shards_cover_every_key_once_with_right_rows() -> None:
    s3 = archive()
    summaries = [run(s3, shard=ShardSpec(i, 3)) for i in range(3)]
    rows = all_rows(s3)
    assert sorted(r["key"] for r in rows) == sorted(expected_kinds())
    for row in rows:
        assert row["error_kind"] == expected_kinds()[row["key"]], row
        assert row["etag"] == s3.etag("src", row["key"]) and row["size"] == len(s3.objects[("src", row["key"])])
        assert row["model_version"] == "fake-1"
        assert (row["caption"] is None) == (row["error_kind"] is not None)
        shard = ShardSpec(shard_of(row["key"], 3), 3)
        assert row["run_id"] == marker(s3, shard)["last_run"]["run_id"]
    assert sum(s.total for s in summaries) == len(expected_kinds())
    assert all(s.complete and s.listed == 23 for s in summaries)
    counts = [marker(s3, ShardSpec(i, 3)) for i in range(3)]
    assert sum(m["objects"] for m in counts) == sum(m["rows"] for m in counts) == 23
    assert sum(m["captioned"] for m in counts) == 20
    assert sum((Counter(m["failed_by_kind"]) for m in counts), Counter()) == Counter(
        {"empty": 1, "not_an_image": 1, "truncated": 1}
    )


def test_rerun_skips_everything_and_a_new_model_version_is_a_new_run() -> None:
    s3 = archive()
    run(s3)
    parts_before = {k: v for k, v in s3.objects.items() if "/part-" in k[1]}
    again = run(s3)
    assert (again.skipped, again.done, again.failed, again.parts_written) == (23, 0, 0, 0)
    assert {k: v for k, v in s3.objects.items() if "/part-" in k[1]} == parts_before

    new_model = FakeCaptioner()
    new_model.version = "fake-2"
    fresh = run(s3, captioner=new_model)
    assert (fresh.skipped, fresh.done) == (0, 20)
    rows = all_rows(s3)
    assert Counter(r["model_version"] for r in rows) == {"fake-1": 23, "fake-2": 23}  # one row per key and version
    assert run(s3, captioner=new_model, any_model_version=True).skipped == 23


def test_retry_failed_supersedes_only_the_chosen_kinds() -> None:
    s3 = archive()
    s3.fail("GetObject", "imgs/a/01.png", *[read_timeout()] * 2)  # both attempts time out
    first = run(s3)
    assert first.failed_by_kind == Counter({"timeout": 1, "empty": 1, "not_an_image": 1, "truncated": 1})

    plain = run(s3)  # the object is unchanged: its failure row stands
    assert (plain.skipped, plain.done) == (23, 0)

    retry = run(s3, retry_failed=frozenset({"timeout"}))
    assert (retry.retried, retry.done, retry.failed, retry.superseded) == (1, 1, 0, 1)
    rows = all_rows(s3)
    assert sorted(r["key"] for r in rows) == sorted(expected_kinds())  # still exactly one row per key
    by_key = {r["key"]: r for r in rows}
    assert by_key["imgs/a/01.png"]["caption"] and by_key["imgs/a/01.png"]["error_kind"] is None
    assert by_key["imgs/empty.png"]["run_id"] == by_key["imgs/a/03.png"]["run_id"]  # not retried
    assert marker(s3, ShardSpec())["failed_by_kind"] == {"empty": 1, "not_an_image": 1, "truncated": 1}


def test_a_changed_object_gets_a_new_row_and_the_stale_one_goes() -> None:
    s3 = archive()
    run(s3)
    s3.put("src", "imgs/broken.png", png(99))  # fixed upstream: new content, new ETag
    again = run(s3)
    assert (again.done, again.failed, again.superseded) == (1, 0, 1)
    by_key = {r["key"]: r for r in all_rows(s3)}
    assert len(by_key) == len(all_rows(s3)) == 23
    assert by_key["imgs/broken.png"]["etag"] == s3.etag("src", "imgs/broken.png")
    assert by_key["imgs/broken.png"]["caption"] == "red 99"


def test_filters_and_own_output_under_the_source() -> None:
    s3 = archive()
    s3.put("src", "imgs/big.png", png(5) + b"\0" * 5000)
    summary = run_s3_caption_job(
        "s3://src/imgs/",
        "s3://src/imgs/results/",  # inside the source: its parts must never become inputs
        settings(suffixes=[".PNG"], min_size=1, max_size=4000),
        show_progress=False,
        captioner=FakeCaptioner(),  # type: ignore[arg-type]
        client=s3,
    )
    assert (summary.listed, summary.filtered_out, summary.total) == (24, 3, 21)  # notes.txt, empty, big
    rerun = run_s3_caption_job(
        "s3://src/imgs/",
        "s3://src/imgs/results/",
        settings(suffixes=[".PNG"], min_size=1, max_size=4000),
        show_progress=False,
        captioner=FakeCaptioner(),  # type: ignore[arg-type]
        client=s3,
    )
    assert (rerun.listed, rerun.skipped) == (24, 21)


def test_nothing_to_do_errors_write_nothing() -> None:
    s3 = archive()
    with pytest.raises(S3JobError, match="no objects under s3://src/nothing/"):
        run_s3_caption_job("s3://src/nothing", "s3://out/res/", settings(), client=s3, show_progress=False)
    with pytest.raises(S3JobError, match="pass the filters"):
        run(s3, settings=settings(suffixes=[".webp"]))
    assert not [k for (b, k) in s3.objects if b == "out"]


def test_unknown_retry_kind_is_refused() -> None:
    with pytest.raises(S3JobError, match="unknown failure kind"):
        run(archive(), retry_failed=frozenset({"timeout", "gremlins"}))


def test_overwrite_starts_the_shard_over() -> None:
    s3 = archive()
    first = run(s3)
    old_parts = {k for k in s3.objects if "/part-" in k[1]}
    again = run(s3, overwrite=True)
    assert (again.skipped, again.done + again.failed) == (0, first.done + first.failed)
    assert not old_parts & {k for k in s3.objects if "/part-" in k[1]}  # the old parts are gone
    assert len(all_rows(s3)) == 23


def test_a_listing_that_fails_half_way_keeps_the_parts_and_writes_no_marker() -> None:
    s3 = archive()
    # Page 2 onwards is denied: the first page works (preflight), then the credentials lose access.
    pages_seen = []

    def deny_after_first_page(operation: str, kwargs: dict[str, Any]) -> None:
        if operation == "ListObjectsV2" and kwargs.get("Prefix") == "imgs/":
            pages_seen.append(kwargs)
            if kwargs.get("ContinuationToken"):
                s3.fail("ListObjectsV2", "imgs/", client_error("AccessDenied", 403, "ListObjectsV2"))

    s3.on_call = deny_after_first_page
    with pytest.raises(S3AccessError, match="access denied to list s3://src/imgs/") as denied:
        run(s3, settings=settings(list_page_size=10, rows_per_part=2))
    assert exit_for_access_error(denied.value) == EXIT_USAGE  # a refusal: retrying the Job cannot help
    rows = all_rows(s3)
    assert len(rows) == 10  # the first page's rows were written whole
    assert ("out", f"res/shard-00000-of-00001/{MARKER_NAME}") not in s3.objects
    assert len(pages_seen) == 2
    s3.on_call = None
    resumed = run(s3)
    assert (resumed.skipped, resumed.complete) == (10, True)
    assert len(all_rows(s3)) == 23


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_a_jsonl_shard_with_unicode_line_separators_in_keys_resumes(separator: str) -> None:
    # json.dumps(ensure_ascii=False) leaves these unescaped; str.splitlines() would cut the row in two.
    s3 = FakeS3()
    s3.buckets.add("out")
    s3.put("src", f"imgs/a{separator}b.png", png(3))
    s3.put("src", "imgs/c.png", png(4))
    first = run(s3, settings=settings(format="jsonl"))
    assert (first.done, first.failed) == (2, 0)
    assert sorted(r["key"] for r in all_rows(s3)) == sorted([f"imgs/a{separator}b.png", "imgs/c.png"])
    again = run(s3, settings=settings(format="jsonl"))
    assert (again.skipped, again.done) == (2, 0)


def test_overwrite_with_a_model_that_cannot_load_deletes_nothing(tmp_path: Any) -> None:
    from captionfleet.core.model_store import ModelRefError

    s3 = archive()
    run(s3)
    parts_before = {k: v for k, v in s3.objects.items() if k[0] == "out"}
    broken = WorkerSettings(s3=S3Settings(endpoint_url="http://fake-s3"), model={"ref": str(tmp_path / "nothing")})  # type: ignore[arg-type]
    with pytest.raises(ModelRefError):
        run_s3_caption_job(
            "s3://src/imgs",
            "s3://out/res",
            broken,
            options=S3JobOptions(overwrite=True),
            show_progress=False,
            client=s3,
        )
    assert {k: v for k, v in s3.objects.items() if k[0] == "out"} == parts_before


def test_a_store_failing_mid_run_is_a_retryable_error_and_the_rerun_resumes() -> None:
    s3 = archive()

    def fail_after_first_page(operation: str, kwargs: dict[str, Any]) -> None:
        if operation == "ListObjectsV2" and kwargs.get("ContinuationToken"):
            s3.fail("ListObjectsV2", "imgs/", client_error("InternalError", 500, "ListObjectsV2"))

    s3.on_call = fail_after_first_page
    with pytest.raises(S3AccessError, match="InternalError") as failed:
        run(s3, settings=settings(list_page_size=10, rows_per_part=2))
    # EX_TEMPFAIL: k8s/base/bulk-job.yaml retries the index instead of failing the whole Job.
    assert failed.value.retryable and exit_for_access_error(failed.value) == EXIT_TEMPFAIL
    s3.on_call = None
    resumed = run(s3)
    assert (resumed.skipped, resumed.complete) == (10, True)
