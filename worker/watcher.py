"""Following a registry's LATEST in a running worker: the watcher and its wiring.

A worker started with ``WORKER_MODEL__REF=s3://bucket/models/<name>/LATEST`` loads the version LATEST
names (captionfleet/core/loading.py; layout in captionfleet/core/registry_layout.py), then a
``ModelWatcher`` re-reads LATEST every ``poll_interval_s``. A new version is downloaded and loaded in a
background thread while the old one keeps serving, and offered to the ``HotSwapCaptioner``
(worker/hotswap.py), which switches at the start of the next batch. A version that fails to load
(missing files, pickled weights, a model type that is not image-to-text) is logged and counted, and the
old model keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.loading import check_named_version, load_model, load_version
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.registry_layout import LATEST, latest_root, read_latest
from captionfleet.core.s3 import is_storage_error, make_s3_client
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.hotswap import HotSwapCaptioner

if TYPE_CHECKING:
    from captionfleet.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class ModelWatcher:
    """Polls LATEST and loads new versions in the background; see the module note.

    ``read`` returns the version LATEST names (None: no LATEST); ``load`` turns a version into a
    loaded model. Both are injected so the logic is testable without S3.
    """

    def __init__(
        self,
        target: HotSwapCaptioner,
        read: Callable[[], str | None],
        load: Callable[[str], CaptionModel],
        *,
        interval_s: float,
        retry_failed_s: float = 600.0,
        metrics: WorkerMetrics | None = None,
        where: str = "LATEST",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self._read = read
        self._load = load
        self.interval_s = interval_s
        self.retry_failed_s = retry_failed_s
        self.metrics = metrics
        self.where = where
        self._clock = clock
        self._wanted = target.version  # the version serving or about to serve
        self._failed: dict[str, float] = {}  # version -> when it failed to load
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read_failing = False

    def check(self) -> str:
        """One poll: ``unchanged``, ``loaded`` (swaps at the next batch), ``failed``, ``known_bad``,
        ``unreadable`` or ``no_latest``. Never raises. When LATEST moves, a swap still pending is
        withdrawn; when it moves back to the serving version, nothing is loaded. A version that failed
        on a broken checkpoint is tried again only after ``retry_failed_s``, one that failed on object
        storage at the next poll (see ``is_storage_error``)."""
        try:
            version = self._read()
        except (ClientError, BotoCoreError, ModelRefError, OSError) as error:
            if not self._read_failing:  # once per outage, not once per poll
                log.warning("could not read %s (%s); still serving %s", self.where, error, self.target.version)
            self._read_failing = True
            return "unreadable"
        if self._read_failing:
            log.info("%s is readable again", self.where)
            self._read_failing = False
        if version is None:
            return "no_latest"
        if version == self._wanted:
            return "unchanged"
        # LATEST moved away from the version serving or offered. An offer not yet taken is for a
        # version LATEST no longer names (e.g. rolled back while the worker was idle): withdraw it now,
        # whatever happens to the load below, so the next batch does not swap to it.
        active, withdrawn = self.target.withdraw()
        if withdrawn is not None:
            log.info("%s now names %s: withdrew the pending swap to %s", self.where, version, withdrawn)
        self._wanted = active
        if version == active:
            # Back to the version that is serving: nothing to load (a reload would hold the model
            # twice in memory, swap it for itself, and could fail on a transient error).
            log.info("%s names %s again, which is serving: nothing to load", self.where, version)
            return "unchanged"
        failed_at = self._failed.get(version)
        if failed_at is not None and self._clock() - failed_at < self.retry_failed_s:
            return "known_bad"
        log.info("%s names %s (serving %s): loading it in the background", self.where, version, self._wanted)
        try:
            captioner = self._load(version)
            check_named_version(captioner, version, f"the version {self.where} names")
            self.target.offer(captioner)
        except Exception as error:  # whatever breaks a load must leave the old model serving
            transient = is_storage_error(error)
            if not transient:
                self._failed[version] = self._clock()
            reason = f"{type(error).__name__}: {error}"
            log.error(
                "model version %s (named by %s) failed to load; still serving %s; %s: %s",
                version,
                self.where,
                self.target.active.version,
                "object storage error, retrying at the next poll"
                if transient
                else f"not retried for {self.retry_failed_s:.0f}s",
                reason,
                extra={"model_version": version},
            )
            if self.metrics is not None:
                self.metrics.model_load_failures.inc()
                self.metrics.model_load_failure.info({"version": version, "reason": reason[:500]})
            return "failed"
        self._failed.pop(version, None)
        self._wanted = version
        log.info("model version %s loaded; it serves from the next batch", version)
        return "loaded"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # check() handles its own errors; this is for bugs
                log.exception("model watcher check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- wiring for `captionfleet worker` -------------------------------------------------------------


def load_serving_model(settings: WorkerSettings) -> CaptionModel:
    """The model to serve: for a ``.../LATEST`` ref the version it names, in a HotSwapCaptioner (a
    watcher swaps in later versions); for any other ref the model it names."""
    captioner = load_model(settings)
    return captioner if latest_root(settings.model.ref) is None else HotSwapCaptioner(captioner)


def start_watcher(
    settings: WorkerSettings, captioner: CaptionModel, metrics: WorkerMetrics | None = None
) -> ModelWatcher | None:
    """Start polling LATEST when the worker follows it (and polling is on); None otherwise."""
    root = latest_root(settings.model.ref)
    if root is None or not isinstance(captioner, HotSwapCaptioner) or settings.model.poll_interval_s <= 0:
        return None
    client = make_s3_client(settings.s3, connect_timeout=5, read_timeout=10)

    def load(version: str) -> CaptionModel:
        # Warmed here, in the background, not on the first batch after the swap.
        return load_version(root, version, settings, warm=True)

    watcher = ModelWatcher(
        captioner,
        lambda: read_latest(client, root),
        load,
        interval_s=settings.model.poll_interval_s,
        retry_failed_s=settings.model.retry_failed_s,
        metrics=metrics,
        where=f"{root}/{LATEST}",
    )
    watcher.start()
    log.info("following %s/%s every %.1fs", root, LATEST, settings.model.poll_interval_s)
    return watcher
