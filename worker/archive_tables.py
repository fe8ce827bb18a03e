"""Tabular inputs of an archive job: manifests of image uris (Parquet, CSV, JSONL, as img2dataset writes
them) and Parquet datasets with the images inside (Hugging Face's image column: a struct of ``bytes`` and
``path``). Each row is one item, its id the row's number in the file; the output is the file's own rows,
every column kept, with the caption fields added: one output row per input row, in order.

Manifest uris are fetched ahead of the model in a pool of their own, under the stream's allow-list
(``WORKER_FETCH__*``: buckets, the file root, http hosts) through worker/fetch.py and its httpx client.
In the output, an image column keeps its ``path`` only (the bytes are the dataset's, not repeated), and an
input column named like a caption field is kept as ``original_<name>``.

A row may carry its prompt (``--prompt-column``, default ``prompt`` when the file has one and the model
takes prompts): a cell that is empty or null is the job's prompt, else the family's default; a cell that is
not a prompt (``core/prompt_input.py``) makes that row a ``malformed`` failure, the others go on.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections import deque
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from captionfleet.core.failures import MALFORMED, FetchError, ImageError
from captionfleet.core.prompt_input import PromptRefused, check_prompt
from captionfleet.worker.archive_files import ArchiveItem, FileRun
from captionfleet.worker.archive_rows import CAPTION_FIELDS, rename_clashes, with_added_fields
from captionfleet.worker.connectors.archive_inputs import InputError, InputReader, InputReadError
from captionfleet.worker.fetch import Fetcher

logger = logging.getLogger(__name__)

BATCH_ROWS = 1024
# Images inside Parquet are read one row group at a time, only their column: Arrow's reader decodes a row
# group's column whole whatever the batch size asked. A row group whose images are larger than this (by
# the file's metadata) is not read: its rows are too_large, and the message says to write smaller ones.
# Arrow holds about twice a row group while reading it; Hugging Face writes image datasets 100 rows a group.
ROW_GROUP_IMAGE_MAX_BYTES = 512 << 20
DEFAULT_URI_COLUMNS = ("url", "uri")
DEFAULT_PROMPT_COLUMN = "prompt"
# What a damaged or unreadable table raises while it is read: the file is reported, the run goes on.
_TABLE_ERRORS = (pa.ArrowException, OSError, ValueError)


def open_batches(
    path: Path, columns: list[str] | None = None, batch_size: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """The file's rows in record batches, by its suffix; CSV columns are read as text (types guessed from
    a first block would refuse a later row). ``columns`` (Parquet only; ``a.b`` a struct's field): only those."""
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)
    elif lower.endswith(".csv"):
        names = pacsv.open_csv(path).schema.names
        types = {name: pa.string() for name in names}
        yield from pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    else:
        yield from pajson.open_json(path)


def schema_of(path: Path) -> pa.Schema:
    if path.name.lower().endswith(".parquet"):
        return pq.read_schema(path)
    for batch in open_batches(path):
        return batch.schema
    return pa.schema([])


def _column_bytes(group: pq.RowGroupMetaData, column: str) -> int:
    """The uncompressed bytes of a top-level column (every leaf of a struct) in one row group."""
    chunks = (group.column(c) for c in range(group.num_columns))
    return sum(chunk.total_uncompressed_size for chunk in chunks if chunk.path_in_schema.split(".")[0] == column)


def output_columns(schema: pa.Schema, column: str) -> list[str]:
    """Every column but the image's bytes (its ``path`` kept, when it has one): what the output needs."""
    names = []
    for name in schema.names:
        if name != column:
            names.append(name)
            continue
        kind = schema.field(name).type
        if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
            names.append(f"{name}.path")
    return names


def image_column_kind(schema: pa.Schema, column: str) -> str | None:
    """ "struct" (Hugging Face: bytes and path), "binary" (raw bytes), or None when not an image column."""
    if column not in schema.names:
        return None
    kind = schema.field(column).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "binary"
    return None


class TableRows:
    """One kind of tabular input, ``manifest`` or ``parquet-images`` (``parquet`` decides per file by its
    columns: an image column makes it a dataset of images, else it is a manifest)."""

    def __init__(
        self,
        kind: str,
        reader: InputReader,
        fetcher: Fetcher | None,
        workdir: Path,
        *,
        uri_column: str | None,
        image_column: str,
        fetch_concurrency: int,
        prompt_column: str | None = None,
        default_prompt_column: bool = True,
        max_bytes: int = 0,
    ) -> None:
        """``prompt_column``: the column of per-row prompts (named by the user: a file without it is refused);
        None: ``prompt`` when the file has one and ``default_prompt_column`` (the model takes prompts)."""
        self.kind = kind
        self.max_bytes = max_bytes  # images inside Parquet: a longer value is too_large, never copied
        self.reader = reader
        self.fetcher = fetcher
        self.workdir = workdir
        self.uri_column = uri_column
        self.image_column = image_column
        self.prompt_column = prompt_column
        self.default_prompt_column = default_prompt_column
        self.fetch_concurrency = fetch_concurrency
        self.name = kind

    # -- which columns -------------------------------------------------------------------------------

    def _local(self, run: FileRun) -> Path:
        if run.local_path is None:
            folder = Path(tempfile.mkdtemp(dir=self.workdir))
            run.local_path = self.reader.to_local(run.inp, folder)
        return run.local_path

    def _columns(self, run: FileRun, schema: pa.Schema) -> tuple[str, str]:
        """("images", column) or ("uris", column) for this file; InputError naming the flag otherwise."""
        images = image_column_kind(schema, self.image_column)
        if self.kind in ("parquet-images", "parquet") and images is not None:
            return "images", self.image_column
        if self.kind == "parquet-images":
            what = f"is {schema.field(self.image_column).type}" if self.image_column in schema.names else "is missing"
            raise InputError(
                f"{run.inp.uri}: the image column {self.image_column!r} {what}: images inside Parquet are a column of "
                "bytes or a struct of bytes/path; name it with --image-column"
            )
        wanted = [self.uri_column] if self.uri_column else list(DEFAULT_URI_COLUMNS)
        for name in wanted:
            if name in schema.names:
                return "uris", name
        raise InputError(
            f"{run.inp.uri}: no {' or '.join(repr(n) for n in wanted)} column of image uris (columns: "
            f"{', '.join(schema.names[:20])}): name it with --uri-column"
            + ("" if self.kind == "manifest" else ", or the image column with --image-column")
        )

    def _prompt_column(self, run: FileRun, schema: pa.Schema) -> str | None:
        """The column of per-row prompts, if any; InputError naming the flag when a named one is missing."""
        if self.prompt_column is not None:
            if self.prompt_column not in schema.names:
                raise InputError(
                    f"{run.inp.uri}: no prompt column {self.prompt_column!r} (columns: "
                    f"{', '.join(schema.names[:20])}): fix --prompt-column, or leave it out to use a 'prompt' column "
                    "when there is one"
                )
            return self.prompt_column
        if DEFAULT_PROMPT_COLUMN in schema.names:
            if self.default_prompt_column:
                return DEFAULT_PROMPT_COLUMN
            logger.warning(
                "%s has a %r column, but the model takes no prompt: the column is kept in the output, not used",
                run.inp.uri,
                DEFAULT_PROMPT_COLUMN,
            )
        return None

    # -- items ---------------------------------------------------------------------------------------

    def items(self, run: FileRun) -> Iterator[ArchiveItem]:
        path = self._local(run)
        try:
            schema = schema_of(path)
        except _TABLE_ERRORS as error:
            run.source_done(0, f"not a readable table: {error}")
            return
        how, column = self._columns(run, schema)
        prompts = self._prompt_column(run, schema)
        run.format_name = "parquet-images" if how == "images" else "manifest"
        if how == "images":
            yield from self._image_rows(run, path, column, prompts)
        else:
            yield from self._uri_rows(run, path, column, prompts)

    def _positions(self, run: FileRun, path: Path, column: str, prompts: str | None) -> Iterator[tuple[int, Any, Any]]:
        """(row number, the column's value, the prompt column's value or None) of every row (a manifest's uris;
        of a Parquet one only those columns are read), reporting a table that breaks off."""
        position = 0
        try:
            for batch in open_batches(path, [column] if prompts is None else [column, prompts]):
                values = batch.column(batch.schema.get_field_index(column)).to_pylist()
                if prompts is None:
                    cells: list[Any] = [None] * len(values)
                else:
                    cells = batch.column(batch.schema.get_field_index(prompts)).to_pylist()
                for value, cell in zip(values, cells, strict=True):
                    yield position, value, cell
                    position += 1
        except _TABLE_ERRORS as error:
            run.broken = f"unreadable after row {position}: {error}"

    @staticmethod
    def _row_prompt(position: int, cell: Any, column: str | None) -> str | FetchError | None:
        """The row's prompt (None: the job's or the family's), or the refusal that fails this row alone."""
        try:
            return check_prompt(cell, field=f"the prompt column {column!r}")
        except PromptRefused as refused:
            return FetchError(MALFORMED, f"row {position}: {refused}")

    def _image_rows(self, run: FileRun, path: Path, column: str, prompts: str | None) -> Iterator[ArchiveItem]:
        yielded = 0
        for position, data, name, cell in self._images(run, path, column, prompts):
            item_id = str(position)
            if run.has_row(item_id):
                continue
            prompt = self._row_prompt(position, cell, prompts)
            source: bytes | BaseException
            if isinstance(prompt, FetchError):  # the row's prompt is refused: it fails alone
                source, prompt = prompt, None
            elif isinstance(data, BaseException) or data:  # a refusal, or the bytes
                source = data
            elif data is None and name:
                source = ImageError("empty", f"row {position} has no image bytes, only the path {name!r}")
            else:
                source = ImageError("empty", f"row {position}: the image column {column!r} is empty")
            uri = f"{run.inp.uri}#row={position}"
            yielded += 1
            yield ArchiveItem(run, item_id, uri, position, source, {"image_member": name}, prompt=prompt)
        run.source_done(yielded, run.broken)

    def _images(
        self, run: FileRun, path: Path, column: str, prompts: str | None
    ) -> Iterator[tuple[int, bytes | BaseException | None, str | None, Any]]:
        """(row number, its image's bytes or why not, its path, its prompt cell) of every row: only the image
        (and prompt) column is read, a row group at a time, and a value over the limit is refused by its
        length, never copied."""
        position = 0
        try:
            file = pq.ParquetFile(path)
            for group in range(file.num_row_groups):
                size = _column_bytes(file.metadata.row_group(group), column)
                if size > ROW_GROUP_IMAGE_MAX_BYTES:
                    why = (
                        f"row group {group} holds {size} bytes of images (over {ROW_GROUP_IMAGE_MAX_BYTES}): not read; "
                        "write the file with smaller row groups (pyarrow's row_group_size)"
                    )
                    names = self._paths(file, group, column)
                    for name in names:
                        yield position, ImageError("too_large", why), name, None
                        position += 1
                    continue
                columns = [column] if prompts is None else [column, prompts]
                for batch in file.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns):
                    cells: list[Any] = [None] * batch.num_rows if prompts is None else batch.column(1).to_pylist()
                    for (data, name), cell in zip(self._values(batch.column(0)), cells, strict=True):
                        yield position, data, name, cell
                        position += 1
        except _TABLE_ERRORS as error:
            run.broken = f"unreadable after row {position}: {error}"

    def _values(self, values: pa.Array) -> Iterator[tuple[bytes | BaseException | None, str | None]]:
        """Each row's bytes (copied one at a time) or its refusal, and its path."""
        names: list[Any] = [None] * len(values)
        if pa.types.is_struct(values.type):
            if values.type.get_field_index("path") >= 0:
                names = pc.struct_field(values, "path").to_pylist()
            values = pc.struct_field(values, "bytes")
        for i, length in enumerate(pc.binary_length(values).to_pylist()):
            if self.max_bytes and length is not None and length > self.max_bytes:
                why = f"{length} bytes exceeds the limit of {self.max_bytes} bytes (WORKER_IMAGES__MAX_BYTES)"
                yield ImageError("too_large", why), names[i]
            else:
                yield values[i].as_py(), names[i]

    def _paths(self, file: pq.ParquetFile, group: int, column: str) -> list[Any]:
        """The paths of a row group's images (None each when the column has none), without their bytes."""
        kind = file.schema_arrow.field(column).type
        if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
            table = file.read_row_group(group, columns=[f"{column}.path"])
            paths: list[Any] = pc.struct_field(table.column(0).combine_chunks(), "path").to_pylist()
            return paths
        return [None] * file.metadata.row_group(group).num_rows

    def _uri_rows(self, run: FileRun, path: Path, column: str, prompts: str | None) -> Iterator[ArchiveItem]:
        """Rows with their uris fetched ahead in a pool (latency, not CPU), at most twice the pool's size."""
        ahead: deque[ArchiveItem] = deque()
        yielded = 0
        with ThreadPoolExecutor(self.fetch_concurrency, thread_name_prefix="manifest-fetch") as pool:
            try:
                for position, value, cell in self._positions(run, path, column, prompts):
                    item_id = str(position)
                    if run.has_row(item_id):
                        continue
                    prompt = self._row_prompt(position, cell, prompts)
                    if isinstance(prompt, FetchError):  # refused before any fetch
                        ahead.append(ArchiveItem(run, item_id, self._row_uri(run, position, value), position, prompt))
                    else:
                        ahead.append(self._uri_item(run, pool, position, value, column, prompt))
                    yielded += 1
                    while len(ahead) >= 2 * self.fetch_concurrency:
                        yield ahead.popleft()
                while ahead:
                    yield ahead.popleft()
            finally:
                for item in ahead:  # the run stopped early: fetches nobody will read
                    item.cancel()
        run.source_done(yielded, run.broken)

    @staticmethod
    def _row_uri(run: FileRun, position: int, value: Any) -> str:
        """The row's uri as its result names it (the row's place in the file when it has none)."""
        uri = str(value).strip() if value is not None else ""
        return uri or f"{run.inp.uri}#row={position}"

    def _uri_item(
        self, run: FileRun, pool: ThreadPoolExecutor, position: int, value: Any, column: str, prompt: str | None
    ) -> ArchiveItem:
        uri = str(value).strip() if value is not None else ""
        if not uri:
            refusal = FetchError(MALFORMED, f"row {position} has no uri in column {column!r}")
            return ArchiveItem(run, str(position), f"{run.inp.uri}#row={position}", position, refusal, prompt=prompt)
        if self.fetcher is None:
            raise InputError("no fetcher for manifest uris")  # wiring error: the job always makes one
        fetcher = self.fetcher
        try:
            fetcher.check(uri)  # refused before any I/O, and without a slot in the pool
        except FetchError as error:
            return ArchiveItem(run, str(position), uri, position, error, prompt=prompt)
        future: Future[bytes] = pool.submit(fetcher.fetch, uri)
        return ArchiveItem(run, str(position), uri, position, future.result, cancel=future.cancel, prompt=prompt)

    # -- outputs -------------------------------------------------------------------------------------

    def write_outputs(self, run: FileRun, workdir: Path) -> list[str]:
        """The input's rows, in order, with the caption fields; nothing when the table could not be read
        to its end (the marker reports it, and a row-for-row output cannot be made)."""
        if run.broken:
            return []
        path = self._local(run)
        self.reader.check_unchanged(run.inp)  # a local input is read again here: the same rows, or unfinished
        results = {int(row["position"]): row for row in run.ordered_rows()}
        name = f"{run.stem}.parquet"
        images = run.format_name == "parquet-images"
        # The images' bytes stay in the dataset: not read again for an output that leaves them out.
        columns = output_columns(pq.read_schema(path), self.image_column) if images else None
        with tempfile.NamedTemporaryFile(dir=workdir, suffix=".parquet") as tmp:
            writer: pq.ParquetWriter | None = None
            position = 0
            for batch in open_batches(path, columns):
                table = self._with_captions(pa.Table.from_batches([batch]), results, position, images=images)
                position += batch.num_rows
                if writer is None:
                    writer = pq.ParquetWriter(tmp.name, table.schema, compression="zstd")
                writer.write_table(table.cast(writer.schema))
            if writer is None:  # an empty file: an empty output with the caption columns
                pq.write_table(pa.Table.from_pylist([], schema=CAPTION_FIELDS), tmp.name)
            else:
                writer.close()
            run.outputs.put_file(name, Path(tmp.name))
        return [name]

    def _with_captions(
        self, table: pa.Table, results: dict[int, dict[str, Any]], start: int, *, images: bool
    ) -> pa.Table:
        if images and self.image_column in table.column_names:  # its path (when it has one) comes along
            column = self.image_column
            kind = table.schema.field(column).type
            index = table.schema.get_field_index(column)
            if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
                table = table.set_column(index, f"{column}_path", pc.struct_field(table.column(column), "path"))
            else:
                table = table.remove_column(index)
        renames = rename_clashes(table.column_names)
        if renames:
            table = table.rename_columns([renames.get(name, name) for name in table.column_names])
        rows = [results.get(start + i, {}) for i in range(table.num_rows)]
        for field in CAPTION_FIELDS:
            table = table.append_column(field, pa.array([row.get(field.name) for row in rows], type=field.type))
        return table

    def final_rows(self, run: FileRun) -> list[dict[str, Any]]:
        data = run.outputs.get_bytes(f"{run.stem}.parquet")
        if data is None:
            return []
        table = pq.read_table(io.BytesIO(data))
        try:  # the input is read next anyway (its rows to redo): the copy of an S3 one is kept for that
            input_columns: Collection[str] = schema_of(self._local(run)).names
        except (*_TABLE_ERRORS, InputReadError):  # reading its rows reports it; here the columns are unknown:
            input_columns = CAPTION_FIELDS.names  # no column of the output is taken for one added later
        table = with_added_fields(table, CAPTION_FIELDS, input_columns).select(CAPTION_FIELDS.names)
        return [
            {"id": str(i), "position": i, "source_etag": run.inp.etag, **row} for i, row in enumerate(table.to_pylist())
        ]
