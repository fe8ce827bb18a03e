from pathlib import Path

import pytest

from captionfleet.worker.messages import Result
from captionfleet.worker.sinks import JsonlSink, ParquetSink, open_file_sink, read_rows


def results(ids: range) -> list[Result]:
    return [Result(id=f"img{i}", uri=f"file:///x/{i}", model_version="v1", caption=f"c{i}") for i in ids]


def test_parquet_parts_survive_a_crash_and_merge_once(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first = ParquetSink(out, rows_per_part=3)
    first.write(results(range(3)))  # a whole part written
    first.write(results(range(3, 6)))  # another
    first.write(results(range(6, 7)))  # pending, not yet durable
    # ... the process dies here: no flush, no close.
    assert not out.exists()
    second = ParquetSink(out, rows_per_part=3)
    assert second.done_ids() == {f"img{i}" for i in range(6)}  # the pending row is redone
    second.write(results(range(6, 9)))
    second.close()
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"img{i}" for i in range(9)]
    assert not (tmp_path / "out.parquet.parts").exists()


def test_parquet_resume_appends_to_a_finished_file(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    sink = ParquetSink(out)
    sink.write(results(range(2)))
    sink.close()
    again = ParquetSink(out)
    assert again.done_ids() == {"img0", "img1"}
    again.write(results(range(2, 4)))
    again.close()
    assert [r["id"] for r in read_rows(out)] == ["img0", "img1", "img2", "img3"]


def test_parquet_merge_keeps_one_row_per_id(tmp_path: Path) -> None:
    """A crash between writing OUT and removing its parts must not duplicate rows."""
    out = tmp_path / "out.parquet"
    sink = ParquetSink(out, rows_per_part=2)
    sink.write(results(range(4)))
    sink.flush()
    parts = sorted((tmp_path / "out.parquet.parts").glob("*.parquet"))
    saved = [p.read_bytes() for p in parts]
    sink.close()
    (tmp_path / "out.parquet.parts").mkdir()
    for i, data in enumerate(saved):  # the parts "survived" the merge
        (tmp_path / "out.parquet.parts" / f"part-{i:05d}.parquet").write_bytes(data)
    ParquetSink(out).close()
    assert sorted(r["id"] for r in read_rows(out)) == [f"img{i}" for i in range(4)]


def test_metadata_round_trips(tmp_path: Path) -> None:
    for name in ("m.parquet", "m.jsonl"):
        sink = open_file_sink(tmp_path / name)
        row = Result(id="a", uri="u", model_version="v", caption="c", metadata={"user": 7, "tags": ["x"]})
        sink.write([row])
        sink.close()
        assert read_rows(tmp_path / name)[0]["metadata"] == {"user": 7, "tags": ["x"]}


def test_jsonl_overwrite_and_torn_tail(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    sink = JsonlSink(out)
    sink.write(results(range(3)))
    sink.close()
    out.write_bytes(out.read_bytes()[:-7])  # torn last line
    assert JsonlSink(out).done_ids() == {"img0", "img1"}
    assert JsonlSink(out, overwrite=True).done_ids() == set()


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.parquet or \.jsonl"):
        open_file_sink(tmp_path / "o.csv")


def test_rows_carry_confidence_and_prompt_and_a_file_written_before_those_columns_still_merges(
    tmp_path: Path,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out.parquet"
    # A finished file from before mean_logprob, tokens and prompt existed, then a resumed run that writes them.
    old_rows = [{"id": "old0", "uri": "file:///x/old0", "model_version": "v0", "caption": "c", "metadata": "{}"}]
    pq.write_table(pa.Table.from_pylist(old_rows), out)
    sink = ParquetSink(out)
    assert sink.done_ids() == {"old0"}
    new = Result(id="new0", uri="file:///x/new0", model_version="v1", caption="c", mean_logprob=-0.5, tokens=3)
    new.prompt = "a photo of"
    sink.write([new])
    sink.close()
    rows = {row["id"]: row for row in read_rows(out)}
    assert (rows["old0"]["mean_logprob"], rows["old0"]["tokens"], rows["old0"]["prompt"]) == (None, None, None)
    assert (rows["new0"]["mean_logprob"], rows["new0"]["tokens"], rows["new0"]["prompt"]) == (-0.5, 3, "a photo of")
    jsonl = JsonlSink(tmp_path / "out.jsonl")
    jsonl.write([Result(id="j", uri="u", model_version="v1", caption="c", mean_logprob=-1.25, tokens=2, prompt="p")])
    jsonl.close()
    row = read_rows(tmp_path / "out.jsonl")[0]
    assert (row["mean_logprob"], row["tokens"], row["prompt"]) == (-1.25, 2, "p")
