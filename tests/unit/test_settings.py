import argparse
from pathlib import Path

import pytest

from captionfleet.core.settings import (
    CPU_BATCH,
    CPU_PIXELS,
    CPU_SEQUENCES,
    CUDA_BATCH,
    CUDA_PIXELS,
    CUDA_SEQUENCES,
    SettingsError,
    WorkerSettings,
    load_worker_settings,
)
from captionfleet.worker.cli import _apply_overrides


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


def _flags(**overrides: object) -> argparse.Namespace:
    flags: dict[str, object] = dict(model=None, device=None, batch_size=None, max_wait_ms=None)
    return argparse.Namespace(**{**flags, "num_beams": None, "max_new_tokens": None, **overrides})


def test_the_batch_size_follows_the_device_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    assert load_worker_settings().batch.max_items == CPU_BATCH
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cuda")
    assert load_worker_settings().batch.max_items == CUDA_BATCH
    monkeypatch.setenv("WORKER_BATCH__MAX_ITEMS", "12")
    assert load_worker_settings().batch.max_items == 12  # what the operator set wins on any device


def test_auto_device_batch_size_asks_torch_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = WorkerSettings().batch
    assert (gpu.max_items, gpu.max_sequences) == (CUDA_BATCH, CUDA_SEQUENCES)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = WorkerSettings().batch
    assert (cpu.max_items, cpu.max_sequences) == (CPU_BATCH, CPU_SEQUENCES)


def test_command_line_device_re_derives_the_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cuda")
    monkeypatch.setenv("WORKER_BATCH__MAX_WAIT_MS", "7")
    on_cpu = _apply_overrides(load_worker_settings(), _flags(device="cpu"))
    assert (on_cpu.model.device, on_cpu.batch.max_items, on_cpu.batch.max_wait_ms) == ("cpu", CPU_BATCH, 7)
    sized = _apply_overrides(load_worker_settings(), _flags(device="cpu", batch_size=3))
    assert sized.batch.max_items == 3
    monkeypatch.setenv("WORKER_S3__SECRET_ACCESS_KEY", "hunter2")  # secrets survive the round trip
    kept = _apply_overrides(load_worker_settings(), _flags(model="builtin"))
    assert kept.model.ref == "builtin" and kept.batch.max_items == CUDA_BATCH
    assert kept.s3.secret_access_key is not None and kept.s3.secret_access_key.get_secret_value() == "hunter2"


def test_worker_flags_keep_the_environment_and_the_device_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from captionfleet.worker.__main__ import _apply_overrides as worker_overrides
    from captionfleet.worker.__main__ import _parser as worker_parser

    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cuda")
    monkeypatch.setenv("WORKER_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("WORKER_S3__SECRET_ACCESS_KEY", "hunter2")
    args = worker_parser().parse_args(["--bootstrap", "kafka:9092", "--metrics-port", "9500", "--log-format", "json"])
    settings = worker_overrides(load_worker_settings(), args)
    assert (settings.kafka.bootstrap, settings.kafka.group_id) == ("kafka:9092", "from-env")
    assert (settings.metrics.port, settings.log_format) == (9500, "json")
    assert settings.batch.max_items == CUDA_BATCH and "max_items" not in settings.batch.model_fields_set
    assert settings.s3.secret_access_key is not None and settings.s3.secret_access_key.get_secret_value() == "hunter2"


def test_a_bad_flag_value_is_validated_like_the_environment() -> None:
    from pydantic import ValidationError

    from captionfleet.core.settings import with_overrides

    with pytest.raises(ValidationError, match="max_items"):
        with_overrides(WorkerSettings(), {"batch.max_items": 0, "decoding.num_beams": None})


def test_the_sequence_limit_follows_the_device_unless_the_batch_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    on_cpu = load_worker_settings().batch
    assert (on_cpu.max_items, on_cpu.max_sequences) == (CPU_BATCH, CPU_SEQUENCES)
    assert on_cpu.images_at(4) == on_cpu.images_at(1) == CPU_BATCH  # a CPU worker's batch as before
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cuda")
    on_cuda = load_worker_settings().batch
    assert (on_cuda.max_items, on_cuda.max_sequences) == (CUDA_BATCH, CUDA_SEQUENCES) == (128, 128)
    assert (on_cuda.images_at(1), on_cuda.images_at(4), on_cuda.images_at(16)) == (128, 32, 8)
    monkeypatch.setenv("WORKER_BATCH__MAX_ITEMS", "64")
    sized = load_worker_settings().batch  # the operator's batch size means what it says: no derived limit
    assert (sized.max_items, sized.max_sequences, sized.images_at(4)) == (64, 0, 64)
    monkeypatch.setenv("WORKER_BATCH__MAX_SEQUENCES", "96")
    both = load_worker_settings().batch
    assert (both.max_items, both.max_sequences, both.images_at(4)) == (64, 96, 24)
    monkeypatch.delenv("WORKER_BATCH__MAX_ITEMS")
    assert load_worker_settings().batch.max_items == CUDA_BATCH  # the set limit, the derived batch size
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    assert load_worker_settings().batch.max_sequences == 96  # what the operator set wins on any device


def test_command_line_device_re_derives_the_sequence_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cuda")
    assert load_worker_settings().batch.max_sequences == CUDA_SEQUENCES
    on_cpu = _apply_overrides(load_worker_settings(), _flags(device="cpu"))
    assert (on_cpu.batch.max_items, on_cpu.batch.max_sequences) == (CPU_BATCH, CPU_SEQUENCES)
    sized = _apply_overrides(load_worker_settings(), _flags(batch_size=16))  # --batch-size on the GPU
    assert (sized.batch.max_items, sized.batch.max_sequences) == (16, 0)


def test_prefetch_follows_the_batch_size_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two batches decoded ahead (at least 32): a GPU's greedy batches of 128 would otherwise wait on 32."""
    assert WorkerSettings(model={"device": "cpu"}).batch.prefetch == 64
    assert WorkerSettings(model={"device": "cpu"}, batch={"max_items": 4}).batch.prefetch == 32
    assert WorkerSettings(model={"device": "cuda"}).batch.prefetch == 256
    assert WorkerSettings(model={"device": "cpu"}, batch={"max_items": 64}).batch.prefetch == 128
    both = WorkerSettings(model={"device": "cpu"}, batch={"max_items": 64, "decode_threads": 3})
    assert both.batch.prefetch == 128 and "prefetch" not in both.batch.model_fields_set
    assert WorkerSettings(model={"device": "cuda"}, batch={"prefetch": 7}).batch.prefetch == 7


def test_the_pixel_budget_follows_the_device_unless_the_batch_or_it_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    on_cpu = load_worker_settings().batch
    assert on_cpu.max_pixels == CPU_PIXELS < CUDA_PIXELS
    assert 32 * 224 * 224 <= CPU_PIXELS < 16 * 768 * 768  # ViT-GPT2 fills 32 images, Florence-2 fewer than 16
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cuda")
    assert load_worker_settings().batch.max_pixels == CUDA_PIXELS
    monkeypatch.setenv("WORKER_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("WORKER_BATCH__MAX_ITEMS", "8")
    assert load_worker_settings().batch.max_pixels == CUDA_PIXELS  # a batch size set by hand: the limit as before
    monkeypatch.delenv("WORKER_BATCH__MAX_ITEMS")
    monkeypatch.setenv("WORKER_BATCH__MAX_PIXELS", "1000")
    assert load_worker_settings().batch.max_pixels == 1000  # what the operator set wins
    on_gpu = _apply_overrides(load_worker_settings(), _flags(device="cuda")).batch
    assert on_gpu.max_pixels == 1000
