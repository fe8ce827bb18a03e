"""bench.families' report: each family's rows, its best measured precision, and how that precision's
captions agree with fp32's on the same images (pure functions of the measured rows: tested without a model).

Agreement is counted three ways, because with random weights whole captions say little:
- identical captions: the share of images whose caption text is the same;
- same token at the same step: over every image's generated tokens, the share equal at their position;
- common prefix: per image, how many of the first tokens agree before the first difference, as a share
  of the tokens (greedy decoding continues from its own choices, so after one difference the rest of
  the caption is a different continuation and position-wise matches afterwards are mostly chance).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FamilyRow:
    family: str  # bench.family_checkpoints key
    name: str  # as the report shows it
    hub_id: str
    precision: str
    seconds: list[float] = field(default_factory=list)  # per round: the model thread's time for `images`
    cpu_seconds: list[float] = field(default_factory=list)  # per round: the CPU time of that (all threads)
    prepare_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    run_peak_rss_mb: list[float] = field(default_factory=list)
    peak_gpu_mb: list[float] = field(default_factory=list)
    images: int = 0
    tokens: list[list[int]] = field(default_factory=list)  # the first round's generated ids
    captions: list[str] = field(default_factory=list)
    same_every_round: bool = True  # every round generated the first round's ids
    details: dict[str, Any] = field(default_factory=dict)  # parameters, encoder pixels, prompt tokens, ...
    error: str = ""

    def add_round(self, result: dict[str, Any]) -> None:
        self.images = int(result["images"])
        self.seconds.append(float(result["seconds"]))
        self.cpu_seconds.append(float(result["cpu_seconds"]))
        self.prepare_seconds.append(float(result["prepare_seconds"]))
        self.peak_rss_mb.append(float(result["peak_rss_mb"]))
        self.run_peak_rss_mb.append(float(result["run_peak_rss_mb"]))
        if result.get("peak_gpu_mb") is not None:
            self.peak_gpu_mb.append(float(result["peak_gpu_mb"]))
        if not self.tokens:
            self.tokens, self.captions = result["tokens"], result["captions"]
        else:
            self.same_every_round &= result["tokens"] == self.tokens
        for key in ("parameters", "encoder_pixels_per_image", "prompt_tokens", "threads", "load_seconds"):
            self.details[key] = result[key]

    @property
    def measured(self) -> bool:
        return bool(self.seconds) and not self.error

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.images / s for s in self.seconds) if self.measured else 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def agreement(
    reference_tokens: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[int]],
    reference_captions: Sequence[str],
    captions: Sequence[str],
) -> dict[str, float]:
    """How the captions of one precision agree with the reference's (fp32) on the same images, in order."""
    if len(reference_tokens) != len(tokens) or len(reference_captions) != len(captions):
        raise ValueError("agreement needs the same images in both rows")
    if not tokens:
        raise ValueError("agreement of no images")
    positions = sum(len(ref) for ref in reference_tokens)
    same = sum(
        sum(x == y for x, y in zip(ref, got, strict=False)) for ref, got in zip(reference_tokens, tokens, strict=True)
    )
    prefixes = [
        common_prefix(ref, got) / len(ref) if ref else 1.0 for ref, got in zip(reference_tokens, tokens, strict=True)
    ]
    return {
        "identical_captions": round(
            sum(a == b for a, b in zip(reference_captions, captions, strict=True)) / len(captions), 3
        ),
        "identical_token_sequences": round(
            sum(list(a) == list(b) for a, b in zip(reference_tokens, tokens, strict=True)) / len(tokens), 3
        ),
        "same_token_same_step": round(same / positions, 3) if positions else 1.0,
        "common_prefix": round(statistics.mean(prefixes), 3),
    }


def best_row(rows: Sequence[FamilyRow]) -> FamilyRow | None:
    """The measured row with the most images/s (ties: the first listed, fp32 before bf16)."""
    measured = [row for row in rows if row.measured]
    return max(measured, key=lambda row: row.images_per_s) if measured else None


def report_row(row: FamilyRow, reference: FamilyRow | None) -> dict[str, Any]:
    ips = row.images_per_s
    out: dict[str, Any] = {
        "family": row.family,
        "name": row.name,
        "hub_id": row.hub_id,
        "precision": row.precision,
        "images": row.images,
        "images_per_s": round(ips, 3),
        "ms_per_image": round(1000 / ips, 1) if ips else None,
        "rounds_images_per_s": [round(row.images / s, 3) for s in row.seconds],
        # On a shared machine the wall clock also counts the time neighbours held the cores; the CPU time of
        # the row's own threads is what the work costs (with one thread: one core's time per image).
        "cpu_ms_per_image": round(1000 * statistics.median(row.cpu_seconds) / row.images, 1)
        if row.cpu_seconds
        else None,
        "prepare_ms_per_image": round(1000 * statistics.median(row.prepare_seconds) / row.images, 1)
        if row.prepare_seconds
        else None,
        "peak_rss_mb": round(max(row.peak_rss_mb)) if row.peak_rss_mb else None,
        "peak_rss_mb_while_captioning": round(max(row.run_peak_rss_mb)) if row.run_peak_rss_mb else None,
        "peak_gpu_mb": round(max(row.peak_gpu_mb)) if row.peak_gpu_mb else None,
        "same_tokens_every_round": row.same_every_round,
        "distinct_captions": len(set(row.captions)),
        "captions_sample": row.captions[:2],
        **row.details,
        "error": row.error,
    }
    if reference is not None and reference.measured and row.measured:
        out["vs_fp32_speed"] = round(ips / reference.images_per_s, 2)
        out["agreement_with_fp32"] = agreement(reference.tokens, row.tokens, reference.captions, row.captions)
    return out


def family_summary(rows: Sequence[FamilyRow]) -> dict[str, Any]:
    """One family: its best measured precision, that row's figures and its agreement with fp32."""
    best = best_row(rows)
    reference = next((row for row in rows if row.precision == "fp32" and row.measured), None)
    if best is None:
        failed = any(row.error for row in rows)
        return {"family": rows[0].family, "name": rows[0].name, "best_precision": None, "failed": failed}
    summary = report_row(best, reference)
    summary["best_precision"] = best.precision
    return summary


def build_report(rows: Sequence[FamilyRow], header: dict[str, Any]) -> dict[str, Any]:
    families: dict[str, list[FamilyRow]] = {}
    for row in rows:
        families.setdefault(row.family, []).append(row)
    out_rows = []
    for family_rows in families.values():
        reference = next((row for row in family_rows if row.precision == "fp32" and row.measured), None)
        out_rows += [report_row(row, reference if row is not reference else None) for row in family_rows]
    return {
        **header,
        "rows": out_rows,
        "best": [family_summary(family_rows) for family_rows in families.values()],
    }


def _agreement_cell(row: dict[str, Any]) -> str:
    found = row.get("agreement_with_fp32")
    if found is None:
        return "reference" if row.get("precision") == "fp32" else ""
    return f"{found['identical_captions']:.0%} / {found['same_token_same_step']:.0%} / {found['common_prefix']:.0%}"


def markdown_tables(report: dict[str, Any]) -> str:
    """The best precision per family, then every row."""
    gpu = report.get("device") == "cuda"
    memory = "peak GPU MB" if gpu else "peak RSS MB (process / captioning)"
    cpu = "" if gpu else " CPU ms/image |"
    lines = [
        f"| family (published sizes of) | best precision | images/s | ms/image |{cpu} {memory} | x fp32 speed "
        "| vs fp32: identical captions / same token at each step / common prefix |",
        "|---|---|---|---|---|---|---|" + ("" if gpu else "---|"),
    ]
    for row in report["best"]:
        if row.get("best_precision") is None:  # or a run still going (the outputs are written after every row)
            state = "failed" if row.get("failed") else "not measured yet"
            lines.append(f"| {row['name']} | {state} | | | | | |" + ("" if gpu else " |"))
            continue
        lines.append(
            f"| {row['name']} (`{row['hub_id']}`) | {row['best_precision']} | {row['images_per_s']} "
            f"| {row['ms_per_image']} |{_cpu_cell(row, gpu)} {_memory_cell(row)} | {row.get('vs_fp32_speed', 1.0)} "
            f"| {_agreement_cell(row)} |"
        )
    lines += [
        "",
        f"| family | precision | images/s (median) | per round | ms/image |{cpu} prepare ms/image | {memory} "
        "| vs fp32 (captions / tokens / prefix) | distinct captions | same tokens every round |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("" if gpu else "---|"),
    ]
    for row in report["rows"]:
        if row["error"] or not row["images"]:
            state = f"failed: {row['error'][:80]}" if row["error"] else "not measured yet"
            lines.append(f"| {row['name']} | {row['precision']} | {state} |" + " |" * (7 + (not gpu)))
            continue
        rounds = " / ".join(str(value) for value in row["rounds_images_per_s"])
        lines.append(
            f"| {row['name']} | {row['precision']} | {row['images_per_s']} | {rounds} | {row['ms_per_image']} "
            f"|{_cpu_cell(row, gpu)} {row['prepare_ms_per_image']} | {_memory_cell(row)} | {_agreement_cell(row)} "
            f"| {row['distinct_captions']}/{row['images']} | {'yes' if row['same_tokens_every_round'] else 'no'} |"
        )
    return "\n".join(lines)


def _cpu_cell(row: dict[str, Any], gpu: bool) -> str:
    return "" if gpu else f" {row['cpu_ms_per_image']} |"


def _memory_cell(row: dict[str, Any]) -> str:
    if row.get("peak_gpu_mb") is not None:
        return str(row["peak_gpu_mb"])
    return f"{row['peak_rss_mb']} / {row['peak_rss_mb_while_captioning']}"
