"""How far an archive job is: input files done of this worker's total, images/s and the ETA, for the
terminal's progress bar and the fleet worker's Prometheus gauges alike.

The ETA counts bytes of input files, not files: shards and manifests differ in size, and the listing
gives every file's size before any is read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tqdm import tqdm


class ArchiveProgress:
    def __init__(
        self,
        files_total: int,
        bytes_total: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[ArchiveProgress], None] | None = None,
    ) -> None:
        self.files_total = files_total
        self.bytes_total = bytes_total
        self.files_done = 0
        self.images = 0  # captioned or failed in this run
        self.failed = 0
        self._bytes_done = 0
        self._bytes_done_this_run = 0
        self._clock = clock
        self._started = clock()
        self._on_change = on_change
        self._lock = threading.Lock()

    def file_done(self, size: int, *, before_this_run: bool = False) -> None:
        with self._lock:
            self.files_done += 1
            self._bytes_done += size
            if not before_this_run:
                self._bytes_done_this_run += size
        self._changed()

    def image_done(self, ok: bool) -> None:
        with self._lock:
            self.images += 1
            self.failed += 0 if ok else 1
        self._changed()

    @property
    def elapsed_s(self) -> float:
        return max(self._clock() - self._started, 1e-9)

    @property
    def images_per_second(self) -> float:
        return self.images / self.elapsed_s

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this run's pace of input bytes; None until a file has been finished."""
        with self._lock:
            if self.files_done >= self.files_total:
                return 0.0
            if self._bytes_done_this_run <= 0:
                return None
            left = max(self.bytes_total - self._bytes_done, 0)
            return left * self.elapsed_s / self._bytes_done_this_run

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)


class ProgressBar:
    """The terminal's view: a tqdm bar over input files with images/s, failures and the ETA beside it."""

    def __init__(self, progress: ArchiveProgress, enabled: bool) -> None:
        self.progress = progress
        self.bar = tqdm(total=progress.files_total, unit="file", disable=not enabled, dynamic_ncols=True)
        self._shown_files = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, progress: ArchiveProgress) -> None:
        with self._lock:
            now = time.monotonic()
            moved = progress.files_done - self._shown_files
            if moved <= 0 and now - self._last < 0.5:
                return  # at most a couple of redraws a second from image counts
            self._last = now
            eta = progress.eta_s
            self.bar.set_postfix(
                img_s=f"{progress.images_per_second:.1f}",
                images=progress.images,
                failed=progress.failed,
                eta="?" if eta is None else f"{eta:.0f}s",
                refresh=False,
            )
            if moved > 0:
                self.bar.update(moved)
                self._shown_files = progress.files_done
            else:
                self.bar.refresh()

    def close(self) -> None:
        with self._lock:
            self.bar.close()
