"""Model references: local checks, refusals and the offline hub path (no services needed)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from captionfleet.core.model_store import BUILTIN_REF, ModelRefError, check_checkpoint_dir, resolve_model_ref
from captionfleet.core.s3 import parse_s3_uri


def make_checkpoint(path: Path, *files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_bytes(b"{}" if name.endswith(".json") else b"\0")
    return path


def test_local_dir_resolves_to_itself(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "config.json", "model.safetensors", "vocab.json")
    assert resolve_model_ref(str(ckpt), cache_dir=tmp_path / "cache") == ckpt


def test_pickled_weights_only_are_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "config.json", "pytorch_model.bin")
    with pytest.raises(ModelRefError, match="only safetensors are loaded") as info:
        resolve_model_ref(str(ckpt), cache_dir=tmp_path / "cache")
    assert "pytorch_model.bin" in str(info.value)
    assert "save_pretrained" in str(info.value)  # names the conversion


def test_pickled_beside_safetensors_is_allowed_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "config.json", "model.safetensors", "training_args.bin")
    with caplog.at_level(logging.WARNING, logger="captionfleet.core.model_store"):
        check_checkpoint_dir(ckpt)
    assert "training_args.bin" in caplog.text


def test_missing_config_is_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "model.safetensors")
    with pytest.raises(ModelRefError, match=r"config\.json"):
        check_checkpoint_dir(ckpt)


def test_no_weights_at_all_is_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "config.json")
    with pytest.raises(ModelRefError, match="safetensors"):
        check_checkpoint_dir(ckpt)


@pytest.mark.parametrize("ref", ["./no/such/dir", "no-such-dir", "/definitely/not/here/x/y", "a/b/c"])
def test_nonexistent_path_is_refused(tmp_path: Path, ref: str) -> None:
    with pytest.raises(ModelRefError, match="--model"):
        resolve_model_ref(ref, cache_dir=tmp_path / "cache")


def test_builtin_ref_gives_a_checkpoint_or_says_how_to_build_it(tmp_path: Path) -> None:
    try:
        path = resolve_model_ref(BUILTIN_REF, cache_dir=tmp_path)
    except ModelRefError as error:
        assert "captionfleet train --preset shapes" in str(error)
    else:
        assert (path / "config.json").is_file()


@pytest.mark.timeout(30)
def test_unreachable_hub_fails_fast_with_model_ref_error(tmp_path: Path) -> None:
    # No internet here: must fail (not hang) and name the alternatives. Where the hub is reachable,
    # this repo does not exist, which is a ModelRefError too.
    started = time.monotonic()
    with pytest.raises(ModelRefError, match="could not load model 'captionfleet-tests/no-such-model-7f3a9c'"):
        resolve_model_ref("captionfleet-tests/no-such-model-7f3a9c", cache_dir=tmp_path)
    assert time.monotonic() - started < 20


@pytest.mark.timeout(30)
def test_hub_offline_mode_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelRefError, match="hub is unreachable and it is not in the cache") as info:
        resolve_model_ref("captionfleet-tests/no-such-model-7f3a9c", cache_dir=tmp_path)
    assert "s3://bucket/prefix" in str(info.value)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/models/tiny/", ("bucket", "models/tiny/")),
        ("s3://bucket/a/b.jpg", ("bucket", "a/b.jpg")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://my.bucket-1/k?x#y", ("my.bucket-1", "k?x#y")),  # keys may hold ? and #
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    ["", "bucket/key", "http://bucket/key", "s3://", "s3:///key", "s3://localhost:9000/b/k", "s3://ab/k"],
)
def test_parse_s3_uri_rejects_malformed(uri: str) -> None:
    with pytest.raises(ValueError, match="s3://"):
        parse_s3_uri(uri)


def test_malformed_s3_ref_is_a_model_ref_error(tmp_path: Path) -> None:
    with pytest.raises(ModelRefError, match="no bucket"):
        resolve_model_ref("s3:///models/x", cache_dir=tmp_path)
