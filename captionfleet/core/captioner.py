"""The model boundary: what every model family offers the pipeline (``CaptionModel``), and the
VisionEncoderDecoder (ViT-GPT2) captioner with its fast path.

The pipeline works in two steps, so that per-image work overlaps inference:

- ``prepare(image, prompt) -> ModelInput`` runs in decode threads: resizing, normalising, for
  dynamic-resolution families their patches, the prompt's tokens; the input records its ``cost`` (what
  the model pays for it) and the preparation it was made with (``key``);
- ``caption_inputs(inputs) -> list[Caption]`` runs in the model thread: collates, generates, decodes only
  the generated tokens, with each caption's confidence.

An input prepared for another model (the hot swap replaced it between decode and batch) is prepared
again from its ``origin`` before captioning, never captioned with the wrong preprocessing
(``own_inputs``). ``Captioner`` below is the ViT-GPT2 family: its preprocessing is PIL + numpy from the
checkpoint's ``preprocessor_config.json`` (it matches ViTImageProcessor's output and avoids its per-call
overhead). Every other family is ``captionfleet.core.families.captioner.FamilyCaptioner``;
``captionfleet.core.loading`` picks one from the checkpoint's ``model_type``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessorList, VisionEncoderDecoderModel
from transformers.utils import logging as hf_logging

from captionfleet.core import checkpoint_load, fastpath
from captionfleet.core.beams import beam_group, share_cross_attention_projections
from captionfleet.core.between_steps import step_processors
from captionfleet.core.generation import Caption, captions_from_output, recorder_for
from captionfleet.core.model_store import ModelRefError, check_checkpoint_dir, model_type_of
from captionfleet.core.registry_layout import METADATA_FILE
from captionfleet.core.settings import DecodingSettings, runs_on_cuda
from captionfleet.core.static_decoding import StaticDecoding

logger = logging.getLogger(__name__)


class _DropImageMaskWarning(logging.Filter):
    """transformers warns about a missing attention mask whenever pad == eos (GPT-2) and the
    batch has more than one row. Our encoder input is pixels, which are never padded, and the
    decoder starts from one token per row, so the warning does not apply: drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention mask" not in record.getMessage()


hf_logging.get_logger("transformers.generation.utils").addFilter(_DropImageMaskWarning())


VED_FAMILY = "vision-encoder-decoder"


class PromptError(ValueError):
    """A prompt the model cannot take (the item fails alone, as malformed)."""


class PreparationFailed(Exception):
    """Inputs prepared for another model that the model serving now could not prepare again (a hot swap
    to a model that takes no prompt, or cannot decode the image): nothing was captioned. ``errors``: what
    each of them raised, by its position in the batch; ``inputs``: the batch as prepared again (None where
    it failed), so that the caller fails those items alone, with their own kinds, and captions the rest
    without preparing them once more."""

    def __init__(self, errors: dict[int, Exception], inputs: list[ModelInput | None]) -> None:
        first = next(iter(errors.values()))
        super().__init__(
            f"{len(errors)} of {len(inputs)} inputs could not be prepared again for the model serving now "
            f"(first: {type(first).__name__}: {first})"
        )
        self.errors = errors
        self.inputs = inputs


class ImageOrigin(Protocol):
    """Where an input's image comes from, so that another model can prepare it again (the hot swap)."""

    def image(self, draft_size: tuple[int, int] | None) -> Image.Image:
        """The image, decoded for a model of this draft size (``CaptionModel.draft_size``)."""
        ...

    def decoded_for(self, draft_size: tuple[int, int] | None) -> bool:
        """Whether the image the input was prepared from is the one ``image(draft_size)`` gives: a JPEG
        decoded at another model's draft size is not (the hot swap came between decoding and preparing)."""
        ...

    def for_draft(self, draft_size: tuple[int, int] | None) -> ImageOrigin:
        """This origin, for an input prepared from ``image(draft_size)``."""
        ...


@dataclass(frozen=True)
class KeptImage:
    """An image already in memory (``caption(images)``, the dashboard): it is its own origin, the same
    image for every model."""

    decoded: Image.Image

    def image(self, draft_size: tuple[int, int] | None) -> Image.Image:
        return self.decoded

    def decoded_for(self, draft_size: tuple[int, int] | None) -> bool:
        return True

    def for_draft(self, draft_size: tuple[int, int] | None) -> KeptImage:
        return self


# The feature of an input whose JPEG waits for its batch's decoding on the device (core/gpu_images.py).
UNDECODED_JPEG = "jpeg"


def is_undecoded(item: ModelInput) -> bool:
    """Whether ``item`` holds a JPEG's bytes still to be decoded with its batch, not the model's inputs."""
    return UNDECODED_JPEG in item.features


@dataclass(frozen=True)
class ModelInput:
    """One image prepared for one model. ``features``: that model's inputs for this image alone
    (the fixed-size path: ``pixel_values`` as a CHW numpy array, or a CHW tensor on the model's device where
    the worker decoded its JPEG there, which holds its bytes until then: core/gpu_images.py; other families:
    the processor's tensors with a batch dimension of 1). ``cost``: the pixels the model's vision encoder
    processes for it, after resizing (a dynamic-resolution family's visual tokens times the pixels each
    covers), which the batcher's ``max_pixels`` limit counts. ``key``: the preparation it was made with; a model whose
    ``preparation_key`` differs prepares it again from ``origin``. ``prompt``: as asked (None: the family's
    default)."""

    features: Mapping[str, Any]
    cost: int
    key: str
    prompt: str | None
    origin: ImageOrigin


@dataclass(frozen=True)
class Preprocessing:
    """The subset of ViTImageProcessor settings that ViT-GPT2 checkpoints use."""

    width: int
    height: int
    resample: Image.Resampling
    rescale_factor: float | None
    mean: np.ndarray | None
    std: np.ndarray | None

    @classmethod
    def from_checkpoint(cls, path: Path) -> Preprocessing:
        config_file = path / "preprocessor_config.json"
        if not config_file.exists():
            raise FileNotFoundError(
                f"{config_file} is missing: save the image processor with the checkpoint "
                "(processor.save_pretrained(dir))"
            )
        cfg: dict[str, Any] = json.loads(config_file.read_text())
        size = cfg.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if "shortest_edge" in size:
            raise ValueError(f"{config_file}: size={size} (shortest_edge) is not supported; use height/width")
        do_normalize = cfg.get("do_normalize", True)
        return cls(
            width=int(size["width"]),
            height=int(size["height"]),
            resample=Image.Resampling(cfg.get("resample", Image.Resampling.BILINEAR)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
            mean=np.asarray(cfg.get("image_mean", [0.5] * 3), dtype=np.float32) if do_normalize else None,
            std=np.asarray(cfg.get("image_std", [0.5] * 3), dtype=np.float32) if do_normalize else None,
        )

    def array(self, image: Image.Image) -> np.ndarray:
        """One image as a CHW float32 array; safe to call from decode threads.

        The bytes are put in CHW order first and scaled and normalised in place: the same float32 steps on
        every element as ``(x * rescale - mean) / std`` in HWC order, so the same values to the bit, without
        three temporary arrays and a strided copy of floats (a quarter of the CPU time)."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if rgb.size != (self.width, self.height):
            rgb = rgb.resize((self.width, self.height), resample=self.resample)
        pixels = np.asarray(rgb)
        if not self._in_place:
            return self._array_hwc(pixels)
        array = pixels.transpose(2, 0, 1).astype(np.float32, order="C")
        if self.rescale_factor is not None:
            array *= np.float32(self.rescale_factor)
        if self.mean is not None and self.std is not None:
            array -= self.mean.reshape(-1, 1, 1)
            array /= self.std.reshape(-1, 1, 1)
        return array

    @property
    def _in_place(self) -> bool:
        """Whether ``array`` may work in place in CHW order: float32 per-channel (or single) mean and std, whose
        results stay float32 as in ``_array_hwc``; anything else takes that path itself."""
        if self.mean is None or self.std is None:
            return True
        return all(v.dtype == np.float32 and v.ndim <= 1 for v in (self.mean, self.std))

    def _array_hwc(self, pixels: np.ndarray) -> np.ndarray:
        """The reference computation, in HWC order (what ``array`` computes, for any mean and std)."""
        array = np.asarray(pixels, dtype=np.float32)
        if self.rescale_factor is not None:
            array = array * np.float32(self.rescale_factor)
        if self.mean is not None and self.std is not None:
            array = (array - self.mean) / self.std
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.array(image) for image in images]))


@dataclass(frozen=True)
class FixedSizeInputs:
    """What preparing an image for a fixed-size model outside ``prepare`` takes (the worker decoding a batch's
    JPEGs on the model's GPU, captionfleet/core/gpu_images.py): its preprocessing, the device and dtype its
    pixels go to, and the ``ModelInput.key`` inputs prepared so carry (its ``preparation_key``)."""

    preprocessing: Preprocessing
    device: torch.device
    dtype: torch.dtype
    key: str


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is visible; set the device to auto or cpu")
    if requested == "auto":  # the rule lives in settings, which derives the batch size from it
        return torch.device("cuda" if runs_on_cuda("auto") else "cpu")
    return torch.device(requested)


def checkpoint_version(path: Path) -> str:
    """The version recorded by the trainer, else a content hash of the weights."""
    metadata = path / METADATA_FILE
    if metadata.exists():
        version = json.loads(metadata.read_text()).get("version")
        if version:
            return str(version)
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")):
        with weights.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return "sha256-" + digest.hexdigest()[:12]


class CaptionModel(Protocol):
    """What the pipeline, the stream and the bulk jobs need of a model.

    A loaded :class:`Captioner` is one; so is a wrapper around one (the hot swap, the stream's metered
    model), which delegates to the model it wraps instead of subclassing ``Captioner`` and copying its state.
    """

    @property
    def version(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def family(self) -> str:
        """The checkpoint's ``model_type`` (``vision-encoder-decoder``, ``blip``, ``qwen2_vl``, ...)."""
        ...

    @property
    def default_prompt(self) -> str | None:
        """The prompt an input without one is captioned with (None: none, e.g. ViT-GPT2, BLIP, GIT)."""
        ...

    @property
    def preparation_key(self) -> str:
        """Equal for two models exactly when an input prepared by one is right for the other."""
        ...

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """The smallest size a JPEG may be decoded at without losing what the model sees (None: full size)."""
        ...

    @property
    def fixed_size_inputs(self) -> FixedSizeInputs | None:
        """How its inputs may be prepared on its device (ViT-GPT2's fixed size); None: by ``prepare`` only. An
        input's ``pixel_values`` may then be a (3, H, W) tensor on the device instead of a numpy array."""
        ...

    def prepare(
        self, image: Image.Image, prompt: str | None = None, *, origin: ImageOrigin | None = None
    ) -> ModelInput:
        """Per-image work, safe to call from several decode threads at once. ``origin``: how to get the
        image again (default: keep ``image`` itself)."""
        ...

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        """Caption a batch (from one thread at a time); inputs prepared for another model are prepared again."""
        ...

    def caption(self, images: Sequence[Image.Image], decoding: DecodingSettings | None = None) -> list[str]: ...


def own_inputs(model: CaptionModel, inputs: Sequence[ModelInput]) -> list[ModelInput]:
    """``inputs``, each prepared for ``model``: one prepared for another model, or from an image decoded
    for another model's draft size (a hot swap happened between its decoding and its batch, or between
    the two), is prepared again from its origin, with its prompt. PreparationFailed when some cannot be."""
    key, draft = model.preparation_key, model.draft_size
    owned: list[ModelInput | None] = []
    errors: dict[int, Exception] = {}
    for position, item in enumerate(inputs):
        # An input whose JPEG still waits for its batch's decoding on the device (core/gpu_images.py) is
        # owned only once decoded: one left for this model, then held while another served (a swap and a
        # swap back), reaches it undecoded and is prepared here from its bytes.
        if item.key == key and item.origin.decoded_for(draft) and not is_undecoded(item):
            owned.append(item)
            continue
        origin = item.origin.for_draft(draft)
        try:
            owned.append(model.prepare(origin.image(draft), item.prompt, origin=origin))
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the process's trouble, not the item's
        except Exception as error:  # the item's: its image or prompt, for this model
            owned.append(None)
            errors[position] = error
    if errors:
        raise PreparationFailed(errors, owned)
    return [item for item in owned if item is not None]


class ModelWrapper:
    """Base of a CaptionModel that wraps another (the hot swap, the stream's metering): what it reports is
    read from the wrapped model at each access, never copied, so it always describes the model serving now.
    A subclass names that model (``wrapped``) and may add its own step around ``caption_inputs``."""

    @property
    def wrapped(self) -> CaptionModel:
        raise NotImplementedError

    @property
    def version(self) -> str:
        return self.wrapped.version

    @property
    def source(self) -> str:
        return self.wrapped.source

    @property
    def family(self) -> str:
        return self.wrapped.family

    @property
    def default_prompt(self) -> str | None:
        return self.wrapped.default_prompt

    @property
    def preparation_key(self) -> str:
        return self.wrapped.preparation_key

    @property
    def draft_size(self) -> tuple[int, int] | None:
        return self.wrapped.draft_size

    @property
    def fixed_size_inputs(self) -> FixedSizeInputs | None:
        return self.wrapped.fixed_size_inputs

    def prepare(
        self, image: Image.Image, prompt: str | None = None, *, origin: ImageOrigin | None = None
    ) -> ModelInput:
        return self.wrapped.prepare(image, prompt, origin=origin)

    def caption(self, images: Sequence[Image.Image], decoding: DecodingSettings | None = None) -> list[str]:
        # Through caption_inputs, so the wrapper's own step (a swap, a timer) runs for this batch too.
        inputs = [self.prepare(image) for image in images]
        return [caption.text for caption in self.caption_inputs(inputs, decoding)] if inputs else []

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        return self.wrapped.caption_inputs(inputs, decoding)


def decoding_of_model(model: CaptionModel) -> DecodingSettings | None:
    """The decoding ``model`` captions with when a call names none (a wrapper's: the model it wraps now),
    for the batcher to count an image's decoder sequences; None when the model does not say (a stand-in)."""
    while isinstance(model, ModelWrapper):
        model = model.wrapped
    decoding = getattr(model, "decoding", None)  # Captioner's and FamilyCaptioner's attribute
    return decoding if isinstance(decoding, DecodingSettings) else None


class Captioner:
    """A loaded VisionEncoderDecoder checkpoint. Thread-compatible: call ``caption`` from one thread at a
    time (``prepare`` from any)."""

    family = VED_FAMILY
    default_prompt: str | None = None  # it takes no prompt (prepare refuses one)

    def __init__(
        self,
        model: VisionEncoderDecoderModel,
        tokenizer: Any,
        preprocessing: Preprocessing,
        *,
        version: str,
        source: str,
        decoding: DecodingSettings,
        precision: str = "fp32",
        input_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocessing
        self.version = version
        self.source = source
        self.decoding = decoding
        self.device = next(model.parameters()).device
        # What pixels are cast to: an int8 model keeps float32 inputs although some weights are not.
        self.dtype = input_dtype or next(model.parameters()).dtype
        # The resolved fast path (see captionfleet/core/fastpath.py): fp32, bf16, int8 or fp16.
        self.precision = precision
        # Kept static KV caches per batch shape (compiled on CUDA); None: transformers' dynamic cache.
        self.static: StaticDecoding | None = None

    def use_static_cache(
        self, max_rows: int, decodings: Sequence[DecodingSettings] = (), *, sizes: Sequence[int] | None = None
    ) -> int:
        """Decode through kept static KV caches for batches of up to ``max_rows`` (captionfleet/core/
        static_decoding.py), each batch shape (``sizes``, default the powers of two up to ``max_rows``)
        warmed up now for ``decodings`` (default: the model's own); returns the warm-up runs. Only warmed-up
        decodings go through the static caches."""
        self.static = StaticDecoding(self.model, max_rows, sizes)
        configs = [self.generation_config(decoding) for decoding in (decodings or [self.decoding])]
        shape = (3, self.preprocess.height, self.preprocess.width)
        return self.static.warm_up(shape, self.dtype, self.device, configs)

    def _generate(self, pixel_values: torch.Tensor, config: GenerationConfig, **kwargs: Any) -> Any:
        """model.generate on pixels already on the device, through the static caches when in use."""
        static = self.static is not None and self.static.handles(config)
        # The static caches hold cross-attention rows per beam: their projections repeat per beam.
        with beam_group(self.model, config.num_beams, per_image=not static) as beam_kwargs:
            if static:  # its own cache, sharing cross rows
                assert self.static is not None
                return self.static.generate(pixel_values, config, **kwargs)
            return self.model.generate(pixel_values=pixel_values, generation_config=config, **beam_kwargs, **kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.preprocess.width, self.preprocess.height)

    @property
    def draft_size(self) -> tuple[int, int]:
        return self.image_size

    @property
    def fixed_size_inputs(self) -> FixedSizeInputs:
        return FixedSizeInputs(self.preprocess, self.device, self.dtype, self.preparation_key)

    @property
    def preparation_key(self) -> str:
        # Two checkpoints with the same preprocessing (versions of one model) share prepared inputs.
        prep = self.preprocess
        # np.ravel: a checkpoint may give one number for all channels (image_mean: 0.5), a 0-d array here.
        listed = [None if values is None else [float(v) for v in np.ravel(values)] for values in (prep.mean, prep.std)]
        return f"{VED_FAMILY}:{prep.width}x{prep.height}:{int(prep.resample)}:{prep.rescale_factor}:{listed}"

    def prepare(
        self, image: Image.Image, prompt: str | None = None, *, origin: ImageOrigin | None = None
    ) -> ModelInput:
        """The fixed-size path: one CHW float32 array (numpy, no torch call), as the decode threads always made."""
        if prompt is not None:
            raise PromptError(
                f"a {VED_FAMILY} model takes no prompt (got {prompt!r}); send the request without one, or serve "
                "a family that takes prompts (blip, git, florence2, the VLMs)"
            )
        return ModelInput(
            features={"pixel_values": self.preprocess.array(image)},
            cost=self.preprocess.width * self.preprocess.height,
            key=self.preparation_key,
            prompt=None,
            origin=origin or KeptImage(image),
        )

    @classmethod
    def from_dir(
        cls,
        path: Path,
        *,
        device: str = "auto",
        decoding: DecodingSettings | None = None,
        precision: str = "auto",
        static_rows: int = 0,
    ) -> Captioner:
        """``precision``: "auto" (the fastest path per device that keeps captions independent of
        batching and agrees with fp32: fp16 on CUDA, bf16 on CPUs with native bf16, else int8 where
        the CPU's int8 GEMM is exact, else fp32), or one of fp32 (lossless), bf16, int8, fp16; see
        captionfleet/core/fastpath.py. ``static_rows``: decode through static KV caches for batches of up
        to that many images, warmed up here (0: dynamic)."""
        path = Path(path)
        check_checkpoint_dir(path)
        model_type = model_type_of(path)
        if model_type != VED_FAMILY:
            raise ModelRefError(
                f"{str(path)!r} is a {model_type!r} checkpoint, not {VED_FAMILY}: load it with "
                "captionfleet.core.loading.load_checkpoint, which picks its family's captioner"
            )
        torch_device = pick_device(device)
        resolved = fastpath.resolve_precision(precision, torch_device)
        hf_logging.disable_progress_bar()  # no "Loading weights" bars in worker logs
        # Half-width precisions are loaded as such, so a float32 copy never sits in memory (peak RSS);
        # int8 quantizes from float32. fp16 on GPUs: captions are unchanged in practice, memory halves.
        load_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolved, torch.float32)
        model = checkpoint_load.load_model(path, load_dtype)  # every weight from the files, or refused
        model.eval()
        share_cross_attention_projections(model)  # before optimize(), which converts what it wraps
        model, input_dtype = fastpath.optimize(model, resolved, torch_device)
        fastpath.return_freed_heap()  # what loading and converting freed, out of the RSS
        fastpath.reuse_freed_memory()  # what captioning frees, kept for the next batch
        tokenizer = checkpoint_load.load_tokenizer(path)
        version = checkpoint_version(path)
        logger.info("loaded model %s from %s on %s (%s)", version, path, torch_device, resolved)
        captioner = cls(
            model,
            tokenizer,
            Preprocessing.from_checkpoint(path),
            version=version,
            source=str(path),
            decoding=decoding or DecodingSettings(),
            precision=resolved,
            input_dtype=input_dtype,
        )
        if static_rows:
            captioner.use_static_cache(static_rows)
        return captioner

    def generation_config(self, decoding: DecodingSettings) -> GenerationConfig:
        """An explicit config, so a checkpoint's stale max_length or sampling flags never leak in."""
        cfg = self.model.config
        decoder_cfg: Any = cfg.decoder
        start = cfg.decoder_start_token_id
        if start is None:
            start = decoder_cfg.bos_token_id
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else decoder_cfg.eos_token_id
        # GPT-2 has no pad token: pad finished rows with eos, which the decoder strips.
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
        return GenerationConfig(
            decoder_start_token_id=start,
            bos_token_id=start,
            eos_token_id=eos,
            pad_token_id=pad,
            num_beams=decoding.num_beams,
            max_new_tokens=decoding.max_new_tokens,
            no_repeat_ngram_size=decoding.no_repeat_ngram_size,
            repetition_penalty=decoding.repetition_penalty,
            length_penalty=decoding.length_penalty,
            # False: stopping at the first num_beams finished hypotheses keeps short junk and drops the
            # better caption still being searched (measured on the built-in model: 89.8% -> 93.6%
            # exact match with 4 beams).
            early_stopping=False,
            do_sample=False,
        )

    def caption(self, images: Sequence[Image.Image], decoding: DecodingSettings | None = None) -> list[str]:
        if not images:
            return []
        return self.caption_pixels(self.preprocess(images), decoding)

    @torch.inference_mode()
    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        """The pipeline's path: the same generate() call as ``caption_pixels`` (the same captions), with
        each caption's confidence recorded on the way (see core/generation.py)."""
        if not inputs:
            return []
        inputs = own_inputs(self, inputs)
        pixel_values = self._stacked([item.features["pixel_values"] for item in inputs])
        config = self.generation_config(decoding or self.decoding)
        config.return_dict_in_generate = True  # in the config: beside it, transformers warns on every call
        eos = [int(config.eos_token_id)]  # one id, set by generation_config()
        recorder = recorder_for(config.num_beams or 1, eos)
        # The latency lane's pause between steps (core/between_steps.py), except through kept static caches.
        static = self.static is not None and self.static.handles(config)
        processors = LogitsProcessorList([*([] if static else step_processors()), recorder])
        output = self._generate(pixel_values.to(self.device, self.dtype), config, logits_processor=processors)
        return captions_from_output(output, recorder, self.tokenizer, eos, rows=len(inputs))

    def _stacked(self, rows: list[Any]) -> torch.Tensor:
        """The batch's pixels: the decode threads' numpy arrays, stacked as ever; where some rows were prepared
        on the device already (fixed_size_inputs: JPEGs decoded there), the rest join them there."""
        if not any(isinstance(row, torch.Tensor) for row in rows):
            return torch.from_numpy(np.stack(rows))
        tensors = [row if isinstance(row, torch.Tensor) else torch.from_numpy(row) for row in rows]
        return torch.stack([tensor.to(self.device, self.dtype) for tensor in tensors])

    @torch.inference_mode()
    def caption_pixels(self, pixel_values: torch.Tensor, decoding: DecodingSettings | None = None) -> list[str]:
        """Caption already preprocessed images (N, 3, H, W), e.g. prepared by decode threads."""
        rows = pixel_values.shape[0]
        config = self.generation_config(decoding or self.decoding)
        output = self._generate(pixel_values.to(self.device, self.dtype), config)
        captions = [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
        if len(captions) != rows:  # never misattribute captions to images
            raise RuntimeError(f"model returned {len(captions)} captions for {rows} images")
        return captions
