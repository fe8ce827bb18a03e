"""Dashboard settings: the only dashboard module that reads the environment.

Dashboard fields are ``DASHBOARD_<FIELD>`` (nested with ``__``, e.g. ``DASHBOARD_PROMETHEUS__URL``).
The model, decoding defaults and image limits are the workers' own settings (``WORKER_MODEL__REF``,
``WORKER_DECODING__*``, ``WORKER_IMAGES__*``), so an upload is captioned exactly as a worker would
caption it; deploy the dashboard with the workers' ConfigMap.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captionfleet.core.settings import SettingsError, WorkerSettings, _split_list, describe_validation_error

# When WORKER_MODEL__REF is unset the workers default to the hub model, which a dashboard pod without
# hub access would fail to download on its first upload. The built-in model ships in the package,
# loads in a second and shows its version on the page, so the dashboard works out of the box; set
# WORKER_MODEL__REF (as the workers do) to caption with the production model.
DASHBOARD_DEFAULT_MODEL = "builtin"


class ServerSettings(BaseModel):
    # 0.0.0.0 so a Kubernetes Service reaches it; Streamlit's default port.
    host: str = "0.0.0.0"
    port: int = Field(default=8501, ge=1, le=65535)


# The labels Prometheus gives the workers' targets: the prometheus-community chart's kubernetes-pods job
# (which reads the prometheus.io/* annotations of k8s/base/worker-deployment.yaml) copies pod labels
# into target labels, "app.kubernetes.io/name" becoming app_kubernetes_io_name.
DEFAULT_WORKER_SELECTOR = 'app_kubernetes_io_name="captionfleet",app_kubernetes_io_component="worker"'


class PrometheusSettings(BaseModel):
    # e.g. http://prometheus:9090; empty = scrape the workers in scrape.urls directly.
    url: str = ""
    # PromQL label matchers that pick the workers' scrape targets out of `up`, so another team's dead
    # target in a shared Prometheus is not listed as a dead worker. Change it when your Prometheus
    # labels them otherwise (e.g. job="captionfleet-worker" for a static scrape config); empty lists
    # every target Prometheus cannot scrape.
    worker_selector: str = DEFAULT_WORKER_SELECTOR
    # The rate()/quantile window. It must cover at least two scrapes (four is safer): 1m suits a 15s
    # scrape interval; tests scraping every second use a few seconds.
    rate_window_s: int = Field(default=60, ge=1)
    timeout_s: float = Field(default=5.0, gt=0)


class ScrapeSettings(BaseModel):
    # Workers' /metrics endpoints (comma-separated or a JSON list), used when no Prometheus URL is set.
    # Rates need two scrapes, and the history lives in the dashboard process (lost on restart).
    urls: Annotated[list[str], NoDecode] = []
    timeout_s: float = Field(default=3.0, gt=0)
    # Samples kept per worker: at the default 5 s refresh, 720 is an hour of history.
    history: int = Field(default=720, ge=2)

    _split = field_validator("urls", mode="before")(_split_list)


class FleetSettings(BaseModel):
    # How often the fleet view refreshes itself, and how much history its charts show.
    refresh_s: float = Field(default=5.0, ge=0.5)
    window_s: int = Field(default=900, ge=10)
    # The workers' caption API (e.g. http://captionfleet-worker-api:8080, the overlays' Service). Set: "Generate
    # caption" sends the uploads to the fleet and shows which worker and version answered. Empty: the
    # dashboard's own in-process model captions them (the local default, which needs no fleet).
    api_url: str = ""
    # One of the workers' WORKER_HTTP__TOKENS (from the same Secret, never a ConfigMap).
    api_token: SecretStr | None = None
    # How long one request to the fleet may take (the workers' own deadline is WORKER_HTTP__TIMEOUT_S).
    api_timeout_s: float = Field(default=60.0, gt=0)


class UploadSettings(BaseModel):
    # Images captioned per model call; many uploads are captioned in batches of this size.
    batch_size: int = Field(default=8, ge=1, le=64)


class DashboardSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DASHBOARD_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    server: ServerSettings = ServerSettings()
    prometheus: PrometheusSettings = PrometheusSettings()
    scrape: ScrapeSettings = ScrapeSettings()
    fleet: FleetSettings = FleetSettings()
    upload: UploadSettings = UploadSettings()


def load_dashboard_settings() -> DashboardSettings:
    try:
        return DashboardSettings()
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, "DASHBOARD_")) from error


def load_model_settings() -> WorkerSettings:
    """The workers' settings (model, decoding, image limits), with the dashboard's model default."""
    try:
        settings = WorkerSettings()
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, "WORKER_")) from error
    if "ref" not in settings.model.model_fields_set:
        settings.model.ref = DASHBOARD_DEFAULT_MODEL
    return settings
