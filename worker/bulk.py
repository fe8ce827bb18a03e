"""The bulk path: caption every image under a folder into one results file, resumably."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.images import ImageLimits
from captionfleet.core.loading import load_model
from captionfleet.core.settings import WorkerSettings
from captionfleet.core.signals import stop_on_signals
from captionfleet.worker.bulk_api import BulkApi
from captionfleet.worker.connectors.local import describe_skipped, iter_folder
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline, refuse_prompt_it_cannot_take
from captionfleet.worker.sinks import open_file_sink

logger = logging.getLogger(__name__)


def load_captioner(settings: WorkerSettings) -> CaptionModel:
    """The job's model (a .../LATEST ref: the version it names now, kept to the end of the run), refused
    at once when the job's prompt (WORKER_BULK__PROMPT, --prompt) is one it cannot take: before any
    result is written or, with --overwrite, removed."""
    captioner = load_model(settings)
    refuse_prompt_it_cannot_take(captioner, settings.bulk.prompt)
    return captioner


@dataclass
class BulkSummary:
    total: int  # inputs found
    skipped: int  # already in the output from an earlier run
    done: int
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    model_version: str = ""
    interrupted: bool = False
    # Odd entries of the folder that are not inputs (an unreadable sub-folder, a link to outside it):
    # reason -> count, each also logged by path, so that nothing is dropped without a word.
    passed_over: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return sum(self.failed_by_kind.values())

    @property
    def images_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{kind}={n}" for kind, n in sorted(self.failed_by_kind.items())) or "none"
        lines = [
            f"inputs: {self.total}  already done: {self.skipped}  captioned: {self.done}  failed: {self.failed}",
            f"failures by kind: {kinds}",
        ]
        if self.passed_over:
            lines.append(f"skipped: {describe_skipped(self.passed_over)}; each is logged with its path")
        lines.append(
            f"speed: {self.images_per_second:.2f} images/s over {self.seconds:.1f}s (model {self.model_version})"
        )
        return lines


def run_caption_job(
    source: str,
    out: Path,
    settings: WorkerSettings,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    captioner: CaptionModel | None = None,
    api: BulkApi | None = None,
) -> BulkSummary:
    """Caption the images under ``source`` (a folder) into ``out`` (.parquet or .jsonl).

    Inputs that already have a row in ``out`` are skipped, so an interrupted run is resumed by
    running it again; ``overwrite`` starts over. ``api``: the caption API served while it runs.
    """
    api = api or BulkApi.off()
    if captioner is not None:
        refuse_prompt_it_cannot_take(captioner, settings.bulk.prompt)  # before --overwrite empties anything
    root = Path(source)
    own_files = frozenset({out.resolve(), out.with_name(out.name + ".parts").resolve()})
    # Listed (a bad source fails here) and, when starting over, the model loaded (a bad --model fails
    # here) before the sink opens: --overwrite must not empty the results of a run that cannot start.
    passed_over: Counter[str] = Counter()
    listing = iter_folder(root, exclude=own_files, max_bytes=settings.images.max_bytes, skipped=passed_over)
    items = [item for item in listing if not _inside(item.path, own_files)]
    if overwrite and items:
        captioner = captioner or load_captioner(settings)
    sink = open_file_sink(out, overwrite=overwrite)
    done = sink.done_ids()
    todo = [item for item in items if item.id not in done]
    summary = BulkSummary(total=len(items), skipped=len(items) - len(todo), done=0, passed_over=passed_over)
    if not todo:
        sink.close()
        return summary
    try:
        captioner = captioner or load_captioner(settings)
    except BaseException:
        sink.close()  # rows already there stay as they are
        raise
    summary.model_version = captioner.version
    progress = tqdm(total=len(todo), unit="img", disable=not show_progress, dynamic_ncols=True)

    def on_result(result: Result) -> None:
        progress.update(1)
        if not result.ok:
            progress.set_postfix(failed=pipeline.stats.failed, refresh=False)

    pipeline = CaptionPipeline(
        captioner,
        sink,
        settings.batch,
        ImageLimits.from_settings(settings.images),
        on_result=on_result,
        prompt=settings.bulk.prompt,
        **api.lane_options(),
    )
    # Until the results are closed, as a signal may come then.
    with stop_on_signals(api.on_signal(finish_on_signal(pipeline))):
        try:
            stats = pipeline.run(api.run_input(pipeline, todo))
        finally:
            progress.close()
            sink.close()
    summary.done = stats.done
    summary.failed_by_kind = stats.failed_by_kind
    summary.seconds = stats.seconds
    summary.interrupted = pipeline.stop_event.is_set()
    return summary


def _inside(path: Path, roots: frozenset[Path]) -> bool:
    # realpath, not Path.resolve(): an item may be a link loop named like an image (listed for its
    # failure row), and resolve() raises RuntimeError on a loop where realpath just stops.
    resolved = Path(os.path.realpath(path))
    return any(resolved.is_relative_to(root) for root in roots)


def finish_on_signal(pipeline: CaptionPipeline) -> Callable[[int], None]:
    """Ctrl-C / SIGTERM: stop reading input, finish what is in flight, write it, then exit
    (for :func:`captionfleet.core.signals.stop_on_signals`)."""

    def stop(signum: int) -> None:
        logger.warning("signal %d: finishing the images in flight, then stopping (run again to resume)", signum)
        pipeline.stop_event.set()

    return stop
