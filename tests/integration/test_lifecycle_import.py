"""`captionfleet models import SRC`: bringing a model without training it, on the real S3 server.

The built-in model (`builtin`), a copied checkpoint folder, a worse one, and a tiny BLIP (a family this
captionfleet cannot load yet) go through the same upload, record and gate as a trained version: scored and
promoted or rejected where the gate can judge them, stored "unjudged" and promoted only with --promote where
it cannot. Every record names the family, processor, default prompt and precision.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from captionfleet.cli import main as cli_main
from captionfleet.core.failures import EXIT_LATEST_UNUSABLE, EXIT_OK, EXIT_REJECTED, EXIT_USAGE
from captionfleet.core.model_store import builtin_model_dir
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.checkpoint import weights_version
from captionfleet.trainer.data import ImageCaptionDataset
from captionfleet.trainer.families import default_prompt
from captionfleet.trainer.publish import Gate, publish_version
from captionfleet.trainer.registry import Registry
from captionfleet.trainer.shapes import ShapesDataset
from tests.conftest import save_tiny_checkpoint
from tests.integration.test_lifecycle_registry import s3_settings
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EVAL_IMAGES = 6
DECODING = DecodingSettings(num_beams=1, max_new_tokens=20)
Models = Callable[..., tuple[int, str, str]]


def save_tiny_blip(path: Path) -> Path:
    """A BLIP captioner small enough for a test, saved as save_pretrained writes it (safetensors)."""
    config = BlipConfig(
        text_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "max_position_embeddings": 32,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor"})
    )
    return path


@pytest.fixture
def models(
    s3_server: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Models:
    """``captionfleet models --root ROOT ARGS...`` in this process -> (exit status, stdout, stderr)."""
    for name, value in (
        ("TRAINER_S3__ENDPOINT_URL", s3_server.endpoint_url),
        ("TRAINER_S3__ACCESS_KEY_ID", s3_server.access_key),
        ("TRAINER_S3__SECRET_ACCESS_KEY", s3_server.secret_key),
        ("TRAINER_CACHE_DIR", str(tmp_path / "cache")),
        ("TRAINER_DEVICE", "cpu"),
        ("TRAINER_DECODING__NUM_BEAMS", str(DECODING.num_beams)),
        ("TRAINER_DECODING__MAX_NEW_TOKENS", str(DECODING.max_new_tokens)),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRAINER_PUBLISH_TO", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env

    def run(root: str, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli_main(["models", "--root", root, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_import_without_an_evaluation_set_needs_promote(s3_bucket: str, models: Models) -> None:
    root = f"s3://{s3_bucket}/models/fresh"
    code, out, err = models(root, "import", "builtin")
    assert code == EXIT_REJECTED, err
    assert "NOT JUDGED" in out and "no evaluation set" in out and "--promote" in one_error_line(err)
    code, out, err = models(root, "import", "builtin", "--promote")
    assert code == EXIT_OK, err
    version = json.loads((builtin_model_dir() / "captionfleet.json").read_text())["version"]
    assert out.startswith(f"{version}: promoted to LATEST")


def test_import_publishes_through_the_gate_and_records_the_family(
    s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path, models: Models
) -> None:
    s3 = s3_settings(s3_server)
    root = f"s3://{s3_bucket}/models/shapes"
    registry = Registry(root, s3)

    # LATEST: a random tiny model, and the evaluation set: real shapes pictures with their captions.
    pictures = ShapesDataset(seed=7, length=EVAL_IMAGES, image_size=64)
    fixed = ImageCaptionDataset(
        [pictures.image(i) for i in range(EVAL_IMAGES)], [pictures.captions(i) for i in range(EVAL_IMAGES)], "shapes"
    )
    first = publish_version(
        save_tiny_checkpoint(tmp_path / "tiny", seed=2),
        registry,
        gate=Gate(),
        decoding=DECODING,
        device="cpu",
        cache_dir=tmp_path / "cache",
        s3=s3,
        eval_source=fixed,
        eval_size=EVAL_IMAGES,
        name="tiny",
    )
    assert first.promoted

    # -- the built-in model: scored on the stored set, better than LATEST, promoted -------------------
    builtin_version = json.loads((builtin_model_dir() / "captionfleet.json").read_text())["version"]
    code, out, err = models(root, "import", "builtin")
    assert code == EXIT_OK, err
    assert out.startswith(f"{builtin_version}: promoted to LATEST")
    assert registry.latest() == builtin_version
    record = registry.record(builtin_version)
    assert record is not None and record["status"] == "promoted" and record["imported_from"] == "builtin"
    assert record["model"] == {
        "family": "vision-encoder-decoder",
        "processor": "ViTImageProcessor",
        "default_prompt": None,
        "precision": "float32",
    }
    assert record["scores"]["exact_match"] >= 0.8 and record["baseline"] == first.version
    assert registry.history()[-1]["action"] == "import"
    assert (registry.metadata(builtin_version) or {})["imported"]["from"] == "builtin"

    code, out, err = models(root, "show", builtin_version[:-6])
    assert code == EXIT_OK, err
    shown = json.loads(out)
    assert shown["family"] == "vision-encoder-decoder" and shown["latest"] is True

    # -- a copied checkpoint folder (no captionfleet.json): named <name>-<weights hash>, ties LATEST --
    copy = tmp_path / "copy"
    shutil.copytree(builtin_model_dir(), copy, ignore=shutil.ignore_patterns("captionfleet.json", "README.md"))
    code, out, err = models(root, "import", str(copy), "--name", "shapes-copy")
    assert code == EXIT_OK, err
    copy_version = weights_version(copy, "shapes-copy")
    assert copy_version == "shapes-copy-" + builtin_version.rsplit("-", 1)[1]  # the same weights, the same hash
    assert registry.latest() == copy_version
    record = registry.record(copy_version)
    assert record is not None and record["imported_from"] == str(copy) and record["baseline"] == builtin_version

    # -- a worse checkpoint: stored, rejected, exit 4 ---------------------------------------------------
    worse = save_tiny_checkpoint(tmp_path / "worse", seed=1)
    code, out, err = models(root, "import", str(worse), "--promote")
    assert code == EXIT_REJECTED, err
    assert "REJECTED (LATEST unchanged)" in out and "below LATEST" in out  # --promote never overrides a judgement
    assert registry.latest() == copy_version

    # -- a family the model layer does not serve: stored unjudged with what it is; LATEST only with --promote
    # (BLIP's weights under another model_type: transformers knows kosmos-2, core/family.py does not list it)
    blip = save_tiny_blip(tmp_path / "blip")
    config = json.loads((blip / "config.json").read_text())
    (blip / "config.json").write_text(json.dumps({**config, "model_type": "kosmos-2"}))
    code, out, err = models(root, "import", str(blip), "--name", "blip")
    assert code == EXIT_REJECTED, err
    assert "NOT JUDGED" in out and "cannot load family 'kosmos-2'" in out
    assert "--promote" in one_error_line(err)
    blip_version = weights_version(blip, "blip")
    record = registry.record(blip_version)
    assert record is not None and record["status"] == "unjudged" and record["scores"] is None
    assert record["model"] == {
        "family": "kosmos-2",
        "processor": "BlipProcessor",
        "default_prompt": default_prompt("kosmos-2"),
        "precision": "float32",
    }
    assert registry.latest() == copy_version

    code, out, err = models(root, "import", str(blip), "--name", "blip", "--promote")
    assert code == EXIT_OK, err
    assert registry.latest() == blip_version
    code, out, _ = models(root, "list")
    assert any(line.startswith("*") and "kosmos-2" in line.split()[3] for line in out.splitlines())

    # -- LATEST now cannot be loaded here: the next import names it, exit 5 -----------------------------
    code, out, err = models(root, "import", str(tmp_path / "tiny"), "--name", "again")
    assert code == EXIT_LATEST_UNUSABLE, err
    assert one_error_line(err).startswith(f"error: LATEST of {root} names {blip_version}, which cannot be loaded")
    assert registry.latest() == blip_version

    # -- a source that cannot be used: one line, exit 2, nothing stored ---------------------------------
    versions_before = registry.version_names()
    code, out, err = models(root, "import", "captionfleet-tests/no-such-model-7f3a9c")
    assert code == EXIT_USAGE and "could not load model" in one_error_line(err)
    assert registry.version_names() == versions_before
