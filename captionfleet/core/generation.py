"""generate() -> captions with a confidence: only the generated tokens, and how sure the model was of them.

Every family's ``caption_inputs`` ends here. ``generate`` returns the prompt and the new tokens
together (for decoder-only families the prompt is the chat scaffolding, the image tokens' text and the
user's words), so a caption is decoded from the generated part alone: the last ``steps`` columns, where
``steps`` is how many times the decoder chose a token. That count comes from the ``ChoiceRecorder``,
which also gives the confidence.

Confidence (``Caption.mean_logprob``): the mean log-probability of the caption's tokens, its end token
included (stopping is a choice of the model too), each under the distribution the search chose it from:
the model's, after the repetition rules (no_repeat_ngram_size, repetition_penalty), renormalised. With
greedy decoding that is exactly the chosen token's probability at its step; with beam search it is the
same quantity along the returned beam (its tokens were chosen from their parent beams' distributions),
which is the per-token sequence score without the length penalty.

Why a recorder rather than ``output_scores=True`` + ``compute_transition_scores``: those keep every
step's whole distribution (batch x beams x vocabulary floats per step: 128 MB for a batch of 8 with 4
beams over GPT-2's 50,257 tokens and 20 steps); the recorder keeps the few best tokens per row and step,
which is all the lookup needs (a beam's next token is always among its parent's ``beams_to_keep`` best).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor


@dataclass(frozen=True)
class Caption:
    """One image's caption. ``text`` is empty when the model generated nothing but special tokens or
    whitespace (the pipeline makes that a failure row, not a result). ``tokens``: the caption's generated
    tokens, the end token not counted; ``mean_logprob``: see the module's docstring (None when no token
    was scored, e.g. ``max_new_tokens=0``). ``prompt``: the prompt the model was given for it, the
    request's or its family's default (None: none, as for ViT-GPT2), set by the model that captioned it,
    so that a result names the prompt that produced its caption even across a hot swap."""

    text: str
    mean_logprob: float | None
    tokens: int
    prompt: str | None = None


class ChoiceRecorder(LogitsProcessor):
    """Appended last to generate()'s logits processors: records, per step and row, the ``keep`` best
    tokens and their log-probabilities under the final distribution. It changes nothing."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.values: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # The best tokens' log-probabilities without a log-softmax of the whole vocabulary: their scores
        # minus the log of the normaliser (one reduction instead of a second vocabulary-sized tensor).
        with torch.no_grad():
            if self.keep == 1:
                # Greedy search takes the first of the best tokens (torch.argmax): max() gives that one and its
                # score in one pass, half the CPU of topk(2) over GPT-2's 50,257 tokens at every step.
                values, indices = scores.max(dim=-1, keepdim=True)
            else:
                values, indices = scores.topk(min(self.keep, scores.shape[-1]), dim=-1)
            self.values.append(values.float() - scores.float().logsumexp(dim=-1, keepdim=True))
            self.indices.append(indices)
        return scores

    @property
    def steps(self) -> int:
        return len(self.values)


def recorder_for(num_beams: int, eos_ids: Collection[int]) -> ChoiceRecorder:
    """A recorder that keeps enough: greedy picks the best token; beam search keeps, per parent beam, at
    most ``max(2, 1 + eos count) * num_beams`` candidates (transformers' ``beams_to_keep``)."""
    if num_beams <= 1:
        # The token greedy search picks, ties included: both it (torch.argmax) and max() take the first best one.
        return ChoiceRecorder(keep=1)
    return ChoiceRecorder(keep=max(2, 1 + len(eos_ids)) * num_beams)


def captions_from_output(
    output: Any, recorder: ChoiceRecorder, tokenizer: Any, eos_ids: Collection[int], rows: int
) -> list[Caption]:
    """The generated part of each of ``rows`` sequences, decoded, with its confidence. ``output``: what
    generate() returned with ``return_dict_in_generate=True`` and the recorder among its processors."""
    sequences: torch.Tensor = output.sequences
    beam_indices: torch.Tensor | None = getattr(output, "beam_indices", None)
    if sequences.shape[0] != rows:  # never misattribute captions to images
        raise RuntimeError(f"model returned {sequences.shape[0]} sequences for {rows} images")
    if beam_indices is not None:
        steps = beam_indices.shape[1]
        parents = beam_indices.long().cpu()
        lengths = (parents >= 0).sum(dim=1).tolist()
    else:
        steps = recorder.steps
        parents = torch.arange(rows).unsqueeze(1).expand(rows, steps)
        lengths = [steps] * rows
    generated = sequences[:, sequences.shape[1] - steps :].cpu() if steps else sequences[:, :0].cpu()
    eos = set(eos_ids)
    captions = []
    for row in range(rows):
        tokens = generated[row, : lengths[row]].tolist()
        end = next((i for i, token in enumerate(tokens) if token in eos), None)
        scored = tokens if end is None else tokens[: end + 1]
        logprobs = [_logprob(recorder, step, int(parents[row, step]), token) for step, token in enumerate(scored)]
        known = [value for value in logprobs if value is not None]
        captions.append(
            Caption(
                text=tokenizer.decode(scored, skip_special_tokens=True).strip(),
                # Any token not found (cannot happen with keep >= beams_to_keep): no number rather than a wrong one.
                mean_logprob=sum(known) / len(known) if known and len(known) == len(logprobs) else None,
                tokens=len(scored) - (end is not None),
            )
        )
    return captions


def _logprob(recorder: ChoiceRecorder, step: int, parent: int, token: int) -> float | None:
    if parent < 0 or step >= recorder.steps:
        return None
    found = (recorder.indices[step][parent] == token).nonzero()
    if found.numel() == 0:
        return None
    value = float(recorder.values[step][parent, int(found[0, 0])])
    return value if math.isfinite(value) else None
