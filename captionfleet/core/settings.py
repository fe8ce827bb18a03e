"""Worker settings: the only module that reads the environment.

Every field can be set as ``WORKER_<FIELD>`` (nested groups with ``__``, e.g.
``WORKER_BATCH__MAX_ITEMS=16``) or in a ``.env`` file. Command-line flags override them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captionfleet.core.prompt_input import check_prompt

DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable and the fix."""


class ModelSettings(BaseModel):
    # A local checkpoint directory, s3://bucket/prefix, a Hugging Face hub id, or "builtin".
    ref: str = DEFAULT_MODEL
    # Remote checkpoints are downloaded here once, keyed by their ETags.
    cache_dir: Path = Path("~/.cache/captionfleet/models").expanduser()
    # "auto" picks CUDA when a GPU is visible, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Numeric fast path (captionfleet/core/fastpath.py). "auto": fp16 on CUDA; on CPU bf16 where it has native bf16
    # matmul, else int8 (per-row activation scales: a caption does not depend on its batch) where the CPU's
    # int8 GEMM is exact, else fp32 (oneDNN). "fp32" is the lossless path.
    precision: Literal["auto", "fp32", "bf16", "int8", "fp16"] = "auto"
    # torch's threads in this process. 0: the container's CPU limit (rounded down), else the cores it may
    # use; torch alone would start one per core of the node (captionfleet/core/threads.py). On CPU nodes, one worker
    # per core with 1 thread each is the layout least hurt by noisy neighbours (docs/benchmarks.md).
    threads: int = Field(default=0, ge=0, le=1024)
    # ViT-GPT2: decode through static KV caches kept per batch shape (1, 2, 4, ... up to
    # WORKER_BATCH__MAX_ITEMS), compiled into CUDA graphs on a GPU and warmed up at load (minutes there);
    # captionfleet/core/static_decoding.py. Opt-in until measured on a GPU; other families ignore it.
    static_cache: bool = False
    # With a ref s3://bucket/models/<name>/LATEST (as the trainer publishes) the streaming worker
    # re-reads LATEST this often and hot-swaps to a new version between batches (0 = never re-read).
    poll_interval_s: float = Field(default=30.0, ge=0)
    # A version that failed to load is tried again only after this long: the fix is usually a new version.
    retry_failed_s: float = Field(default=600.0, ge=0)
    # The longest prompt a request may carry, in characters (counted first) and in the model's tokens: a
    # batch is padded to its longest prompt, so one long prompt costs every row of its batch. A longer one
    # fails alone as malformed (captionfleet/core/families/limits.py).
    max_prompt_chars: int = Field(default=1000, ge=1)
    max_prompt_tokens: int = Field(default=256, ge=1)
    # The most pixels a dynamic-resolution family (Qwen-VL: the image's own size, in patches) resizes one
    # image to: its checkpoints allow 12.8-16.8 MP, 61k patches for a 12 MP photo. 1 MP is 1,337 visual
    # tokens for Qwen2-VL; the other families resize to their fixed size or splits whatever this says.
    max_visual_pixels: int = Field(default=1024 * 1024, ge=28 * 28)


class DecodingSettings(BaseModel):
    # Defaults follow the reference model card (4 beams, 16 tokens).
    num_beams: int = Field(default=4, ge=1, le=16)
    max_new_tokens: int = Field(default=16, ge=1, le=256)
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    length_penalty: float = 1.0


# The batch size and sequence limit when WORKER_BATCH__MAX_ITEMS is not set, per device (WorkerSettings
# applies them). On CPU 32 images, no sequence limit: a decoder GEMM's rows are images x beams, and the CPU's
# GEMMs run faster with more of them. Full architecture, 4 beams, 2 threads, model only, 32 images per round,
# batch sizes alternating in one process (median of 3 rounds, images/s, 16 -> 32): bf16 (Intel Xeon, AMX)
# 9.9 -> 11.6; int8 limited to AVX2 3.19 -> 3.42; int8 native 5.94 -> 5.97 (8, in separate runs, was 15-30%
# slower than 16).
# What it costs: a full batch takes its 32 images' time (3 s with bf16 on 2 AMX cores, 10 s with int8 on 2
# AVX2 cores) before any of its captions is out; a batch fills that far only under load (it waits at most
# max_wait_ms), and interactive requests are captioned between a running batch's steps (the latency lane).
# A GPU needs more rows to be busy, and a batch's decoding work and KV
# cache scale with its decoder sequences (images x beams), so one number of images is too few for greedy or
# too many for beams: 128 images, at most 128 sequences, is 128 greedy images or 32 at 4 beams, the GPU
# bench's planned batches (H200, fp16: 762 images/s greedy at 128, 144 at 4 beams and 32,
# docs/benchmarks.md). The sequence limit itself is not measured on a GPU yet.
CPU_BATCH = 32
CUDA_BATCH = 128
CPU_SEQUENCES = 0
CUDA_SEQUENCES = 128
# The pixel budget (max_pixels) derived with them. On CPU 8 Mpx, so that 32 images is ViT-GPT2's batch (224 px:
# 1.6 Mpx), GIT's and BLIP's (384 px: 4.7 Mpx), while the families that see far more pixels keep batches near or
# below the 8 images they had before 32 was the CPU default (their memory and batch time grow with their pixels):
# Florence-2 14 images (768 px), PaliGemma 10 (896 px), Qwen-VL 8 at its 1 Mpx; SmolVLM 2 at 13 splits of 512 px,
# 1 at 17 (it had ~7 under 32 Mpx: fewer, unmeasured). On a GPU 32 Mpx (BatchSettings below). Only ViT-GPT2 was
# measured at 32.
CPU_PIXELS = 8 * 1024 * 1024
CUDA_PIXELS = 32 * 1024 * 1024


class BatchSettings(BaseModel):
    max_items: int = Field(default=CPU_BATCH, ge=1, le=1024)
    # The wait is counted from the first item of a batch, so a lone image waits at most this.
    max_wait_ms: int = Field(default=50, ge=0)
    # Cost limit (0 = no limit): the pixels the model's vision encoder processes in one batch, each image
    # counted after resizing (ModelInput.cost: fixed for most families, a Qwen-VL image's visual tokens
    # times the pixels each covers, a SmolVLM image's splits), plus its prompt's tokens; bounds a batch's
    # work and memory. Unset, it follows the device with max_items: 8 Mpx on a CPU (CPU_PIXELS above: it keeps
    # the large-image families' CPU batches near 8 images), 32 Mpx on a GPU, never reached by a fixed-size
    # family at 4 beams (32 images; PaliGemma at 896 px is 25.7 Mpx for 32), reached by a GPU's greedy batches
    # of 128 above 512x512 px an image (PaliGemma: about 41 images). It binds for images whose size is their
    # own: SmolVLM's up to 17 splits (4.5 Mpx an image) and Qwen-VL at its WORKER_MODEL__MAX_VISUAL_PIXELS
    # (1 Mpx an image).
    max_pixels: int = Field(default=32 * 1024 * 1024, ge=0)
    # Second cost limit (0 = no limit): the decoder sequences in one batch, each image counted as its
    # decoding's num_beams (a request's own, else WORKER_DECODING__NUM_BEAMS), since the decoder runs and
    # caches one sequence per beam; the batch is at most max_items images and at most this many sequences.
    # Unset, it follows the device with max_items (CPU_SEQUENCES, CUDA_SEQUENCES above); when max_items is
    # set and this is not, it is 0, so a batch size set by hand means what it did before this limit.
    max_sequences: int = Field(default=CPU_SEQUENCES, ge=0, le=1024 * 16)
    # Images decoded ahead of the model; bounds memory while keeping the model fed. Unset, it follows the
    # batch size: two batches, at least 32 (64 on a CPU; 256 on a GPU, whose greedy batches hold 128).
    prefetch: int = Field(default=32, ge=1)
    # And the bytes they hold until their results are out (their batch's included): each input's prepared
    # tensors (25 MiB for a 1 Mpx Qwen-VL image, 600 KiB for ViT-GPT2's) and its source bytes, kept so
    # that a hot swap can prepare it again (worker/pipeline.py's HeldBytes).
    prefetch_mb: int = Field(default=1024, ge=1)
    # Threads decoding and preparing images (fetch, decode, resize, normalise). 0 (auto): on a GPU worker
    # every core of the container's CPU limit but one (the GPU outpaces any one core's decoding), on a CPU
    # worker 2 (the model's threads need the rest); captionfleet/core/threads.py.
    decode_threads: int = Field(default=0, ge=0, le=256)
    # Where JPEGs are decoded for a ViT-GPT2-style model (fixed-size preprocessing): on its GPU (nvJPEG through
    # torchvision, a batch's JPEGs in one call right before the model: captionfleet/core/gpu_images.py), since a
    # GPU captions faster than a node's cores decode large photos; or by the decode threads, one by one. The
    # decode threads still fetch, sniff and check each image's header and pixel limit either way; other formats,
    # JPEGs the device cannot take (CMYK, EXIF-rotated, huge) and other model families stay on the CPU. "auto":
    # on when the model runs on CUDA and torchvision's decoder loads, else off (a CPU worker: today's path).
    # "on": as auto, but a worker that cannot (no GPU, another family, no torchvision) refuses to start, so an
    # operator who asked for it learns at once instead of finding the CPU the bottleneck. "off": the CPU.
    device_decode: Literal["auto", "on", "off"] = "auto"

    def images_at(self, num_beams: int) -> int:
        """The most images a batch holds when each decodes with ``num_beams`` (at least one: an image with
        more beams than the sequence limit goes in a batch of its own)."""
        if not self.max_sequences:
            return self.max_items
        return max(1, min(self.max_items, self.max_sequences // num_beams))


class ImageSettings(BaseModel):
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    # Well below Pillow's decompression-bomb limit (~179 Mpx): a 50 Mpx RGB image is 150 MB.
    max_pixels: int = Field(default=50_000_000, ge=1)


class S3Settings(BaseModel):
    # Empty means AWS itself; set it for S3-compatible stores (SeaweedFS, MinIO, ...).
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Leave both empty to use the standard AWS credential chain (env, profile, web identity).
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None


class ShardSettings(BaseModel):
    # This worker's shard of the keys, numbered from 0. Unset: from JOB_COMPLETION_INDEX (a Kubernetes
    # Indexed Job sets it) when TOTAL is set, else the whole listing is one shard.
    index: int | None = Field(default=None, ge=0)
    # How many shards the keys are split into; in an Indexed Job set it to the Job's spec.completions
    # (Kubernetes exposes the index to pods but not the total).
    total: int | None = Field(default=None, ge=1, le=100_000)


class BulkS3Settings(BaseModel):
    """The S3 bulk job (``captionfleet caption s3://... --out s3://...``); ``prompt`` is every bulk job's."""

    # The prompt of every image of a bulk job (folder, S3 prefix, archive) that has none of its own (a
    # manifest's prompt column); None: the model family's default. Not the stream's: its requests carry theirs.
    prompt: str | None = None

    # Result part files; parquet for analytics, jsonl for line tools.
    format: Literal["parquet", "jsonl"] = "parquet"
    # A part is uploaded whole when it has this many rows or part_interval_s has passed since the
    # last one: a crash loses at most that much work, and parts stay few enough to list quickly.
    rows_per_part: int = Field(default=1000, ge=1)
    part_interval_s: float = Field(default=60.0, gt=0)
    # Only keys ending in one of these (case-insensitive, e.g. [".jpg", ".png"]); empty = every key,
    # so a mislabelled or non-image object still gets a failure row instead of vanishing.
    suffixes: list[str] = []
    # Objects outside [min_size, max_size] bytes are left out at listing time (max 0 = no bound).
    min_size: int = Field(default=0, ge=0)
    max_size: int = Field(default=0, ge=0)
    # GETs in flight at once; S3 latency, not bandwidth, limits one stream, so this is well above
    # the decode threads. fetch_ahead_mb bounds the bytes fetched but not yet handed to decoding.
    fetch_concurrency: int = Field(default=16, ge=1, le=256)
    fetch_ahead_mb: int = Field(default=256, ge=1)
    # Attempts per request (first try included) on throttling (503 SlowDown), 5xx and timeouts,
    # with exponential backoff and full jitter between them, capped at retry_max_s.
    retry_attempts: int = Field(default=5, ge=1, le=20)
    retry_base_s: float = Field(default=0.2, ge=0)
    retry_max_s: float = Field(default=10.0, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    list_page_size: int = Field(default=1000, ge=1, le=1000)
    # Keys listed ahead of the pipeline (bounds memory; the progress total is known this far ahead).
    list_ahead: int = Field(default=100_000, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _a_prompt(cls, value: Any) -> str | None:
        return check_prompt(value)  # the rule of every prompt (a PromptRefused is a ValueError: named by pydantic)


def _split_list(value: Any) -> Any:
    """``a,b`` or a JSON list: comma-separated is what people type into a Deployment's env."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class KafkaSettings(BaseModel):
    # host:port[,host:port]; required by `captionfleet worker`.
    bootstrap: str = ""
    request_topic: str = "caption-requests"
    result_topic: str = "caption-results"
    dead_letter_topic: str = "caption-dead-letters"
    group_id: str = "captionfleet-worker"
    # Static membership (KIP-345): a stable name per replica (e.g. the StatefulSet pod name) lets a
    # restarted worker take its partitions back without a rebalance, if it returns within the session timeout.
    group_instance_id: str | None = None
    # Names this worker in broker logs and in each result ("worker"); empty = host name and pid.
    client_id: str = ""
    # Where a new group starts: "earliest" so requests sent before the first worker came up are captioned.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # A crashed worker is noticed after this long; heartbeats are sent (by a background thread) at the interval.
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    # The consumer thread never blocks on the model (fetching is paused instead), so this only has to
    # cover one rebalance drain: the batches in flight when partitions are revoked.
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    max_poll_records: int = Field(default=64, ge=1)
    # How long the broker may hold a fetch while waiting for new messages. It bounds the latency a new
    # request can sit unseen on brokers that hold a fetch for the whole wait (the test broker does);
    # Kafka itself answers as soon as data arrives, so lower only costs idle fetch requests.
    fetch_max_wait_ms: int = Field(default=100, ge=0, le=10_000)
    # Requests between the consumer and the result topic (fetching, decoding, batched, captioned).
    # At this many, fetching pauses; worst-case image memory is about max_in_flight * images.max_bytes.
    max_in_flight: int = Field(default=64, ge=1)
    # Offsets are committed this often (after the producer has flushed): the most work a crash can redo.
    commit_interval_ms: int = Field(default=1_000, ge=0)
    # A result the broker has not acknowledged by then fails the worker (nothing is committed past it).
    produce_timeout_s: float = Field(default=30.0, gt=0)
    # A broker that stops answering (no reply to the group's heartbeats for the session timeout) is an
    # outage: fetching pauses, /readyz says so, no commit is tried, and the answers already sent wait in the
    # producer this long (its delivery timeout) for the broker to return; past it the worker stops (exit 1)
    # and the uncommitted work is redone after its restart.
    outage_budget_s: float = Field(default=300.0, gt=0)
    # Results are small; a few ms of linger batches them without adding visible latency.
    linger_ms: int = Field(default=5, ge=0)
    # The largest message the producer sends (its max_request_size); keep it at or below the topics'
    # max.message.bytes. Results and dead letters that would be larger carry a summary of the request's
    # passed-through fields instead: a message that cannot be sent would stop the worker on every restart.
    max_message_bytes: int = Field(default=1_000_000, ge=64 * 1024)
    # Broker security: PLAINTEXT for an in-cluster broker; SASL_SSL for managed Kafka (MSK, Confluent
    # Cloud, Event Hubs, ...); SSL alone for TLS or mutual TLS.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    # With SASL_*: the mechanism and its username/password (from a Secret, never a ConfigMap).
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str = ""
    sasl_password: SecretStr | None = None
    # With SSL / SASL_SSL: a CA bundle for a private CA (unset: the system's trust store), and a client
    # certificate and key for mutual TLS.
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


def split_host_port(entry: str) -> tuple[str, int | None]:
    """An allowed host, ``host`` or ``host:port`` (``[v6]:port``), as (lowercase host, port or None).
    Raises ValueError for anything else (a scheme, a path, credentials, a bad port)."""
    text = entry.strip().lower()
    with contextlib.suppress(ValueError):
        ipaddress.IPv6Address(text)  # a bare IPv6 address (urls write it inside [...]): its default port
        return text, None
    parts = urlsplit("//" + text)
    port = parts.port  # ValueError when not a number in 0-65535
    if not parts.hostname or parts.netloc != text or "@" in text or text.endswith(":") or port == 0:
        raise ValueError(f"{entry!r} is not a host")
    return parts.hostname, port


class FetchSettings(BaseModel):
    # Buckets that s3:// uris may name; anything else is refused as "forbidden" without a request.
    allowed_buckets: Annotated[list[str], NoDecode] = []
    # The one folder file:// uris may point into (no escape by "..", symlinks or hard-coded paths);
    # unset = file:// refused.
    file_root: Path | None = None
    # Hosts http(s):// uris (and every redirect they lead to) may name; empty = http(s) refused. A bare
    # "host" allows its scheme's default port only (80, 443), "host:port" that port: another service on an
    # allowed host (an admin or metrics port) is another target.
    allowed_hosts: Annotated[list[str], NoDecode] = []
    # Concurrent fetches (threads, and S3 connections).
    concurrency: int = Field(default=8, ge=1, le=256)
    # Attempts per object on throttling (503 SlowDown), 5xx and timeouts, with jittered exponential backoff.
    max_attempts: int = Field(default=4, ge=1, le=20)
    backoff_initial_ms: int = Field(default=100, ge=0)
    backoff_max_ms: int = Field(default=5_000, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=20.0, gt=0)
    # An S3 read that still fails as unreachable (refused, timed out, throttled or 5xx) after max_attempts is
    # an outage, not the image's failure: the stream pauses its partitions, reports not ready and retries the
    # read (waits of 1 s doubling up to outage_retry_max_s) for this long before dead-lettering it. 0: no
    # outage retries (every such read fails after max_attempts).
    outage_budget_s: float = Field(default=300.0, ge=0)
    outage_retry_max_s: float = Field(default=15.0, gt=0)
    # http(s): requests in flight to one host at once (a manifest of one site's urls must not flood it).
    per_host_concurrency: int = Field(default=4, ge=1, le=256)
    # Sent with every http(s) request, so a site can tell who fetches its images and reach the operator.
    user_agent: str = "captionfleet/0.1 (image captioning; +set WORKER_FETCH__USER_AGENT to name your contact)"
    # Honour X-Robots-Tag: noai / noimageai (failure kind opted_out); false only with the sites' consent.
    honour_opt_out: bool = True
    max_redirects: int = Field(default=5, ge=0, le=20)

    _split = field_validator("allowed_buckets", "allowed_hosts", mode="before")(_split_list)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            try:
                split_host_port(host)
            except ValueError:
                raise ValueError(
                    f"{host!r} is not host or host:port: list hosts without scheme or path, comma-separated "
                    "(cdn.example.com for its default port, cdn.example.com:8443 for another)"
                ) from None
        return [host.strip().lower() for host in hosts]


class MetricsSettings(BaseModel):
    enabled: bool = True
    # 0.0.0.0 so the Prometheus scraper and kubelet probes reach it inside a pod.
    host: str = "0.0.0.0"
    # 0 = any free port (it is logged).
    port: int = Field(default=9400, ge=0, le=65535)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


class HttpSettings(BaseModel):
    """The caption API (worker/http/): ``captionfleet serve``; ``captionfleet worker`` or a bulk job when enabled."""

    # `captionfleet worker` serves the API next to Kafka, and a bulk job (`captionfleet caption`, `captionfleet
    # worker --source`) next to its input while it runs, only when asked; `captionfleet serve` always does.
    enabled: bool = False
    # Loopback by default: an API reachable from elsewhere must have tokens (below), so a laptop run
    # needs none and a pod (0.0.0.0, set in k8s/base/worker.env) cannot start without them.
    host: str = "127.0.0.1"
    # Its own port, not the metrics port: the NetworkPolicy opens them to different clients, and the
    # probes and Prometheus keep answering while the API is saturated or draining. 0 = any free port.
    port: int = Field(default=8080, ge=0, le=65535)
    # Bearer tokens (comma-separated or a JSON list; from a Secret, never a ConfigMap). Required unless
    # the host is loopback; when set they are required on loopback too.
    tokens: Annotated[list[SecretStr], NoDecode] = []
    # A request body larger than this is refused with 413 before it is read whole.
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Images in one request; more is a 413.
    max_images: int = Field(default=16, ge=1, le=1024)
    # Requests being answered at once; one more is a 429 with Retry-After.
    max_concurrent: int = Field(default=64, ge=1)
    # Interactive images queued for the model (not yet in a batch); a request that would exceed it is a 429.
    max_queued: int = Field(default=256, ge=1)
    # A request not answered by then is a 504, and its images still queued are dropped.
    timeout_s: float = Field(default=30.0, gt=0)
    # The interactive lane's own batching wait: a batch holding an interactive image runs this long after
    # it arrived at the latest, however long the stream/bulk lane's WORKER_BATCH__MAX_WAIT_MS is.
    max_wait_ms: int = Field(default=5, ge=0)
    # While both lanes wait, at least this share of a batch's rows goes to stream/bulk images, so a flood of
    # interactive requests slows them down but never stops them.
    stream_share: float = Field(default=0.25, ge=0, lt=1)
    # Interactive images ready while a batch of stream/bulk images alone runs are captioned between two of its
    # decoding steps (core/between_steps.py), while it has been paused no longer than it ran; off, they wait for
    # the batch to end. During a pause both calls hold their memory: on a GPU whose batch settings fill its
    # memory, turn it off (or size the batches for two). Never with WORKER_MODEL__STATIC_CACHE (such batches are
    # not paused).
    pause_batches: bool = True
    # Decoding overrides a request may ask for (num_beams, max_new_tokens) are capped at these.
    max_num_beams: int = Field(default=8, ge=1, le=16)
    max_new_tokens: int = Field(default=64, ge=1, le=256)
    # Seconds a 429 or 503 tells the client to wait (Retry-After).
    retry_after_s: int = Field(default=1, ge=1)

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_list(cls, value: Any) -> Any:
        return _split_list(value)

    def auth_required(self) -> bool:
        return bool(self.tokens) or not is_loopback(self.host)

    def check_auth(self) -> None:
        """Raise SettingsError when the API would be reachable from elsewhere without tokens."""
        if not self.tokens and not is_loopback(self.host):
            raise SettingsError(
                f"WORKER_HTTP__HOST={self.host} serves the caption API beyond this machine, but "
                "WORKER_HTTP__TOKENS is empty: set it (from a Secret) to the bearer tokens clients send, "
                "or bind WORKER_HTTP__HOST=127.0.0.1"
            )


class ShutdownSettings(BaseModel):
    # SIGTERM to exit: finish the batch in flight, flush, commit, leave the group. Keep it below the
    # pod's terminationGracePeriodSeconds (30 by default), or the kubelet's SIGKILL comes first.
    grace_s: float = Field(default=25.0, gt=0)


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WORKER_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    model: ModelSettings = ModelSettings()
    decoding: DecodingSettings = DecodingSettings()
    batch: BatchSettings = BatchSettings()
    images: ImageSettings = ImageSettings()
    s3: S3Settings = S3Settings()
    shard: ShardSettings = ShardSettings()
    bulk: BulkS3Settings = BulkS3Settings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Streaming worker (`captionfleet worker`).
    # "json": one object per line, with the item's id, topic, partition and offset as fields.
    log_format: Literal["text", "json"] = "text"
    kafka: KafkaSettings = KafkaSettings()
    fetch: FetchSettings = FetchSettings()
    metrics: MetricsSettings = MetricsSettings()
    http: HttpSettings = HttpSettings()
    shutdown: ShutdownSettings = ShutdownSettings()

    @model_validator(mode="after")
    def _batch_for_the_device(self) -> WorkerSettings:
        values = dict(self.batch.__dict__)
        chosen = set(self.batch.model_fields_set)
        # Only the batch size (and with it the sequence and pixel limits) and the decode threads depend on the device:
        # with both set, torch is not asked about it.
        if "max_items" not in chosen or not values["decode_threads"]:
            on_cuda = runs_on_cuda(self.model.device)
            if "max_items" not in chosen:
                values["max_items"] = CUDA_BATCH if on_cuda else CPU_BATCH
                # Derived only with max_items (see BatchSettings): a batch size set by hand keeps its meaning.
                if "max_sequences" not in chosen:
                    values["max_sequences"] = CUDA_SEQUENCES if on_cuda else CPU_SEQUENCES
                if "max_pixels" not in chosen:
                    values["max_pixels"] = CUDA_PIXELS if on_cuda else CPU_PIXELS
            if not values["decode_threads"]:
                from captionfleet.core.threads import decode_threads  # here: threads imports torch

                values["decode_threads"] = decode_threads(0, on_cuda=on_cuda)
                chosen.discard("decode_threads")  # 0 set by hand is auto too: derived again like the default
        if "prefetch" not in chosen:
            values["prefetch"] = prefetch_for(values["max_items"])
        # Constructed, not copied: the derived fields stay "not set by the user", so when a command-line
        # --device changes the device the settings are validated again and these defaults follow.
        self.batch = BatchSettings.model_construct(_fields_set=chosen, **values)
        return self


def prefetch_for(max_items: int) -> int:
    """WORKER_BATCH__PREFETCH when unset: two batches decoded ahead, so the next is ready when the model
    is, and at least the 32 that always kept a CPU worker fed."""
    return max(32, 2 * max_items)


def runs_on_cuda(device: str) -> bool:
    """Where a model setting runs: "auto" means the GPU when one is visible (captioner.pick_device too)."""
    if device != "auto":
        return device == "cuda"
    import torch  # here, not at the top: the dashboard and the CLI's --help need no torch for settings

    return bool(torch.cuda.is_available())


class KubernetesJobEnv(BaseSettings):
    """What Kubernetes sets in an Indexed Job's pods (no WORKER_ prefix: the names are Kubernetes')."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    job_completion_index: int | None = Field(default=None, ge=0)


def describe_validation_error(error: ValidationError, prefix: str) -> str:
    """One line per bad field, naming the environment variable to fix."""
    lines = []
    for item in error.errors():
        var = prefix + "__".join(str(part) for part in item["loc"]).upper()
        got = item.get("input")
        lines.append(f"{var}={got!r}: {item['msg']}; fix: set {var} to a valid value or unset it")
    return "\n".join(lines)


def load_worker_settings() -> WorkerSettings:
    try:
        return WorkerSettings()
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, "WORKER_")) from error


def with_overrides(settings: WorkerSettings, overrides: dict[str, Any]) -> WorkerSettings:
    """Command-line values (``{"batch.max_items": 3}``; None = flag not given) win over the environment,
    validated like the environment is. Only what the environment set is carried over, so defaults that
    depend on other settings (the batch size on the device) are derived again from the final values."""
    data = settings.model_dump(exclude_unset=True)
    for path, value in overrides.items():
        if value is None:
            continue
        *groups, field = path.split(".")
        target = data
        for group in groups:
            target = target.setdefault(group, {})
        target[field] = value
    return WorkerSettings.model_validate(data)


def load_kubernetes_job_env() -> KubernetesJobEnv:
    try:
        return KubernetesJobEnv()
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, "")) from error
