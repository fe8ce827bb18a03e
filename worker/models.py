"""Published model versions in object storage, and hot swapping between them in a running worker.

Layout, as the trainer publishes it (``trainer/publish.py``)::

    s3://bucket/models/<name>/versions/<version>/...   a complete checkpoint, written before LATEST moves
    s3://bucket/models/<name>/LATEST                   one line: the version workers should serve

A worker started with ``WORKER_MODEL__REF=s3://bucket/models/<name>/LATEST`` loads the version LATEST
names, then a ``ModelWatcher`` re-reads LATEST every ``poll_interval_s``. A new version is downloaded
and loaded in a background thread while the old one keeps serving; ``HotSwapCaptioner`` switches to it
at the start of the next batch, so the batch in flight finishes on the model it started on and every
result names the version that produced it. A version that fails to load (missing files, pickled
weights, another architecture or input size) is logged and counted, and the old model keeps serving.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.captioner import Captioner, Preprocessing
from captionfleet.core.model_store import ModelRefError, resolve_model_ref
from captionfleet.core.s3 import make_s3_client, parse_s3_uri
from captionfleet.core.settings import DecodingSettings, WorkerSettings
from captionfleet.core.threads import apply_threads

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from captionfleet.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

LATEST = "LATEST"
VERSIONS = "versions"
# Versions become object keys and label values: keep them to one safe path segment.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# -- layout ---------------------------------------------------------------------------------------


def latest_root(ref: str) -> str | None:
    """``s3://b/models/x`` for a ref ``s3://b/models/x/LATEST``; None for any other ref."""
    ref = ref.strip()
    if ref.startswith("s3://") and ref.rstrip("/").endswith("/" + LATEST):
        return ref.rstrip("/")[: -len(LATEST) - 1]
    return None


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise ModelRefError(
            f"model version {version!r} is not a valid name: use letters, digits, '.', '_' and '-' "
            "(at most 128), e.g. captioner-3f2a9c01b7de"
        )
    return version


def version_uri(root: str, version: str) -> str:
    return f"{root.rstrip('/')}/{VERSIONS}/{check_version(version)}"


def read_latest(client: S3Client, root: str) -> str | None:
    """The version LATEST names; None when there is no LATEST yet. S3 errors propagate."""
    bucket, prefix = parse_s3_uri(root.rstrip("/"))
    try:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{LATEST}")["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    return parse_latest(body)


def parse_latest(body: bytes) -> str | None:
    """The version a LATEST object's content names; None when it is empty."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    return check_version(text.splitlines()[0].strip())


# -- the swappable model --------------------------------------------------------------------------


def input_difference(old: Preprocessing, new: Preprocessing) -> str | None:
    """Why images prepared for ``old`` would be wrong for ``new``; None when they are the same."""
    if (old.width, old.height) != (new.width, new.height):
        return f"input size {new.width}x{new.height} differs from the serving model's {old.width}x{old.height}"
    if old.resample != new.resample or old.rescale_factor != new.rescale_factor:
        return "image resampling or rescaling differs from the serving model's"
    for name in ("mean", "std"):
        a, b = getattr(old, name), getattr(new, name)
        if (a is None) != (b is None) or (a is not None and not np.allclose(a, b)):
            return f"image normalisation ({name}) differs from the serving model's"
    return None


class HotSwapCaptioner(Captioner):
    """A Captioner whose model can be replaced while serving.

    ``offer(new)`` may be called from any thread; the switch happens at the start of the next
    ``caption_pixels`` call (the model thread, between batches). Its public attributes (version,
    model, ...) are those of the model that ran the last batch, so a result built right after a
    batch names the version that produced it.
    """

    def __init__(self, initial: Captioner) -> None:
        self.__dict__.update({k: v for k, v in vars(initial).items() if not k.startswith("_")})
        self._active = initial
        self._pending: Captioner | None = None
        self._lock = threading.Lock()
        self._on_swap: list[Callable[[Captioner, Captioner], None]] = []

    def on_swap(self, callback: Callable[[Captioner, Captioner], None]) -> None:
        """``callback(old, new)`` runs in the model thread right after a swap, before the new model's first batch."""
        self._on_swap.append(callback)

    @property
    def active(self) -> Captioner:
        return self._active

    @property
    def pending_version(self) -> str | None:
        with self._lock:
            return self._pending.version if self._pending is not None else None

    def offer(self, new: Captioner) -> None:
        """Serve ``new`` from the next batch on (an earlier offer not yet taken is dropped)."""
        difference = input_difference(self._active.preprocess, new.preprocess)
        if difference is not None:
            # Decode threads prepare images ahead of the model with the serving model's preprocessing.
            raise ModelRefError(f"{difference}; such a version needs a worker restart, not a hot swap")
        with self._lock:
            self._pending = new

    def withdraw(self) -> tuple[str, str | None]:
        """Drop an offer not yet taken. Returns (the active version, the withdrawn one or None), read
        together under the lock: no swap can slip in between, so the active version is the one that
        serves the next batch."""
        with self._lock:
            dropped, self._pending = self._pending, None
            return self._active.version, dropped.version if dropped is not None else None

    def _swap_if_offered(self) -> None:
        with self._lock:  # _active changes under the lock too: see withdraw()
            new, self._pending = self._pending, None
            if new is None:
                return
            old = self._active
            self._active = new
        self.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("_")})
        log.info("model swapped: %s -> %s (from %s)", old.version, new.version, new.source)
        for callback in self._on_swap:
            try:
                callback(old, new)
            except Exception:  # a metrics or logging hook must not fail a batch
                log.exception("model swap callback failed")

    def caption_pixels(self, pixel_values: torch.Tensor, decoding: DecodingSettings | None = None) -> list[str]:
        self._swap_if_offered()
        return self._active.caption_pixels(pixel_values, decoding)


# -- watching LATEST ------------------------------------------------------------------------------


def is_storage_error(error: BaseException) -> bool:
    """Whether a load failed on object storage or the network rather than on the checkpoint.

    The rule: a botocore error (ClientError: throttling, 5xx, a missing or changed object;
    BotoCoreError: timeouts, refused or dropped connections) raised by the load or anywhere in its
    chain of causes. ``resolve_model_ref`` wraps those in ModelRefError ``from`` the botocore error,
    while what it finds wrong with a checkpoint (pickled weights, missing files) and a refused hot swap
    (another input size) are ModelRefErrors with no botocore cause. Storage errors are usually gone by
    the next poll, so they must not block the version for retry_failed_s; a broken checkpoint stays
    broken until a new version is published, so it is not re-downloaded at every poll.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (ClientError, BotoCoreError)):
            return True
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


class ModelWatcher:
    """Polls LATEST and loads new versions in the background; see the module note.

    ``read`` returns the version LATEST names (None: no LATEST); ``load`` turns a version into a
    loaded Captioner. Both are injected so the logic is testable without S3.
    """

    def __init__(
        self,
        target: HotSwapCaptioner,
        read: Callable[[], str | None],
        load: Callable[[str], Captioner],
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
            if captioner.version != version:
                raise ModelRefError(
                    f"its captionfleet.json says version {captioner.version!r}; republish it with the trainer"
                )
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


def warm_up(captioner: Captioner) -> None:
    """One tiny batch: the first call pays for lazy initialisation, which should not land on a request."""
    width, height = captioner.image_size
    captioner.caption_pixels(torch.zeros(1, 3, height, width))


def load_version(root: str, version: str, settings: WorkerSettings) -> Captioner:
    path = resolve_model_ref(version_uri(root, version), cache_dir=settings.model.cache_dir, s3=settings.s3)
    apply_threads(settings.model.threads)
    return Captioner.from_dir(
        path, device=settings.model.device, decoding=settings.decoding, precision=settings.model.precision
    )


def load_serving_model(settings: WorkerSettings) -> Captioner:
    """The model to serve: for a ``.../LATEST`` ref the version it names (in a HotSwapCaptioner),
    otherwise what ``worker.bulk.load_captioner`` loads."""
    root = latest_root(settings.model.ref)
    if root is None:
        from captionfleet.worker.bulk import load_captioner

        return load_captioner(settings)
    try:
        version = read_latest(make_s3_client(settings.s3), root)
    except (ClientError, BotoCoreError) as error:
        raise ModelRefError(
            f"could not read {root}/{LATEST}: {error}; check the uri, WORKER_S3__ENDPOINT_URL and the credentials"
        ) from error
    if version is None:
        raise ModelRefError(
            f"{root}/{LATEST} does not exist: publish a version first (captionfleet train --publish-to {root}, "
            f"or captionfleet models promote VERSION --root {root})"
        )
    captioner = load_version(root, version, settings)
    if captioner.version != version:  # the watcher compares LATEST with this: they must agree
        raise ModelRefError(
            f"{version_uri(root, version)} says it is version {captioner.version!r} (captionfleet.json): "
            "republish it with the trainer (captionfleet train --publish-to ...)"
        )
    return HotSwapCaptioner(captioner)


def start_watcher(
    settings: WorkerSettings, captioner: Captioner, metrics: WorkerMetrics | None = None
) -> ModelWatcher | None:
    """Start polling LATEST when the worker follows it (and polling is on); None otherwise."""
    root = latest_root(settings.model.ref)
    if root is None or not isinstance(captioner, HotSwapCaptioner) or settings.model.poll_interval_s <= 0:
        return None
    client = make_s3_client(settings.s3, connect_timeout=5, read_timeout=10)

    def load(version: str) -> Captioner:
        loaded = load_version(root, version, settings)
        warm_up(loaded)  # here, in the background, not on the first batch after the swap
        return loaded

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
