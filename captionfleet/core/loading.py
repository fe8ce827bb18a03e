"""From a model ref to a loaded captioner: the one way every part loads a model.

- ``load_checkpoint``: a local checkpoint folder -> its family's captioner (config.json's ``model_type``:
  ``vision-encoder-decoder`` -> ``Captioner`` and its fast path, any other image-text-to-text type ->
  ``FamilyCaptioner``), optionally with torch's threads set first. The trainer and the benchmarks pass
  ``threads=None``: they leave torch's threads as the process set them (``train`` and the benchmarks set
  them themselves; evaluation and the gate's scoring run with torch's default).
- ``load_model``: what ``WORKER_MODEL__*`` names (a folder, s3:// prefix, hub id, builtin, or a
  ``s3://.../models/<name>/LATEST`` ref, which loads the version LATEST names now) with the worker's
  device, precision, decoding and thread settings: what the worker, the bulk jobs and the dashboard serve.
- ``load_version``: one published version of a registry root, with the same settings (the hot swap, the
  dashboard following LATEST), warmed when asked (the hot swap, off the serving path); the version its
  captionfleet.json names must be the one asked for.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image

from captionfleet.core.captioner import VED_FAMILY, Captioner, CaptionModel
from captionfleet.core.families.captioner import FamilyCaptioner
from captionfleet.core.families.limits import InputLimits
from captionfleet.core.model_store import ModelRefError, model_type_of, resolve_model_ref
from captionfleet.core.registry_layout import LATEST, latest_root, read_latest, version_uri
from captionfleet.core.s3 import make_s3_client
from captionfleet.core.settings import DecodingSettings, S3Settings, WorkerSettings
from captionfleet.core.threads import apply_threads

logger = logging.getLogger(__name__)


def warm_up(captioner: CaptionModel) -> float:
    """One tiny batch through the serving path; returns the seconds it took. The first model call pays
    for lazy initialisation (seconds on CPU), which should not land on a real request's latency."""
    width, height = captioner.draft_size or (64, 64)
    start = time.perf_counter()
    captioner.caption_inputs([captioner.prepare(Image.new("RGB", (width, height)))])
    return time.perf_counter() - start


def load_checkpoint(
    path: Path,
    *,
    device: str,
    precision: str,
    decoding: DecodingSettings | None = None,
    threads: int | None = None,
    limits: InputLimits | None = None,
    static_rows: int = 0,
) -> CaptionModel:
    """A local checkpoint folder, loaded by its family's captioner. ``threads``: torch's intra-op threads
    to set first (0 = the container's CPU limit, see core/threads.py); None leaves them as the caller set them.
    ``limits``: what one request's input may be (prompt length; the defaults when None). ``static_rows``:
    ViT-GPT2 decodes through static KV caches for batches up to that size (0: off; core/static_decoding.py)."""
    if threads is not None:
        apply_threads(threads)
    if model_type_of(path) == VED_FAMILY:
        return Captioner.from_dir(path, device=device, decoding=decoding, precision=precision, static_rows=static_rows)
    if static_rows:  # a hot swap may bring another family: it serves with its dynamic cache, it does not fail
        logger.warning("WORKER_MODEL__STATIC_CACHE applies to vision-encoder-decoder models only; %s ignores it", path)
    return FamilyCaptioner.from_dir(path, device=device, decoding=decoding, precision=precision, limits=limits)


def _load_ref(ref: str, settings: WorkerSettings) -> CaptionModel:
    model = settings.model
    path = resolve_model_ref(ref, cache_dir=model.cache_dir, s3=settings.s3)
    return load_checkpoint(
        path,
        device=model.device,
        precision=model.precision,
        decoding=settings.decoding,
        threads=model.threads,
        limits=InputLimits.from_settings(model),
        # The images a batch of the worker's decoding holds: the sequence limit may keep it below max_items.
        static_rows=settings.batch.images_at(settings.decoding.num_beams) if model.static_cache else 0,
    )


def load_version(root: str, version: str, settings: WorkerSettings, *, warm: bool = False) -> CaptionModel:
    """Version ``version`` of the registry at ``root`` (``s3://bucket/models/<name>``), with the worker's settings."""
    captioner = _load_ref(version_uri(root, version), settings)
    check_named_version(captioner, version, version_uri(root, version))
    if warm:
        warm_up(captioner)
    return captioner


def check_named_version(captioner: CaptionModel, version: str, where: str) -> None:
    """A published version must say it is that version (its captionfleet.json): results name it, and a
    copy of another version under this name would be served as something it is not."""
    if captioner.version != version:
        raise ModelRefError(
            f"{where} says it is version {captioner.version!r} (captionfleet.json): "
            "republish it with the trainer (captionfleet train --publish-to ...)"
        )


def serving_version(root: str, s3: S3Settings) -> str:
    """The version ``root``/LATEST names now; ModelRefError (saying what to fix) when it cannot be read."""
    try:
        version = read_latest(make_s3_client(s3), root)
    except (ClientError, BotoCoreError) as error:
        raise ModelRefError(
            f"could not read {root}/{LATEST}: {error}; check the uri, WORKER_S3__ENDPOINT_URL and the credentials"
        ) from error
    if version is None:
        raise ModelRefError(
            f"{root}/{LATEST} does not exist: publish a version first (captionfleet train --publish-to {root}, "
            f"or captionfleet models promote VERSION --root {root})"
        )
    return version


def load_model(settings: WorkerSettings) -> CaptionModel:
    """The model ``settings.model.ref`` names, with the worker's device, precision, decoding and threads.
    A ``.../LATEST`` ref loads the version LATEST names now."""
    root = latest_root(settings.model.ref)
    if root is None:
        return _load_ref(settings.model.ref, settings)
    return load_version(root, serving_version(root, settings.s3), settings)
