"""Publishing through the quality gate, and list / show / promote / rollback, on the real S3 server.

Two tiny checkpoints with known quality on a fixed evaluation set: its references are exactly the
captions the "good" one writes, so it scores 100% exact match and the "worse" one (other random
weights) scores less, whatever the random weights happen to say.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from captionfleet.cli import main as cli_main
from captionfleet.core.captioner import Captioner
from captionfleet.core.model_store import resolve_model_ref
from captionfleet.core.settings import DecodingSettings, S3Settings
from captionfleet.trainer.data import ImageCaptionDataset
from captionfleet.trainer.evaluate import normalize
from captionfleet.trainer.publish import EVAL, Gate, publish_version, read_eval_set
from captionfleet.trainer.registry import Registry, RegistryError
from captionfleet.trainer.shapes import ShapesDataset
from tests.conftest import save_tiny_checkpoint
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DECODING = DecodingSettings(num_beams=1, max_new_tokens=8)
EVAL_IMAGES = 6


def s3_settings(server: SeaweedS3) -> S3Settings:
    return S3Settings(
        endpoint_url=server.endpoint_url,
        access_key_id=SecretStr(server.access_key),
        secret_access_key=SecretStr(server.secret_key),
    )


def test_publish_gate_list_promote_rollback(
    s3_server: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3 = s3_settings(s3_server)
    # Seeds whose random weights write words (seed 0 writes bytes that normalise to nothing).
    good = save_tiny_checkpoint(tmp_path / "good", seed=2)
    worse = save_tiny_checkpoint(tmp_path / "worse", seed=1)
    pictures = ShapesDataset(seed=7, length=EVAL_IMAGES, image_size=32)
    images = [pictures.image(i) for i in range(EVAL_IMAGES)]
    good_captions = Captioner.from_dir(good, device="cpu", decoding=DECODING).caption(images)
    worse_captions = Captioner.from_dir(worse, device="cpu", decoding=DECODING).caption(images)
    assert all(normalize(c) for c in good_captions), good_captions
    assert good_captions != worse_captions  # else the gate could not tell them apart
    fixed = ImageCaptionDataset(images, [[c] for c in good_captions], "references = the good model's captions")

    root = f"s3://{s3_bucket}/models/tiny"
    registry = Registry(root, s3)
    common = dict(gate=Gate("exact_match", 0.1), decoding=DECODING, device="cpu", cache_dir=tmp_path / "cache", s3=s3)

    # -- the first version: writes the evaluation set, becomes LATEST --------------------------------
    first = publish_version(good, registry, eval_source=fixed, eval_size=EVAL_IMAGES, name="tiny", **common)  # type: ignore[arg-type]
    assert first.promoted, first.reason
    assert registry.latest() == first.version and first.version.startswith("tiny-")
    assert first.scores["exact_match"] == 1.0
    eval_digest = read_eval_set(registry).digest

    # -- a worse one: rejected, LATEST unchanged, stored with scores and reason ----------------------
    second = publish_version(worse, registry, name="tiny", **common)  # type: ignore[arg-type]
    assert not second.promoted
    assert registry.latest() == first.version
    record = registry.record(second.version)
    assert record is not None and record["status"] == "rejected"
    assert record["scores"]["exact_match"] < 0.9 and record["baseline"] == first.version
    assert record["baseline_scores"]["exact_match"] == 1.0
    assert "exact_match" in record["reason"] and "below LATEST" in record["reason"]
    # Judged on the same stored set, not a new draw; and the rejected files are all there, loadable.
    assert read_eval_set(registry).digest == eval_digest
    assert record["scores"]["eval_set"] == first.scores["eval_set"] == eval_digest[:16]
    info = registry.get_json(registry.key(EVAL, "info.json"))
    assert info is not None and info["sha256"] == eval_digest
    assert len(registry.list_keys(registry.key(EVAL, info["folder"], "images") + "/")) == EVAL_IMAGES
    stored = resolve_model_ref(registry.version_uri(second.version), cache_dir=tmp_path / "cache2", s3=s3)
    assert Captioner.from_dir(stored, device="cpu", decoding=DECODING).version == second.version
    # Publishing the same weights again changes nothing.
    again = publish_version(worse, registry, name="tiny", **common)  # type: ignore[arg-type]
    assert not again.promoted and registry.latest() == first.version

    # -- operations through the CLI ------------------------------------------------------------------
    monkeypatch.setenv("TRAINER_S3__ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("TRAINER_S3__ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("TRAINER_S3__SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.chdir(tmp_path)  # no stray .env

    def models(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli_main(["models", "--root", root, *args])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    code, out = models("list")
    assert code == 0
    lines = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in out.splitlines()}
    assert lines[first.version].startswith("*") and "promoted" in lines[first.version]
    assert "rejected" in lines[second.version] and not lines[second.version].startswith("*")

    code, out = models("show", second.version)
    assert code == 0 and "below LATEST" in out and '"latest": false' in out

    code, out = models("promote", second.version, "--reason", "operator says so")
    assert code == 0 and registry.latest() == second.version

    code, out = models("rollback")
    assert code == 0, out
    assert registry.latest() == first.version
    assert (registry.record(second.version) or {})["status"] == "rolled_back"
    history = registry.history()
    assert [(e["action"], e["version"]) for e in history] == [
        ("publish", first.version),
        ("promote", second.version),
        ("rollback", first.version),
    ]

    code, out = models("rollback")  # nothing earlier than the first version
    assert code == 1 and "nothing earlier" in out and registry.latest() == first.version

    # An upload that never finished (no record) can never become LATEST.
    registry.client.upload_file(str(good / "config.json"), s3_bucket, registry.key("versions", "half", "config.json"))
    code, out = models("promote", "half")
    assert code == 1 and "not a complete upload" in out and registry.latest() == first.version
    assert {row["version"]: row["status"] for row in registry.versions()}["half"] == "incomplete"
    with pytest.raises(RegistryError):
        registry.rollback(to=first.version)  # already LATEST
