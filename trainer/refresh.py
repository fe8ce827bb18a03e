"""Refresh runs: fine-tune what workers serve now on new data from S3, then publish through the gate.

    captionfleet train --publish-to s3://bucket/models/captioner --init-from latest \\
        --data s3://bucket/new/captions.jsonl --max-steps 500 --learning-rate 5e-5

``--init-from latest`` (or ``s3://.../models/<name>/LATEST``) starts from the version LATEST names;
``s3://.../models/<name>/versions/<v>`` from a named one. ``--data`` may be an s3:// manifest
(.jsonl/.csv, image paths relative to its folder or s3:// uris) or COCO captions JSON (``--image-root
s3://bucket/train2017/``, default: the JSON's folder): it is downloaded and turned into a local manifest
of s3:// image uris, which the data loader reads. This is what the Kubernetes CronJob runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

from captionfleet.core.model_store import BUILTIN_REF
from captionfleet.core.registry_layout import VERSION_RE, VERSIONS, latest_root, read_latest, version_uri
from captionfleet.core.s3 import make_s3_client, parse_s3_uri
from captionfleet.trainer.data import DataError
from captionfleet.trainer.publish import Gate, PublishOutcome, eval_set_exists, publish_version
from captionfleet.trainer.registry import Registry, RegistryError, VersionNameError
from captionfleet.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

# How much of why LATEST failed to load the error line quotes: the loaders' messages run long.
CAUSE_CHARS = 200


def init_from_latest(settings: TrainerSettings) -> str | None:
    """The registry root whose LATEST ``init_from`` names (``latest`` or ``s3://.../LATEST``), else None."""
    ref = settings.init_from.strip()
    if ref == "latest":
        return Registry(settings.publish_to, settings.s3).root if settings.publish_to else None
    return latest_root(ref)


def latest_unusable(root: str, version: str, cause: str, consequence: str) -> str:
    """The one line that says LATEST cannot be loaded, what that meant for this run, and the fix."""
    cause = cause if len(cause) <= CAUSE_CHARS else cause[: CAUSE_CHARS - 3] + "..."  # the record keeps more
    return (
        f"LATEST of {root} names {version}, which cannot be loaded ({cause}); {consequence}; make LATEST "
        f"loadable again: captionfleet models --root {root} rollback (or promote a version that loads)"
    )


def resolve_init_from(settings: TrainerSettings) -> TrainerSettings:
    """``latest`` / ``.../LATEST`` -> the s3:// uri of the version LATEST names now (recorded as parent); a
    version by name or by the start of its name (alone: of the --publish-to registry; or in
    ``s3://.../models/<name>/versions/<v>``) -> that version's uri."""
    ref = settings.init_from.strip()
    named = _named_version(ref, settings)
    if named is not None:
        return settings.model_copy(update={"init_from": named})
    if ref == "latest":
        if not settings.publish_to:
            raise RegistryError("--init-from latest needs --publish-to s3://bucket/models/<name> (TRAINER_PUBLISH_TO)")
        root = Registry(settings.publish_to, settings.s3).root
    else:
        found = latest_root(ref)
        if found is None:
            return settings
        root = found
    version = read_latest(make_s3_client(settings.s3), root)
    if version is None:
        raise RegistryError(
            f"{root}/LATEST does not exist yet: train the first version from scratch or from a checkpoint "
            "(--init-from DIR|builtin) with --publish-to, then refresh from latest"
        )
    log.info("refreshing from %s (LATEST of %s)", version, root)
    return settings.model_copy(update={"init_from": version_uri(root, version)})


def _named_version(ref: str, settings: TrainerSettings) -> str | None:
    """The uri of the registry version ``ref`` names (full name or prefix); None when it names none."""
    if ref.startswith("s3://") and f"/{VERSIONS}/" in ref.rstrip("/"):
        root, _, name = ref.rstrip("/").rpartition(f"/{VERSIONS}/")
        if "/" in name:
            return None  # a folder inside a version: an s3:// checkpoint ref like any other
        return version_uri(root, Registry(root, settings.s3).resolve_version(name))
    # A bare name: no path, hub id (org/name), builtin or latest; an existing folder of that name wins.
    bare = "/" not in ref and ref not in ("latest", BUILTIN_REF) and not Path(ref).expanduser().exists()
    if not bare or not settings.publish_to or not VERSION_RE.match(ref):
        return None
    registry = Registry(settings.publish_to, settings.s3)
    try:
        return version_uri(registry.root, registry.resolve_version(ref))
    except VersionNameError as error:
        raise VersionNameError(f"--init-from {ref!r} is no local folder, and {error}") from error


def _s3_join(folder: str, path: str) -> str:
    if path.startswith("s3://"):
        return path
    return folder.rstrip("/") + "/" + str(PurePosixPath(path))


def fetch_s3_data(settings: TrainerSettings) -> TrainerSettings:
    """An s3:// manifest or COCO file -> a local JSONL manifest of s3:// images; other data unchanged."""
    if not settings.data.startswith("s3://"):
        return settings
    bucket, key = parse_s3_uri(settings.data)
    client = make_s3_client(settings.s3)
    try:
        text = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    except Exception as error:
        raise DataError(f"could not read {settings.data}: {error}; check the uri and TRAINER_S3__* settings") from error
    folder = settings.data.rsplit("/", 1)[0]
    rows: list[dict[str, Any]] = []
    suffix = PurePosixPath(key).suffix.lower()
    if suffix == ".json":
        # pydantic turns "s3://b/x" into the Path "s3:/b/x": put the second slash back.
        root = str(settings.image_root) if settings.image_root is not None else folder
        root = "s3://" + root[len("s3:/") :].lstrip("/") if root.startswith("s3:/") else root
        if not root.startswith("s3://"):
            raise DataError("COCO captions on S3 need their images on S3: pass --image-root s3://bucket/folder/")
        doc = json.loads(text)
        files = {img["id"]: str(img["file_name"]) for img in doc.get("images", [])}
        for ann in doc.get("annotations", []):
            if ann.get("image_id") in files:
                rows.append({"image": _s3_join(root, files[ann["image_id"]]), "caption": str(ann.get("caption", ""))})
    elif suffix in (".jsonl", ".ndjson"):
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("image"), str):
                    rows.append({**row, "image": _s3_join(folder, row["image"])})
    elif suffix == ".csv":
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("image"):
                rows.append({"image": _s3_join(folder, row["image"]), "caption": row.get("caption") or ""})
    else:
        raise DataError(f"{settings.data}: expected a .jsonl/.csv manifest or a COCO captions .json")
    if not rows:
        raise DataError(f"{settings.data} lists no images")
    local = settings.resolved_run_dir / "data" / (PurePosixPath(key).stem + ".jsonl")
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text("".join(json.dumps(row) + "\n" for row in rows))
    log.info("%s: %d rows -> %s", settings.data, len(rows), local)
    return settings.model_copy(update={"data": str(local), "image_root": None})


def prepare(settings: TrainerSettings) -> TrainerSettings:
    """Settings for a refresh run: init_from resolved, S3 data fetched (no-ops for other runs)."""
    return fetch_s3_data(resolve_init_from(settings))


def publish_trained(settings: TrainerSettings, out_dir: Path) -> PublishOutcome:
    """Publish the run's checkpoint to settings.publish_to through the quality gate."""
    from captionfleet.trainer.family_batches import checkpoint_fit
    from captionfleet.trainer.train import open_run_splits

    registry = Registry(settings.publish_to, settings.s3)
    source = None
    if not eval_set_exists(registry):
        # The first publish stores the fixed evaluation set: this run's validation images.
        # Only the input size is needed: read it from the checkpoint's image processor, do not load the model.
        splits = open_run_splits(settings, checkpoint_fit(out_dir))
        source = splits.val
    return publish_version(
        out_dir,
        registry,
        gate=Gate(settings.gate_metric, settings.gate_tolerance),
        decoding=settings.decoding,
        device=settings.device,
        cache_dir=settings.cache_dir,
        s3=settings.s3,
        eval_source=source,
        eval_size=settings.eval_set_size,
        name=settings.name,
        promote_unjudged=settings.promote_unjudged,
    )
