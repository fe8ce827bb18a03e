"""The archive job's progress: files done of total, images/s and the ETA, on the bar and as gauges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.archive_progress import ArchiveProgress
from captionfleet.worker.bulk_archive import ArchiveOptions, run_archive_job
from captionfleet.worker.bulk_worker import show_progress
from captionfleet.worker.metrics import WorkerMetrics
from tests.unit.test_s3_retry import FakeCaptioner
from tests.webdataset_shards import good_samples, shard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_follows_the_bytes_of_the_files_left_at_this_runs_pace() -> None:
    clock = Clock()
    progress = ArchiveProgress(4, 1000, clock=clock)
    progress.file_done(400, before_this_run=True)  # finished by an earlier run: no pace from it
    assert progress.eta_s is None
    clock.now += 10
    for _ in range(30):
        progress.image_done(ok=True)
    progress.image_done(ok=False)
    progress.file_done(200)  # 200 bytes in 10 s, 400 bytes left
    assert progress.eta_s == 20.0 and progress.images_per_second == 3.1
    assert (progress.files_done, progress.images, progress.failed) == (2, 31, 1)

    metrics = WorkerMetrics()
    show_progress(metrics, progress)
    assert metrics.sample("captionfleet_bulk_files_total") == 4
    assert metrics.sample("captionfleet_bulk_files_done") == 2
    assert metrics.sample("captionfleet_bulk_images_per_second") == 3.1
    assert metrics.sample("captionfleet_bulk_eta_seconds") == 20.0
    progress.file_done(200)
    progress.file_done(200)
    assert progress.eta_s == 0.0


def test_the_job_reports_each_file_as_it_is_done(tmp_path: Path) -> None:
    for n in range(3):
        members, _ = good_samples(f"s{n}-", 3)
        (tmp_path / f"{n}.tar").write_bytes(shard(members))
    seen: list[tuple[int, int, int]] = []
    model: Any = FakeCaptioner()
    run_archive_job(
        str(tmp_path / "{0..2}.tar"),
        str(tmp_path / "out"),
        WorkerSettings(batch={"max_items": 2, "max_wait_ms": 5}),  # type: ignore[arg-type]
        options=ArchiveOptions(),
        show_progress=False,
        captioner=model,
        on_progress=lambda p: seen.append((p.files_total, p.files_done, p.images)),
    )
    assert seen[0] == (3, 0, 0) and seen[-1] == (3, 3, 9)
    assert [done for _, done, _ in seen] == sorted(done for _, done, _ in seen)
