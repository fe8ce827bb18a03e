"""Image–caption data sets: manifests (JSONL, CSV), COCO captions JSON, and synthetic shapes.

A data set is anything with ``len()``, ``image(i) -> RGB PIL image``, ``captions(i) -> list[str]``
and ``describe() -> dict`` (recorded in ``captionfleet.json``). File-backed data sets decode every
image once, through the worker's own safe decoder, and keep it at the model's input size: the
resize is exactly the one the worker's captioner does, so training sees what inference sees.
Images that are missing or cannot be decoded are skipped and counted, never fatal.

Memory: a cached image costs width*height*3 bytes (150 kB at 224 px, 12 kB at 64 px), so
10,000 images at 224 px take 1.5 GB. Larger sets need a streaming reader (not written yet).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from captionfleet.core.failures import ImageError
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.settings import S3Settings
from captionfleet.trainer.shapes import ShapesDataset

log = logging.getLogger(__name__)

__all__ = [
    "CaptionDataset",
    "DataError",
    "ImageCaptionDataset",
    "Pair",
    "ShapesDataset",
    "Skipped",
    "Splits",
    "Subset",
    "fit_image",
    "load_pairs",
    "open_files",
    "open_splits",
    "read_coco",
    "read_manifest",
    "split_indices",
]


class DataError(Exception):
    """The data set cannot be read at all (as opposed to single bad images, which are skipped)."""


class CaptionDataset(Protocol):
    def __len__(self) -> int: ...
    def image(self, index: int) -> Image.Image: ...
    def captions(self, index: int) -> list[str]: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Pair:
    """One image and every caption it has."""

    image: str  # an absolute local path or an s3:// uri
    captions: tuple[str, ...]


@dataclass
class Skipped:
    """What was left out of a data set and why: counts by reason, plus a few examples to look at."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 10

    def add(self, reason: str, what: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{reason}: {what}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())), "examples": self.examples}


# -- readers: file -> pairs ----------------------------------------------------------------------


def _resolve(image: str, root: Path) -> str:
    if image.startswith("s3://"):
        return image
    path = Path(image).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def _merge(rows: Iterable[tuple[str, str]], skipped: Skipped) -> list[Pair]:
    """Rows of (image, caption) -> one Pair per image, in first-seen order."""
    captions: dict[str, list[str]] = defaultdict(list)
    for image, caption in rows:
        text = " ".join(caption.split())
        if not text:
            skipped.add("empty_caption", image)
            continue
        captions[image].append(text)
    return [Pair(image, tuple(texts)) for image, texts in captions.items()]


def read_manifest(path: Path, *, image_root: Path | None = None, skipped: Skipped | None = None) -> list[Pair]:
    """A JSONL or CSV manifest: ``image`` (path or s3:// uri) and ``caption`` per row.

    JSONL rows may carry ``captions`` (a list) instead of ``caption``; an image may appear on several
    rows. Relative image paths are relative to ``image_root``, else to the manifest's folder.
    """
    skipped = skipped if skipped is not None else Skipped()
    root = image_root or path.parent
    rows: list[tuple[str, str]] = []
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist: pass an existing .jsonl or .csv file")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(
                    f"{path}: CSV header lacks {sorted(missing)}; the first line must name the columns image,caption"
                )
            for line, row in enumerate(reader, start=2):
                if not row.get("image"):
                    skipped.add("bad_row", f"{path}:{line}: no image")
                    continue
                rows.append((_resolve(row["image"], root), row.get("caption") or ""))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    skipped.add("bad_row", f"{path}:{line}: not JSON ({error.msg})")
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    skipped.add("bad_row", f"{path}:{line}: needs a string field 'image'")
                    continue
                texts = row.get("captions", [row.get("caption", "")])
                for caption in texts if isinstance(texts, list) else [texts]:
                    rows.append((_resolve(row["image"], root), str(caption or "")))
    else:
        raise DataError(f"{path}: unknown manifest type {path.suffix!r}; use .jsonl or .csv")
    return _merge(rows, skipped)


def read_coco(path: Path, *, image_root: Path, skipped: Skipped | None = None) -> list[Pair]:
    """COCO captions JSON (``images[].id/file_name``, ``annotations[].image_id/caption``)."""
    skipped = skipped if skipped is not None else Skipped()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DataError(f"COCO captions file {path} does not exist: pass e.g. captions_train2017.json") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not JSON ({error}); pass a COCO captions file") from error
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise DataError(f"{path} has no 'images' and 'annotations' lists: it is not a COCO captions file")
    files = {img["id"]: str(img["file_name"]) for img in doc["images"]}
    rows = []
    for ann in doc["annotations"]:
        name = files.get(ann.get("image_id"))
        if name is None:
            skipped.add("bad_row", f"annotation {ann.get('id')}: unknown image_id {ann.get('image_id')}")
            continue
        rows.append((_resolve(name, image_root), str(ann.get("caption", ""))))
    return _merge(rows, skipped)


# -- loading: pairs -> decoded, cached images ----------------------------------------------------


def fit_image(image: Image.Image, size: tuple[int, int], resample: Image.Resampling, keep_aspect: bool) -> Image.Image:
    """An image at the model's input size: exactly ``size``, or (``keep_aspect``, for image processors that
    resize the shorter side and then crop, as GIT's CLIP processor does) with its shorter side at ``size[0]``
    and its proportions kept, leaving the crop to the processor as the worker's captioner does."""
    if keep_aspect:
        width, height = image.size
        short = size[0]
        if min(width, height) == short:
            return image
        # The processor's own arithmetic (transformers' get_resize_output_image_size), to the pixel.
        long = int(short * max(width, height) / min(width, height))
        size = (short, long) if width <= height else (long, short)
    return image if image.size == size else image.resize(size, resample=resample)


def _reader(s3: S3Settings | None) -> Callable[[str], bytes]:
    client = None

    def read(ref: str) -> bytes:
        nonlocal client
        if ref.startswith("s3://"):
            from captionfleet.core.s3 import make_s3_client, parse_s3_uri

            if client is None:
                client = make_s3_client(s3 or S3Settings())
            bucket, key = parse_s3_uri(ref)
            body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            return body
        return Path(ref).read_bytes()

    return read


def _skip_kind(error: Exception) -> str | None:
    """How a failed read of one image is counted when it is skipped; None when the store itself failed
    (throttling, 5xx, timeouts, refused credentials): that says nothing about the image."""
    from botocore.exceptions import BotoCoreError, ClientError

    from captionfleet.core.s3 import FORBIDDEN_CODES, NOT_FOUND_CODES, error_code

    if isinstance(error, ClientError):
        code = error_code(error)
        if code in NOT_FOUND_CODES:
            return "missing"
        return "unreadable" if code in FORBIDDEN_CODES else None  # one object's permissions: skip it
    if isinstance(error, BotoCoreError):
        return None
    return "unreadable"  # a local file: permissions, a directory, ...


class ImageCaptionDataset:
    """Decoded images (already at the model's input size) and their captions, in memory."""

    def __init__(self, images: Sequence[Image.Image], captions: Sequence[Sequence[str]], source: str) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        self._images = list(images)
        self._captions = [list(c) for c in captions]
        self.source = source

    def __len__(self) -> int:
        return len(self._images)

    def image(self, index: int) -> Image.Image:
        return self._images[index]

    def captions(self, index: int) -> list[str]:
        return self._captions[index]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "images": len(self), "captions": sum(map(len, self._captions))}


def load_pairs(
    pairs: Sequence[Pair],
    *,
    size: tuple[int, int],
    resample: Image.Resampling,
    source: str,
    skipped: Skipped,
    s3: S3Settings | None = None,
    limits: ImageLimits | None = None,
    threads: int = 4,
    keep_aspect: bool = False,
) -> ImageCaptionDataset:
    """Fetch and decode every image once; bad ones are counted in ``skipped`` and left out.

    ``size``, ``resample`` and ``keep_aspect`` must be the model's image processor's (see
    trainer/family_batches.py ``image_fit``): the captioner then finds images already at its input size
    and its resize changes nothing.
    """
    read = _reader(s3)
    limits = limits or ImageLimits()

    def load(pair: Pair) -> Image.Image | tuple[str, str]:
        try:
            data = read(pair.image)
        except FileNotFoundError:
            return ("missing", pair.image)
        except Exception as error:
            kind = _skip_kind(error)
            if kind is None:
                raise DataError(
                    f"reading {pair.image} failed after retries ({type(error).__name__}: {error}): the store "
                    "failed, not this image, so the run stops instead of training without it (a data set that "
                    "loses images at random also reshuffles the train/validation split); run it again"
                ) from error
            return (kind, f"{pair.image} ({type(error).__name__}: {error})")
        try:
            image = decode_image(data, limits=limits, draft_size=size)
        except ImageError as error:
            return (f"image_{error.kind}", f"{pair.image} ({error.message})")
        return fit_image(image, size, resample, keep_aspect)

    images: list[Image.Image] = []
    captions: list[tuple[str, ...]] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL decodes without the GIL
        for pair, result in zip(pairs, pool.map(load, pairs), strict=True):
            if isinstance(result, tuple):
                skipped.add(*result)
                continue
            images.append(result)
            captions.append(pair.captions)
    if skipped.total:
        log.warning("%s: skipped %s", source, skipped.as_dict())
    if not images:
        raise DataError(
            f"{source}: no usable images ({skipped.as_dict()}); check the image paths "
            "(relative paths are resolved against --image-root, else the manifest's folder)"
        )
    return ImageCaptionDataset(images, captions, source)


# -- splitting -----------------------------------------------------------------------------------


class Subset:
    """A view of some items of another data set."""

    def __init__(self, base: CaptionDataset, indices: Sequence[int], role: str) -> None:
        self.base = base
        self.indices = list(indices)
        self.role = role

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, index: int) -> Image.Image:
        return self.base.image(self.indices[index])

    def captions(self, index: int) -> list[str]:
        return self.base.captions(self.indices[index])

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "split": self.role, "images": len(self)}


def split_indices(count: int, val_fraction: float, seed: int, max_val: int) -> tuple[list[int], list[int]]:
    """Shuffle by seed, then cut: the same seed always gives the same split (by image, so an
    image's captions never straddle both sides)."""
    if count < 2:
        raise DataError(f"need at least 2 usable images to split into train and validation, got {count}")
    order = list(range(count))
    random.Random(f"split:{seed}").shuffle(order)
    n_val = min(max_val, max(1, round(count * val_fraction)), count - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class Splits:
    train: CaptionDataset
    val: CaptionDataset
    skipped: Skipped

    def describe(self) -> dict[str, Any]:
        return {"train": self.train.describe(), "val": self.val.describe(), "skipped": self.skipped.as_dict()}


def open_files(
    data: str,
    *,
    image_root: Path | None,
    size: tuple[int, int],
    resample: Image.Resampling,
    skipped: Skipped,
    s3: S3Settings | None = None,
    threads: int = 4,
    keep_aspect: bool = False,
) -> ImageCaptionDataset:
    """A manifest (.jsonl/.csv) or COCO captions file (.json), every usable image loaded."""
    path = Path(data).expanduser()
    if path.suffix.lower() == ".json":
        if image_root is None:
            raise DataError(f"{path} is COCO captions JSON: pass --image-root with the folder of its images")
        pairs = read_coco(path, image_root=image_root, skipped=skipped)
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".csv"):
        pairs = read_manifest(path, image_root=image_root, skipped=skipped)
    else:
        raise DataError(f"data {data!r}: expected 'shapes', a .jsonl/.csv manifest or a COCO captions .json file")
    return load_pairs(
        pairs,
        size=size,
        resample=resample,
        source=str(path),
        skipped=skipped,
        s3=s3,
        threads=threads,
        keep_aspect=keep_aspect,
    )


def open_splits(
    data: str,
    *,
    image_root: Path | None,
    size: tuple[int, int],
    resample: Image.Resampling,
    seed: int,
    val_fraction: float,
    max_val_images: int,
    shapes_train_size: int,
    shapes_val_size: int,
    s3: S3Settings | None = None,
    threads: int = 4,
    keep_aspect: bool = False,
) -> Splits:
    """``data`` is ``shapes``, a manifest (.jsonl/.csv) or a COCO captions file (.json). ``keep_aspect``: see
    ``fit_image`` (shapes pictures are square, drawn at ``size[0]``, whichever it is)."""
    skipped = Skipped()
    if data == "shapes":
        if size[0] != size[1]:
            raise DataError(f"shapes pictures are square; the model's input is {size[0]}x{size[1]}")
        # Validation comes from another seed: every picture in it is one the model never saw.
        return Splits(
            ShapesDataset(seed, shapes_train_size, size[0]),
            ShapesDataset(seed + 1, shapes_val_size, size[0]),
            skipped,
        )
    dataset = open_files(
        data,
        image_root=image_root,
        size=size,
        resample=resample,
        skipped=skipped,
        s3=s3,
        threads=threads,
        keep_aspect=keep_aspect,
    )
    train_idx, val_idx = split_indices(len(dataset), val_fraction, seed, max_val_images)
    return Splits(Subset(dataset, train_idx, "train"), Subset(dataset, val_idx, "val"), skipped)
