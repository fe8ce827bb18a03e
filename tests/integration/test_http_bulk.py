"""The caption API beside a bulk job (WORKER_HTTP__ENABLED): the folder, S3-prefix and tar-archive jobs serve it
from their own pipeline, an API image overtakes the job's queued backlog, and its answer never reaches the
job's outputs; when the job's input ends, or on SIGTERM, the API drains (new requests 503, those admitted
answered) before the job ends as it would without the API.

The real server on a free loopback port and real HTTP clients (httpx); the tiny test checkpoint, its batches
held at a gate the test opens, so every state (a queued backlog, a request admitted mid-drain) is reached by
construction. An admitted request is kept in flight by a client that has not finished sending its body."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from captionfleet.cli import main as captionfleet_main
from captionfleet.core.captioner import CaptionModel
from captionfleet.core.settings import S3Settings, SettingsError, WorkerSettings
from captionfleet.worker.bulk import BulkSummary, run_caption_job
from captionfleet.worker.bulk_api import BulkApi
from captionfleet.worker.bulk_archive import ArchiveOptions, run_archive_job
from captionfleet.worker.bulk_s3 import run_s3_caption_job
from captionfleet.worker.sinks import read_rows
from tests.hostile_images import jpeg_bytes
from tests.integration.http_support import TOKEN, GatedModel, eventually, tiny_model
from tests.integration.test_bulk_s3 import read_rows as s3_rows
from tests.services.seaweedfs import SeaweedS3
from tests.webdataset_shards import good_samples, shard

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

JPEG = jpeg_bytes()


def folder(tmp_path: Path, n: int) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(n):
        (root / f"{i:03}.jpg").write_bytes(JPEG)
    return root


def job_settings(**http: Any) -> WorkerSettings:
    """Batches of 4 that wait for a full batch (a minute), and a short prefetch queue: with the model at its gate
    the job's input stays open, its backlog queued behind the batch at the gate."""
    return WorkerSettings.model_validate(
        {
            "http": {"enabled": True, "port": 0, "max_wait_ms": 5, "stream_share": 0.25, **http},
            "metrics": {"enabled": False},
            "batch": {"max_items": 4, "max_wait_ms": 60_000, "prefetch": 2},
            "shutdown": {"grace_s": 30},
        }
    )


JobRun = Callable[[WorkerSettings, BulkApi, CaptionModel], BulkSummary]


class Job:
    """A bulk job with its API, in a thread (``start``) or the calling one (``run``). ``job`` runs it with the API
    given (``folder_job`` by default)."""

    def __init__(
        self,
        settings: WorkerSettings,
        model: GatedModel,
        job: Callable[[WorkerSettings, BulkApi, CaptionModel], BulkSummary],
    ) -> None:
        self.api = BulkApi.open(settings)
        self.url = f"http://127.0.0.1:{self.api.port}/v1/captions"
        self.settings, self.model, self._job = settings, model, job
        self.summaries: list[BulkSummary] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> BulkSummary:
        with self.api:
            summary = self._job(self.settings, self.api, self.model)
        self.summaries.append(summary)
        return summary

    def start(self) -> Job:
        self.thread.start()
        return self

    def sample(self, name: str, **labels: str) -> float:
        return self.api.metrics.sample(name, labels)

    @property
    def draining(self) -> bool:
        assert self.api.server is not None
        return self.api.server.ctx.state.draining


def folder_job(root: Path, out: Path) -> Callable[[WorkerSettings, BulkApi, CaptionModel], BulkSummary]:
    def run(settings: WorkerSettings, api: BulkApi, model: CaptionModel) -> BulkSummary:
        return run_caption_job(str(root), out, settings, show_progress=False, captioner=model, api=api)

    return run


def post_in_thread(url: str, **kwargs: Any) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(url, timeout=120, **kwargs)), daemon=True)
    thread.start()
    return thread, answers


def slow_body(release: threading.Event, image_id: str) -> Iterator[bytes]:
    """A JSON body sent in two parts, the second once ``release`` is set: the request is admitted (the guard
    counts it) and stays in flight until then."""
    body = json.dumps({"id": image_id, "data": base64.b64encode(JPEG).decode()}).encode()
    yield body[:10]
    release.wait(60)
    yield body[10:]


def loading_first(loaded: threading.Event, job: JobRun) -> JobRun:
    """``job`` once ``loaded`` is set: until then the API's port is open and the job has no pipeline yet, as
    while ``captionfleet caption`` loads its model and lists its input (minutes, for a big model or prefix)."""

    def run(settings: WorkerSettings, api: BulkApi, model: CaptionModel) -> BulkSummary:
        assert loaded.wait(60)
        return job(settings, api, model)

    return run


def post_promptly(url: str, **kwargs: Any) -> httpx.Response:
    try:
        return httpx.post(url, timeout=10, **kwargs)
    except httpx.TimeoutException:
        pytest.fail("the request hung: the API's port is open but nothing answers it")


@dataclass
class BulkCase:
    """One bulk job over IMAGES images: how to run it, and the ids of the rows it wrote."""

    settings: WorkerSettings
    job: Callable[[WorkerSettings, BulkApi, CaptionModel], BulkSummary]
    rows: Callable[[], list[str]]
    names: list[str]


IMAGES = 40


def folder_case(tmp_path: Path, request: pytest.FixtureRequest) -> BulkCase:
    root, out = folder(tmp_path, IMAGES), tmp_path / "captions.jsonl"
    names = sorted(path.name for path in root.iterdir())
    return BulkCase(job_settings(), folder_job(root, out), lambda: [row["id"] for row in read_rows(out)], names)


def s3_prefix_case(tmp_path: Path, request: pytest.FixtureRequest) -> BulkCase:
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    client = server.client()
    names = [f"photos/{i:03}.jpg" for i in range(IMAGES)]
    for key in names:
        client.put_object(Bucket=bucket, Key=key, Body=JPEG)
    settings = job_settings().model_copy(
        update={
            "s3": S3Settings(
                endpoint_url=server.endpoint_url,
                access_key_id=SecretStr(server.access_key),
                secret_access_key=SecretStr(server.secret_key),
            )
        }
    )

    def job(settings: WorkerSettings, api: BulkApi, model: CaptionModel) -> BulkSummary:
        summary = run_s3_caption_job(
            f"s3://{bucket}/photos/",
            f"s3://{bucket}/captions/",
            settings,
            show_progress=False,
            captioner=model,
            api=api,
        )
        assert summary.complete  # its marker written, as without the API
        return summary

    return BulkCase(settings, job, lambda: [row["key"] for row in s3_rows(client, bucket, "captions/")], names)


def tar_archive_case(tmp_path: Path, request: pytest.FixtureRequest) -> BulkCase:
    members, expected = good_samples("sample-", IMAGES)
    (tmp_path / "shards").mkdir()
    source, out = tmp_path / "shards" / "00000.tar", tmp_path / "out"
    source.write_bytes(shard(members))

    def job(settings: WorkerSettings, api: BulkApi, model: CaptionModel) -> BulkSummary:
        options = ArchiveOptions(input_format="tar")
        summary = run_archive_job(
            str(source), str(out), settings, options=options, show_progress=False, captioner=model, api=api
        )
        assert summary.complete and summary.files_finished == 1  # its output and marker written
        return summary

    rows = lambda: [row["key"] for row in pq.read_table(out / "00000.parquet").to_pylist()]  # noqa: E731
    return BulkCase(job_settings(), job, rows, sorted(expected))


@pytest.mark.parametrize("case", [folder_case, s3_prefix_case, tar_archive_case], ids=["folder", "s3", "tar"])
def test_an_api_request_overtakes_the_jobs_backlog_and_stays_out_of_its_outputs(
    case: Callable[[Path, pytest.FixtureRequest], BulkCase],
    tiny_checkpoint: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    bulk = case(tmp_path, request)
    gated = GatedModel(tiny_model(tiny_checkpoint))
    job = Job(bulk.settings, gated, bulk.job).start()
    try:
        gated.wait_entered(1)  # the first batch holds the model; the others wait behind it (or are not read)
        client, answers = post_in_thread(job.url, json={"id": "interactive", "data": base64.b64encode(JPEG).decode()})
        eventually(lambda: job.sample("captionfleet_http_queued_images") == 1, "the API image offered")
        gated.step()  # the batch that was running ends
        gated.step()  # and the next one, which must hold the API image
        client.join(60)
        assert answers and answers[0].status_code == 200, answers
        body = answers[0].json()
        assert body["results"][0]["id"] == "interactive" and body["results"][0]["ok"]
        assert body["model_version"] == body["results"][0]["model_version"] == gated.version  # the job's model
        # Answered mid-job, although the gate let only two batches through: at most 8 of the 40 were captioned.
        assert job.thread.is_alive() and gated.entered <= 3 and sum(gated.sizes[:2]) <= 8
        assert not job.draining
    finally:
        gated.open()
        job.thread.join(120)
    summary = job.summaries[0]
    assert (summary.done, summary.failed, summary.interrupted) == (IMAGES, 0, False)  # exit 0, its own counts
    assert sorted(bulk.rows()) == bulk.names  # every image once, none of the API's
    assert job.sample("captionfleet_images_total", outcome="captioned") == 1  # the API's own count: its image


def test_when_the_input_ends_the_api_drains_then_the_job_ends_as_usual(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root, out = folder(tmp_path, 12), tmp_path / "captions.parquet"
    gated = GatedModel(tiny_model(tiny_checkpoint))
    job = Job(job_settings(), gated, folder_job(root, out)).start()
    release = threading.Event()
    try:
        gated.wait_entered(1)
        slow, answers = post_in_thread(
            job.url, content=slow_body(release, "in-flight"), headers={"content-type": "application/json"}
        )
        eventually(lambda: job.sample("captionfleet_http_in_flight_requests") == 1, "the slow request admitted")
        assert not job.draining  # the input is still open: the backlog waits at the gate
        gated.open()  # the backlog is captioned and the input ends, while the request is still being sent
        eventually(lambda: job.draining, "the drain at the end of the input")
        refused = httpx.post(job.url, json={"data": base64.b64encode(JPEG).decode()}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["kind"] == "draining"
        assert job.thread.is_alive()  # the job waits for the request it admitted
        release.set()
        slow.join(60)
        assert answers and answers[0].status_code == 200, answers
        assert answers[0].json()["results"][0]["id"] == "in-flight" and answers[0].json()["results"][0]["ok"]
    finally:
        release.set()
        gated.open()
        job.thread.join(120)
    assert not job.thread.is_alive()
    summary = job.summaries[0]
    assert (summary.done, summary.failed, summary.interrupted) == (12, 0, False)  # exit 0, as without the API
    assert sorted(row["id"] for row in read_rows(out)) == sorted(path.name for path in root.iterdir())
    with pytest.raises(httpx.ConnectError):  # the job is over: the port is closed
        httpx.post(job.url, json={"data": base64.b64encode(JPEG).decode()}, timeout=10)


def test_sigterm_drains_the_api_then_stops_the_job_which_resumes_as_without_it(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The real signal, through the job's own handler (the job runs in this, the main thread)."""
    root, out = folder(tmp_path, 40), tmp_path / "captions.jsonl"
    gated = GatedModel(tiny_model(tiny_checkpoint))
    job = Job(job_settings(), gated, folder_job(root, out))
    seen: dict[str, Any] = {}

    def client() -> None:
        gated.wait_entered(1)
        thread, answers = post_in_thread(job.url, json={"id": "in-flight", "data": base64.b64encode(JPEG).decode()})
        eventually(lambda: job.sample("captionfleet_http_queued_images") == 1, "the API image offered")
        os.kill(os.getpid(), signal.SIGTERM)
        eventually(lambda: job.draining, "draining")
        seen["refused"] = httpx.post(job.url, json={"data": base64.b64encode(JPEG).decode()}, timeout=30)
        gated.open()
        thread.join(60)
        seen["answer"] = answers[0] if answers else None

    helper = threading.Thread(target=client, daemon=True)
    helper.start()
    summary = job.run()
    helper.join(60)
    assert seen["refused"].status_code == 503
    assert seen["answer"] is not None and seen["answer"].status_code == 200
    assert seen["answer"].json()["results"][0]["id"] == "in-flight"
    assert summary.interrupted and summary.done < 40  # stopped early: exit 130, as without the API
    first = [row["id"] for row in read_rows(out)]
    assert len(first) == len(set(first)) == summary.done and "in-flight" not in first
    # Resumed without the API: the rest, each image once in all.
    again = run_caption_job(str(root), out, job.settings, show_progress=False, captioner=gated.wrapped)
    assert (again.skipped, again.done) == (summary.done, 40 - summary.done)
    rows = [row["id"] for row in read_rows(out)]
    assert sorted(rows) == sorted(path.name for path in root.iterdir())


def test_beyond_loopback_without_tokens_the_job_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = job_settings(host="0.0.0.0")
    with pytest.raises(SettingsError, match="WORKER_HTTP__TOKENS is empty"):
        BulkApi.open(settings)
    for name, value in {"WORKER_HTTP__ENABLED": "true", "WORKER_HTTP__HOST": "0.0.0.0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORKER_HTTP__TOKENS", raising=False)
    root = folder(tmp_path, 1)
    code = captionfleet_main(["caption", str(root), "--out", str(tmp_path / "out.jsonl"), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err
    assert "WORKER_HTTP__TOKENS is empty" in error and "127.0.0.1" in error
    assert not (tmp_path / "out.jsonl").exists()  # refused before anything was written
    # With a token the same host is allowed (the port is bound, then freed).
    BulkApi.open(job_settings(host="0.0.0.0", tokens=[TOKEN])).close()


def test_while_the_jobs_model_loads_the_api_answers_503_starting_at_once_then_serves_the_same_request(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The port is open from before the model loads (a taken port fails the job before it writes anything): a
    request then gets a quick 503 with Retry-After, not a connection that hangs until the model is in."""
    root, out = folder(tmp_path, 12), tmp_path / "captions.jsonl"
    gated = GatedModel(tiny_model(tiny_checkpoint))
    loaded = threading.Event()
    job = Job(job_settings(), gated, loading_first(loaded, folder_job(root, out))).start()
    image = {"id": "early", "data": base64.b64encode(JPEG).decode()}
    try:
        started = time.monotonic()
        early = post_promptly(job.url, json=image)
        assert time.monotonic() - started < 5
        assert early.status_code == 503 and early.json()["error"]["kind"] == "starting", early.text
        assert early.headers["retry-after"] == str(job.settings.http.retry_after_s)
        models = httpx.get(job.url.replace("/captions", "/models"), timeout=10)
        assert models.status_code == 503 and models.json()["error"]["kind"] == "starting"  # no version yet
        assert job.sample("captionfleet_http_refused_total", reason="starting") == 2
        assert not job.draining and job.thread.is_alive()

        loaded.set()  # the model is in: the job's pipeline runs, its first batch held at the gate
        gated.wait_entered(1)
        client, answers = post_in_thread(job.url, json=image)
        eventually(lambda: job.sample("captionfleet_http_queued_images") == 1, "the API image offered")
        gated.step()
        gated.step()
        client.join(60)
        assert answers and answers[0].status_code == 200, answers
        assert answers[0].json()["results"][0]["id"] == "early" and answers[0].json()["results"][0]["ok"]
    finally:
        loaded.set()
        gated.open()
        job.thread.join(120)
    summary = job.summaries[0]
    assert (summary.done, summary.failed, summary.interrupted) == (12, 0, False)
    assert sorted(row["id"] for row in read_rows(out)) == sorted(path.name for path in root.iterdir())


def test_a_job_with_nothing_to_do_answers_503_starting_until_it_exits_as_usual(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = folder(tmp_path, 3), tmp_path / "captions.jsonl"
    model = tiny_model(tiny_checkpoint)
    run_caption_job(str(root), out, job_settings(enabled=False), show_progress=False, captioner=model)
    loaded = threading.Event()
    job = Job(job_settings(), GatedModel(model), loading_first(loaded, folder_job(root, out))).start()
    try:
        early = post_promptly(job.url, json={"data": base64.b64encode(JPEG).decode()})
        assert early.status_code == 503 and early.json()["error"]["kind"] == "starting", early.text
        assert "retry-after" in early.headers
    finally:
        loaded.set()
        job.thread.join(60)
    assert not job.thread.is_alive()
    summary = job.summaries[0]
    assert (summary.total, summary.skipped, summary.done, summary.interrupted) == (3, 3, 0, False)
    with pytest.raises(httpx.ConnectError):  # the job is over: the port is closed
        httpx.post(job.url, json={"data": base64.b64encode(JPEG).decode()}, timeout=10)
    # The command itself: exit 0, as without the API.
    for name, value in {"WORKER_HTTP__ENABLED": "true", "WORKER_HTTP__PORT": "0"}.items():
        monkeypatch.setenv(name, value)
    assert captionfleet_main(["caption", str(root), "--out", str(out), "--no-progress"]) == 0
    assert "results:" in capsys.readouterr().out
