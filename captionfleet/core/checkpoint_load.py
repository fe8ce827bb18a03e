"""A checked checkpoint directory -> the transformers objects in it, or one ModelRefError.

Every model, config, processor, tokenizer and image processor captionfleet loads comes through here, so that:

- checkpoint code never runs: ``trust_remote_code=False`` on every call (model_store has already
  refused a checkpoint whose configs name code of its own);
- no half-loaded model is served: transformers fills weights missing from the files with random
  values and only says so on stderr, so missing or unexpected weights refuse the checkpoint;
- a broken file (a safetensors header that is not one, a config transformers cannot read) ends in
  one line naming the directory and the problem (exit 2 from the commands), not a traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    VisionEncoderDecoderModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from captionfleet.core import processors
from captionfleet.core.model_store import ModelRefError, weight_files

log = logging.getLogger(__name__)

# How many weight names a refusal quotes: enough to recognise the pattern, short enough for one line.
NAMES_SHOWN = 5
# Buffers that GPT-2 checkpoints saved by transformers 4 still carry (the causal mask and its fill value,
# persistent buffers then; the reference model nlpconnect/vit-gpt2-image-captioning has them): not weights,
# and rebuilt by the model itself, so they are no sign of another architecture.
LEGACY_BUFFERS = re.compile(r"\.(attn|crossattention)\.(masked_bias|bias)$")
SAVE_HINT = "write the checkpoint again with save_pretrained (or copy it again: a file may be cut short)"
# What the worker keeps of a checkpoint's generation_config.json: what its tokens are (where generation
# starts and ends, the padding, tokens the model must or must never emit). The rest (sampling, beams,
# lengths, biases such as sequence_bias, output_hidden_states/attentions) is for the worker's decoding
# settings to decide. It is dropped from the model itself, not only from the config passed to generate():
# generate() fills every field a call leaves unset from the model's own (a sequence_bias there made every
# caption empty).
TOKEN_SETTINGS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
)


def check_weight_headers(path: Path) -> None:
    """Each weights file must open as safetensors: its header is read, no tensor is."""
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelRefError(f"{str(file)!r} is not a readable safetensors file ({error}); {SAVE_HINT}") from error


def load_model(path: Path, dtype: torch.dtype) -> VisionEncoderDecoderModel:
    """The model in ``path`` with every one of its weights read from the files, on the CPU."""
    check_weight_headers(path)
    with as_model_ref_error(path, "its model"):
        # output_loading_info=True makes it a (model, info) pair, which the stubs do not know.
        loaded: Any = VisionEncoderDecoderModel.from_pretrained(
            path, use_safetensors=True, dtype=dtype, trust_remote_code=False, output_loading_info=True
        )
    model, info = loaded
    check_loading_info(path, info)
    keep_token_settings(model)
    return model


def token_settings(config: GenerationConfig) -> dict[str, Any]:
    """The token settings (TOKEN_SETTINGS) a generation config sets."""
    return {name: value for name in TOKEN_SETTINGS if (value := getattr(config, name, None)) is not None}


def keep_token_settings(model: Any) -> None:
    """The model's generation config reduced to its token settings (see TOKEN_SETTINGS)."""
    model.generation_config = GenerationConfig(**token_settings(model.generation_config))


def load_config(path: Path) -> PretrainedConfig:
    with as_model_ref_error(path, "its config"):
        return AutoConfig.from_pretrained(path, trust_remote_code=False)


def check_image_to_text(path: Path, config: PretrainedConfig) -> str:
    """The config's model_type, if transformers maps it to AutoModelForImageTextToText; else ModelRefError."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelRefError(
            f"{str(path)!r} is a {model_type or 'model of no model_type'} checkpoint, not an image-to-text model: "
            "captionfleet serves the model types transformers maps to AutoModelForImageTextToText "
            "(vision-encoder-decoder, blip, git, florence2, paligemma, smolvlm, qwen2_vl, llava, ...)"
        )
    return model_type


def load_image_text_model(path: Path, dtype: torch.dtype) -> Any:
    """Any family's model (AutoModelForImageTextToText), every weight from the files, on the CPU."""
    check_weight_headers(path)
    with as_model_ref_error(path, "its model"):
        loaded: Any = AutoModelForImageTextToText.from_pretrained(
            path, use_safetensors=True, dtype=dtype, trust_remote_code=False, output_loading_info=True
        )
    model, info = loaded
    check_loading_info(path, info)
    keep_token_settings(model)
    return model


def load_processor(path: Path, model_type: str) -> Any:
    """The family's processor (see core/processors.py): image processor, tokenizer and the
    processor's own settings, never its video part."""
    tokenizer = load_tokenizer(path)
    image_processor = load_image_processor(path)
    cls = processors.processor_class(model_type)
    if cls is None:
        raise ModelRefError(
            f"{str(path)!r}: transformers has no processor for model type {model_type!r}, which captionfleet "
            "needs to turn an image and a prompt into its inputs; serve a family listed in the README"
        )
    with as_model_ref_error(path, "its processor"):
        settings, _ = cls.get_processor_dict(path, trust_remote_code=False, local_files_only=True)
        return processors.assemble(cls, image_processor, tokenizer, settings)


def check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """Refuse a model that transformers completed with random weights or that left weights unused.
    transformers already leaves out what is legitimately absent (tied weights such as GPT-2's
    lm_head, keys its model classes list as ignorable)."""
    for key, what in (
        ("missing_keys", "lacks {n} of the model's weights (they would be random)"),
        ("unexpected_keys", "holds {n} weights the model does not have (another architecture?)"),
        ("mismatched_keys", "holds {n} weights of the wrong shape"),
    ):
        names = sorted(str(name if isinstance(name, str) else name[0]) for name in info.get(key) or ())
        if key == "unexpected_keys":
            names = [name for name in names if not LEGACY_BUFFERS.search(name)]
        if names:
            shown = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
            raise ModelRefError(f"{str(path)!r} {what.format(n=len(names))}: {shown}; {SAVE_HINT}")
    errors = info.get("error_msgs") or []
    if errors:
        raise ModelRefError(f"{str(path)!r}: its weights did not load: {_one_line(errors[0])}; {SAVE_HINT}")


def load_tokenizer(path: Path) -> Any:
    with as_model_ref_error(path, "its tokenizer"):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_image_processor(path: Path) -> Any:
    with as_model_ref_error(path, "its image processor"):
        # The PIL/numpy implementation: the other needs torchvision, which cannot be loaded here.
        return AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)


@contextmanager
def as_model_ref_error(path: Path, what: str) -> Iterator[None]:
    """Whatever a checkpoint's files make transformers raise -> ModelRefError naming it, in one line.
    Running out of memory is not the checkpoint's fault and stays what it is."""
    try:
        yield
    except (ModelRefError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as error:
        log.debug("loading %s from %s failed", what, path, exc_info=error)
        raise ModelRefError(
            f"{str(path)!r}: could not load {what}: {type(error).__name__}: {_one_line(error)}; {SAVE_HINT}"
        ) from error


def _one_line(error: object, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
