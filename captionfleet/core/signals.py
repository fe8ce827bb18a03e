"""Ctrl-C and SIGTERM as a request to stop gracefully: the one signal helper.

The stream worker and the bulk jobs stop the same way: SIGTERM (Kubernetes) or SIGINT (a terminal)
asks the work to finish what is in flight and write it, instead of killing the process mid-write.
Handlers can only be installed from the main thread; embedded use (tests, a worker run in a thread)
installs none, and the caller stops the work itself.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_Handler = signal.Handlers | int | None | object

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(on_signal: Callable[[int], None], *, on_windows: bool = False) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM call ``on_signal(signum)`` (which logs and asks the work
    to stop) instead of raising KeyboardInterrupt or ending the process; the previous handlers come back
    afterwards, however the block ends.

    ``on_windows``: install them on Windows too. The stream worker does (Ctrl-C drains and commits there
    as anywhere); the bulk jobs keep Python's default Ctrl-C on Windows, as they always had it."""
    if (sys.platform == "win32" and not on_windows) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal(signum)

    previous: dict[int, _Handler] = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
