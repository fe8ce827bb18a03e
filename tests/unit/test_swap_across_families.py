"""The hot swap to a model of another input size or family, mid-run, through the real pipeline: inputs
the decode threads prepared for the old model are prepared again for the new one, nothing is lost or
answered twice, and every caption is the one its model gives that image alone."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from PIL import Image

from captionfleet.core.captioner import CaptionModel, ImageOrigin, ModelInput, ModelWrapper, own_inputs
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import BatchSettings, DecodingSettings
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline
from tests.conftest import save_tiny_checkpoint
from tests.tiny_families import pictures

DECODING = DecodingSettings(num_beams=1, max_new_tokens=6)
ITEMS = 12


class Item:
    def __init__(self, index: int, image: Image.Image) -> None:
        self.id, self.uri = f"img-{index}", f"mem://{index}"
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        self.data = buffer.getvalue()

    def read(self) -> bytes:
        return self.data


class Counted(ModelWrapper):
    """A model that counts where its inputs were prepared, and holds its first batch until the decode
    threads have prepared ``ahead`` inputs for it (so that some wait when the swap comes)."""

    def __init__(self, inner: CaptionModel, ahead: int = 0) -> None:
        self._inner = inner
        self.ahead = ahead
        self.prepared_in: list[str] = []
        self.enough = threading.Event()
        self.batches = 0

    @property
    def wrapped(self) -> CaptionModel:
        return self._inner

    def prepare(
        self, image: Image.Image, prompt: str | None = None, *, origin: ImageOrigin | None = None
    ) -> ModelInput:
        self.prepared_in.append(threading.current_thread().name)
        if len(self.prepared_in) >= self.ahead:
            self.enough.set()
        return self._inner.prepare(image, prompt, origin=origin)

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        if self.batches == 0 and self.ahead:
            assert self.enough.wait(30)
        self.batches += 1
        # Through this wrapper's prepare, so re-preparations are counted: own_inputs asks the model.
        return self._inner.caption_inputs(own_inputs(self, inputs), decoding)


class Sink:
    def __init__(self, on_first_write: Callable[[], None]) -> None:
        self.rows: list[Result] = []
        self.on_first_write = on_first_write

    def done_ids(self) -> set[str]:
        return set()

    def write(self, results: list[Result]) -> None:
        if not self.rows:
            self.on_first_write()  # the swap is offered while the next inputs wait, prepared for the old model
        self.rows.extend(results)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def ved_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ved-64"), seed=3, image_size=64)


@pytest.mark.parametrize("target", ["vision-encoder-decoder at 32 px", "qwen2_vl"])
def test_a_swap_to_another_size_or_family_mid_run_loses_nothing_and_prepares_again(
    target: str, ved_64: Path, tiny_checkpoint: Path, tiny_family: Callable[[str], Path]
) -> None:
    old_model = load_checkpoint(ved_64, device="cpu", precision="fp32", decoding=DECODING)
    new_path = tiny_checkpoint if target.startswith("vision") else tiny_family(target)
    new_model = load_checkpoint(new_path, device="cpu", precision="fp32", decoding=DECODING)
    assert old_model.preparation_key != new_model.preparation_key
    old, new = Counted(old_model, ahead=6), Counted(new_model)
    hot = HotSwapCaptioner(old)
    images = pictures(ITEMS)
    sink = Sink(lambda: hot.offer(new))
    settings = BatchSettings(max_items=2, max_wait_ms=10_000, prefetch=8, decode_threads=2)
    stats = CaptionPipeline(hot, sink, settings, ImageLimits()).run([Item(i, image) for i, image in enumerate(images)])

    assert sorted(row.id for row in sink.rows) == sorted(f"img-{i}" for i in range(ITEMS))  # each once
    assert stats.failed == 0 and all(row.ok for row in sink.rows)
    by_version = {old_model.version: old_model, new_model.version: new_model}
    assert {row.model_version for row in sink.rows} == set(by_version)  # both served
    # Inputs decoded for the 64 px model before the swap were prepared again, in the model thread.
    assert any(not name.startswith("decode") for name in new.prepared_in)
    for row in sink.rows:  # each caption is its model's for that image alone: the right preprocessing
        image = images[int(row.id.split("-")[1])]
        model = by_version[row.model_version]
        assert row.caption == model.caption_inputs([model.prepare(image)], DECODING)[0].text
        assert row.tokens is not None and row.mean_logprob is not None
