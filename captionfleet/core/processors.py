"""A family's processor, assembled from its image processor and tokenizer, without torchvision.

``AutoProcessor`` would also load a video processor for the families that have one (SmolVLM, the Qwen-VL
models), and video processors need torchvision, whose only wheel here is built for CUDA torch (its
operators fail to register with the CPU torch). Captioning never passes videos, so the processor is built
from its image part (the PIL/numpy image processor: ``backend="pil"``) and its tokenizer, with the
processor's own settings (chat template, image token counts) from the checkpoint; the class is the
family's own, told that it has no video part (``images_only``).

Every file is read through core/checkpoint_load.py's loaders (``trust_remote_code=False``).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import transformers
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.processing_utils import ProcessorMixin

# The processor's parts that are loaded separately (or not at all): never passed as settings.
SUB_PROCESSORS = ("image_processor", "tokenizer", "video_processor", "feature_extractor", "audio_tokenizer")


def processor_class(model_type: str) -> type[ProcessorMixin] | None:
    """The family's processor class; None when the family has none (tokenizer + image processor only)."""
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, ProcessorMixin) else None


_IMAGES_ONLY: dict[type[ProcessorMixin], type[ProcessorMixin]] = {}
_IMAGES_ONLY_LOCK = threading.Lock()


def images_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``cls`` without its video part: the same class for everything else (same name, so a processor
    saved from it names the family's class). One such class per family, made once."""
    attributes = cls.get_attributes()
    if "video_processor" not in attributes:
        return cls
    kept = [attribute for attribute in attributes if attribute != "video_processor"]

    def get_attributes(_: type) -> list[str]:
        return list(kept)

    with _IMAGES_ONLY_LOCK:
        if cls not in _IMAGES_ONLY:
            namespace = {"get_attributes": classmethod(get_attributes), "__module__": cls.__module__}
            _IMAGES_ONLY[cls] = type(cls.__name__, (cls,), namespace)
        return _IMAGES_ONLY[cls]


def assemble(cls: type[ProcessorMixin], image_processor: Any, tokenizer: Any, settings: dict[str, Any]) -> Any:
    """The processor of class ``cls`` from its parts and its saved settings (processor_config.json)."""
    images_cls = images_only(cls)
    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {name: value for name, value in settings.items() if name not in SUB_PROCESSORS}
    parts: dict[str, Any] = {"image_processor": image_processor, "tokenizer": tokenizer}
    if "video_processor" in accepted:
        parts["video_processor"] = None  # some __init__s take it positionally, without a default
    return images_cls.from_dict(kwargs, **parts)
