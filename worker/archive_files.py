"""One input file of an archive job while it is captioned: the rows it already had (resume), the rows
arriving, its checkpoint parts, and the moment it is finished (every item it yielded has a row).

Output names, for an input file named ``shards/00001.tar`` (relative to the source's folder)::

    <out>/shards/00001.parquet                 the rows, written whole once the file is done
    <out>/shards/00001.tar                     with --out-format webdataset: the shard with captions added
    <out>/shards/00001.complete.json           the completion marker, written last
    <out>/shards/00001.partial/part-*.parquet  checkpoints while it runs, deleted after the marker
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from captionfleet.worker.archive_rows import caption_fields, decode_checkpoint, encode_checkpoint
from captionfleet.worker.archive_spill import SidecarSpill, SpillRef
from captionfleet.worker.connectors.archive_inputs import InputFile
from captionfleet.worker.connectors.archive_outputs import Outputs
from captionfleet.worker.messages import Result

logger = logging.getLogger(__name__)

INPUT_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet", ".csv", ".jsonl", ".ndjson")
# Rows waiting for their checkpoint are written sooner than ROWS_PER_PART when their sidecars add up to this.
PENDING_SIDECAR_MAX_BYTES = 8 << 20
SIDECARS = ("txt", "json")


def stem_of(name: str) -> str:
    lower = name.lower()
    for suffix in INPUT_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def marker_name(stem: str) -> str:
    return f"{stem}.complete.json"


def checkpoint_folder(stem: str) -> str:
    return f"{stem}.partial/"


def is_checkpoint_of(stem: str, name: str) -> bool:
    """A checkpoint part of this input: directly in its folder (not an input's output further down)."""
    folder = checkpoint_folder(stem)
    rest = name[len(folder) :]
    return name.startswith(folder) and "/" not in rest and rest.startswith("part-") and rest.endswith(".parquet")


def is_output_of(stem: str, name: str) -> bool:
    """Whether ``name`` (under the output) is one of this input's: its Parquet, its shard, its marker or a
    checkpoint part. Exactly: ``a``'s are not ``a.b``'s."""
    return name in (f"{stem}.parquet", f"{stem}.tar", marker_name(stem)) or is_checkpoint_of(stem, name)


def name_clashes(names: list[str]) -> dict[str, str]:
    """Inputs whose outputs would be another's (``a.tar`` and ``a.tar.gz``, ``x.csv`` and ``x.jsonl``: one
    stem), or would sit in a checkpoint folder (``a.partial/x.tar``): name -> why. All of a clash are
    named, whatever their order, so every shard plans alike."""
    by_stem: dict[str, list[str]] = {}
    for name in names:
        by_stem.setdefault(stem_of(name), []).append(name)
    why: dict[str, str] = {}
    for stem, group in by_stem.items():
        for name in group if len(group) > 1 else []:
            others = ", ".join(repr(other) for other in group if other != name)
            why[name] = f"its outputs ({stem}.parquet, ...) would be those of {others}: rename one of them"
    for name in names:
        if any(part.endswith(".partial") for part in name.split("/")[:-1]):
            why[name] = "it is in a folder named *.partial, where the job keeps checkpoints: rename the folder"
    return why


class ArchiveItem:
    """A pipeline ``Item``: one sample or row of an input file, its bytes in memory, being fetched
    (``source`` is then a callable that waits for them), or refused (an exception, raised on read).
    ``prompt``: the row's own (a manifest's prompt column); None: the job's, else the family's default."""

    __slots__ = ("_cancel", "_source", "extra", "file", "id", "position", "prompt", "uri")

    def __init__(
        self,
        file: FileRun,
        id: str,
        uri: str,
        position: int,
        source: bytes | BaseException | Callable[[], bytes],
        extra: dict[str, Any] | None = None,
        *,
        cancel: Callable[[], bool] | None = None,
        prompt: str | None = None,
    ) -> None:
        self.file = file
        self.id = id
        self.uri = uri
        self.position = position
        self.prompt = prompt
        self.extra = extra or {}
        self._source: bytes | BaseException | Callable[[], bytes] | None = source
        self._cancel = cancel

    def cancel(self) -> None:
        """The run stopped before this item was taken: its fetch, if any, is not needed."""
        if self._cancel is not None:
            self._cancel()

    def read(self) -> bytes:
        source, self._source = self._source, None  # the bytes go once decoded
        if source is None:
            raise RuntimeError(f"{self.uri} was already read")
        if isinstance(source, BaseException):
            raise source
        if callable(source):
            return source()
        return source


class FileRun:
    """Thread-safe: the source thread adds what it skips and says when the file ends; the model thread
    adds rows; the sink's flush writes checkpoints."""

    def __init__(
        self,
        inp: InputFile,
        outputs: Outputs,
        *,
        run_id: str,
        rows_per_part: int,
        on_finished: Callable[[FileRun], None],
        spill_dir: Path | None = None,
    ) -> None:
        self.inp = inp
        self.stem = stem_of(inp.name)
        self.outputs = outputs
        self.run_id = run_id
        self.rows_per_part = rows_per_part
        self.on_finished = on_finished
        # id -> its row (checkpoint shape) without its sidecars, which wait in the spill (ids in _sidecars).
        self.rows: dict[str, dict[str, Any]] = {}
        self._spill = SidecarSpill(spill_dir)
        self._sidecars: dict[str, SpillRef] = {}
        self._pending_bytes = 0
        self.resumed = 0
        self.old_checkpoints: list[str] = []  # parts of earlier runs (listed at planning)
        self.checkpoints_written: list[str] = []
        self.broken: str | None = None  # why the input ended early, if it did
        self.local_path: Path | None = None  # a copy on local disk, for formats that need one
        self.format_name: str | None = None  # what the file turned out to be, when its format decides per file
        self._pending: list[dict[str, Any]] = []
        self._yielded: int | None = None  # items handed to the pipeline, once the source is done
        self._received = 0
        self._parts = 0
        self._lock = threading.Lock()
        self.new_failures: Counter[str] = Counter()

    # -- resume --------------------------------------------------------------------------------------

    def resume(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._keep(str(row["id"]), row)
        self.resumed = len(self.rows)

    def _keep(self, item_id: str, row: dict[str, Any]) -> int:
        """The row in ``rows``, its sidecars spilled to disk; returns their size."""
        ref = self._spill.put(*(row.get(name) for name in SIDECARS))
        if ref is None:
            self._sidecars.pop(item_id, None)
        else:
            self._sidecars[item_id] = ref
        self.rows[item_id] = {**row, **dict.fromkeys(SIDECARS)}
        return 0 if ref is None else ref[1]

    def checkpoint_kept(self, rows: list[dict[str, Any]]) -> None:
        """A --retry-failed run's rows kept (from the file's marker and outputs, or from older checkpoints),
        written as this run's part 0 before the rows it redoes are dropped anywhere: once the marker or the
        older parts are gone, a run killed while redoing resumes from this part and the parts of the rows it
        redid, and the next run redoes only the rows in none of them. Part 0 sorts before every part a run
        writes afterwards (those count from 1): a row redone there wins over the kept one, were both read."""
        if not rows:
            return
        name = f"{checkpoint_folder(self.stem)}part-{0:06d}-{self.run_id}.parquet"
        self.outputs.put_bytes(name, encode_checkpoint(rows))
        with self._lock:
            self.checkpoints_written.append(name)

    def has_row(self, item_id: str) -> bool:
        with self._lock:
            return item_id in self.rows

    # -- rows ----------------------------------------------------------------------------------------

    def add(self, item: ArchiveItem, result: Result) -> None:
        row = {
            "id": item.id,
            "position": item.position,
            "source_etag": self.inp.etag,
            "image_member": item.extra.get("image_member"),
            "txt": item.extra.get("txt"),
            "json": item.extra.get("json"),
            **caption_fields(result),
        }
        with self._lock:
            self._pending_bytes += self._keep(item.id, row)
            self._pending.append(row)  # whole, until its checkpoint is written
            self._received += 1
            if result.error_kind:
                self.new_failures[result.error_kind] += 1
            flush = len(self._pending) >= self.rows_per_part or self._pending_bytes >= PENDING_SIDECAR_MAX_BYTES
            finished = self._finished()
        if flush:
            self.flush()
        if finished:
            self.on_finished(self)

    def source_done(self, yielded: int, broken: str | None = None) -> None:
        """The source yielded every item it will (``yielded`` of them); ``broken``: why it ended early."""
        with self._lock:
            self._yielded = yielded
            self.broken = broken
            finished = self._finished()
        if finished:
            self.on_finished(self)

    def _finished(self) -> bool:
        return self._yielded is not None and self._received >= self._yielded

    def flush(self) -> None:
        """Write the rows not yet in a checkpoint as one whole part."""
        with self._lock:
            rows, self._pending, self._pending_bytes = self._pending, [], 0
            if not rows:
                return
            self._parts += 1
            name = f"{checkpoint_folder(self.stem)}part-{self._parts:06d}-{self.run_id}.parquet"
        self.outputs.put_bytes(name, encode_checkpoint(rows))
        with self._lock:
            self.checkpoints_written.append(name)

    def ordered_rows(self) -> list[dict[str, Any]]:
        """Every row in the file's order, without its sidecars (``txt``, ``json`` None): see ``with_sidecars``."""
        with self._lock:
            return sorted(self.rows.values(), key=lambda row: int(row["position"]))

    def with_sidecars(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` (from ``ordered_rows``) with its sidecars read back from the spill."""
        txt, meta = self._spill.get(self._sidecars.get(str(row["id"])))
        return {**row, "txt": txt, "json": meta}

    def close(self) -> None:
        """The file is done with (its outputs written, or the run ends): the spill goes."""
        self._spill.close()

    def counts(self) -> dict[str, Any]:
        kinds = Counter(str(row["error_kind"]) for row in self.rows.values() if row["error_kind"])
        return {
            "rows": len(self.rows),
            "captioned": len(self.rows) - sum(kinds.values()),
            "failed": sum(kinds.values()),
            "failed_by_kind": dict(sorted(kinds.items())),
        }


def checkpoint_order(name: str) -> tuple[str, int, str]:
    """Oldest first: by run (run ids sort by time, see s3_parts.new_run_id), then by part number within it.
    By name alone, an older run's part 2 would come after a newer run's part 1, and its rows would win."""
    base = name.rsplit("/", 1)[-1].removesuffix(".parquet")
    seq, _, run = base.removeprefix("part-").partition("-")
    return (run, int(seq), name) if seq.isdigit() else ("", -1, name)


def read_checkpoints(outputs: Outputs, names: list[str]) -> list[dict[str, Any]]:
    """Rows of the checkpoint parts, oldest part first (a later row of an id wins)."""
    rows: list[dict[str, Any]] = []
    for name in sorted(names, key=checkpoint_order):
        data = outputs.get_bytes(name)
        if data is None:
            continue  # removed since the listing (another run finished the file)
        try:
            rows.extend(decode_checkpoint(data))
        except Exception as error:  # a foreign or damaged file in our folder: its rows are redone
            logger.warning("ignoring checkpoint %s: %s", outputs.uri(name), error)
    return rows


def write_marker(run: FileRun, *, fmt: str, outputs_written: list[str], model_version: str) -> None:
    marker = {
        "source": run.inp.uri,
        "source_etag": run.inp.etag,
        "source_size": run.inp.size,
        "format": fmt,
        "model_version": model_version,
        **run.counts(),
        "broken": run.broken,
        "outputs": outputs_written,
        "run_id": run.run_id,
        "completed_at": datetime.now(UTC).isoformat(),
    }
    run.outputs.put_bytes(marker_name(run.stem), json.dumps(marker, indent=2, sort_keys=True).encode())


def read_marker(outputs: Outputs, stem: str) -> dict[str, Any] | None:
    data = outputs.get_bytes(marker_name(stem))
    if data is None:
        return None
    try:
        marker = json.loads(data)
    except ValueError:
        return None  # damaged: the file is done again
    return marker if isinstance(marker, dict) else None
