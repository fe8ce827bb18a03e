"""Streaming worker latency and capacity, end to end through a real broker.

    python bench/stream_latency.py                  # tiny test model
    python bench/stream_latency.py --model full     # ViT-base/16 + GPT-2 124M, random weights (real compute)
    python bench/stream_latency.py --model DIR      # any checkpoint directory

What it does: starts the Kafka-compatible test broker, starts the worker as in production
(`python -m captionfleet.worker`, its own process), then

1. capacity: sends ``--flood`` requests at once and times their results: the drain rate is the
   maximum sustained rate (requests/s) with these settings on this machine;
2. latency: sends requests at a steady ``--load`` fraction of that rate for ``--seconds`` and reports
   produce -> result latency percentiles, measured by this script (send time to the moment the result
   is read back), next to the worker's own end_to_end_ms (message timestamp to result sent).

Images are 640x480 JPEGs read through file:// (the fetch policy's folder), so S3 latency is not part
of the figures. Prints the settings and one JSON line of results per phase.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.services.kafka import KafkaBroker, free_port  # noqa: E402

# Per-result timings the worker reports, shown as means to say where the latency goes.
PARTS = ("fetch_ms", "decode_ms", "queue_ms", "inference_ms")


def make_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        # Smooth gradients plus noise: compresses like a photo, decodes like one.
        base = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 25, (480, 640, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        path = folder / f"img-{i}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def build_checkpoint(kind: str, folder: Path) -> Path:
    if kind == "tiny":
        from tests.conftest import save_tiny_checkpoint

        return save_tiny_checkpoint(folder / "tiny")
    if kind == "full":
        from bench.full_checkpoint import save_full_checkpoint

        return save_full_checkpoint(folder / "full")
    return Path(kind)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class Results:
    """Reads the result and dead-letter topics from their end; records when each id arrived."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        # A short fetch wait: the test broker holds fetches for the whole wait, which would add to every figure.
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
        parts = [TopicPartition(t, p) for t in topics for p in sorted(self.consumer.partitions_for_topic(t) or [])]
        self.consumer.assign(parts)
        self.consumer.seek_to_end(*parts)
        for tp in parts:
            self.consumer.position(tp)  # resolve "end" now, before anything is sent
        self.arrived: dict[str, float] = {}
        self.worker_ms: dict[str, float] = {}
        self.parts: dict[str, dict[str, float]] = {}
        self.failed = 0

    def read(self, timeout_s: float) -> None:
        for records in self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=5000).values():
            now = time.time()
            for record in records:
                value = json.loads(record.value)
                self.arrived.setdefault(value["id"], now)
                if value.get("end_to_end_ms") is not None:
                    self.worker_ms[value["id"]] = value["end_to_end_ms"]
                    self.parts[value["id"]] = {k: value.get(k) or 0.0 for k in PARTS}
                if "kind" in value:
                    self.failed += 1

    def wait_for(self, ids: list[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.read(0.2)
            if all(i in self.arrived for i in ids):
                return True
        return False


def send(producer: KafkaProducer, topic: str, ids: list[str], uris: list[str], sent: dict[str, float]) -> None:
    for request_id, uri in zip(ids, uris, strict=True):
        sent[request_id] = time.time()
        producer.send(topic, key=request_id.encode(), value=json.dumps({"id": request_id, "uri": uri}).encode())
    producer.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, full, or a checkpoint directory")
    p.add_argument("--flood", type=int, default=400, help="requests for the capacity phase")
    p.add_argument(
        "--load", type=float, nargs="+", default=[0.25, 0.5], help="steady rates, as fractions of the measured capacity"
    )
    p.add_argument("--seconds", type=float, default=30, help="length of the steady phase")
    p.add_argument("--max-items", type=int, default=16, help="WORKER_BATCH__MAX_ITEMS")
    p.add_argument("--max-wait-ms", type=int, default=20, help="WORKER_BATCH__MAX_WAIT_MS")
    p.add_argument("--beams", type=int, default=1, help="WORKER_DECODING__NUM_BEAMS")
    p.add_argument("--max-new-tokens", type=int, default=16, help="WORKER_DECODING__MAX_NEW_TOKENS")
    p.add_argument("--max-in-flight", type=int, default=64, help="WORKER_KAFKA__MAX_IN_FLIGHT")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--device", default="auto", help="WORKER_MODEL__DEVICE")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="captionfleet-bench-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    (work / "images").mkdir()
    images = make_images(work / "images", 32)
    checkpoint = build_checkpoint(args.model, work)
    topics = {"requests": "bench-requests", "results": "bench-results", "dead": "bench-dead"}
    settings = {
        "model": args.model,
        "checkpoint": str(checkpoint),
        "device": args.device,
        "batch_max_items": args.max_items,
        "batch_max_wait_ms": args.max_wait_ms,
        "num_beams": args.beams,
        "max_new_tokens": args.max_new_tokens,
        "max_in_flight": args.max_in_flight,
        "partitions": args.partitions,
        "image": "640x480 JPEG via file://",
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    print("settings", json.dumps(settings), flush=True)

    with KafkaBroker() as broker:
        broker.create_topic(topics["requests"], args.partitions)
        broker.create_topic(topics["results"], 2)
        broker.create_topic(topics["dead"], 1)
        port = free_port()
        env = worker_env(args, broker.bootstrap, topics, checkpoint, images[0].parent, port)
        log = (work / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "captionfleet.worker"], env=env, cwd=REPO, stdout=log, stderr=log
        )
        try:
            wait_ready(port, worker, work / "worker.log")
            results = Results(broker.bootstrap, [topics["results"], topics["dead"]])
            producer = broker.producer(linger_ms=0)
            uris = [f"file://{path}" for path in images]

            # 1. capacity: everything at once; the drain rate is what the worker sustains.
            capacity = measure_capacity(args.flood, producer, topics["requests"], uris, results)
            if capacity is None:
                return 1

            # 2. latency at steady rates below capacity.
            for load in args.load:
                if not steady(args, load, capacity, producer, topics["requests"], uris, results):
                    return 1
            batch = scrape(port, "captionfleet_batch_size")
            print("worker", json.dumps({"mean_batch_size_all_phases": batch}), flush=True)
            producer.close()
            results.consumer.close()
        finally:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
            log.close()
    return 0


def worker_env(
    args: argparse.Namespace, bootstrap: str, topics: dict[str, str], checkpoint: Path, file_root: Path, port: int
) -> dict[str, str]:
    """The worker's environment: this one's, less any WORKER_* it has, plus the bench's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.update(
        {
            "WORKER_KAFKA__BOOTSTRAP": bootstrap,
            "WORKER_KAFKA__REQUEST_TOPIC": topics["requests"],
            "WORKER_KAFKA__RESULT_TOPIC": topics["results"],
            "WORKER_KAFKA__DEAD_LETTER_TOPIC": topics["dead"],
            "WORKER_KAFKA__GROUP_ID": "bench",
            "WORKER_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            "WORKER_KAFKA__MAX_IN_FLIGHT": str(args.max_in_flight),
            "WORKER_MODEL__REF": str(checkpoint),
            "WORKER_MODEL__DEVICE": args.device,
            "WORKER_BATCH__MAX_ITEMS": str(args.max_items),
            "WORKER_BATCH__MAX_WAIT_MS": str(args.max_wait_ms),
            "WORKER_DECODING__NUM_BEAMS": str(args.beams),
            "WORKER_DECODING__MAX_NEW_TOKENS": str(args.max_new_tokens),
            "WORKER_FETCH__FILE_ROOT": str(file_root),
            "WORKER_METRICS__HOST": "127.0.0.1",
            "WORKER_METRICS__PORT": str(port),
            "WORKER_LOG_LEVEL": "WARNING",
        }
    )
    return env


def measure_capacity(
    flood: int, producer: KafkaProducer, topic: str, uris: list[str], results: Results
) -> float | None:
    """Send ``flood`` requests at once; the results' drain rate (per second), or None when they never came."""
    ids = [f"flood-{i}" for i in range(flood)]
    sent: dict[str, float] = {}
    started = time.time()
    send(producer, topic, ids, [uris[i % len(uris)] for i in range(len(ids))], sent)
    if not results.wait_for(ids, timeout_s=1800):
        print("capacity phase timed out", file=sys.stderr)
        return None
    # Count from the first result: the worker's poll cadence and warm batching are not capacity.
    first = min(results.arrived[i] for i in ids)
    last = max(results.arrived[i] for i in ids)
    capacity = (len(ids) - 1) / max(last - first, 1e-9)
    print(
        "capacity",
        json.dumps(
            {
                "requests": len(ids),
                "seconds_first_to_last_result": round(last - first, 2),
                "seconds_total": round(last - started, 2),
                "max_sustained_rate_per_s": round(capacity, 2),
                "failed": results.failed,
            }
        ),
        flush=True,
    )
    return capacity


def steady(
    args: argparse.Namespace,
    load: float,
    capacity: float,
    producer: KafkaProducer,
    topic: str,
    uris: list[str],
    results: Results,
) -> bool:
    """Send at ``load`` x capacity for ``--seconds``; print produce -> result latency percentiles."""
    rate = capacity * load
    count = max(10, int(rate * args.seconds))
    ids = [f"steady-{load}-{i}" for i in range(count)]
    sent: dict[str, float] = {}
    sender = threading.Thread(target=paced, args=(producer, topic, ids, uris, rate, sent), daemon=True)
    sender.start()
    ok = results.wait_for(ids, timeout_s=args.seconds * 4 + 600)
    sender.join()
    if not ok:
        print("latency phase timed out", file=sys.stderr)
        return False
    latency_ms = [(results.arrived[i] - sent[i]) * 1000 for i in ids]
    worker_ms = [results.worker_ms[i] for i in ids if i in results.worker_ms]
    figures = {
        "rate_per_s": round(rate, 2),
        "load_fraction": load,
        "requests": count,
        "p50_ms": round(percentile(latency_ms, 50), 1),
        "p90_ms": round(percentile(latency_ms, 90), 1),
        "p99_ms": round(percentile(latency_ms, 99), 1),
        "max_ms": round(max(latency_ms), 1),
        "mean_ms": round(statistics.fmean(latency_ms), 1),
        "worker_end_to_end_p50_ms": round(percentile(worker_ms, 50), 1),
        "worker_end_to_end_p99_ms": round(percentile(worker_ms, 99), 1),
        **{f"mean_{part}": round(statistics.fmean(results.parts[i][part] for i in ids), 1) for part in PARTS},
    }
    print("latency", json.dumps(figures), flush=True)
    return True


def paced(
    producer: KafkaProducer, topic: str, ids: list[str], uris: list[str], rate: float, sent: dict[str, float]
) -> None:
    start = time.monotonic()
    for n, request_id in enumerate(ids):
        # Scheduled sends (not sleep-after-send), so the rate holds even when a send is slow.
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[request_id] = time.time()
        value = json.dumps({"id": request_id, "uri": uris[n % len(uris)]}).encode()
        producer.send(topic, key=request_id.encode(), value=value)
        producer.flush()


def wait_ready(port: int, worker: subprocess.Popen[bytes], log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"worker exited with {worker.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"worker not ready after {timeout_s}s")


def scrape(port: int, histogram: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(histogram + suffix + " "):
                values[suffix] = float(line.split()[-1])
    if values.get("_count"):
        return round(values["_sum"] / values["_count"], 2)
    return None


if __name__ == "__main__":
    sys.exit(main())
