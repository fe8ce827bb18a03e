"""The captioner as a callable over column batches, for engines that own the data loop: Ray Data's
``map_batches`` (an actor per model copy) and Spark's ``mapInPandas``.

    import ray
    from captionfleet.worker.batch_udf import BatchCaptioner

    ds = ray.data.read_parquet("s3://bucket/dataset/")          # e.g. a Hugging Face image dataset
    ds = ds.map_batches(BatchCaptioner, fn_constructor_kwargs={"model": "s3://bucket/models/captioner/LATEST"},
                        batch_size=32, concurrency=4)            # num_gpus=1 for a GPU per actor
    ds.write_parquet("s3://bucket/captioned/")

Each batch goes through the same pipeline as the bulk jobs (decoding each image on its own under the
hostile-image rules, dynamic batching, a model failure isolated to its image), so every row gets
``caption`` (with its ``mean_logprob`` and ``tokens``) or a failure ``error_kind`` from core/failures.py, with
``error_message`` and the ``model_version`` that answered (an input column so named is kept as
``original_<name>``). Images come from ``image_column`` (bytes, or a Hugging Face struct of bytes/path) or,
with ``uri_column``, are fetched under the worker's allow-list (``WORKER_FETCH__*``).
Settings not passed here come from the ``WORKER_*`` environment of the process (the Ray worker's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.failures import MALFORMED, FetchError, ImageError
from captionfleet.core.images import ImageLimits
from captionfleet.core.loading import load_model
from captionfleet.core.settings import WorkerSettings, load_worker_settings, with_overrides
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline, Item

# The caption with its confidence (worker/messages.py Result.mean_logprob), as every other output has it.
OUTPUT_FIELDS = ("caption", "mean_logprob", "tokens", "error_kind", "error_message", "model_version")


def kept_aside(columns: list[str]) -> dict[str, str]:
    """Input columns named like an output field (a manifest's own ``caption``) keep their values as
    ``original_<name>``, as the archive job's outputs do: the output has both, nothing is overwritten."""
    taken = set(columns)
    renames = {}
    for name in OUTPUT_FIELDS:
        if name in taken:
            new = f"original_{name}"
            while new in taken:  # original_caption is taken too: original_original_caption
                new = f"original_{new}"
            renames[name] = new
            taken.add(new)
    return renames


class _Row:
    """A pipeline Item for one row of a batch."""

    __slots__ = ("_read", "id", "uri")

    def __init__(self, index: int, uri: str, read: Callable[[], bytes]) -> None:
        self.id = str(index)
        self.uri = uri
        self._read = read

    def read(self) -> bytes:
        return self._read()


class _DiscardingSink:
    """Rows are collected by position through the pipeline's callback; nothing is written anywhere."""

    def done_ids(self) -> set[str]:
        return set()

    def write(self, results: list[Result]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class BatchCaptioner:
    """Loads the model once (per Ray actor, per Spark task), then captions batch after batch."""

    def __init__(
        self,
        model: str | None = None,
        *,
        image_column: str = "image",
        uri_column: str | None = None,
        batch_size: int | None = None,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        device: str | None = None,
        captioner: CaptionModel | None = None,
    ) -> None:
        self.settings: WorkerSettings = with_overrides(
            load_worker_settings(),
            {
                "model.ref": model,
                "model.device": device,
                "batch.max_items": batch_size,
                "decoding.num_beams": num_beams,
                "decoding.max_new_tokens": max_new_tokens,
            },
        )
        self.image_column = image_column
        self.uri_column = uri_column
        self.captioner = captioner or load_model(self.settings)
        self.limits = ImageLimits.from_settings(self.settings.images)
        self.fetcher = (
            Fetcher(self.settings.fetch, s3=self.settings.s3, max_bytes=self.settings.images.max_bytes)
            if uri_column
            else None
        )

    def __call__(self, batch: Any) -> Any:
        """A dict of column arrays (Ray's numpy format) or a pandas DataFrame; the same with the caption
        fields added, one per row, in order."""
        if isinstance(batch, dict):
            rows = len(next(iter(batch.values()))) if batch else 0
            results = self.caption_values(self._values(batch, rows), rows)
            renames = kept_aside(list(batch))
            out = {renames.get(name, name): values for name, values in batch.items()}
            for name in OUTPUT_FIELDS:
                out[name] = np.array([getattr(result, name) for result in results], dtype=object)
            return out
        rows = len(batch)
        results = self.caption_values(
            self._values({name: batch[name].to_numpy() for name in batch.columns}, rows), rows
        )
        import pandas as pd  # only a pandas caller gets here; pandas 3 would turn None into NaN in a str column

        out = batch.rename(columns=kept_aside(list(batch.columns)))  # a copy
        for name in OUTPUT_FIELDS:
            out[name] = pd.Series([getattr(result, name) for result in results], dtype=object, index=out.index)
        return out

    def _values(self, columns: dict[str, Any], rows: int) -> list[Any]:
        column = self.uri_column or self.image_column
        if column not in columns:
            raise KeyError(
                f"no column {column!r} in the batch (columns: {', '.join(columns)}): pass "
                f"{'uri_column' if self.uri_column else 'image_column'} naming the images"
            )
        return list(columns[column])[:rows]

    def caption_values(self, values: list[Any], rows: int) -> list[Result]:
        """Results in the order of ``values`` (bytes, {"bytes", "path"} structs, or uris)."""
        items: list[Item] = [self._row(i, value) for i, value in enumerate(values)]
        found: list[Result | None] = [None] * rows

        def keep(item: Item, result: Result) -> None:
            found[int(item.id)] = result

        pipeline = CaptionPipeline(
            self.captioner, _DiscardingSink(), self.settings.batch, self.limits, on_item_result=keep
        )
        pipeline.run(items)
        missing = [i for i, result in enumerate(found) if result is None]
        if missing:
            raise RuntimeError(f"rows {missing[:5]} got no result")  # the pipeline answers every item
        return [result for result in found if result is not None]

    def _row(self, index: int, value: Any) -> _Row:
        if self.uri_column:
            uri = str(value).strip() if value is not None else ""
            fetcher = self.fetcher
            assert fetcher is not None

            def fetch() -> bytes:
                if not uri:
                    raise FetchError(MALFORMED, f"row {index} has no uri in column {self.uri_column!r}")
                return fetcher.fetch(uri)

            return _Row(index, uri, fetch)
        data = value.get("bytes") if isinstance(value, dict) else value
        name = value.get("path") if isinstance(value, dict) else None

        def read() -> bytes:
            if data is None or len(data) == 0:
                raise ImageError(
                    "empty", f"row {index}: no image bytes" + (f" (only the path {name!r})" if name else "")
                )
            return bytes(data)

        return _Row(index, str(name or f"row={index}"), read)
