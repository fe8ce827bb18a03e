"""What the Kubernetes manifests and the image run, checked offline: every environment variable a
container gets is a real settings field of the component it is given to (and its value passes that
field's validation), every command is a real `captionfleet` subcommand (the image's default one too),
hadolint passes on the Dockerfile, and its HEALTHCHECK asks the part that runs. Each overlay is built
as in test_k8s_manifests.py (tests/integration/k8s_support.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import types
import typing
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from captionfleet.core.settings import WorkerSettings
from captionfleet.dashboard.settings import DashboardSettings, ServerSettings
from tests.integration.k8s_support import (
    ROOT,
    SETTINGS,
    built_overlay,  # noqa: F401  (the fixture `built`: pytest finds it among this module's names)
    command_of,
    container_env,
    settings_for,
    tool,
    workloads,
)

# The prefixes each subcommand reads.
PREFIXES_BY_COMMAND = {
    "worker": ["WORKER_"],
    "caption": ["WORKER_"],
    "demo": ["WORKER_"],
    "train": ["TRAINER_"],
    "models": ["TRAINER_"],
    # The dashboard captions uploads with the workers' model settings (dashboard/settings.py).
    "dashboard": ["DASHBOARD_", "WORKER_"],
}

# Variables a pod may set that are not captionfleet settings, each with its reader.
FOREIGN_ENV = {
    "HF_HUB_OFFLINE": "huggingface_hub",
    "TRANSFORMERS_OFFLINE": "transformers",
    "AWS_REGION": "boto3",
    "AWS_DEFAULT_REGION": "boto3",
}


# ---- settings ----------------------------------------------------------------------------------------


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation (X, X | None, Annotated[X, ...]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def setting_exists(cls: type[BaseModel], name: str) -> bool:
    """WORKER_KAFKA__BOOTSTRAP (prefix removed: KAFKA__BOOTSTRAP) -> WorkerSettings.kafka.bootstrap."""
    parts = name.lower().split("__")
    for index, part in enumerate(parts):
        field = cls.model_fields.get(part)
        if field is None:
            return False
        if index == len(parts) - 1:
            return True
        nested = _model_in(field.annotation)
        if nested is None:
            return False
        cls = nested
    return False


def test_every_env_var_is_a_setting_of_its_component(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    errors = []
    for doc, spec in workloads(docs):
        for container in spec["containers"]:
            command = command_of(container)
            prefixes = PREFIXES_BY_COMMAND.get(command)
            where = f"{doc['kind']} {doc['metadata']['name']} ({command})"
            if prefixes is None:
                errors.append(f"{where}: no settings prefixes known for {command!r}: add it to PREFIXES_BY_COMMAND")
                continue
            env = container_env(docs, container)
            for name in env:
                prefix = next((p for p in prefixes if name.startswith(p)), None)
                if prefix is not None:
                    if not setting_exists(SETTINGS[prefix], name[len(prefix) :]):
                        errors.append(f"{where}: {name} is not a field of {SETTINGS[prefix].__name__}: fix its name")
                elif name not in FOREIGN_ENV:
                    errors.append(
                        f"{where}: {name} is read by nothing in `captionfleet {command}` (it reads "
                        f"{', '.join(prefixes)}*): remove it, or list it in FOREIGN_ENV with its reader"
                    )
            try:
                settings_for(prefixes, env)
            except Exception as error:  # a value the settings reject, named by pydantic
                errors.append(f"{where}: the settings reject these values: {error}")
    assert not errors, f"k8s/overlays/{overlay}:\n" + "\n".join(errors)


# ---- commands ----------------------------------------------------------------------------------------


def is_subcommand(command: str) -> bool:
    """`captionfleet COMMAND --help` exits 0 for a real subcommand and 2 (argparse's error) otherwise."""
    from captionfleet import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli.main([command, "--help"])
        except SystemExit as exited:
            return exited.code == 0
    return False


def test_is_subcommand_tells_real_from_made_up() -> None:
    assert is_subcommand("worker") and is_subcommand("caption")
    assert not is_subcommand("wroker")


def test_every_command_is_a_captionfleet_subcommand(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    used = {command_of(c) for _, spec in workloads(docs) for c in spec["containers"]}
    assert used, "no workloads built"
    wrong = sorted(command for command in used if not is_subcommand(command))
    assert not wrong, f"{overlay}: {wrong} are not captionfleet subcommands (captionfleet --help lists them)"


def test_the_image_default_command_is_a_subcommand() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = [line for line in dockerfile.splitlines() if line.startswith("CMD ")]
    assert cmd, "the Dockerfile has no CMD"
    assert is_subcommand(yaml.safe_load(cmd[-1][4:])[0])


# ---- the Dockerfile ------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    proc = subprocess.run(
        [tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_healthcheck_asks_the_part_that_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "ops" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    monkeypatch.delenv("WORKER_METRICS__PORT", raising=False)
    monkeypatch.delenv("DASHBOARD_SERVER__PORT", raising=False)
    assert healthcheck.url_for(["python", "captionfleet", "worker"]) == "http://127.0.0.1:9400/healthz"
    assert healthcheck.url_for(["captionfleet", "worker", "--metrics-port", "9500"]).endswith(":9500/healthz")
    assert healthcheck.url_for(["captionfleet", "dashboard"]) == "http://127.0.0.1:8501/_stcore/health"
    assert healthcheck.url_for(["captionfleet", "demo"]) is None
    # `captionfleet dashboard` execs Streamlit: that command line is what PID 1 shows while it serves.
    from captionfleet.dashboard.__main__ import streamlit_command

    serving = streamlit_command(DashboardSettings(server=ServerSettings(port=8600)), max_image_bytes=2**20)
    assert healthcheck.url_for(serving) == "http://127.0.0.1:8600/_stcore/health"
    monkeypatch.setenv("WORKER_METRICS__PORT", "9401")
    assert healthcheck.url_for(["captionfleet", "worker"]) == "http://127.0.0.1:9401/healthz"
    # Its defaults are the settings' defaults.
    assert WorkerSettings.model_fields["metrics"].default.port == 9400
    assert DashboardSettings.model_fields["server"].default.port == 8501
