"""The bulk job's results in S3: whole Parquet/JSONL part objects and a completion marker per shard.

``PartStore`` is one shard's output folder (list, read, write, rewrite and delete parts; the marker);
``S3ResultSink`` is the pipeline's ``Sink`` that buffers rows and uploads them as parts.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import ClientError

from captionfleet.core.s3 import DEFAULT_RETRY, ObjectStore, RetryPolicy, is_not_found
from captionfleet.worker.connectors.s3_listing import list_pages
from captionfleet.worker.connectors.s3_reader import S3Item
from captionfleet.worker.messages import Result

log = logging.getLogger(__name__)

T = TypeVar("T")


ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("model_version", pa.string()),
        ("caption", pa.string()),
        ("mean_logprob", pa.float64()),
        ("tokens", pa.int64()),
        ("prompt", pa.string()),
        ("error_kind", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("fetch_ms", pa.float64()),  # the GET itself, retries included
        ("fetch_attempts", pa.int64()),
        ("wait_ms", pa.float64()),  # how long decoding waited for the bytes (0 when fetched ahead)
        ("decode_ms", pa.float64()),
        ("queue_ms", pa.float64()),
        ("inference_ms", pa.float64()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
        ("run_id", pa.string()),
    ]
)
FORMATS = ("parquet", "jsonl")
MARKER_NAME = "_COMPLETE.json"
_PART_RE = re.compile(r"^part-(\d{6,})-([0-9A-Za-z]+)\.(parquet|jsonl)$")


def new_run_id() -> str:
    """A run id that sorts by the time the run began: ``t`` (after every hex digit, so after the ids of
    before, which were 12 random hex digits), the milliseconds since 1970, zero-padded, and 8 random hex
    digits. An archive job's checkpoint parts are numbered per run: only the run id tells which is newer."""
    return f"t{time.time_ns() // 1_000_000:014d}{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class PartRef:
    name: str  # part-000012-<run id>.parquet
    seq: int
    fmt: str

    @property
    def order(self) -> tuple[int, str]:
        """Parts are ordered by sequence number; the name breaks ties between two writers."""
        return (self.seq, self.name)

    @classmethod
    def parse(cls, name: str) -> PartRef | None:
        match = _PART_RE.match(name)
        return cls(name, int(match.group(1)), match.group(3)) if match else None


def result_row(result: Result, item: S3Item | None, run_id: str, finished_at: datetime) -> dict[str, Any]:
    """One output row. ``item`` carries what the listing and the GET know (ETag, size, fetch timing)."""
    return {
        "key": result.id,
        "uri": result.uri,
        "etag": item.etag if item else None,
        "size": item.size if item else result.bytes,
        "model_version": result.model_version,
        "caption": result.caption,
        "mean_logprob": result.mean_logprob,
        "tokens": result.tokens,
        "prompt": result.prompt,
        "error_kind": result.error_kind,
        "error_message": result.error_message,
        "width": result.width,
        "height": result.height,
        "fetch_ms": item.fetch_ms if item else None,
        "fetch_attempts": item.attempts if item else None,
        "wait_ms": result.fetch_ms,
        "decode_ms": result.decode_ms,
        "queue_ms": result.queue_ms,
        "inference_ms": result.inference_ms,
        "finished_at": finished_at,
        "run_id": run_id,
    }


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def encode_part(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), buf, compression="zstd")
        return buf.getvalue()
    lines = (json.dumps(row, ensure_ascii=False, default=_json_default) for row in rows)
    return ("\n".join(lines) + "\n").encode("utf-8")


def decode_part(data: bytes, fmt: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data), columns=columns).to_pylist()
    rows = [json.loads(line) for line in _jsonl_lines(data)]
    return [{name: row.get(name) for name in columns} for row in rows] if columns else rows


def _jsonl_lines(data: bytes) -> list[str]:
    # "\n" only: str.splitlines() also breaks at U+2028/U+2029/U+0085, which json.dumps(ensure_ascii=False)
    # leaves unescaped inside strings, so a key containing one would read back as two broken lines.
    return [line for line in data.decode("utf-8").split("\n") if line.strip()]


def _drop_rows(data: bytes, fmt: str, drop: set[int]) -> tuple[bytes, int]:
    """The part without the rows at ``drop`` (positions), and how many rows are left."""
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        keep = pa.array([i not in drop for i in range(table.num_rows)])
        kept = table.filter(keep)
        buf = io.BytesIO()
        pq.write_table(kept, buf, compression="zstd")
        return buf.getvalue(), kept.num_rows
    lines = _jsonl_lines(data)
    kept_lines = [line for i, line in enumerate(lines) if i not in drop]
    return ("".join(line + "\n" for line in kept_lines)).encode("utf-8"), len(kept_lines)


class PartStore:
    """One shard's output folder: ``<prefix>part-<seq>-<run>.<fmt>`` objects and ``_COMPLETE.json``.

    Every part is one PUT of a complete file, so a reader (or a restarted run) sees a part whole or
    not at all; a run killed mid-part leaves nothing of it behind.
    """

    def __init__(
        self,
        client: ObjectStore,
        bucket: str,
        prefix: str,
        *,
        fmt: str = "parquet",
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown result format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        self.fmt = fmt
        self.retry = retry
        self._next_seq: int | None = None

    def uri(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return self.retry.call(fn, what)[0]

    def _names(self) -> list[str]:
        names: list[str] = []
        for page in list_pages(self.client, self.bucket, self.prefix, retry=self.retry):
            names.extend(obj.key[len(self.prefix) :] for obj in page)
        return names

    def list_parts(self) -> list[PartRef]:
        parts = [part for name in self._names() if (part := PartRef.parse(name)) is not None]
        parts.sort(key=lambda part: part.order)
        self._next_seq = parts[-1].seq + 1 if parts else 0
        return parts

    def read(self, part: PartRef, columns: list[str] | None = None) -> list[dict[str, Any]]:
        return decode_part(self._get(part.name), part.fmt, columns)

    def _get(self, name: str) -> bytes:
        def once() -> bytes:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read())

        return self._call(once, self.uri(name))

    def _put(self, name: str, body: bytes, content_type: str) -> None:
        self._call(
            partial(
                self.client.put_object, Bucket=self.bucket, Key=self.prefix + name, Body=body, ContentType=content_type
            ),
            self.uri(name),
        )

    def _delete(self, name: str) -> None:
        self._call(partial(self.client.delete_object, Bucket=self.bucket, Key=self.prefix + name), self.uri(name))

    def write_part(self, rows: list[dict[str, Any]], run_id: str) -> PartRef:
        if self._next_seq is None:
            self.list_parts()
        assert self._next_seq is not None
        part = PartRef(f"part-{self._next_seq:06d}-{run_id}.{self.fmt}", self._next_seq, self.fmt)
        content_type = "application/vnd.apache.parquet" if self.fmt == "parquet" else "application/x-ndjson"
        self._put(part.name, encode_part(rows, self.fmt), content_type)
        self._next_seq += 1
        return part

    def drop_rows(self, part: PartRef, drop: set[int]) -> int:
        """Rewrite ``part`` without the rows at positions ``drop`` (one PUT: readers see old or new);
        delete it when nothing is left. Returns the rows left."""
        body, left = _drop_rows(self._get(part.name), part.fmt, drop)
        if left:
            self._put(part.name, body, "application/octet-stream")
        else:
            self._delete(part.name)
        return left

    def read_marker(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._get(MARKER_NAME)))
        except ClientError as error:
            if is_not_found(error):
                return None
            raise

    def write_marker(self, content: dict[str, Any]) -> None:
        body = json.dumps(content, indent=2, sort_keys=True, default=_json_default).encode("utf-8")
        self._put(MARKER_NAME, body, "application/json")

    def delete_marker(self) -> None:
        self._delete(MARKER_NAME)  # deleting a missing key is not an error in S3

    def delete_all(self) -> int:
        names = self._names()
        for name in names:
            self._delete(name)
        self._next_seq = 0
        return len(names)


class S3ResultSink:
    """The pipeline's ``Sink`` for the S3 job: rows buffered, then uploaded as whole parts.

    ``flush()`` returns once the part is stored (or raises), as the sink contract requires. The first
    part of a run removes the shard's completion marker first: a marker only ever describes parts
    that are all there.
    """

    def __init__(
        self,
        store: PartStore,
        *,
        run_id: str,
        rows_per_part: int = 1000,
        on_part: Callable[[PartRef, list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.rows_per_part = rows_per_part
        self.on_part = on_part
        self.parts_written: list[PartRef] = []
        self._pending: list[dict[str, Any]] = []
        self._items: dict[str, S3Item] = {}
        self._marker_cleared = False

    def track(self, item: S3Item) -> None:
        """Remember what the listing and the GET know about an item until its row is written."""
        self._items[item.id] = item

    def done_ids(self) -> set[str]:
        return {str(row["key"]) for part in self.store.list_parts() for row in self.store.read(part, ["key"])}

    def write(self, results: list[Result]) -> None:
        now = datetime.now(UTC)
        for result in results:
            self._pending.append(result_row(result, self._items.pop(result.id, None), self.run_id, now))
        while len(self._pending) >= self.rows_per_part:
            self._upload(self._pending[: self.rows_per_part])
            self._pending = self._pending[self.rows_per_part :]

    def flush(self) -> None:
        if self._pending:
            self._upload(self._pending)
            self._pending = []

    def _upload(self, rows: list[dict[str, Any]]) -> None:
        if not self._marker_cleared:
            self.store.delete_marker()
            self._marker_cleared = True
        part = self.store.write_part(rows, self.run_id)
        log.debug("wrote %s (%d rows)", self.store.uri(part.name), len(rows))
        self.parts_written.append(part)
        if self.on_part is not None:
            self.on_part(part, rows)

    def close(self) -> None:
        self.flush()
