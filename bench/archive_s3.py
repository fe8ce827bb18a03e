"""Images/s end to end from WebDataset tar shards vs one object per image, both in the same S3 server, next
to the model alone, measured in the same run.

    python -m bench.archive_s3 --quick            # tiny model, 96 photos of 640x480: a minute or two on a small CPU
    python -m bench.archive_s3 --model full --images 512 --batch-size 32 --decode-threads 8   # on a GPU box

It starts its own SeaweedFS (tests/services/seaweedfs.py), stores the same photos both ways (objects under
``photos/``, and ``--per-shard`` of them per tar under ``shards/``) and, interleaved over ``--rounds``:

- model only: ``caption_inputs`` (the jobs' own model call, which records each caption's confidence) on
  batches decoded and prepared beforehand (the ceiling; until this session ``caption_pixels``, which records
  none, so the jobs paid ~1 ms per image more than the ceiling did);
- tar shards: the archive job (``run_archive_job``: list, stream each shard, decode, caption, write the
  shard's Parquet and marker), from the call to its return;
- objects: the S3 prefix job (``run_s3_caption_job``: list, one GET per image, decode, caption, write parts).

The target is tar shards at 0.95 of model only or better. On a CPU-only machine decoding competes with
the model for the same cores, so ``ratio_by_cpu_time`` (this process's CPU ms per image, model only over
end to end) is printed too: what the ratio would be if the model had the cores to itself.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bulk_s3 import build_checkpoint, emit, make_archive, model_only
from captionfleet.core.captioner import Captioner
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import BatchSettings, BulkS3Settings, DecodingSettings, S3Settings, WorkerSettings
from captionfleet.worker.bulk_archive import ArchiveOptions, run_archive_job
from captionfleet.worker.bulk_s3 import run_s3_caption_job
from tests.services.seaweedfs import SeaweedS3

BUCKET = "bench"


def shards_of(archive: dict[str, bytes], per_shard: int) -> dict[str, bytes]:
    """The photos as WebDataset shards: ``shards/00000.tar`` ... with ``<n>.jpg`` members."""
    names = sorted(archive)
    shards = {}
    for start in range(0, len(names), per_shard):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name in names[start : start + per_shard]:
                data = archive[name]
                info = tarfile.TarInfo(Path(name).stem + ".jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards[f"shards/{start // per_shard:05d}.tar"] = buf.getvalue()
    return shards


def timed(run: Callable[[], int], expected: int) -> tuple[float, float]:
    """(images/s from call to return, CPU ms per image) of one whole job."""
    start, cpu = time.perf_counter(), time.process_time()
    done = run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if done != expected:
        raise SystemExit(f"bench run incomplete: {done} of {expected} images captioned")
    return expected / wall, 1000 * cpu / expected


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 96 photos of 640x480")
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--images", type=int, help="photos (default 96 quick, 256 otherwise)")
    parser.add_argument("--size", help="photo size WxH (default 640x480 quick, 1600x1200 otherwise)")
    parser.add_argument("--per-shard", type=int, default=32, help="photos per tar shard (default 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--decode-threads", type=int, default=BatchSettings().decode_threads)
    parser.add_argument("--fetch-concurrency", type=int, default=BulkS3Settings().fetch_concurrency)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    count = args.images or (96 if args.quick else 256)
    width, height = (int(v) for v in (args.size or ("640x480" if args.quick else "1600x1200")).lower().split("x"))
    logging.basicConfig(level=logging.WARNING)
    emit(
        bench="archive_s3",
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        images=count,
        size=f"{width}x{height}",
        per_shard=args.per_shard,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
    )
    archive = make_archive(count, (width, height))
    shards = shards_of(archive, args.per_shard)
    with SeaweedS3() as server, tempfile.TemporaryDirectory() as tmp:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        with ThreadPoolExecutor(8) as pool:
            objects = {**archive, **shards}
            list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), objects.items()))
        settings = WorkerSettings(
            s3=S3Settings(
                endpoint_url=server.endpoint_url,
                access_key_id=SecretStr(server.access_key),
                secret_access_key=SecretStr(server.secret_key),
            ),
            batch=BatchSettings(
                max_items=args.batch_size, prefetch=max(32, 4 * args.batch_size), decode_threads=args.decode_threads
            ),
            bulk=BulkS3Settings(fetch_concurrency=args.fetch_concurrency),
        )
        decoding = DecodingSettings(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        path = build_checkpoint(args.model, Path(tmp) / args.model)
        captioner = load_checkpoint(path, device=args.device, precision="auto", decoding=decoding)
        assert isinstance(captioner, Captioner), "the bench's checkpoints are ViT-GPT2 ones"
        measure(captioner, archive, settings, count, len(shards), args)
    return 0


def measure(
    captioner: Captioner,
    archive: dict[str, bytes],
    settings: WorkerSettings,
    count: int,
    shard_count: int,
    args: argparse.Namespace,
) -> None:
    source = f"s3://{BUCKET}/shards/{{00000..{shard_count - 1:05d}}}.tar"

    def tar_job(out: str) -> int:
        options = ArchiveOptions(input_format="tar")
        summary = run_archive_job(source, out, settings, options=options, captioner=captioner, show_progress=False)
        return summary.done

    def object_job(out: str) -> int:
        summary = run_s3_caption_job(f"s3://{BUCKET}/photos/", out, settings, captioner=captioner, show_progress=False)
        return summary.done

    model_only(captioner, archive, args.batch_size)  # warm-up, untimed
    tar_job(f"s3://{BUCKET}/out/warm-tar/")
    object_job(f"s3://{BUCKET}/out/warm-objects/")
    rates: dict[str, list[float]] = {"model_only": [], "tar_shards": [], "objects": []}
    cpu_ms: dict[str, list[float]] = {name: [] for name in rates}
    for r in range(args.rounds):
        measured = {
            "model_only": model_only(captioner, archive, args.batch_size),
            "tar_shards": timed(partial(tar_job, f"s3://{BUCKET}/out/tar-{r}/"), count),
            "objects": timed(partial(object_job, f"s3://{BUCKET}/out/objects-{r}/"), count),
        }
        for name, (rate, ms) in measured.items():
            rates[name].append(rate)
            cpu_ms[name].append(ms)
        emit(round=r, images_per_s={name: round(v[-1], 2) for name, v in rates.items()})
    best = {name: max(values) for name, values in rates.items()}
    median = {name: float(np.median(values)) for name, values in rates.items()}
    cpu = {name: float(np.median(values)) for name, values in cpu_ms.items()}
    emit(
        model=args.model,
        device=str(captioner.device),
        images_per_s_best={name: round(v, 2) for name, v in best.items()},
        images_per_s_median={name: round(v, 2) for name, v in median.items()},
        cpu_ms_per_image_median={name: round(v, 1) for name, v in cpu.items()},
        ratio_tar_to_model_only_median=round(median["tar_shards"] / median["model_only"], 3),
        ratio_objects_to_model_only_median=round(median["objects"] / median["model_only"], 3),
        ratio_tar_to_model_only_best=round(best["tar_shards"] / best["model_only"], 3),
        ratio_tar_by_cpu_time=round(cpu["model_only"] / cpu["tar_shards"], 3),
        ratio_objects_by_cpu_time=round(cpu["model_only"] / cpu["objects"], 3),
        target_tar_at_least=0.95,
    )


if __name__ == "__main__":
    sys.exit(main())
