"""Every tested model family (core/family.py) with a tiny random checkpoint of its own config classes
(tests/tiny_families.py): it loads through the worker's loader, a batch (images of different sizes,
different prompts) captions exactly as the same images one by one, greedy and with 4 beams, and each
caption carries its confidence."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from captionfleet.core import checkpoint_load
from captionfleet.core.captioner import ModelInput
from captionfleet.core.families.captioner import FamilyCaptioner, resolve_precision, saved_dtype
from captionfleet.core.families.collate import collate
from captionfleet.core.families.prompts import text_for
from captionfleet.core.family import CHAT_PROMPT, FAMILIES
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import DecodingSettings
from tests.tiny_families import BUILDERS, pictures

GREEDY = DecodingSettings(num_beams=1, max_new_tokens=6)
BEAMS = DecodingSettings(num_beams=4, max_new_tokens=6)
# Prompts of different lengths in one batch; None is the family's default. Florence-2 takes task tokens.
PROMPTS = {"florence2": [None, "<DETAILED_CAPTION>", None, "<MORE_DETAILED_CAPTION>", None]}
OTHER_PROMPTS = [None, "a photo of", None, "what is the small red thing above the square", None]


@pytest.fixture(scope="module")
def loaded(tiny_family: Callable[[str], Path]) -> Callable[[str], FamilyCaptioner]:
    """Each family's tiny model, loaded once for this module."""
    models: dict[str, FamilyCaptioner] = {}

    def get(family: str) -> FamilyCaptioner:
        if family not in models:
            model = load_checkpoint(tiny_family(family), device="cpu", precision="auto")
            assert isinstance(model, FamilyCaptioner)
            models[family] = model
        return models[family]

    return get


def prepared(model: FamilyCaptioner) -> list[ModelInput]:
    prompts = PROMPTS.get(model.family, OTHER_PROMPTS)
    return [model.prepare(image, prompt) for image, prompt in zip(pictures(len(prompts)), prompts, strict=True)]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_a_family_loads_through_the_worker_loader(family: str, loaded: Callable[[str], FamilyCaptioner]) -> None:
    model = loaded(family)
    assert model.family == family  # what `models show` and the logs name
    assert model.precision == "fp32"  # the CPU default of every family but ViT-GPT2 (see families/captioner.py)
    assert model.spec == FAMILIES[family] and model.spec.tested


@pytest.mark.parametrize("decoding", [GREEDY, BEAMS], ids=["greedy", "4-beams"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_a_batch_captions_as_its_images_one_by_one(
    family: str, decoding: DecodingSettings, loaded: Callable[[str], FamilyCaptioner]
) -> None:
    model = loaded(family)
    inputs = prepared(model)
    batch = model.caption_inputs(inputs, decoding)
    alone = [model.caption_inputs([item], decoding)[0] for item in inputs]
    assert [c.text for c in batch] == [c.text for c in alone]
    assert [c.tokens for c in batch] == [c.tokens for c in alone]
    for together, single in zip(batch, alone, strict=True):
        assert together.mean_logprob == pytest.approx(single.mean_logprob, abs=1e-4)
    # The check has teeth only if the captions follow the images: those with the default prompt differ.
    assert len({batch[i].text for i in (0, 2, 4)}) > 1
    for caption in batch:  # an empty one is possible (a random model may end at once): the pipeline fails it
        assert caption.mean_logprob is not None and caption.mean_logprob <= 0


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_no_warning_is_logged_per_image_or_batch(
    family: str, loaded: Callable[[str], FamilyCaptioner], caplog: pytest.LogCaptureFixture
) -> None:
    model = loaded(family)
    with caplog.at_level(logging.WARNING):
        model.caption_inputs(prepared(model), BEAMS)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm"])
def test_dynamic_resolution_costs_what_the_model_pays(family: str, loaded: Callable[[str], FamilyCaptioner]) -> None:
    # Images of different sizes get different numbers of patches (Qwen-VL) or splits (SmolVLM): the cost
    # the batcher counts follows them.
    costs = [item.cost for item in prepared(loaded(family))]
    assert len(set(costs[0::2])) > 1  # the images with the default prompt
    fixed = [item.cost for item in prepared(loaded("blip"))]
    assert set(fixed[0::2]) == {32 * 32}  # BLIP's default is no prompt: the image alone (prompts: limits.py)


def test_left_padding_is_in_force_for_a_decoder_only_family(loaded: Callable[[str], FamilyCaptioner]) -> None:
    model = loaded("qwen2_vl")
    image = pictures(1)[0]
    short, long = model.prepare(image, "a photo"), model.prepare(image, "what is the small red thing above it")
    batch = collate([short.features, long.features], padding_side="left", pad_id=model.pad_id)
    missing = long.features["input_ids"].shape[1] - short.features["input_ids"].shape[1]
    assert missing > 0
    assert batch["input_ids"][0, :missing].tolist() == [model.pad_id] * missing
    assert batch["attention_mask"][0].tolist() == [0] * missing + [1] * short.features["input_ids"].shape[1]
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # every row ends where generation continues
    together = [c.text for c in model.caption_inputs([short, long], GREEDY)]
    assert together == [model.caption_inputs([item], GREEDY)[0].text for item in (short, long)]
    # And the equality is a real check: padding on the wrong side changes the shorter prompt's caption.
    right = dataclasses.replace(model.spec, padding_side="right")
    model.spec, saved = right, model.spec
    try:
        assert [c.text for c in model.caption_inputs([short, long], GREEDY)] != together
    finally:
        model.spec = saved


def test_only_generated_tokens_are_decoded_with_the_confidence_transformers_computes(
    loaded: Callable[[str], FamilyCaptioner],
) -> None:
    # The chat scaffolding and the prompt are in generate()'s output: the caption is what follows them.
    model = loaded("qwen2_vl")
    inputs = prepared(model)[:2]
    batch = collate([item.features for item in inputs], padding_side="left", pad_id=model.pad_id)
    prompt_length = batch["input_ids"].shape[1]
    eos = model.generation_config(GREEDY).eos_token_id
    for decoding in (GREEDY, BEAMS):
        config = model.generation_config(decoding)
        config.output_scores = True
        with torch.inference_mode():
            output = model.model.generate(**batch, generation_config=config)
        ours = model.caption_inputs(inputs, decoding)
        beams = output.beam_indices if decoding.num_beams > 1 else None
        scores = model.model.compute_transition_scores(output.sequences, output.scores, beams, normalize_logits=True)
        for row, caption in enumerate(ours):
            generated = output.sequences[row, prompt_length:].tolist()
            end = generated.index(eos) + 1 if eos in generated else len(generated)
            expected = model.processor.tokenizer.decode(generated[:end], skip_special_tokens=True).strip()
            assert caption.text == expected
            if decoding.num_beams == 1:
                assert caption.mean_logprob == pytest.approx(float(scores[row, :end].mean()), abs=1e-4)
            else:  # no repetition rule here, so the per-token sequence score is the same number
                assert caption.mean_logprob == pytest.approx(float(output.sequences_scores[row]), abs=1e-4)


def test_default_prompts_and_how_they_reach_the_model(loaded: Callable[[str], FamilyCaptioner]) -> None:
    assert FAMILIES["florence2"].default_prompt == "<CAPTION>"
    assert FAMILIES["blip"].default_prompt is None and FAMILIES["git"].default_prompt is None
    assert FAMILIES["paligemma"].default_prompt == "caption en"
    for family in ("smolvlm", "idefics3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        assert FAMILIES[family].default_prompt == CHAT_PROMPT
    qwen = loaded("qwen2_vl")
    turn = text_for(qwen.spec, qwen.processor, None)
    assert turn is not None and CHAT_PROMPT in turn and turn.endswith("<|im_start|>assistant\n")
    assert qwen.prepare(pictures(1)[0]).prompt is None  # the default is the family's, decided at preparation


def test_each_caption_names_the_prompt_it_answers(loaded: Callable[[str], FamilyCaptioner]) -> None:
    """The request's prompt, else the family's default (what a result reports as its ``prompt``)."""
    image = pictures(1)[0]
    florence, blip = loaded("florence2"), loaded("blip")
    asked, default = florence.caption_inputs([florence.prepare(image, "<DETAILED_CAPTION>"), florence.prepare(image)])
    assert (asked.prompt, default.prompt) == ("<DETAILED_CAPTION>", "<CAPTION>")
    asked, default = blip.caption_inputs([blip.prepare(image, "a photo of"), blip.prepare(image)], GREEDY)
    assert (asked.prompt, default.prompt) == ("a photo of", None)  # BLIP's default: no prompt at all
    assert blip.default_prompt is None and florence.default_prompt == "<CAPTION>"


def test_blip_and_git_continue_their_prompt(loaded: Callable[[str], FamilyCaptioner]) -> None:
    blip, git = loaded("blip"), loaded("git")
    image = pictures(1)[0]
    start, words = blip.model.config.text_config.bos_token_id, blip.processor.tokenizer("a photo of")["input_ids"]
    ids = blip.prepare(image, "a photo of").features["input_ids"][0].tolist()
    assert ids[0] == start and ids[-1] == blip.model.config.text_config.sep_token_id  # generate() drops the [SEP]
    assert len(ids) == len(words)  # [bos] + the words + [sep], as [CLS] + words + [SEP]
    assert git.prepare(image).features["input_ids"][0].tolist() == [git.model.config.bos_token_id]


def test_an_input_prepared_by_another_family_is_prepared_again(loaded: Callable[[str], FamilyCaptioner]) -> None:
    blip, qwen = loaded("blip"), loaded("qwen2_vl")
    assert blip.preparation_key != qwen.preparation_key
    image = pictures(1)[0]
    foreign = blip.prepare(image)
    assert qwen.caption_inputs([foreign], GREEDY) == qwen.caption_inputs([qwen.prepare(image)], GREEDY)


def test_the_same_processor_files_share_preparations(tiny_family: Callable[[str], Path], tmp_path: Path) -> None:
    import shutil

    original = tiny_family("git")
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    (copy / "captionfleet.json").write_text('{"version": "git-v2"}')  # another version, same preprocessing
    first = load_checkpoint(original, device="cpu", precision="fp32")
    second = load_checkpoint(copy, device="cpu", precision="fp32")
    assert first.preparation_key == second.preparation_key and first.version != second.version


def test_a_model_type_that_is_not_image_to_text_is_refused(tmp_path: Path) -> None:
    from captionfleet.core.model_store import ModelRefError

    with pytest.raises(ModelRefError, match="gpt2 checkpoint, not an image-to-text model"):
        checkpoint_load.check_image_to_text(tmp_path, GPT2Config())


def test_caption_returns_texts_and_an_empty_list_for_no_images(loaded: Callable[[str], FamilyCaptioner]) -> None:
    model = loaded("llava")
    texts = model.caption(pictures(2), GREEDY)
    assert texts == [c.text for c in model.caption_inputs([model.prepare(i) for i in pictures(2)], GREEDY)]
    assert model.caption([]) == [] and model.caption_inputs([]) == []


def test_the_generic_precision_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu, torch.bfloat16) == "fp32"  # no measured agreement: nothing assumed
    assert resolve_precision("bf16", cpu, None) == "bf16"
    with pytest.raises(ValueError, match="fp16' is for CUDA"):
        resolve_precision("fp16", cpu, None)
    with pytest.raises(ValueError, match="vision-encoder-decoder models only"):
        resolve_precision("int8", cpu, None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", cuda, torch.bfloat16) == "bf16"  # trained in bf16: fp16 could overflow
    assert resolve_precision("auto", cuda, torch.float32) == "fp16"
    assert saved_dtype(GPT2Config(dtype="bfloat16")) == torch.bfloat16


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_decode_threads_prepare_at_once_as_one_thread_does(
    family: str, loaded: Callable[[str], FamilyCaptioner]
) -> None:
    model = loaded(family)
    images = pictures(8)
    prompts = [None, "a photo of", "what is it", None] * 2
    alone = [model.prepare(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(model.prepare, images, prompts))
    for one, other in zip(alone, together, strict=True):
        assert one.features.keys() == other.features.keys()
        assert all(torch.equal(one.features[name], other.features[name]) for name in one.features)
