"""The one way from a model ref to a loaded model (captionfleet/core/loading.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from captionfleet.core import loading
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.settings import WorkerSettings


class Named:
    """A loaded model as far as the version check looks: its captionfleet.json's version."""

    def __init__(self, version: str) -> None:
        self.version = version


def test_a_version_that_says_it_is_another_is_refused_wherever_it_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # load_version serves the hot swap and the dashboard following LATEST: both get the check the worker's
    # start-up had (the dashboard served such a copy before).
    loaded: list[str] = []

    def load_ref(ref: str, settings: WorkerSettings) -> Any:
        loaded.append(ref)
        return Named("v1")

    monkeypatch.setattr(loading, "_load_ref", load_ref)
    settings = WorkerSettings()
    assert loading.load_version("s3://b/models/m", "v1", settings).version == "v1"
    with pytest.raises(ModelRefError, match=r"says it is version 'v1' \(captionfleet.json\)"):
        loading.load_version("s3://b/models/m", "v2", settings)
    assert loaded == ["s3://b/models/m/versions/v1", "s3://b/models/m/versions/v2"]


def test_a_latest_ref_loads_the_version_latest_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(loading, "serving_version", lambda root, s3: "v7")
    monkeypatch.setattr(loading, "_load_ref", lambda ref, settings: Named(ref.rsplit("/", 1)[-1]))
    settings = WorkerSettings.model_validate({"model": {"ref": "s3://b/models/m/LATEST", "cache_dir": str(tmp_path)}})
    assert loading.load_model(settings).version == "v7"
    monkeypatch.setattr(loading, "_load_ref", lambda ref, settings: Named("v6"))
    with pytest.raises(ModelRefError, match="says it is version 'v6'"):
        loading.load_model(settings)
