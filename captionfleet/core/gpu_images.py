"""JPEG bytes to a batch of model inputs on the GPU: nvJPEG decoding, resizing and normalising on the device.

Why: a GPU captions ViT-GPT2 faster than a whole node's cores decode 1600x1200 JPEGs (one core decodes and
prepares ~100 a second with draft mode: docs/benchmarks.md, "Decoding on the CPU"), so at the GPU's pace
the decoding moves to the GPU too. ``torchvision.io.decode_jpeg`` takes a list of JPEGs and decodes them in
one batched nvJPEG call onto the device; the resize (``interpolate`` with antialiasing, the mode of the
checkpoint's image processor) and the rescale/normalise run there as well, so only the compressed bytes
cross the bus.

The hostile-image rules are the CPU path's (captionfleet/core/images.py): the format is sniffed from
magic bytes and the pixel limit checked from the header before any decoder sees the bytes
(``jpeg_header``). Everything else takes the CPU path, per image: other formats, JPEGs nvJPEG does not
take as they are (CMYK, an EXIF rotation, more pixels than ``max_device_pixels``), and any the GPU fails
to decode (the batch is tried again one by one, since ``decode_jpeg`` returns nothing when one image of a
list fails). An image no path can decode is one ``ImageError`` in ``failures``, never a failed batch.
The CPU path's arrays are stacked in pinned host memory and copied with ``non_blocking``.

Where torchvision (with its image extension) is missing or the device is not CUDA, every image takes the
CPU path: the same function, the same result shape.

The worker (``DeviceJpegs``, WORKER_BATCH__DEVICE_DECODE): its decode threads fetch each item and check
it as ever (sniffing, the header's pixel limit, whether the device takes it), and leave a JPEG the device
takes undecoded: an input holding its bytes (``undecoded``); the pipeline decodes a batch's such inputs
together on the model's device right before the model call (``decode``), each one the device or the CPU
cannot decode one failure of its own. Other formats, other JPEGs and other model families are prepared
by the decode threads as before. Status: used by the worker's pipeline and the GPU bench (bench/gpu.py).
Untested on a GPU (no device was lent to the sessions that wrote it); the CPU tests drive its control
flow, in the pipeline too, with a stand-in decoder.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captionfleet.core.captioner import (
    UNDECODED_JPEG,
    FixedSizeInputs,
    ImageOrigin,
    ModelInput,
    Preprocessing,
)
from captionfleet.core.failures import ImageError
from captionfleet.core.images import ImageLimits, JpegHeader, decode_image, jpeg_header

logger = logging.getLogger(__name__)

# (JPEG bytes as 1-D uint8 CPU tensors, device) -> one uint8 CHW RGB tensor each, on the device.
Decoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]

# Pillow's resampling -> interpolate's mode; another filter (LANCZOS, BOX, HAMMING) keeps the CPU path.
_MODES = {
    Image.Resampling.BILINEAR: "bilinear",
    Image.Resampling.BICUBIC: "bicubic",
    Image.Resampling.NEAREST: "nearest-exact",  # torch's "nearest" picks other pixels than Pillow's NEAREST
}
# A 50 Mpx photo is 150 MB of uint8 on the device; past this, draft mode on the CPU reads a fraction of it.
MAX_DEVICE_PIXELS = 24_000_000
DEFAULT_LIMITS = ImageLimits()


@functools.cache  # one import (and one log line) per process, whichever thread asks first
def _torchvision_decoder() -> Decoder | None:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as error:  # not installed, or its image extension does not load with this torch
        logger.info("JPEGs decode on the CPU: torchvision's decode_jpeg is unavailable (%s)", error)
        return None

    def decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        out = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        return list(out) if isinstance(out, list) else [out]

    return decode


def device_decoder(device: torch.device) -> Decoder | None:
    """nvJPEG through torchvision on a CUDA device; None elsewhere (every image takes the CPU path)."""
    return _torchvision_decoder() if device.type == "cuda" else None


@dataclass
class PixelBatch:
    """``pixels``: (n, 3, H, W) on the device in the model's dtype, one row per decoded image in input order
    (``rows``: their positions in the input); ``failures``: position -> the ImageError of each image that
    could not be decoded; ``sizes``: position -> (width, height) as sent; ``on_device``: how many rows
    nvJPEG decoded (the rest took the CPU path)."""

    pixels: torch.Tensor
    rows: list[int]
    failures: dict[int, ImageError] = field(default_factory=dict)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    on_device: int = 0


class DevicePreprocessing:
    """A checkpoint's preprocessing (resize, rescale, normalise) for uint8 CHW tensors on ``device``."""

    def __init__(self, preprocessing: Preprocessing, device: torch.device, dtype: torch.dtype) -> None:
        self.size = (preprocessing.height, preprocessing.width)
        self.mode = _MODES.get(preprocessing.resample)
        self.device, self.dtype = device, dtype
        rescale = preprocessing.rescale_factor if preprocessing.rescale_factor is not None else 1.0
        mean = preprocessing.mean if preprocessing.mean is not None else np.zeros(3, np.float32)
        std = preprocessing.std if preprocessing.std is not None else np.ones(3, np.float32)
        # (x * rescale - mean) / std as one multiply-add, in float32 before the cast to the model's dtype. One
        # value per channel, or one for all (a checkpoint's image_mean may be a single number).
        self.scale = torch.tensor(rescale / std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.shift = torch.tensor(-mean / std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)

    @property
    def available(self) -> bool:
        return self.mode is not None

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, h, w) tensors of any sizes -> (n, 3, H, W) normalised, in the model's dtype."""
        assert self.mode is not None
        resized = []
        for image in images:
            pixels = image.unsqueeze(0).float()
            if tuple(pixels.shape[-2:]) != self.size:
                antialias = self.mode != "nearest-exact"  # Pillow's filters widen with the reduction, as antialias does
                kwargs = {"align_corners": False} if antialias else {}
                pixels = F.interpolate(pixels, size=self.size, mode=self.mode, antialias=antialias, **kwargs)
                # Pillow rounds its resized pixels to uint8 before rescaling: so does this, for the same input.
                pixels = pixels.round().clamp(0, 255)
            resized.append(pixels)
        batch = torch.cat(resized)
        return (batch * self.scale + self.shift).to(self.dtype)


def device_takes(header: JpegHeader | None, data: bytes, max_device_pixels: int = MAX_DEVICE_PIXELS) -> bool:
    """Whether a JPEG (its header from ``jpeg_header``: None for another format) is one nvJPEG decodes as the
    CPU path would: RGB or grey, upright, not huge, and whole."""
    return (
        header is not None
        and header.mode in ("RGB", "L")
        and header.orientation == 1
        and header.width * header.height <= max_device_pixels
        # A JPEG cut short in its image data has a whole header: the CPU path refuses it as truncated,
        # where nvJPEG might decode what is there. Only JPEGs that end (EOI marker) go to the device.
        and data.rstrip(b"\0").endswith(b"\xff\xd9")
    )


def images_to_pixels(
    blobs: Sequence[bytes],
    preprocessing: Preprocessing,
    *,
    device: torch.device,
    dtype: torch.dtype,
    limits: ImageLimits = DEFAULT_LIMITS,
    decoder: Decoder | None = None,
    max_device_pixels: int = MAX_DEVICE_PIXELS,
) -> PixelBatch:
    """Decode and prepare a batch of images' bytes for a fixed-size model on ``device`` (see the module's
    docstring). ``decoder``: the device's JPEG decoder (default ``device_decoder(device)``; None on CPU)."""
    decoder = decoder if decoder is not None else device_decoder(device)
    on_device = DevicePreprocessing(preprocessing, device, dtype)
    failures: dict[int, ImageError] = {}
    sizes: dict[int, tuple[int, int]] = {}
    gpu: list[int] = []
    cpu: list[int] = []
    for position, data in enumerate(blobs):
        try:
            header = jpeg_header(data, limits)  # sniffing and the pixel limit, before any decoder
        except ImageError as error:
            failures[position] = error
            continue
        if header is not None:
            sizes[position] = (header.width, header.height)
        takes_gpu = decoder is not None and on_device.available and device_takes(header, data, max_device_pixels)
        (gpu if takes_gpu else cpu).append(position)

    decoded: dict[int, torch.Tensor] = {}
    if gpu and decoder is not None:
        decoded = _decode_on_device(decoder, [blobs[i] for i in gpu], gpu, device)
        cpu.extend(i for i in gpu if i not in decoded)
    rows_gpu = [i for i in gpu if i in decoded]
    device_rows = on_device([decoded[i] for i in rows_gpu]) if rows_gpu else None

    arrays: dict[int, np.ndarray] = {}
    for position in sorted(cpu):
        try:
            image = decode_image(blobs[position], limits=limits, draft_size=(preprocessing.width, preprocessing.height))
        except ImageError as error:
            failures[position] = error
            continue
        sizes.setdefault(position, image.size)
        arrays[position] = preprocessing.array(image)
    host_rows = _to_device(arrays, device, dtype) if arrays else None

    rows = sorted([*rows_gpu, *arrays])
    if not rows:
        empty = torch.empty(0, 3, preprocessing.height, preprocessing.width, device=device, dtype=dtype)
        return PixelBatch(empty, [], failures, sizes, 0)
    # Rows back in input order: device-decoded and host-decoded ones interleaved as the bytes came.
    where: dict[int, torch.Tensor] = {}
    if device_rows is not None:
        where.update(zip(rows_gpu, device_rows, strict=True))
    if host_rows is not None:
        where.update(zip(sorted(arrays), host_rows, strict=True))
    return PixelBatch(torch.stack([where[i] for i in rows]), rows, failures, sizes, len(rows_gpu))


def _decode_on_device(
    decoder: Decoder, blobs: list[bytes], positions: list[int], device: torch.device
) -> dict[int, torch.Tensor]:
    """Positions -> decoded tensors; the ones the device could not decode are left out (the CPU tries them)."""
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in blobs]
    try:
        return dict(zip(positions, decoder(tensors, device), strict=True))
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the process's trouble, not an image's
    except Exception as error:  # one bad JPEG fails the whole list: find it, keep the others on the device
        logger.info("batched device decode of %d JPEGs failed (%s); decoding them one by one", len(blobs), error)
    out: dict[int, torch.Tensor] = {}
    for position, tensor in zip(positions, tensors, strict=True):
        try:
            (out[position],) = decoder([tensor], device)
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            logger.info("device decode failed for image %d (%s); decoding it on the CPU", position, error)
    return out


def _to_device(arrays: dict[int, np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The CPU path's arrays (in position order) on the device: one pinned host buffer, one async copy."""
    host = torch.from_numpy(np.stack([arrays[i] for i in sorted(arrays)]))
    if device.type != "cuda":
        return host.to(dtype)
    # Pinned, so the copy is a DMA the host does not wait for; the model's kernels queue behind it.
    return host.pin_memory().to(device, non_blocking=True).to(dtype)


# --- the worker's pipeline: JPEGs left undecoded by the decode threads, decoded with their batch ---------------

DeviceDecode = Literal["auto", "on", "off"]  # WORKER_BATCH__DEVICE_DECODE


@dataclass
class DecodedInputs:
    """``decode``'s outcome, by position in what it was given: ``inputs`` with their pixels on the device,
    ``failures`` the images no path could decode; ``on_device``: how many nvJPEG decoded."""

    inputs: dict[int, ModelInput]
    failures: dict[int, ImageError]
    on_device: int


def _tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


# What DeviceJpegs decodes once per device before trusting its decoder.
PROBE_JPEG = _tiny_jpeg()


def _probe_failure(decoder: Decoder, device: torch.device) -> str | None:
    """Decode PROBE_JPEG with ``decoder`` on ``device``: None when it gives its 3x8x8 uint8 pixels, else
    what went wrong."""
    blob = torch.frombuffer(bytearray(PROBE_JPEG), dtype=torch.uint8)
    try:
        (pixels,) = decoder([blob], device)
    except Exception as error:  # any failure means: not on this worker
        return f"{type(error).__name__}: {error}"
    if pixels.shape != (3, 8, 8) or pixels.dtype != torch.uint8:
        return f"it gave a {pixels.dtype} tensor of shape {tuple(pixels.shape)}"
    return None


class DeviceJpegs:
    """JPEGs decoded on the model's device in the worker's pipeline (WORKER_BATCH__DEVICE_DECODE: ``mode``),
    for a model with fixed-size inputs (``CaptionModel.fixed_size_inputs``). ``decoder``: the device's JPEG
    decoder (default: nvJPEG through torchvision on a CUDA device; tests pass a stand-in, which "on" then
    uses on any device, where "auto" still needs CUDA)."""

    def __init__(
        self,
        mode: DeviceDecode,
        limits: ImageLimits,
        decoder: Decoder | None = None,
        max_device_pixels: int = MAX_DEVICE_PIXELS,
    ) -> None:
        self.mode = mode
        self.limits = limits
        self.injected = decoder
        self.max_device_pixels = max_device_pixels
        self._warned: set[str] = set()
        self._probed: dict[str, str | None] = {}  # per device: why its decoder failed the probe, or None

    def _decoder(self, device: torch.device) -> Decoder | None:
        return self.injected if self.injected is not None else device_decoder(device)

    def _probe(self, decoder: Decoder, device: torch.device) -> str | None:
        """Whether the decoder really decodes on ``device``: torchvision imports with only a warning when its
        image extension does not load, or without nvJPEG, and then fails every call. Caught once here, a
        worker does not try the device on every batch and fall back to decoding one by one on its model
        thread (slower than the decode threads)."""
        key = str(device)
        if key not in self._probed:
            self._probed[key] = _probe_failure(decoder, device)
        return self._probed[key]

    def why_not(self, inputs: FixedSizeInputs | None) -> str | None:
        """Why a model with these inputs cannot have its JPEGs decoded on its device (None: it can)."""
        if inputs is None:
            return "the model prepares its own inputs (only a fixed-size, ViT-GPT2-style model's JPEGs decode there)"
        if inputs.device.type != "cuda" and (self.mode == "auto" or self.injected is None):
            return f"the model runs on {inputs.device.type}, and JPEGs decode on a CUDA GPU only"
        decoder = self._decoder(inputs.device)
        if decoder is None:
            return "torchvision's decode_jpeg is unavailable (install the torchvision built for this torch)"
        failed = self._probe(decoder, inputs.device)
        if failed is not None:
            return (
                f"the device's JPEG decoder failed on a tiny JPEG ({failed}; install the torchvision built for "
                "this torch, with nvJPEG)"
            )
        if inputs.preprocessing.resample not in _MODES:
            filter_name = Image.Resampling(inputs.preprocessing.resample).name
            return f"the checkpoint resizes with {filter_name}, which the device does not do"
        return None

    def target(self, inputs: FixedSizeInputs | None) -> FixedSizeInputs | None:
        """Where the decode threads leave JPEGs for the device: the model's inputs, or None (the CPU path)."""
        if self.mode == "off":
            return None
        reason = self.why_not(inputs)
        if reason is None:
            return inputs
        if self.mode == "on" and reason not in self._warned:  # "on" was checked at start: a hot swap since
            self._warned.add(reason)
            logger.warning("WORKER_BATCH__DEVICE_DECODE=on, but %s: its JPEGs decode on the CPU", reason)
        return None

    def undecoded(
        self, data: bytes, prompt: str | None, target: FixedSizeInputs, origin: ImageOrigin
    ) -> ModelInput | None:
        """In a decode thread: an input holding the JPEG's bytes for its batch to decode on the device; None
        for what the CPU path prepares (another format, a JPEG the device does not take, a
        prompt, which only the model's ``prepare`` may refuse). ImageError as the CPU path raises it for bytes
        the hostile-image rules refuse (sniffing, the byte and pixel limits), before any decoder sees them."""
        if prompt is not None:
            return None
        header = jpeg_header(data, self.limits)
        if header is None or not device_takes(header, data, self.max_device_pixels):
            return None
        size = target.preprocessing.width * target.preprocessing.height
        return ModelInput({UNDECODED_JPEG: data}, cost=size, key=target.key, prompt=None, origin=origin)

    def decode(self, inputs: Sequence[ModelInput], target: FixedSizeInputs) -> DecodedInputs:
        """In the model thread, right before the model call: ``undecoded`` inputs' JPEGs decoded together on
        the device (``images_to_pixels``: those it fails on take the CPU path, one by one)."""
        batch = images_to_pixels(
            [item.features[UNDECODED_JPEG] for item in inputs],
            target.preprocessing,
            device=target.device,
            dtype=target.dtype,
            limits=self.limits,
            decoder=self._decoder(target.device),
            max_device_pixels=self.max_device_pixels,
        )
        decoded = {
            position: replace(inputs[position], features={"pixel_values": pixels})
            for position, pixels in zip(batch.rows, batch.pixels, strict=True)
        }
        return DecodedInputs(decoded, batch.failures, batch.on_device)
