"""The benchmarks' equal work per image: every row decodes exactly TOKENS tokens, whichever path it takes."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.workload import TOKENS, NoEndOfText, equal_work, gen_config, load_captioner, load_plain
from captionfleet.core.settings import DecodingSettings


def eager_to_end(model: torch.nn.Module, eos: int) -> None:
    """Make end-of-text the model's first choice at every step, so that only the bench's forcing keeps decoding."""

    def hook(module: torch.nn.Module, args: object, logits: torch.Tensor) -> torch.Tensor:
        logits[..., eos] += 1000.0
        return logits

    model.decoder.lm_head.register_forward_hook(hook)  # type: ignore[union-attr]


@pytest.mark.parametrize("beams", [1, 4])
def test_plain_generate_decodes_exactly_the_tokens_as_min_new_tokens_would(tiny_checkpoint: Path, beams: int) -> None:
    model = load_plain(tiny_checkpoint)
    eos = int(model.generation_config.eos_token_id)
    eager_to_end(model, eos)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.generate(
            pixel_values=pixels, generation_config=gen_config(beams, eos), logits_processor=equal_work(eos)
        )
        transformers_way = gen_config(beams, eos)
        transformers_way.min_new_tokens = TOKENS
        reference = model.generate(pixel_values=pixels, generation_config=transformers_way)
    assert ours.shape == (3, 1 + TOKENS)  # the start token and exactly TOKENS new ones, each row
    assert not (ours[:, 1:] == eos).any()
    assert torch.equal(ours, reference)  # the same work and the same result as transformers' min_new_tokens


@pytest.mark.parametrize("beams", [1, 4])
def test_the_captioner_rows_decode_exactly_the_tokens_on_both_paths(tiny_checkpoint: Path, beams: int) -> None:
    captioner = load_captioner(tiny_checkpoint, "fp32", beams)
    eager_to_end(captioner.model, int(captioner.generation_config(captioner.decoding).eos_token_id))
    lengths: list[int] = []
    generate = captioner.model.generate

    def counted(*args: object, **kwargs: object) -> object:
        output = generate(*args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        lengths.append(sequences.shape[1])
        return output

    captioner.model.generate = counted
    image = torch.zeros(2, 3, 32, 32)
    captioner.caption_pixels(image, DecodingSettings(num_beams=beams, max_new_tokens=TOKENS))
    captioner.caption_inputs([captioner.prepare(Image.new("RGB", (40, 30), (i * 60, 20, 200))) for i in range(2)])
    assert lengths == [1 + TOKENS, 1 + TOKENS]


def test_the_captioner_rows_force_in_place_first_and_never_through_min_new_tokens(tiny_checkpoint: Path) -> None:
    captioner = load_captioner(tiny_checkpoint, "fp32", 4)
    assert captioner.generation_config(captioner.decoding).min_new_tokens is None  # no score copies per step
    scores = torch.zeros(2, 10)
    assert NoEndOfText(3)(torch.zeros(2, 1, dtype=torch.long), scores) is scores  # in place
    assert scores[:, 3].eq(-float("inf")).all() and scores[:, :3].eq(0).all()
    seen: list[list[str]] = []
    generate = captioner.model.generate

    def spied(*args: object, **kwargs: object) -> object:
        seen.append([type(p).__name__ for p in kwargs.get("logits_processor") or []])  # type: ignore[attr-defined]
        return generate(*args, **kwargs)

    captioner.model.generate = spied
    captioner.caption_inputs([captioner.prepare(Image.new("RGB", (40, 30)))])
    captioner.caption_pixels(torch.zeros(1, 3, 32, 32))
    # The forcing before captionfleet's own processors (the confidence recorder last), as transformers put
    # min_new_tokens' before the caller's; caption_pixels passes none of its own.
    assert seen[0][0] == "NoEndOfText" and seen[0][-1] == "ChoiceRecorder", seen
    assert seen[1] == ["NoEndOfText"]
