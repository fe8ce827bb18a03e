"""bench.compare's report: each row's figures against the model card and the limit of its precision,
the machine it ran on, and what the report is written as (benchmarks*.json, a markdown table, a chart)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.chart import bar_chart
from bench.cpu_rows import Row
from bench.limits import best_rates, limit_key
from bench.machine import machine_identity


def build_report(
    rows: list[Row],
    rates_by_threads: dict[int, dict[str, dict[str, float]]],
    flops_greedy: float,
    flops_beams: float,
    default_precision: str,
    rounds: int,
    quick: bool,
    load_at_start: float,
) -> dict[str, Any]:
    best_by_threads = {threads: best_rates(rates) for threads, rates in rates_by_threads.items()}
    bench_threads = next(iter(rates_by_threads))  # the first measured: the threads of the plain rows
    card = rows[0].images_per_s
    out_rows = []
    for row in rows:
        flops = flops_beams if row.group == "card" else flops_greedy
        row_threads = row.processes * (row.threads or bench_threads)
        best = best_by_threads.get(row_threads, best_by_threads[bench_threads])
        limit = best[limit_key(row.precision)] * 1e9 / flops
        out_rows.append(report_row(row, row_threads, limit, card))
    e2e = out_rows[-1]
    model_only = _model_only(out_rows, e2e["precision"])
    return {
        "machine": machine_identity(load_at_start),
        "model": "ViT-base/16-224 + GPT-2 124M (nlpconnect/vit-gpt2-image-captioning architecture), random weights",
        "quick": quick,
        "rounds": rounds,
        "default_precision": default_precision,
        "gflop_per_image": {"greedy": round(flops_greedy / 1e9, 1), "4 beams": round(flops_beams / 1e9, 1)},
        "matmul_gflops": {f"{t} threads": rates for t, rates in rates_by_threads.items()},
        "best_gflops": {f"{t} threads": best for t, best in best_by_threads.items()},
        "rows": out_rows,
        "end_to_end_vs_model_only": round(e2e["images_per_s"] / model_only["images_per_s"], 2),
        "processes_per_core_vs_one_process": layout_ratios(out_rows),
    }


def report_row(row: Row, row_threads: int, limit: float, card: float) -> dict[str, Any]:
    """One row's figures: ``limit`` in images/s for its precision and threads, ``card`` the model card's rate."""
    ips = row.images_per_s
    return {
        **{k: v for k, v in asdict(row).items() if k not in ("seconds", "peak_rss_mb", "run_peak_rss_mb")},
        "decoding": "4 beams, 16 tokens" if row.group == "card" else "greedy, 16 tokens",
        "images_per_s": round(ips, 2),
        "ms_per_image": round(1000 / ips, 1),
        "peak_rss_mb": round(row.peak_mb),
        "peak_rss_mb_while_captioning": round(max(row.run_peak_rss_mb)),
        "vs_model_card": round(ips / card, 2),
        "threads_in_all": row_threads,
        "limit_images_per_s": round(limit, 2),
        "fraction_of_limit": round(ips / limit, 2),
        "rounds_images_per_s": [round(row.images / s, 2) for s in row.seconds],
    }


def layout_ratios(out_rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per precision: one single-thread process per core vs one process with a thread per core."""
    cores = os.cpu_count() or 1
    layouts = {}
    for per_core in (r for r in out_rows if r["name"].endswith(f"{cores} processes x 1 thread")):
        one_process = next(
            (r for r in out_rows if r["name"] == f"model only {per_core['precision']}, 1 process x {cores} threads"),
            None,
        ) or _model_only(out_rows, per_core["precision"])  # without --threads, that row is one thread per core
        layouts[per_core["precision"]] = round(per_core["images_per_s"] / one_process["images_per_s"], 2)
    return layouts


def _model_only(rows: list[dict[str, Any]], precision: str) -> dict[str, Any]:
    """The one-process model-only row of a precision ("model only fp32 (oneDNN)", "model only bf16")."""
    return next(r for r in rows if f"{r['name']} ".startswith(f"model only {precision} "))


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| row | decoding | precision | batch | threads | images/s | ms/image | peak RSS MB (process / captioning) "
        "| x model card | limit img/s | of limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['decoding']} | {r['precision']} | {r['batch']} | {r['threads_in_all']} | "
            f"{r['images_per_s']} | "
            f"{r['ms_per_image']} | {r['peak_rss_mb']} / {r['peak_rss_mb_while_captioning']} | "
            f"{r['vs_model_card']} | {r['limit_images_per_s']} | {r['fraction_of_limit']} |"
        )
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if report["quick"] else ""
    (out / f"benchmarks{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    bar_chart(
        [(r["name"], r["images_per_s"], r["limit_images_per_s"]) for r in report["rows"]],
        title="images/s (bar) vs the limit of its precision (tick); same weights, one run",
        path=out / f"benchmarks{suffix}.png",
    )
    (out / f"benchmarks{suffix}-table.md").write_text(markdown_table(report) + "\n")
