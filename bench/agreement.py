"""Caption agreement of every CPU precision with fp32, on the built-in trained model.

    python -m bench.agreement [--pictures 400] [--precisions fp32,bf16,int8] [--out docs/agreement.json]

``--precisions fp32,int8`` leaves bf16 out, e.g. for a run with torch, oneDNN and MKL limited to AVX2
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``), where bf16 is emulated
and slow and int8 uses 7-bit weights, as on an AVX2-only CPU.

Random-weight models make near-ties, so agreement is judged on a trained model: the built-in shapes
model, on fresh pictures (seed 4242: neither its training, validation nor test seeds). For each
precision and decoding (4 beams, greedy) it prints the share of captions identical to fp32's, exact
match against the ground truth, and whether batching changes captions (batch of 32 vs one by one on
the first 40 pictures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import load_ved
from captionfleet.core.captioner import Captioner
from captionfleet.core.model_store import builtin_model_dir
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.shapes import ShapesDataset

PRECISIONS = ("fp32", "bf16", "int8")


def caption_all(captioner: Captioner, images: list[Image.Image], batch: int = 32) -> list[str]:
    out: list[str] = []
    for i in range(0, len(images), batch):
        out += captioner.caption(images[i : i + batch])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=400)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated; fp32 always runs first")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    precisions = ["fp32", *(p for p in args.precisions.split(",") if p and p != "fp32")]
    data = ShapesDataset(4242, args.pictures, 64)
    images = [data.image(i) for i in range(len(data))]
    truth = [data.captions(i)[0] for i in range(len(data))]
    rows = []
    for beams in (4, 1):
        decoding = DecodingSettings(num_beams=beams)
        reference: list[str] | None = None
        for precision in precisions:
            captioner = load_ved(builtin_model_dir(), device="cpu", decoding=decoding, precision=precision)
            batched = caption_all(captioner, images)
            reference = reference or batched  # fp32 comes first
            singles = [captioner.caption([image])[0] for image in images[:40]]
            same = sum(a == b for a, b in zip(batched, reference, strict=True))
            row = {
                "decoding": f"{beams} beams" if beams > 1 else "greedy",
                "precision": precision,
                "identical_to_fp32": round(same / len(images), 3),
                "exact_match": round(sum(a == t for a, t in zip(batched, truth, strict=True)) / len(images), 3),
                "batched_equals_one_by_one": f"{sum(a == b for a, b in zip(batched, singles, strict=False))}/40",
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"pictures": args.pictures, "seed": 4242, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
