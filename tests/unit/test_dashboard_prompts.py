"""The dashboard's prompt box, driven by Streamlit's AppTest: shown with the model's family and its
default prompt as placeholder; an empty box is that default; a ViT-GPT2 model gets a disabled box and a
note, and a prompt sent to it anyway fails each file as malformed; what is not a prompt is refused on the
page before anything is captioned."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from captionfleet.core.images import ImageLimits
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import DecodingSettings
from captionfleet.dashboard.model import LoadedModel
from captionfleet.dashboard.uploads import caption_uploads
from tests.tiny_families import pictures
from tests.unit.test_dashboard_uploads import APP, caption_lines, captions

DECODING = DecodingSettings(num_beams=1, max_new_tokens=6)


def png_of(index: int) -> bytes:
    buffer = io.BytesIO()
    pictures(index + 1)[index].save(buffer, "PNG")
    return buffer.getvalue()


def page(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    for name in ("DASHBOARD_PROMETHEUS__URL", "DASHBOARD_SCRAPE__URLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORKER_MODEL__REF", str(model))
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("WORKER_MODEL__CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WORKER_DECODING__NUM_BEAMS", "1")
    monkeypatch.setenv("WORKER_DECODING__MAX_NEW_TOKENS", "6")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def generate(at: AppTest, files: list[tuple[str, bytes, str]], prompt: str | None = None) -> AppTest:
    if prompt is not None:
        at.text_input(key="prompt").set_value(prompt)
    at.file_uploader(key="uploads").set_value(files)
    at.run()
    button = next(b for b in at.button if b.label == "Generate caption")
    assert not button.disabled
    button.click().run()
    assert not at.exception, at.exception
    return at


def prompt_lines(at: AppTest) -> list[str]:
    return [c.value.removeprefix("prompt: ") for c in at.caption if c.value.startswith("prompt: ")]


def test_a_blip_model_takes_the_box_prompt_and_an_empty_box_is_its_default(
    tiny_family: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = page(tiny_family("blip"), tmp_path, monkeypatch)
    box = at.text_input(key="prompt")
    assert not box.disabled and box.placeholder.startswith("none: the model captions on its own")
    assert any(c.value.startswith("Model ") and "family blip · default prompt: none" in c.value for c in at.caption)
    files = [("shapes.png", png_of(2), "image/png")]
    generate(at, files)
    (default,) = captions(at)
    assert default.strip() and prompt_lines(at) == []  # BLIP's default is no prompt at all

    generate(at, files, prompt="a photo of")
    (asked,) = captions(at)
    assert asked.strip() and asked != default  # the prompt reached the model
    assert prompt_lines(at) == ["a photo of"]
    assert len(caption_lines(at)) == 1 and not at.error


def test_the_family_default_prompt_is_the_placeholder(
    tiny_family: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = page(tiny_family("florence2"), tmp_path, monkeypatch)
    assert at.text_input(key="prompt").placeholder == "<CAPTION>"
    assert any("family florence2 · default prompt: `<CAPTION>`" in c.value for c in at.caption)
    generate(at, [("shapes.png", png_of(0), "image/png")])
    assert prompt_lines(at) == ["<CAPTION>"]  # an empty box: the default, named with the caption


def test_a_vit_gpt2_model_has_its_box_disabled_with_a_note(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = page(tiny_checkpoint, tmp_path, monkeypatch)
    box = at.text_input(key="prompt")
    assert box.disabled and box.placeholder == "this model takes no prompt"
    assert any("vision-encoder-decoder model (ViT-GPT2) captions without a prompt" in c.value for c in at.caption)
    generate(at, [("shapes.png", png_of(0), "image/png")])
    assert len(captions(at)) == 1 and prompt_lines(at) == [] and not at.error


def test_a_prompt_sent_to_a_vit_gpt2_model_anyway_fails_each_file_as_malformed(tiny_checkpoint: Path) -> None:
    model = LoadedModel(load_checkpoint(tiny_checkpoint, device="cpu", precision="fp32", decoding=DECODING))
    files = [("a.png", png_of(0)), ("b.png", png_of(1))]
    results = caption_uploads(model, files, DECODING, ImageLimits(), batch_size=4, prompt="a photo of")
    assert [(r.ok, r.kind) for r in results] == [(False, "malformed")] * 2
    assert results[0].problem.startswith("a.png was not captioned: the model refused the prompt: ")
    assert "takes no prompt" in results[0].message and "empty the Prompt box" in results[0].message
    assert all(r.image is not None for r in results)  # the thumbnails are still shown


def test_what_is_not_a_prompt_is_refused_on_the_page(
    tiny_family: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = page(tiny_family("blip"), tmp_path, monkeypatch)
    at.text_input(key="prompt").set_value("bell\u0007")
    at.file_uploader(key="uploads").set_value([("shapes.png", png_of(0), "image/png")])
    at.run()
    (error,) = [e.value for e in at.error]
    assert error.startswith("The prompt holds a control character (U+0007) at position 4")
    assert next(b for b in at.button if b.label == "Generate caption").disabled
