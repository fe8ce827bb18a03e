"""Dashboard settings and the `captionfleet dashboard` command line."""

from __future__ import annotations

import pytest

from captionfleet.core.settings import SettingsError
from captionfleet.dashboard.__main__ import APP, main, streamlit_command
from captionfleet.dashboard.settings import load_dashboard_settings, load_model_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("WORKER_", "DASHBOARD_")):
            monkeypatch.delenv(name)


def test_the_model_is_the_workers_setting_with_the_builtin_model_as_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_model_settings().model.ref == "builtin"
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")  # another model field set: the default still applies
    assert load_model_settings().model.ref == "builtin"
    monkeypatch.setenv("WORKER_MODEL__REF", "s3://models/captioner/LATEST")
    assert load_model_settings().model.ref == "s3://models/captioner/LATEST"


def test_nested_dashboard_settings_and_worker_url_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHBOARD_SCRAPE__URLS", "http://w0:9400/metrics, http://w1:9400/metrics")
    monkeypatch.setenv("DASHBOARD_FLEET__REFRESH_S", "2")
    settings = load_dashboard_settings()
    assert settings.scrape.urls == ["http://w0:9400/metrics", "http://w1:9400/metrics"]
    assert settings.fleet.refresh_s == 2 and settings.prometheus.url == ""


def test_a_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DASHBOARD_SERVER__PORT", "eighty")
    with pytest.raises(SettingsError, match="DASHBOARD_SERVER__PORT"):
        load_dashboard_settings()
    assert main([]) == 2
    assert "DASHBOARD_SERVER__PORT='eighty'" in capsys.readouterr().err


def test_streamlit_runs_the_app_on_the_configured_port_without_usage_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHBOARD_SERVER__PORT", "8600")
    command = streamlit_command(load_dashboard_settings(), max_image_bytes=50 * 2**20)
    assert command[1:5] == ["-m", "streamlit", "run", str(APP)]
    options = dict(zip(command[5::2], command[6::2], strict=True))
    assert options["--server.port"] == "8600"
    assert options["--browser.gatherUsageStats"] == "false"
    assert options["--server.maxUploadSize"] == "51"  # just above the image limit: our message, not the uploader's


def test_the_cli_execs_streamlit_with_flag_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from captionfleet.cli import main as cli_main

    ran: list[list[str]] = []
    monkeypatch.setattr("os.execv", lambda path, args: ran.append(list(args)))
    assert cli_main(["dashboard", "--port", "8777", "--host", "127.0.0.1"]) == 0
    (command,) = ran
    assert command[command.index("--server.port") + 1] == "8777"
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
