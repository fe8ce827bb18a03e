"""The worker's pipeline decoding a batch's JPEGs on the model's device (WORKER_BATCH__DEVICE_DECODE,
core/gpu_images.py's DeviceJpegs), on the CPU: the tiny real model on the CPU device, with the Pillow
stand-in for nvJPEG (tests/unit/test_gpu_images.py), so that the device branch runs through the real
decode threads, batcher and model. nvJPEG itself runs only on a GPU (bench/gpu.py)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captionfleet.core import gpu_images
from captionfleet.core.captioner import CaptionModel, FixedSizeInputs, is_undecoded
from captionfleet.core.gpu_images import DeviceJpegs
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import BatchSettings, DecodingSettings, SettingsError, load_worker_settings
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline, Item
from tests.conftest import save_tiny_checkpoint
from tests.hostile_images import hostile_corpus
from tests.unit.test_gpu_images import StandIn
from tests.unit.test_pipeline import FakeCaptioner, MemoryItem, MemorySink

DECODING = DecodingSettings(num_beams=1, max_new_tokens=6)
LIMITS = ImageLimits(max_pixels=100 * 100)  # so that a 200x150 JPEG is too large


def jpeg(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def corrupt_jpeg() -> bytes:
    """A whole header and an end marker, but no image data: it reaches the device, and no decoder takes it."""
    data = jpeg(99)
    return data[: data.index(b"\xff\xda")] + b"\xff\xd9"


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> CaptionModel:
    return load_checkpoint(tiny_checkpoint, device="cpu", precision="fp32", decoding=DECODING)  # 32x32 inputs


def run(
    model: CaptionModel, items: list[MemoryItem], mode: str, decoder: StandIn | None = None, max_items: int = 4
) -> dict[str, Result]:
    sink = MemorySink()
    # A long wait: batches fill to max_items, so the device sees JPEGs together.
    batch = BatchSettings(max_items=max_items, max_wait_ms=2000, prefetch=16, device_decode=mode)  # type: ignore[arg-type]
    CaptionPipeline(model, sink, batch, LIMITS, jpeg_decoder=decoder).run(items)
    assert len(sink.rows) == len(items)  # one row per item, none lost, none twice
    return {row.id: row for row in sink.rows}


def outcome(row: Result) -> tuple[str | None, str | None]:
    return row.caption, row.error_kind


def test_device_decoded_batches_caption_as_the_cpu_path(model: CaptionModel) -> None:
    # The model's own size (no resize on either path, so the same pixels); a grey one among them.
    blobs = [jpeg(seed) for seed in range(7)] + [jpeg(7, mode="L")]
    items = [MemoryItem(f"jpeg{i}", data) for i, data in enumerate(blobs)]
    on_cpu = run(model, items, "off")
    decoder = StandIn()
    on_device = run(model, items, "on", decoder)
    assert sorted(decoder.seen) == sorted(blobs)  # every JPEG decoded by the device decoder...
    assert max(decoder.calls) == 4 and sum(decoder.calls) == 8  # ...a batch's together
    assert {i: outcome(row) for i, row in on_device.items()} == {i: outcome(row) for i, row in on_cpu.items()}
    assert all(row.ok and row.caption for row in on_device.values())
    assert len({row.caption for row in on_cpu.values()}) > 1  # the comparison is not between identical captions
    assert all((row.width, row.height) == (32, 32) and (row.decode_ms or 0) > 0 for row in on_device.values())


def test_bad_images_in_a_device_batch_each_get_their_own_row_as_on_the_cpu(model: CaptionModel) -> None:
    good = [jpeg(seed) for seed in range(3)]
    refused_by_device = jpeg(10)  # nvJPEG fails on it: the CPU path decodes it
    whole = jpeg(11)
    bad = {
        "corrupt": corrupt_jpeg(),
        "truncated": whole[: len(whole) // 2],
        "png": png(12),
        "too_large": jpeg(13, size=(200, 150)),
        "not_an_image": b"<html>no</html>",
        "refused_by_device": refused_by_device,
    }
    items = [MemoryItem(f"good{i}", data) for i, data in enumerate(good)]
    items[1:1] = [MemoryItem(name, data) for name, data in bad.items()]  # in the middle of one batch
    decoder = StandIn(refuse=refused_by_device)
    on_device = run(model, items, "on", decoder, max_items=len(items))
    on_cpu = run(model, items, "off", max_items=len(items))
    assert {i: outcome(row) for i, row in on_device.items()} == {i: outcome(row) for i, row in on_cpu.items()}
    kinds = {i: row.error_kind for i, row in on_device.items()}
    assert kinds == {
        **{f"good{i}": None for i in range(3)},
        "corrupt": "decode",
        "truncated": "truncated",
        "png": None,
        "too_large": "too_large",
        "not_an_image": "not_an_image",
        "refused_by_device": None,
    }
    # The hostile-image rules ran before any decoder: what they refuse, and what is not a whole JPEG, never
    # reached the device; the batch failed whole once on the device (as decode_jpeg does), then one by one.
    assert set(decoder.seen) == {*good, bad["corrupt"], refused_by_device}
    assert decoder.calls[0] == 5 and set(decoder.calls[1:]) == {1}
    assert on_device["corrupt"].bytes == len(bad["corrupt"])


def test_auto_is_off_on_the_cpu(model: CaptionModel) -> None:
    decoder = StandIn()
    items = [MemoryItem(f"jpeg{i}", jpeg(i)) for i in range(3)]
    rows = run(model, items, "auto", decoder)
    assert decoder.calls == []  # even with a decoder at hand: auto needs the model on CUDA
    assert {i: outcome(row) for i, row in rows.items()} == {
        i: outcome(row) for i, row in run(model, items, "off").items()
    }
    assert DeviceJpegs("auto", LIMITS).target(model.fixed_size_inputs) is None
    prepared = CaptionPipeline(model, MemorySink(), BatchSettings(), LIMITS)._prepare(items[0])
    assert prepared.input is not None and not is_undecoded(prepared.input)  # decoded by the decode thread


def inputs_on(device: str, resample: Image.Resampling = Image.Resampling.BILINEAR) -> FixedSizeInputs:
    prep = gpu_images.Preprocessing(32, 32, resample, 1 / 255, None, None)
    return FixedSizeInputs(prep, torch.device(device), torch.float16, "key")


def test_auto_is_on_for_a_cuda_model_where_torchvisions_decoder_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_images, "device_decoder", lambda device: StandIn() if device.type == "cuda" else None)
    cuda = inputs_on("cuda")
    assert DeviceJpegs("auto", LIMITS).target(cuda) is cuda
    assert DeviceJpegs("off", LIMITS).target(cuda) is None
    assert DeviceJpegs("auto", LIMITS).target(inputs_on("cpu")) is None
    assert DeviceJpegs("auto", LIMITS).target(None) is None  # another family
    lanczos = DeviceJpegs("auto", LIMITS).why_not(inputs_on("cuda", Image.Resampling.LANCZOS))
    assert lanczos is not None and "LANCZOS" in lanczos
    monkeypatch.setattr(gpu_images, "device_decoder", lambda device: None)  # torchvision missing
    reason = DeviceJpegs("auto", LIMITS).why_not(cuda)
    assert reason is not None and "torchvision" in reason


def test_on_where_it_cannot_refuses_to_start_naming_the_fix(model: CaptionModel) -> None:
    on = BatchSettings(device_decode="on")
    with pytest.raises(SettingsError, match=r"DEVICE_DECODE=on, but the model runs on cpu.*set it to auto"):
        CaptionPipeline(model, MemorySink(), on, LIMITS)
    with pytest.raises(SettingsError, match="prepares its own inputs"):
        CaptionPipeline(FakeCaptioner(), MemorySink(), on, LIMITS)  # type: ignore[arg-type]
    CaptionPipeline(FakeCaptioner(), MemorySink(), BatchSettings(device_decode="auto"), LIMITS)  # type: ignore[arg-type]
    CaptionPipeline(model, MemorySink(), on, LIMITS, jpeg_decoder=StandIn())  # a device decoder: it can


def test_the_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).parent)  # no .env file of the checkout's
    assert BatchSettings().device_decode == "auto"
    monkeypatch.setenv("WORKER_BATCH__DEVICE_DECODE", "off")
    assert load_worker_settings().batch.device_decode == "off"
    monkeypatch.setenv("WORKER_BATCH__DEVICE_DECODE", "gpu")
    with pytest.raises(SettingsError, match="WORKER_BATCH__DEVICE_DECODE='gpu'"):
        load_worker_settings()


def test_an_undecoded_jpeg_holds_its_compressed_bytes_and_a_hot_swap_prepares_it_again(
    model: CaptionModel, tmp_path: Path
) -> None:
    data = jpeg(5, size=(96, 96))
    item = MemoryItem("photo", data)
    hot = HotSwapCaptioner(model)
    sink = MemorySink()
    pipeline = CaptionPipeline(hot, sink, BatchSettings(device_decode="on"), LIMITS, jpeg_decoder=StandIn())
    prepared = pipeline._prepare(item)
    assert prepared.input is not None and is_undecoded(prepared.input)
    assert prepared.held == len(data)  # what the prefetch budget counts: the compressed bytes, once
    on_cpu = CaptionPipeline(model, MemorySink(), BatchSettings(), LIMITS)._prepare(item)
    assert on_cpu.held > prepared.held  # the decode thread's float32 pixels besides

    # A model of another input size is swapped in before its batch: it prepares the image again from its bytes.
    bigger = load_checkpoint(
        save_tiny_checkpoint(tmp_path / "48", seed=1, image_size=48), device="cpu", precision="fp32", decoding=DECODING
    )
    hot.offer(bigger)
    pipeline._caption_group([prepared])
    (row,) = sink.rows
    assert row.model_version == bigger.version and row.ok
    assert row.caption == bigger.caption([decode_image(data, limits=LIMITS, draft_size=bigger.draft_size)])[0]


def test_every_hostile_image_gets_the_cpu_paths_row_in_device_mode(model: CaptionModel) -> None:
    corpus = hostile_corpus()
    items = [MemoryItem(f"{i}-{case.name}", case.data) for i, case in enumerate(corpus)]
    decoder = StandIn()
    on_device = run(model, items, "on", decoder, max_items=8)
    on_cpu = run(model, items, "off", max_items=8)
    # The kind of each row (None: captioned); captions of resized images may differ by the resize's rounding.
    assert {i: row.error_kind for i, row in on_device.items()} == {i: row.error_kind for i, row in on_cpu.items()}
    refused = [case.data for case in corpus if case.expect_kind is not None]
    assert decoder.seen and not any(data in decoder.seen for data in refused)


@dataclass
class Offered:
    """An interactive (caption API) item: answered through on_item_result only."""

    id: str
    data: bytes
    uri: str = ""
    decoding: DecodingSettings | None = None
    cancelled: bool = False

    def read(self) -> bytes:
        return self.data

    def answer(self, result: Result) -> None:
        pass

    def dropped(self) -> None:
        raise AssertionError("nothing is cancelled here")


def test_the_latency_lanes_jpegs_decode_on_the_device_too(model: CaptionModel) -> None:
    answers: dict[str, Result] = {}

    def answered(item: Item, result: Result) -> None:
        answers[item.id] = result

    sink = MemorySink()
    decoder = StandIn()
    pipeline = CaptionPipeline(
        model,
        sink,
        BatchSettings(max_items=4, max_wait_ms=20, device_decode="on"),
        LIMITS,
        on_item_result=answered,
        interactive_wait_ms=5,
        jpeg_decoder=decoder,
    )
    asked = {"api-ok": jpeg(20), "api-corrupt": corrupt_jpeg()}
    for name, data in asked.items():
        pipeline.offer(Offered(name, data))
    streamed = [MemoryItem(f"stream{i}", jpeg(30 + i)) for i in range(3)]
    pipeline.run(streamed)
    assert sorted(row.id for row in sink.rows) == [item.id for item in streamed]  # interactive answers: not in the run
    assert answers["api-corrupt"].error_kind == "decode"
    expected = run(model, [MemoryItem("api-ok", asked["api-ok"])], "off")["api-ok"]
    assert answers["api-ok"].ok and answers["api-ok"].caption == expected.caption
    assert asked["api-ok"] in decoder.seen


# -- review mends ----------------------------------------------------------------------------------


def test_a_jpeg_left_undecoded_for_a_model_swapped_away_and_back_is_captioned(
    model: CaptionModel, tmp_path: Path
) -> None:
    """A -> B -> A (a rollback) while a prefetched JPEG waits: its batch's device decoding ran for the model
    serving then (B), so it reaches A undecoded; A prepares it from its bytes instead of failing it."""
    other = load_checkpoint(
        save_tiny_checkpoint(tmp_path / "48", seed=1, image_size=48), device="cpu", precision="fp32", decoding=DECODING
    )
    hot = HotSwapCaptioner(model)
    sink = MemorySink()
    pipeline = CaptionPipeline(hot, sink, BatchSettings(device_decode="on"), LIMITS, jpeg_decoder=StandIn())
    prepared = pipeline._prepare(MemoryItem("photo", jpeg(5)))
    assert prepared.input is not None and is_undecoded(prepared.input)
    hot.offer(other)
    hot.caption_inputs([])  # the next model call swaps: B serves
    hot.offer(model)  # rolled back while the input waits
    pipeline._caption_group([prepared])  # alone, as a lone item flushed at max_wait is
    (row,) = sink.rows
    assert row.ok and row.caption == run(model, [MemoryItem("photo", jpeg(5))], "off")["photo"].caption


def test_a_row_reports_the_same_size_whichever_path_decoded_it(model: CaptionModel) -> None:
    data = jpeg(3, size=(96, 64))  # large enough for the CPU path's draft mode to halve it
    sizes = {
        mode: (row.width, row.height)
        for mode, decoder in (("off", None), ("on", StandIn()))
        for row in run(model, [MemoryItem("x", data)], mode, decoder).values()
    }
    assert sizes["off"] == sizes["on"] == (48, 32)  # the size decoded at, as rows always said


class Broken(StandIn):
    """A device decoder that fails every call, as torchvision does when its image extension did not load."""

    def __call__(self, blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        self.calls.append(len(blobs))
        raise RuntimeError("torchvision was not compiled with nvjpeg")


def test_a_decoder_that_fails_its_probe_is_never_used(model: CaptionModel, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match=r"failed on a tiny JPEG.*nvjpeg"):
        CaptionPipeline(model, MemorySink(), BatchSettings(device_decode="on"), LIMITS, jpeg_decoder=Broken())
    broken = Broken()
    monkeypatch.setattr(gpu_images, "device_decoder", lambda device: broken)
    jpegs = DeviceJpegs("auto", LIMITS)
    cuda = FixedSizeInputs(model.fixed_size_inputs.preprocessing, torch.device("cuda"), torch.float16, "key")  # type: ignore[union-attr]
    assert jpegs.target(cuda) is None and jpegs.target(cuda) is None  # auto: the CPU path...
    assert broken.calls == [1]  # ...after one probe, not a failed call per batch


def test_a_checkpoint_with_one_mean_for_all_channels_decodes_on_either_path(tmp_path: Path) -> None:
    import json

    path = save_tiny_checkpoint(tmp_path / "scalar")
    config_file = path / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["image_mean"], config["image_std"] = 0.5, 0.5  # allowed by ViTImageProcessor
    config_file.write_text(json.dumps(config))
    scalar = load_checkpoint(path, device="cpu", precision="fp32", decoding=DECODING)
    items = [MemoryItem(f"i{k}", jpeg(k)) for k in range(4)]
    off, on = run(scalar, items, "off"), run(scalar, items, "on", StandIn())
    assert all(row.ok for row in off.values())
    assert {k: outcome(row) for k, row in on.items()} == {k: outcome(row) for k, row in off.items()}
