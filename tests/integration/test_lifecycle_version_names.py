"""Versions named by the start of their name, on the real S3 server: `captionfleet models show/promote/rollback
--to` and `captionfleet train --init-from` take an unambiguous prefix; an ambiguous one lists the candidates,
an unknown one says how to list versions; both are usage errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionfleet.cli import main as cli_main
from captionfleet.core.failures import EXIT_OK, EXIT_USAGE
from captionfleet.trainer.__main__ import main as train_main
from captionfleet.trainer.refresh import resolve_init_from
from captionfleet.trainer.registry import Registry, VersionNameError
from captionfleet.trainer.settings import TrainerSettings
from tests.integration.test_lifecycle_registry import s3_settings
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

VERSIONS = ("tiny-3f2a9c01b7de", "tiny-3f2b00000000", "tiny-9e1d44445555", "tiny-1", "tiny-12")


def store(registry: Registry, version: str) -> None:
    """A complete version as a publish leaves it (files, then a record); no model is needed to name it."""
    registry.put_json(registry.key("versions", version, "captionfleet.json"), {"version": version})
    registry.write_record(version, {"version": version, "status": "rejected", "reason": "stored for the test"})


@pytest.fixture
def registry(s3_server: SeaweedS3, s3_bucket: str) -> Registry:
    registry = Registry(f"s3://{s3_bucket}/models/tiny", s3_settings(s3_server))
    for version in VERSIONS:
        store(registry, version)
    registry.promote("tiny-1")
    return registry


def test_a_prefix_names_the_one_version_it_begins(registry: Registry) -> None:
    assert registry.resolve_version("tiny-3f2a") == "tiny-3f2a9c01b7de"
    assert registry.resolve_version("tiny-9") == "tiny-9e1d44445555"
    assert registry.resolve_version("tiny-3f2b00000000") == "tiny-3f2b00000000"  # a full name
    assert registry.resolve_version("tiny-1") == "tiny-1"  # a full name wins over tiny-12, which it begins
    with pytest.raises(VersionNameError, match=r"'tiny-3f2' is the start of 2 versions .*tiny-3f2a9c01b7de, tiny-3f2b"):
        registry.resolve_version("tiny-3f2")
    with pytest.raises(
        VersionNameError, match=r"no version .* starts with 'tiny-0'.*captionfleet models --root .* list"
    ):
        registry.resolve_version("tiny-0")
    with pytest.raises(VersionNameError, match="not a valid name"):
        registry.resolve_version("../x")


def test_the_models_commands_take_a_prefix(
    registry: Registry,
    s3_server: SeaweedS3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRAINER_S3__ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("TRAINER_S3__ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("TRAINER_S3__SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.chdir(tmp_path)  # no stray .env

    def models(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli_main(["models", "--root", registry.root, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    # A record written before records named the model: show reads the family from the version's config.json.
    registry.put_json(registry.key("versions", "tiny-3f2a9c01b7de", "config.json"), {"model_type": "git"})
    code, out, _ = models("show", "tiny-3f2a")
    assert code == EXIT_OK
    shown = json.loads(out)
    assert shown["version"] == "tiny-3f2a9c01b7de" and shown["family"] == "git"

    code, out, _ = models("promote", "tiny-9e")
    assert code == EXIT_OK and out.strip() == "LATEST: tiny-1 -> tiny-9e1d44445555"
    assert registry.latest() == "tiny-9e1d44445555"

    code, out, _ = models("rollback", "--to", "tiny-3f2a")
    assert code == EXIT_OK and registry.latest() == "tiny-3f2a9c01b7de"

    code, _, err = models("promote", "tiny-3f2")
    assert code == EXIT_USAGE and registry.latest() == "tiny-3f2a9c01b7de"
    assert err.count("\n") == 1 and "tiny-3f2a9c01b7de, tiny-3f2b00000000" in err and "give more" in err

    code, _, err = models("show", "nope")
    assert code == EXIT_USAGE and f"captionfleet models --root {registry.root} list" in err


def test_init_from_takes_a_version_or_its_prefix(
    registry: Registry,
    s3_server: SeaweedS3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = TrainerSettings(publish_to=registry.root, s3=s3_settings(s3_server))

    def init_from(ref: str) -> str:
        return resolve_init_from(settings.model_copy(update={"init_from": ref})).init_from

    assert init_from("tiny-3f2a") == registry.version_uri("tiny-3f2a9c01b7de")
    assert init_from(f"{registry.root}/versions/tiny-9e") == registry.version_uri("tiny-9e1d44445555")
    assert init_from("builtin") == "builtin"  # other refs are left to the model store
    assert init_from("org/model") == "org/model"
    with pytest.raises(VersionNameError, match="'tiny-3f2' is no local folder, and 'tiny-3f2' is the start of 2"):
        init_from("tiny-3f2")

    # The command: one line, a usage error, nothing trained.
    monkeypatch.setenv("TRAINER_S3__ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("TRAINER_S3__ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("TRAINER_S3__SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert train_main(["--init-from", "tiny-0", "--publish-to", registry.root, "--out-dir", "out"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --init-from 'tiny-0' is no local folder") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
