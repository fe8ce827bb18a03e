"""A small, deterministic corpus of hostile and odd images, built in memory.

Used by the unit tests of ``worker.images`` and by end-to-end tests: write each case to a file named
``case.name`` (or send ``case.data``) and expect it to decode (``expect_kind is None``) or to fail with
``expect_kind``. Images are tiny (64x48), so the whole corpus builds in about 0.1 s (once per process).
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from typing import Any

from PIL import Image, features

W, H = 64, 48
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@dataclass(frozen=True)
class Case:
    name: str  # file name to use; the extension is deliberately sometimes a lie
    data: bytes
    expect_kind: str | None  # None = must decode; else the ImageError kind


def _save(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def quadrants() -> Image.Image:
    """64x48 RGB: red top-left, green top-right, blue bottom-left, white bottom-right."""
    img = Image.new("RGB", (W, H), WHITE)
    img.paste(RED, (0, 0, W // 2, H // 2))
    img.paste(GREEN, (W // 2, 0, W, H // 2))
    img.paste(BLUE, (0, H // 2, W // 2, H))
    return img


def jpeg_bytes(size: tuple[int, int] = (W, H), **params: Any) -> bytes:
    img = quadrants() if size == (W, H) else quadrants().resize(size, Image.Resampling.NEAREST)
    return _save(img, "JPEG", quality=90, **params)


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_declaring(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares ``width`` x ``height`` 8-bit grayscale pixels.

    Only one compressed row of zeros follows, so the file is a few hundred bytes: a decoder that trusts
    the header and allocates (or inflates) before checking would be bombed.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00\x00\x00\x08free"


def _heif_installed() -> bool:
    try:
        import pillow_heif  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored picture must be turned 90 degrees clockwise to view
    return jpeg_bytes(exif=exif.tobytes())


def _gray16() -> bytes:
    # A horizontal ramp over the full 16-bit range: clipping to 8 bits would make it nearly all white.
    row = b"".join((x * 65535 // (W - 1)).to_bytes(2, "little") for x in range(W))
    return _save(Image.frombytes("I;16", (W, H), row * H), "PNG")


def _palette_transparent() -> bytes:
    img = Image.new("P", (W, H), 0)
    img.putpalette([*GREEN, *BLUE])
    img.paste(1, (W // 2, 0, W, H))
    return _save(img, "PNG", transparency=0)  # left half: index 0, transparent green


def _rgba() -> bytes:
    img = Image.new("RGBA", (W, H), (255, 0, 0, 0))  # left third: fully transparent red
    img.paste((0, 0, 0, 128), (W // 3, 0, 2 * W // 3, H))  # middle: half-transparent black
    img.paste((0, 0, 255, 255), (2 * W // 3, 0, W, H))  # right: opaque blue
    return _save(img, "PNG")


def _animated(fmt: str, **params: Any) -> bytes:
    frames = [Image.new("RGB", (W, H), colour) for colour in (RED, BLUE, GREEN)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)


def _not_an_image_cases() -> list[Case]:
    rng = random.Random(20240501)
    noise = b"\x13\x37" + rng.randbytes(510)  # fixed first bytes so no magic can ever match
    return [
        Case("notes.txt", b"Just some text, definitely not a picture.\n" * 4, "not_an_image"),
        Case(
            "paper.pdf",
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
            "not_an_image",
        ),
        Case("bundle.zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(20), "not_an_image"),
        Case("noise.jpg", noise, "not_an_image"),
        Case("clip.mp4", _ftyp(b"isom", b"isom", b"mp41") + bytes(32), "not_an_image"),
        Case("page.html", b"<!doctype html><html><body>hi</body></html>", "not_an_image"),
    ]


def _unsupported_cases() -> list[Case]:
    cases = [
        Case("drawing.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported"),
        Case("layers.psd", b"8BPS\x00\x01" + bytes(40), "unsupported"),
    ]
    # A bare ftyp box is a recognisable HEIC; with pillow-heif installed it is a (broken) supported one.
    heic_kind = "decode" if _heif_installed() else "unsupported"
    cases.append(Case("photo.heic", _ftyp(b"heic", b"mif1", b"heic") + bytes(64), heic_kind))
    avif_stub = _ftyp(b"avif", b"avif", b"mif1", b"miaf") + bytes(64)
    if features.check("avif"):
        # Pillow 11.3+ decodes AVIF itself: the stub is then merely broken, and a real one must decode.
        cases.append(Case("stub.avif", avif_stub, "decode"))
        cases.append(Case("real.avif", _save(quadrants(), "AVIF", quality=90), None))
    else:
        cases.append(Case("stub.avif", avif_stub, "unsupported"))
    return cases


def _broken_cases() -> list[Case]:
    jpeg = jpeg_bytes()
    png = _save(quadrants(), "PNG")
    webp = _save(quadrants(), "WEBP", lossless=True)
    return [
        Case("empty.jpg", b"", "empty"),
        Case("half.jpg", jpeg[: len(jpeg) // 2], "truncated"),
        Case("half.png", png[: len(png) // 2], "truncated"),
        Case("half.webp", webp[: len(webp) // 2], "truncated"),
        Case("header_only.png", png_declaring(W, H)[:33], "truncated"),  # signature + IHDR, then nothing
        Case("garbage.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2, "decode"),
        Case("bad_ihdr_crc.png", png[:29] + b"\x00\x00\x00\x00" + png[33:], "decode"),
        # Declared sizes: above our 50M limit only; inside Pillow's warning band; past Pillow's hard limit.
        Case("big_header.png", png_declaring(8000, 8000), "too_large"),
        Case("bomb_warn.png", png_declaring(10000, 10000), "too_large"),
        Case("bomb.png", png_declaring(20000, 20000), "too_large"),
    ]


def _good_cases() -> list[Case]:
    return [
        Case("plain.jpg", jpeg_bytes(), None),
        Case("exif_rotated.jpg", _exif_rotated(), None),
        Case("cmyk.jpg", _save(Image.new("CMYK", (W, H), (0, 255, 255, 0)), "JPEG", quality=95), None),
        Case("really_jpeg.png", jpeg_bytes(), None),
        Case("gray.jpg", _save(quadrants().convert("L"), "JPEG"), None),
        Case("gray16.png", _gray16(), None),
        Case("palette_transparent.png", _palette_transparent(), None),
        Case("rgba.png", _rgba(), None),
        Case("bilevel.png", _save(quadrants().convert("1"), "PNG"), None),
        Case("animated.gif", _animated("GIF"), None),
        Case("animated.png", _animated("PNG"), None),
        Case("animated.webp", _animated("WEBP", lossless=True), None),
        Case("plain.webp", _save(quadrants(), "WEBP", lossless=True), None),
        Case("plain.bmp", _save(quadrants(), "BMP"), None),
        Case("plain.tiff", _save(quadrants(), "TIFF"), None),
        Case("gray16.tiff", _tiff16(), None),
        Case("icon.ico", _save(quadrants(), "ICO", sizes=[(W, H)]), None),
    ]


def _tiff16() -> bytes:
    with Image.open(io.BytesIO(_gray16())) as img:
        return _save(img, "TIFF")


@cache
def _corpus() -> tuple[Case, ...]:
    return tuple(_good_cases() + _broken_cases() + _not_an_image_cases() + _unsupported_cases())


def hostile_corpus() -> list[Case]:
    """Every case, in a fixed order. Built once per process; the list is a fresh copy each call."""
    return list(_corpus())
