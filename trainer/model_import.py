"""``captionfleet models import SRC``: publish a checkpoint that was not trained here, through the same
upload, record and gate as a training run's publish (trainer/publish.py).

SRC is any ref the model store resolves, with its checks (safetensors only, no checkpoint code, every
weight file it names present): a local folder, ``s3://bucket/prefix``, a Hugging Face hub id, or
``builtin``. The gate scores it like a trained version where it can. Where it cannot (the registry has
no evaluation set yet, the checkpoint's family is one this captionfleet cannot load, or LATEST cannot be
loaded), the version is stored "unjudged" with the reason, and becomes LATEST only with ``--promote``.
A checkpoint of a family this captionfleet loads that fails to load is broken: rejected, never promoted.
"""

from __future__ import annotations

from captionfleet.core.model_store import resolve_model_ref
from captionfleet.trainer.publish import Gate, PublishOutcome, publish_version
from captionfleet.trainer.registry import Registry
from captionfleet.trainer.settings import TrainerSettings


def default_name(registry: Registry) -> str:
    """What names a version of a checkpoint without a recorded one: the registry's own name
    (``s3://bucket/models/<name>``), so its versions read ``<name>-<weights hash>``."""
    return registry.root.rsplit("/", 1)[-1]


def import_checkpoint(
    source: str, registry: Registry, settings: TrainerSettings, *, name: str | None = None, promote: bool = False
) -> PublishOutcome:
    """Resolve ``source`` (ModelRefError when it cannot be used), then publish it through the gate.
    ``promote``: make it LATEST also when the gate cannot judge it (never over a judged rejection)."""
    path = resolve_model_ref(source, cache_dir=settings.cache_dir, s3=settings.s3)
    return publish_version(
        path,
        registry,
        gate=Gate(settings.gate_metric, settings.gate_tolerance),
        decoding=settings.decoding,
        device=settings.device,
        cache_dir=settings.cache_dir,
        s3=settings.s3,
        eval_source=None,  # an import brings no validation images: the registry's stored set or nothing
        name=name or default_name(registry),
        promote_unjudged=promote,
        imported_from=source,
    )
