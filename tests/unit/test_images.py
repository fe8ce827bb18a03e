from __future__ import annotations

import contextlib
import io
import pickle
import random
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageStat

from captionfleet.core.failures import ImageError
from captionfleet.core.images import ImageLimits, decode_image, sniff_format
from tests.hostile_images import Case, hostile_corpus, jpeg_bytes, png_declaring

CORPUS = hostile_corpus()
BY_NAME = {case.name: case for case in CORPUS}


def data(name: str) -> bytes:
    return BY_NAME[name].data


def close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def outcome(blob: bytes, **kwargs: object) -> str | None:
    try:
        decode_image(blob, **kwargs)  # type: ignore[arg-type]
    except ImageError as exc:
        return exc.kind
    return None


# --- the corpus ---------------------------------------------------------------------------------------


def test_corpus_is_deterministic_unique_and_covers_every_kind() -> None:
    again = hostile_corpus()
    assert again == CORPUS and again is not CORPUS
    assert len(BY_NAME) == len(CORPUS), "file names must be unique"
    kinds = {case.expect_kind for case in CORPUS}
    assert kinds >= {None, "empty", "not_an_image", "unsupported", "truncated", "too_large", "decode"}


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_case_has_expected_outcome(case: Case) -> None:
    if case.expect_kind is None:
        img = decode_image(case.data)
        assert img.mode == "RGB"
        # A plain in-memory image: fully loaded and holding no reader or buffer of the source.
        assert not isinstance(img, ImageFile.ImageFile)
        assert img.size[0] > 0 and img.size[1] > 0
        img.getpixel((0, 0))
    else:
        with pytest.raises(ImageError) as info:
            decode_image(case.data)
        assert info.value.kind == case.expect_kind, info.value.message
        assert str(info.value) == info.value.message != ""


# --- good but odd images ------------------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    img = decode_image(data("exif_rotated.jpg"))
    # Stored 64x48 with red top-left and blue bottom-left; orientation 6 turns it 90 degrees clockwise.
    assert img.size == (48, 64)
    assert close(img.getpixel((img.width - 4, 4)), (255, 0, 0))  # type: ignore[arg-type]
    assert close(img.getpixel((4, 4)), (0, 0, 255))  # type: ignore[arg-type]


def test_extension_does_not_matter() -> None:
    assert decode_image(data("really_jpeg.png")).tobytes() == decode_image(data("plain.jpg")).tobytes()


def test_alpha_is_composited_on_white() -> None:
    img = decode_image(data("rgba.png"))
    assert img.getpixel((2, 10)) == (255, 255, 255)  # fully transparent red
    assert close(img.getpixel((32, 10)), (127, 127, 127), tol=2)  # type: ignore[arg-type]  # 50% black
    assert img.getpixel((60, 10)) == (0, 0, 255)


def test_palette_transparency_is_composited_on_white() -> None:
    img = decode_image(data("palette_transparent.png"))
    assert img.getpixel((2, 10)) == (255, 255, 255)  # transparent green index
    assert img.getpixel((60, 10)) == (0, 0, 255)


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tiff"])
def test_16_bit_is_scaled_not_clipped(name: str) -> None:
    with Image.open(io.BytesIO(data(name))) as src:
        assert src.mode.startswith("I;16")  # guard: the corpus really holds 16-bit samples
        src_mean = float(np.asarray(src).mean())  # ImageStat would clip 16-bit samples into 256 buckets
    img = decode_image(data(name))
    stat = ImageStat.Stat(img)
    assert stat.extrema[0] == (0, 255)
    assert stat.mean[0] == pytest.approx(src_mean / 257, abs=2)  # a ramp: about 127, not ~251


@pytest.mark.parametrize("name", ["animated.gif", "animated.png", "animated.webp"])
def test_first_frame_of_animation(name: str) -> None:
    img = decode_image(data(name))
    assert close(img.getpixel((32, 24)), (255, 0, 0), tol=2)  # type: ignore[arg-type]  # then blue, green


def test_cmyk_comes_out_roughly_right() -> None:
    img = decode_image(data("cmyk.jpg"))
    assert close(img.getpixel((32, 24)), (255, 0, 0), tol=20)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "pixel"),
    [
        ("gray.jpg", (76, 76, 76)),
        ("plain.webp", (255, 0, 0)),
        ("plain.bmp", (255, 0, 0)),
        ("icon.ico", (255, 0, 0)),
    ],
)
def test_other_modes_and_formats(name: str, pixel: tuple[int, int, int]) -> None:
    # The top-left quadrant is red: luma 76 in grayscale.
    assert close(decode_image(data(name)).getpixel((4, 4)), pixel, tol=3)  # type: ignore[arg-type]


def test_bilevel_is_black_and_white() -> None:
    img = decode_image(data("bilevel.png"))
    assert set(img.tobytes()) == {0, 255}  # red, green and blue dither to a mix of the two
    assert img.getpixel((60, 40)) == (255, 255, 255)


def test_float_and_32_bit_images_are_stretched() -> None:
    ramp = Image.linear_gradient("L").resize((64, 48))
    for img in (
        ramp.convert("F").point(lambda v: v * 1000 - 500),
        ramp.convert("I").point(lambda v: v * 1e6),
    ):
        buf = io.BytesIO()
        img.save(buf, "TIFF")
        out = decode_image(buf.getvalue())
        assert ImageStat.Stat(out).extrema[0][1] >= 250, img.mode
        assert 100 < ImageStat.Stat(out).mean[0] < 155, img.mode


def test_draft_mode_shrinks_big_jpegs_but_not_below_the_model_size() -> None:
    big = jpeg_bytes((2000, 1500))
    full = decode_image(big)
    assert full.size == (2000, 1500)
    small = decode_image(big, draft_size=(224, 224))
    assert 224 <= small.width < 2000 and 224 <= small.height < 1500
    assert small.width * 3 == small.height * 4  # a power-of-two reduction keeps the aspect ratio
    assert close(small.getpixel((4, 4)), (255, 0, 0))  # type: ignore[arg-type]


def test_draft_is_ignored_for_other_formats() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (1000, 800), (1, 2, 3)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), draft_size=(224, 224)).size == (1000, 800)


# --- limits -------------------------------------------------------------------------------------------


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records every ImageFile.load call, i.e. every attempt to decode pixel data."""
    calls: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        calls.append(f"{self.format} {self.size}")
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    yield calls


@pytest.mark.parametrize("name", ["big_header.png", "bomb_warn.png", "bomb.png"])
def test_huge_declared_size_is_rejected_before_pixel_data(name: str, loads: list[str]) -> None:
    assert len(data(name)) < 1024  # the bomb is tiny on disk
    assert outcome(data(name)) == "too_large"
    assert loads == []


def test_loads_spy_sees_ordinary_decodes(loads: list[str]) -> None:
    # Guard for the test above: the spy does see a normal decode.
    decode_image(data("plain.jpg"))
    assert loads


def test_max_pixels_limit() -> None:
    blob = data("plain.bmp")
    assert outcome(blob, limits=ImageLimits(max_pixels=64 * 48)) is None
    assert outcome(blob, limits=ImageLimits(max_pixels=64 * 48 - 1)) == "too_large"


def test_max_bytes_limit_is_checked_before_anything_else(loads: list[str]) -> None:
    blob = data("plain.jpg")
    assert outcome(blob, limits=ImageLimits(max_bytes=len(blob))) is None
    loads.clear()
    assert outcome(blob, limits=ImageLimits(max_bytes=len(blob) - 1)) == "too_large"
    assert outcome(b"x" * 101, limits=ImageLimits(max_bytes=100)) == "too_large"  # even for non-images
    assert loads == []


def test_bomb_warning_does_not_escape_and_globals_are_untouched() -> None:
    bomb_limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert outcome(data("bomb_warn.png"), limits=ImageLimits(max_pixels=10**9)) == "too_large"
        assert outcome(data("half.jpg")) == "truncated"
    assert [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert bomb_limit == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert warnings.filters == filters


def test_concurrent_decodes_agree_with_sequential_ones() -> None:
    filters = list(warnings.filters)
    expected = [case.expect_kind for case in CORPUS] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(outcome, [case.data for case in CORPUS] * 4))
    assert got == expected
    assert warnings.filters == filters


# --- robustness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain.jpg", "rgba.png", "animated.gif", "plain.webp", "plain.tiff"])
def test_every_prefix_and_bit_flip_gives_an_image_or_image_error(name: str) -> None:
    blob = data(name)
    rng = random.Random(name)
    variants = [blob[:n] for n in range(0, len(blob), max(1, len(blob) // 40))]
    for _ in range(40):
        flipped = bytearray(blob)
        flipped[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        variants.append(bytes(flipped))
    for variant in variants:
        with contextlib.suppress(ImageError):  # any other exception fails the test
            assert decode_image(variant).mode == "RGB"


def test_truncated_png_header_is_truncated_not_decode() -> None:
    png = png_declaring(64, 48)
    assert outcome(png[:8]) == "truncated"
    assert outcome(png[:40]) == "truncated"
    assert outcome(png) is None


def test_image_error_pickles_with_its_kind() -> None:
    err = pickle.loads(pickle.dumps(ImageError("truncated", "cut short")))
    assert (err.kind, err.message, str(err)) == ("truncated", "cut short", "cut short")


def test_unsupported_heic_names_the_fix() -> None:
    try:
        import pillow_heif  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        with pytest.raises(ImageError, match=r"captionfleet\[heif\]") as info:
            decode_image(data("photo.heic"))
        assert info.value.kind == "unsupported"
    else:
        pytest.skip("pillow-heif is installed, so HEIC is supported")


# --- sniffing -----------------------------------------------------------------------------------------

BMP_HEADER = b"BM" + bytes(12) + (40).to_bytes(4, "little")


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "png"),
        (b"GIF87a", "gif"),
        (b"GIF89a\x01\x00", "gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (BMP_HEADER, "bmp"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heic"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "heic"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "avif"),
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf", "avif"),
        (b"\x00\x00\x01\x00\x01\x00\x10\x10", "ico"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
        (b"\xff\x0a\xff\x07", "jxl"),
        (b"8BPS\x00\x01", "psd"),
        (b"%!PS-Adobe-3.0 EPSF-3.0", "eps"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "svg"),
        (b"  <svg width='1'/>", "svg"),
        (b"", None),
        (b"hello", None),
        (b"%PDF-1.7", None),
        (b"PK\x03\x04", None),
        (b"BMW is a car maker and this is a text file", None),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isommp41", None),
        (b"<?xml version='1.0'?><rss/>", None),
    ],
)
def test_sniff_format(head: bytes, fmt: str | None) -> None:
    assert sniff_format(head) == fmt


def test_sniff_matches_every_corpus_image() -> None:
    expected = {"jpg": "jpeg", "tiff": "tiff", "bmp": "bmp", "gif": "gif", "webp": "webp", "ico": "ico"}
    for case in CORPUS:
        ext = case.name.rsplit(".", 1)[1]
        if case.expect_kind is None and ext in expected:
            assert sniff_format(case.data) == expected[ext], case.name
