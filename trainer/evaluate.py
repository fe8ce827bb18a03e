"""Caption quality: BLEU-4, CIDEr, exact match and repetition rate, on what the worker produces.

Captions are made by the worker's own ``Captioner`` (same preprocessing, same decoding), so the
scores describe the worker's output, not a training-time shortcut; at ``scoring_precision``: fp32 on a CPU
(a worker there may serve bf16 or int8, whose captions agree with fp32's on ~99% of pictures:
docs/benchmarks.md), so that a score does not depend on the CPU that computed it.

BLEU-4 and CIDEr come from pycocoevalcap (the COCO caption evaluation code; its "Cider" is
CIDEr-D, on a 0..10 scale). Its PTB tokenizer needs Java, so captions are tokenized here instead:
lower case, punctuation dropped, split on white space. The same rule decides exact match.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from captionfleet.core.captioner import Captioner, CaptionModel, pick_device
from captionfleet.core.fastpath import Precision
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.data import CaptionDataset

_PUNCT = re.compile(r"[^\w\s']+")


def tokenize(text: str) -> list[str]:
    # Apostrophes stay inside words ("dog's"), but quotes around one ('red') go, as in the COCO
    # toolkit's PTB tokenizer: quoting habits must not decide a match.
    return [token for token in (t.strip("'") for t in _PUNCT.sub(" ", text.lower()).split()) if token]


def normalize(text: str) -> str:
    return " ".join(tokenize(text))


def is_repetitive(caption: str) -> bool:
    """Does the caption repeat a phrase, the way a decoder stuck in a loop does?

    True when some phrase is immediately repeated ("a dog a dog", "the the") or a three-word phrase
    occurs three times. Compositional captions legitimately reuse words ("a red circle above a
    blue square"), so plain word counts would not do.
    """
    words = tokenize(caption)
    for n in range(1, len(words) // 2 + 1):
        for i in range(len(words) - 2 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n]:
                return True
    trigrams = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
    return any(count >= 3 for count in trigrams.values())


@dataclass
class Scores:
    images: int
    bleu4: float  # corpus BLEU-4, 0..1
    cider: float  # CIDEr-D, 0..10
    exact_match: float  # share of captions equal (after normalize) to one of their references
    repetition_rate: float  # share of captions that repeat a phrase (see is_repetitive)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"exact match {self.exact_match:.1%}  BLEU-4 {self.bleu4:.3f}  CIDEr {self.cider:.3f}  "
            f"repetition {self.repetition_rate:.1%}  ({self.images} images)"
        )


def _coco_scorers() -> tuple[Any, Any]:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as error:
        raise ImportError(
            "BLEU and CIDEr need pycocoevalcap, a dependency of captionfleet: pip install pycocoevalcap"
        ) from error
    return Bleu(4), Cider()


def score_captions(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> Scores:
    """Score captions against their references (one list of one or more references per caption)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} captions but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("nothing to score: no captions")
    if any(not refs for refs in references):
        raise ValueError("every caption needs at least one reference")
    res = {i: [normalize(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
    bleu, cider = _coco_scorers()
    bleu_scores, _ = bleu.compute_score(gts, res, verbose=0)
    cider_score, _ = cider.compute_score(gts, res)
    exact = sum(res[i][0] in gts[i] for i in res)
    repeated = sum(is_repetitive(h) for h in hypotheses)
    n = len(hypotheses)
    return Scores(
        images=n,
        bleu4=float(bleu_scores[3]),
        cider=float(cider_score),
        exact_match=exact / n,
        repetition_rate=repeated / n,
    )


@dataclass
class Evaluation:
    scores: Scores
    captions: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)

    def samples(self, count: int = 10) -> list[tuple[str, str, bool]]:
        """(caption, first reference, exact?) for the first ``count`` images."""
        return [
            (c, r[0], normalize(c) in {normalize(x) for x in r})
            for c, r in list(zip(self.captions, self.references, strict=True))[:count]
        ]


def evaluate_captioner(
    captioner: CaptionModel,
    dataset: CaptionDataset,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    decoding: DecodingSettings | None = None,
) -> Evaluation:
    """Caption the first ``limit`` images of ``dataset`` with the worker's captioner and score them."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    captions: list[str] = []
    references: list[list[str]] = []
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        captions += captioner.caption([dataset.image(i) for i in indices], decoding)
        references += [dataset.captions(i) for i in indices]
    return Evaluation(score_captions(captions, references), captions, references)


def scoring_precision(device: str) -> Precision:
    """The precision a model is scored at: fp32 on a CPU whatever its kind ("auto" there is bf16, int8 or
    fp32 by the CPU's instructions, and a score, or a gate's verdict, must not depend on which machine
    computed it); the device's own ("auto": fp16 or bf16) on a GPU, where fp32 would double a large
    model's memory."""
    return "fp32" if pick_device(device).type == "cpu" else "auto"


def evaluate_dir(
    path: Path,
    dataset: CaptionDataset,
    *,
    device: str = "auto",
    decoding: DecodingSettings | None = None,
    limit: int | None = None,
    batch_size: int = 32,
) -> Evaluation:
    """Load a checkpoint as the worker does (at the scoring precision), then evaluate it."""
    precision = scoring_precision(device)
    captioner = load_checkpoint(path, device=device, precision=precision, decoding=decoding or DecodingSettings())
    return evaluate_captioner(captioner, dataset, limit=limit, batch_size=batch_size)


def main(argv: list[str] | None = None) -> int:
    """``python -m captionfleet.trainer.evaluate MODEL_REF``: score a model on fresh shapes (or a data file)."""
    import argparse

    from captionfleet.core.model_store import resolve_model_ref
    from captionfleet.core.settings import ModelSettings
    from captionfleet.trainer.data import ShapesDataset, Skipped, open_files
    from captionfleet.trainer.family_batches import ImageFit, checkpoint_fit

    parser = argparse.ArgumentParser(prog="python -m captionfleet.trainer.evaluate", description=main.__doc__)
    parser.add_argument("model", help="model ref: directory, s3://, hub id or builtin")
    parser.add_argument("--data", default="shapes", help="shapes, a .jsonl/.csv manifest or COCO .json")
    parser.add_argument("--image-root", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=2024, help="shapes: the seed to draw pictures from")
    parser.add_argument("--limit", type=int, default=500, help="images to caption")
    parser.add_argument("--num-beams", type=int, default=None, help="default: the worker's")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--samples", type=int, default=10, help="captions to print next to the truth")
    args = parser.parse_args(argv)

    path = resolve_model_ref(args.model, cache_dir=ModelSettings().cache_dir)
    decoding = DecodingSettings() if args.num_beams is None else DecodingSettings(num_beams=args.num_beams)
    captioner = load_checkpoint(path, device=args.device, precision=scoring_precision(args.device), decoding=decoding)
    # The pictures are drawn (shapes) or sized (files) as the model's image processor sizes them.
    if isinstance(captioner, Captioner):
        fit = ImageFit(captioner.image_size, captioner.preprocess.resample)
    else:
        fit = checkpoint_fit(path)
    dataset: CaptionDataset
    if args.data == "shapes":
        dataset = ShapesDataset(args.seed, args.limit, fit.size[0])
    else:
        dataset = open_files(
            args.data,
            image_root=args.image_root,
            size=fit.size,
            resample=fit.resample,
            skipped=Skipped(),
            keep_aspect=fit.keep_aspect,
        )
    evaluation = evaluate_captioner(captioner, dataset, limit=args.limit)
    for caption, truth, ok in evaluation.samples(args.samples):
        print(f"{'ok ' if ok else 'BAD'}  {caption!r:70}  truth: {truth!r}")
    print(f"{captioner.version}: {evaluation.scores.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
