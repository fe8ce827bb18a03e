"""A GIT model trained here goes through the same gate and registry as ViT-GPT2, on the real S3 server.

`captionfleet train --preset shapes-git --publish-to ...` (a few steps: behaviour, not quality) stores the
fixed evaluation set from the GIT model's own image processor, records the version as family git and makes
it LATEST; a refresh from LATEST fine-tunes GIT again and is judged against it; the worker serves LATEST, and
`captionfleet caption` captions fresh shapes pictures with it from the registry, beside the built-in model.
The full preset's score (greedy exact match on fresh pictures) is measured by its own run: README, Training.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from captionfleet.cli import main as cli_main
from captionfleet.core.failures import EXIT_OK, EXIT_REJECTED, EXIT_SOME_FAILED
from captionfleet.core.families.captioner import FamilyCaptioner
from captionfleet.core.loading import load_model
from captionfleet.core.settings import WorkerSettings
from captionfleet.demo import DEMO_SEED, write_archive
from captionfleet.trainer.__main__ import main
from captionfleet.trainer.publish import read_eval_set
from captionfleet.trainer.registry import Registry
from captionfleet.worker.sinks import read_rows
from tests.integration.test_lifecycle_registry import s3_settings
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EVAL_IMAGES = 4


def quick(tmp_path: Path, name: str, root: str, *extra: str) -> list[str]:
    return [
        "--preset",
        "shapes-git",
        "--out-dir",
        str(tmp_path / name / "model"),
        "--run-dir",
        str(tmp_path / name / "run"),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--tokenizer-captions",
        "300",
        "--shapes-val-size",
        str(EVAL_IMAGES),
        "--max-val-images",
        str(EVAL_IMAGES),
        "--eval-set-size",
        str(EVAL_IMAGES),
        "--eval-caption-samples",
        "0",
        "--max-new-tokens",
        "6",
        "--no-progress",
        "--device",
        "cpu",
        "--publish-to",
        root,
        *extra,
    ]


def test_a_git_version_is_published_through_the_gate_recorded_as_git_and_served(
    s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (
        ("TRAINER_S3__ENDPOINT_URL", s3_server.endpoint_url),
        ("TRAINER_S3__ACCESS_KEY_ID", s3_server.access_key),
        ("TRAINER_S3__SECRET_ACCESS_KEY", s3_server.secret_key),
        ("TRAINER_CACHE_DIR", str(tmp_path / "cache")),
    ):
        monkeypatch.setenv(name, value)
    root = f"s3://{s3_bucket}/models/git-shapes"
    registry = Registry(root, s3_settings(s3_server))

    # -- the first version: trained from scratch, stores the evaluation set, becomes LATEST ------------
    assert main(quick(tmp_path, "first", root)) == EXIT_OK
    first = registry.latest()
    assert first is not None and first.startswith("git-shapes-")
    record = registry.record(first)
    assert record is not None and record["status"] == "promoted"
    assert record["model"]["family"] == "git" and record["model"]["processor"] == "GitProcessor"
    assert record["model"]["default_prompt"] is None and record["model"]["precision"] == "float32"
    assert record["scores"]["images"] == EVAL_IMAGES
    # The evaluation set was drawn at the GIT model's input size, read from its CLIP image processor.
    eval_set = read_eval_set(registry)
    assert eval_set is not None and len(eval_set.dataset) == EVAL_IMAGES
    assert eval_set.dataset.image(0).size == (64, 64)

    # -- a refresh: fine-tunes LATEST (a GIT) and is judged against it on the same set ------------------
    refresh = quick(tmp_path, "second", root, "--init-from", "latest", "--learning-rate", "1e-5", "--min-lr", "1e-6")
    assert main(refresh) in (EXIT_OK, EXIT_REJECTED)  # the gate's verdict on 2 steps is not the point
    second = next(v["version"] for v in registry.versions() if v["version"] != first)
    child = registry.record(second)
    assert child is not None and child["model"]["family"] == "git"
    assert child["baseline"] == first and child["baseline_scores"]["images"] == EVAL_IMAGES
    assert child["gate"]["judged"] is True and child["parent"]["version"] == first

    # -- the worker serves LATEST with the GIT family's captioner ----------------------------------------
    monkeypatch.setenv("WORKER_S3__ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("WORKER_S3__ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("WORKER_S3__SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("WORKER_MODEL__REF", f"{root}/LATEST")
    monkeypatch.setenv("WORKER_MODEL__CACHE_DIR", str(tmp_path / "worker-cache"))
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    captioner = load_model(WorkerSettings())
    assert isinstance(captioner, FamilyCaptioner) and captioner.family == "git"
    assert captioner.version == registry.latest()

    # -- and captions fresh shapes pictures from the registry, through the bulk path, beside the built-in ---
    pictures = tmp_path / "fresh"
    write_archive(pictures, count=EVAL_IMAGES, seed=DEMO_SEED, image_size=64)
    for name, model in (("git", f"{root}/LATEST"), ("builtin", "builtin")):
        out = tmp_path / f"{name}.jsonl"
        args = ["caption", str(pictures), "--out", str(out), "--model", model, "--num-beams", "1", "--no-progress"]
        # Two training steps may well end a caption at once: an empty caption is a failure row (exit 3), still
        # an answer from that model. Quality is the full run's to show.
        assert cli_main(args) in (EXIT_OK, EXIT_SOME_FAILED)
        rows = read_rows(out)
        assert sorted(row["id"] for row in rows) == sorted(path.name for path in pictures.iterdir())
        (version,) = {row["model_version"] for row in rows}  # one model answered them all
        assert (version == registry.latest()) if name == "git" else version.startswith("builtin-shapes-")
