"""Every served family hot-swaps to and from ViT-GPT2 under a streaming load, nothing lost or answered twice.

The worker's own parts as `captionfleet worker` wires them for a ``.../LATEST`` ref (worker/__main__.py): the
stream loop, a HotSwapCaptioner whose swaps the loop records, and a ModelWatcher polling LATEST on its own
thread. Only the outside world is in memory: the Source and Output of tests/unit/stream_fakes.py (the Kafka
connector's protocols; every commit is checked against what the output had acknowledged), and LATEST itself,
a variable the watcher reads where a worker reads s3://…/LATEST. Requests keep arriving while LATEST moves
from a tiny ViT-GPT2 to family X and back, each family in seconds; the real broker and S3 server run the same
swap for BLIP and qwen2_vl (tests/integration/test_lifecycle_swap_families.py).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.failures import EXIT_OK
from captionfleet.core.settings import BatchSettings, FetchSettings, KafkaSettings, WorkerSettings
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.stream.loop import StreamWorker
from captionfleet.worker.watcher import ModelWatcher
from tests.conftest import save_tiny_checkpoint
from tests.integration.stream_models import DECODING, caption_alone, load, png_pictures
from tests.tiny_families import BUILDERS
from tests.unit.stream_fakes import MemoryOutput, MemorySource, wait_for

TOPIC, RESULTS, DEAD = "requests", "caption-results", "caption-dead-letters"
VED = "vision-encoder-decoder"
# ViT-GPT2 itself (another version at another input size) and every other family tests/tiny_families.py builds.
FAMILIES = [VED, *sorted(BUILDERS)]
IMAGES = 4
SERVED = 6  # results of each model before LATEST moves on
IN_FLIGHT = 8  # requests sent and not yet answered: two batches' worth
PAUSE_S = 0.005  # how often the traffic tops up; pacing only, nothing asserts on time


class Traffic:
    """Keeps IN_FLIGHT requests waiting for an answer until stopped, cycling over the pictures; remembers the
    ids. A steady load the worker keeps up with: a swap always lands among requests in flight, and no backlog
    builds up for the test to wait out."""

    def __init__(self, source: MemorySource, output: MemoryOutput, uris: list[str]) -> None:
        self.sent: list[str] = []
        self._source, self._output, self._uris = source, output, uris
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(PAUSE_S):
            while len(self.sent) - len(self._output.sent) < IN_FLIGHT:
                request_id = f"r-{i:05d}"  # zero-padded: sorting the ids sorts them as sent
                value = json.dumps({"id": request_id, "uri": self._uris[i % len(self._uris)]}).encode()
                self._source.append(0, value, answers=[request_id])
                self.sent.append(request_id)
                i += 1

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=30)
        return list(self.sent)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the stream's model thread and for the reference captions alike: on a busy 2-core
    machine two spin-waiting OpenMP threads made each tiny model call ~30x slower (2.4 s against 0.08 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ved(tiny_checkpoint: Path) -> CaptionModel:
    return load(tiny_checkpoint)


@pytest.fixture
def stopping() -> Iterator[list[Callable[[], object]]]:
    """Stops registered here run even after a failed assertion: no loop, watcher or traffic left running."""
    stops: list[Callable[[], object]] = []
    yield stops
    for stop in reversed(stops):
        stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streaming_worker_swaps_to_each_family_and_back_with_nothing_lost_or_answered_twice(
    family: str,
    ved: CaptionModel,
    tiny_family: Callable[[str], Path],
    tmp_path: Path,
    stopping: list[Callable[[], object]],
) -> None:
    other_path = save_tiny_checkpoint(tmp_path / "ved-64", seed=3, image_size=64) if family == VED else None
    other = load(other_path or tiny_family(family))
    assert other.family == family and other.version != ved.version
    by_version = {ved.version: ved, other.version: other}
    # Pictures both models caption with some text: an empty caption is a failure row, not a result.
    candidates = png_pictures(4 * IMAGES)
    images = [data for data in candidates if caption_alone(ved, data) and caption_alone(other, data)][:IMAGES]
    assert len(images) == IMAGES, f"the tiny {family} model captions too few of the test pictures"
    root = tmp_path / "images"
    root.mkdir()
    for i, data in enumerate(images):
        (root / f"{i}.png").write_bytes(data)

    settings = WorkerSettings(
        kafka=KafkaSettings(bootstrap="unused:9092", request_topic=TOPIC, commit_interval_ms=0),
        # One fetch thread on one partition: requests reach the model in the order they were sent, so each
        # swap shows as one boundary in that order.
        fetch=FetchSettings(file_root=root, concurrency=1),
        batch=BatchSettings(max_items=4, max_wait_ms=20),
        decoding=DECODING,
    )
    output = MemoryOutput()
    source = MemorySource(TOPIC, 1, output)
    metrics = WorkerMetrics()
    hot = HotSwapCaptioner(ved)
    worker = StreamWorker(
        settings,
        hot,
        source,
        output,
        Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes),
        metrics=metrics,
    )
    hot.on_swap(worker.model_swapped)
    latest = [ved.version]  # what s3://…/LATEST names; the watcher loads a version as a worker would
    watcher = ModelWatcher(hot, lambda: latest[0], lambda version: by_version[version], interval_s=0.02)
    result: dict[str, Any] = {}
    loop = threading.Thread(target=lambda: result.update(report=worker.run()), daemon=True)
    loop.start()

    def stop_worker() -> None:
        worker.stop()
        loop.join(30)
        # A model thread still inside torch when the interpreter exits aborts the process.
        assert worker.join(30), "the model thread did not finish"

    stopping.append(stop_worker)
    watcher.start()
    stopping.append(watcher.stop)
    traffic = Traffic(source, output, [f"file://{root}/{i}.png" for i in range(IMAGES)])
    stopping.append(traffic.stop)

    def served(version: str) -> int:
        return sum(value["model_version"] == version for value in output.values(RESULTS))

    wait_for(lambda: served(ved.version) >= SERVED, 60, "ViT-GPT2 results")
    latest[0] = other.version
    wait_for(lambda: served(other.version) >= SERVED, 60, f"{family} results after LATEST moved to it")
    before = served(ved.version)
    latest[0] = ved.version  # a rollback
    wait_for(lambda: served(ved.version) >= before + SERVED, 60, "ViT-GPT2 results after LATEST moved back")
    sent = traffic.stop()
    wait_for(lambda: len(output.sent) >= len(sent), 60, "an answer to every request")
    wait_for(lambda: source.committed.get(next(iter(source.owned))) == len(sent), 60, "every offset committed")
    stop_worker()

    assert result["report"].exit_code == EXIT_OK
    assert source.violations == []  # no offset committed before its answer was acknowledged
    # Every request answered exactly once, each with a caption: no dead letters (a stream's failure rows).
    assert Counter(output.keys()) == Counter(sent) and output.keys(DEAD) == []
    results = sorted(output.values(RESULTS), key=lambda value: str(value["id"]))
    assert all(value["caption"] for value in results)
    # In the order sent: ViT-GPT2, then family X, then ViT-GPT2 again; two swaps.
    versions = [value["model_version"] for value in results]
    first, back = versions.index(other.version), len(versions) - versions[::-1].index(other.version)
    assert set(versions[:first]) == {ved.version} and set(versions[first:back]) == {other.version}
    assert set(versions[back:]) == {ved.version}
    assert metrics.sample("captionfleet_model_swaps_total") == 2
    # Each caption is the one its model_version's model gives that picture alone: the version that captioned
    # it, with that model's preprocessing and default prompt.
    expected = {
        (version, i): caption_alone(model, data)
        for version, model in by_version.items()
        for i, data in enumerate(images)
    }
    for value in results:
        picture = int(value["uri"].rsplit("/", 1)[1].split(".")[0])
        assert value["caption"] == expected[(value["model_version"], picture)], value
        assert value["prompt"] == by_version[value["model_version"]].default_prompt, value
