"""Helpers for the caption API's tests: a model whose batches wait for the test (so a queue, a deadline or a
drain is reached by construction, never by timing), the API worker in-process on a free port, and the
`captionfleet serve` / `captionfleet worker --http` subprocesses with this checkout's code."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from captionfleet.core.captioner import Captioner, CaptionModel, ModelInput, ModelWrapper
from captionfleet.core.generation import Caption
from captionfleet.core.settings import DecodingSettings, WorkerSettings
from captionfleet.worker.api_worker import ApiWorker
from captionfleet.worker.metrics import Health, WorkerMetrics
from tests.unit.stream_fakes import wait_for

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-5d41402abc4b2a76"  # a fake credential: must never show up in a log


class GatedModel(ModelWrapper):
    """The tiny model, but each batch waits at the gate until the test lets it through (``step`` one batch,
    ``open`` all). ``entered``: batches that reached the gate; ``sizes``: rows of each batch, in order."""

    def __init__(self, inner: CaptionModel) -> None:
        self._inner = inner
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.entered = 0
        self.sizes: list[int] = []

    @property
    def wrapped(self) -> CaptionModel:
        return self._inner

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        with self._lock:
            self.entered += 1
            self.sizes.append(len(inputs))
        while not self._open.is_set() and not self._permits.acquire(timeout=0.01):
            pass
        return self._inner.caption_inputs(inputs, decoding)

    def step(self) -> None:
        self._permits.release()

    def open(self) -> None:
        self._open.set()

    def wait_entered(self, batches: int, timeout_s: float = 30) -> None:
        wait_for(lambda: self.entered >= batches, timeout_s, f"{batches} batches at the gate")


def tiny_model(checkpoint: Path) -> Captioner:
    return Captioner.from_dir(checkpoint, device="cpu", decoding=DecodingSettings(num_beams=1, max_new_tokens=4))


def api_settings(**groups: Any) -> WorkerSettings:
    """Settings for an in-process API worker: a free port, small batches, the groups given on top."""
    values: dict[str, Any] = {
        "http": {"port": 0, **groups.pop("http", {})},
        "metrics": {"enabled": False},
        "batch": {"max_items": 4, "max_wait_ms": 5, **groups.pop("batch", {})},
        "shutdown": {"grace_s": 30},
        **groups,
    }
    return WorkerSettings.model_validate(values)


class RunningApi:
    def __init__(self, worker: ApiWorker) -> None:
        self.worker = worker
        self.codes: list[int] = []

    @property
    def url(self) -> str:
        assert self.worker.api is not None
        return f"http://127.0.0.1:{self.worker.api.port}"

    @property
    def metrics(self) -> WorkerMetrics:
        return self.worker.metrics

    def sample(self, name: str, **labels: str) -> float:
        return self.worker.metrics.sample(name, labels)


@contextmanager
def running_api(settings: WorkerSettings, model: CaptionModel) -> Iterator[RunningApi]:
    """The API worker in a thread; stopped (drained) afterwards, with any gate opened first."""
    worker = ApiWorker(settings, model, WorkerMetrics(), Health(consumer=False), "test-worker").start()
    running = RunningApi(worker)
    thread = threading.Thread(target=lambda: running.codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        yield running
    finally:
        if isinstance(model, GatedModel):
            model.open()
        worker.stop()
        thread.join(60)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This checkout's code for `python -m captionfleet...` children, no WORKER_* from outside, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "DASHBOARD_"))}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "WORKER_MODEL__DEVICE": "cpu",
            "WORKER_DECODING__NUM_BEAMS": "1",
            "WORKER_DECODING__MAX_NEW_TOKENS": "6",
            **extra,
        }
    )
    return env


def eventually(condition: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
