from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captionfleet.core import threads
from captionfleet.core.settings import SettingsError, load_worker_settings


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(_cgroup(tmp_path, {"cpu.max": "150000 100000\n"})) == 1.5


def test_cgroup_v2_without_limit(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(_cgroup(tmp_path, {"cpu.max": "max 100000\n"})) is None


def test_cgroup_v1_limit_and_no_limit(tmp_path: Path) -> None:
    limited = _cgroup(tmp_path / "a", {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"})
    assert threads.cgroup_cpu_limit(limited) == 3.0
    unlimited = _cgroup(tmp_path / "b", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert threads.cgroup_cpu_limit(unlimited) is None


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_default_is_the_limit_rounded_down_within_the_usable_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 64)
    assert threads.default_threads(_cgroup(tmp_path / "a", {"cpu.max": "250000 100000"})) == 2
    assert threads.default_threads(_cgroup(tmp_path / "b", {"cpu.max": "50000 100000"})) == 1  # never 0
    assert threads.default_threads(_cgroup(tmp_path / "c", {"cpu.max": "max 100000"})) == 64
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    assert threads.default_threads(_cgroup(tmp_path / "d", {"cpu.max": "800000 100000"})) == 4


def test_apply_threads_sets_torch() -> None:
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert threads.apply_threads(0) == threads.default_threads()
        assert torch.get_num_threads() == threads.default_threads()
    finally:
        torch.set_num_threads(before)


def test_bad_thread_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODEL__THREADS", "-2")
    with pytest.raises(SettingsError, match="WORKER_MODEL__THREADS"):
        load_worker_settings()


def test_loading_a_model_applies_the_thread_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from captionfleet.core.loading import load_model as load_captioner

    before = torch.get_num_threads()
    monkeypatch.setenv("WORKER_MODEL__REF", "builtin")
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("WORKER_MODEL__THREADS", "1")
    try:
        load_captioner(load_worker_settings())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_decode_threads_on_a_gpu_are_the_cpu_limit_but_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 64)
    eight = _cgroup(tmp_path / "a", {"cpu.max": "800000 100000"})
    assert threads.decode_threads(0, on_cuda=True, root=eight) == 7  # one core left to the process's loop
    one = _cgroup(tmp_path / "b", {"cpu.max": "100000 100000"})
    assert threads.decode_threads(0, on_cuda=True, root=one) == 1  # never 0
    unlimited = _cgroup(tmp_path / "c", {"cpu.max": "max 100000"})
    assert threads.decode_threads(0, on_cuda=True, root=unlimited) == 63  # the cores it may run on, but one
    # A CPU worker keeps its two: the model's torch threads take the container's cores there.
    assert threads.decode_threads(0, on_cuda=False, root=eight) == threads.CPU_DECODE_THREADS == 2
    assert threads.decode_threads(5, on_cuda=True, root=eight) == 5  # what the operator set wins


def test_auto_decode_threads_are_capped_on_a_node_without_a_cpu_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 384)
    unlimited = _cgroup(tmp_path, {"cpu.max": "max 100000"})
    assert threads.decode_threads(0, on_cuda=True, root=unlimited) == threads.MAX_AUTO_DECODE_THREADS == 64


def test_a_zero_cgroup_period_is_no_limit(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(_cgroup(tmp_path, {"cpu.max": "100000 0"})) is None


def test_worker_settings_size_decode_threads_by_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = _cgroup(tmp_path, {"cpu.max": "1200000 100000"})  # this container's: 12 CPUs
    real = threads.default_threads
    monkeypatch.setattr(threads, "usable_cores", lambda: 64)
    monkeypatch.setattr(threads, "default_threads", lambda root=limit: real(limit))
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cuda")
    settings = load_worker_settings()
    assert settings.batch.decode_threads == 11
    assert "decode_threads" not in settings.batch.model_fields_set  # derived again if the device changes
    monkeypatch.setenv("WORKER_BATCH__DECODE_THREADS", "0")  # 0 set by hand is auto as well
    assert load_worker_settings().batch.decode_threads == 11
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    assert load_worker_settings().batch.decode_threads == 2
    monkeypatch.setenv("WORKER_BATCH__DECODE_THREADS", "3")
    assert load_worker_settings().batch.decode_threads == 3


def test_decode_threads_out_of_range_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_BATCH__DECODE_THREADS", "-1")
    with pytest.raises(SettingsError, match="WORKER_BATCH__DECODE_THREADS"):
        load_worker_settings()
