"""Bytes to an RGB PIL image, safely, one item at a time.

Callers decode each item on its own and catch :class:`ImageError` (captionfleet.core.failures), so one bad
image never fails a batch.
The format comes from magic bytes only (file names and content types lie), and Pillow is only ever
allowed to open the plugin for the sniffed format: this keeps risky plugins such as EPS (which shells
out to Ghostscript) out of reach of untrusted bytes.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from captionfleet.core.failures import ImageError

if TYPE_CHECKING:
    from captionfleet.core.settings import ImageSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 50 * 1024 * 1024
    # Well below Pillow's decompression-bomb limit (~89M pixels), so our check fires first.
    max_pixels: int = 50_000_000

    @classmethod
    def from_settings(cls, images: ImageSettings) -> ImageLimits:
        """The limits a component configured with WORKER_IMAGES__* applies."""
        return cls(max_bytes=images.max_bytes, max_pixels=images.max_pixels)


# Sniffed name -> the Pillow plugin allowed to open it.
_PILLOW_FORMAT = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
    "ico": "ICO",
    "jpeg2000": "JPEG2000",
    "avif": "AVIF",
    "heic": "HEIF",  # registered by pillow-heif
}

# Recognised as images but never decoded here; the message tells the sender what to do instead.
_REFUSED = {
    "svg": "SVG is a vector format; rasterise it to PNG before sending",
    "psd": "Photoshop documents are not supported; export a flattened PNG or JPEG",
    "jxl": "JPEG XL is not supported; convert it to JPEG, PNG or WebP",
    "eps": "PostScript needs Ghostscript, which we never run on untrusted input; convert it to PNG",
}

_HEVC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_GENERIC_HEIF_BRANDS = {b"mif1", b"msf1"}  # shared by HEIC and AVIF
_AVIF_BRANDS = {b"avif", b"avis"}
# BITMAPINFOHEADER sizes; a bare "BM" prefix alone would match plenty of text.
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}


def sniff_format(data: bytes) -> str | None:
    """Name the image format from magic bytes only; ``None`` when nothing matches."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    if head[4:8] == b"ftyp":
        return _sniff_isobmff(data)
    # ICO/CUR: reserved 0, type 1 or 2, and a non-zero image count.
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and head[4:6] != b"\x00\x00":
        return "ico"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jpeg2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "jxl"
    if head.startswith(b"8BPS"):
        return "psd"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "eps"
    text = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "svg"
    return None


def _sniff_isobmff(data: bytes) -> str | None:
    # ftyp box: size, "ftyp", major brand, minor version, then compatible brands.
    size = int.from_bytes(data[:4], "big")
    box = data[8 : max(16, min(size, 256))]
    brands = {box[:4]} | {box[i : i + 4] for i in range(8, len(box) - 3, 4)}
    # The major brand decides; with a generic major brand ("mif1"), the compatible ones do.
    for kind, specific in (("avif", _AVIF_BRANDS), ("heic", _HEVC_BRANDS)):
        if box[:4] in specific:
            return kind
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & (_HEVC_BRANDS | _GENERIC_HEIF_BRANDS):
        return "heic"
    return None  # MP4/QuickTime and friends share the box layout but are not images


_heif_lock = threading.Lock()
_heif_state: bool | None = None  # None until the first HEIC asks


def _heif_available() -> bool:
    """Register pillow-heif's opener on first use; it is an optional extra and costs import time."""
    global _heif_state
    with _heif_lock:
        if _heif_state is None:
            try:
                import pillow_heif  # type: ignore[import-not-found, unused-ignore]

                pillow_heif.register_heif_opener()
                _heif_state = True
            except Exception as exc:  # ImportError, or a broken native library
                log.info("HEIC support unavailable: %s", exc)
                _heif_state = False
        return _heif_state


def _ensure_plugin(fmt: str) -> None:
    if fmt == "heic" and not _heif_available():
        raise ImageError("unsupported", "HEIC/HEIF images need the optional extra: install captionfleet[heif]")
    if fmt == "avif" and not features.check("avif"):
        raise ImageError("unsupported", "AVIF images need Pillow built with libavif: upgrade to pillow>=11.3")
    if fmt == "jpeg2000" and not features.check("jpg_2000"):
        raise ImageError("unsupported", "JPEG 2000 images need Pillow built with OpenJPEG")


# Pillow's own words for input that ends early (ImageFile.load and the PNG chunk reader).
_TRUNCATED_MARKERS = ("truncated", "Truncated", "broken data stream", "unexpected end", "end of file")


def _cut_short(data: bytes, fmt: str) -> bool:
    """Whether a container visibly ends early: Pillow reports some such files only as unidentifiable."""
    if fmt == "webp":  # libwebp needs the whole RIFF and just says "could not create decoder object"
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if fmt == "png":  # walk the chunks; running out before IEND means cut, a non-letter tag means garbage
        pos = 8
        while pos + 8 <= len(data):
            tag = data[pos + 4 : pos + 8]
            if not tag.isalpha():
                return False
            if tag == b"IEND":
                return False
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
        return True
    if fmt in ("heic", "avif"):  # top-level ISOBMFF boxes: a declared size past the end means cut
        pos = 0
        while pos + 8 <= len(data):
            size = int.from_bytes(data[pos : pos + 4], "big")
            if size == 1:  # 64-bit size follows the type
                size = int.from_bytes(data[pos + 8 : pos + 16], "big")
            if size < 8:  # 0 means "to the end of the file"; smaller is garbage, not a cut
                return False
            pos += size
        return pos != len(data)
    return False


# Python's warning filters are process-wide and catch_warnings is not thread-safe before 3.14;
# serialising our own use keeps concurrent decodes from restoring each other's filter lists.
_warnings_lock = threading.Lock()


def _what_it_looks_like(data: bytes) -> str:
    """A hint at what a non-image is, without quoting it: failure messages reach logs and answers, and an
    upload's bytes may be anything (a pasted credential among them)."""
    head = data[:512].lstrip()
    if head[:1] == b"<":
        return "it looks like HTML or XML text: a page or error answer instead of the image?"
    if head[:1] in (b"{", b"["):
        return "it looks like JSON text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data that no image format starts with"
    return "it looks like plain text"


def check_before_parsing(data: bytes, limits: ImageLimits = ImageLimits()) -> str:
    """The checks before any parser sees the bytes: not empty, within the byte limit, a format sniffed from
    magic bytes that is neither refused nor missing its plugin. Returns that format, or raises ImageError."""
    if not data:
        raise ImageError("empty", "no bytes: the item is empty")
    if len(data) > limits.max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError("not_an_image", f"not a recognised image format ({_what_it_looks_like(data)})")
    if fmt in _REFUSED:
        raise ImageError("unsupported", f"{fmt}: {_REFUSED[fmt]}")
    _ensure_plugin(fmt)
    return fmt


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's header says, read without decoding a pixel (``jpeg_header``)."""

    width: int
    height: int
    mode: str  # Pillow's: "RGB" (YCbCr), "L", "CMYK"
    orientation: int  # EXIF orientation, 1 when upright or absent


def jpeg_header(data: bytes, limits: ImageLimits = ImageLimits()) -> JpegHeader | None:
    """A JPEG's size, mode and orientation from its header after ``check_before_parsing`` and the pixel limit
    (ImageError as ``decode_image`` raises them); None when the bytes are another format or a header Pillow
    cannot read (``decode_image`` then gives the failure its kind). For decoders other than Pillow's (nvJPEG
    on a GPU), which must not see bytes these rules refuse."""
    if check_before_parsing(data, limits) != "jpeg":
        return None
    try:
        with _open(data, "jpeg") as img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageError(
                    "too_large", f"{width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}"
                )
            try:
                orientation = int(img.getexif().get(0x0112, 1))
            except Exception:  # unreadable EXIF: decode_image ignores it too
                orientation = 1
            return JpegHeader(width, height, img.mode, orientation)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from exc
    except Exception:  # a header Pillow cannot read: decode_image says why, with the kind it gives it
        return None


def decode_image(
    data: bytes, *, limits: ImageLimits = ImageLimits(), draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode one item to a fully loaded ``RGB`` image, or raise :class:`ImageError`.

    ``draft_size`` is the model input size; JPEGs are then decoded at the smallest power-of-two
    reduction that keeps both sides at least that big, which is much cheaper than a full decode.
    """
    fmt = check_before_parsing(data, limits)
    try:
        with _open(data, fmt) as img:
            width, height = img.size
            # Image.open only parsed the header, so this rejects bombs before any pixel is decoded.
            if width * height > limits.max_pixels:
                raise ImageError(
                    "too_large",
                    f"{width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}",
                )
            if draft_size is not None and img.format == "JPEG":
                # Orientation may swap the sides later, so ask for the larger side on both axes.
                side = max(draft_size)
                img.draft("RGB", (side, side))
            img.load()
            oriented = _apply_orientation(img)
            # exif_transpose gave a new image (a copy when upright): an RGB one is already the result, not a copy
            # to copy again. The opened image itself always is (closing it below frees its pixels).
            return _to_rgb(oriented, owned=oriented is not img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        # Its own message names the BytesIO object's address; say what it means instead.
        text = "header not understood" if isinstance(exc, UnidentifiedImageError) else str(exc).strip()
        if _cut_short(data, fmt) or isinstance(exc, EOFError) or any(m in text for m in _TRUNCATED_MARKERS):
            raise ImageError("truncated", f"{fmt}: data ends early: {text}") from exc
        raise ImageError("decode", f"{fmt}: {type(exc).__name__}: {text}") from exc


def jpeg_draft_size(data: bytes, draft_size: tuple[int, int] | None) -> tuple[int, int]:
    """The size ``decode_image`` decodes an upright JPEG at (its draft mode's reduction, read from the header
    alone): what a result row reports as the image's width and height, whichever path decoded it."""
    with _open(data, "jpeg") as img:
        if draft_size is not None:
            side = max(draft_size)  # as decode_image asks
            img.draft("RGB", (side, side))
        width, height = img.size
        return width, height


def _open(data: bytes, fmt: str) -> ImageFile.ImageFile:
    # Escalate Pillow's bomb *warning* (between 1x and 2x MAX_IMAGE_PIXELS) to an error here rather than
    # changing Image.MAX_IMAGE_PIXELS for the whole process. The warning can only fire inside open().
    with _warnings_lock, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=[_PILLOW_FORMAT[fmt]])


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block should not cost us an otherwise good picture
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
        return img


_WHITE = (255, 255, 255, 255)


def _to_rgb(img: Image.Image, *, owned: bool = False) -> Image.Image:
    """Any Pillow mode to a new 8-bit RGB image; transparency is composited on white. ``owned``: ``img`` is a new
    image of the caller's, returned as it is when it is plain RGB already (``convert`` would copy it)."""
    mode = img.mode
    if owned and mode == "RGB" and not img.has_transparency_data:
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples: scale to 8 bits. A plain convert("L") would clip, turning most pictures white.
        img = img.convert("I")
        low, high = _extrema(img)
        # Values outside 0..65535 mean genuinely 32-bit data: stretch its range rather than clip it.
        img = _stretch(img, low, high) if low < 0 or high > 65535 else img.point(lambda v: v / 257)
        img = img.convert("L")
    elif mode == "F":
        low, high = _extrema(img)
        # Float data is usually 0..1; anything else is stretched to fit rather than clipped.
        img = _stretch(img, low, high) if low < 0 or high > 1 else img.point(lambda v: v * 255)
        img = img.convert("L")
    elif mode == "La":  # premultiplied alpha: Pillow converts it to nothing but LA
        img = img.convert("LA")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _extrema(img: Image.Image) -> tuple[float, float]:
    low, high = img.getextrema()  # single-band modes only, where this is a pair of numbers
    assert isinstance(low, int | float) and isinstance(high, int | float)
    return low, high


def _stretch(img: Image.Image, low: float, high: float) -> Image.Image:
    scale = 255 / ((high - low) or 1)
    return img.point(lambda v: (v - low) * scale)


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """An item's bytes, the limits they were decoded under and the draft size they were decoded at for
    the input this is the origin of (``core.captioner.ImageOrigin``), decoded again when another model
    must prepare it anew (the hot swap). The bytes are kept rather than the decoded image: they are
    smaller (a JPEG is a tenth of its pixels or less, and up to ``prefetch`` items wait for the model),
    and decoding again lets the draft size be the new model's (a JPEG drafted for a 64 px model would
    starve a 384 px one)."""

    data: bytes
    limits: ImageLimits
    draft_size: tuple[int, int] | None = None

    def image(self, draft_size: tuple[int, int] | None) -> Image.Image:
        return decode_image(self.data, limits=self.limits, draft_size=draft_size)

    def decoded_for(self, draft_size: tuple[int, int] | None) -> bool:
        return self.draft_size == draft_size

    def for_draft(self, draft_size: tuple[int, int] | None) -> EncodedImage:
        return EncodedImage(self.data, self.limits, draft_size)
