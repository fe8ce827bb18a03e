"""Publishing a trained checkpoint to object storage through a quality gate.

    upload versions/<v>/ completely -> record it (candidate) -> evaluate it and the current LATEST on the
    model's fixed evaluation set -> promote (LATEST := v, only if LATEST is still the version it was
    compared with) or reject (LATEST untouched)

The evaluation set is stored with the model (``eval/manifest.jsonl`` and ``eval/images/``), written by
the first publish from that run's validation images and never re-drawn: every later version is judged
on exactly the same pictures, so scores compare across versions and runs. Both models are scored by
the worker's own Captioner with the same decoding. A version is promoted when its gate metric is not
below LATEST's by more than the tolerance; a rejected version stays stored, with its scores and the
reason in its record, and can still be promoted by hand (``captionfleet models promote``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from captionfleet.core.failures import EXIT_LATEST_UNUSABLE, EXIT_OK, EXIT_REJECTED, ImageError
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.model_store import resolve_model_ref
from captionfleet.core.registry_layout import EVAL, EVAL_IMAGES, EVAL_INFO, EVAL_MANIFEST, METADATA_FILE
from captionfleet.core.s3 import is_storage_error
from captionfleet.core.settings import DecodingSettings, S3Settings
from captionfleet.trainer.checkpoint import weights_version
from captionfleet.trainer.data import CaptionDataset, DataError, ImageCaptionDataset
from captionfleet.trainer.evaluate import evaluate_captioner, scoring_precision
from captionfleet.trainer.families import loaded_here
from captionfleet.trainer.model_info import describe_checkpoint
from captionfleet.trainer.registry import LatestMovedError, LatestState, Registry, RegistryError, now

log = logging.getLogger(__name__)

GateMetric = Literal["cider", "bleu4", "exact_match"]


@dataclass(frozen=True)
class Gate:
    # The score compared: CIDEr (0..10) by default, the most discriminating of the three on captions.
    metric: GateMetric = "cider"
    # How far below LATEST (in the metric's own units) a new version may score and still be promoted.
    tolerance: float = 0.0


def gate_decision(candidate: dict[str, Any], baseline: dict[str, Any] | None, gate: Gate) -> tuple[bool, str]:
    """(promote?, why) from two score dicts; no baseline means the first version, promoted."""
    if baseline is None:
        return True, "first version: there is no LATEST to compare with"
    new, old = float(candidate[gate.metric]), float(baseline[gate.metric])
    if gate.metric == "cider" and int(candidate.get("images", MIN_EVAL_IMAGES)) < MIN_EVAL_IMAGES:
        # CIDEr weighs an n-gram by how few images' references contain it: on a one-image set (stored
        # before sets that small were refused) every weight, and every score, is 0, and "0 >= 0" would
        # promote any model at all.
        return False, (
            "the evaluation set has one image, on which CIDEr scores every model 0: the gate cannot tell this "
            "version from LATEST, so LATEST stays. Promote by hand, or gate on TRAINER_GATE_METRIC=bleu4"
        )
    floor = old - gate.tolerance
    if new >= floor:
        return True, f"{gate.metric} {new:.4f} >= {old:.4f} (LATEST) - {gate.tolerance} tolerance"
    return False, (
        f"{gate.metric} {new:.4f} is below LATEST's {old:.4f} by more than the tolerance {gate.tolerance} "
        f"(needed >= {floor:.4f})"
    )


# -- the fixed evaluation set --------------------------------------------------------------------


# CIDEr's n-gram weights are log(images / images whose references contain it): 0 for every n-gram on one image.
MIN_EVAL_IMAGES = 2


@dataclass
class EvalSet:
    dataset: ImageCaptionDataset
    digest: str  # sha256 of the manifest: names this exact set in every score record


def eval_set_exists(registry: Registry) -> bool:
    return registry.get_json(registry.key(EVAL, EVAL_INFO)) is not None


def write_eval_set(registry: Registry, source: CaptionDataset, size: int) -> None:
    """Store the first ``size`` images of ``source`` with their captions; once, never overwritten.

    The files go under ``eval/<digest>/`` (the manifest's sha256, which lists each image's sha256), and
    ``eval/info.json``, created only if absent, names that folder. Two first publishes racing each write
    their own folder and exactly one info.json wins; the other publish then uses the winner's set.
    """
    if eval_set_exists(registry):
        raise RegistryError(f"{registry.uri(EVAL)} already exists: the evaluation set is written once")
    count = min(size, len(source))
    if count < MIN_EVAL_IMAGES:
        # Written once and kept for the registry's life: a set CIDEr cannot score must never be stored.
        raise DataError(
            f"the evaluation set would have {count} image(s); it needs at least {MIN_EVAL_IMAGES} (CIDEr scores every "
            "model 0 on one image) and about 20 to be worth trusting: give the first publish more validation "
            "images (more data, or a larger TRAINER_VAL_FRACTION)"
        )
    if count < 20:
        log.warning("the evaluation set has only %d images: the gate's scores will be noisy", count)
    images: list[bytes] = []
    lines = []
    for i in range(count):
        buffer = io.BytesIO()
        source.image(i).convert("RGB").save(buffer, format="PNG")
        images.append(buffer.getvalue())
        row = {"image": f"images/{i:05d}.png", "sha256": hashlib.sha256(images[-1]).hexdigest()}
        lines.append(json.dumps({**row, "captions": list(source.captions(i))}))
    manifest = ("\n".join(lines) + "\n").encode()
    digest = hashlib.sha256(manifest).hexdigest()
    folder = digest[:16]
    for i, data in enumerate(images):
        key = registry.key(EVAL, folder, EVAL_IMAGES, f"{i:05d}.png")
        registry.client.put_object(Bucket=registry.bucket, Key=key, Body=data, ContentType="image/png")
    registry.client.put_object(Bucket=registry.bucket, Key=registry.key(EVAL, folder, EVAL_MANIFEST), Body=manifest)
    # Last, and only if absent: its presence means a set is complete, and it is never replaced.
    info = {"images": count, "sha256": digest, "folder": folder, "source": source.describe(), "at": now()}
    if registry.create_json(registry.key(EVAL, EVAL_INFO), info):
        log.info("stored the evaluation set (%d images) at %s", count, registry.uri(EVAL, folder))
    else:
        log.warning("another publish stored the evaluation set first: scoring on that one")


def read_eval_set(registry: Registry) -> EvalSet:
    info = registry.get_json(registry.key(EVAL, EVAL_INFO))
    if info is None:
        raise RegistryError(
            f"{registry.uri(EVAL)} has no evaluation set: the first publish writes it from its validation images"
        )
    # Sets written before content-addressed folders keep their files directly under eval/.
    base = (EVAL, info["folder"]) if info.get("folder") else (EVAL,)
    manifest_key = registry.key(*base, EVAL_MANIFEST)
    manifest = registry.client.get_object(Bucket=registry.bucket, Key=manifest_key)["Body"].read()
    digest = hashlib.sha256(manifest).hexdigest()
    if digest != info.get("sha256"):
        raise RegistryError(
            f"{registry.uri(*base, EVAL_MANIFEST)} does not match the sha256 in {registry.uri(EVAL, EVAL_INFO)}: "
            "it changed after it was written; restore it from a backup or versioned bucket (scores against "
            "another set would not be comparable)"
        )
    images: list[Image.Image] = []
    captions: list[list[str]] = []
    for line in manifest.decode().split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        data = registry.client.get_object(Bucket=registry.bucket, Key=registry.key(*base, row["image"]))["Body"].read()
        if "sha256" in row and hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise RegistryError(
                f"evaluation image {registry.uri(*base, row['image'])} changed after it was written: restore it"
            )
        try:
            images.append(decode_image(data, limits=ImageLimits()))
        except ImageError as error:
            message = f"evaluation image {row['image']} is unreadable ({error.message}): restore it"
            raise RegistryError(message) from error
        captions.append([str(c) for c in row["captions"]])
    return EvalSet(ImageCaptionDataset(images, captions, registry.uri(*base)), digest)


def ensure_eval_set(registry: Registry, source: CaptionDataset | None, size: int) -> EvalSet | None:
    """The registry's evaluation set, written from ``source`` first if there is none yet; None when there
    is none and no source to write it from (an imported checkpoint brings no validation images)."""
    if not eval_set_exists(registry):
        if source is None:
            return None
        write_eval_set(registry, source, size)
    return read_eval_set(registry)


def score_checkpoint(
    path: Path, eval_set: EvalSet, decoding: DecodingSettings, device: str, precision: str | None = None
) -> dict[str, Any]:
    """Its scores on the set, and the precision they were computed at (resolved: fp32, bf16, fp16, int8).
    ``precision``: None for the scoring precision of the device (``scoring_precision``); the gate scores
    LATEST at the candidate's, so that a difference in scores is the models' and not their precisions'."""
    asked = precision or scoring_precision(device)
    captioner = load_checkpoint(path, device=device, precision=asked, decoding=decoding)
    evaluation = evaluate_captioner(captioner, eval_set.dataset)
    return {
        **evaluation.scores.as_dict(),
        "precision": str(getattr(captioner, "precision", asked)),
        "eval_set": eval_set.digest[:16],
        "decoding": decoding.model_dump(),
        "samples": [list(s) for s in evaluation.samples(3)],
    }


def is_checkpoint_fault(error: BaseException) -> bool:
    """Whether loading or scoring a checkpoint failed because of its files (missing, broken, another
    family), rather than the store, the network or the machine (worth a retry, never the checkpoint's fault)."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):  # the machine's limit, not the files'
        return False
    return not is_storage_error(error)


def one_line(error: BaseException, path: Path | None = None, where: str = "") -> str:
    """``error`` as one line, the local cache folder it names replaced by the version's uri."""
    text = " ".join(str(error).split())
    if path is not None and where:
        text = text.replace(repr(str(path)), where).replace(str(path), where)
    return text if len(text) <= 400 else text[:397] + "..."


# -- publishing ----------------------------------------------------------------------------------


@dataclass
class PublishOutcome:
    version: str
    promoted: bool
    reason: str
    scores: dict[str, Any] | None
    baseline: str | None = None
    baseline_scores: dict[str, Any] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    # False when the gate could not compare this version with LATEST (LATEST cannot be loaded, no
    # evaluation set, a family this captionfleet cannot score): promoted only when that was asked for.
    judged: bool = True
    # Why LATEST could not be loaded, when it could not (the gate then had nothing to compare with).
    latest_error: str | None = None

    def line(self) -> str:
        if self.promoted:
            verdict = "promoted to LATEST"
        elif not self.judged:
            verdict = "NOT JUDGED (LATEST unchanged)"
        else:
            verdict = "REJECTED (LATEST unchanged)"
        return f"{self.version}: {verdict}: {self.reason}"

    def exit_status(self) -> int:
        """0 promoted; EXIT_LATEST_UNUSABLE when an unusable LATEST kept it out; else EXIT_REJECTED."""
        if self.promoted:
            return EXIT_OK
        return EXIT_LATEST_UNUSABLE if self.latest_error is not None else EXIT_REJECTED


@dataclass
class _Judgement:
    """What the gate found: scores (None when the version could not be scored) and the decision."""

    promote: bool
    reason: str
    scores: dict[str, Any] | None
    status: str  # the record's status before LATEST moves: candidate (passed), rejected or unjudged
    # LATEST as the gate read it, with its ETag: LATEST moves only if it is still this one.
    latest_read: LatestState
    baseline: str | None = None
    baseline_scores: dict[str, Any] | None = None
    latest_error: str | None = None

    @property
    def judged(self) -> bool:
        return self.status != UNJUDGED


@dataclass(frozen=True)
class _Scoring:
    """How both models are scored: the same decoding on the same device; LATEST's files cached here."""

    decoding: DecodingSettings
    device: str
    cache_dir: Path
    s3: S3Settings | None


# A version the gate could not compare with LATEST: stored with what could be measured, not promoted
# unless asked (publish again once LATEST loads, or promote it by hand).
UNJUDGED = "unjudged"


def publish_version(
    checkpoint: Path,
    registry: Registry,
    *,
    gate: Gate | None = None,
    decoding: DecodingSettings | None = None,
    device: str = "auto",
    cache_dir: Path,
    s3: S3Settings | None = None,
    eval_source: CaptionDataset | None = None,
    eval_size: int = 200,
    name: str = "captioner",
    promote_unjudged: bool = False,
    imported_from: str | None = None,
) -> PublishOutcome:
    """Upload ``checkpoint`` as a new version, then promote it only if it passes the gate.

    ``promote_unjudged``: promote it also when the gate cannot compare it with LATEST (LATEST cannot be
    loaded, there is no evaluation set, or its family cannot be scored here): an operator's explicit
    choice, never the default. ``imported_from``: the ref an imported checkpoint came from (recorded)."""
    gate = gate or Gate()
    decoding = decoding or DecodingSettings()
    version, metadata = _version_metadata(checkpoint, name)
    if imported_from is not None:
        metadata["imported"] = {"from": imported_from, "at": now()}
    existing = registry.record(version)
    if existing is not None and existing.get("status") in ("promoted", "rejected", "rolled_back"):
        return _already_published(registry, version, existing)

    # 1. every file up, then a record: from here on the version is complete and can become LATEST.
    record = _upload(registry, checkpoint, version, metadata)

    # 2. the gate: candidate and LATEST on the same fixed set, with the same decoding.
    eval_set = ensure_eval_set(registry, eval_source, eval_size)
    scoring = _Scoring(decoding, device, cache_dir, s3)
    judgement = _judge(checkpoint, registry, version, record, gate, eval_set, scoring)
    promote, reason = judgement.promote, judgement.reason
    if not judgement.judged and promote_unjudged:
        promote, reason = True, f"{reason}; promoted without the gate's comparison, as asked"
    record = _update_record(
        registry,
        version,
        record,
        status=judgement.status,
        scores=judgement.scores,
        baseline=judgement.baseline,
        baseline_scores=judgement.baseline_scores,
        gate={"metric": gate.metric, "tolerance": gate.tolerance, "judged": judgement.judged},
        latest_error=judgement.latest_error,
        reason=reason,
    )

    # 3. LATEST moves last, only for a version that passed (or that an operator asked to promote).
    if promote:
        action = "import" if imported_from is not None else "publish"
        promote, reason, record = _move_latest(registry, version, record, reason, judgement.latest_read, action)
    else:
        log.debug("%s not promoted by the quality gate: %s", version, reason)  # the outcome's line says it
    return PublishOutcome(
        version,
        promote,
        reason,
        judgement.scores,
        judgement.baseline,
        judgement.baseline_scores,
        record,
        judged=judgement.judged,
        latest_error=judgement.latest_error,
    )


def _judge(
    checkpoint: Path,
    registry: Registry,
    version: str,
    record: dict[str, Any],
    gate: Gate,
    eval_set: EvalSet | None,
    scoring: _Scoring,
) -> _Judgement:
    """Score the candidate, then LATEST, on the fixed evaluation set and decide; what cannot be measured
    (no set, a checkpoint that does not load, a LATEST that does not load) is said in the reason."""
    if eval_set is None:
        reason = (
            f"{registry.uri(EVAL)} has no evaluation set to score it on (a training run's first publish stores "
            f"one: captionfleet train --publish-to {registry.root})"
        )
        return _Judgement(False, reason, None, UNJUDGED, registry.latest_state())
    family = str((record.get("model") or {}).get("family", "unknown"))
    try:
        scores = score_checkpoint(checkpoint, eval_set, scoring.decoding, scoring.device)
    except Exception as error:
        if not is_checkpoint_fault(error):
            raise
        log.debug("scoring %s failed", checkpoint, exc_info=error)
        if loaded_here(family):  # a family this captionfleet loads: the checkpoint itself is broken
            reason = f"it cannot be loaded ({one_line(error)}): fix the checkpoint, then publish it again"
            return _Judgement(False, reason, None, "rejected", registry.latest_state())
        reason = f"this captionfleet cannot load family {family!r} to score it ({one_line(error)})"
        return _Judgement(False, reason, None, UNJUDGED, registry.latest_state())
    # Kept at once: whatever happens while LATEST is scored, this version keeps its own scores.
    _update_record(registry, version, record, scores=scores)

    latest_read = registry.latest_state()
    baseline = latest_read.version
    if baseline is None or baseline == version:
        promote, reason = gate_decision(scores, None, gate)
        return _Judgement(promote, reason, scores, "candidate" if promote else "rejected", latest_read)
    uri = registry.version_uri(baseline)
    path: Path | None = None
    try:
        path = resolve_model_ref(uri, cache_dir=scoring.cache_dir, s3=scoring.s3)
        baseline_scores = score_checkpoint(path, eval_set, scoring.decoding, scoring.device, scores.get("precision"))
    except Exception as error:
        if not is_checkpoint_fault(error):
            raise  # the store failed: a retry may well work, and LATEST may be fine
        log.debug("scoring LATEST (%s) failed", uri, exc_info=error)
        latest_error = one_line(error, path, uri)
        reason = f"LATEST ({baseline}) cannot be loaded ({latest_error}): the gate had nothing to compare it with"
        return _Judgement(False, reason, scores, UNJUDGED, latest_read, baseline, None, latest_error)
    promote, reason = gate_decision(scores, baseline_scores, gate)
    status = "candidate" if promote else "rejected"
    return _Judgement(promote, reason, scores, status, latest_read, baseline, baseline_scores)


def _version_metadata(checkpoint: Path, name: str) -> tuple[str, dict[str, Any]]:
    """The checkpoint's version and its metadata (with that version in it)."""
    metadata_file = checkpoint / METADATA_FILE
    metadata: dict[str, Any] = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    # The version is the folder name and what the worker reports: the same string everywhere.
    version = str(metadata.get("version") or weights_version(checkpoint, metadata.get("name", name)))
    metadata["version"] = version
    return version, metadata


def _already_published(registry: Registry, version: str, existing: dict[str, Any]) -> PublishOutcome:
    """A version decided before (promoted, rejected, rolled back): nothing to do but say where it stands."""
    status = existing.get("status")
    log.info("%s is already published (%s): nothing to do", version, status)
    # Promoted means LATEST names it now, not that it once did: since then LATEST may have been
    # rolled back or moved to a later version (whose promotion leaves this record "promoted").
    latest = registry.latest()
    served = latest == version
    reason = f"already published ({status}): {existing.get('reason', '')}"
    if status == "promoted" and not served:
        reason += f"; LATEST now names {latest}, not this version (promote it by hand to serve it again)"
    return PublishOutcome(
        version,
        served,
        reason,
        existing.get("scores", {}),
        existing.get("baseline"),
        existing.get("baseline_scores"),
        existing,
    )


def _upload(registry: Registry, checkpoint: Path, version: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Every file of the version, then its record ("candidate"), which is returned."""
    size = registry.upload(checkpoint, version, metadata)
    record: dict[str, Any] = {
        "version": version,
        "status": "candidate",
        "created": metadata.get("created") or now(),
        "uploaded": now(),
        "parent": metadata.get("parent"),
        "size_bytes": size,
        "training_scores": metadata.get("scores"),
        "uri": registry.version_uri(version),
        # What it is, read from its files: family, processor, default prompt, precision.
        "model": describe_checkpoint(checkpoint),
    }
    if metadata.get("imported"):
        record["imported_from"] = metadata["imported"]["from"]
    registry.write_record(version, record)
    return record


def _move_latest(
    registry: Registry, version: str, record: dict[str, Any], reason: str, latest_read: LatestState, action: str
) -> tuple[bool, str, dict[str, Any]]:
    """LATEST := ``version``, only if LATEST is still the baseline it passed against: scoring takes minutes,
    and another publish, a promote or a rollback made meanwhile must not be overwritten by a decision about
    a LATEST that is gone. (promoted?, reason, record) afterwards."""
    promote = True
    try:
        registry.set_latest(version, action=action, reason=reason, expect=latest_read)
    except LatestMovedError as moved:
        if moved.found == version:  # promoted by hand while it was being scored
            reason = f"{reason}; LATEST already names it (promoted while it was being scored)"
        else:
            promote = False
            reason = (
                f"passed the gate ({reason}), but {moved} while this version was being scored, so it "
                f"was not promoted; publish again to compare it with {moved.found}, or promote it by hand "
                f"(captionfleet models promote {version})"
            )
        record = _update_record(registry, version, record, reason=reason)
        log.warning("%s: %s", version, reason)
    else:
        record = registry.record(version) or record
        log.info("%s promoted: %s", version, reason)
    return promote, reason, record


def _update_record(
    registry: Registry, version: str, written: dict[str, Any], *, status: str | None = None, **changes: Any
) -> dict[str, Any]:
    """Write ``changes`` onto the stored record, re-read first: another process (a promote, a rollback)
    may have changed it since ``written`` was. ``status`` is set only over this publish's own
    "candidate": a status someone else decided meanwhile stays."""
    record = {**(registry.record(version) or written), **changes}
    if status is not None and record.get("status") == "candidate":
        record["status"] = status
    registry.write_record(version, record)
    return record
