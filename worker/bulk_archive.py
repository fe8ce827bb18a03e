"""The archive job: caption archives as they are stored (WebDataset tar shards, manifests of uris, images
inside Parquet) and write the captions beside them, one output per input file.

    captionfleet caption 's3://bucket/shards/{00000..09999}.tar' --out s3://bucket/captions/ --shard 3/16

The unit of work is the input file: ``--shard i/N`` (or an Indexed Job's index) keeps the files whose name
hashes to shard i, so N workers split an archive with no coordinator. Planning is one listing of the
source and one of the output, however many files there are. A finished file has its outputs and a
completion marker (worker/archive_files.py names them) and is skipped by a later run; a file a run was
killed in resumes per key from its checkpoint parts; ``retry_failed`` re-runs failure rows (and resumes per
key too when killed: the rows it keeps are its first checkpoint).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.failures import FAILURE_KINDS
from captionfleet.core.family import takes_prompt
from captionfleet.core.images import ImageLimits
from captionfleet.core.s3 import (
    ObjectStore,
    RetryPolicy,
    access_error,
    as_object_store,
    make_s3_client,
    parse_s3_uri,
)
from captionfleet.core.settings import WorkerSettings
from captionfleet.core.signals import stop_on_signals
from captionfleet.worker.archive_files import (
    ArchiveItem,
    FileRun,
    is_checkpoint_of,
    is_output_of,
    marker_name,
    name_clashes,
    read_checkpoints,
    read_marker,
    stem_of,
    write_marker,
)
from captionfleet.worker.archive_progress import ArchiveProgress, ProgressBar
from captionfleet.worker.archive_tables import TableRows
from captionfleet.worker.archive_tar import TarShards
from captionfleet.worker.bulk import BulkSummary, finish_on_signal, load_captioner
from captionfleet.worker.bulk_api import BulkApi
from captionfleet.worker.connectors.archive_inputs import (
    InputError,
    InputFile,
    InputReader,
    InputReadError,
    resolve_local,
    resolve_s3,
    unsafe_name,
)
from captionfleet.worker.connectors.archive_outputs import LocalOutputs, Outputs, S3Outputs
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline, Item
from captionfleet.worker.sharding import ShardSpec

logger = logging.getLogger(__name__)

# "parquet": a .parquet file is a dataset with images inside or a manifest of uris, as its columns say.
ARCHIVE_FORMATS = ("tar", "manifest", "parquet-images", "parquet")
OUT_FORMATS = ("parquet", "webdataset")
_SUFFIXES = {
    "tar": (".tar", ".tar.gz", ".tgz"),
    "manifest": (".parquet", ".csv", ".jsonl", ".ndjson"),
    "parquet-images": (".parquet",),
    "parquet": (".parquet",),
}


_NAMES = {
    ".tar": "tar",
    ".tgz": "tar",
    ".tar.gz": "tar",
    ".csv": "manifest",
    ".jsonl": "manifest",
    ".ndjson": "manifest",
    ".parquet": "parquet",  # images inside, or a manifest of uris: the file's columns say which
}


def input_format_from_name(source: str) -> str | None:
    """The archive kind a source's name says (a brace range's pattern counts), else None."""
    lower = source.lower().rstrip("/")
    for suffix, kind in _NAMES.items():
        if lower.endswith(suffix):
            return kind
    return None


class ArchiveJobError(Exception):
    """The job cannot start (no inputs, a bad option); the message names the fix."""


@dataclass(frozen=True)
class ArchiveOptions:
    input_format: str = "auto"  # one of ARCHIVE_FORMATS, or "auto": from the source's name
    out_format: str = "parquet"  # "webdataset": tar inputs also get new shards with the captions inside
    shard: ShardSpec = field(default_factory=ShardSpec)
    retry_failed: frozenset[str] | None = None  # as for the S3 job: None = failure rows count as done
    any_model_version: bool = False
    overwrite: bool = False
    uri_column: str | None = None  # manifests: default "url", then "uri"
    image_column: str = "image"  # images inside Parquet
    prompt_column: str | None = None  # tables: per-row prompts; default "prompt" when there is one


@dataclass
class ArchiveSummary(BulkSummary):
    shard: str = "0/1"
    files_listed: int = 0  # input files in the source (every shard's)
    files_in_shard: int = 0
    files_done_before: int = 0  # complete before this run
    files_finished: int = 0  # completed by this run
    unfinished: list[str] = field(default_factory=list)  # files this run could not read to their end
    broken: list[str] = field(default_factory=list)  # "uri: why" of files that end early or are not archives
    refused: list[str] = field(default_factory=list)  # "uri: why" of files not read at all (an unsafe name)
    retried: int = 0  # failure rows re-run by retry_failed
    output: str = ""

    @property
    def complete(self) -> bool:
        return not self.interrupted and not self.unfinished

    @property
    def files_failed(self) -> bool:
        """Input files that ended early or were refused: the run finished, but not everything was read (exit 3)."""
        return bool(self.broken or self.refused)

    def lines(self) -> list[str]:
        lines = super().lines()
        lines.insert(
            0,
            f"shard {self.shard}: {self.files_listed} input files listed, {self.files_in_shard} in this shard, "
            f"{self.files_done_before} done before, {self.files_finished} finished now",
        )
        if self.retried:
            lines.append(f"failures retried: {self.retried}")
        for broken in self.broken:
            lines.append(f"broken input (rows written for what could be read): {broken}")
        for refused in self.refused:
            lines.append(f"refused input (nothing written for it): {refused}")
        for uri in self.unfinished:
            lines.append(f"unfinished (the store failed; run again to resume): {uri}")
        lines.append(f"output: {self.output}")
        return lines


class InputFormat(Protocol):
    """One kind of input file: its items (skipping those the run already has rows for) and its outputs."""

    name: str

    def items(self, run: FileRun) -> Iterator[ArchiveItem]: ...
    def write_outputs(self, run: FileRun, workdir: Path) -> list[str]: ...
    def final_rows(self, run: FileRun) -> list[dict[str, Any]]: ...


def suffixes_for(input_format: str) -> tuple[str, ...]:
    return _SUFFIXES[input_format]


# -- planning ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    settings: WorkerSettings
    options: ArchiveOptions
    client: ObjectStore | None
    retry: RetryPolicy
    inputs: list[InputFile]
    mine: list[InputFile]
    outputs: Outputs
    existing: set[str]  # every name under the output, listed once
    refused: list[str] = field(default_factory=list)  # "uri: why" of this shard's inputs whose names cannot be used


def _client(settings: WorkerSettings) -> ObjectStore:
    bulk = settings.bulk
    return as_object_store(
        make_s3_client(
            settings.s3,
            connect_timeout=bulk.connect_timeout_s,
            read_timeout=bulk.read_timeout_s,
            max_attempts=1,  # RetryPolicy retries, with one backoff for every call
            max_pool_connections=bulk.fetch_concurrency + 8,
        )
    )


def plan_archive_job(
    source: str, out: str, settings: WorkerSettings, options: ArchiveOptions, client: ObjectStore | None = None
) -> _Plan:
    """Resolve the input files (one listing), keep this shard's, and list the output once."""
    if options.input_format == "auto":
        named = input_format_from_name(source)
        if named is None:
            raise ArchiveJobError(f"{source}: say what it holds with --input-format ({', '.join(ARCHIVE_FORMATS)})")
        options = replace(options, input_format=named)
    if options.input_format not in ARCHIVE_FORMATS:
        raise ArchiveJobError(f"--input-format {options.input_format}: use one of {', '.join(ARCHIVE_FORMATS)}")
    if options.out_format not in OUT_FORMATS:
        raise ArchiveJobError(f"--out-format {options.out_format}: use one of {', '.join(OUT_FORMATS)}")
    if options.out_format == "webdataset" and options.input_format != "tar":
        raise ArchiveJobError("--out-format webdataset writes tar shards for tar inputs only: use parquet")
    if options.retry_failed:
        unknown = sorted(options.retry_failed - FAILURE_KINDS)
        if unknown:
            raise ArchiveJobError(
                f"--retry-failed: unknown failure kind(s) {', '.join(unknown)}; "
                f"use some of {', '.join(sorted(FAILURE_KINDS))}"
            )
    bulk = settings.bulk
    retry = RetryPolicy(attempts=bulk.retry_attempts, base_s=bulk.retry_base_s, max_s=bulk.retry_max_s)
    if client is None and (source.startswith("s3://") or out.startswith("s3://")):
        client = _client(settings)
    suffixes = suffixes_for(options.input_format)
    out_folder = out if out.endswith("/") else out + "/"
    try:
        if out.startswith("s3://"):
            parse_s3_uri(out_folder)  # a bad --out is refused before anything is listed
        if source.startswith("s3://"):
            assert client is not None
            exclude = None
            if out.startswith("s3://"):  # our own outputs under the source prefix are not inputs
                out_bucket, out_key = parse_s3_uri(out_folder)
                exclude = out_key if out_bucket == parse_s3_uri(source)[0] else None
            inputs = resolve_s3(source, suffixes, client, retry, exclude=exclude)
        else:  # a local --out inside the source folder: its outputs (webdataset shards) are not inputs
            inputs = resolve_local(source, suffixes, exclude=None if out.startswith("s3://") else Path(out))
    except (InputError, ValueError) as error:  # ValueError: an s3:// uri that is not one (parse_s3_uri)
        raise ArchiveJobError(str(error)) from error
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "list", source, settings.s3.endpoint_url) from error
    # A name that would put outputs outside --out (an S3 key with '..') is this one file's failure, reported
    # by the shard it hashes to: one hostile key must not fail every index of the Job.
    refused: list[str] = []
    usable: list[InputFile] = []
    clashes = name_clashes([inp.name for inp in inputs])
    for inp in inputs:
        why = unsafe_name(inp.name) or clashes.get(inp.name)
        if why is None:
            usable.append(inp)
        elif options.shard.owns(inp.name):
            refused.append(f"{inp.uri}: {why}; rename it")
    inputs = usable
    _refuse_output_among_inputs(out_folder, inputs, options)
    outputs: Outputs
    if out.startswith("s3://"):
        assert client is not None
        outputs = S3Outputs(client, out_folder, retry)
    else:
        outputs = LocalOutputs(Path(out))
    try:
        existing = outputs.names()
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "list the output folder", outputs.uri(), settings.s3.endpoint_url) from error
    mine = [inp for inp in inputs if options.shard.owns(inp.name)]
    return _Plan(settings, options, client, retry, inputs, mine, outputs, existing, refused)


def _refuse_output_among_inputs(out_folder: str, inputs: list[InputFile], options: ArchiveOptions) -> None:
    """Outputs are named like the inputs (00001.tar -> 00001.parquet, and 00001.tar again for webdataset):
    written into the inputs' own folder they could replace them."""
    if options.out_format != "webdataset" and options.input_format == "tar":
        return
    for inp in inputs:
        folder = inp.uri[: len(inp.uri) - len(inp.name)]
        same = folder.rstrip("/") == out_folder.rstrip("/")
        if not out_folder.startswith("s3://"):
            same = Path(folder or ".").resolve() == Path(out_folder).resolve()
        if same:
            raise ArchiveJobError(
                f"--out {out_folder} is the folder of the inputs ({inp.uri}): its outputs would replace them; "
                "pick another --out"
            )


# -- the run ----------------------------------------------------------------------------------------------


class _CheckpointSink:
    """The pipeline's sink: rows reach their file through ``on_item_result`` (which knows the file); a
    flush writes every open file's new rows as checkpoint parts."""

    def __init__(self) -> None:
        self.open: set[FileRun] = set()
        self._lock = threading.Lock()

    def done_ids(self) -> set[str]:
        return set()

    def write(self, results: list[Result]) -> None:
        pass

    def flush(self) -> None:
        with self._lock:
            runs = list(self.open)
        for run in runs:
            run.flush()

    def close(self) -> None:
        self.flush()


class _ArchiveRun:
    """One run of the job over this shard's files: the source side (files -> items), the finishing side
    (outputs, markers) in a thread of its own so that writing a shard never stalls the model."""

    def __init__(
        self,
        plan: _Plan,
        captioner: CaptionModel,
        formats: Callable[[InputFile], InputFormat],
        workdir: Path,
        progress: ArchiveProgress,
        summary: ArchiveSummary,
        run_id: str,
    ) -> None:
        self.plan = plan
        self.captioner = captioner
        self.formats = formats
        self.workdir = workdir
        self.progress = progress
        self.summary = summary
        self.run_id = run_id
        self.sink = _CheckpointSink()
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="finish")
        self.finishing: list[Future[None]] = []
        self.stop = threading.Event()

    # -- source side ---------------------------------------------------------------------------------

    def items(self) -> Iterator[ArchiveItem]:
        for inp in self.plan.mine:
            if self.stop.is_set():
                return
            run = FileRun(
                inp,
                self.plan.outputs,
                run_id=self.run_id,
                rows_per_part=self.plan.settings.bulk.rows_per_part,
                on_finished=self._finished,
                spill_dir=self.workdir,
            )
            fmt = self.formats(inp)
            if self._already_done(run, fmt):
                self.summary.files_done_before += 1
                self.progress.file_done(inp.size, before_this_run=True)
                continue
            self.summary.skipped += run.resumed
            self.sink.open.add(run)
            try:
                yield from fmt.items(run)
            except InputReadError as error:
                # The rows of what was read still come and stay open for checkpoints: a rerun resumes there.
                logger.error("%s", error)
                self.summary.unfinished.append(inp.uri)

    def _already_done(self, run: FileRun, fmt: InputFormat) -> bool:
        """Whether the file is complete for this run; otherwise ``run`` is given the rows it keeps."""
        options, existing = self.plan.options, self.plan.existing
        version = self.captioner.version
        if marker_name(run.stem) in existing:
            marker = read_marker(run.outputs, run.stem)
            usable = (
                marker is not None
                and marker.get("source_etag") == run.inp.etag
                and (options.any_model_version or marker.get("model_version") == version)
            )
            if usable and marker is not None:
                if not _retries(options.retry_failed, dict(marker.get("failed_by_kind") or {})):
                    self.summary.skipped += int(marker.get("rows") or 0)  # its rows count as already done
                    # Parts a run killed after the marker was written (or a retry killed before removing it)
                    # left: the marker's outputs hold their rows, and only a later retry would remove them.
                    for name in self._checkpoints_of(run):
                        run.outputs.delete(name)
                    return True
                # Only an output the marker lists holds this version's rows: a table that broke off lists none,
                # and an output of an older version of the file may still be there (read, its rows would pass
                # for this one's). None listed: every row is done again.
                listed = marker.get("outputs") or []
                rows = fmt.final_rows(run) if f"{run.stem}.parquet" in listed else []
                kept = [row for row in rows if not _retry_row(options.retry_failed, row)]
                self.summary.retried += len(rows) - len(kept)
                # The rows kept become a checkpoint before the marker goes (its outputs are about to change):
                # killed while redoing the others, the file resumes per key, not from nothing.
                self._keep_for_retry(run, kept, older=self._checkpoints_of(run))
                run.outputs.delete(marker_name(run.stem))
                run.resume(kept)
                return False
        run.old_checkpoints = self._checkpoints_of(run)
        rows = read_checkpoints(run.outputs, run.old_checkpoints)
        usable = [
            row
            for row in rows
            if row["source_etag"] == run.inp.etag and (options.any_model_version or row["model_version"] == version)
        ]
        kept = _latest_per_id([row for row in usable if not _retry_row(options.retry_failed, row)])
        self.summary.retried += len({str(row["id"]) for row in usable} - {str(row["id"]) for row in kept})
        if len(kept) < len(usable):
            # Failure rows to redo must not outlive their older parts: read again after this run is killed, by
            # a run without --retry-failed, they would be kept, and could win over the rows redone meanwhile
            # (parts are ordered by run id, the time each run began: a machine whose clock is behind would put
            # this run's redone rows before them).
            self._keep_for_retry(run, kept, older=run.old_checkpoints)
            run.old_checkpoints = []
        run.resume(kept)
        return False

    def _checkpoints_of(self, run: FileRun) -> list[str]:
        return sorted(name for name in self.plan.existing if is_checkpoint_of(run.stem, name))

    @staticmethod
    def _keep_for_retry(run: FileRun, kept: list[dict[str, Any]], *, older: list[str]) -> None:
        """The rows a retry keeps as this run's part 0, then the older parts gone (all their rows to keep
        are in it): the checkpoints hold no failure row to redo, and no row older than one redone."""
        run.checkpoint_kept(kept)
        for name in older:
            run.outputs.delete(name)

    # -- finishing side ------------------------------------------------------------------------------

    def _finished(self, run: FileRun) -> None:
        self.sink.open.discard(run)
        self.finishing.append(self.finisher.submit(self._finish, run))

    def _finish(self, run: FileRun) -> None:
        fmt = self.formats(run.inp)
        try:
            try:
                written = fmt.write_outputs(run, self.workdir)
            finally:
                run.close()
        except InputReadError as error:
            # Read again for its outputs (a webdataset shard), the input failed or changed since it was
            # listed: the file is unfinished (exit 75), not the run broken; its rows wait as checkpoints.
            logger.error("%s", error)
            run.flush()
            self.summary.unfinished.append(run.inp.uri)
            return
        name = run.format_name or fmt.name
        write_marker(run, fmt=name, outputs_written=written, model_version=self.captioner.version)
        if run.local_path is not None and run.inp.is_s3:
            run.local_path.unlink(missing_ok=True)  # the copy of an S3 input, done with
        for name in [*run.old_checkpoints, *run.checkpoints_written]:
            run.outputs.delete(name)
        if not written:
            # A table that broke off writes no output: one of an older version of the file must not stay
            # beside a marker that now describes another.
            for name in (f"{run.stem}.parquet", f"{run.stem}.tar"):
                if name in self.plan.existing:
                    run.outputs.delete(name)
        if run.broken:
            self.summary.broken.append(f"{run.inp.uri}: {run.broken}")
        self.summary.files_finished += 1
        self.progress.file_done(run.inp.size)

    def wait_for_finishing(self) -> None:
        self.finisher.shutdown(wait=True)
        for future in self.finishing:
            future.result()  # the first error of writing outputs, raised here


def _retries(retry: frozenset[str] | None, failed_by_kind: dict[str, Any]) -> bool:
    if retry is None:
        return False
    return any(int(n) > 0 and (not retry or kind in retry) for kind, n in failed_by_kind.items())


def _latest_per_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per id, the last read (the checkpoints' order: a later part's row wins)."""
    return list({str(row["id"]): row for row in rows}.values())


def _retry_row(retry: frozenset[str] | None, row: dict[str, Any]) -> bool:
    kind = row.get("error_kind")
    return retry is not None and kind is not None and (not retry or kind in retry)


def run_archive_job(
    source: str,
    out: str,
    settings: WorkerSettings,
    *,
    options: ArchiveOptions = ArchiveOptions(),
    show_progress: bool = True,
    captioner: CaptionModel | None = None,
    client: ObjectStore | None = None,
    on_result: Callable[[Result], None] | None = None,
    on_progress: Callable[[ArchiveProgress], None] | None = None,
    api: BulkApi | None = None,
) -> ArchiveSummary:
    """Caption this shard's input files under ``source`` into outputs under ``out``, resuming what
    earlier runs did; ``api``: the caption API served while it captions. Raises ArchiveJobError /
    S3AccessError (messages name the fix) before writing anything when the source or the output cannot be
    used. Any other exception is a bug, not a usage error: the front ends let it through (exit 1, which the
    Job retries) rather than fail the Job."""
    from captionfleet.worker.connectors.s3_parts import new_run_id

    api = api or BulkApi.off()
    plan = plan_archive_job(source, out, settings, options, client)
    try:
        captioner = captioner or load_captioner(settings)
    except ValueError as error:  # a model setting no retry can fix (the front ends exit 2 on ArchiveJobError)
        raise ArchiveJobError(f"the model cannot be loaded: {error}") from error
    if options.prompt_column is not None and not takes_prompt(captioner.family):
        raise ArchiveJobError(
            f"--prompt-column {options.prompt_column}: the model {captioner.version} ({captioner.family}) takes no "
            "prompt: drop the flag, or caption with a model of a family that takes one (blip, git, florence2, the VLMs)"
        )
    if options.overwrite:
        _remove_outputs(plan)
    summary = ArchiveSummary(
        total=0,
        skipped=0,
        done=0,
        model_version=captioner.version,
        shard=str(options.shard),
        files_listed=len(plan.inputs),
        files_in_shard=len(plan.mine),
        output=plan.outputs.uri(),
        refused=list(plan.refused),
    )
    for line in plan.refused:
        logger.error("input refused: %s", line)
    progress = ArchiveProgress(len(plan.mine), sum(inp.size for inp in plan.mine))
    bar = ProgressBar(progress, show_progress)

    def changed(p: ArchiveProgress) -> None:
        bar.update(p)
        if on_progress is not None:
            on_progress(p)

    progress._on_change = changed
    changed(progress)
    with tempfile.TemporaryDirectory(prefix="captionfleet-archive-") as tmp:
        formats = _formats(plan, Path(tmp), takes_prompts=takes_prompt(captioner.family))
        job = _ArchiveRun(plan, captioner, formats, Path(tmp), progress, summary, new_run_id())

        def on_item_result(item: Item, result: Result) -> None:
            assert isinstance(item, ArchiveItem)
            item.file.add(item, result)
            progress.image_done(result.ok)
            if on_result is not None:
                on_result(result)

        pipeline = CaptionPipeline(
            captioner,
            job.sink,
            settings.batch,
            ImageLimits.from_settings(settings.images),
            flush_interval_s=settings.bulk.part_interval_s,
            prompt=settings.bulk.prompt,
            **api.lane_options(then=on_item_result),
        )
        stop = finish_on_signal(pipeline)

        def on_signal(signum: int) -> None:
            job.stop.set()
            stop(signum)

        try:
            with stop_on_signals(api.on_signal(on_signal)):
                try:
                    stats = pipeline.run(api.run_input(pipeline, job.items()))
                finally:
                    job.wait_for_finishing()
        except (ClientError, BotoCoreError) as error:
            raise access_error(error, "write results to", plan.outputs.uri(), settings.s3.endpoint_url) from error
        except InputError as error:  # a file that is not what the options say (no uri column, ...)
            raise ArchiveJobError(f"{error}; the files finished before it keep their outputs") from error
        finally:
            bar.close()
    summary.done = stats.done
    summary.failed_by_kind = stats.failed_by_kind
    summary.seconds = stats.seconds
    summary.total = summary.skipped + stats.done + stats.failed
    summary.interrupted = pipeline.stop_event.is_set()
    return summary


def _remove_outputs(plan: _Plan) -> None:
    """--overwrite: this shard's files' outputs, markers and checkpoints go (the model is loaded by now)."""
    stems = {stem_of(inp.name) for inp in plan.mine}
    removed = 0
    for name in sorted(plan.existing):
        if any(is_output_of(stem, name) for stem in stems):  # exactly: a.tar's are not a.b.tar's
            plan.outputs.delete(name)
            removed += 1
    plan.existing = set()
    logger.warning("--overwrite: removed %d files under %s", removed, plan.outputs.uri())


def _formats(plan: _Plan, workdir: Path, *, takes_prompts: bool) -> Callable[[InputFile], InputFormat]:
    settings, options = plan.settings, plan.options
    reader = InputReader(plan.client, plan.retry)
    if options.input_format == "tar":
        tar = TarShards(reader, max_bytes=settings.images.max_bytes, webdataset=options.out_format == "webdataset")
        return lambda inp: tar
    fetcher = None
    if options.input_format != "parquet-images":  # manifests name uris, read under the stream's allow-list
        try:
            fetcher = Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)
        except ValueError as error:
            raise ArchiveJobError(str(error)) from error
    table = TableRows(
        options.input_format,
        reader,
        fetcher,
        workdir,
        uri_column=options.uri_column,
        image_column=options.image_column,
        fetch_concurrency=settings.fetch.concurrency,
        prompt_column=options.prompt_column,
        default_prompt_column=takes_prompts,  # a "prompt" column a model without prompts cannot use is left be
        max_bytes=settings.images.max_bytes,
    )
    return lambda inp: table
