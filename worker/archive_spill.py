"""The sidecar text of an input file's rows (a tar sample's own ``key.txt`` and ``key.json``, up to 64 KiB
each) kept on local disk while the file runs, not in memory: a shard of many samples would otherwise hold
every one of them until its Parquet is written. Written as rows arrive, read back once, in order, for the
output."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import IO

# (offset, length) of one row's sidecars in the spill file.
SpillRef = tuple[int, int]


class SidecarSpill:
    """Thread-safe: rows arrive from the model thread (and from resume in the source thread), the output is
    read in the finishing thread. The file is unnamed (gone when closed, or with the process)."""

    def __init__(self, folder: Path | None = None) -> None:
        self._folder = folder
        self._file: IO[bytes] | None = None
        self._size = 0
        self._lock = threading.Lock()

    def put(self, txt: str | None, meta: str | None) -> SpillRef | None:
        """Where these sidecars are kept; None when there are none (nothing is written)."""
        if txt is None and meta is None:
            return None
        data = json.dumps([txt, meta]).encode("ascii")  # ensure_ascii: any text, one byte per character written
        with self._lock:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._folder)  # noqa: SIM115 - closed by close()
            self._file.seek(self._size)
            self._file.write(data)
            self._file.flush()  # pread below reads the file, not Python's buffer
            ref = (self._size, len(data))
            self._size += len(data)
        return ref

    def get(self, ref: SpillRef | None) -> tuple[str | None, str | None]:
        if ref is None:
            return None, None
        with self._lock:
            assert self._file is not None
            data = os.pread(self._file.fileno(), ref[1], ref[0])
        txt, meta = json.loads(data)
        return txt, meta

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
