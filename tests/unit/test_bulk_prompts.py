"""Prompts in the bulk jobs: ``--prompt`` (WORKER_BULK__PROMPT) for every image of a folder, an S3 prefix or an
archive, a manifest's prompt column per row, and the ``prompt`` each row reports; what cannot be a prompt, or
a prompt a model cannot take, is refused with the fix named and without losing rows."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from captionfleet.cli import main as cli_main
from captionfleet.core.captioner import KeptImage, ModelInput
from captionfleet.core.failures import EXIT_OK, EXIT_USAGE
from captionfleet.core.generation import Caption
from captionfleet.core.prompt_input import MAX_PROMPT_CHARS
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.archive_rows import CHECKPOINT_SCHEMA, decode_checkpoint
from captionfleet.worker.bulk_archive import ArchiveJobError, ArchiveOptions, run_archive_job
from captionfleet.worker.sinks import read_rows
from tests.hostile_images import jpeg_bytes
from tests.tiny_families import pictures
from tests.unit.test_s3_fake import FakeS3
from tests.unit.test_s3_results import all_rows
from tests.unit.test_s3_results import run as run_s3
from tests.unit.test_s3_results import settings as s3_settings


class PromptEcho:
    """A model that takes prompts: its caption says which prompt it was given (its default: "echo default")."""

    version = "echo-1"
    family = "blip"
    draft_size = (2, 2)
    preparation_key = "echo"
    default_prompt = "echo default"

    def __init__(self) -> None:
        self.asked: list[str | None] = []

    def prepare(self, image: Image.Image, prompt: str | None = None, *, origin: object = None) -> ModelInput:
        self.asked.append(prompt)
        return ModelInput({}, cost=4, key="echo", prompt=prompt, origin=KeptImage(image))

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        used = [item.prompt if item.prompt is not None else self.default_prompt for item in inputs]
        return [Caption(f"answer to {prompt}", -0.5, 3, prompt=prompt) for prompt in used]


class NoPrompts(PromptEcho):
    """A ViT-GPT2 model, as far as prompts go."""

    family = "vision-encoder-decoder"
    default_prompt = None


# -- the caption command on a real model (tiny BLIP) -------------------------------------------------------


@pytest.fixture
def caption_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str]]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in {
        "WORKER_MODEL__DEVICE": "cpu",
        "WORKER_MODEL__CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_DECODING__NUM_BEAMS": "1",
        "WORKER_DECODING__MAX_NEW_TOKENS": "8",
        "WORKER_BATCH__MAX_WAIT_MS": "5",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORKER_BULK__PROMPT", raising=False)

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = cli_main(["caption", *args, "--no-progress"])
        except SystemExit as exit_:  # argparse's own refusal of a flag's value
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


def photo_folder(tmp_path: Path, count: int = 3) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(pictures(count)):
        image.save(folder / f"{i}.png")
    return folder


def test_caption_prompt_reaches_a_blip_model_and_every_row_names_it(
    caption_cli: Callable[..., tuple[int, str]], tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    folder, blip = photo_folder(tmp_path), str(tiny_family("blip"))
    code, out = caption_cli(str(folder), "--out", str(tmp_path / "default.parquet"), "--model", blip)
    assert code == EXIT_OK, out
    code, out = caption_cli(
        str(folder), "--out", str(tmp_path / "asked.parquet"), "--model", blip, "--prompt", "a photo of"
    )
    assert code == EXIT_OK, out
    default = {row["id"]: row for row in read_rows(tmp_path / "default.parquet")}
    asked = {row["id"]: row for row in read_rows(tmp_path / "asked.parquet")}
    assert sorted(asked) == ["0.png", "1.png", "2.png"] and all(row["caption"] for row in asked.values())
    assert {row["prompt"] for row in asked.values()} == {"a photo of"}
    assert {row["prompt"] for row in default.values()} == {None}  # BLIP's default: no prompt
    assert any(asked[key]["caption"] != default[key]["caption"] for key in asked)  # the prompt changed captions


def test_caption_prompt_for_a_model_that_takes_none_is_refused_before_writing(
    caption_cli: Callable[..., tuple[int, str]], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    folder = photo_folder(tmp_path, 1)
    code, out = caption_cli(
        str(folder), "--out", str(tmp_path / "r.jsonl"), "--model", str(tiny_checkpoint), "--prompt", "a photo of"
    )
    assert code == EXIT_USAGE
    assert "takes no prompt" in out and "drop --prompt" in out and "Traceback" not in out
    assert not (tmp_path / "r.jsonl").exists() or read_rows(tmp_path / "r.jsonl") == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompt", "bad\x07bell"], "--prompt holds a control character (U+0007)"),
        (["--prompt", "x" * (MAX_PROMPT_CHARS + 1)], f"over the limit of {MAX_PROMPT_CHARS}"),
        (["--prompt-column", "p"], "--prompt-column apply to archives only"),
    ],
)
def test_caption_refuses_what_is_not_a_prompt_or_not_for_a_folder(
    caption_cli: Callable[..., tuple[int, str]], tmp_path: Path, args: list[str], expected: str
) -> None:
    folder = photo_folder(tmp_path, 1)
    code, out = caption_cli(str(folder), "--out", str(tmp_path / "r.jsonl"), *args)
    assert code == EXIT_USAGE and expected in out
    assert not (tmp_path / "r.jsonl").exists()


def test_a_bad_prompt_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from captionfleet.core.settings import SettingsError, load_worker_settings

    monkeypatch.setenv("WORKER_BULK__PROMPT", "tab\tis fine")
    assert load_worker_settings().bulk.prompt == "tab\tis fine"
    monkeypatch.setenv("WORKER_BULK__PROMPT", "nul\x01")
    with pytest.raises(SettingsError, match=r"WORKER_BULK__PROMPT.*control character"):
        load_worker_settings()


# -- an S3 prefix ------------------------------------------------------------------------------------------


def test_an_s3_job_prompt_reaches_the_model_and_its_parts() -> None:
    s3 = FakeS3()
    s3.buckets.add("out")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 0, 0)).save(buffer, "PNG")
    for i in range(3):
        s3.put("src", f"imgs/{i}.png", buffer.getvalue())
    config = s3_settings().model_copy(update={"bulk": s3_settings().bulk.model_copy(update={"prompt": "a photo of"})})
    model = PromptEcho()
    summary = run_s3(s3, model, settings=config)  # type: ignore[arg-type]
    assert summary.done == 3 and model.asked == ["a photo of"] * 3
    assert [(row["caption"], row["prompt"]) for row in all_rows(s3)] == [("answer to a photo of", "a photo of")] * 3


# -- manifests: the prompt column ----------------------------------------------------------------------------


def manifest(tmp_path: Path, prompts: list[Any]) -> Path:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    uris = []
    for i in range(len(prompts)):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes())
        uris.append((root / f"{i}.jpg").as_uri())
    path = tmp_path / "manifest.jsonl"
    path.write_text(
        "".join(
            json.dumps({"url": u, "prompt": p, "n": i}) + "\n"
            for i, (u, p) in enumerate(zip(uris, prompts, strict=True))
        )
    )
    return path


def run_archive(tmp_path: Path, src: Path, model: Any, prompt: str | None = None, **options: Any) -> Any:
    config = WorkerSettings(
        batch={"max_items": 4, "max_wait_ms": 5},  # type: ignore[arg-type]
        fetch={"file_root": tmp_path / "root"},  # type: ignore[arg-type]
        bulk={"prompt": prompt},  # type: ignore[arg-type]
    )
    return run_archive_job(
        str(src), str(tmp_path / "out"), config, options=ArchiveOptions(**options), show_progress=False, captioner=model
    )


def test_a_manifest_prompt_column_asks_per_row_and_a_bad_cell_fails_its_row_alone(tmp_path: Path) -> None:
    cells = ["a photo of", None, "", "x" * (MAX_PROMPT_CHARS + 1), "line\nbreak", "nul\x00"]
    src = manifest(tmp_path, cells)
    summary = run_archive(tmp_path, src, PromptEcho(), prompt="the job's")
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert [row["n"] for row in rows] == list(range(6))  # every input row, in order, its columns kept
    assert [row["original_prompt"] for row in rows] == cells  # the input's column, beside the one used
    # Empty cells are the job's prompt (--prompt), the others their own.
    assert [row["prompt"] for row in rows[:3]] == ["a photo of", "the job's", "the job's"]
    assert [row["caption"] for row in rows[:3]] == [
        "answer to a photo of",
        "answer to the job's",
        "answer to the job's",
    ]
    assert (rows[4]["prompt"], rows[4]["caption"]) == ("line\nbreak", "answer to line\nbreak")
    for bad, why in ((rows[3], "over the limit"), (rows[5], "a control character (U+0000)")):
        assert bad["error_kind"] == "malformed" and bad["caption"] is None
        assert f"row {bad['n']}: the prompt column 'prompt'" in bad["error_message"], bad
        assert why in bad["error_message"]
    assert summary.done == 4 and summary.failed_by_kind == {"malformed": 2}

    # A column that is not text: each of its rows fails, saying so.
    (tmp_path / "out").rename(tmp_path / "out-1")
    uris = [row["url"] for row in rows[:2]]
    pq.write_table(pa.table({"url": uris, "prompt": [3, None]}), tmp_path / "numbers.parquet")
    run_archive(tmp_path, tmp_path / "numbers.parquet", PromptEcho(), input_format="manifest")
    rows = pq.read_table(tmp_path / "out" / "numbers.parquet").to_pylist()
    assert rows[0]["error_kind"] == "malformed" and "must be a string, not int" in rows[0]["error_message"]
    assert rows[1]["caption"] == "answer to echo default"


def test_a_named_prompt_column_must_exist_and_needs_a_model_that_takes_prompts(tmp_path: Path) -> None:
    src = manifest(tmp_path, ["a photo of", None])
    with pytest.raises(ArchiveJobError, match=r"no prompt column 'asked'.*fix --prompt-column"):
        run_archive(tmp_path, src, PromptEcho(), prompt_column="asked")
    with pytest.raises(ArchiveJobError, match=r"--prompt-column prompt: the model echo-1 .* takes no prompt"):
        run_archive(tmp_path, src, NoPrompts(), prompt_column="prompt")
    # Not named: a model without prompts leaves the column be (kept in the output) and captions every row.
    model = NoPrompts()
    summary = run_archive(tmp_path, src, model)
    assert summary.done == 2 and model.asked == [None, None]
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert [row["original_prompt"] for row in rows] == ["a photo of", None]
    assert [row["prompt"] for row in rows] == [None, None]  # what such a model says it used: none


def test_images_inside_parquet_take_their_prompt_column(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": jpeg_bytes(), "path": f"{i}.jpg"} for i in range(2)], type=struct)
    pq.write_table(pa.table({"image": images, "ask": ["what is it", None]}), tmp_path / "data.parquet")
    run_archive(tmp_path, tmp_path / "data.parquet", PromptEcho(), input_format="parquet", prompt_column="ask")
    rows = pq.read_table(tmp_path / "out" / "data.parquet").to_pylist()
    assert [(row["ask"], row["prompt"]) for row in rows] == [("what is it", "what is it"), (None, "echo default")]


@pytest.mark.parametrize("added", [("prompt",), ("mean_logprob", "tokens")])
def test_checkpoints_and_outputs_written_before_a_field_was_added_still_read(
    tmp_path: Path, added: tuple[str, ...]
) -> None:
    old_schema = pa.schema([field for field in CHECKPOINT_SCHEMA if field.name not in added])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"id": "0", "position": 0, "caption": "old"}], schema=old_schema), buffer)
    (row,) = decode_checkpoint(buffer.getvalue())
    assert row["caption"] == "old" and [row[name] for name in added] == [None] * len(added)

    # A finished manifest output without the columns, then --retry-failed, which reads it back.
    src = manifest(tmp_path, [None, 7])
    run_archive(tmp_path, src, PromptEcho())
    out = tmp_path / "out" / "manifest.parquet"
    table = pq.read_table(out)
    pq.write_table(table.drop_columns(list(added)), out)
    summary = run_archive(tmp_path, src, PromptEcho(), retry_failed=frozenset({"malformed"}))
    assert summary.retried == 1 and summary.failed_by_kind == {"malformed": 1}
    rows = pq.read_table(out).to_pylist()
    assert [[row[name] for name in added] for row in rows] == [[None] * len(added)] * 2
    assert rows[0]["caption"] == "answer to echo default"
