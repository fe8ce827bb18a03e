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


# The process's own cgroup (/proc/self/cgroup): a fake filesystem has the cgroup mount under sys/fs/cgroup and the
# process's cgroup file at proc/self/cgroup.


def _fake_system(root: Path, proc_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    mount = _cgroup(root / "sys/fs/cgroup", files)
    mount.mkdir(parents=True, exist_ok=True)
    proc = root / "proc/self/cgroup"
    proc.parent.mkdir(parents=True)
    proc.write_text(proc_cgroup)
    return mount, proc


def test_cgroup_v2_nested_path_is_read_where_the_process_is(tmp_path: Path) -> None:
    # A container sharing the host's cgroup namespace: the root of the mount is the node's and has no limit.
    scope = "kubepods.slice/kubepods-burstable.slice/pod1.slice/cri-containerd-abc.scope"
    mount, proc = _fake_system(
        tmp_path, f"0::/{scope}\n", {"cpu.max": "max 100000\n", f"{scope}/cpu.max": "250000 100000\n"}
    )
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 2.5
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=tmp_path / "missing") is None  # the root's alone: none


def test_cgroup_v2_limit_of_a_parent_applies_to_its_children(tmp_path: Path) -> None:
    # The pod's cgroup holds the limit and the process sits in a child without one: the kernel enforces both.
    mount, proc = _fake_system(
        tmp_path,
        "0::/pod/container/child\n",
        {"pod/cpu.max": "400000 100000", "pod/container/cpu.max": "max 100000", "pod/container/child/cpu.max": "max"},
    )
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 4.0
    (mount / "pod/container/cpu.max").write_text("150000 100000")
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 1.5  # the smallest one on the way up


def test_cgroup_v2_max_everywhere_is_no_limit(tmp_path: Path) -> None:
    mount, proc = _fake_system(tmp_path, "0::/a/b\n", {"cpu.max": "max 100000", "a/b/cpu.max": "max 100000"})
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) is None


def test_cgroup_v2_path_missing_under_the_mount_falls_back_to_the_root(tmp_path: Path) -> None:
    # A private cgroup namespace shows "/" (the usual pod); a path not under the mount leaves the root's files.
    mount, proc = _fake_system(tmp_path, "0::/\n", {"cpu.max": "300000 100000"})
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 3.0
    proc.write_text("0::/somewhere/else\n")
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 3.0
    proc.write_text("0::/../../etc\n")  # never read outside the mount
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 3.0


def test_cgroup_v1_reads_the_cpu_hierarchy_of_the_process(tmp_path: Path) -> None:
    proc_lines = "12:memory:/kubepods/pod1/ctr\n4:cpu,cpuacct:/kubepods/pod1/ctr\n1:name=systemd:/x\n"
    mount, proc = _fake_system(
        tmp_path,
        proc_lines,
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "-1",
            "cpu,cpuacct/cpu.cfs_period_us": "100000",
            "cpu,cpuacct/kubepods/pod1/ctr/cpu.cfs_quota_us": "150000",
            "cpu,cpuacct/kubepods/pod1/ctr/cpu.cfs_period_us": "100000",
        },
    )
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 1.5  # mounted as cpu,cpuacct
    (mount / "cpu").symlink_to(mount / "cpu,cpuacct")  # and with the usual cpu link beside it
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 1.5
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=tmp_path / "missing") is None  # the root's: -1


def test_cgroup_v1_container_sees_only_its_own_cgroup_at_the_mount(tmp_path: Path) -> None:
    # Docker on v1 bind-mounts the container's cgroup at /sys/fs/cgroup/cpu: the path in /proc/self/cgroup is
    # not under it, so the files at the mount are the container's.
    mount, proc = _fake_system(
        tmp_path,
        "3:cpu,cpuacct:/docker/abc\n",
        {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"},
    )
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) == 2.0


def test_cgroup_files_missing_or_unreadable_mean_no_limit(tmp_path: Path) -> None:
    mount, proc = _fake_system(tmp_path, "0::/a\n", {})
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) is None
    (mount / "a").mkdir()
    (mount / "a/cpu.max").write_text("garbage")
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) is None
    proc.write_text("not a cgroup line\n")
    assert threads.cgroup_cpu_limit(mount, proc_cgroup=proc) is None


def test_default_threads_follow_the_process_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 64)
    mount, proc = _fake_system(tmp_path, "0::/pod/ctr\n", {"pod/ctr/cpu.max": "300000 100000"})
    assert threads.default_threads(mount, proc_cgroup=proc) == 3


def test_own_cgroups_parses_v2_and_v1_lines(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/a.scope\n4:cpu,cpuacct:/x\n1:name=systemd:/y\n")
    assert threads.own_cgroups(proc) == ("/user.slice/a.scope", {"cpu,cpuacct": "/x", "name=systemd": "/y"})
    assert threads.own_cgroups(tmp_path / "missing") == (None, {})
