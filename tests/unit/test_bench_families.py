"""bench.families without its wall clock: the published sizes its checkpoints are built at, the miniatures
built by the same code loading and captioning through the worker's path, and the agreement and report
logic on hand-made rows. Nothing here measures or asserts a speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from bench import families, family_rows
from bench.family_checkpoints import SPECS, TINY, padded, save_checkpoint, word_level_tokenizer
from bench.family_report import FamilyRow, agreement, best_row, build_report, common_prefix, markdown_tables
from bench.workload import realistic_jpegs

# Parameters of each architecture at the published sizes, as the hub lists them (BLIP's checkpoint file
# stores its tied output layer twice: 247M there, the same 224M of distinct weights here).
PUBLISHED_MILLIONS = {"vit-gpt2": 239.2, "blip": 224.0, "git": 176.6, "florence2": 231.4, "smolvlm": 256.5}


@pytest.mark.parametrize("key", list(SPECS))
def test_each_family_has_its_published_parameter_count(key: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForImageTextToText.from_config(SPECS[key].config(None))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED_MILLIONS[key], abs=0.1)


def test_the_configs_carry_the_published_sizes() -> None:
    blip = SPECS["blip"].config(None)
    assert (blip.vision_config.image_size, blip.vision_config.patch_size, blip.vision_config.num_hidden_layers) == (
        384,
        16,
        12,
    )
    assert (blip.text_config.vocab_size, blip.text_config.num_hidden_layers, blip.text_config.num_attention_heads) == (
        30524,
        12,
        12,
    )
    git = SPECS["git"].config(None)
    assert (git.vocab_size, git.num_hidden_layers, git.vision_config.image_size) == (30522, 6, 224)
    florence = SPECS["florence2"].config(None)
    assert florence.text_config.d_model == 768
    assert (florence.text_config.encoder_layers, florence.text_config.decoder_layers) == (6, 6)
    assert florence.text_config.vocab_size == padded(51290, 64) == 51328
    assert list(florence.vision_config.embed_dim) == [128, 256, 512, 1024]
    assert list(florence.vision_config.depths) == [1, 1, 9, 1]
    smol = SPECS["smolvlm"].config(None)
    assert smol.model_type == "idefics3"  # as SmolVLM-256M-Instruct's config.json says
    text, vision = smol.text_config, smol.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        576,
        30,
        9,
        3,
    )
    assert (text.vocab_size, vision.image_size, vision.patch_size, smol.scale_factor) == (49280, 512, 16, 4)
    ved = SPECS["vit-gpt2"].config(None)
    assert (ved.encoder.image_size, ved.decoder.n_layer, ved.decoder.vocab_size) == (224, 12, 50257)


def test_shrinking_overrides_only_what_it_names() -> None:
    blip = SPECS["blip"].config({"text": {"hidden_size": 32}})
    assert blip.text_config.hidden_size == 32
    assert blip.text_config.vocab_size == 30524 and blip.vision_config.hidden_size == 768


def test_a_word_level_tokenizer_has_the_real_size_and_specials_at_their_ids() -> None:
    specials = {"<pad>": 0, "<unk>": 1, "<image>": 999}
    tokenizer = word_level_tokenizer(1000, specials, {"pad_token": "<pad>", "unk_token": "<unk>"})
    assert len(tokenizer) == 1000
    assert tokenizer.convert_tokens_to_ids("<image>") == 999
    assert tokenizer("w5 <image> w7", add_special_tokens=False)["input_ids"] == [5, 999, 7]
    with pytest.raises(ValueError, match="outside a vocabulary"):
        word_level_tokenizer(10, {"<unk>": 10}, {"unk_token": "<unk>"})


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("key", list(SPECS))
def test_a_miniature_loads_and_captions_exactly_the_asked_tokens_through_the_worker_path(
    key: str, tiny_work: Path
) -> None:
    checkpoint = save_checkpoint(key, tiny_work / key, shrink=TINY[key])
    vocabulary = SPECS[key].config(None)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if key != "vit-gpt2":  # the real vocabulary size, whatever the model's width
        text = getattr(vocabulary, "text_config", vocabulary)
        assert padded(len(tokenizer), 64) >= text.vocab_size >= len(tokenizer)
    jpegs = tuple(realistic_jpegs(tiny_work / "jpegs", 3, (160, 120)))
    result = family_rows.run_row(family_rows.RowJob(checkpoint, jpegs, "fp32", "cpu", 5, 2, 0))
    assert result["images"] == 3 and len(result["captions"]) == 3
    assert [len(ids) for ids in result["tokens"]] == [5, 5, 5]  # the end token held back: equal work
    assert result["encoder_pixels_per_image"] > 0 and result["parameters"] > 0


def test_agreement_counts_captions_tokens_and_the_common_prefix() -> None:
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert agreement(reference, reference, ["a", "b"], ["a", "b"]) == {
        "identical_captions": 1.0,
        "identical_token_sequences": 1.0,
        "same_token_same_step": 1.0,
        "common_prefix": 1.0,
    }
    # The second image parts at its third token, then meets the reference again at the last.
    found = agreement(reference, [[1, 2, 3, 4], [5, 6, 9, 8]], ["a", "b"], ["a", "c"])
    assert found == {
        "identical_captions": 0.5,
        "identical_token_sequences": 0.5,
        "same_token_same_step": 0.875,  # 7 of 8 positions
        "common_prefix": 0.75,  # (4/4 + 2/4) / 2
    }
    assert common_prefix([1, 2], [2, 1]) == 0
    with pytest.raises(ValueError, match="same images"):
        agreement(reference, reference[:1], ["a", "b"], ["a"])


def _row(family: str, precision: str, seconds: list[float], tokens: list[list[int]], captions: list[str]) -> FamilyRow:
    row = FamilyRow(family, family.upper(), f"hub/{family}", precision)
    for s in seconds:
        row.add_round(
            {
                "images": 2,
                "seconds": s,
                "cpu_seconds": s,
                "prepare_seconds": 0.1,
                "peak_rss_mb": 900.0,
                "run_peak_rss_mb": 800.0,
                "peak_gpu_mb": None,
                "tokens": tokens,
                "captions": captions,
                "parameters": 10,
                "encoder_pixels_per_image": 4,
                "prompt_tokens": 0,
                "threads": 1,
                "load_seconds": 1.0,
            }
        )
    return row


def test_the_report_picks_the_faster_precision_and_compares_it_with_fp32() -> None:
    fp32 = _row("git", "fp32", [4.0, 2.0, 3.0], [[1, 2], [3, 4]], ["x", "y"])
    bf16 = _row("git", "bf16", [1.0, 1.5, 0.5], [[1, 2], [3, 5]], ["x", "z"])
    failed = FamilyRow("git", "GIT", "hub/git", "fp16", error="out of memory")
    assert fp32.images_per_s == pytest.approx(2 / 3.0)  # the median round
    assert best_row([fp32, bf16, failed]) is bf16
    report = build_report([fp32, bf16, failed], {"device": "cpu"})
    (best,) = report["best"]
    assert best["best_precision"] == "bf16" and best["vs_fp32_speed"] == pytest.approx(3.0)  # medians: 1.0 s vs 3.0 s
    assert best["agreement_with_fp32"]["identical_captions"] == 0.5
    rows = {row["precision"]: row for row in report["rows"]}
    assert "agreement_with_fp32" not in rows["fp32"]  # the reference itself
    assert rows["fp16"]["error"] == "out of memory"
    table = markdown_tables(report)
    assert "| GIT (`hub/git`) | bf16 |" in table and "failed: out of memory" in table


def test_a_report_written_mid_run_says_what_is_not_measured_yet() -> None:
    done = _row("git", "fp32", [1.0], [[1, 2]], ["x"])
    pending = FamilyRow("blip", "BLIP", "hub/blip", "fp32")
    table = markdown_tables(build_report([done, pending], {"device": "cpu"}))
    assert "| BLIP | not measured yet |" in table and "| BLIP | fp32 | not measured yet |" in table
    assert "failed" not in table


def test_a_row_that_generates_other_tokens_in_another_round_says_so() -> None:
    row = _row("git", "fp32", [1.0], [[1, 2]], ["x"])
    row.add_round({**_round_like(row), "tokens": [[1, 3]]})
    assert not row.same_every_round


def _round_like(row: FamilyRow) -> dict[str, Any]:
    return {
        "images": row.images,
        "seconds": 1.0,
        "cpu_seconds": 1.0,
        "prepare_seconds": 0.1,
        "peak_rss_mb": 1.0,
        "run_peak_rss_mb": 1.0,
        "peak_gpu_mb": None,
        "captions": row.captions,
        **row.details,
    }


def test_an_avx2_only_cpu_gets_fp32_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(families.fastpath, "cpu_has_native_bf16", lambda: False)
    assert families.precisions_for("cpu") == ["fp32"]
    monkeypatch.setattr(families.fastpath, "cpu_has_native_bf16", lambda: True)
    assert families.precisions_for("cpu") == ["fp32", "bf16"]


@pytest.mark.slow
def test_the_command_runs_end_to_end_on_miniatures(tiny_work: Path, tmp_path: Path) -> None:
    argv = ["--tiny", "--families", "git,vit-gpt2", "--images", "2", "--rounds", "1", "--threads", "1"]
    assert families.main([*argv, "--work", str(tiny_work), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmarks-families-tiny.json").read_text())
    assert {row["family"] for row in report["best"]} == {"git", "vit-gpt2"}
    assert all(row["images_per_s"] > 0 and not row["error"] for row in report["rows"])
    assert report["machine"]["torch_cpu_capability"]
    assert "GIT-base" in (tmp_path / "benchmarks-families-tiny-table.md").read_text()
