"""Result sinks for local files: JSONL and Parquet.

The sink contract (as in quix-streams and bytewax): ``write(rows)`` may buffer; ``flush()``
returns only when what was written is durable, otherwise it raises. ``done_ids()`` tells a
restarted run which inputs already have a row, so it can resume.

Parquet files cannot be appended to, so the Parquet sink writes whole *part* files next to the
output (``OUT.parts/part-00000.parquet``, each renamed into place only when complete) and, on
``close()``, merges everything into ``OUT`` atomically. A run killed half-way leaves its parts
behind, and the next run picks them up: at most the unflushed rows are redone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from captionfleet.worker.messages import Result

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("model_version", pa.string()),
        ("caption", pa.string()),
        ("mean_logprob", pa.float64()),
        ("tokens", pa.int64()),
        ("prompt", pa.string()),
        ("error_kind", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("bytes", pa.int64()),
        ("fetch_ms", pa.float64()),
        ("decode_ms", pa.float64()),
        ("queue_ms", pa.float64()),
        ("inference_ms", pa.float64()),
        ("metadata", pa.string()),  # JSON text: request metadata has no fixed schema
    ]
)


class Sink(Protocol):
    def done_ids(self) -> set[str]: ...
    def write(self, results: list[Result]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class NullSink:
    """A pipeline's sink when answers leave another way, item by item (the stream's output, the API's futures)."""

    def done_ids(self) -> set[str]:
        return set()

    def write(self, results: list[Result]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlSink:
    """One JSON object per line, appended; a torn last line from a crash is cut off on open."""

    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            path.unlink(missing_ok=True)
        self._repair_torn_tail()
        self._file = path.open("a", encoding="utf-8")

    def _repair_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def done_ids(self) -> set[str]:
        return {str(row["id"]) for row in read_jsonl(self.path)} if self.path.exists() else set()

    def write(self, results: list[Result]) -> None:
        for result in results:
            self._file.write(json.dumps(result.to_row(), ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    for row in rows:
        if not isinstance(row.get("metadata"), str | None):
            row["metadata"] = json.dumps(row["metadata"] or {}, ensure_ascii=False)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class ParquetSink:
    def __init__(self, path: Path, *, overwrite: bool = False, rows_per_part: int = 1024) -> None:
        self.path = path
        self.parts_dir = path.with_name(path.name + ".parts")
        self.rows_per_part = rows_per_part
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            path.unlink(missing_ok=True)
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.parts_dir.mkdir(exist_ok=True)
        for stale in self.parts_dir.glob("*.tmp"):  # a part that was being written when we crashed
            stale.unlink()
        self._pending: list[dict[str, Any]] = []
        self._next_part = len(list(self.parts_dir.glob("part-*.parquet")))

    def _existing_files(self) -> list[Path]:
        files = sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.exists() else []
        return ([self.path] if self.path.exists() else []) + files

    def done_ids(self) -> set[str]:
        ids: set[str] = set()
        for file in self._existing_files():
            ids.update(str(i) for i in pq.read_table(file, columns=["id"]).column("id").to_pylist())
        return ids

    def write(self, results: list[Result]) -> None:
        self._pending.extend(result.to_row() for result in results)
        if len(self._pending) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        part = self.parts_dir / f"part-{self._next_part:05d}.parquet"
        tmp = part.with_suffix(".tmp")
        pq.write_table(_to_table(self._pending), tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.rename(part)  # readers and restarts only ever see whole parts
        _fsync_dir(self.parts_dir)
        self._next_part += 1
        self._pending = []

    def close(self) -> None:
        self.flush()
        files = self._existing_files()
        if files:
            table = _last_row_per_id(pa.concat_tables([_with_schema(pq.read_table(f)) for f in files]))
            tmp = self.path.with_name(self.path.name + ".tmp")
            pq.write_table(table, tmp)
            # On disk before the parts (which are) go: a power cut must not leave neither.
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            tmp.rename(self.path)
            _fsync_dir(self.path.parent)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def _with_schema(table: pa.Table) -> pa.Table:
    """A file written before a column existed (mean_logprob, tokens, prompt) gets nulls there, so that it merges
    with the parts of a resumed run."""
    for field in SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names)


def _last_row_per_id(table: pa.Table) -> pa.Table:
    """A crash between writing OUT and removing its parts would count rows twice: keep the last."""
    last: dict[str, int] = {}
    for index, row_id in enumerate(table.column("id").to_pylist()):
        last[row_id] = index
    if len(last) == table.num_rows:
        return table
    return table.take(sorted(last.values()))


def open_file_sink(path: Path, *, overwrite: bool = False) -> JsonlSink | ParquetSink:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return ParquetSink(path, overwrite=overwrite)
    if suffix in {".jsonl", ".ndjson"}:
        return JsonlSink(path, overwrite=overwrite)
    raise ValueError(f"cannot write results to {path}: use a .parquet or .jsonl file name")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a results file (Parquet or JSONL), metadata decoded back to dicts."""
    if path.suffix.lower() == ".parquet":
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            row["metadata"] = json.loads(row["metadata"]) if row.get("metadata") else {}
        return rows
    return read_jsonl(path)
