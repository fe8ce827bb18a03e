"""captionfleet.core.gpu_images on the CPU: the CPU path it takes without a GPU, and the device branch's
control flow (which images reach the device decoder, the retry one by one, the fallback, the order of the
rows) driven by a stand-in decoder built on Pillow. nvJPEG itself runs only on a GPU (bench/gpu.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captionfleet.core import gpu_images
from captionfleet.core.captioner import Preprocessing
from captionfleet.core.failures import ImageError
from captionfleet.core.images import ImageLimits, decode_image
from tests.hostile_images import hostile_corpus

PREP = Preprocessing(
    width=32,
    height=32,
    resample=Image.Resampling.BILINEAR,
    rescale_factor=1 / 255,
    mean=np.full(3, 0.5, dtype=np.float32),
    std=np.full(3, 0.5, dtype=np.float32),
)
CPU = torch.device("cpu")


def jpeg(size: tuple[int, int], seed: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


class StandIn:
    """A device decoder made of Pillow: full-size RGB, as nvJPEG gives; records what it was handed."""

    def __init__(self, refuse: bytes | None = None) -> None:
        self.calls: list[int] = []  # the length of each list it was called with
        self.seen: list[bytes] = []
        self.refuse = refuse  # bytes it fails on, as nvJPEG fails on what it cannot take

    def __call__(self, blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        out = []
        if [blob.numpy().tobytes() for blob in blobs] != [gpu_images.PROBE_JPEG]:  # DeviceJpegs' probe: not counted
            self.calls.append(len(blobs))
        for blob in blobs:
            data = blob.numpy().tobytes()
            if data != gpu_images.PROBE_JPEG:
                self.seen.append(data)
            if data == self.refuse:
                raise RuntimeError("nvjpeg: unsupported")
            with Image.open(io.BytesIO(data)) as image:
                out.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous())
        return out


def cpu_row(data: bytes) -> torch.Tensor:
    return torch.from_numpy(PREP.array(decode_image(data, draft_size=(32, 32))))


def test_without_a_device_decoder_every_image_takes_the_cpu_path_with_its_failures() -> None:
    good, other, bad, big = jpeg((80, 60), 0), png((40, 30)), b"<html>nope</html>", jpeg((200, 150), 1)
    batch = gpu_images.images_to_pixels(
        [good, bad, other, big], PREP, device=CPU, dtype=torch.float32, limits=ImageLimits(max_pixels=100 * 100)
    )
    assert gpu_images.device_decoder(CPU) is None
    assert batch.rows == [0, 2] and batch.on_device == 0
    assert {position: error.kind for position, error in batch.failures.items()} == {1: "not_an_image", 3: "too_large"}
    assert torch.equal(batch.pixels[0], cpu_row(good)) and torch.equal(batch.pixels[1], cpu_row(other))
    assert batch.sizes == {0: (80, 60), 2: (40, 30)}


def test_jpegs_go_to_the_device_decoder_in_one_call_and_the_rest_to_the_cpu_in_order() -> None:
    blobs = [png((40, 30)), jpeg((80, 60), 0), jpeg((64, 64), 1, orientation=6), jpeg((120, 90), 2)]
    decoder = StandIn()
    batch = gpu_images.images_to_pixels(blobs, PREP, device=CPU, dtype=torch.float32, decoder=decoder)
    assert decoder.calls == [2]  # the two upright JPEGs, batched; the rotated one and the PNG on the CPU
    assert decoder.seen == [blobs[1], blobs[3]]
    assert batch.rows == [0, 1, 2, 3] and batch.on_device == 2 and not batch.failures
    assert batch.pixels.shape == (4, 3, 32, 32) and batch.pixels.dtype == torch.float32
    assert torch.equal(batch.pixels[0], cpu_row(blobs[0])) and torch.equal(batch.pixels[2], cpu_row(blobs[2]))
    # The device's resize (antialiased, rounded to uint8 as Pillow does) is Pillow's full-size resize within
    # a step of rounding; the CPU path's draft mode decodes at a smaller scale first, so it differs more.
    full = Image.open(io.BytesIO(blobs[3])).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    expected = torch.from_numpy(PREP.array(full))
    assert (batch.pixels[3] - expected).abs().max().item() <= 2 / 255 / 0.5 + 1e-6


def test_a_jpeg_the_device_cannot_decode_is_tried_alone_then_on_the_cpu() -> None:
    blobs = [jpeg((80, 60), 0), jpeg((80, 60), 1), jpeg((80, 60), 2)]
    decoder = StandIn(refuse=blobs[1])
    batch = gpu_images.images_to_pixels(blobs, PREP, device=CPU, dtype=torch.float32, decoder=decoder)
    assert decoder.calls == [3, 1, 1, 1]  # the batch fails whole (as decode_jpeg does), then one by one
    assert batch.rows == [0, 1, 2] and batch.on_device == 2 and not batch.failures
    assert torch.equal(batch.pixels[1], cpu_row(blobs[1]))  # the one it refused: decoded on the CPU


def test_device_memory_trouble_is_not_an_image_failure() -> None:
    def out_of_memory(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        gpu_images.images_to_pixels([jpeg((80, 60), 0)], PREP, device=CPU, dtype=torch.float32, decoder=out_of_memory)


def test_big_jpegs_and_a_filter_the_device_lacks_stay_on_the_cpu() -> None:
    blobs = [jpeg((200, 150), 0), jpeg((80, 60), 1)]
    decoder = StandIn()
    batch = gpu_images.images_to_pixels(
        blobs, PREP, device=CPU, dtype=torch.float32, decoder=decoder, max_device_pixels=100 * 100
    )
    assert decoder.seen == [blobs[1]] and batch.on_device == 1
    lanczos = Preprocessing(32, 32, Image.Resampling.LANCZOS, 1 / 255, PREP.mean, PREP.std)
    decoder = StandIn()
    batch = gpu_images.images_to_pixels(blobs, lanczos, device=CPU, dtype=torch.float32, decoder=decoder)
    assert decoder.seen == [] and batch.on_device == 0 and batch.rows == [0, 1]


def test_every_hostile_image_gets_the_cpu_paths_outcome_and_refused_ones_never_reach_the_decoder() -> None:
    corpus = hostile_corpus()
    decoder = StandIn()
    batch = gpu_images.images_to_pixels(
        [case.data for case in corpus], PREP, device=CPU, dtype=torch.float32, decoder=decoder
    )
    for position, case in enumerate(corpus):
        try:
            decode_image(case.data, draft_size=(32, 32))
            expected = None
        except ImageError as error:
            expected = error.kind
        got = batch.failures[position].kind if position in batch.failures else None
        assert got == expected, case.name
        if expected in ("empty", "not_an_image", "unsupported", "too_large"):  # refused before any decoding
            assert case.data not in decoder.seen, case.name
    assert len(batch.rows) + len(batch.failures) == len(corpus) and batch.pixels.shape[0] == len(batch.rows)


def test_an_empty_or_all_failed_batch_has_no_rows() -> None:
    batch = gpu_images.images_to_pixels([b"", b"nothing"], PREP, device=CPU, dtype=torch.bfloat16)
    assert batch.pixels.shape == (0, 3, 32, 32) and batch.pixels.dtype == torch.bfloat16 and batch.rows == []
    assert {error.kind for error in batch.failures.values()} == {"empty", "not_an_image"}


def test_a_jpeg_cut_short_in_its_data_never_reaches_the_device_and_fails_as_on_the_cpu() -> None:
    # Its header is whole, so only its missing end (EOI) tells: nvJPEG might decode what is there.
    whole = jpeg((80, 60), 3)
    cut = whole[: len(whole) // 2]
    decoder = StandIn()
    batch = gpu_images.images_to_pixels([whole, cut], PREP, device=CPU, dtype=torch.float32, decoder=decoder)
    assert decoder.seen == [whole]
    with pytest.raises(ImageError) as on_cpu:
        decode_image(cut, draft_size=(32, 32))
    assert batch.rows == [0] and batch.failures[1].kind == on_cpu.value.kind


def test_the_devices_nearest_resize_is_pillows() -> None:
    nearest = Preprocessing(
        width=4,
        height=4,
        resample=Image.Resampling.NEAREST,
        rescale_factor=1 / 255,
        mean=np.zeros(3, dtype=np.float32),
        std=np.ones(3, dtype=np.float32),
    )
    pixels = np.random.default_rng(5).integers(0, 255, (10, 10, 3), dtype=np.uint8)
    device = gpu_images.DevicePreprocessing(nearest, CPU, torch.float32)
    got = device([torch.from_numpy(pixels).permute(2, 0, 1).contiguous()])
    expected = nearest.array(Image.fromarray(pixels).resize((4, 4), Image.Resampling.NEAREST))
    assert torch.allclose(got[0], torch.from_numpy(expected))
