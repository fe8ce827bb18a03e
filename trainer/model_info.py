"""What a checkpoint is, for its registry record: family, processor, default prompt, precision.

Read from the files alone (config.json, the processor configs, the safetensors headers), without loading
the model: an imported checkpoint of a family this captionfleet cannot load is still described, and the
record says what an operator promoted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from captionfleet.core.model_store import ModelRefError, weight_files
from captionfleet.trainer.families import default_prompt

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# safetensors' dtype codes, as torch names them.
DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# A header larger than this is no safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def _json_object(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def family(path: Path) -> str:
    """config.json's ``model_type`` (``vision-encoder-decoder`` for the ViT-GPT2 checkpoints)."""
    return str(_json_object(path / "config.json").get("model_type") or UNKNOWN)


def processor_class(path: Path) -> str | None:
    """The processor the checkpoint names: processor_config.json's, else preprocessor_config.json's
    processor class, else its image processor type; None when it names none."""
    processor = _json_object(path / "processor_config.json")
    preprocessor = _json_object(path / "preprocessor_config.json")
    for config, key in (
        (processor, "processor_class"),
        (preprocessor, "processor_class"),
        (preprocessor, "image_processor_type"),
    ):
        if isinstance(config.get(key), str) and config[key]:
            return str(config[key])
    return None


def precision(path: Path) -> str:
    """The dtype most of the stored weights' bytes are in (e.g. float32), from the safetensors headers."""
    sizes: Counter[str] = Counter()
    try:
        for file in weight_files(path):
            with file.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if not 0 < length <= MAX_HEADER_BYTES:
                    return UNKNOWN
                header = json.loads(handle.read(length))
            for name, tensor in header.items():
                if name != "__metadata__" and isinstance(tensor, dict):
                    start, end = tensor.get("data_offsets", (0, 0))
                    sizes[DTYPES.get(str(tensor.get("dtype")), str(tensor.get("dtype")))] += int(end) - int(start)
    except (OSError, ValueError, TypeError, ModelRefError) as error:
        log.debug("%s: could not read the weights' dtypes: %s", path, error)
        return UNKNOWN
    return sizes.most_common(1)[0][0] if sizes else UNKNOWN


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """The ``model`` part of a version's record."""
    kind = family(path)
    return {
        "family": kind,
        "processor": processor_class(path),
        "default_prompt": default_prompt(kind),
        "precision": precision(path),
    }
