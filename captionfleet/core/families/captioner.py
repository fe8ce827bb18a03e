"""``FamilyCaptioner``: the ``CaptionModel`` of every family but ViT-GPT2 (which keeps its fast path,
core/captioner.py): BLIP, GIT, Florence-2, PaliGemma, SmolVLM/Idefics3, LLaVA, Qwen2/2.5/3-VL, and any
other model type transformers maps to ``AutoModelForImageTextToText``.

Precision (``precision="auto"``): on CUDA the checkpoint's own half type when it was saved in bfloat16
(models trained in bf16 can overflow in fp16) and the GPU has bf16, else fp16; on CPU fp32, the honest
default: no agreement with fp32 has been measured for these families yet, so none is assumed. ``bf16``
can be asked for on either device; the int8 path is ViT-GPT2's only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessorList
from transformers.utils import logging as hf_logging

from captionfleet.core import checkpoint_load, fastpath
from captionfleet.core.between_steps import step_processors
from captionfleet.core.captioner import (
    ImageOrigin,
    KeptImage,
    ModelInput,
    PromptError,
    checkpoint_version,
    own_inputs,
    pick_device,
)
from captionfleet.core.families import prompts
from captionfleet.core.families.collate import collate
from captionfleet.core.families.limits import TOKEN_PIXELS, InputLimits, PromptRules
from captionfleet.core.family import Family, family_for
from captionfleet.core.generation import Caption, captions_from_output, recorder_for
from captionfleet.core.model_store import (
    ALLOWED_SUFFIXES,
    WEIGHTS_INDEX_FILE,
    ModelRefError,
    check_checkpoint_dir,
    weight_files,
)
from captionfleet.core.settings import DecodingSettings

logger = logging.getLogger(__name__)

# Checkpoint files that do not decide how an image and a prompt become inputs: the model's configs, the
# version's metadata and the weights' index. The weights themselves are never read here (a shard is
# gigabytes): what is hashed is the processor's, the tokenizer's and the chat template's files, and two
# checkpoints with the same ones prepare the same inputs (see preparation_key).
MODEL_FILES = frozenset({"config.json", "generation_config.json", "captionfleet.json", WEIGHTS_INDEX_FILE})


def resolve_precision(requested: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> str:
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(
            f"precision {requested!r} is for vision-encoder-decoder models only; use auto, fp32, bf16 or fp16"
        )
    if device.type == "cuda":
        if requested != "auto":
            return requested
        bf16 = checkpoint_dtype == torch.bfloat16 and torch.cuda.is_bf16_supported()
        return "bf16" if bf16 else "fp16"
    if requested == "fp16":
        raise ValueError("precision 'fp16' is for CUDA; on CPU use fp32 (the default) or bf16")
    return "fp32" if requested == "auto" else requested


def saved_dtype(config: Any) -> torch.dtype | None:
    """The dtype the checkpoint's weights were saved in, as its config records it (a name or a dtype)."""
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


def preparation_files(path: Path) -> list[Path]:
    """The checkpoint's processor files (tokenizer, image processor, processor, chat template): its
    checkpoint files (model_store.ALLOWED_SUFFIXES) but the weights and MODEL_FILES."""
    weights = {file.name for file in weight_files(path)}
    return [
        file
        for file in sorted(path.iterdir())
        if file.is_file()
        and file.suffix in ALLOWED_SUFFIXES
        and file.suffix != ".safetensors"
        and file.name not in weights
        and file.name not in MODEL_FILES
    ]


def preparation_digest(path: Path) -> str:
    """A digest of the checkpoint's processor files."""
    digest = hashlib.sha256()
    for file in preparation_files(path):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class FamilyCaptioner:
    """A loaded checkpoint of any image-text-to-text family. ``prepare`` from any thread,
    ``caption_inputs`` from one at a time."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        family: Family,
        *,
        version: str,
        source: str,
        decoding: DecodingSettings,
        precision: str,
        preparation_key: str,
        limits: InputLimits | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.spec = family
        self.version = version
        self.source = source
        self.decoding = decoding
        self.precision = precision
        self._preparation_key = preparation_key
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._draft_size = prompts.draft_size(processor.image_processor)
        tokenizer = processor.tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.prompt_rules = PromptRules(family.model_type, processor, limits or InputLimits())
        default = family.default_prompt
        self._default_prompt_tokens = len(tokenizer(default, add_special_tokens=False)["input_ids"]) if default else 0

    @property
    def family(self) -> str:
        return self.spec.model_type

    @property
    def preparation_key(self) -> str:
        return self._preparation_key

    @property
    def draft_size(self) -> tuple[int, int] | None:
        return self._draft_size

    @property
    def fixed_size_inputs(self) -> None:
        """None: its processor prepares its inputs (sizes, patches, prompts), in the decode threads only."""
        return None

    @property
    def default_prompt(self) -> str | None:
        return self.spec.default_prompt

    @classmethod
    def from_dir(
        cls,
        path: Path,
        *,
        device: str = "auto",
        decoding: DecodingSettings | None = None,
        precision: str = "auto",
        limits: InputLimits | None = None,
    ) -> FamilyCaptioner:
        path = Path(path)
        check_checkpoint_dir(path)
        config = checkpoint_load.load_config(path)
        model_type = checkpoint_load.check_image_to_text(path, config)
        torch_device = pick_device(device)
        resolved = resolve_precision(precision, torch_device, saved_dtype(config))
        # The processor first: a checkpoint it refuses (no chat template) is refused before its weights load.
        processor = checkpoint_load.load_processor(path, model_type)
        limits = limits or InputLimits()
        visual_bound = prompts.cap_visual_pixels(processor.image_processor, limits.max_visual_pixels)
        family = family_for(
            model_type,
            has_chat_template=bool(getattr(processor, "chat_template", None)),
            is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        )
        if not family.tested:
            logger.warning(
                "model type %s is not among the tested families; serving it with the generic rule", model_type
            )
        if family.prompt_style == "chat" and not getattr(processor, "chat_template", None):
            raise ModelRefError(
                f"{str(path)!r} is a {model_type} chat model without its chat template: copy chat_template.jinja "
                "(where transformers 5 saves it) from the checkpoint it came from into the folder, or save the "
                "processor again with save_pretrained"
            )
        hf_logging.disable_progress_bar()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolved, torch.float32)
        model = checkpoint_load.load_image_text_model(path, dtype)
        model.eval()
        model.to(torch_device)
        fastpath.return_freed_heap()
        fastpath.reuse_freed_memory()
        version = checkpoint_version(path)
        logger.info("loaded %s model %s from %s on %s (%s)", model_type, version, path, torch_device, resolved)
        captioner = cls(
            model,
            processor,
            family,
            version=version,
            source=str(path),
            decoding=decoding or DecodingSettings(),
            precision=resolved,
            # The bound is part of the preparation: the same files with another bound prepare other inputs.
            preparation_key=f"{model_type}:{preparation_digest(path)}"
            + (f":{visual_bound}px" if visual_bound is not None else ""),
            limits=limits,
        )
        # One preparation here, in one thread: the fast tokenizer settles its padding and truncation state
        # (a call that changes it while another thread encodes fails with "Already borrowed"), so the
        # decode threads that share it later never change it. A processor that cannot prepare even this
        # (a file it needs is missing or wrong) refuses the checkpoint here, as a ModelRefError.
        with checkpoint_load.as_model_ref_error(path, "its processor (preparing a blank image)"):
            captioner.prepare(Image.new("RGB", (32, 32)))
        return captioner

    # -- the two steps -------------------------------------------------------------------------------

    def prepare(
        self, image: Image.Image, prompt: str | None = None, *, origin: ImageOrigin | None = None
    ) -> ModelInput:
        if prompt is not None and self.spec.prompt_style == "none":
            raise PromptError(f"a {self.family} model takes no prompt (got {prompt!r}); send the request without one")
        # Checked before the processor runs: a prompt too long or holding control tokens never reaches it.
        prompt_tokens = self._default_prompt_tokens if prompt is None else self.prompt_rules.tokens(prompt)
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        features = prompts.encode(self.spec, self.processor, self.model.config, rgb, prompt)
        return ModelInput(
            features=features,
            # The prompt's tokens too: the batch's text is padded to its longest prompt (core/families/limits.py).
            cost=prompts.visual_cost(features, self.processor.image_processor) + prompt_tokens * TOKEN_PIXELS,
            key=self.preparation_key,
            prompt=prompt,
            origin=origin or KeptImage(image),
        )

    @torch.inference_mode()
    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        if not inputs:
            return []
        inputs = own_inputs(self, inputs)
        batch = collate([item.features for item in inputs], padding_side=self.spec.padding_side, pad_id=self.pad_id)
        on_device = {
            name: value.to(self.device, self.dtype if value.is_floating_point() else None)
            for name, value in batch.items()
        }
        config = self.generation_config(decoding or self.decoding)
        eos = _ids(config.eos_token_id)
        recorder = recorder_for(config.num_beams or 1, eos)
        output = self.model.generate(
            **on_device,
            generation_config=config,
            # The latency lane's pause between steps (core/between_steps.py); the recorder last.
            logits_processor=LogitsProcessorList([*step_processors(), recorder]),
        )
        captions = captions_from_output(output, recorder, self.processor.tokenizer, eos, rows=len(inputs))
        # Each caption names the prompt it answers: the input's own, else the family's default.
        return [
            replace(caption, prompt=item.prompt if item.prompt is not None else self.default_prompt)
            for caption, item in zip(captions, inputs, strict=True)
        ]

    def caption(self, images: Sequence[Image.Image], decoding: DecodingSettings | None = None) -> list[str]:
        inputs = [self.prepare(image) for image in images]
        return [caption.text for caption in self.caption_inputs(inputs, decoding)]

    def generation_config(self, decoding: DecodingSettings) -> GenerationConfig:
        """A fresh config: the checkpoint's token settings (its token ids, forced and suppressed tokens:
        checkpoint_load.TOKEN_SETTINGS, all the loaded model keeps) and the worker's decoding, never the
        checkpoint's sampling, beams, lengths or biases."""
        config = GenerationConfig(
            **checkpoint_load.token_settings(self.model.generation_config),
            do_sample=False,
            num_return_sequences=1,
            num_beams=decoding.num_beams,
            max_new_tokens=decoding.max_new_tokens,
            min_length=0,
            no_repeat_ngram_size=decoding.no_repeat_ngram_size,
            repetition_penalty=decoding.repetition_penalty,
            length_penalty=decoding.length_penalty,
            early_stopping=False,  # as ViT-GPT2's (core/captioner.py says why)
            return_dict_in_generate=True,
            output_scores=False,
            output_logits=False,
        )
        if self.family == "blip":
            # BLIP's generate() ends its text decoder at [SEP] whatever the config says: name it the end here too.
            config.eos_token_id = self.model.config.text_config.sep_token_id
        if config.pad_token_id is None:
            config.pad_token_id = self.pad_id
        return config


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]
