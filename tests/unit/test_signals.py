"""The one signal helper: SIGINT/SIGTERM ask for a graceful stop inside the block, and only there."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from captionfleet.core.signals import stop_on_signals


def test_a_signal_in_the_block_calls_back_and_the_old_handlers_come_back() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen: list[int] = []
    with stop_on_signals(seen.append):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a request to stop
    assert seen == [signal.SIGTERM, signal.SIGINT]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_the_old_handlers_come_back_when_the_block_fails() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), stop_on_signals(lambda signum: None):
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) == before


def test_outside_the_main_thread_nothing_is_installed() -> None:
    # Embedded use (a worker run in a thread, as the tests do): the caller stops the work itself.
    before = signal.getsignal(signal.SIGTERM)
    during: list[object] = []

    def run() -> None:
        with stop_on_signals(lambda signum: None):
            during.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert during == [before]


def test_on_windows_only_the_stream_worker_installs_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stream worker drains and commits on Ctrl-C everywhere; the bulk jobs keep Windows' default Ctrl-C.
    monkeypatch.setattr("captionfleet.core.signals.sys.platform", "win32")
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals(lambda signum: None):
        assert signal.getsignal(signal.SIGINT) == before
    with stop_on_signals(lambda signum: None, on_windows=True):
        assert signal.getsignal(signal.SIGINT) != before
    assert signal.getsignal(signal.SIGINT) == before


def test_the_stream_worker_asks_for_its_handlers_on_windows_too() -> None:
    import inspect

    from captionfleet.worker import __main__ as worker_main

    # ``stop`` stops the stream (and drains the caption API when it is served too).
    assert "stop_on_signals(_stopping(stop), on_windows=True)" in inspect.getsource(worker_main)
