"""Model configuration: fine-tune an existing checkpoint (vision-encoder-decoder, git or blip), or build a new
one from scratch (vision-encoder-decoder or git: settings.family)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captionfleet.core import checkpoint_load
from captionfleet.core.family import VED
from captionfleet.core.model_store import ModelRefError, check_checkpoint_dir, model_type_of
from captionfleet.core.registry_layout import METADATA_FILE
from captionfleet.trainer.family_batches import bounds, check_trainable
from captionfleet.trainer.scratch import GIT, build_git_model, build_model
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
    model: Any  # VisionEncoderDecoderModel, GitForCausalLM or BlipForConditionalGeneration
    # ViT-GPT2: its image processor; GIT and BLIP: their processor (image processor + tokenizer), saved whole.
    processor: Any
    tokenizer: Any  # ViT-GPT2: a GPT-2 tokenizer; the others: their processor's
    parent: dict[str, Any] | None  # what it was fine-tuned from; None when built from scratch

    @property
    def family(self) -> str:
        return str(self.model.config.model_type)

    @property
    def image_processor(self) -> Any:
        return getattr(self.processor, "image_processor", self.processor)


def load_training_parts(path: Path) -> tuple[Any, Any, Any]:
    """Model, processor and tokenizer from a save_pretrained directory, with the checks every load has
    (safetensors only, no checkpoint code, every weight present; a family the trainer trains):
    ModelRefError otherwise. The processor is ViT-GPT2's image processor, or GIT's/BLIP's whole processor."""
    check_checkpoint_dir(path)
    model_type = model_type_of(path)
    check_trainable(path, model_type)
    if model_type == VED:
        model = checkpoint_load.load_model(path, torch.float32)
        processor = checkpoint_load.load_image_processor(path)
        tokenizer = checkpoint_load.load_tokenizer(path)
        return model, processor, tokenizer
    model = checkpoint_load.load_image_text_model(path, torch.float32)
    processor = checkpoint_load.load_processor(path, model_type)
    return model, processor, processor.tokenizer


def fix_special_tokens(model: Any, tokenizer: Any) -> None:
    """The tokens training needs: ViT-GPT2's start and pad (GPT-2 checkpoints often lack both); GIT's and
    BLIP's caption start and end (core/family.py ``caption_bounds``), which must be in their config.

    As in the reference checkpoint, GPT-2's one special token (eos) serves as start and pad.
    """
    if model.config.model_type != VED:
        _, end = bounds(model.config.model_type, model.config)
        if model.config.model_type == GIT and model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = end  # served captions stop where training taught them to
        return
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


# The configs' dropout fields (GPT-2's, ViT's and GIT's, CLIP's vision tower's), so the saved config says what ran.
DROPOUT_FIELDS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
)


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """One dropout rate for every dropout layer (scratch models only: checkpoints keep theirs)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    config = getattr(model, "config", None)
    if config is None:
        return
    parts = [config, *(getattr(config, name, None) for name in ("encoder", "decoder", "vision_config", "text_config"))]
    for part in parts:
        for name in DROPOUT_FIELDS:
            if part is not None and hasattr(part, name):
                setattr(part, name, p)


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
    build = build_git_model if settings.family == GIT else build_model
    model, processor, tokenizer = build(captions_for_tokenizer, sizes=settings.scratch_sizes(), seed=settings.seed)
    set_dropout(model, settings.dropout)
    return ModelBundle(model, processor, tokenizer, None)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
