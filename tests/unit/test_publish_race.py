"""Publishing (trainer/publish.py) against an in-memory registry while LATEST moves under it: the gate's
decision is about the LATEST it scored, so LATEST moves only if it still names that version."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from captionfleet.trainer.publish import EvalSet, PublishOutcome, publish_version
from captionfleet.trainer.registry import LatestMovedError, LatestState, Registry
from tests.unit.test_s3_fake import FakeS3, client_error

ROOT = "s3://bucket/models/x"
LATEST_KEY = "models/x/LATEST"


class RegistryS3(FakeS3):
    """FakeS3 with what the registry also calls: upload_file, a paginator, and conditional PutObject
    (IfMatch / IfNoneMatch="*", 412 PreconditionFailed as S3 answers), or 501 for a store without it."""

    conditional_writes = True

    def put_object(self, **kwargs: Any) -> dict[str, Any]:
        bucket, key = kwargs["Bucket"], kwargs["Key"]
        self._enter("PutObject", bucket, key, kwargs)
        conditional = "IfMatch" in kwargs or "IfNoneMatch" in kwargs
        if conditional and not self.conditional_writes:
            raise client_error("NotImplemented", 501, "PutObject")
        exists = (bucket, key) in self.objects
        if "IfMatch" in kwargs and (not exists or self.etag(bucket, key) != kwargs["IfMatch"]):
            raise client_error("PreconditionFailed", 412, "PutObject")
        if kwargs.get("IfNoneMatch") == "*" and exists:
            raise client_error("PreconditionFailed", 412, "PutObject")
        self.objects[(bucket, key)] = bytes(kwargs["Body"])
        return {"ETag": self.etag(bucket, key)}

    def upload_file(self, filename: str, bucket: str, key: str) -> None:
        self.put_object(Bucket=bucket, Key=key, Body=Path(filename).read_bytes())

    def get_paginator(self, operation: str) -> Any:
        fake = self

        class Paginator:
            def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
                yield fake.list_objects_v2(**kwargs)

        return Paginator()


def scores(cider: float) -> dict[str, Any]:
    return {"cider": cider, "bleu4": 0.3, "exact_match": 0.5}


def stored(registry: Registry, version: str, status: str = "promoted") -> None:
    """A complete version in the registry (files, record), as an earlier publish leaves it."""
    registry.put_json(registry.key("versions", version, "captionfleet.json"), {"version": version})
    registry.write_record(version, {"version": version, "status": status, "reason": "earlier", "scores": scores(1)})


def checkpoint(tmp_path: Path, version: str) -> Path:
    path = tmp_path / version
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 8)
    (path / "captionfleet.json").write_text(json.dumps({"version": version}))
    return path


@pytest.fixture
def s3() -> RegistryS3:
    fake = RegistryS3()
    fake.buckets.add("bucket")
    return fake


@pytest.fixture
def registry(s3: RegistryS3) -> Registry:
    registry = Registry(ROOT, client=s3)  # type: ignore[arg-type]
    stored(registry, "L")
    registry.set_latest("L", action="publish")
    return registry


def gate(
    monkeypatch: pytest.MonkeyPatch,
    candidate: float,
    baseline: float,
    while_scoring_baseline: Callable[[], None] = lambda: None,
) -> None:
    """Scores without models: ``while_scoring_baseline`` runs while LATEST's version is scored (the
    slow part, after the gate read LATEST), as another publisher or an operator would."""

    def score(path: Path, eval_set: Any, decoding: Any, device: str, precision: str | None = None) -> dict[str, Any]:
        if path.name.startswith("baseline-"):
            while_scoring_baseline()
            return {**scores(baseline), "precision": precision}
        return {**scores(candidate), "precision": "bf16"}  # what "auto" resolves to on some GPU

    monkeypatch.setattr("captionfleet.trainer.publish.score_checkpoint", score)
    monkeypatch.setattr("captionfleet.trainer.publish.ensure_eval_set", lambda *a: EvalSet(None, "0" * 64))  # type: ignore[arg-type]
    monkeypatch.setattr(
        "captionfleet.trainer.publish.resolve_model_ref", lambda ref, **kw: Path("baseline-" + ref.rsplit("/", 1)[-1])
    )


def publish(registry: Registry, tmp_path: Path, version: str = "vB") -> PublishOutcome:
    return publish_version(checkpoint(tmp_path, version), registry, cache_dir=tmp_path / "cache")


def test_a_publish_made_while_scoring_is_not_undone(
    registry: Registry, s3: RegistryS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def publisher_a() -> None:  # another publish passes its gate and promotes vA meanwhile
        other = Registry(ROOT, client=s3)  # type: ignore[arg-type]
        stored(other, "vA", status="candidate")
        other.set_latest("vA", action="publish", reason="publisher A")

    gate(monkeypatch, candidate=2.0, baseline=1.0, while_scoring_baseline=publisher_a)
    outcome = publish(registry, tmp_path)
    assert registry.latest() == "vA"
    assert not outcome.promoted and outcome.baseline == "L"
    record = registry.record("vB")
    assert record is not None and record["status"] == "candidate"
    assert "LATEST changed from L to vA while this version was being scored" in record["reason"]
    assert "publish again" in record["reason"] and outcome.reason == record["reason"]
    assert record["scores"]["cider"] == 2.0  # the scores are kept with the reason
    assert [entry["version"] for entry in registry.history()] == ["L", "vA"]


def test_a_move_between_the_re_read_and_the_write_is_caught_by_the_conditional_write(
    registry: Registry, s3: RegistryS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rollback_just_before_the_write(operation: str, kwargs: dict[str, Any]) -> None:
        if operation == "PutObject" and kwargs["Key"] == LATEST_KEY:
            s3.on_call = None
            s3.objects[("bucket", LATEST_KEY)] = b"vOld\n"  # an operator's write lands first

    gate(monkeypatch, candidate=2.0, baseline=1.0)
    s3.on_call = rollback_just_before_the_write
    outcome = publish(registry, tmp_path)
    assert registry.latest() == "vOld"
    assert not outcome.promoted and "LATEST changed from L to vOld" in outcome.reason


def test_without_a_race_the_version_is_promoted_also_where_conditional_writes_are_missing(
    registry: Registry, s3: RegistryS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate(monkeypatch, candidate=2.0, baseline=1.0)
    s3.conditional_writes = False
    outcome = publish(registry, tmp_path)
    assert outcome.promoted and registry.latest() == "vB"
    record = registry.record("vB")
    assert record is not None and record["status"] == "promoted" and record["baseline"] == "L"


def test_the_first_version_is_written_only_if_there_is_still_no_latest(s3: RegistryS3) -> None:
    registry = Registry(ROOT, client=s3)  # type: ignore[arg-type]
    stored(registry, "v1", status="candidate")
    nothing = registry.latest_state()
    assert nothing == LatestState(None, None)
    s3.put("bucket", LATEST_KEY, b"v0\n")  # someone else was first
    with pytest.raises(LatestMovedError, match="from None to v0"):
        registry.set_latest("v1", action="publish", expect=nothing)
    s3.objects.pop(("bucket", LATEST_KEY))
    registry.set_latest("v1", action="publish", expect=nothing)
    assert registry.latest() == "v1"


def test_a_hand_promotion_during_scoring_is_not_overwritten_by_the_gate_result(
    registry: Registry, s3: RegistryS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def operator_promotes_vb() -> None:
        Registry(ROOT, client=s3).promote("vB", "needed now")  # type: ignore[arg-type]

    gate(monkeypatch, candidate=0.5, baseline=1.0, while_scoring_baseline=operator_promotes_vb)
    outcome = publish(registry, tmp_path)
    assert not outcome.promoted  # the gate rejected it; LATEST is the operator's doing
    assert registry.latest() == "vB"
    record = registry.record("vB")
    assert record is not None and record["status"] == "promoted" and record["promoted_by"] == "promote"
    assert record["scores"]["cider"] == 0.5 and "below LATEST" in record["reason"]


def test_publishing_again_reports_promoted_only_while_latest_names_the_version(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate(monkeypatch, candidate=2.0, baseline=1.0)
    stored(registry, "vB")  # promoted once...
    stored(registry, "vC")
    registry.set_latest("vC", action="publish")  # ...then replaced: its record still says promoted
    outcome = publish(registry, tmp_path)
    assert not outcome.promoted
    assert "LATEST now names vC" in outcome.reason
    assert registry.latest() == "vC"

    registry.set_latest("vB", action="promote")
    again = publish_version(tmp_path / "vB", registry, cache_dir=tmp_path / "cache")
    assert again.promoted and "already published" in again.reason


def test_latest_is_scored_at_the_precision_the_candidate_was_scored_at(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU "auto" resolves per checkpoint (bf16 for one saved so, fp16 for another): the gate compares
    the two models at one precision, the candidate's, and each record names it."""
    gate(monkeypatch, candidate=1.2, baseline=1.0)
    assert publish(registry, tmp_path).promoted
    record = registry.record("vB")
    assert record is not None
    assert record["scores"]["precision"] == "bf16" and record["baseline_scores"]["precision"] == "bf16"
