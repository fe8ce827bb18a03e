"""The rows an archive job writes: the caption fields added beside the data, and the checkpoint parts that
let a killed run resume an input file per key.

A checkpoint part (``<name>.partial/part-<seq>-<run>.parquet``) holds the rows finished so far for one
input file, written whole every ``WORKER_BULK__ROWS_PER_PART`` rows or ``PART_INTERVAL_S`` seconds; the
file's final outputs are built from them and they are deleted once its completion marker is written.
"""

from __future__ import annotations

import io
from collections.abc import Collection
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from captionfleet.worker.messages import Result

# What every output row gains: the caption or the failure, and which model said so.
CAPTION_FIELDS = pa.schema(
    [
        ("caption", pa.string()),
        # The caption's confidence, as the other outputs carry it (worker/messages.py Result.mean_logprob).
        ("mean_logprob", pa.float64()),
        ("tokens", pa.int64()),
        ("prompt", pa.string()),  # the prompt the caption answers (see worker/messages.py Result.prompt)
        ("error_kind", pa.string()),
        ("error_message", pa.string()),
        ("model_version", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("inference_ms", pa.float64()),
    ]
)

# Checkpoint rows: the item (id, its position in the input file, the input's ETag when read), what a tar
# sample carries into its output row, and the caption fields.
CHECKPOINT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("position", pa.int64()),
        ("source_etag", pa.string()),
        ("image_member", pa.string()),
        ("txt", pa.string()),
        ("json", pa.string()),
        *CAPTION_FIELDS,
    ]
)


# Caption fields added after archive outputs were first written: an output or checkpoint written before
# reads them as nulls (a run resumes it, --retry-failed reads it), instead of being refused.
ADDED_LATER = frozenset({"prompt", "mean_logprob", "tokens"})


def with_added_fields(table: pa.Table, schema: pa.Schema, input_columns: Collection[str] = ()) -> pa.Table:
    """``table`` with null columns for the ADDED_LATER fields of ``schema`` it was written without.

    An output of an input with its own column of such a name (``input_columns``) holds ours only beside
    ``original_<name>``: written before the field was added, the column is the input's, kept as it was
    (its values are no caption's, and may not even be of the field's type), and reads as nulls."""
    for field in schema:
        if field.name not in ADDED_LATER:
            continue
        nulls = pa.nulls(table.num_rows, field.type)
        if field.name not in table.column_names:
            table = table.append_column(field, nulls)
        elif field.name in input_columns and f"original_{field.name}" not in table.column_names:
            table = table.set_column(table.column_names.index(field.name), field, nulls)
    return table


def caption_fields(result: Result) -> dict[str, Any]:
    return {
        "caption": result.caption,
        "mean_logprob": result.mean_logprob,
        "tokens": result.tokens,
        "prompt": result.prompt,
        "error_kind": result.error_kind,
        "error_message": result.error_message,
        "model_version": result.model_version,
        "width": result.width,
        "height": result.height,
        "inference_ms": result.inference_ms,
    }


def encode_checkpoint(rows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def decode_checkpoint(data: bytes) -> list[dict[str, Any]]:
    table = with_added_fields(pq.read_table(io.BytesIO(data)), CHECKPOINT_SCHEMA)
    missing = [name for name in CHECKPOINT_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"not a checkpoint part (no {', '.join(missing)} columns)")
    rows: list[dict[str, Any]] = table.select(CHECKPOINT_SCHEMA.names).to_pylist()
    return rows


def rename_clashes(names: list[str]) -> dict[str, str]:
    """Input columns named like a caption field (img2dataset's manifests have ``caption``) keep their
    values as ``original_<name>``: the output has both."""
    ours = set(CAPTION_FIELDS.names)
    return {name: f"original_{name}" for name in names if name in ours}
