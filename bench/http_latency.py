"""Interactive latency of the caption API next to the same worker's bulk throughput, in one run.

    python -m bench.http_latency                 # ViT-base/16 + GPT-2 124M, random weights (bench/full_checkpoint.py)
    python -m bench.http_latency --model tiny    # the tiny test model: checks the command, says nothing of speed

One worker process (`captionfleet worker --http`, as in production) on the Kafka-compatible test broker, images
640x480 JPEGs (Kafka: file:// uris; HTTP: multipart uploads), then:

1. bulk: ``--flood`` Kafka requests at once; images/s from the first result to the last (the worker's bulk path);
2. alone: single-image HTTP requests from 1, 4 and 16 concurrent clients (``--requests`` per level, at least
   ``--per-client`` per client so that the load is sustained; each client sends its next request when the last
   is answered): p50/p99 latency and images/s. The lone client (1) first waits a random time of up to one
   bulk model call: a client that fires again the instant it is answered always arrives just after the next
   model call began (its answer and that call's start are the same moment), which measures that phase
   lock, not an independent arrival;
3. under a backlog: a Kafka backlog big enough to keep the worker saturated throughout (checked: the lag is
   still above zero at the end), then the same three levels, with the Kafka images answered meanwhile.

Then the issue's two ratios, on this machine in this run: a lone interactive request's p99 under the backlog
against the lane's wait plus 1.5 batch times (the mean model call of phase 1), and the images/s under
saturating HTTP load (16 clients, alone) against the bulk path's, both at steady state: the images answered
after the first answer, over the time from the first answer to the last (so neither side counts its first
model call, which only the HTTP phase's wall clock would otherwise include). Prints the settings and one JSON line per
phase; ``--out FILE`` also writes them all as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx

from bench.stream_latency import Results, build_checkpoint, make_images, percentile, send, wait_ready, worker_env
from tests.services.kafka import KafkaBroker, free_port

REPO = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16)


def metric(port: int, name: str) -> float:
    """One unlabelled sample of the worker's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


class Batches:
    """The worker's model calls since the last ``take()``: how many, their mean size and duration."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._last = self._now()

    def _now(self) -> tuple[float, float, float]:
        return (
            metric(self.port, "captionfleet_inference_seconds_count"),
            metric(self.port, "captionfleet_inference_seconds_sum"),
            metric(self.port, "captionfleet_batch_size_sum"),
        )

    def take(self) -> dict[str, float]:
        now = self._now()
        calls, seconds, rows = (a - b for a, b in zip(now, self._last, strict=True))
        self._last = now
        return {
            "model_calls": int(calls),
            "mean_batch_size": round(rows / max(calls, 1), 2),
            "mean_batch_s": round(seconds / max(calls, 1), 3),
        }


def steady_rate(times: list[float], settle_s: float = 0.05) -> float:
    """Images/s at steady state: the answers after the first (those within ``settle_s`` of it came from the
    same model call) over the time from the first answer to the last."""
    if len(times) < 2:
        return 0.0
    ordered = sorted(times)
    later = [t for t in ordered if t > ordered[0] + settle_s]
    return len(later) / max(ordered[-1] - ordered[0], 1e-9)


def clients(url: str, concurrency: int, requests: int, images: list[bytes], think_s: float = 0.0) -> dict[str, Any]:
    """``requests`` single-image requests from ``concurrency`` clients, each waiting for its answer (and then a
    random time of up to ``think_s``)."""
    latencies: list[float] = []
    answered: list[float] = []
    pause = random.Random(concurrency)
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    n = next(counter, None)
                    wait = pause.uniform(0, think_s)
                if n is None:
                    return
                time.sleep(wait)
                began = time.perf_counter()
                response = http.post("/v1/captions", files={"file": (f"{n}.jpg", images[n % len(images)])})
                took = time.perf_counter() - began
                with lock:
                    if response.status_code == 200 and response.json()["results"][0]["ok"]:
                        latencies.append(took * 1000)
                        answered.append(began + took)
                    else:
                        failures.append(f"{response.status_code} {response.text[:200]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {
        "clients": concurrency,
        "requests": len(latencies),
        "failed": len(failures),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies), 1) if latencies else None,
        "images_per_s": round(len(latencies) / seconds, 3),
        "steady_images_per_s": round(steady_rate(answered), 3),
        "seconds": round(seconds, 2),
        "first_failure": failures[0] if failures else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="full", help="full (default), tiny, or a checkpoint directory")
    p.add_argument("--flood", type=int, default=48, help="Kafka requests of the bulk phase")
    p.add_argument("--requests", type=int, default=16, help="HTTP requests per concurrency level (at least)")
    p.add_argument("--per-client", type=int, default=6, help="HTTP requests per client, at least")
    p.add_argument("--max-items", type=int, default=8, help="WORKER_BATCH__MAX_ITEMS")
    p.add_argument("--max-wait-ms", type=int, default=50, help="WORKER_BATCH__MAX_WAIT_MS (the stream lane's)")
    p.add_argument("--lane-wait-ms", type=int, default=5, help="WORKER_HTTP__MAX_WAIT_MS (the interactive lane's)")
    p.add_argument("--stream-share", type=float, default=0.25, help="WORKER_HTTP__STREAM_SHARE")
    p.add_argument("--beams", type=int, default=1, help="WORKER_DECODING__NUM_BEAMS")
    p.add_argument("--max-new-tokens", type=int, default=16, help="WORKER_DECODING__MAX_NEW_TOKENS")
    p.add_argument("--device", default="auto", help="WORKER_MODEL__DEVICE")
    p.add_argument("--out", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="captionfleet-bench-http-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    (work / "images").mkdir()
    paths = make_images(work / "images", 16)
    uploads = [path.read_bytes() for path in paths]
    checkpoint = build_checkpoint(args.model, work)
    report: dict[str, Any] = {
        "settings": {
            "model": args.model,
            "device": args.device,
            "batch_max_items": args.max_items,
            "batch_max_wait_ms": args.max_wait_ms,
            "http_max_wait_ms": args.lane_wait_ms,
            "http_stream_share": args.stream_share,
            "num_beams": args.beams,
            "max_new_tokens": args.max_new_tokens,
            "image": "640x480 JPEG (Kafka: file://, HTTP: multipart upload)",
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        }
    }
    print("settings", json.dumps(report["settings"]), flush=True)
    topics = {"requests": "bench-requests", "results": "bench-results", "dead": "bench-dead"}
    with KafkaBroker() as broker:
        broker.create_topic(topics["requests"], 2)
        broker.create_topic(topics["results"], 2)
        broker.create_topic(topics["dead"], 1)
        port, http_port = free_port(), free_port()
        bench_args = argparse.Namespace(
            max_in_flight=256, max_items=args.max_items, max_wait_ms=args.max_wait_ms, device=args.device,
            beams=args.beams, max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
        env = worker_env(bench_args, broker.bootstrap, topics, checkpoint, paths[0].parent, port)
        env.update(
            {
                "PYTHONPATH": str(REPO),
                "WORKER_HTTP__ENABLED": "true",
                "WORKER_HTTP__PORT": str(http_port),
                "WORKER_HTTP__MAX_WAIT_MS": str(args.lane_wait_ms),
                "WORKER_HTTP__STREAM_SHARE": str(args.stream_share),
                "WORKER_HTTP__TIMEOUT_S": "600",
            }
        )
        log = (work / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "captionfleet.worker"], env=env, cwd=REPO, stdout=log, stderr=log
        )
        try:
            wait_ready(port, worker, work / "worker.log")
            url = f"http://127.0.0.1:{http_port}"
            results = Results(broker.bootstrap, [topics["results"], topics["dead"]])
            producer = broker.producer(linger_ms=0)
            uris = [f"file://{path}" for path in paths]
            clients(url, 2, 4, uploads)  # warm-up: the API's first requests and the model's first batches

            # 1. bulk: everything at once through Kafka.
            batches = Batches(port)
            ids = [f"flood-{i}" for i in range(args.flood)]
            send(producer, topics["requests"], ids, [uris[i % len(uris)] for i in range(len(ids))], {})
            if not results.wait_for(ids, timeout_s=3600):
                print("bulk phase timed out", file=sys.stderr)
                return 1
            bulk_rate = steady_rate([results.arrived[i] for i in ids])
            report["bulk"] = {"requests": len(ids), "images_per_s": round(bulk_rate, 3), **batches.take()}
            batch_s = report["bulk"]["mean_batch_s"]
            print("bulk", json.dumps(report["bulk"]), flush=True)

            # 2. HTTP alone.
            report["alone"] = []
            for level in LEVELS:
                batches.take()
                count = max(args.requests, args.per_client * level)
                think = batch_s if level == 1 else 0.0
                figures = {**clients(url, level, count, uploads, think), **batches.take()}
                report["alone"].append(figures)
                print("alone", json.dumps(figures), flush=True)

            # 3. HTTP under a Kafka backlog that outlasts the phase (the worker never idles meanwhile).
            slowest = sum(f["requests"] / max(f["images_per_s"], 1e-3) for f in report["alone"])
            backlog = int(bulk_rate * slowest * 2) + 4 * args.max_items
            backlog_ids = [f"backlog-{i}" for i in range(backlog)]
            answered_before = len(results.arrived)
            send(producer, topics["requests"], backlog_ids, [uris[i % len(uris)] for i in range(backlog)], {})
            while len(results.arrived) == answered_before:  # the backlog has reached the model
                results.read(0.2)
            phase_started = time.time()
            report["backlog"] = {"requests": backlog, "levels": []}
            for level in LEVELS:
                batches.take()
                count = max(args.requests, args.per_client * level)
                think = batch_s if level == 1 else 0.0
                figures = {**clients(url, level, count, uploads, think), **batches.take()}
                report["backlog"]["levels"].append(figures)
                print("under_backlog", json.dumps(figures), flush=True)
            results.read(0.5)
            phase_s = time.time() - phase_started
            done = sum(1 for i in backlog_ids if i in results.arrived and results.arrived[i] >= phase_started)
            report["backlog"].update(
                {
                    "kafka_images_answered_meanwhile": done,
                    "kafka_images_per_s_meanwhile": round(done / phase_s, 3),
                    "still_queued_at_end": backlog - sum(1 for i in backlog_ids if i in results.arrived),
                }
            )
            print("backlog", json.dumps({k: v for k, v in report["backlog"].items() if k != "levels"}), flush=True)

            lone = report["backlog"]["levels"][0]["p99_ms"]
            bound = args.lane_wait_ms + 1.5 * batch_s * 1000
            saturated = report["alone"][-1]["steady_images_per_s"]
            report["targets"] = {
                "lone_p99_under_backlog_ms": lone,
                "lane_wait_plus_1.5_batches_ms": round(bound, 1),
                "lone_p99_within_bound": lone <= bound,
                "http_16_clients_images_per_s": saturated,
                "bulk_images_per_s": round(bulk_rate, 3),
                "http_over_bulk": round(saturated / bulk_rate, 3),
                "http_over_bulk_at_least_0.9": saturated / bulk_rate >= 0.9,
                "backlog_saturated_throughout": report["backlog"]["still_queued_at_end"] > 0,
            }
            print("targets", json.dumps(report["targets"]), flush=True)
            if args.out:
                args.out.write_text(json.dumps(report, indent=2) + "\n")
            producer.close()
            results.consumer.close()
        finally:
            worker.kill()  # the rest of the backlog is not the bench's business
            worker.wait(60)
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
