"""Checkpoints: resume state in the run folder, and the finished model the worker loads.

Resume checkpoint (``<run_dir>/checkpoint/``): a save_pretrained directory (weights, config,
tokenizer, image processor) plus ``train_state.pt`` (step, optimizer and scaler state, RNG states).
It is written beside the old one and renamed into place, so a run killed at any moment leaves
either the previous checkpoint or the new one, never half of one.

Published checkpoint (``out_dir``): save_pretrained files (safetensors only), ``captionfleet.json``
(settings, data, scores, parent, version) and a README.md model card. Also written beside and
swapped in whole: a worker polling the folder never loads half a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captionfleet.core.registry_layout import METADATA_FILE
from captionfleet.trainer.data import DataError
from captionfleet.trainer.model import ModelBundle, load_training_parts

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
MODEL_SUBDIR = "model"  # the save_pretrained files, apart from the pickled state so the worker loads them
STATE_FILE = "train_state.pt"


def resume_model_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT / MODEL_SUBDIR


def _make_readable(path: Path) -> None:
    # mkdtemp makes private folders; a published model (package data, shared caches) must be readable.
    path.chmod(0o755)
    for child in path.iterdir():
        if child.is_file():
            child.chmod(0o644)


def save_model_files(bundle: ModelBundle, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(path, safe_serialization=True)
    bundle.processor.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp`` with renames only (each one atomic on POSIX)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        old.rename(target)  # an earlier swap was killed between its renames: finish undoing it first
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume(
    run_dir: Path,
    bundle: ModelBundle,
    *,
    step: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    extra: dict[str, Any],
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in run_dir.glob(f".{CHECKPOINT}.tmp-*"):  # from runs killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT}.tmp-", dir=run_dir))
    save_model_files(bundle, tmp / MODEL_SUBDIR)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(),
            # JSON text, so torch.load(weights_only=True) can read it back.
            "extra": json.dumps({**extra, "parent": bundle.parent}),
        },
        tmp / STATE_FILE,
    )
    target = run_dir / CHECKPOINT
    _swap_in(tmp, target)
    return target


@dataclass
class ResumeState:
    bundle: ModelBundle
    step: int
    optimizer_state: dict[str, Any]
    scaler_state: dict[str, Any]
    extra: dict[str, Any]
    rng: dict[str, Any]
    path: Path

    def restore_rng(self) -> None:
        """Call right before the loop: loading the model above consumes random numbers."""
        _restore_rng(self.rng)


def find_resume(run_dir: Path) -> Path | None:
    """The newest complete resume checkpoint in ``run_dir``, if any."""
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):  # .old: killed between the two renames
        path = run_dir / name
        if (path / STATE_FILE).is_file() and (path / MODEL_SUBDIR / "config.json").is_file():
            return path
    return None


# A DataError, so the CLI reports it in one line (exit 1) like the other reasons a run cannot start.
class ResumeMismatchError(DataError):
    """The run folder holds a checkpoint of a run with other settings."""


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: old -> new`` for each run-defining setting that differs. A setting only one side has
    (added to or removed from TrainerSettings since the checkpoint) is skipped: it cannot be compared."""
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in current.items() if k in saved and saved[k] != v]


def check_fingerprint(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    if saved is None:
        log.warning("%s predates settings fingerprints: resuming it without comparing settings", path)
        return
    changes = fingerprint_changes(saved, current)
    if changes:
        raise ResumeMismatchError(
            f"{path} is a checkpoint of a run with other settings ({'; '.join(changes)}); resuming would "
            "continue that run as if it were this one. To start a new run in its place pass --no-resume "
            "(TRAINER_RESUME=false), or give this run another --run-dir (or --out-dir)"
        )


def load_resume(run_dir: Path, *, fingerprint: dict[str, Any]) -> ResumeState | None:
    """The checkpoint to continue from, if any. ``fingerprint`` (TrainerSettings.fingerprint) must
    match the one saved with it: a run only continues under the settings that define it."""
    path = find_resume(run_dir)
    if path is None:
        return None
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    extra = json.loads(state["extra"])
    check_fingerprint(path, extra.get("fingerprint"), fingerprint)  # before loading weights: refusing is quick
    model, processor, tokenizer = load_training_parts(path / MODEL_SUBDIR)
    bundle = ModelBundle(model, processor, tokenizer, extra.pop("parent", None))
    return ResumeState(bundle, int(state["step"]), state["optimizer"], state["scaler"], extra, state["rng"], path)


def weights_version(path: Path, name: str) -> str:
    """``<name>-<first 12 hex of the weights' sha256>``: the same weights always get the same version."""
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")):
        with weights.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return f"{name}-{digest.hexdigest()[:12]}"


def publish(
    out_dir: Path,
    bundle: ModelBundle,
    metadata: dict[str, Any],
    *,
    evaluate: Callable[[Path], dict[str, Any]] | None = None,
    model_card: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Write the finished checkpoint into ``out_dir`` (replacing what was there) and return its
    captionfleet.json content. ``evaluate`` runs on the written files before they are swapped in,
    so the scores recorded are those of exactly these files, as the worker loads them."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_model_files(bundle, tmp)
        info = {"version": weights_version(tmp, metadata.get("name", "model")), **metadata}
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if evaluate is not None:
            info["scores"] = evaluate(tmp)
            (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n")
        info["size_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if model_card is not None:
            (tmp / "README.md").write_text(model_card(info))
        _make_readable(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("published %s to %s", info["version"], out_dir)
    return info
