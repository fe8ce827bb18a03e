"""WebDataset tar shards in an archive job: each sample becomes one item keyed by its WebDataset key, and a
finished shard gets its rows as Parquet and, with ``--out-format webdataset``, a new shard with the caption
added as ``key.txt`` and merged into ``key.json``.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from captionfleet.core.failures import MALFORMED, FetchError, ImageError
from captionfleet.worker.archive_files import ArchiveItem, FileRun
from captionfleet.worker.archive_rows import CAPTION_FIELDS
from captionfleet.worker.connectors.archive_inputs import InputReader
from captionfleet.worker.connectors.tar_samples import Sample, TarReport, iter_samples, printable, safe_name

TAR_ROWS = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),  # the shard's uri
        ("image_member", pa.string()),  # the member captioned (None when the sample had no picture)
        ("txt", pa.string()),  # the sample's own key.txt and key.json, as they were
        ("json", pa.string()),
        *CAPTION_FIELDS,
    ]
)


# Output rows built (sidecars read back) and written at a time: at most this many sidecars in memory.
_WRITE_BATCH = 512


class TarShards:
    """The tar input format: items from a shard streamed member by member, outputs once it is done."""

    name = "tar"

    def __init__(self, reader: InputReader, *, max_bytes: int, webdataset: bool) -> None:
        self.reader = reader
        self.max_bytes = max_bytes
        self.webdataset = webdataset

    def items(self, run: FileRun) -> Iterator[ArchiveItem]:
        """The shard's samples not answered yet, in order; the run hears when the shard ended and how."""
        report = TarReport()
        seen: set[str] = set()
        yielded = 0
        with self.reader.open(run.inp) as stream:
            for sample in iter_samples(stream, max_bytes=self.max_bytes, report=report):
                item = self._item(run, sample, seen)
                if run.has_row(item.id):
                    continue  # answered before this run (resume per key)
                yielded += 1
                yield item
        run.source_done(yielded, report.broken)

    def _item(self, run: FileRun, sample: Sample, seen: set[str]) -> ArchiveItem:
        image = sample.image()
        extra = {
            "image_member": image.name if image else None,
            "txt": sample.sidecar_text("txt"),
            "json": sample.sidecar_text("json"),
        }
        uri = f"{run.inp.uri}#{image.name if image else sample.key}"
        if sample.key in seen:
            # Keys name samples: a second run of the same key further on cannot share the first one's row.
            # Its id ends ".<position>": a key's last part never has a dot (split_key cuts there), so no
            # real key ("a@2" could be one) is ever this id.
            item_id = f"{sample.key}.{sample.position}"
            why = f"a second sample with key {sample.key!r} (position {sample.position}): only the first is read"
            refusal = FetchError(MALFORMED, why)
            return ArchiveItem(run, item_id, uri, sample.position, refusal, extra)
        seen.add(sample.key)
        source: bytes | BaseException
        if sample.refusal is not None:
            source = sample.refusal
        elif image is None:
            kinds = ", ".join(sorted({m.ext or "(none)" for m in sample.members}))
            source = ImageError("not_an_image", f"sample {sample.key[:200]!r} has no picture, only: {kinds}")
        elif image.refusal is not None:
            source = image.refusal
        else:
            assert image.data is not None
            source = image.data
        return ArchiveItem(run, sample.key, uri, sample.position, source, extra)

    # -- outputs ---------------------------------------------------------------------------------------

    def write_outputs(self, run: FileRun, workdir: Path) -> list[str]:
        rows = run.ordered_rows()  # without their sidecars: those are read back a batch at a time
        source = printable(run.inp.uri)
        written = []
        with tempfile.NamedTemporaryFile(dir=workdir, suffix=".parquet") as tmp:
            with pq.ParquetWriter(tmp.name, TAR_ROWS, compression="zstd") as writer:
                for start in range(0, len(rows), _WRITE_BATCH):
                    batch = [run.with_sidecars(row) for row in rows[start : start + _WRITE_BATCH]]
                    out = [{"key": r["id"], "source": source, **{n: r[n] for n in TAR_ROWS.names[2:]}} for r in batch]
                    writer.write_table(pa.Table.from_pylist(out, schema=TAR_ROWS))
            run.outputs.put_file(f"{run.stem}.parquet", Path(tmp.name))
        written.append(f"{run.stem}.parquet")
        if self.webdataset:
            by_key = {row["id"]: row for row in rows}  # the caption fields; the sidecars come from the shard
            with tempfile.NamedTemporaryFile(dir=workdir, suffix=".tar") as tmp:
                self._write_shard(run, by_key, Path(tmp.name))
                run.outputs.put_file(f"{run.stem}.tar", Path(tmp.name))
            written.append(f"{run.stem}.tar")
        return written

    def final_rows(self, run: FileRun) -> list[dict[str, Any]]:
        """The rows of the shard's finished Parquet, in checkpoint shape (for --retry-failed)."""
        data = run.outputs.get_bytes(f"{run.stem}.parquet")
        if data is None:
            return []
        table = pq.read_table(io.BytesIO(data))
        return [
            {
                "id": row["key"],
                "position": position,
                "source_etag": run.inp.etag,
                **{name: row.get(name) for name in TAR_ROWS.names[2:]},
            }
            for position, row in enumerate(table.to_pylist())
        ]

    def _write_shard(self, run: FileRun, by_key: dict[str, dict[str, Any]], target: Path) -> None:
        """The input shard again, sample by sample, with the caption as ``key.txt`` and in ``key.json``.
        Refused members (links, climbing names, oversized) are not copied: a training reader must never
        meet them."""
        now = time.time()
        written: set[str] = set()
        with self.reader.open(run.inp) as stream, tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as out:
            limit = self.max_bytes  # sidecars too are copied whole, up to the images' limit
            for sample in iter_samples(stream, max_bytes=limit, report=TarReport(), sidecar_max_bytes=limit):
                row = by_key.get(sample.key)
                if row is None or sample.key in written or not safe_name(sample.key) or sample.key_escaped:
                    continue  # an escaped key is not the sample's name: its caption would pair with nothing
                written.add(sample.key)
                original_txt = None
                original_json = None
                for member in sample.members:
                    if member.refusal is not None or member.data is None:
                        continue
                    if member.ext == "txt":
                        original_txt = member.data.decode("utf-8", errors="replace")
                        continue
                    if member.ext == "json":
                        original_json = member.data
                        continue
                    _add(out, member.name, member.data, now)
                folder = sample.key
                if row["caption"] is not None:
                    _add(out, f"{folder}.txt", row["caption"].encode("utf-8"), now)
                _add(out, f"{folder}.json", _merged_json(original_json, original_txt, row), now)


def _add(out: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    out.addfile(info, io.BytesIO(data))


def _merged_json(original: bytes | None, original_txt: str | None, row: dict[str, Any]) -> bytes:
    """The sample's own JSON object with the caption fields added (a non-object is kept under
    ``original``), and its old ``key.txt`` as ``original_txt``."""
    merged: dict[str, Any] = {}
    if original is not None:
        try:
            value = json.loads(original)
        except ValueError:
            value = original.decode("utf-8", errors="replace")
        merged = value if isinstance(value, dict) else {"original": value}
    if original_txt is not None:
        merged["original_txt"] = original_txt
    merged.update({name: row[name] for name in CAPTION_FIELDS.names})
    return json.dumps(merged, ensure_ascii=False).encode("utf-8")
