"""A LATEST that cannot be loaded, met by `captionfleet train` on the real S3 server: `--init-from latest`
trains nothing and `--publish-to` stores the new version with its own scores, LATEST unchanged; both end in
one error line naming LATEST and the fix, with exit 5. `--promote-unjudged` promotes it anyway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionfleet.core.failures import EXIT_LATEST_UNUSABLE, EXIT_OK
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.__main__ import main as train_main
from captionfleet.trainer.data import ImageCaptionDataset
from captionfleet.trainer.publish import Gate, publish_version
from captionfleet.trainer.registry import Registry
from captionfleet.trainer.shapes import ShapesDataset
from tests.conftest import save_tiny_checkpoint
from tests.integration.test_lifecycle_registry import s3_settings
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DECODING = DecodingSettings(num_beams=1, max_new_tokens=8)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def remove_files(server: SeaweedS3, registry: Registry, version: str, names: tuple[str, ...]) -> None:
    client = server.client()
    for name in names:
        client.delete_object(Bucket=registry.bucket, Key=registry.key("versions", version, name))


def shapes_manifest(folder: Path, shapes: ShapesDataset, indices: range) -> Path:
    folder.mkdir()
    lines = []
    for i in indices:
        shapes.image(i).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": shapes.captions(i)[0]}))
    manifest = folder / "captions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_an_unusable_latest_is_named_in_one_line_and_the_new_version_keeps_its_scores(
    s3_server: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3 = s3_settings(s3_server)
    registry = Registry(f"s3://{s3_bucket}/models/tiny", s3)
    shapes = ShapesDataset(seed=11, length=12, image_size=32)
    fixed = ImageCaptionDataset([shapes.image(i) for i in range(3)], [shapes.captions(i) for i in range(3)], "shapes")
    first_dir = save_tiny_checkpoint(tmp_path / "v1", seed=2)
    first = publish_version(
        first_dir,
        registry,
        gate=Gate(),
        decoding=DECODING,
        device="cpu",
        cache_dir=tmp_path / "cache",
        s3=s3,
        eval_source=fixed,
        eval_size=3,
        name="tiny",
    )
    assert first.promoted
    remove_files(s3_server, registry, first.version, TOKENIZER_FILES)  # LATEST can no longer be loaded

    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in (
        ("TRAINER_S3__ENDPOINT_URL", s3_server.endpoint_url),
        ("TRAINER_S3__ACCESS_KEY_ID", s3_server.access_key),
        ("TRAINER_S3__SECRET_ACCESS_KEY", s3_server.secret_key),
        ("TRAINER_PUBLISH_TO", registry.root),
    ):
        monkeypatch.setenv(name, value)
    data = shapes_manifest(tmp_path / "data", shapes, range(3, 12))
    # fmt: off
    common = [
        "--data", str(data), "--name", "tiny", "--cache-dir", str(tmp_path / "cache"), "--max-steps", "2",
        "--batch-size", "4", "--warmup-steps", "1", "--eval-interval", "2", "--eval-batches", "1",
        "--eval-caption-samples", "0", "--val-fraction", "0.25", "--max-val-images", "2", "--threads", "1",
        "--device", "cpu", "--num-beams", "1", "--max-new-tokens", "8", "--no-progress",
    ]
    # fmt: on

    def train(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = train_main([*args, *common])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    def last_error_line(err: str) -> str:
        assert "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    # -- a refresh from LATEST: nothing is trained ----------------------------------------------------
    code, _, err = train("--init-from", "latest", "--out-dir", str(tmp_path / "refresh"))
    assert code == EXIT_LATEST_UNUSABLE, err
    line = last_error_line(err)
    assert line.startswith(f"error: LATEST of {registry.root} names {first.version}, which cannot be loaded (")
    assert "tokenizer" in line and f"captionfleet models --root {registry.root} rollback" in line
    assert str(tmp_path / "cache") not in line  # names the version, not a cache folder
    assert not (tmp_path / "refresh").exists()
    assert [row["version"] for row in registry.versions()] == [first.version]

    # -- a publish from elsewhere: stored, scored on its own, not promoted ---------------------------
    code, out, err = train("--init-from", str(first_dir), "--out-dir", str(tmp_path / "second"))
    assert code == EXIT_LATEST_UNUSABLE, err
    line = last_error_line(err)
    assert line.startswith(f"error: LATEST of {registry.root} names {first.version}, which cannot be loaded (")
    assert "is stored with its own scores but not promoted" in line and "--promote-unjudged" in line
    assert "NOT JUDGED (LATEST unchanged)" in out
    assert registry.latest() == first.version
    second = json.loads((tmp_path / "second" / "captionfleet.json").read_text())["version"]
    record = registry.record(second)
    assert record is not None and record["status"] == "unjudged"
    assert {"cider", "bleu4", "exact_match", "eval_set"} <= set(record["scores"])
    assert record["baseline"] == first.version and record["baseline_scores"] is None
    assert "tokenizer" in record["latest_error"] and record["gate"]["judged"] is False

    # -- asked to, the gate promotes it on its own scores --------------------------------------------
    code, out, err = train("--init-from", str(first_dir), "--out-dir", str(tmp_path / "second"), "--promote-unjudged")
    assert code == EXIT_OK, err
    promoted = registry.latest()
    assert promoted is not None and promoted != first.version
    record = registry.record(promoted)
    assert record is not None and record["status"] == "promoted" and "as asked" in record["reason"]

    # -- a LATEST without its image processor config (a traceback from the scorer before) -----------
    remove_files(s3_server, registry, promoted, ("preprocessor_config.json",))
    code, out, err = train("--init-from", str(first_dir), "--out-dir", str(tmp_path / "third"), "--seed", "5")
    assert code == EXIT_LATEST_UNUSABLE, err
    line = last_error_line(err)
    assert line.startswith(f"error: LATEST of {registry.root} names {promoted}, which cannot be loaded (")
    assert "preprocessor_config.json" in line
    assert registry.latest() == promoted
