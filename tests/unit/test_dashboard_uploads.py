"""The dashboard's upload tab, driven by Streamlit's AppTest (no browser, no server): each file gets
its caption or its own message, and one bad file never costs the others their captions."""

from __future__ import annotations

import gc
import html
import io
import random
import re
import weakref
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from captionfleet.core.captioner import KeptImage, ModelInput
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import DecodingSettings
from captionfleet.dashboard.model import LoadedModel
from captionfleet.dashboard.uploads import THUMBNAIL_SIDE, caption_uploads
from tests.hostile_images import hostile_corpus, jpeg_bytes

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
CAPTION_LINE = re.compile(r"^model (\S+) · \d+ ms \(one model call for (\d+) images?\)$")


@pytest.fixture
def app(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    for name in ("DASHBOARD_PROMETHEUS__URL", "DASHBOARD_SCRAPE__URLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORKER_MODEL__REF", str(tiny_checkpoint))
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("WORKER_MODEL__CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WORKER_DECODING__NUM_BEAMS", "1")
    monkeypatch.setenv("WORKER_DECODING__MAX_NEW_TOKENS", "6")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def generate(at: AppTest, files: list[tuple[str, bytes, str]]) -> AppTest:
    at.file_uploader(key="uploads").set_value(files)
    at.run()
    button = next(b for b in at.button if b.label == "Generate caption")
    assert not button.disabled
    button.click().run()
    assert not at.exception, at.exception
    return at


def captions(at: AppTest) -> list[str]:
    return [
        html.unescape(m.value.removeprefix("<h3>").removesuffix("</h3>"))
        for m in at.markdown
        if m.value.startswith("<h3>")
    ]


def caption_lines(at: AppTest) -> list[re.Match[str]]:
    return [m for c in at.caption if (m := CAPTION_LINE.match(c.value))]


def test_button_waits_for_an_upload_and_no_source_is_explained(app: AppTest) -> None:
    button = next(b for b in app.button if b.label == "Generate caption")
    assert button.disabled
    # The fleet tab, with neither Prometheus nor worker URLs set, says how to configure one.
    assert any("DASHBOARD_PROMETHEUS__URL" in i.value for i in app.info)


def test_a_good_image_is_captioned_with_model_version_and_time(app: AppTest, tiny_checkpoint: Path) -> None:
    from captionfleet.core.captioner import checkpoint_version

    generate(app, [("cat.jpg", jpeg_bytes(), "image/jpeg")])
    assert len(captions(app)) == 1 and captions(app)[0].strip()
    (line,) = caption_lines(app)
    assert line.group(1) == checkpoint_version(tiny_checkpoint) and line.group(2) == "1"
    assert not app.error
    assert len(app.get("image")) == 1  # shown beside its caption


def test_corrupt_and_text_files_get_messages_while_the_good_image_is_captioned(app: AppTest) -> None:
    corpus = {case.name: case for case in hostile_corpus()}
    files = [
        ("half.jpg", corpus["half.jpg"].data, "image/jpeg"),
        ("good.jpg", jpeg_bytes(), "image/jpeg"),
        ("notes.txt", b"these are my notes, not a picture\n", "text/plain"),
        ("also-good.png", corpus["rgba.png"].data, "image/png"),
    ]
    generate(app, files)
    errors = [e.value for e in app.error]
    assert len(errors) == 2, errors
    assert errors[0].startswith("half.jpg is cut short") or errors[0].startswith("half.jpg could not be decoded")
    assert errors[1].startswith("notes.txt is not an image: not a recognised image format")
    assert len(captions(app)) == 2 and all(c.strip() for c in captions(app))
    assert len(app.get("image")) == 2
    # The two good images were captioned together, in one model call.
    assert [m.group(2) for m in caption_lines(app)] == ["2", "2"]


def test_an_oversized_file_is_refused_with_the_limit_named(app: AppTest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_IMAGES__MAX_BYTES", "20000")
    noise = Image.frombytes("RGB", (200, 200), random.Random(7).randbytes(200 * 200 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG", quality=95)
    big = buffer.getvalue()
    assert len(big) > 20000
    generate(app, [("huge.jpg", big, "image/jpeg"), ("small.jpg", jpeg_bytes(), "image/jpeg")])
    (error,) = [e.value for e in app.error]
    assert error.startswith(f"huge.jpg is too large: {len(big)} bytes exceeds the limit of 20000 bytes")
    assert "WORKER_IMAGES__MAX_BYTES" in error
    assert len(captions(app)) == 1


def test_captions_go_when_their_files_are_removed(app: AppTest) -> None:
    generate(app, [("cat.jpg", jpeg_bytes(), "image/jpeg")])
    assert len(captions(app)) == 1
    app.file_uploader(key="uploads").set_value(None)
    app.run()
    assert captions(app) == [] and not app.get("image")


def test_a_model_that_cannot_load_is_explained_and_the_fleet_tab_still_drawn(
    app: AppTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the gpu overlay did to the dashboard pod: device cuda where no GPU is visible.
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    generate(app, [("cat.jpg", jpeg_bytes(), "image/jpeg")])
    (error,) = [e.value for e in app.error]
    assert "no CUDA GPU is visible" in error and "WORKER_MODEL__DEVICE must be cpu or auto" in error
    assert captions(app) == []
    assert any("DASHBOARD_PROMETHEUS__URL" in i.value for i in app.info)  # the Fleet tab, drawn after


# -- memory: one batch of full-size images at a time, thumbnails in the results --------------------


class SizeCaptioner:
    """Captions each image with the size it was given; checks that earlier batches were let go."""

    draft_size = (32, 32)
    version = "sizes-v1"

    def __init__(self) -> None:
        self.seen: list[weakref.ref[Image.Image]] = []
        self.alive_from_earlier_batches: list[int] = []

    def prepare(self, image: Image.Image, prompt: str | None = None, *, origin: object = None) -> ModelInput:
        return ModelInput({}, cost=1, key="sizes", prompt=prompt, origin=KeptImage(image))

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        images = [item.origin.image(None) for item in inputs]
        gc.collect()
        # Images small enough to be their own thumbnail rightly stay: count the full-size ones.
        alive = [image for ref in self.seen if (image := ref()) is not None and max(image.size) > THUMBNAIL_SIDE]
        self.alive_from_earlier_batches.append(len(alive))
        del alive
        self.seen += [weakref.ref(image) for image in images]
        return [Caption(f"{image.width}x{image.height}", -1.0, 1) for image in images]


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def test_results_keep_thumbnails_and_only_one_batch_is_decoded_at_a_time() -> None:
    sizes = [(1600, 900), (700, 1400), (300, 200), (2048, 2048), (513, 100)]
    files = [(f"{w}x{h}.png", png(w, h)) for w, h in sizes]
    captioner = SizeCaptioner()
    model = LoadedModel(captioner)  # type: ignore[arg-type]
    results = caption_uploads(model, files, DecodingSettings(), ImageLimits(), batch_size=2)
    # The model saw every image at full size: captions are what they were before thumbnails.
    assert [r.caption for r in results] == [f"{w}x{h}" for w, h in sizes]
    assert [r.batch for r in results] == [2, 2, 2, 2, 1]
    for result, (w, h) in zip(results, sizes, strict=True):
        assert result.image is not None
        assert max(result.image.size) <= THUMBNAIL_SIDE, (result.name, result.image.size)
        if max(w, h) > THUMBNAIL_SIDE:  # the longest side is the thumbnail's, the aspect ratio kept
            assert max(result.image.size) == THUMBNAIL_SIDE
            assert result.image.width / result.image.height == pytest.approx(w / h, rel=0.02)
        else:
            assert result.image.size == (w, h)
    # When each batch reached the model, the full-size images of the batches before it were gone.
    assert captioner.alive_from_earlier_batches == [0, 0, 0]


def test_a_caption_is_shown_verbatim_never_as_markup() -> None:
    """The model's text is no Markdown or HTML of the page's: a caption with a link, an image, an emoji
    shortcode, a formula or a tag shows those characters as they are (each one a character reference)."""
    from captionfleet.dashboard.app import caption_html

    hostile = "[see](http://evil.example) ![i](http://evil.example/x.png) :rocket: $x$ <b>&amp; www.evil.example"
    shown = caption_html(hostile)
    inner = shown.removeprefix("<h3>").removesuffix("</h3>")
    assert shown.startswith("<h3>") and shown.endswith("</h3>")
    assert re.fullmatch(r"(?:[A-Za-z0-9]|&#\d+;)*", inner)  # letters, digits and references, nothing else
    assert html.unescape(inner) == hostile
