"""Input files of the archive job: an S3 body that breaks half-way is read on from where it stopped."""

from __future__ import annotations

import io
from typing import Any

import pytest
from botocore.exceptions import ResponseStreamingError

from captionfleet.core.s3 import RetryPolicy
from captionfleet.worker.connectors.archive_inputs import InputFile, InputReader, InputReadError

DATA = bytes(range(256)) * 40


class BreakingBody:
    def __init__(self, data: bytes, break_after: int | None) -> None:
        self._data = io.BytesIO(data)
        self._left = break_after

    def read(self, size: int = -1) -> bytes:
        if self._left is not None and self._left <= 0:
            raise ResponseStreamingError(error="connection reset")
        chunk = self._data.read(size if self._left is None else min(size if size >= 0 else self._left, self._left))
        if self._left is not None:
            self._left -= len(chunk)
        return chunk

    def close(self) -> None:
        pass


class FlakyStore:
    """Every body breaks after ``break_after`` bytes, ``breaks`` times."""

    def __init__(self, breaks: int, break_after: int = 1000) -> None:
        self.breaks = breaks
        self.break_after = break_after
        self.calls: list[dict[str, Any]] = []

    def get_object(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        start = int(kwargs["Range"].split("=")[1].rstrip("-")) if "Range" in kwargs else 0
        breaking = len(self.calls) <= self.breaks
        return {"Body": BreakingBody(DATA[start:], self.break_after if breaking else None)}


def read_all(store: FlakyStore, attempts: int = 3) -> bytes:
    reader = InputReader(store, RetryPolicy(attempts=attempts, base_s=0, sleep=lambda _: None))  # type: ignore[arg-type]
    inp = InputFile("s3://bucket/shards/0.tar", "0.tar", len(DATA), '"etag-1"')
    chunks = []
    with reader.open(inp) as body:
        while chunk := body.read(700):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_cut_half_way_is_read_on_with_a_ranged_get_of_the_same_version() -> None:
    store = FlakyStore(breaks=2)
    assert read_all(store) == DATA
    assert [call.get("Range") for call in store.calls] == [None, "bytes=1000-", "bytes=2000-"]
    assert all(call["IfMatch"] == '"etag-1"' for call in store.calls)


def test_a_body_that_keeps_breaking_is_an_input_read_error_not_an_oserror() -> None:
    with pytest.raises(InputReadError, match="reading stopped at byte") as info:
        read_all(FlakyStore(breaks=99, break_after=0), attempts=2)
    assert not isinstance(info.value, OSError)  # never taken for a damaged tar


class ShardStore:
    """One tar shard at s3://bucket/shards/0.tar whose body breaks for good after ``good_bytes``."""

    def __init__(self, data: bytes, good_bytes: int) -> None:
        self.data = data
        self.good_bytes = good_bytes

    def list_objects_v2(self, **kwargs: Any) -> Any:
        key = "shards/0.tar"
        found = [{"Key": key, "ETag": '"e1"', "Size": len(self.data)}] if key.startswith(kwargs["Prefix"]) else []
        return {"Contents": found, "IsTruncated": False}

    def get_object(self, **kwargs: Any) -> Any:
        start = int(kwargs["Range"].split("=")[1].rstrip("-")) if "Range" in kwargs else 0
        return {"Body": BreakingBody(self.data[start:], max(self.good_bytes - start, 0))}


def test_a_shard_that_cannot_be_read_to_its_end_is_unfinished_and_keeps_its_rows(tmp_path: Any) -> None:
    from captionfleet.core.settings import WorkerSettings
    from captionfleet.worker.archive_rows import decode_checkpoint
    from captionfleet.worker.bulk_archive import ArchiveOptions, run_archive_job
    from tests.unit.test_s3_retry import FakeCaptioner
    from tests.webdataset_shards import good_samples, shard

    members, _ = good_samples("k", 12)
    data = shard(members)
    store = ShardStore(data, good_bytes=data.index(b"k0004.jpg"))  # four whole samples, then nothing
    model: Any = FakeCaptioner()
    settings = WorkerSettings(
        batch={"max_items": 2, "max_wait_ms": 5},  # type: ignore[arg-type]
        bulk={"retry_attempts": 2, "retry_base_s": 0},  # type: ignore[arg-type]
    )
    summary = run_archive_job(
        "s3://bucket/shards/0.tar",
        str(tmp_path / "out"),
        settings,
        options=ArchiveOptions(),
        show_progress=False,
        captioner=model,
        client=store,  # type: ignore[arg-type]
    )
    assert summary.unfinished == ["s3://bucket/shards/0.tar"] and not summary.complete
    assert not (tmp_path / "out" / "0.complete.json").exists()
    parts = sorted((tmp_path / "out" / "0.partial").glob("*.parquet"))
    keys = {row["id"] for part in parts for row in decode_checkpoint(part.read_bytes())}
    assert {"k0000", "k0001", "k0002"} <= keys  # what was read is kept for the rerun


class KeyStore:
    """Objects by key in one bucket; listing by prefix, whole GETs."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def list_objects_v2(self, **kwargs: Any) -> Any:
        found = [
            {"Key": key, "ETag": f'"{len(data)}"', "Size": len(data)}
            for key, data in sorted(self.objects.items())
            if key.startswith(kwargs["Prefix"])
        ]
        return {"Contents": found, "IsTruncated": False}

    def get_object(self, **kwargs: Any) -> Any:
        return {"Body": io.BytesIO(self.objects[kwargs["Key"]])}

    def put_object(self, **kwargs: Any) -> Any:
        body = kwargs["Body"]
        self.objects[kwargs["Key"]] = body if isinstance(body, bytes) else body.read()

    def delete_object(self, **kwargs: Any) -> Any:
        self.objects.pop(kwargs["Key"], None)


def test_an_input_named_with_dotdot_is_refused_and_nothing_lands_outside_out(tmp_path: Any) -> None:
    from captionfleet.core.settings import WorkerSettings
    from captionfleet.worker.bulk_archive import ArchiveOptions, run_archive_job
    from tests.unit.test_s3_retry import FakeCaptioner
    from tests.webdataset_shards import good_samples, shard

    data = shard(good_samples("k", 2)[0])
    store = KeyStore({"shards/00000.tar": data, "shards/../../../escaped/pwn.tar": data, "shards/a\\b.tar": data})
    out = tmp_path / "deep" / "er" / "out"
    (tmp_path / "escaped").mkdir()
    (tmp_path / "escaped" / "pwn.parquet").write_bytes(b"someone else's")  # what --overwrite must not delete
    for overwrite in (False, True):
        summary = run_archive_job(
            "s3://bucket/shards/",
            str(out),
            WorkerSettings(batch={"max_items": 2, "max_wait_ms": 5}),  # type: ignore[arg-type]
            options=ArchiveOptions(input_format="tar", overwrite=overwrite),
            show_progress=False,
            captioner=FakeCaptioner(),  # type: ignore[arg-type]
            client=store,  # type: ignore[arg-type]
        )
        assert summary.files_listed == 1 and (summary.files_finished or summary.files_done_before) == 1
        assert len(summary.refused) == 2 and "'..' segment" in summary.refused[0] and summary.files_failed
        assert any("refused input" in line and "pwn.tar" in line for line in summary.lines())
    assert sorted(p.name for p in (tmp_path / "escaped").iterdir()) == ["pwn.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["00000.complete.json", "00000.parquet"]


def test_outputs_refuse_names_outside_their_folder(tmp_path: Any) -> None:
    from captionfleet.worker.connectors.archive_outputs import LocalOutputs, S3Outputs, UnsafeOutputName

    local = LocalOutputs(tmp_path / "out")
    s3 = S3Outputs(KeyStore({}), "s3://bucket/out/", RetryPolicy(attempts=1))  # type: ignore[arg-type]
    for name in ("../x.parquet", "a/../../x.parquet", "/etc/x", "a\\..\\x"):
        for outputs in (local, s3):
            with pytest.raises(UnsafeOutputName):
                outputs.put_bytes(name, b"x")
            with pytest.raises(UnsafeOutputName):
                outputs.delete(name)
    assert not list(tmp_path.rglob("x*"))


class ChangingStore(KeyStore):
    """The second whole read of an object fails: 412, its ETag changed since the listing."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__(objects)
        self.gets = 0

    def get_object(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        self.gets += 1
        if self.gets == 2:
            error = {"Error": {"Code": "PreconditionFailed", "Message": "At least one of the pre-conditions failed"}}
            raise ClientError({**error, "ResponseMetadata": {"HTTPStatusCode": 412}}, "GetObject")  # type: ignore[arg-type]
        return super().get_object(**kwargs)


def test_a_shard_that_fails_on_its_second_read_is_unfinished_not_a_crash(tmp_path: Any) -> None:
    """--out-format webdataset reads a shard twice; the second read failing (the store, or a new ETag)
    leaves the file unfinished (exit 75, resumed by the rerun), where it used to escape as exit 1."""
    from captionfleet.core.settings import WorkerSettings
    from captionfleet.worker.archive_rows import decode_checkpoint
    from captionfleet.worker.bulk_archive import ArchiveOptions, run_archive_job
    from tests.unit.test_archive_tar import CountingCaptioner
    from tests.webdataset_shards import good_samples, shard

    data = shard(good_samples("k", 3)[0])
    config = WorkerSettings(
        batch={"max_items": 2, "max_wait_ms": 5},  # type: ignore[arg-type]
        bulk={"retry_attempts": 2, "retry_base_s": 0},  # type: ignore[arg-type]
    )

    def run(store: Any, captioner: Any) -> Any:
        return run_archive_job(
            "s3://bucket/shards/0.tar",
            str(tmp_path / "out"),
            config,
            options=ArchiveOptions(out_format="webdataset"),
            show_progress=False,
            captioner=captioner,
            client=store,
        )

    summary = run(ChangingStore({"shards/0.tar": data}), CountingCaptioner())
    assert summary.unfinished == ["s3://bucket/shards/0.tar"] and not summary.complete
    assert not (tmp_path / "out" / "0.complete.json").exists() and not (tmp_path / "out" / "0.tar").exists()
    parts = sorted((tmp_path / "out" / "0.partial").glob("*.parquet"))
    assert {row["id"] for part in parts for row in decode_checkpoint(part.read_bytes())} == {"k0000", "k0001", "k0002"}
    again = CountingCaptioner()
    second = run(KeyStore({"shards/0.tar": data}), again)
    assert second.complete and second.files_finished == 1 and again.images == 0  # resumed from the checkpoints
    assert (tmp_path / "out" / "0.tar").exists()


def test_a_local_shard_rewritten_between_its_two_reads_is_unfinished(tmp_path: Any) -> None:
    import os

    from tests.unit.test_archive_tar import CountingCaptioner, run
    from tests.webdataset_shards import good_samples, shard

    path = tmp_path / "s.tar"
    path.write_bytes(shard(good_samples("k", 3)[0]))

    class Touching(CountingCaptioner):
        def caption_inputs(self, inputs: Any, decoding: object = None) -> Any:
            os.utime(path, ns=(1, 1))  # rewritten meanwhile, as far as its size and mtime tell
            return super().caption_inputs(inputs, decoding)

    summary = run(path, tmp_path / "out", Touching(), out_format="webdataset")
    assert summary.unfinished == [str(path)] and not (tmp_path / "out" / "s.complete.json").exists()
    assert run(path, tmp_path / "out", CountingCaptioner(), out_format="webdataset").complete


def test_two_writers_of_one_output_name_do_not_share_a_temporary_file(tmp_path: Any, monkeypatch: Any) -> None:
    """Two runs of one shard (a rerun while a slow pod still finishes) write the same name: each into a file
    of its own, renamed whole; the last rename wins and nothing fails."""
    import os
    import stat

    from captionfleet.worker.connectors import archive_outputs
    from captionfleet.worker.connectors.archive_outputs import LocalOutputs

    outputs = LocalOutputs(tmp_path / "out")
    real_fsync = os.fsync
    nested: list[bool] = []

    def fsync_with_a_second_writer(fd: int) -> None:
        if not nested:  # the other writer writes the same name while the first is between write and rename
            nested.append(True)
            outputs.put_bytes("a.parquet", b"second")
        real_fsync(fd)

    monkeypatch.setattr(archive_outputs.os, "fsync", fsync_with_a_second_writer)
    outputs.put_bytes("a.parquet", b"first")  # used to fail: the second writer had renamed its .tmp away
    assert (tmp_path / "out" / "a.parquet").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.parquet"]  # no temporary file left
    mode = stat.S_IMODE((tmp_path / "out" / "a.parquet").stat().st_mode)
    assert mode & 0o044 == 0o644 & ~_umask() & 0o044  # readable as open() would have made it


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current
