"""Sharding: stable across processes and machines, complete and disjoint, configured without surprises."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from captionfleet.core.settings import SettingsError, ShardSettings, load_kubernetes_job_env, load_worker_settings
from captionfleet.worker.sharding import ShardSpec, resolve_shard, shard_of

KEYS = [f"archive/{i % 7}/{i // 7:05d}.jpg" for i in range(3000)] + ["ünïcödé/фото.png", "a b?c#d.jpg", ""]


def test_the_hash_is_pinned() -> None:
    # Pinned values: a change here would move keys between shards and break resuming old outputs.
    assert [shard_of(k, 3) for k in ("a.jpg", "archive/2024/01/img-000001.jpg", "ünïcödé/фото.png", "")] == [0, 2, 0, 0]
    assert [shard_of(k, 1000) for k in ("a.jpg", "archive/2024/01/img-000001.jpg", "ünïcödé/фото.png", "")] == [
        449,
        116,
        628,
        876,
    ]


def test_the_hash_does_not_depend_on_the_process() -> None:
    code = "from captionfleet.worker.sharding import shard_of; print([shard_of(f'k{i}', 7) for i in range(50)])"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            cwd=Path(__file__).resolve().parents[2],
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {str([shard_of(f"k{i}", 7) for i in range(50)]) + "\n"}


@pytest.mark.parametrize("total", [1, 2, 3, 7, 16])
def test_shards_cover_every_key_exactly_once(total: int) -> None:
    owners: Counter[int] = Counter()
    for key in KEYS:
        owning = [i for i in range(total) if ShardSpec(i, total).owns(key)]
        assert len(owning) == 1, key
        owners[owning[0]] += 1
    assert sum(owners.values()) == len(KEYS)
    # Balanced enough that no worker gets a multiple of another's share.
    if total > 1:
        mean = len(KEYS) / total
        assert all(0.8 * mean < owners[i] < 1.2 * mean for i in range(total)), owners


def test_parse_and_name() -> None:
    assert ShardSpec.parse("2/5") == ShardSpec(2, 5)
    assert ShardSpec.parse(" 0 / 1 ") == ShardSpec(0, 1)
    assert ShardSpec(3, 12).name == "shard-00003-of-00012"
    assert str(ShardSpec(3, 12)) == "3/12"


@pytest.mark.parametrize(
    ("text", "needle"),
    [("3/3", "numbered from 0"), ("1-3", "i/N"), ("a/b", "i/N"), ("0/0", "at least 1"), ("", "i/N")],
)
def test_bad_shards_name_the_fix(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ShardSpec.parse(text)


def test_flag_wins_then_settings_then_the_indexed_job() -> None:
    assert resolve_shard("1/4", ShardSettings(index=0, total=2), 3) == ShardSpec(1, 4)
    assert resolve_shard(None, ShardSettings(index=0, total=2), 1) == ShardSpec(0, 2)
    assert resolve_shard(None, ShardSettings(total=8), 5) == ShardSpec(5, 8)
    assert resolve_shard(None, ShardSettings(), None) == ShardSpec(0, 1)


@pytest.mark.parametrize(
    ("flag", "settings", "job_index", "needle"),
    [
        (None, ShardSettings(), 3, "JOB_COMPLETION_INDEX=3 is set but WORKER_SHARD__TOTAL is not"),
        (None, ShardSettings(index=1), None, "WORKER_SHARD__TOTAL is not"),
        (None, ShardSettings(total=4), None, "set WORKER_SHARD__INDEX"),
        (None, ShardSettings(total=4), 4, "JOB_COMPLETION_INDEX=4"),
        ("9/4", ShardSettings(), None, "numbered from 0"),
    ],
)
def test_half_a_shard_is_an_error_naming_the_variable(
    flag: str | None, settings: ShardSettings, job_index: int | None, needle: str
) -> None:
    with pytest.raises(SettingsError, match=needle):
        resolve_shard(flag, settings, job_index)


def test_kubernetes_indexed_job_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("WORKER_SHARD__TOTAL", "6")
    shard = resolve_shard(None, load_worker_settings().shard, load_kubernetes_job_env().job_completion_index)
    assert shard == ShardSpec(2, 6)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "two")
    with pytest.raises(SettingsError, match="JOB_COMPLETION_INDEX"):
        load_kubernetes_job_env()
