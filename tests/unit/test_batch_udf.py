"""The batch callable as Spark's mapInPandas (or any pandas caller) sees it: a DataFrame in, the same
rows with the caption fields out; uris fetched under the allow-list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from captionfleet.worker.batch_udf import BatchCaptioner
from tests.hostile_images import jpeg_bytes
from tests.unit.test_s3_retry import FakeCaptioner


def test_a_pandas_batch_gets_a_row_each_in_order(monkeypatch: Any) -> None:
    model: Any = FakeCaptioner()
    udf = BatchCaptioner(captioner=model, batch_size=2)
    frame = pd.DataFrame({"image": [jpeg_bytes(), b"", b"not an image at all"], "id": ["a", "b", "c"]})
    out = udf(frame)
    assert list(out["id"]) == ["a", "b", "c"]
    assert list(out["error_kind"]) == [None, "empty", "not_an_image"]
    assert out["caption"][0].startswith("red ") and set(out["model_version"]) == {"fake-1"}
    # The caption's confidence, as the other outputs carry it (FakeCaptioner: -1.0 over 2 tokens).
    assert list(out["mean_logprob"]) == [-1.0, None, None] and list(out["tokens"]) == [2, None, None]


def test_uris_are_fetched_under_the_allow_list(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    monkeypatch.setenv("WORKER_FETCH__FILE_ROOT", str(tmp_path))
    model: Any = FakeCaptioner()
    udf = BatchCaptioner(captioner=model, uri_column="url")
    batch = {"url": [(tmp_path / "a.jpg").as_uri(), "file:///etc/passwd", None]}
    out = udf(batch)
    assert list(out["error_kind"]) == [None, "forbidden", "malformed"]
    assert list(out["tokens"]) == [2, None, None]


def test_an_input_caption_column_is_kept_as_original_caption() -> None:
    model: Any = FakeCaptioner()
    udf = BatchCaptioner(captioner=model)
    frame = pd.DataFrame({"image": [jpeg_bytes()], "caption": ["the alt text"], "error_kind": ["x"]})
    out = udf(frame)
    assert list(out["original_caption"]) == ["the alt text"] and out["caption"][0].startswith("red ")
    assert list(out["original_error_kind"]) == ["x"] and list(out["error_kind"]) == [None]
    assert list(frame.columns) == ["image", "caption", "error_kind"]  # the caller's frame is left alone
    batch = {"image": [jpeg_bytes()], "caption": ["alt"], "original_caption": ["older"]}
    numpy_out = udf(batch)
    assert list(numpy_out["original_original_caption"]) == ["alt"] and list(numpy_out["original_caption"]) == ["older"]
    assert numpy_out["caption"][0].startswith("red ")
