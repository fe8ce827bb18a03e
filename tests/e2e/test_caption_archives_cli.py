"""`captionfleet caption` on archives through the real console entry in a subprocess: a brace range of tar
shards into a folder (exit 3 for the hostile members' rows), and bad input refused with exit 2, one
clear line and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.unit.test_archive_tar import latin1_shard
from tests.webdataset_shards import good_samples, hostile_shard, shard


def caption(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "captionfleet.cli", "caption", *map(str, args), "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_a_range_of_shards_is_captioned_into_a_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data, expected = hostile_shard(50 * 1024 * 1024)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(data)
    members, more = good_samples("k", 3)
    (tmp_path / "shards" / "001.tar").write_bytes(shard(members))
    done = caption(tmp_path / "shards" / "{000..001}.tar", "--out", tmp_path / "out", "--model", tiny_checkpoint)
    assert done.returncode == 3, done.stderr  # finished, with failure rows
    assert "2 input files listed, 2 in this shard" in done.stdout
    rows = pq.read_table(tmp_path / "out" / "000.parquet").to_pylist()
    assert {row["key"]: row["error_kind"] for row in rows} == expected
    assert {row["key"] for row in pq.read_table(tmp_path / "out" / "001.parquet").to_pylist()} == set(more)


def test_bad_archive_input_is_one_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(shard(good_samples("k", 1)[0]))
    missing = caption(tmp_path / "shards" / "{000..003}.tar", "--out", tmp_path / "out", "--model", tiny_checkpoint)
    assert (
        missing.returncode == 2
        and "3 of the 4 files named" in missing.stderr
        and "nothing was written" in missing.stderr
    )
    (tmp_path / "m.csv").write_text("link\nfile:///x.jpg\n")
    no_column = caption(tmp_path / "m.csv", "--out", tmp_path / "out", "--model", tiny_checkpoint)
    assert no_column.returncode == 2 and "--uri-column" in no_column.stderr
    flag = caption(tmp_path / "shards" / "000.tar", "--out", tmp_path / "out", "--suffix", ".jpg")
    assert flag.returncode == 2 and "not archives" in flag.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_a_member_name_that_is_not_utf8_is_a_failure_row_not_a_usage_error(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # Exit 2 fails the whole Indexed Job: a name in one shard must not, on every index and every rerun.
    (tmp_path / "00000.tar").write_bytes(latin1_shard())
    done = caption(tmp_path / "00000.tar", "--out", tmp_path / "out", "--model", tiny_checkpoint)
    assert done.returncode == 3, done.stderr
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [(row["key"], row["error_kind"]) for row in rows] == [
        ("good", None),
        ("caf\\xe9", "malformed"),
        ("tail", None),
    ]
