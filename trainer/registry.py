"""The model registry in object storage, written: uploads, records, LATEST and its history.

The layout (what lives where under ``s3://bucket/models/<name>``) and how it is read are in
captionfleet/core/registry_layout.py, shared with the workers and the dashboard; this is the writer,
which only the trainer uses.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from captionfleet.core.model_store import ALLOWED_SUFFIXES, PICKLED_SUFFIXES, ModelRefError
from captionfleet.core.registry_layout import (
    HISTORY,
    LATEST,
    METADATA_FILE,
    RECORDS,
    VERSIONS,
    check_version,
    latest_root,
    parse_latest,
    read_latest,
)
from captionfleet.core.s3 import is_not_found, make_s3_client, parse_s3_uri
from captionfleet.core.settings import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)


class RegistryError(Exception):
    """A registry operation cannot be done; the message names the fix."""


class LatestMovedError(RegistryError):
    """LATEST no longer names the version it named when a decision was based on it."""

    def __init__(self, expected: str | None, found: str | None) -> None:
        self.expected = expected
        self.found = found
        change = f"from {expected} to {found}" if expected != found else f"(it names {found}, but was rewritten)"
        super().__init__(f"LATEST changed {change}")


class VersionNameError(RegistryError):
    """A version named by an operator matches no stored version, or (a prefix) more than one."""


# How many candidates an ambiguous prefix's error lists before it only counts them.
CANDIDATES_SHOWN = 10


@dataclass(frozen=True)
class LatestState:
    """What LATEST named when it was read, with its object's ETag (both None: there was no LATEST)."""

    version: str | None
    etag: str | None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    def __init__(self, root: str, s3: S3Settings | None = None, client: S3Client | None = None) -> None:
        root = root.strip().rstrip("/")
        root = latest_root(root) or root  # a .../LATEST ref names its registry
        try:
            self.bucket, self.prefix = parse_s3_uri(root)
        except ValueError as error:
            raise RegistryError(f"{error}; the registry root looks like s3://bucket/models/<name>") from error
        if not self.prefix:
            raise RegistryError(f"{root!r} has no prefix: use s3://bucket/models/<name>")
        self.root = root
        self.client = client or make_s3_client(s3 or S3Settings())

    # -- objects -----------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"

    def get_json(self, key: str) -> dict[str, Any] | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as error:
            if is_not_found(error):
                return None
            raise
        value = json.loads(body)
        return value if isinstance(value, dict) else None

    def put_json(self, key: str, value: dict[str, Any]) -> None:
        body = (json.dumps(value, indent=2, default=str) + "\n").encode()
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json")

    def create_json(self, key: str, value: dict[str, Any]) -> bool:
        """Write ``key`` only if it does not exist yet; False if it already did (another writer won).

        A conditional PutObject (If-None-Match: *) makes it atomic where the store supports them; on a
        store without them it checks first, which leaves a window of one round trip."""
        body = (json.dumps(value, indent=2, default=str) + "\n").encode()
        written = self._put_if(key, body, "application/json", IfNoneMatch="*")
        if written is not None:
            return written
        if self.get_json(key) is not None:
            return False
        self.put_json(key, value)
        return True

    def _put_if(self, key: str, body: bytes, content_type: str, **condition: str) -> bool | None:
        """A conditional PutObject (IfMatch / IfNoneMatch): True if written, False if the condition failed
        (412, or 409 for a conflicting conditional write), None if the store has no conditional writes."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **condition)  # type: ignore[arg-type]
            return True
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            if code in ("NotImplemented", "501"):
                return None
            raise

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys

    # -- versions ----------------------------------------------------------------------------------

    def version_uri(self, version: str) -> str:
        return self.uri(VERSIONS, check_version(version))

    def upload(self, local: Path, version: str, metadata: dict[str, Any]) -> int:
        """Upload a checkpoint folder to versions/<version>/; captionfleet.json (``metadata``) goes last.
        Pickled weights are never uploaded. Returns the bytes uploaded."""
        check_version(version)
        files = sorted(p for p in local.iterdir() if p.is_file() and p.name != METADATA_FILE)
        if not any(p.suffix == ".safetensors" for p in files) or not (local / "config.json").is_file():
            raise RegistryError(
                f"{local} is not a checkpoint with safetensors weights and config.json: publish a folder "
                "written by save_pretrained (the trainer's out_dir)"
            )
        size = 0
        for path in files:
            if path.suffix in PICKLED_SUFFIXES:
                log.warning("not publishing pickled file %s: only safetensors are loaded", path.name)
                continue
            if path.suffix not in ALLOWED_SUFFIXES and path.name != "README.md":
                continue
            self.client.upload_file(str(path), self.bucket, self.key(VERSIONS, version, path.name))
            size += path.stat().st_size
        # Last: a version folder with captionfleet.json has all its other files.
        self.put_json(self.key(VERSIONS, version, METADATA_FILE), metadata)
        return size

    def record(self, version: str) -> dict[str, Any] | None:
        return self.get_json(self.key(RECORDS, f"{check_version(version)}.json"))

    def write_record(self, version: str, record: dict[str, Any]) -> None:
        self.put_json(self.key(RECORDS, f"{check_version(version)}.json"), {**record, "updated": now()})

    def metadata(self, version: str) -> dict[str, Any] | None:
        return self.get_json(self.key(VERSIONS, check_version(version), METADATA_FILE))

    def version_names(self) -> list[str]:
        names = set()
        paginator = self.client.get_paginator("list_objects_v2")
        prefix = self.key(VERSIONS) + "/"
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.add(common["Prefix"][len(prefix) :].rstrip("/"))
        return sorted(names)

    def resolve_version(self, name: str) -> str:
        """The stored version ``name`` names: itself, else the one version it is the start of (as git takes
        an abbreviated hash). A full name wins over longer names it begins (``tiny-1`` next to ``tiny-12``)."""
        name = name.strip()
        try:
            check_version(name)
        except ModelRefError as error:
            raise VersionNameError(str(error)) from error
        names = self.version_names()
        if name in names:
            return name
        matches = [version for version in names if version.startswith(name)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise VersionNameError(
                f"no version of {self.root} is named or starts with {name!r}: list them with "
                f"captionfleet models --root {self.root} list"
            )
        shown = ", ".join(matches[:CANDIDATES_SHOWN])
        if len(matches) > CANDIDATES_SHOWN:
            shown += f", ... ({len(matches)} in all)"
        raise VersionNameError(
            f"{name!r} is the start of {len(matches)} versions of {self.root}: {shown}; give more of the name"
        )

    def versions(self) -> list[dict[str, Any]]:
        """Every version with its record (status ``incomplete`` without one), oldest first."""
        latest = self.latest()
        rows = []
        for name in self.version_names():
            record = self.record(name) or {"version": name, "status": "incomplete"}
            rows.append({**record, "latest": name == latest})
        return sorted(rows, key=lambda r: (r.get("created") or "", r["version"]))

    # -- LATEST ------------------------------------------------------------------------------------

    def latest(self) -> str | None:
        return read_latest(self.client, self.root)

    def latest_state(self) -> LatestState:
        """LATEST and its ETag: pass it to ``set_latest(expect=...)`` to move LATEST only if it is unchanged."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(LATEST))
        except ClientError as error:
            if is_not_found(error):
                return LatestState(None, None)
            raise
        return LatestState(parse_latest(response["Body"].read()), response.get("ETag"))

    def history(self) -> list[dict[str, Any]]:
        entries = []
        for key in sorted(self.list_keys(self.key(HISTORY) + "/")):
            entry = self.get_json(key)
            if entry is not None:
                entries.append(entry)
        return entries

    def set_latest(
        self, version: str, *, action: str, reason: str = "", expect: LatestState | None = None
    ) -> str | None:
        """Point LATEST at a complete version; returns the previous one. Records the change.

        With ``expect`` (from ``latest_state()``), LATEST moves only if it is still that one, else
        LatestMovedError: a decision made against it (the publish gate's) must not overwrite a
        promotion or rollback made since."""
        record = self.record(version)
        if record is None:
            raise RegistryError(
                f"version {version!r} is not a complete upload in {self.root} (no {RECORDS}/{version}.json): "
                "publish it again (captionfleet train --publish-to ...); see captionfleet models list"
            )
        if expect is None:
            previous = self.latest()
            self._put_latest(version)
        else:
            previous = self.latest_state().version
            if previous != expect.version:
                raise LatestMovedError(expect.version, previous)
            self._put_latest(version, expect)
        entry = {"version": version, "previous": previous, "action": action, "reason": reason, "at": now()}
        self.put_json(self.key(HISTORY, f"{time.time_ns():020d}-{action}.json"), entry)
        if record.get("status") != "promoted":
            self.write_record(version, {**record, "status": "promoted", "promoted": now(), "promoted_by": action})
        log.info("LATEST of %s: %s -> %s (%s)", self.root, previous, version, action)
        return previous

    def _put_latest(self, version: str, expect: LatestState | None = None) -> None:
        body = f"{version}\n".encode()
        key = self.key(LATEST)
        if expect is None:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="text/plain")
            return
        # The re-read in set_latest leaves a window of one round trip; a conditional write closes it
        # where the store supports them (AWS S3, MinIO, recent SeaweedFS): it fails with 412 if LATEST is
        # no longer the object read with ``expect`` (If-None-Match: * when there was no LATEST).
        condition = {"IfNoneMatch": "*"} if expect.etag is None else {"IfMatch": expect.etag}
        written = self._put_if(key, body, "text/plain", **condition)
        if written is False:
            raise LatestMovedError(expect.version, self.latest())
        if written is None:
            # A store without conditional writes: the re-read just before is the only check left.
            log.warning("%s does not support conditional writes; moving LATEST unconditionally", self.root)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="text/plain")

    def promote(self, version: str, reason: str = "") -> str | None:
        """Make a stored version LATEST, whatever its gate said (an operator's decision)."""
        return self.set_latest(version, action="promote", reason=reason or "promoted by hand")

    def rollback(self, to: str | None = None, reason: str = "") -> tuple[str, str]:
        """LATEST back to ``to``, or to the version that was LATEST before the current one (skipping
        versions already rolled back). The current one is marked rolled_back. Returns (from, to)."""
        current = self.latest()
        if current is None:
            raise RegistryError(f"{self.root} has no LATEST: nothing to roll back")
        if to is None:
            rolled_back = {row["version"] for row in self.versions() if row.get("status") == "rolled_back"} | {current}
            earlier = [e["version"] for e in self.history() if e.get("version") not in rolled_back]
            if not earlier:
                raise RegistryError(
                    f"{current} is the only version {self.root} has served: nothing earlier to roll back to; "
                    "promote a stored version instead (captionfleet models promote VERSION)"
                )
            to = earlier[-1]
        if to == current:
            raise RegistryError(f"{to} is already LATEST")
        self.set_latest(to, action="rollback", reason=reason or f"rolled back from {current}")
        record = self.record(current)
        if record is not None:
            self.write_record(current, {**record, "status": "rolled_back", "rolled_back": now()})
        return current, to
