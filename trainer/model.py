"""Model configuration: fine-tune an existing checkpoint, or build a new one from scratch."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import VisionEncoderDecoderModel

from captionfleet.core import checkpoint_load
from captionfleet.core.model_store import ModelRefError, check_checkpoint_dir
from captionfleet.core.registry_layout import METADATA_FILE
from captionfleet.trainer.scratch import build_model
from captionfleet.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


class InitFromError(ModelRefError):
    """The ``init_from`` checkpoint cannot be used. The message is the load's own; ``ref`` is what
    init_from named and ``path`` where it was resolved to (None when resolving it failed)."""

    def __init__(self, error: ModelRefError, ref: str, path: Path | None) -> None:
        super().__init__(str(error))
        self.ref = ref
        self.path = path


@dataclass
class ModelBundle:
    model: VisionEncoderDecoderModel
    processor: Any  # an image processor (ViTImageProcessor for every ViT-GPT2 checkpoint)
    tokenizer: Any  # a GPT-2 tokenizer
    parent: dict[str, Any] | None  # what it was fine-tuned from; None when built from scratch


def load_training_parts(path: Path) -> tuple[VisionEncoderDecoderModel, Any, Any]:
    """Model, image processor and tokenizer from a save_pretrained directory, with the checks every
    load has (safetensors only, no checkpoint code, every weight present): ModelRefError otherwise."""
    check_checkpoint_dir(path)
    model = checkpoint_load.load_model(path, torch.float32)
    processor = checkpoint_load.load_image_processor(path)
    tokenizer = checkpoint_load.load_tokenizer(path)
    return model, processor, tokenizer


def fix_special_tokens(model: VisionEncoderDecoderModel, tokenizer: Any) -> None:
    """GPT-2 checkpoints often lack a pad token and a decoder start token; training needs both.

    As in the reference checkpoint, GPT-2's one special token (eos) serves as start and pad.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the checkpoint's tokenizer has no eos token; ViT-GPT2 uses <|endoftext|>")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = model.config
    eos = tokenizer.eos_token_id
    if cfg.decoder_start_token_id is None:
        cfg.decoder_start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if cfg.pad_token_id is None:
        cfg.pad_token_id = tokenizer.pad_token_id
    if cfg.eos_token_id is None:
        cfg.eos_token_id = eos
    gen = model.generation_config
    gen.decoder_start_token_id = cfg.decoder_start_token_id
    gen.bos_token_id = cfg.decoder_start_token_id
    gen.eos_token_id = cfg.eos_token_id
    gen.pad_token_id = cfg.pad_token_id


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """One dropout rate for every dropout layer (scratch models only: checkpoints keep theirs)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    config = getattr(model, "config", None)
    if config is not None:
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            setattr(config.decoder, name, p)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            setattr(config.encoder, name, p)


def parent_of(path: Path, ref: str) -> dict[str, Any]:
    """The parent checkpoint as recorded in the child's captionfleet.json."""
    parent: dict[str, Any] = {"ref": ref}
    metadata = path / METADATA_FILE
    if metadata.is_file():
        parent["version"] = json.loads(metadata.read_text()).get("version")
    return parent


def configure_model(settings: TrainerSettings, captions_for_tokenizer: list[str]) -> ModelBundle:
    """The model to train, following settings.init_from (fine-tune) or the scratch sizes."""
    if settings.init_from:
        from captionfleet.core.model_store import resolve_model_ref

        path: Path | None = None
        try:
            path = resolve_model_ref(settings.init_from, cache_dir=settings.cache_dir, s3=settings.s3)
            model, processor, tokenizer = load_training_parts(path)
        except ModelRefError as error:
            # Named as init_from's, so the command can say which ref (LATEST, for a refresh) is unusable.
            raise InitFromError(error, settings.init_from, path) from error
        fix_special_tokens(model, tokenizer)
        log.info("fine-tuning %s (%s)", settings.init_from, path)
        return ModelBundle(model, processor, tokenizer, parent_of(path, settings.init_from))
    model, processor, tokenizer = build_model(
        captions_for_tokenizer, sizes=settings.scratch_sizes(), seed=settings.seed
    )
    set_dropout(model, settings.dropout)
    return ModelBundle(model, processor, tokenizer, None)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
