"""The model the dashboard captions uploads with, loaded once per process.

The model is loaded once per process (``st.cache_resource``) and shared by every browser session
behind a lock (a Captioner takes one call at a time). With a ``.../LATEST`` ref, LATEST is re-read as
often as the workers poll it and a new version replaces the old, so uploads follow the workers.
Loading itself is captionfleet/core/loading.py's, as in the worker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.family import takes_prompt
from captionfleet.core.loading import load_model as load_ref
from captionfleet.core.loading import load_version
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.registry_layout import LATEST, latest_root, read_latest
from captionfleet.core.s3 import make_s3_client
from captionfleet.core.settings import WorkerSettings


@dataclass
class LoadedModel:
    captioner: CaptionModel
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> str:
        return self.captioner.version

    @property
    def family(self) -> str:
        return self.captioner.family

    @property
    def default_prompt(self) -> str | None:
        return self.captioner.default_prompt

    @property
    def takes_prompt(self) -> bool:
        return takes_prompt(self.family)


# One entry: when LATEST moves, the new version's model replaces the old one instead of joining it.
@st.cache_resource(max_entries=1, show_spinner="Loading the model (once per dashboard process)...")
def _load_model(key: str, _settings: WorkerSettings, _version: str | None) -> LoadedModel:
    # Keyed by ref/device/cache dir (and the version LATEST names) only: the settings object holds
    # secrets and is not hashed.
    root = latest_root(_settings.model.ref)
    if root is not None and _version is not None:
        return LoadedModel(load_version(root, _version, _settings))
    return LoadedModel(load_ref(_settings))


class LatestReader:
    """The version a ``.../LATEST`` ref names, re-read at most every WORKER_MODEL__POLL_INTERVAL_S
    (as the workers poll it; 0 = read once), so uploads follow the workers to a new version."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, str]] = {}  # root -> (when read, version)
        self._client: Any = None  # made once: a boto3 client costs more to build than a GET
        self._lock = threading.Lock()

    def version(self, root: str, settings: WorkerSettings, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        ttl = settings.model.poll_interval_s
        with self._lock:
            seen = self._seen.get(root)
            if seen is not None and (ttl <= 0 or now - seen[0] < ttl):
                return seen[1]
            try:
                if self._client is None:
                    self._client = make_s3_client(settings.s3, connect_timeout=5, read_timeout=10)
                version = read_latest(self._client, root)
            except (ClientError, BotoCoreError) as error:
                if seen is None:
                    raise ModelRefError(
                        f"could not read {root}/{LATEST}: {error}; check WORKER_MODEL__REF, "
                        "WORKER_S3__ENDPOINT_URL and the credentials"
                    ) from error
                version = None
            if version is None:
                if seen is None:
                    raise ModelRefError(
                        f"{root}/{LATEST} does not exist: publish a version first, or fix WORKER_MODEL__REF"
                    )
                # Unreadable or gone: keep the version in use, as a worker does, and try again a TTL later.
                version = seen[1]
            self._seen[root] = (now, version)
            return version


_LATEST_READER = LatestReader()


def load_model(settings: WorkerSettings, now: float | None = None) -> LoadedModel:
    """The model uploads are captioned with (raises when it cannot be loaded; the message says why)."""
    model = settings.model
    key = f"{model.ref}|{model.device}|{model.cache_dir}"
    root = latest_root(model.ref)
    version = None if root is None else _LATEST_READER.version(root, settings, now)
    return _load_model(f"{key}|{version or ''}", settings, version)
