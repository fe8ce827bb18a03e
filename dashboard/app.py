"""The dashboard's layout: `captionfleet dashboard` (or `python -m captionfleet.dashboard`, installed).

Two tabs: ad-hoc captioning of uploads, and the operators' live view of the fleet. Everything it
shows comes from dashboard/model.py, uploads.py and fleet.py; this file only decides where it goes.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
import streamlit as st

from captionfleet.core.images import ImageLimits
from captionfleet.core.prompt_input import MAX_PROMPT_CHARS, PromptRefused, check_prompt
from captionfleet.core.settings import DecodingSettings, SettingsError, WorkerSettings
from captionfleet.dashboard.charts import line_chart, plain, versions_chart, warning_html, workers_table
from captionfleet.dashboard.fleet import FleetView, down_notices, fleet_view
from captionfleet.dashboard.fleet_api import FleetUnavailable, caption_with_fleet
from captionfleet.dashboard.model import LoadedModel, load_model
from captionfleet.dashboard.settings import DashboardSettings, load_dashboard_settings, load_model_settings
from captionfleet.dashboard.uploads import UploadResult, caption_uploads


def sidebar(model_settings: WorkerSettings, settings: DashboardSettings) -> DecodingSettings:
    st.sidebar.header("Decoding")
    defaults = model_settings.decoding
    beams = st.sidebar.slider("Beams", 1, 8, min(defaults.num_beams, 8), help="beam search width; 1 is greedy")
    length = st.sidebar.slider("Max length (tokens)", 4, 64, min(max(defaults.max_new_tokens, 4), 64))
    if settings.fleet.api_url:
        st.sidebar.caption(f"Captions: the fleet at `{settings.fleet.api_url}` (DASHBOARD_FLEET__API_URL)")
    else:
        st.sidebar.caption(f"Model: `{model_settings.model.ref}` (WORKER_MODEL__REF), in this dashboard")
    return defaults.model_copy(update={"num_beams": beams, "max_new_tokens": length})


def model_or_error(model_settings: WorkerSettings) -> LoadedModel | None:
    """The model, or None after showing why it did not load: a bad model setting must cost the upload
    tab its captions, not the whole page (the Fleet tab is drawn after this one)."""
    try:
        return load_model(model_settings)
    except Exception as error:  # any load failure: bad ref, unreachable store, no GPU for "cuda", ...
        model = model_settings.model
        st.error(
            f"The model could not be loaded (WORKER_MODEL__REF={model.ref}, WORKER_MODEL__DEVICE={model.device}): "
            f"{error or 'no reason given'}\n\nFix the dashboard's WORKER_MODEL__* settings (in Kubernetes it "
            "reads the workers' ConfigMap, but its pod has no GPU: WORKER_MODEL__DEVICE must be cpu or auto "
            "there), then press Generate caption again.",
            icon="🚫",
        )
        return None


def upload_source(model_settings: WorkerSettings, settings: DashboardSettings) -> str:
    """What captions the uploads, as the page says it."""
    if settings.fleet.api_url:
        url = settings.fleet.api_url
        return f"Captions come from the fleet: the workers' caption API at {url} (DASHBOARD_FLEET__API_URL)."
    return (
        f"Captions come from this dashboard's own model, `{model_settings.model.ref}` (WORKER_MODEL__REF); set "
        "DASHBOARD_FLEET__API_URL to caption with the fleet's workers instead."
    )


def caption_files(
    files: list[tuple[str, bytes]],
    model: LoadedModel | None,
    settings: DashboardSettings,
    decoding: DecodingSettings,
    limits: ImageLimits,
    prompt: str | None,
) -> list[UploadResult] | None:
    """Each file's result, from the fleet or the in-process model; None after showing why there are none."""
    if settings.fleet.api_url:
        try:
            return caption_with_fleet(files, decoding, limits, settings.fleet, settings.upload.batch_size, prompt)
        except FleetUnavailable as error:
            st.error(f"No captions: {error}", icon="🚫")
            return None
    if model is None:
        return None
    return caption_uploads(model, files, decoding, limits, settings.upload.batch_size, prompt=prompt)


def caption_html(caption: str | None) -> str:
    """A caption as a heading whose text is the caption verbatim (``plain``: nothing in it reads as markup)."""
    return f"<h3>{plain(caption or '')}</h3>"


def answered_by(result: UploadResult) -> str:
    if result.worker:  # the fleet answered: which worker, with which version
        return f"model {result.model_version} · {result.seconds * 1000:.0f} ms · worker {result.worker}"
    return (
        f"model {result.model_version} · {result.seconds * 1000:.0f} ms "
        f"(one model call for {result.batch} image{'s' if result.batch > 1 else ''})"
    )


def model_line(model: LoadedModel) -> None:
    """Which model captions the uploads: its version and family (after a hot swap to another family too)."""
    default = f"`{model.default_prompt}`" if model.default_prompt is not None else "none"
    st.caption(f"Model {model.version} · family {model.family} · default prompt: {default}")


def prompt_box(model: LoadedModel | None) -> str | None:
    """The prompt every upload is captioned with; None: the model family's default (an empty box). A model
    that takes no prompt gets a disabled box and a note; an unusable prompt shows why and raises
    PromptRefused."""
    if model is not None and not model.takes_prompt:
        st.text_input("Prompt", key="prompt", disabled=True, placeholder="this model takes no prompt")
        st.caption(
            f"A {model.family} model (ViT-GPT2) captions without a prompt. Serve a family that takes one "
            "(BLIP, GIT, Florence-2, the VLMs) to ask for a kind of caption."
        )
        return None
    default = model.default_prompt if model is not None else None
    text = st.text_input(
        "Prompt",
        key="prompt",
        max_chars=MAX_PROMPT_CHARS,
        placeholder=default or "none: the model captions on its own (e.g. type 'a photo of')",
        help="sent with every image; leave it empty for the model family's default prompt (shown greyed)",
    )
    try:
        return check_prompt(text, field="The prompt")
    except PromptRefused as refused:
        st.error(str(refused), icon="✏️")
        raise


def upload_tab(model_settings: WorkerSettings, settings: DashboardSettings, decoding: DecodingSettings) -> None:
    limits = ImageLimits.from_settings(model_settings.images)
    st.caption(upload_source(model_settings, settings))
    fleet = bool(settings.fleet.api_url)
    model = None
    if not fleet:  # with the fleet, the dashboard loads no model of its own
        # Loaded (once per process, cached) before the prompt box, which shows its family and default prompt.
        model = model_or_error(model_settings)
        if model is not None:
            model_line(model)
    try:
        prompt, usable = prompt_box(model), True
    except PromptRefused:
        prompt, usable = None, False
    files = st.file_uploader(
        f"Images (up to {limits.max_bytes / 2**20:.0f} MB each)", accept_multiple_files=True, key="uploads"
    )
    uploaded = tuple(f.file_id for f in files or [])
    if st.button("Generate caption", type="primary", disabled=not files or not usable) and (fleet or model):
        with st.spinner("Captioning..."):
            results = caption_files(
                [(f.name, f.getvalue()) for f in files or []], model, settings, decoding, limits, prompt
            )
        if results is not None:
            st.session_state["results"] = (uploaded, results)
    shown_for, results = st.session_state.get("results", ((), []))
    if shown_for != uploaded:  # files removed or added since: their old captions would mislead
        results = []
    for result in results:
        if not result.ok:
            st.error(result.problem, icon="⚠️")
            continue
        picture, text = st.columns([1, 3])
        if result.image is not None:
            picture.image(result.image, caption=result.name, width=200)
        # The model's text, shown as it is: as Markdown a caption like "[see](http://...)" would become a link.
        text.markdown(caption_html(result.caption), unsafe_allow_html=True)
        text.caption(answered_by(result))
        if result.prompt is not None:
            text.caption(f"prompt: {result.prompt}")


def chart(title: str, frame: pd.DataFrame, unit: str, note: str = "", others: Literal["sum", "mean"] = "sum") -> None:
    st.subheader(title)
    if frame.dropna(how="all").empty:
        st.caption(f"{title}: no data in the window yet")
        return
    st.altair_chart(line_chart(frame, unit, others), width="stretch")
    if note:
        st.caption(note)


def window_text(window_s: int) -> str:
    return f"{window_s // 60} min" if window_s % 60 == 0 else f"{window_s} s"


def fleet_panels(view: FleetView, window_s: int) -> None:
    st.caption(f"Source: {view.source}")
    # Verbatim (warning_html): a problem quotes a URL and an exception, a notice names workers by their URLs.
    for problem in view.problems:
        st.markdown(warning_html(problem), unsafe_allow_html=True)
    for notice in down_notices(view):
        st.markdown(warning_html(notice), unsafe_allow_html=True)
    if not view.answered and view.problems:
        st.error(
            "No metrics source answered, so there is nothing to chart: check that the workers are up and that "
            "DASHBOARD_PROMETHEUS__URL (or DASHBOARD_SCRAPE__URLS) points at them."
        )
    throughput = view.throughput.fillna(0)
    peak = float(throughput.sum(axis=1).max()) if len(throughput) else 0.0
    left, right = st.columns(2)
    with left:
        chart("Throughput", throughput, "images/s", f"Throughput peak: {peak:.2f} images/s (all workers)")
        chart("Latency", view.latency, "seconds", "p50 and p95, end to end (request sent → answer) and per model call")
        st.subheader("Failures by kind")
        # Counted over the window, so a worker scaling in or restarting does not make failures vanish.
        if view.failures.empty:
            st.caption(f"No failures in the last {window_text(window_s)}")
        else:
            st.bar_chart(view.failures, x_label="kind", y_label=f"failures in the last {window_text(window_s)}")
            counts = ", ".join(f"{kind} {int(n)}" for kind, n in view.failures["failures"].items())
            st.caption(f"Failures in the last {window_text(window_s)}: {counts}")
    with right:
        chart("Batch size", view.batch_size, "images per model call", others="mean")
        chart("Consumer lag", view.lag, "messages", "requests on the topic not yet answered and committed")
        st.subheader("Model version per worker")
        up = view.workers[view.workers["up"]] if len(view.workers) else view.workers
        if len(up):
            st.altair_chart(versions_chart(up.groupby("model version").size()), width="stretch")
        else:
            st.caption("No workers up")
    # The whole page's width: five columns of addresses, versions and sources do not fit half of a laptop's.
    st.subheader("Workers")
    if view.workers.empty:
        st.caption("No workers seen")
    else:
        # HTML, every value's text escaped by workers_table: st.table's cells are Markdown, which changed them.
        st.markdown(workers_table(view.workers), unsafe_allow_html=True)


def fleet_tab(settings: DashboardSettings) -> None:
    @st.fragment(run_every=settings.fleet.refresh_s)
    def live() -> None:
        view = fleet_view(settings)
        if view is None:
            st.info(
                "No metrics source is configured: set DASHBOARD_PROMETHEUS__URL (e.g. http://prometheus:9090), "
                "or DASHBOARD_SCRAPE__URLS to the workers' /metrics URLs (e.g. http://worker-0:9400/metrics)."
            )
            return
        fleet_panels(view, settings.fleet.window_s)

    live()


def main() -> None:
    st.set_page_config(page_title="captionfleet", page_icon="🖼️", layout="wide")
    st.title("captionfleet")
    try:
        settings = load_dashboard_settings()
        model_settings = load_model_settings()
    except SettingsError as error:
        st.error(f"Bad setting:\n\n{error}")
        st.stop()
    decoding = sidebar(model_settings, settings)
    captions, fleet = st.tabs(["Caption images", "Fleet"])
    with captions:
        upload_tab(model_settings, settings, decoding)
    with fleet:
        fleet_tab(settings)


# Streamlit runs this file as __main__; imported (tests/e2e/fleet_page.py draws fleet_panels alone), it draws nothing.
if __name__ == "__main__":
    main()
