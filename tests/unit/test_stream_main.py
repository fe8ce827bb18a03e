"""`captionfleet worker` / `python -m captionfleet.worker`: settings errors name the fix, logs can be JSON."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from captionfleet.core.logs import JsonFormatter
from captionfleet.worker.__main__ import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("WORKER_METRICS__ENABLED", "false")
    # main() takes over the root logger, which would drop pytest's log capture for the session.
    monkeypatch.setattr("captionfleet.core.logs.configure_logging", lambda level, fmt: None)


def test_missing_bootstrap_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "WORKER_KAFKA__BOOTSTRAP is empty: set it to host:port, e.g. localhost:9092" in capsys.readouterr().err


def test_malformed_bootstrap(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bootstrap", "localhost"]) == 2
    assert "host:port" in capsys.readouterr().err


def test_bad_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORKER_KAFKA__MAX_IN_FLIGHT", "0")
    assert main([]) == 2
    assert "WORKER_KAFKA__MAX_IN_FLIGHT" in capsys.readouterr().err


def test_missing_file_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("WORKER_FETCH__FILE_ROOT", str(tmp_path / "nowhere"))
    assert main(["--bootstrap", "localhost:9092"]) == 2
    assert "WORKER_FETCH__FILE_ROOT" in capsys.readouterr().err


def test_missing_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--bootstrap", "localhost:9092", "--model", str(tmp_path / "none")]) == 2
    assert "--model" in capsys.readouterr().err


def test_metrics_port_taken(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("WORKER_METRICS__ENABLED", "true")
        monkeypatch.setenv("WORKER_METRICS__HOST", "127.0.0.1")
        monkeypatch.setenv("WORKER_METRICS__PORT", str(taken.getsockname()[1]))
        assert main(["--bootstrap", "localhost:9092"]) == 2
    assert "WORKER_METRICS__PORT" in capsys.readouterr().err


def test_json_logs_carry_the_item_fields() -> None:
    record = logging.LogRecord("captionfleet.worker.stream", logging.WARNING, __file__, 1, "failed id=%s", ("x",), None)
    for name, value in {"id": "x", "topic": "requests", "partition": 2, "offset": 41, "kind": "decode"}.items():
        setattr(record, name, value)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed id=x"
    assert (line["id"], line["topic"], line["partition"], line["offset"], line["kind"]) == (
        "x",
        "requests",
        2,
        41,
        "decode",
    )
    assert line["level"] == "WARNING" and line["time"].endswith("Z")


def test_python_dash_m_worker_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "captionfleet.worker", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "WORKER_KAFKA__BOOTSTRAP" in done.stdout


def test_the_caption_api_beyond_loopback_without_tokens_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORKER_HTTP__HOST", "0.0.0.0")
    monkeypatch.delenv("WORKER_HTTP__TOKENS", raising=False)
    assert main(["--http", "--bootstrap", "localhost:9092"]) == 2  # before any model or broker
    err = capsys.readouterr().err
    assert "WORKER_HTTP__TOKENS is empty" in err and "WORKER_HTTP__HOST=127.0.0.1" in err
