"""Worker settings: the only module that reads the environment.

Every field can be set as ``WORKER_<FIELD>`` (nested groups with ``__``, e.g.
``WORKER_BATCH__MAX_ITEMS=16``) or in a ``.env`` file. Command-line flags override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable and the fix."""


class ModelSettings(BaseModel):
    # A local checkpoint directory, s3://bucket/prefix, a Hugging Face hub id, or "builtin".
    ref: str = DEFAULT_MODEL
    # Remote checkpoints are downloaded here once, keyed by their ETags.
    cache_dir: Path = Path("~/.cache/captionfleet/models").expanduser()
    # "auto" picks CUDA (half precision) when present, else CPU (float32).
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DecodingSettings(BaseModel):
    # Defaults follow the reference model card (4 beams, 16 tokens).
    num_beams: int = Field(default=4, ge=1, le=16)
    max_new_tokens: int = Field(default=16, ge=1, le=256)
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    length_penalty: float = 1.0


class BatchSettings(BaseModel):
    max_items: int = Field(default=8, ge=1, le=1024)
    # The wait is counted from the first item of a batch, so a lone image waits at most this.
    max_wait_ms: int = Field(default=50, ge=0)
    # Cost limit: total source pixels in one batch (0 = no limit); bounds memory of decoded images.
    max_pixels: int = Field(default=0, ge=0)
    # Images decoded ahead of the model; bounds memory while keeping the model fed.
    prefetch: int = Field(default=32, ge=1)
    decode_threads: int = Field(default=2, ge=1, le=64)


class ImageSettings(BaseModel):
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    # Well below Pillow's decompression-bomb limit (~179 Mpx): a 50 Mpx RGB image is 150 MB.
    max_pixels: int = Field(default=50_000_000, ge=1)


class S3Settings(BaseModel):
    # Empty means AWS itself; set it for S3-compatible stores (SeaweedFS, MinIO, ...).
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Leave both empty to use the standard AWS credential chain (env, profile, web identity).
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WORKER_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    model: ModelSettings = ModelSettings()
    decoding: DecodingSettings = DecodingSettings()
    batch: BatchSettings = BatchSettings()
    images: ImageSettings = ImageSettings()
    s3: S3Settings = S3Settings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def describe_validation_error(error: ValidationError, prefix: str) -> str:
    """One line per bad field, naming the environment variable to fix."""
    lines = []
    for item in error.errors():
        var = prefix + "__".join(str(part) for part in item["loc"]).upper()
        got = item.get("input")
        lines.append(f"{var}={got!r}: {item['msg']}; fix: set {var} to a valid value or unset it")
    return "\n".join(lines)


def load_worker_settings() -> WorkerSettings:
    try:
        return WorkerSettings()
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, "WORKER_")) from error
