"""The quality gate's decision and the registry's refusals that need no object storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from captionfleet.core.failures import EXIT_LATEST_UNUSABLE, EXIT_OK, EXIT_REJECTED
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.evaluate import scoring_precision
from captionfleet.trainer.models_cli import format_table
from captionfleet.trainer.publish import Gate, PublishOutcome, gate_decision
from captionfleet.trainer.registry import Registry, RegistryError


def scores(cider: float, exact: float = 0.5) -> dict[str, Any]:
    return {"cider": cider, "bleu4": 0.3, "exact_match": exact}


def test_first_version_is_promoted() -> None:
    promote, why = gate_decision(scores(0.1), None, Gate())
    assert promote and "first version" in why


@pytest.mark.parametrize(
    ("new", "old", "tolerance", "promote"),
    [
        (1.00, 1.00, 0.0, True),  # equal is not worse
        (1.20, 1.00, 0.0, True),
        (0.96, 1.00, 0.05, True),  # within the tolerance
        (0.94, 1.00, 0.05, False),
        (0.99, 1.00, 0.0, False),
    ],
)
def test_gate_compares_with_latest_within_the_tolerance(
    new: float, old: float, tolerance: float, promote: bool
) -> None:
    decided, why = gate_decision(scores(new), scores(old), Gate("cider", tolerance))
    assert decided is promote
    assert "cider" in why and f"{old:.4f}" in why


def test_gate_uses_the_chosen_metric() -> None:
    decided, why = gate_decision(scores(5.0, exact=0.2), scores(1.0, exact=0.9), Gate("exact_match", 0.1))
    assert not decided and "exact_match 0.2000" in why


@pytest.mark.parametrize("root", ["models/x", "s3://", "s3://bucket", "s3://bucket/"])
def test_registry_root_must_be_an_s3_prefix(root: str) -> None:
    with pytest.raises(RegistryError):
        Registry(root, client=object())  # type: ignore[arg-type]


def test_registry_accepts_the_latest_ref_as_root() -> None:
    registry = Registry("s3://bucket/models/tiny/LATEST", client=object())  # type: ignore[arg-type]
    assert registry.root == "s3://bucket/models/tiny"
    assert registry.version_uri("tiny-1") == "s3://bucket/models/tiny/versions/tiny-1"


def test_list_table_marks_latest_and_rejections() -> None:
    rows = [
        {"version": "v1", "status": "promoted", "latest": True, "scores": scores(1.5, 0.8), "created": "2026-11-26"},
        {"version": "v2", "status": "rejected", "latest": False, "scores": scores(0.2), "parent": {"version": "v1"}},
        {"version": "v3", "status": "incomplete", "latest": False},
    ]
    lines = format_table(rows).splitlines()
    assert lines[1].startswith("*") and "v1" in lines[1] and "80.0%" in lines[1]
    assert "rejected" in lines[2] and "v1" in lines[2].split("rejected")[1]
    assert "incomplete" in lines[3] and "-" in lines[3]


def test_models_cli_without_a_root_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from captionfleet.cli import main as cli_main

    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.delenv("TRAINER_PUBLISH_TO", raising=False)
    assert cli_main(["models", "list"]) == 2
    assert "--root s3://bucket/models/<name>" in capsys.readouterr().err


def test_cider_on_a_one_image_set_is_not_a_pass() -> None:
    # On a one-image evaluation set every CIDEr is 0: "0 >= 0 - tolerance" would promote any model.
    promote, why = gate_decision({"cider": 0.0, "images": 1}, {"cider": 0.0, "images": 1}, Gate("cider", 0.05))
    assert not promote and "cannot tell this version from LATEST" in why
    assert gate_decision({"cider": 0.0, "images": 2}, {"cider": 0.0, "images": 2}, Gate("cider", 0.05))[0]  # a tie
    assert gate_decision({"bleu4": 0.0, "images": 1}, {"bleu4": 0.0, "images": 1}, Gate("bleu4", 0.05))[0]


def outcome(promoted: bool, *, judged: bool = True, latest_error: str | None = None) -> PublishOutcome:
    return PublishOutcome("v2", promoted, "why", scores(1.0), "v1", judged=judged, latest_error=latest_error)


def test_each_publish_outcome_has_its_exit_status() -> None:
    assert outcome(True).exit_status() == EXIT_OK
    assert outcome(False).exit_status() == EXIT_REJECTED == 4  # the gate judged it worse
    assert outcome(False, judged=False).exit_status() == EXIT_REJECTED  # could not judge, nobody asked
    assert outcome(False, judged=False, latest_error="no tokenizer").exit_status() == EXIT_LATEST_UNUSABLE == 5
    assert outcome(True, judged=False, latest_error="no tokenizer").exit_status() == EXIT_OK  # promoted as asked
    assert "REJECTED" in outcome(False).line() and "NOT JUDGED" in outcome(False, judged=False).line()


@pytest.mark.parametrize(("promoted", "status"), [(True, EXIT_OK), (False, EXIT_REJECTED)])
def test_train_exits_with_the_publish_outcome_so_automation_sees_a_rejection(
    promoted: bool, status: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from captionfleet.trainer import refresh
    from captionfleet.trainer.__main__ import main as train_main
    from captionfleet.trainer.train import TrainResult

    monkeypatch.chdir(tmp_path)  # no stray .env
    trained = TrainResult(tmp_path / "model", step=2, resumed_from=None, info={"version": "v2", "scores": {}})
    monkeypatch.setattr("captionfleet.trainer.train.train", lambda settings, **kw: trained)
    monkeypatch.setattr(refresh, "publish_trained", lambda settings, out_dir: outcome(promoted))
    assert train_main(["--publish-to", "s3://bucket/models/x", "--out-dir", str(tmp_path / "model")]) == status
    assert ("promoted to LATEST" if promoted else "REJECTED (LATEST unchanged)") in capsys.readouterr().out


def test_models_are_scored_at_fp32_on_a_cpu_whatever_auto_picks_there(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "auto" is bf16, int8 or fp32 by the CPU's instructions: a score (and the gate's verdict on it) must not
    depend on the machine that computed it."""
    from captionfleet.core import loading
    from captionfleet.trainer import publish
    from captionfleet.trainer.publish import EvalSet, score_checkpoint
    from captionfleet.trainer.shapes import ShapesDataset

    asked: list[str] = []
    real = loading.load_checkpoint

    def spy(path: Path, **kwargs: Any) -> Any:
        asked.append(kwargs["precision"])
        return real(path, **kwargs)

    monkeypatch.setattr(publish, "load_checkpoint", spy)
    eval_set = EvalSet(ShapesDataset(7, 4, 32), "0" * 64)  # type: ignore[arg-type]  # any images with captions
    scored = score_checkpoint(tiny_checkpoint, eval_set, DecodingSettings(num_beams=1, max_new_tokens=4), "cpu")
    assert asked == ["fp32"] and scored["precision"] == "fp32"
    assert scoring_precision("cpu") == "fp32"
