"""The training loop, in one function with commented sections (after karpathy/nanoGPT's train.py).

    settings -> data -> model -> optimizer -> loop (lr schedule, accumulate, clip, step,
    validate + checkpoint) -> publish (save_pretrained + captionfleet.json, evaluated by the
    worker's own captioner).

One loop for every family it trains (vision-encoder-decoder, git, blip): a batch is the model's keyword
arguments, made by the family's rule (trainer/family_batches.py), and the loop only reads ``.loss``.

A run killed at any point continues from its last checkpoint when started again with the same
settings: same step, same optimizer state, same data order (batches are a pure function of the
seed and the step, see trainer.preprocess.batch_indices). Started again with other settings that
define the run (TrainerSettings.fingerprint), it refuses to resume rather than continue the old run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from captionfleet.core.captioner import pick_device
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.checkpoint import load_resume, publish, resume_model_dir, save_resume
from captionfleet.trainer.data import CaptionDataset, Splits, open_splits
from captionfleet.trainer.evaluate import Evaluation, evaluate_captioner, scoring_precision
from captionfleet.trainer.family_batches import FamilyBatches, ImageFit, image_fit
from captionfleet.trainer.model import ModelBundle, configure_model, count_parameters
from captionfleet.trainer.model_card import model_card as default_model_card
from captionfleet.trainer.preprocess import Batch, BatchMaker, batch_indices
from captionfleet.trainer.scratch import scratch_image_processor
from captionfleet.trainer.settings import TrainerSettings
from captionfleet.trainer.shapes import all_captions_sample

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path | None  # None when the run stopped early (stop_after_step) and published nothing
    step: int
    resumed_from: int | None
    info: dict[str, Any] = field(default_factory=dict)  # captionfleet.json as written
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per log/eval line
    wall_seconds: float = 0.0


def open_run_splits(settings: TrainerSettings, fit: ImageFit) -> Splits:
    """The run's train/validation splits, images sized once as the model's image processor sizes them."""
    return open_splits(
        settings.data,
        image_root=settings.image_root,
        size=fit.size,
        resample=fit.resample,
        keep_aspect=fit.keep_aspect,
        seed=settings.seed,
        val_fraction=settings.val_fraction,
        max_val_images=settings.max_val_images,
        shapes_train_size=settings.shapes_train_size,
        shapes_val_size=settings.shapes_val_size,
        s3=settings.s3,
        threads=settings.load_threads,
    )


def lr_at(step: int, settings: TrainerSettings) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at max_steps."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / (settings.warmup_steps + 1)
    span = max(1, settings.max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.min_lr + coeff * (settings.learning_rate - settings.min_lr)


def autocast_dtype(settings: TrainerSettings, device: torch.device) -> torch.dtype:
    if settings.dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda" and settings.dtype != "float32":
        raise ValueError(f"dtype {settings.dtype} needs a GPU; on CPU set TRAINER_DTYPE=float32 (or auto)")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]


def tokenizer_captions(splits: Splits, settings: TrainerSettings) -> list[str]:
    if settings.data == "shapes":
        return all_captions_sample(settings.seed, settings.tokenizer_captions)
    texts: list[str] = []
    for i in range(len(splits.train)):
        texts += splits.train.captions(i)
    return texts


def make_optimizer(model: torch.nn.Module, settings: TrainerSettings, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices only: decaying biases and LayerNorm gains only hurts (as in nanoGPT).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=settings.learning_rate,
        betas=(settings.beta1, settings.beta2),
        fused=device.type == "cuda",  # one kernel for all parameters on GPU
    )


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, ctx: Any) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with ctx:
            loss = model(**batch.to(device)).loss
        total += float(loss) * len(batch)
        count += len(batch)
    model.train()
    return total / max(1, count)


def quick_caption_eval(path: Path, dataset: CaptionDataset, settings: TrainerSettings) -> Evaluation | None:
    """Greedy captions for a few validation images, through the worker's captioner."""
    if settings.eval_caption_samples <= 0:
        return None
    decoding = DecodingSettings(num_beams=1, max_new_tokens=settings.decoding.max_new_tokens)
    precision = scoring_precision(settings.device)
    captioner = load_checkpoint(path, device=settings.device, precision=precision, decoding=decoding)
    return evaluate_captioner(captioner, dataset, limit=settings.eval_caption_samples)


LOG_FILE = "log.jsonl"


class Prefetcher:
    """Makes the batch for micro-step n + 1 while micro-step n trains."""

    def __init__(self, make: Callable[[int], Batch]) -> None:
        self._make = make
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._next: tuple[int, Future[Batch]] | None = None

    def take(self, micro_step: int) -> Batch:
        if self._next is not None and self._next[0] == micro_step:
            batch = self._next[1].result()
        else:
            batch = self._make(micro_step)
        self._next = (micro_step + 1, self._pool.submit(self._make, micro_step + 1))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def read_log(run_dir: Path, *, up_to_step: int) -> list[dict[str, Any]]:
    """The run's log up to a resumed checkpoint; later lines (after it, before the kill) are dropped
    from the file too, since those steps are about to be redone."""
    path = run_dir / LOG_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line torn by the kill
            entry = json.loads(line)
            if isinstance(entry, dict) and int(entry.get("step", 0)) <= up_to_step:
                entries.append(entry)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return entries


def train(
    settings: TrainerSettings,
    *,
    command: str = "",
    stop_after_step: int | None = None,
    model_card: Callable[[dict[str, Any]], str] = default_model_card,
) -> TrainResult:
    """Train (or resume) and publish to settings.out_dir. ``stop_after_step`` stops right after
    that step's checkpoint, publishing nothing: what a kill at that point leaves behind (tests)."""
    started = time.perf_counter()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars inside ours
    run_dir = settings.resolved_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    # -- system -------------------------------------------------------------------------------------
    device = pick_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    ptdtype = autocast_dtype(settings, device)
    ctx = (
        torch.autocast(device_type="cuda", dtype=ptdtype)
        if device.type == "cuda" and ptdtype != torch.float32
        else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores: same accuracy here
        torch.backends.cudnn.allow_tf32 = True

    # -- model (resumed, fine-tuned or new) and data --------------------------------------------------
    # Refused when the checkpoint's run had other run-defining settings (data, seed, batch size...):
    # continuing it would train on, or publish again, that run recorded with this one's settings.
    resume = load_resume(run_dir, fingerprint=settings.fingerprint()) if settings.resume else None
    bundle: ModelBundle
    if resume is not None:
        bundle = resume.bundle
        log.info("resuming from %s at step %d", resume.path, resume.step)
    elif settings.init_from:
        bundle = configure_model(settings, [])
    if resume is not None or settings.init_from:
        fit = image_fit(bundle.image_processor)
    else:  # from scratch: the image processor the new model will have (its tokenizer needs the data first)
        fit = image_fit(scratch_image_processor(settings.family, settings.scratch_sizes()))
    splits = open_run_splits(settings, fit)
    if resume is None and not settings.init_from:
        bundle = configure_model(settings, tokenizer_captions(splits, settings))
    if image_fit(bundle.image_processor) != fit:
        raise RuntimeError(f"model input is {image_fit(bundle.image_processor)} but data was prepared as {fit}")
    model = bundle.model.to(device)
    model.train()
    log.info("model: %s, %.2fM parameters, input %dx%d", bundle.family, count_parameters(model) / 1e6, *fit.size)

    encode = FamilyBatches(model, bundle.processor, bundle.tokenizer, max_caption_tokens=settings.max_caption_tokens)
    make_train = BatchMaker(splits.train, encode, settings.seed)
    make_val = BatchMaker(splits.val, encode, settings.seed)
    # Fixed validation batches: the same images every time, so losses compare across a run.
    val_n = len(splits.val)
    val_batches = [
        make_val([(k * settings.batch_size + j) % val_n for j in range(min(settings.batch_size, val_n))])
        for k in range(min(settings.eval_batches, max(1, val_n // settings.batch_size)))
    ]

    # -- optimizer, restored when resuming ------------------------------------------------------------
    optimizer = make_optimizer(model, settings, device)
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    step = 0
    history: list[dict[str, Any]] = []
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer_state)
        scaler.load_state_dict(resume.scaler_state)
        step = resume.step
        history = read_log(run_dir, up_to_step=step)
        resume.restore_rng()
    else:
        (run_dir / LOG_FILE).unlink(missing_ok=True)  # a fresh run starts a fresh log
    resumed_from = resume.step if resume is not None else None
    train_seconds = float(resume.extra.get("train_seconds", 0.0)) if resume is not None else 0.0

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        with (run_dir / LOG_FILE).open("a") as f:
            f.write(json.dumps(entry) + "\n")

    # Batches are made one ahead in a thread, overlapping image rendering/decoding with the
    # model's compute (which releases the GIL).
    def make_batch(micro_step: int) -> Batch:
        indices, epoch = batch_indices(len(splits.train), settings.batch_size, settings.seed, micro_step)
        return make_train(indices, epoch)

    prefetch = Prefetcher(make_batch)

    # -- the loop --------------------------------------------------------------------------------------
    samples_per_step = settings.batch_size * settings.grad_accum
    bar = tqdm(total=settings.max_steps, initial=step, disable=not settings.progress, dynamic_ncols=True, unit="step")
    window_start, window_samples, running_loss = time.perf_counter(), 0, None
    while step < settings.max_steps:
        t_step = time.perf_counter()
        lr = lr_at(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward/backward over grad_accum micro-batches; the loss is scaled so gradients average
        loss_sum = 0.0
        for micro in range(settings.grad_accum):
            batch = prefetch.take(step * settings.grad_accum + micro)
            with ctx:
                loss = model(**batch.to(device)).loss / settings.grad_accum
            scaler.scale(loss).backward()
            loss_sum += float(loss.detach())

        # clip, step, reset
        if settings.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_seconds += time.perf_counter() - t_step

        # progress: smoothed loss and throughput
        running_loss = loss_sum if running_loss is None else 0.9 * running_loss + 0.1 * loss_sum
        window_samples += samples_per_step
        elapsed = time.perf_counter() - window_start
        rate = window_samples / elapsed if elapsed > 0 else 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{running_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", refresh=False)
        if step % settings.log_interval == 0:
            record({"step": step, "loss": round(loss_sum, 5), "lr": lr, "samples_per_s": round(rate, 1)})
            log.info("step %d: loss %.4f lr %.2e %.0f samples/s", step, loss_sum, lr, rate)
            window_start, window_samples = time.perf_counter(), 0

        # validate and checkpoint
        if step % settings.eval_interval == 0 or step == settings.max_steps:
            val_loss = validation_loss(model, val_batches, device, ctx)
            save_resume(
                run_dir,
                bundle,
                step=step,
                optimizer=optimizer,
                scaler=scaler,
                extra={
                    "train_seconds": train_seconds,
                    "settings": settings.recorded(),
                    "fingerprint": settings.fingerprint(),
                },
            )
            entry: dict[str, Any] = {"step": step, "val_loss": round(val_loss, 5), "train_loss": round(loss_sum, 5)}
            quick = quick_caption_eval(resume_model_dir(run_dir), splits.val, settings)
            if quick is not None:
                entry["val_exact_match_greedy"] = round(quick.scores.exact_match, 4)
                entry["sample"] = quick.samples(1)[0][:2]
            record(entry)
            bar.write(json.dumps(entry))
            window_start, window_samples = time.perf_counter(), 0  # evaluation time is not training
            if stop_after_step is not None and step >= stop_after_step:
                bar.close()
                prefetch.close()
                return TrainResult(
                    None, step, resumed_from, history=history, wall_seconds=time.perf_counter() - started
                )
    bar.close()
    prefetch.close()

    # -- publish: save, evaluate exactly what the worker will load, swap into place --------------------
    def evaluate(path: Path) -> dict[str, Any]:
        precision = scoring_precision(settings.device)
        captioner = load_checkpoint(path, device=settings.device, precision=precision, decoding=settings.decoding)
        evaluation = evaluate_captioner(captioner, splits.val, limit=settings.max_val_images)
        log.info("final evaluation: %s", evaluation.scores.line())
        return {
            **evaluation.scores.as_dict(),
            "precision": str(getattr(captioner, "precision", precision)),  # resolved: fp32, bf16, fp16
            "split": "val",
            "decoding": settings.decoding.model_dump(),
            "samples": [list(s) for s in evaluation.samples(5)],
        }

    metadata = {
        "name": settings.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "parent": bundle.parent,
        "family": bundle.family,
        "steps": step,
        "resumed_from": resumed_from,
        "train_seconds": round(train_seconds, 1),
        "parameters": count_parameters(model),
        "host": {"device": str(device), "torch": torch.__version__, "python": platform.python_version()},
        "data": splits.describe(),
        "training": settings.recorded(),
        "history": history[-20:],
    }
    model.to("cpu")  # saved weights are float32 on CPU whatever trained them
    info = publish(settings.out_dir, bundle, metadata, evaluate=evaluate, model_card=model_card)
    return TrainResult(settings.out_dir, step, resumed_from, info, history, wall_seconds=time.perf_counter() - started)
