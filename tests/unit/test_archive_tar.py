"""Tar shards on local disk through the archive job, with a model that answers at once: hostile members,
truncated shards, WebDataset outputs, resume from checkpoints, --retry-failed, and the split over files."""

from __future__ import annotations

import io
import json
import tarfile
import time
import tracemalloc
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from captionfleet.core.captioner import ModelInput
from captionfleet.core.generation import Caption
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.archive_rows import decode_checkpoint, encode_checkpoint
from captionfleet.worker.bulk_archive import ArchiveJobError, ArchiveOptions, run_archive_job
from captionfleet.worker.connectors.archive_inputs import InputError, expand_braces
from captionfleet.worker.connectors.s3_parts import new_run_id
from captionfleet.worker.connectors.tar_samples import (
    MAX_SAMPLE_MEMBERS,
    READ_CHUNK,
    SAMPLE_BYTES_FACTOR,
    TarReport,
    iter_samples,
)
from captionfleet.worker.sharding import ShardSpec, shard_of
from tests.hostile_images import jpeg_bytes
from tests.tar_memory import peak_reading, tarfile_peak
from tests.unit.test_s3_retry import FakeCaptioner
from tests.webdataset_shards import Member, good_samples, hostile_shard, shard

MAX_BYTES = 1 << 20


class CountingCaptioner(FakeCaptioner):
    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        self.images += len(inputs)
        return super().caption_inputs(inputs, decoding)


def settings(**bulk: Any) -> WorkerSettings:
    return WorkerSettings(
        batch={"max_items": 4, "max_wait_ms": 5},  # type: ignore[arg-type]
        images={"max_bytes": MAX_BYTES},  # type: ignore[arg-type]
        bulk={"rows_per_part": 5, **bulk},  # type: ignore[arg-type]
    )


def run(src: str | Path, out: Path, captioner: Any = None, **options: Any) -> Any:
    model: Any = captioner or FakeCaptioner()
    return run_archive_job(
        str(src),
        str(out),
        settings(),
        options=ArchiveOptions(**options),
        show_progress=False,
        captioner=model,
    )


def rows_of(path: Path) -> dict[str, dict[str, Any]]:
    rows = pq.read_table(path).to_pylist()
    by_key = {row["key"]: row for row in rows}
    assert len(by_key) == len(rows), "a key has two rows"
    return by_key


def test_expand_braces() -> None:
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    with pytest.raises(InputError, match="not a range or a list"):
        expand_braces("s/{x}.tar")


def test_hostile_members_get_their_rows_and_the_run_goes_on(tmp_path: Path) -> None:
    data, expected = hostile_shard(MAX_BYTES)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(data)
    summary = run(tmp_path / "in" / "00000.tar", tmp_path / "out")
    rows = rows_of(tmp_path / "out" / "00000.parquet")
    assert {key: row["error_kind"] for key, row in rows.items()} == expected
    assert summary.failed_by_kind == Counter(kind for kind in expected.values() if kind)
    assert rows["good-0001"]["caption"].startswith("red ") and rows["good-0001"]["model_version"] == "fake-1"
    assert rows["good-0001"]["txt"] == "old caption 1" and json.loads(rows["good-0001"]["json"]) == {"n": 1}
    assert "climbs out" in rows["../escape"]["error_message"]
    assert "links are never followed" in rows["link"]["error_message"]
    assert not summary.broken and summary.files_finished == 1
    marker = json.loads((tmp_path / "out" / "00000.complete.json").read_text())
    assert marker["rows"] == len(expected) and marker["broken"] is None
    assert not list((tmp_path / "out").glob("*.partial/*"))  # checkpoints removed once complete
    # Nothing was ever extracted: the only files written are the outputs.
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "00000.complete.json",
        "00000.parquet",
        "00000.tar",
    ]


def test_a_truncated_shard_gives_rows_for_what_is_there_and_is_reported(tmp_path: Path) -> None:
    members, _expected = good_samples("k", 6)
    data = shard(members)
    cut = data[: data.index(b"k0003.jpg") + 1200]  # inside the 4th sample's picture
    (tmp_path / "cut.tar").write_bytes(cut)
    summary = run(tmp_path / "cut.tar", tmp_path / "out")
    rows = rows_of(tmp_path / "out" / "cut.parquet")
    assert [rows[k]["error_kind"] for k in ("k0000", "k0001", "k0002")] == [None, None, None]
    assert rows["k0003"]["error_kind"] == "truncated"
    assert "k0004" not in rows  # after the cut nothing can be known
    assert len(summary.broken) == 1 and "cut.tar" in summary.broken[0] and "ends early" in summary.broken[0]
    assert any("broken input" in line for line in summary.lines())
    assert json.loads((tmp_path / "out" / "cut.complete.json").read_text())["broken"]

    # Cut exactly between two members: no end block, noticed all the same.
    (tmp_path / "between.tar").write_bytes(data[: data.index(b"k0004.jpg")])  # the header of k0004.jpg starts there
    between = run(tmp_path / "between.tar", tmp_path / "out2")
    assert len(between.broken) == 1 and "end-of-archive" in between.broken[0]

    (tmp_path / "junk.tar").write_bytes(b"this is not a tar at all" * 40)
    junk = run(tmp_path / "junk.tar", tmp_path / "out3")
    assert len(junk.broken) == 1 and "not a readable tar" in junk.broken[0]


class ReadsCounted(io.BytesIO):
    """A stream that records what each read asked for and returns at most ``most`` bytes a time (an S3 body
    may return less than asked)."""

    def __init__(self, data: bytes, most: int | None = None) -> None:
        super().__init__(data)
        self.asked: list[int] = []
        self.most = most

    def read(self, size: int | None = -1) -> bytes:
        self.asked.append(-1 if size is None else size)
        return super().read(size if self.most is None or size is None or size < 0 else min(size, self.most))


@pytest.mark.parametrize("most", [None, 3000])
def test_a_shard_is_read_from_its_stream_a_chunk_at_a_time(most: int | None) -> None:
    """tarfile asks for 10 KiB at a time; each read of an S3 body is a call through the retry policy and
    botocore: the stream is read in READ_CHUNK pieces, and the samples, their bytes and where a cut is
    reported are the same however it returns them."""
    members = [Member(f"k{i:04d}.jpg", bytes([i]) * 40_000) for i in range(32)]
    data = shard(members)
    stream = ReadsCounted(data, most)
    report = TarReport()
    samples = list(iter_samples(stream, max_bytes=MAX_BYTES, report=report))
    assert [(s.key, s.members[0].data) for s in samples] == [(m.name[:-4], m.data) for m in members]
    assert report.broken is None
    assert all(size >= READ_CHUNK for size in stream.asked)
    if most is None:
        assert len(stream.asked) <= len(data) // READ_CHUNK + 2  # the last read returns nothing: the end

    cut = data[: data.index(b"k0020.jpg") + 700]
    report = TarReport()
    assert len(list(iter_samples(ReadsCounted(cut, most), max_bytes=MAX_BYTES, report=report))) == 21
    plain = TarReport()
    list(iter_samples(io.BytesIO(cut), max_bytes=MAX_BYTES, report=plain))
    assert report.broken == plain.broken and report.broken is not None and "ends early" in report.broken


class ModelOf224(CountingCaptioner):
    """A 224x224 model: what it is handed is recorded."""

    draft_size = (224, 224)  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def prepare(self, image: Any, prompt: str | None = None, *, origin: object = None) -> ModelInput:
        self.sizes.append(image.size)
        return super().prepare(image, prompt, origin=origin)


def test_jpegs_in_a_shard_are_decoded_at_the_reduction_the_model_size_allows(tmp_path: Path) -> None:
    """A 640x480 photo for a 224x224 model is decoded at half scale (JPEG draft mode: about half the CPU of a
    full decode), never smaller than the model's input; a PNG, which has no draft mode, whole."""
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (640, 480), (9, 9, 9)).save(png, "PNG")
    members = [
        Member("a.jpg", jpeg_bytes((640, 480))),
        Member("b.jpg", jpeg_bytes((480, 640))),
        Member("c.png", png.getvalue()),
        Member("d.jpg", jpeg_bytes((300, 200))),  # half of it would be under 224 on a side
    ]
    (tmp_path / "s.tar").write_bytes(shard(members))
    model = ModelOf224()
    run(tmp_path / "s.tar", tmp_path / "out", model)
    expected = [(320, 240), (240, 320), (640, 480), (300, 200)]
    assert sorted(model.sizes) == sorted(expected)  # prepared in decode threads, in any order
    rows = rows_of(tmp_path / "out" / "s.parquet")
    assert [(rows[k]["width"], rows[k]["height"]) for k in "abcd"] == expected  # the rows say so, as they did


def test_webdataset_output_adds_the_caption_beside_each_picture(tmp_path: Path) -> None:
    data, _expected = hostile_shard(MAX_BYTES)
    (tmp_path / "s.tar").write_bytes(data)
    run(tmp_path / "s.tar", tmp_path / "out", out_format="webdataset")
    with tarfile.open(tmp_path / "out" / "s.tar") as tar:
        names = tar.getnames()
        members = {name: tar.extractfile(name).read() for name in names}  # type: ignore[union-attr]
    caption = members["good-0002.txt"].decode()
    assert caption.startswith("red ")
    meta = json.loads(members["good-0002.json"])
    assert meta["n"] == 2 and meta["caption"] == caption and meta["original_txt"] == "old caption 2"
    assert (meta["mean_logprob"], meta["tokens"]) == (-1.0, 2)  # the caption's confidence (FakeCaptioner's)
    row = rows_of(tmp_path / "out" / "s.parquet")["good-0002"]
    assert (row["caption"], row["mean_logprob"], row["tokens"]) == (caption, -1.0, 2)
    assert "good-0002.jpg" in members
    assert json.loads(members["corpus/half_jpg.json"])["error_kind"] == "truncated"
    assert "corpus/half_jpg.txt" not in members
    # Hostile members are never copied (a safe key still gets its json with the failure) and no name climbs.
    assert not {"link.jpg", "hard.jpg", "pipe.jpg", "null.jpg", "huge.jpg"} & set(names)
    assert json.loads(members["link.json"])["error_kind"] == "not_an_image"
    assert not [n for n in names if n.startswith(("/", "..")) or "/../" in n]


def test_a_killed_run_resumes_per_key_from_its_checkpoints(tmp_path: Path) -> None:
    members, _expected = good_samples("k", 12)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(shard(members))
    stat = (tmp_path / "in" / "a.tar").stat()
    etag = f"{stat.st_size}-{stat.st_mtime_ns}"
    done = [
        {"id": f"k{i:04d}", "position": i, "source_etag": etag, "caption": "from before", "model_version": "fake-1"}
        for i in range(5)
    ]
    out = tmp_path / "out"
    (out / "a.partial").mkdir(parents=True)
    (out / "a.partial" / "part-000001-old.parquet").write_bytes(encode_checkpoint(done))
    captioner = CountingCaptioner()
    summary = run(tmp_path / "in" / "a.tar", out, captioner)
    assert captioner.images == 7 and (summary.skipped, summary.done) == (5, 7)
    rows = rows_of(out / "a.parquet")
    assert list(rows) == [f"k{i:04d}" for i in range(12)]  # every key once, in the shard's order
    assert [rows[f"k{i:04d}"]["caption"] for i in range(5)] == ["from before"] * 5
    assert not (out / "a.partial").exists() or not list((out / "a.partial").iterdir())

    again = CountingCaptioner()
    second = run(tmp_path / "in" / "a.tar", out, again)
    assert again.images == 0 and second.files_done_before == 1 and (second.total, second.skipped) == (12, 12)


def test_retry_failed_reruns_only_those_rows(tmp_path: Path) -> None:
    data, expected = hostile_shard(MAX_BYTES)
    (tmp_path / "s.tar").write_bytes(data)
    run(tmp_path / "s.tar", tmp_path / "out")
    captioner = CountingCaptioner()
    summary = run(tmp_path / "s.tar", tmp_path / "out", captioner, retry_failed=frozenset({"truncated"}))
    assert summary.retried == 4 and summary.failed_by_kind == Counter({"truncated": 4})
    assert captioner.images == 0 and summary.skipped == len(expected) - 4
    assert {key: row["error_kind"] for key, row in rows_of(tmp_path / "out" / "s.parquet").items()} == expected
    with pytest.raises(ArchiveJobError, match="unknown failure kind"):
        run(tmp_path / "s.tar", tmp_path / "out", retry_failed=frozenset({"nope"}))


class Killed(BaseException):
    """What a kill does to the run: it stops where it is (only what the checkpoints hold is kept)."""


class Blanking(CountingCaptioner):
    """Empty captions (failure rows of kind empty_caption) for pictures of the widths in ``blank``; with
    ``kill_after``, stopped like a killed process at its first model call after that many pictures."""

    draft_size = None  # type: ignore[assignment]  # pictures decoded whole: their width tells them apart

    def __init__(self, blank: frozenset[int] = frozenset(), kill_after: int | None = None) -> None:
        super().__init__()
        self.blank, self.kill_after = blank, kill_after

    def prepare(self, image: Any, prompt: str | None = None, *, origin: object = None) -> ModelInput:
        prepared = super().prepare(image, prompt, origin=origin)
        return replace(prepared, features={**prepared.features, "width": image.width})

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        if self.kill_after is not None and self.images >= self.kill_after:
            raise Killed
        captions = super().caption_inputs(inputs, decoding)
        return [
            replace(caption, text="") if item.features["width"] in self.blank else caption
            for item, caption in zip(inputs, captions, strict=True)
        ]


@pytest.mark.parametrize("flag", ["--retry-failed", "none"])
@pytest.mark.parametrize("first", ["complete", "killed"])
def test_a_killed_retry_run_resumes_per_key(tmp_path: Path, first: str, flag: str) -> None:
    """A --retry-failed run killed while it redoes a shard's failures, then run again: the rows it redid are
    kept, the failures it had not reached are redone, and the shard's successes are never redone (they were
    all redone). ``first``: the failures were in a finished shard (its marker) or in a killed run's checkpoints.
    ``flag``: the run after the kill retries again, or not: what the killed run promised is done either way."""
    members, _expected = good_samples("k", 12)  # widths 16 + i % 5
    (tmp_path / "s.tar").write_bytes(shard(members))
    out = tmp_path / "out"
    failing = {f"k{i:04d}" for i in range(12) if i % 5 in (1, 3)}  # widths 17 and 19

    def job(captioner: Any, **options: Any) -> Any:
        return run_archive_job(
            str(tmp_path / "s.tar"),
            str(out),
            settings(rows_per_part=1),  # each row checkpointed as it comes: a kill loses none
            options=ArchiveOptions(**options),
            show_progress=False,
            captioner=captioner,
        )

    before = Blanking(blank=frozenset({17, 19}), kill_after=None if first == "complete" else 8)
    if first == "complete":
        job(before)
    else:
        with pytest.raises(Killed):
            job(before)  # its rows so far are checkpoints: the first before.images keys, in order
    failures = len({key for key in failing if int(key[1:]) < before.images})
    to_redo = failures + 12 - before.images
    retry = frozenset({"empty_caption"})
    killed = Blanking(kill_after=2)
    with pytest.raises(Killed):
        job(killed, retry_failed=retry)
    assert 1 <= killed.images < to_redo

    again = Blanking()
    summary = job(again, retry_failed=retry if flag == "--retry-failed" else None)
    assert again.images == to_redo - killed.images  # was more: successes, or rows just redone, redone again
    assert summary.files_finished == 1 and summary.failed_by_kind == {}
    rows = rows_of(out / "s.parquet")
    assert list(rows) == [f"k{i:04d}" for i in range(12)] and all(row["error_kind"] is None for row in rows.values())
    assert not (out / "s.partial").exists() or not list((out / "s.partial").iterdir())


def test_shards_split_the_files_and_cover_each_once(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    expected_keys = {}
    for n in range(6):
        members, expected = good_samples(f"s{n}-", 2)
        (tmp_path / "in" / f"{n:05d}.tar").write_bytes(shard(members))
        expected_keys[f"{n:05d}"] = set(expected)
    src = str(tmp_path / "in" / "{00000..00005}.tar")
    summaries = [run(src, tmp_path / "out", shard=ShardSpec(i, 3)) for i in range(3)]
    for i, summary in enumerate(summaries):
        mine = [n for n in expected_keys if shard_of(f"{n}.tar", 3) == i]
        assert summary.files_in_shard == summary.files_finished == len(mine) and summary.files_listed == 6
    for stem, keys in expected_keys.items():
        assert set(rows_of(tmp_path / "out" / f"{stem}.parquet")) == keys


def test_bad_sources_are_clear_errors_that_write_nothing(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(shard([Member("a.jpg", b"x")]))
    with pytest.raises(ArchiveJobError, match=r"1 of the 2 files named .* do not exist"):
        run(str(tmp_path / "in" / "{00000..00001}.tar"), tmp_path / "out")
    with pytest.raises(ArchiveJobError, match="does not exist"):
        run(tmp_path / "in" / "nope.tar", tmp_path / "out")
    with pytest.raises(ArchiveJobError, match="would replace them"):
        run(tmp_path / "in" / "00000.tar", tmp_path / "in", out_format="webdataset")
    assert not (tmp_path / "out").exists()


def test_a_member_larger_than_the_limit_is_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b"\xff\xd8\xff" + b"\0" * (MAX_BYTES * 3)
    (tmp_path / "s.tar").write_bytes(shard([Member("big.jpg", big)]))
    reads: list[int] = []
    real = tarfile.TarFile.extractfile

    def spy(self: tarfile.TarFile, member: Any) -> Any:
        reads.append(1)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    summary = run(tmp_path / "s.tar", tmp_path / "out")
    assert summary.failed_by_kind == Counter({"too_large": 1}) and reads == []


def latin1_shard() -> bytes:
    """A shard whose second member's name is latin-1 bytes (b"caf\\xe9.jpg"), not UTF-8, as old tools write."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name in ["good.jpg", "caf\xe9.jpg", "tail.jpg"]:
            data = jpeg_bytes((16, 12))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_member_name_that_is_not_utf8_gets_a_malformed_row_under_an_escaped_key(tmp_path: Path) -> None:
    (tmp_path / "s.tar").write_bytes(latin1_shard())
    summary = run(tmp_path / "s.tar", tmp_path / "out", out_format="webdataset")
    rows = rows_of(tmp_path / "out" / "s.parquet")
    assert list(rows) == ["good", "caf\\xe9", "tail"]
    assert rows["caf\\xe9"]["error_kind"] == "malformed" and "not UTF-8" in rows["caf\\xe9"]["error_message"]
    assert rows["caf\\xe9"]["image_member"] == "caf\\xe9.jpg"
    assert rows["good"]["caption"] and rows["tail"]["caption"]
    assert summary.failed_by_kind == Counter({"malformed": 1}) and summary.files_finished == 1
    with tarfile.open(tmp_path / "out" / "s.tar") as tar:  # the escaped key is not the sample's: left out
        assert sorted(tar.getnames()) == ["good.jpg", "good.json", "good.txt", "tail.jpg", "tail.json", "tail.txt"]
    assert run(tmp_path / "s.tar", tmp_path / "out").files_done_before == 1  # and the next run is done


def test_only_usage_errors_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 fails the whole Indexed Job: an error met while reading the files (a bug, a fault of the
    moment) must not be taken for a bad argument, as a ValueError once was."""
    from captionfleet.cli import main as cli_main
    from captionfleet.worker import bulk_archive

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise UnicodeEncodeError("utf-8", "caf\udce9", 3, 4, "surrogates not allowed")

    monkeypatch.setattr(bulk_archive, "run_archive_job", broken)
    with pytest.raises(UnicodeEncodeError):
        cli_main(["caption", str(tmp_path / "s.tar"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert cli_main(["caption", str(tmp_path / "s.tar"), "--out", str(tmp_path / "o"), "--shard", "5/2"]) == 2
    (tmp_path / "s.tar").write_bytes(shard(good_samples("k", 1)[0]))
    with pytest.raises(ArchiveJobError, match="invalid bucket name"):  # a bad --out is one, named before reading
        run_archive_job(str(tmp_path / "s.tar"), "s3://x/", settings(), captioner=FakeCaptioner(), client=object())  # type: ignore[arg-type]


def test_members_piling_into_one_sample_are_refused_unread(tmp_path: Path) -> None:
    # Each member under the limit, 12 MiB together; then more members than a sample has.
    big = [Member(f"a.{i}.bin", bytes([i]) * (MAX_BYTES - 1)) for i in range(12)]
    many = [Member(f"b.{i}.txt", b"x") for i in range(MAX_SAMPLE_MEMBERS + 10)]
    data = shard([*big, *many, *good_samples("k", 1)[0]])
    seen, report, peak = peak_reading(data, MAX_BYTES)
    assert [(key, getattr(refusal, "kind", None)) for key, refusal, _ in seen] == [
        ("a", "too_large"),
        ("b", "too_large"),
        ("k0000", None),
    ]
    assert "over 64 members" in str(seen[0][1]) and report.broken is None
    assert peak < (SAMPLE_BYTES_FACTOR + 2) * MAX_BYTES  # was every member's bytes: the whole sample

    (tmp_path / "s.tar").write_bytes(data)
    run(tmp_path / "s.tar", tmp_path / "out", out_format="webdataset")
    rows = rows_of(tmp_path / "out" / "s.parquet")
    assert {key: row["error_kind"] for key, row in rows.items()} == {"a": "too_large", "b": "too_large", "k0000": None}
    with tarfile.open(tmp_path / "out" / "s.tar") as tar:  # a refused sample's members are not copied
        assert not [name for name in tar.getnames() if name.startswith(("a.", "b.")) and not name.endswith(".json")]


def test_global_pax_headers_cannot_grow_without_bound() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(40):  # ~90 KiB of new global keys before each member: 3.6 MiB kept by tarfile
            assert tar.fileobj is not None
            tar.fileobj.write(tarfile.TarInfo.create_pax_global_header({f"x{i}.{j}": "v" * 900 for j in range(100)}))
            tar.offset = tar.fileobj.tell()
            data = jpeg_bytes((16, 12))
            info = tarfile.TarInfo(f"k{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    seen, report, peak = peak_reading(buf.getvalue(), MAX_BYTES)
    assert report.broken is not None and "global PAX headers" in report.broken
    assert 0 < len(seen) < 40 and peak < 3 << 20


def test_a_shard_of_many_members_is_read_in_bounded_memory() -> None:
    data = shard([Member(f"k{i:05d}.jpg", b"x") for i in range(6000)])
    seen, report, peak = peak_reading(data, MAX_BYTES)
    assert len(seen) == 6000 and report.broken is None
    # The baseline, measured here: tarfile's own stream reading keeps every TarInfo it read (2.7 MB for these
    # 6000 members, against 0.8 MB for ours, most of it this test's own list of keys).
    members, kept_by_tarfile = tarfile_peak(data)
    assert members == 6000
    assert peak < kept_by_tarfile / 2, (peak, kept_by_tarfile)


def test_sidecars_wait_on_disk_not_in_memory_until_the_shard_is_written(tmp_path: Path) -> None:
    """A shard of many samples with 60 KiB sidecars: the rows held while it runs stay small; the Parquet
    still has every sidecar."""
    from captionfleet.worker.archive_files import PENDING_SIDECAR_MAX_BYTES, ArchiveItem, FileRun
    from captionfleet.worker.archive_tar import TarShards
    from captionfleet.worker.connectors.archive_inputs import InputFile, InputReader
    from captionfleet.worker.connectors.archive_outputs import LocalOutputs
    from captionfleet.worker.messages import Result

    inp = InputFile(str(tmp_path / "s.tar"), "s.tar", 0, "e")
    outputs = LocalOutputs(tmp_path / "out")
    run_ = FileRun(inp, outputs, run_id="r", rows_per_part=1000, on_finished=lambda r: None, spill_dir=tmp_path)

    def text(i: int) -> str:  # made anew for each row, as decoding a sample's key.txt does
        return chr(65 + i % 26) * (60 * 1024)

    encode_checkpoint([])  # pyarrow's lazy imports, before memory is counted
    tracemalloc.start()
    try:
        for i in range(400):  # 24 MiB of sidecars
            key = f"k{i:04d}"
            item = ArchiveItem(
                run_, key, f"{inp.uri}#{key}.jpg", i, b"", {"image_member": f"{key}.jpg", "txt": text(i)}
            )
            run_.add(item, Result(key, item.uri, "fake-1", caption=f"c{i}"))
            del item
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < PENDING_SIDECAR_MAX_BYTES + (2 << 20)  # was every sidecar until the shard's end: 24 MiB
    run_.flush()
    TarShards(InputReader(None, None), max_bytes=MAX_BYTES, webdataset=False).write_outputs(run_, tmp_path)  # type: ignore[arg-type]
    run_.close()
    rows = rows_of(tmp_path / "out" / "s.parquet")
    assert [row["txt"] for row in rows.values()] == [text(i) for i in range(400)] and rows["k0399"]["caption"] == "c399"
    # The checkpoints written meanwhile hold them too (a killed run resumes with them).
    parts = sorted((tmp_path / "out" / "s.partial").glob("*.parquet"))
    assert len(parts) >= 3 and sum(len(decode_checkpoint(p.read_bytes())) for p in parts) == 400


def test_inputs_whose_outputs_would_clash_are_refused_and_overwrite_removes_only_its_own(tmp_path: Path) -> None:
    import gzip

    from captionfleet.worker.archive_files import name_clashes

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(shard(good_samples("x", 2)[0]))
    (tmp_path / "in" / "a.tar.gz").write_bytes(gzip.compress(shard(good_samples("y", 2)[0])))
    (tmp_path / "in" / "a.b.tar").write_bytes(shard(good_samples("z", 2)[0]))
    (tmp_path / "in" / "c.tar").write_bytes(shard(good_samples("w", 2)[0]))
    summary = run(tmp_path / "in", tmp_path / "out", input_format="tar")
    # Both of a clash are refused, in every run alike (it used to be whichever came last, in turn).
    assert sorted(line.split(":")[0].rsplit("/", 1)[1] for line in summary.refused) == ["a.tar", "a.tar.gz"]
    assert "rename one of them" in summary.refused[0] and summary.files_failed
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".parquet") == [
        "a.b.parquet",
        "c.parquet",
    ]

    assert set(name_clashes(["x.csv", "x.jsonl", "y.csv", "a.partial/q.tar", "a.tar"])) == {
        "x.csv",
        "x.jsonl",
        "a.partial/q.tar",
    }

    # --overwrite of c.tar's shard alone: a.b.tar's outputs ("a.b." starts like "a.") and c's neighbours stay.
    (tmp_path / "in" / "a.tar.gz").unlink()
    run(tmp_path / "in", tmp_path / "out", input_format="tar")  # a.tar now has its outputs too
    total = next(n for n in range(2, 64) if shard_of("a.tar", n) != shard_of("a.b.tar", n))
    mine = ShardSpec(shard_of("a.tar", total), total)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = run(tmp_path / "in", tmp_path / "out", input_format="tar", shard=mine, overwrite=True)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert again.files_finished >= 1 and after["a.parquet"] != before["a.parquet"]
    assert after["a.b.parquet"] == before["a.b.parquet"] and "a.b.complete.json" in after


def test_an_output_folder_inside_the_source_folder_is_not_listed_as_input(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(shard(good_samples("x", 2)[0]))
    for _ in range(3):
        summary = run(tmp_path / "in", tmp_path / "in" / "captions", input_format="tar", out_format="webdataset")
        assert summary.files_listed == 1  # was one more each run: the shard written the run before
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.tar")) == [
        "in/00000.tar",
        "in/captions/00000.tar",
    ]


def test_a_repeated_key_never_takes_the_id_of_a_real_key(tmp_path: Path) -> None:
    jpeg = jpeg_bytes((16, 12))
    members = [Member("a.jpg", jpeg), Member("b.jpg", jpeg), Member("a.jpg", jpeg), Member("a@2.jpg", jpeg)]
    (tmp_path / "s.tar").write_bytes(
        shard([*members, Member("dir.v1/a.jpg", jpeg), Member("c.jpg", jpeg), Member("dir.v1/a.jpg", jpeg)])
    )
    run(tmp_path / "s.tar", tmp_path / "out")
    rows = rows_of(tmp_path / "out" / "s.parquet")  # one row each: the repeat used to be "a@2", a real key's id
    assert {key: row["error_kind"] for key, row in rows.items()} == {
        "a": None,
        "b": None,
        "a.2": "malformed",
        "a@2": None,
        "dir.v1/a": None,
        "c": None,
        "dir.v1/a.6": "malformed",
    }


@pytest.mark.parametrize("older", ["ffffffffffff", "time-ordered"])  # a run id of before they were time-ordered
def test_the_row_of_the_newest_run_wins_whatever_the_part_numbers(tmp_path: Path, older: str) -> None:
    members, _expected = good_samples("k", 3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(shard(members))
    stat = (tmp_path / "in" / "a.tar").stat()
    etag = f"{stat.st_size}-{stat.st_mtime_ns}"

    def part(version: str) -> bytes:
        row = {"id": "k0000", "position": 0, "source_etag": etag, "caption": version, "model_version": version}
        return encode_checkpoint([row])

    old_run = new_run_id() if older == "time-ordered" else older
    time.sleep(0.01)
    new_run = new_run_id()
    out = tmp_path / "out"
    (out / "a.partial").mkdir(parents=True)
    # Killed runs: the older (model v1) got to its part 2; the newer (v2, which redid v1's rows) to its part 1.
    (out / "a.partial" / f"part-000002-{old_run}.parquet").write_bytes(part("v1"))
    (out / "a.partial" / f"part-000001-{new_run}.parquet").write_bytes(part("v2"))
    summary = run(tmp_path / "in" / "a.tar", out, any_model_version=True)
    assert summary.skipped == 1
    assert rows_of(out / "a.parquet")["k0000"]["caption"] == "v2"


def test_a_finished_file_skipped_again_loses_the_checkpoints_a_killed_run_left(tmp_path: Path) -> None:
    members, _expected = good_samples("k", 3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(shard(members))
    out = tmp_path / "out"
    run(tmp_path / "in" / "a.tar", out)
    # A --retry-failed run killed between writing its part 0 (the rows it keeps) and removing the marker.
    leftover = out / "a.partial" / f"part-000000-{new_run_id()}.parquet"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(encode_checkpoint([{"id": "k0000", "position": 0, "caption": "kept"}]))
    summary = run(tmp_path / "in" / "a.tar", out)
    assert summary.files_done_before == 1 and not leftover.exists()


@pytest.mark.parametrize("kind", ["global PAX", "GNU long name"])
def test_a_chain_of_extended_headers_breaks_the_shard_not_the_job(kind: str) -> None:
    """tarfile reads each next extended header by recursion: 400 tiny ones in a row (a 420 KB shard) raised
    RecursionError out of the reader and stopped the whole job, on every rerun."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        assert tar.fileobj is not None
        data = jpeg_bytes((16, 12))
        info = tarfile.TarInfo("a.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for _ in range(400):
            if kind == "global PAX":
                header = tarfile.TarInfo._create_pax_generic_header({"comment": "x"}, tarfile.XGLTYPE, "utf-8")  # type: ignore[attr-defined]
            else:
                header = tarfile.TarInfo._create_gnu_long_header("l" * 10, tarfile.GNUTYPE_LONGNAME, "utf-8", "strict")  # type: ignore[attr-defined]
            tar.fileobj.write(header)
            tar.offset += len(header)
        info = tarfile.TarInfo("b.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    report = TarReport()
    keys = [sample.key for sample in iter_samples(io.BytesIO(buf.getvalue()), max_bytes=MAX_BYTES, report=report)]
    assert keys == ["a"]
    assert report.broken is not None and "extended headers in a row" in report.broken
