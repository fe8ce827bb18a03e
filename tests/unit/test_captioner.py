import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessorPil

from captionfleet.core.captioner import Captioner, PromptError, checkpoint_version
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.settings import DecodingSettings


def _images(n: int, size: tuple[int, int] = (40, 30)) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=DecodingSettings(num_beams=3, max_new_tokens=8))


def test_captions_one_string_per_image(captioner: Captioner) -> None:
    captions = captioner.caption(_images(3))
    assert len(captions) == 3
    assert all(isinstance(c, str) for c in captions)
    assert captioner.caption([]) == []


@pytest.fixture(scope="module")
def int8_captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_dir(tiny_checkpoint, device="cpu", precision="int8")


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("fixture", ["captioner", "int8_captioner"])  # the default path, and int8 (per-row scales)
def test_batched_equals_one_by_one(fixture: str, num_beams: int, request: pytest.FixtureRequest) -> None:
    captioner: Captioner = request.getfixturevalue(fixture)
    images = _images(6)
    decoding = DecodingSettings(num_beams=num_beams, max_new_tokens=8, no_repeat_ngram_size=2)
    batched = captioner.caption(images, decoding)
    singles = [captioner.caption([image], decoding)[0] for image in images]
    assert batched == singles
    # Random weights could in principle caption everything alike, which would make the check weak.
    assert len(set(batched)) > 1


def test_preprocessing_matches_vit_image_processor(captioner: Captioner, tiny_checkpoint: Path) -> None:
    reference = ViTImageProcessorPil.from_pretrained(tiny_checkpoint)
    images = _images(2, size=(97, 61))
    expected = reference(images=images, return_tensors="pt")["pixel_values"]
    ours = captioner.preprocess(images)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-5)


F32 = np.float32


@pytest.mark.parametrize(
    ("rescale", "mean", "std"),
    [
        (1 / 255, np.array([0.485, 0.456, 0.406], F32), np.array([0.229, 0.224, 0.225], F32)),  # ImageNet's
        (1 / 255, np.full(3, 0.5, F32), np.full(3, 0.5, F32)),  # ViT-GPT2's
        (None, np.array([120.0, 110.5, 99.25], F32), np.array([58.0, 57.1, 57.4], F32)),  # no rescale
        (1 / 255, None, None),  # no normalisation
        (None, None, None),
        (1 / 255, np.array(0.5, F32), np.array([0.25], F32)),  # one value for every channel
        (1 / 255, np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])),  # float64: its own path
    ],
)
def test_preprocessing_array_is_the_reference_arithmetic_to_the_bit(
    rescale: float | None, mean: np.ndarray | None, std: np.ndarray | None
) -> None:
    """``array`` works in place in CHW order: every value of every channel (each of the 256 byte values
    appears in each) comes out as ``(x * rescale - mean) / std`` computed in HWC order, bit for bit, dtype
    included: the captions cannot change."""
    from captionfleet.core.captioner import Preprocessing

    prep = Preprocessing(16, 32, Image.Resampling.BILINEAR, rescale, mean, std)
    values = np.arange(16 * 32 * 3) % 256
    pixels = np.random.default_rng(3).permutation(values).astype(np.uint8).reshape(32, 16, 3)
    reference = np.asarray(pixels, dtype=np.float32)
    if rescale is not None:
        reference = reference * np.float32(rescale)
    if mean is not None and std is not None:
        reference = (reference - mean) / std
    reference = np.ascontiguousarray(reference.transpose(2, 0, 1))

    ours = prep.array(Image.fromarray(pixels))
    assert ours.dtype == reference.dtype and ours.shape == reference.shape == (3, 32, 16)
    assert ours.flags.c_contiguous
    assert ours.tobytes() == reference.tobytes()
    other = Image.fromarray(pixels).resize((40, 20))  # another size: resized first, as before
    again = np.asarray(other.resize((16, 32), resample=Image.Resampling.BILINEAR))
    assert prep.array(other).tobytes() == prep._array_hwc(again).tobytes()


def test_no_warnings_are_printed_per_batch(
    captioner: Captioner, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captioner.caption(_images(4))
        captioner.caption(_images(2), DecodingSettings(num_beams=1, max_new_tokens=4))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""


def test_version_is_content_hash_or_recorded(tiny_checkpoint: Path, tmp_path: Path) -> None:
    version = checkpoint_version(tiny_checkpoint)
    assert version.startswith("sha256-") and len(version) == len("sha256-") + 12
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    assert checkpoint_version(copy) == version  # the same weights are the same version
    (copy / "captionfleet.json").write_text(json.dumps({"version": "shapes-v3"}))
    assert checkpoint_version(copy) == "shapes-v3"


def test_refuses_pickled_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pickled = shutil.copytree(tiny_checkpoint, tmp_path / "pickled")
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ModelRefError, match="safetensors"):
        Captioner.from_dir(pickled, device="cpu")


def test_cuda_requested_without_gpu_names_the_fix(tiny_checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="auto or cpu"):
        Captioner.from_dir(tiny_checkpoint, device="cuda")


# -- the pipeline's two steps: prepare in decode threads, caption_inputs in the model thread ----------


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_inputs_gives_the_same_captions_as_caption(captioner: Captioner, num_beams: int) -> None:
    # The serving path (prepare + caption_inputs) and caption()/caption_pixels() (bench, trainer, dashboard)
    # run the same generate() call: the same captions, bit for bit.
    images = _images(6)
    decoding = DecodingSettings(num_beams=num_beams, max_new_tokens=8)
    inputs = [captioner.prepare(image) for image in images]
    assert all(item.cost == 32 * 32 and item.key == captioner.preparation_key for item in inputs)
    assert [c.text for c in captioner.caption_inputs(inputs, decoding)] == captioner.caption(images, decoding)
    assert captioner.family == "vision-encoder-decoder"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_each_caption_carries_the_confidence_transformers_computes(captioner: Captioner, num_beams: int) -> None:
    images = _images(4)
    decoding = DecodingSettings(num_beams=num_beams, max_new_tokens=8)
    config = captioner.generation_config(decoding)
    config.output_scores, config.return_dict_in_generate = True, True
    with torch.inference_mode():
        output = captioner.model.generate(pixel_values=captioner.preprocess(images), generation_config=config)
    beams = output.beam_indices if num_beams > 1 else None
    scores = captioner.model.compute_transition_scores(output.sequences, output.scores, beams, normalize_logits=True)
    captions = captioner.caption_inputs([captioner.prepare(image) for image in images], decoding)
    for row, caption in enumerate(captions):
        if num_beams == 1:
            generated = output.sequences[row, 1:].tolist()  # after the decoder's start token
            end = generated.index(config.eos_token_id) + 1 if config.eos_token_id in generated else len(generated)
            assert caption.mean_logprob == pytest.approx(float(scores[row, :end].mean()), abs=1e-5)
            assert caption.tokens == end - (config.eos_token_id in generated)
        else:  # length_penalty 1: the sequence score is the mean log-probability per token
            assert caption.mean_logprob == pytest.approx(float(output.sequences_scores[row]), abs=1e-5)


def test_the_greedy_recorder_finds_the_token_greedy_search_takes_with_the_same_logprob() -> None:
    """Greedy search takes ``torch.argmax`` of the final scores (the first of tied best tokens); the recorder keeps
    that one token via max(), with the log-probability topk(2) gave before, to the bit, ties included."""
    from captionfleet.core.generation import ChoiceRecorder, _logprob, recorder_for

    torch.manual_seed(0)
    scores = torch.randn(6, 50257) * 4
    scores[1, 7] = scores[1, 9] = scores[1].max() + 1  # two tied best tokens
    scores[2, 3:6] = scores[2].max() + 2  # three
    scores[3, 100:] = float("-inf")  # banned tokens (no_repeat_ngram_size)
    scores[4, 0] = scores[4, -1] = scores[4].max() + 0.5  # tied at both ends
    recorder = recorder_for(1, [50256])
    assert recorder.keep == 1
    recorder(torch.zeros(6, 1, dtype=torch.long), scores)
    before = ChoiceRecorder(keep=2)
    values, indices = scores.topk(2, dim=-1)
    before.values.append(values.float() - scores.float().logsumexp(dim=-1, keepdim=True))
    before.indices.append(indices)
    chosen = torch.argmax(scores, dim=-1)
    normaliser = scores.logsumexp(dim=-1)
    for row, token in enumerate(chosen.tolist()):
        ours = _logprob(recorder, 0, row, token)
        assert ours is not None and ours == float(scores[row, token] - normaliser[row])
        if row in (0, 3, 5):  # no tie: topk(2) found it too (which of three tied tokens it kept is its own)
            assert ours == _logprob(before, 0, row, token)
    assert chosen[1] == 7 and chosen[2] == 3 and chosen[4] == 0  # the first of the tied ones


def test_a_prompt_is_refused_by_a_model_that_takes_none(captioner: Captioner) -> None:
    with pytest.raises(PromptError, match="takes no prompt"):
        captioner.prepare(_images(1)[0], "a picture of")
