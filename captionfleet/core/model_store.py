"""Model references -> local checkpoint directories that are safe to load.

A reference is ``builtin``, a local directory, ``s3://bucket/prefix`` or a Hugging Face hub id
(``org/name``). Only safetensors weights are ever loaded: pickled weights (``*.bin``, ``*.pt``, ...)
can run code when unpickled, so they are refused, and from object storage never even downloaded.
Checkpoint code is never run either: a checkpoint whose configs name code of its own (``auto_map``)
is refused here, before transformers reads it, and every load passes ``trust_remote_code=False``
(see core/checkpoint_load.py).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.family import NATIVE_CONVERSIONS
from captionfleet.core.s3 import describe_error, make_s3_client, parse_s3_uri
from captionfleet.core.settings import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

BUILTIN_REF = "builtin"

PICKLED_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
# What a checkpoint needs: configs, weights, tokenizer and processor files, and the chat template
# (transformers 5 saves it as chat_template.jinja, not inside tokenizer_config.json: a chat model without
# it cannot build its prompt). Anything else under a prefix (READMEs, optimizer state, pickles) is
# skipped. The one list: the S3 resolver, the hub download and the registry's upload all read it.
ALLOWED_SUFFIXES = frozenset({".json", ".txt", ".safetensors", ".model", ".tiktoken", ".jinja"})
# The same rule for the hub, as snapshot_download patterns.
HUB_ALLOW_PATTERNS = sorted(f"*{suffix}" for suffix in ALLOWED_SUFFIXES)

CONVERT_HINT = (
    'convert them in a trusted environment: python -c "from transformers import VisionEncoderDecoderModel '
    "as M; M.from_pretrained('DIR').save_pretrained('DIR')\" (save_pretrained writes model.safetensors)"
)
CHOICES_HINT = "pass --model with a local checkpoint directory, s3://bucket/prefix, or builtin"
S3_FIX_HINT = (
    "check the uri, WORKER_S3__ENDPOINT_URL and the credentials (WORKER_S3__ACCESS_KEY_ID / "
    "WORKER_S3__SECRET_ACCESS_KEY, or the AWS credential chain)"
)
# "org/name" as the hub spells repo ids.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# The weights transformers loads from a directory: the one file, else the shards its index names.
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
REMOTE_CODE_HINT = (
    "captionfleet never runs checkpoint code: use a checkpoint of a model type transformers ships "
    "(vision-encoder-decoder, blip, git, florence2, paligemma, smolvlm, qwen2_vl, llava, ..., as save_pretrained "
    "writes it)"
)
# How long to wait for a TCP connection to the hub before treating it as offline.
HUB_PROBE_TIMEOUT_S = 3.0


class ModelRefError(Exception):
    """A model reference cannot be resolved to a loadable checkpoint; the message names the fix."""


# -- checks --------------------------------------------------------------------------------------


def builtin_model_dir() -> Path:
    """The demo checkpoint shipped as package data (``captionfleet/core/builtin_model/``)."""
    path = Path(str(importlib.resources.files("captionfleet.core") / "builtin_model"))
    if not (path / "config.json").is_file():
        raise ModelRefError(
            "built-in demo model not found: reinstall captionfleet, or in a checkout build it with "
            f"`captionfleet train --preset shapes --out-dir {path}`, or pass --model with a local checkpoint "
            "directory or s3://bucket/prefix"
        )
    return path


def check_checkpoint_dir(path: Path) -> None:
    """Raise ModelRefError unless ``path`` holds config.json and safetensors weights."""
    if not path.is_dir():
        raise ModelRefError(f"model directory {str(path)!r} does not exist or is not a directory; {CHOICES_HINT}")
    if not (path / "config.json").is_file():
        raise ModelRefError(
            f"{str(path)!r} is not a checkpoint: it has no config.json; point --model at a directory "
            "written by save_pretrained"
        )
    safetensors = list(path.glob("*.safetensors"))
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled and not safetensors:
        raise ModelRefError(
            f"{str(path)!r} has only pickled weights ({', '.join(pickled)}): only safetensors are loaded; "
            + CONVERT_HINT.replace("DIR", str(path))
        )
    if not safetensors:
        raise ModelRefError(
            f"{str(path)!r} has no *.safetensors weights; save the model with save_pretrained "
            "(it writes model.safetensors)"
        )
    if pickled:
        log.warning("%s: ignoring pickled files %s; only safetensors are loaded", path, ", ".join(pickled))
    for config in sorted(path.glob("*config.json")):
        _refuse_checkpoint_code(config)
    weight_files(path)


def _read_json(file: Path) -> object:
    if not file.is_file():  # a FIFO would block the read forever
        raise ModelRefError(f"{str(file)!r} is not a regular file; write the checkpoint again with save_pretrained")
    try:
        return json.loads(file.read_bytes())
    # ValueError: bad JSON or bad UTF-8; RecursionError: nesting deeper than the parser goes
    except (OSError, ValueError, RecursionError) as error:
        raise ModelRefError(
            f"{str(file)!r} is not readable JSON ({error}); write the checkpoint again with save_pretrained"
        ) from error


def model_type_of(path: Path) -> str:
    """config.json's model_type ("" when it has none), read without transformers."""
    config = _read_json(path / "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else ""


def _refuse_checkpoint_code(config: Path) -> None:
    # transformers imports the modules auto_map names from the checkpoint folder (after a y/N prompt
    # on a terminal, or a "y" waiting on stdin): refuse before it ever reads the file. Nested configs
    # (a VisionEncoderDecoder's encoder and decoder) are searched too.
    top = _read_json(config)
    pending = [top]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if "auto_map" in value:
                raise ModelRefError(_remote_code_message(config, top))
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _remote_code_message(config: Path, top: object) -> str:
    """Names the checkpoint's family and, where transformers ships one, its native conversion."""
    model_type = top.get("model_type") if isinstance(top, dict) else None
    family = f", model type {model_type!r}" if isinstance(model_type, str) and model_type else ""
    native = NATIVE_CONVERSIONS.get(model_type) if isinstance(model_type, str) else None
    fix = (
        f"captionfleet never runs checkpoint code: use the native conversion instead, {native}"
        if native
        else REMOTE_CODE_HINT
    )
    return f"{str(config.parent)!r} needs code of its own (auto_map in {config.name}{family}); {fix}"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files transformers loads from ``path``: model.safetensors, else the shards its
    index names, each a .safetensors file in ``path`` itself (ModelRefError otherwise)."""
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    index_file = path / WEIGHTS_INDEX_FILE
    if not index_file.is_file():
        raise ModelRefError(
            f"{str(path)!r} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE} naming its shards); "
            "save the model with save_pretrained"
        )
    index = _read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelRefError(f"{str(index_file)!r} has no weight_map; write the checkpoint again with save_pretrained")
    shards = sorted({str(name) for name in weight_map.values()})
    for shard in shards:
        if Path(shard).suffix in PICKLED_SUFFIXES:
            raise ModelRefError(
                f"{str(index_file)!r} names the pickled shard {shard!r}: only safetensors are loaded; "
                + CONVERT_HINT.replace("DIR", str(path))
            )
        if not shard.endswith(".safetensors") or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ModelRefError(
                f"{str(index_file)!r} names {shard!r}, which is not a .safetensors file beside it; "
                "write the checkpoint again with save_pretrained"
            )
        if not (path / shard).is_file():
            raise ModelRefError(
                f"{str(path)!r} lacks the shard {shard!r} that {WEIGHTS_INDEX_FILE} names; copy it there"
            )
    return [path / shard for shard in shards]


# -- resolution ----------------------------------------------------------------------------------


def resolve_model_ref(ref: str, *, cache_dir: Path, s3: S3Settings | None = None) -> Path:
    """A local directory holding the checkpoint ``ref`` names, checked with check_checkpoint_dir."""
    ref = ref.strip()
    if ref == BUILTIN_REF:
        path = builtin_model_dir()
    elif ref.startswith("s3://"):
        path = _resolve_s3(ref, cache_dir=cache_dir, settings=s3 or S3Settings())
    elif Path(ref).expanduser().exists():
        path = Path(ref).expanduser()
    elif HUB_ID_RE.match(ref):
        path = _resolve_hub(ref, cache_dir=cache_dir)
    else:
        raise ModelRefError(f"model {ref!r} is not an existing directory, s3:// uri or hub id; {CHOICES_HINT}")
    check_checkpoint_dir(path)
    return path


def _resolve_s3(uri: str, *, cache_dir: Path, settings: S3Settings) -> Path:
    try:
        bucket, prefix = parse_s3_uri(uri)
    except ValueError as error:
        raise ModelRefError(f"{error}; {CHOICES_HINT}") from error
    # "models/tiny" must not also match "models/tiny2/...".
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    client = make_s3_client(settings)
    try:
        objects = _list_objects(client, bucket, prefix)
    except (ClientError, BotoCoreError) as error:
        raise ModelRefError(f"could not list {uri}: {describe_error(error)}; {S3_FIX_HINT}") from error

    files: dict[str, tuple[str, str, int]] = {}  # relative path -> (key, etag, size)
    pickled: list[str] = []
    for key, etag, size in objects:
        rel = key[len(prefix) :]
        if not rel or rel.endswith("/"):
            continue  # directory markers
        suffix = PurePosixPath(rel).suffix
        if suffix in PICKLED_SUFFIXES:
            pickled.append(rel)
        elif suffix in ALLOWED_SUFFIXES:
            files[_safe_relative(rel, uri)] = (key, etag, size)
        else:
            log.debug("%s: skipping %s (not a checkpoint file)", uri, rel)
    has_safetensors = any(rel.endswith(".safetensors") for rel in files)

    # Decide before downloading anything: pickled weights are never fetched.
    if not objects:
        raise ModelRefError(
            f"no objects under {uri}: publish a checkpoint there first, or fix the bucket/prefix; " + S3_FIX_HINT
        )
    if pickled and not has_safetensors:
        raise ModelRefError(
            f"{uri} holds only pickled weights ({', '.join(sorted(pickled))}): only safetensors are loaded; "
            + CONVERT_HINT.replace("DIR", "LOCAL_DIR")
            + f", then upload model.safetensors to {uri}"
        )
    if "config.json" not in files or not has_safetensors:
        raise ModelRefError(
            f"{uri} is not a complete checkpoint (needs config.json and *.safetensors; found "
            f"{', '.join(sorted(files)) or 'nothing usable'}); upload a save_pretrained directory there"
        )
    if pickled:
        log.warning("%s: not downloading pickled files %s; only safetensors are loaded", uri, ", ".join(pickled))

    target = cache_dir / _cache_key(bucket, prefix, files)
    if (target / "config.json").is_file():
        log.info("model %s: using cached %s", uri, target)
        return target
    _download(client, uri, files, target)
    return target


def _list_objects(client: S3Client, bucket: str, prefix: str) -> list[tuple[str, str, int]]:
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found.append((obj["Key"], obj.get("ETag", ""), obj.get("Size", 0)))
    return found


def _safe_relative(rel: str, uri: str) -> str:
    # Keys become file paths: refuse anything that could escape the cache directory.
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in rel:
        raise ModelRefError(f"{uri} holds an object with an unsafe name {rel!r}; rename or remove it")
    return rel


def _cache_key(bucket: str, prefix: str, files: dict[str, tuple[str, str, int]]) -> str:
    # ETags change when an object's content does, so a changed object gives a new directory and an
    # unchanged checkpoint is downloaded once.
    listing = sorted((key, etag) for key, etag, _ in files.values())
    digest = hashlib.sha256(json.dumps([bucket, prefix, listing]).encode()).hexdigest()
    return digest[:16]


def _download(client: S3Client, uri: str, files: dict[str, tuple[str, str, int]], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target, then rename: a reader never sees half a checkpoint, and a crash
    # leaves only a .tmp- directory behind.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        for rel, (key, etag, size) in sorted(files.items()):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                # IfMatch: the object must still be the one the cache key was computed from.
                response = client.get_object(Bucket=_bucket_of(uri), Key=key, IfMatch=etag)
                with dest.open("wb") as out:
                    shutil.copyfileobj(response["Body"], out, length=1024 * 1024)
            except (ClientError, BotoCoreError) as error:
                raise ModelRefError(
                    f"could not download s3://{_bucket_of(uri)}/{key}: {describe_error(error)} "
                    f"(if it changed while downloading, retry); {S3_FIX_HINT}"
                ) from error
            if dest.stat().st_size != size:
                raise ModelRefError(
                    f"s3://{_bucket_of(uri)}/{key}: got {dest.stat().st_size} bytes, listed {size}; "
                    "it changed while downloading: retry"
                )
        log.info("model %s: downloaded %d files to %s", uri, len(files), target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same download first: its copy is identical.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bucket_of(uri: str) -> str:
    return parse_s3_uri(uri)[0]


# -- Hugging Face hub ----------------------------------------------------------------------------


def _resolve_hub(repo_id: str, *, cache_dir: Path) -> Path:
    # Imported here: only hub refs need it, and importing it reads HF_* environment variables.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline_message = (
        f"could not load model {repo_id!r}: the Hugging Face hub is unreachable and it is not in the cache; "
        + CHOICES_HINT
    )
    # Without a reachable hub, look in the cache only, at once, instead of waiting on hub timeouts.
    local_only = bool(constants.HF_HUB_OFFLINE) or not _hub_reachable(constants.ENDPOINT)
    try:
        path = snapshot_download(
            repo_id,
            cache_dir=cache_dir / "hub",
            allow_patterns=HUB_ALLOW_PATTERNS,
            local_files_only=local_only,
            etag_timeout=HUB_PROBE_TIMEOUT_S,
        )
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        raise ModelRefError(
            f"could not load model {repo_id!r}: not found on the Hugging Face hub (or private/gated: "
            f"set HF_TOKEN); {CHOICES_HINT}"
        ) from error
    except (OSError, ValueError) as error:  # LocalEntryNotFoundError, network and HTTP errors
        log.debug("hub download of %s failed: %s", repo_id, error)
        raise ModelRefError(offline_message) from error
    return Path(str(path))


def _hub_reachable(endpoint: str) -> bool:
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct connection says nothing behind a proxy: let the hub client try
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)

    def connect() -> None:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            pass

    # A thread bounds DNS resolution too, which socket timeouts do not cover.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=HUB_PROBE_TIMEOUT_S)
        return True
    except (OSError, concurrent.futures.TimeoutError):
        log.info("Hugging Face hub %s unreachable: using the local cache only", endpoint)
        return False
    finally:
        pool.shutdown(wait=False)
