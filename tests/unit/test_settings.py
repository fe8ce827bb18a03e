from pathlib import Path

import pytest

from worker.settings import SettingsError, WorkerSettings, load_worker_settings


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_BATCH__MAX_ITEMS", "16")
    monkeypatch.setenv("WORKER_MODEL__REF", "s3://models/captions")
    monkeypatch.setenv("WORKER_S3__SECRET_ACCESS_KEY", "hunter2")
    settings = load_worker_settings()
    assert settings.batch.max_items == 16
    assert settings.model.ref == "s3://models/captions"
    assert settings.s3.secret_access_key is not None
    assert settings.s3.secret_access_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)  # secrets never end up in logs


def test_dotenv_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("WORKER_DECODING__NUM_BEAMS=2\n")
    assert WorkerSettings().decoding.num_beams == 2


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("WORKER_BATCH__MAX_ITEMS", "lots"),
        ("WORKER_BATCH__MAX_ITEMS", "0"),
        ("WORKER_DECODING__NUM_BEAMS", "-1"),
        ("WORKER_MODEL__DEVICE", "tpu"),
        ("WORKER_LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_worker_settings()
    assert var in str(info.value)
    assert "fix:" in str(info.value)
