"""WebDataset tar shards for tests, built in memory: good samples beside hostile members.

``shard(samples)`` writes members in order; ``Member`` says what each one is (a file, a link, a FIFO).
``hostile_shard()`` holds the whole hostile image corpus (each case a sample keyed by its name's stem)
plus members whose names climb out or are absolute, links, a device, and an oversized member: with
the expected failure kind of every key (None = captioned).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from tests.hostile_images import hostile_corpus, jpeg_bytes


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes = b""
    kind: str = "file"  # file | symlink | hardlink | fifo | chardev


def shard(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            if member.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif member.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, "good-000.jpg"
            elif member.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif member.kind == "chardev":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            else:
                info.size = len(member.data)
            tar.addfile(info, io.BytesIO(member.data) if member.kind == "file" else None)
    return buf.getvalue()


def good_samples(prefix: str, count: int, start: int = 0) -> tuple[list[Member], dict[str, str | None]]:
    """``count`` samples of a JPEG with its .json and .txt sidecars."""
    members: list[Member] = []
    expected: dict[str, str | None] = {}
    for i in range(start, start + count):
        key = f"{prefix}{i:04d}"
        members += [
            Member(f"{key}.jpg", jpeg_bytes((16 + i % 5, 12))),
            Member(f"{key}.json", json.dumps({"n": i}).encode()),
            Member(f"{key}.txt", f"old caption {i}".encode()),
        ]
        expected[key] = None
    return members, expected


def hostile_shard(max_bytes: int) -> tuple[bytes, dict[str, str | None]]:
    """A shard of good samples, the hostile corpus and hostile members; expected kind per key."""
    members, expected = good_samples("good-", 3)
    for case in hostile_corpus():
        # half.jpg and half.png would be one sample (key "half"): the key keeps the whole name.
        key = "corpus/" + case.name.replace(".", "_")
        ext = PurePosixPath(case.name).suffix
        members.append(Member(f"{key}{ext}", case.data))
        # A sample whose only member is a text file has no picture at all.
        expected[key] = "not_an_image" if ext == ".txt" else case.expect_kind
    members += [
        Member("../escape.jpg", jpeg_bytes()),
        Member("/etc/absolute.jpg", jpeg_bytes()),
        Member("deep/../../up.jpg", jpeg_bytes()),
        Member("link.jpg", kind="symlink"),
        Member("hard.jpg", kind="hardlink"),
        Member("pipe.jpg", kind="fifo"),
        Member("null.jpg", kind="chardev"),
        Member("huge.jpg", b"\xff\xd8\xff" + b"\0" * (max_bytes + 10)),
        Member("only-text.txt", b"a sample with no picture"),
    ]
    expected.update(
        {
            "../escape": "forbidden",
            "/etc/absolute": "forbidden",
            "deep/../../up": "forbidden",
            "link": "not_an_image",
            "hard": "not_an_image",
            "pipe": "not_an_image",
            "null": "not_an_image",
            "huge": "too_large",
            "only-text": "not_an_image",
        }
    )
    more, more_expected = good_samples("tail-", 2)
    return shard(members + more), {**expected, **more_expected}
