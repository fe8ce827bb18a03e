"""Split a listing over N workers by a stable hash of each key.

Every worker lists the same prefix and keeps the keys whose hash lands on its shard, so the shards
together cover every key exactly once with no coordination. The hash is of the key alone
(BLAKE2b, not Python's ``hash()``, which is salted per process), so a key stays in its shard across
runs, machines and Python versions; changing N reshuffles keys, which is why the output folder of a
shard names N as well as i.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from captionfleet.core.settings import SettingsError, ShardSettings

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def shard_of(key: str, total: int) -> int:
    """The shard (0 <= shard < total) that ``key`` belongs to; the same on every machine."""
    if total < 1:
        raise ValueError(f"the number of shards must be at least 1, got {total}")
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % total


@dataclass(frozen=True)
class ShardSpec:
    index: int = 0
    total: int = 1

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"shard total must be at least 1, got {self.total}")
        if not 0 <= self.index < self.total:
            raise ValueError(
                f"shard {self.index}/{self.total} does not exist: shards are numbered from 0, "
                f"so use 0/{self.total} .. {self.total - 1}/{self.total}"
            )

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``"i/N"`` (0-based, as Kubernetes numbers Indexed Job pods)."""
        match = _SHARD_RE.match(text)
        if not match:
            raise ValueError(f"--shard {text!r} is not i/N: write e.g. --shard 0/4 (shards numbered from 0)")
        return cls(int(match.group(1)), int(match.group(2)))

    def owns(self, key: str) -> bool:
        return self.total == 1 or shard_of(key, self.total) == self.index

    @property
    def name(self) -> str:
        """The shard's folder under the output prefix; N is part of it because N decides the keys."""
        return f"shard-{self.index:05d}-of-{self.total:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"


def resolve_shard(flag: str | None, settings: ShardSettings, job_completion_index: int | None) -> ShardSpec:
    """The shard to run: ``--shard`` wins, then WORKER_SHARD__INDEX/TOTAL, then the Indexed Job index.

    Raises SettingsError (naming the variable to set) when only half of a shard is given: silently
    captioning everything in each of N pods would do the work N times.
    """
    if flag is not None:
        try:
            return ShardSpec.parse(flag)
        except ValueError as error:
            raise SettingsError(str(error)) from error
    index = settings.index if settings.index is not None else job_completion_index
    origin = "WORKER_SHARD__INDEX" if settings.index is not None else "JOB_COMPLETION_INDEX"
    if index is None and settings.total is None:
        return ShardSpec()
    if settings.total is None:
        raise SettingsError(
            f"{origin}={index} is set but WORKER_SHARD__TOTAL is not: set WORKER_SHARD__TOTAL to the number "
            "of shards (for a Kubernetes Indexed Job, its spec.completions), or pass --shard i/N"
        )
    if index is None:
        raise SettingsError(
            f"WORKER_SHARD__TOTAL={settings.total} is set but no shard index is: set WORKER_SHARD__INDEX, run as a "
            "Kubernetes Indexed Job (it sets JOB_COMPLETION_INDEX), or pass --shard i/N"
        )
    try:
        return ShardSpec(index, settings.total)
    except ValueError as error:
        raise SettingsError(f"{origin}={index}, WORKER_SHARD__TOTAL={settings.total}: {error}") from error
