"""Trainer settings: flat, one line each with why it has its default (as in nanoGPT's train.py).

Every field can be set as ``TRAINER_<FIELD>`` (nested groups with ``__``, e.g.
``TRAINER_DECODING__NUM_BEAMS=1``), as a ``--field-name`` flag, or by a ``--preset``.
Precedence, lowest first: defaults, environment, preset, flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from captionfleet.core.settings import DecodingSettings, S3Settings, SettingsError, describe_validation_error
from captionfleet.trainer.scratch import ScratchSizes

# Settings a resumed run may change from the run it continues. Every other setting defines the run
# (data, model, optimisation): a checkpoint only resumes under the values it was written with, see
# TrainerSettings.fingerprint. A new setting defines the run unless it is added here, with why.
RESUME_MAY_CHANGE = frozenset(
    {
        "max_steps",  # the step budget: raising it is how a finished or stopped run is extended
        "name",  # only labels the published version string; the weights do not depend on it
        "out_dir",  # where the finished model is written, not what is trained
        "run_dir",  # where the checkpoint lives; a run folder may be moved
        "cache_dir",  # where remote init_from checkpoints are cached: the same files wherever they are
        "load_threads",  # how fast file data sets are read, not what is read
        "device",  # a run may continue on another machine; the checkpoint is device-independent
        "dtype",  # compute precision of the same steps ("auto" already differs from machine to machine)
        "threads",  # CPU threads: speed only
        "eval_interval",  # how often to validate and checkpoint, not what is trained
        "eval_batches",  # how much validation loss is averaged over: a report, not training
        "eval_caption_samples",  # captions sampled at each evaluation: a report, not training
        "resume",  # the switch itself (only compared when it is on)
        "log_interval",  # logging only
        "progress",  # progress bar only
        "decoding",  # decoding for the final evaluation, after training
        "s3",  # endpoint and credentials for the same objects; they may rotate between attempts
        "publish_to",  # where the finished model is uploaded, after training
        "gate_metric",  # the quality gate judges the finished model, after training
        "gate_tolerance",  # the quality gate judges the finished model, after training
        "eval_set_size",  # the registry's fixed evaluation set, drawn after training
        "promote_unjudged",  # the quality gate judges the finished model, after training
    }
)


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    # --- what to train ----------------------------------------------------------------------------
    # A model ref the worker accepts (directory, s3://, hub id, "builtin") to fine-tune; empty means
    # build a new model from scratch with the sizes below and a tokenizer trained on the captions.
    init_from: str = ""
    # Names the model in its version string ("<name>-<weights hash>").
    name: str = "captioner"
    # The finished checkpoint: exactly what the worker loads (save_pretrained + captionfleet.json).
    out_dir: Path = Path("out/model")
    # Resume checkpoints (weights + optimizer state) and the training log; kept apart from out_dir
    # so the published checkpoint never carries optimizer state. Default: <out_dir>.run beside it.
    run_dir: Path | None = None
    # Where remote init_from checkpoints are cached (shared with the worker's cache by default).
    cache_dir: Path = Path("~/.cache/captionfleet/models").expanduser()

    # --- data ---------------------------------------------------------------------------------------
    # "shapes" (synthetic, generated from the seed), a .jsonl/.csv manifest, or COCO captions .json.
    data: str = "shapes"
    # Folder that relative image paths are resolved against (COCO needs it; manifests default to
    # the manifest's own folder).
    image_root: Path | None = None
    # Share of a file data set held out for validation, split by image with the seed.
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    # Upper bound on validation images: evaluation decodes captions, which is the slow part.
    max_val_images: int = Field(default=500, ge=1)
    # Shapes pictures are rendered on demand, so the training set can be larger than any run needs:
    # the model then never sees a picture twice.
    shapes_train_size: int = Field(default=1_000_000, ge=1)
    # Validation shapes come from seed + 1; 500 pictures give exact match to about ±2%.
    shapes_val_size: int = Field(default=500, ge=1)
    # Threads that read and decode file data sets once at start (Pillow decodes without the GIL).
    load_threads: int = Field(default=4, ge=1)

    # --- model from scratch (ignored when init_from is set) ----------------------------------------
    # Which family a new model is: ViT + GPT-2 (the built-in model's), or GIT (one transformer over the
    # image tokens and the caption, sized by the same numbers: vit_* its image encoder, gpt2_* its text
    # decoder). A fine-tuned model is the family of its checkpoint (vision-encoder-decoder, git or blip).
    family: Literal["vision-encoder-decoder", "git"] = "vision-encoder-decoder"
    # Input side in pixels; 64 keeps a small shape (12 px) several patches' worth of detail.
    image_size: int = Field(default=64, ge=8)
    # 8 px patches: 64 tokens for the encoder at 64 px, fine enough to tell a star from a circle.
    patch_size: int = Field(default=8, ge=1)
    vit_hidden: int = Field(default=128, ge=8)
    vit_layers: int = Field(default=3, ge=1)
    vit_heads: int = Field(default=4, ge=1)
    gpt2_hidden: int = Field(default=128, ge=8)
    gpt2_layers: int = Field(default=2, ge=1)
    gpt2_heads: int = Field(default=4, ge=1)
    # Longest caption in tokens the decoder can hold (start token and eos included).
    max_positions: int = Field(default=40, ge=4)
    # BPE vocabulary target; small vocabularies train fast and caption grammars need few words.
    vocab_size: int = Field(default=512, ge=260)
    # Dropout in both halves; 0 for synthetic data, where every batch is fresh and nothing overfits.
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Captions the tokenizer is trained on (for shapes: drawn from the training seed).
    tokenizer_captions: int = Field(default=20_000, ge=1)

    # --- optimisation -------------------------------------------------------------------------------
    seed: int = 1337
    # Optimizer steps; one step is batch_size * grad_accum samples.
    max_steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    # Micro-batches per step: a larger effective batch without the memory of a larger batch.
    grad_accum: int = Field(default=1, ge=1)
    # Peak learning rate: 1e-3 suits tiny models from scratch; use ~5e-5 to fine-tune ViT-GPT2.
    learning_rate: float = Field(default=1e-3, gt=0)
    # Cosine decay ends here (nanoGPT: ~learning_rate / 10).
    min_lr: float = Field(default=1e-4, ge=0)
    # Linear warm-up steps: Adam's early updates are noisy until its moment estimates settle.
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    beta1: float = 0.9
    # 0.99 rather than 0.999: shorter memory suits short runs (as nanoGPT does for small models).
    beta2: float = 0.99
    # Clip the global gradient norm (0 = off): guards against the odd spike early on.
    grad_clip: float = Field(default=1.0, ge=0)
    # Captions longer than this many tokens (eos included) are cut for training.
    max_caption_tokens: int = Field(default=32, ge=2)

    # --- system -------------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bfloat16 autocast on GPUs that have it, else float16 with a gradient scaler; float32 on
    # CPU (CPU autocast is slower than float32 for models this small).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # CPU threads for torch (0 = torch's default, all cores).
    threads: int = Field(default=0, ge=0)

    # --- validation, checkpoints, logs --------------------------------------------------------------
    # Every this many steps: validation loss, a resume checkpoint, and captions on a few val images.
    eval_interval: int = Field(default=250, ge=1)
    # Validation batches for the loss (fixed batches, so the numbers are comparable over a run).
    eval_batches: int = Field(default=4, ge=1)
    # Val images captioned at each interval through the worker's captioner (0 = loss only).
    eval_caption_samples: int = Field(default=64, ge=0)
    # Continue from run_dir's checkpoint when there is one (same step, same optimizer state); refused
    # when it was written under other run-defining settings (all but RESUME_MAY_CHANGE).
    resume: bool = True
    # Print a line (besides the progress bar) every this many steps.
    log_interval: int = Field(default=50, ge=1)
    # Show the tqdm progress bar (off in tests and non-interactive jobs if you like).
    progress: bool = True
    # Decoding for the final evaluation; None-equivalents take the worker's defaults.
    decoding: DecodingSettings = DecodingSettings()
    # Object storage for s3:// images and s3:// init_from refs.
    s3: S3Settings = S3Settings()

    # --- publishing to object storage (trainer/publish.py) -------------------------------------------
    # A registry root s3://bucket/models/<name>: the finished checkpoint is uploaded to versions/<v>/
    # there and becomes LATEST only if it passes the quality gate. Empty: out_dir only.
    # With it, init_from may be "latest" (fine-tune what workers serve now): the refresh run.
    publish_to: str = ""
    # The gate's score and how far below LATEST's (in its own units: CIDEr 0..10, others 0..1) a new
    # version may be and still be promoted; judged on the model's fixed evaluation set.
    gate_metric: Literal["cider", "bleu4", "exact_match"] = "cider"
    gate_tolerance: float = Field(default=0.05, ge=0)
    # When the gate cannot compare the new version with LATEST (LATEST cannot be loaded), promote it on its
    # own scores anyway. Off: it is stored with its scores, LATEST stays, and the run exits 5 for an operator.
    promote_unjudged: bool = False
    # Validation images the first publish stores as that fixed evaluation set (never re-drawn).
    eval_set_size: int = Field(default=200, ge=2)  # CIDEr is 0 for every model on one image

    @model_validator(mode="after")
    def _check(self) -> TrainerSettings:
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if not self.init_from:
            for hidden, heads, what in (
                (self.vit_hidden, self.vit_heads, "vit"),
                (self.gpt2_hidden, self.gpt2_heads, "gpt2"),
            ):
                if hidden % heads:
                    raise ValueError(f"{what}_hidden ({hidden}) must be a multiple of {what}_heads ({heads})")
            if self.image_size % self.patch_size:
                raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size")
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return self.run_dir if self.run_dir is not None else self.out_dir.with_name(self.out_dir.name + ".run")

    def scratch_sizes(self) -> ScratchSizes:
        return ScratchSizes(
            image_size=self.image_size,
            patch_size=self.patch_size,
            vit_hidden=self.vit_hidden,
            vit_layers=self.vit_layers,
            vit_heads=self.vit_heads,
            gpt2_hidden=self.gpt2_hidden,
            gpt2_layers=self.gpt2_layers,
            gpt2_heads=self.gpt2_heads,
            max_positions=self.max_positions,
            vocab_size=self.vocab_size,
        )

    def recorded(self) -> dict[str, Any]:
        """What goes into captionfleet.json: everything but secrets."""
        return self.model_dump(mode="json", exclude={"s3": {"access_key_id", "secret_access_key"}})

    def fingerprint(self) -> dict[str, Any]:
        """The settings that define the run (all but RESUME_MAY_CHANGE), saved with each checkpoint:
        resuming under other values would silently continue a different run."""
        return {k: v for k, v in self.recorded().items() if k not in RESUME_MAY_CHANGE}


def load_trainer_settings(**overrides: Any) -> TrainerSettings:
    """Settings from the environment, with ``overrides`` (preset, then flags) on top."""
    try:
        base = TrainerSettings()
        if not overrides:
            return base
        # Validate the merged values, so a bad flag is reported like a bad variable.
        return TrainerSettings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, "TRAINER_")) from error
