"""The API's routes (FastAPI): ``POST /v1/captions``, ``POST /v1/chat/completions``, ``GET /v1/models``, and the
OpenAPI schema (``/openapi.json``, ``/docs``). ``guard`` has refused what it refuses before a route runs.

A request's images are checked against the allow-list before any I/O (a refused uri is that image's
``forbidden`` answer, nothing is read), uris are read in threads, then every image goes to the model lane at
once. The route waits for all their answers until the request's deadline (504, and its images still queued
are dropped) or the client's disconnect (its images still queued are dropped too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request, Response
from fastapi.security import HTTPBearer
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from captionfleet.core.failures import INFERENCE_FAILURE, MALFORMED, TIMEOUT, TOO_LARGE, FetchError
from captionfleet.core.settings import DecodingSettings, HttpSettings
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.http.answers import JSON, encode, error_body, result_row, status_of
from captionfleet.worker.http.guard import Guard, ServerState
from captionfleet.worker.http.inputs import Asked, BadRequest, CaptionsIn, parse_form, parse_json
from captionfleet.worker.http.items import ApiItem, Lane, QueueFull
from captionfleet.worker.http.openai_chat import chat_answer, parse_chat
from captionfleet.worker.messages import Result
from captionfleet.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

DEADLINE = "deadline"
DISCONNECT = "disconnect"
# nginx's word for it: the client closed the connection before the answer; nobody reads this response.
CLIENT_GONE = 499
# The route label of captionfleet_http_requests_total, by endpoint. The first two caption images: the requests
# KEDA's trigger on the API's demand counts (k8s/base/worker-scaledobject.yaml); /v1/models is only polled.
CAPTIONS, CHAT, MODELS = "captions", "chat", "models"
IMAGE_ROUTES = (CAPTIONS, CHAT)


@dataclass
class ApiContext:
    settings: HttpSettings
    decoding: DecodingSettings  # the worker's; a request's overrides start from it
    lane: Lane
    fetcher: Fetcher
    metrics: WorkerMetrics
    worker: str  # names this worker in every answer (WORKER_KAFKA__CLIENT_ID, or host-pid)
    state: ServerState


class Refused(Exception):
    """The request is answered as a whole with ``status`` and the error body."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class ClientGone(Exception):
    pass


_CAPTIONS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "id": {"type": "array", "items": {"type": "string"}, "description": "one per file, in order"},
                        "prompt": {"type": "string"},
                        "num_beams": {"type": "integer"},
                        "max_new_tokens": {"type": "integer"},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/CaptionsIn"}},
        },
    }
}


def create_app(ctx: ApiContext) -> Guard:
    app = FastAPI(
        title="captionfleet caption API",
        version="1",
        description="Captions for images: /v1/captions, and the OpenAI-compatible /v1/chat/completions subset.",
    )
    bearer = HTTPBearer(auto_error=False)  # documents the scheme; guard.py checks the token

    def answered(route: str, started: float, response: Response) -> Response:
        ctx.metrics.http_requests.labels(route, str(response.status_code)).inc()
        ctx.metrics.http_seconds.labels(route).observe(time.monotonic() - started)
        response.headers["x-captionfleet-worker"] = ctx.worker
        response.headers["x-captionfleet-model-version"] = ctx.lane.version
        return response

    async def handle(route: str, request: Request, work: Callable[[float], Awaitable[Any]]) -> Response:
        started = time.monotonic()
        try:
            body = await work(started)
            response = Response(encode(body), media_type=JSON)
        except BadRequest as bad:
            response = _error(bad.status, bad.kind, bad.message)
        except Refused as refused:
            response = _error(refused.status, refused.kind, refused.message, refused.headers)
        except ClientGone:
            response = Response(status_code=CLIENT_GONE)
        return answered(route, started, response)

    @app.post("/v1/captions", openapi_extra=_CAPTIONS_BODY, dependencies=[Depends(bearer)])
    async def captions(request: Request) -> Response:
        """Caption one or many images: multipart files, or JSON with uris (allow-listed) or base64 data.
        Answers come in request order, each with the fields of a Kafka result or a failure kind."""

        async def work(started: float) -> dict[str, Any]:
            asked = await _read_captions(request, ctx)
            results = await _caption(ctx, request, asked, started)
            rows = [
                result_row(r, worker=ctx.worker, prompt=w.prompt, end_to_end_ms=(time.monotonic() - started) * 1000)
                for r, w in zip(results, asked.images, strict=True)
            ]
            return {"model_version": ctx.lane.version, "worker": ctx.worker, "results": rows}

        return await handle(CAPTIONS, request, work)

    @app.post("/v1/chat/completions", dependencies=[Depends(bearer)])
    async def chat(request: Request) -> Response:
        """The OpenAI chat-completions subset: a user message with image_url parts (and text: the prompt)."""

        async def work(started: float) -> dict[str, Any]:
            asked = parse_chat(_json(await request.body()), ctx.decoding, ctx.settings)
            results = await _caption(ctx, request, asked, started)
            for result in results:
                if not result.ok:
                    kind = result.error_kind or MALFORMED
                    raise Refused(status_of(kind), kind, f"{result.id}: {result.error_message}")
            tokens = sum(r.tokens or 0 for r in results)
            return chat_answer([r.caption or "" for r in results], tokens, ctx.lane.version, ctx.worker)

        return await handle(CHAT, request, work)

    @app.get("/v1/models", dependencies=[Depends(bearer)])
    async def models(request: Request) -> Response:
        """The model version this worker serves, as an OpenAI model list."""

        async def work(started: float) -> dict[str, Any]:
            model = {"id": ctx.lane.version, "object": "model", "created": 0, "owned_by": "captionfleet"}
            return {"object": "list", "data": [model], "worker": ctx.worker}

        return await handle(MODELS, request, work)

    # The JSON body's model is read by hand (the route takes multipart too): put it in the schema once.
    schema = app.openapi()
    schema.setdefault("components", {}).setdefault("schemas", {})["CaptionsIn"] = CaptionsIn.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    for name, definition in schema["components"]["schemas"]["CaptionsIn"].pop("$defs", {}).items():
        schema["components"]["schemas"][name] = definition
    return Guard(app, ctx.settings, ctx.state, ctx.metrics)


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(encode(error_body(kind, message)), status_code=status, media_type=JSON, headers=headers)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON: send Content-Type application/json with a JSON object") from None


async def _read_captions(request: Request, ctx: ApiContext) -> Asked:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=ctx.settings.max_images, max_fields=100)
        except (MultiPartException, HTTPException) as error:
            # Starlette turns its parser's MultiPartException into a 400 HTTPException inside an app.
            text = error.detail if isinstance(error, HTTPException) else error.message
            if "too many files" in str(text).lower():
                raise BadRequest(
                    f"more than {ctx.settings.max_images} files (WORKER_HTTP__MAX_IMAGES): split the request",
                    kind=TOO_LARGE,
                    status=413,
                ) from None
            raise BadRequest(f"the multipart body could not be read: {text}") from None
        files: list[tuple[str, bytes]] = []
        fields: dict[str, list[str]] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or "", await value.read()))
            else:
                fields.setdefault(name, []).append(value)
        await form.close()
        return parse_form(files, fields, ctx.decoding, ctx.settings)
    if content_type.startswith("application/json") or not content_type:
        return parse_json(_json(await request.body()), ctx.decoding, ctx.settings)
    raise BadRequest(
        f"unsupported Content-Type {content_type[:80]!r}: send multipart/form-data files or application/json",
        status=415,
    )


def _failure(ctx: ApiContext, id: str, uri: str, kind: str, message: str, **timings: float) -> Result:
    return Result(id=id, uri=uri, model_version=ctx.lane.version, error_kind=kind, error_message=message, **timings)  # type: ignore[arg-type]


async def _read(ctx: ApiContext, item: ApiItem) -> Result | None:
    """Read an allowed uri into the item (in a thread: the fetcher blocks); its failure if it cannot be read."""
    began = time.perf_counter()
    try:
        item.data = await anyio.to_thread.run_sync(ctx.fetcher.fetch, item.uri)
    except FetchError as error:
        return _failure(ctx, item.id, item.uri, error.kind, error.message)
    finally:
        item.fetch_ms = round((time.perf_counter() - began) * 1000, 3)
    return None


async def _caption(ctx: ApiContext, request: Request, asked: Asked, started: float) -> list[Result]:
    """Every image's answer, in order: refused by the allow-list, failed to read, or the model's."""
    answers: list[Result | ApiItem] = []
    to_read: list[ApiItem] = []
    for wanted in asked.images:
        item = ApiItem(wanted.id, wanted.uri, data=wanted.data or b"", prompt=wanted.prompt, decoding=asked.decoding)
        if wanted.data is None:
            try:
                ctx.fetcher.check(wanted.uri)  # the allow-list, before any I/O
            except FetchError as error:
                answers.append(_failure(ctx, wanted.id, wanted.uri, error.kind, error.message))
                continue
            to_read.append(item)
        answers.append(item)
    deadline = started + ctx.settings.timeout_s
    if to_read:
        read = await _until(deadline, request, asyncio.gather(*(_read(ctx, item) for item in to_read)), [])
        for item, failure in zip(to_read, read, strict=True):
            if failure is not None:
                answers[answers.index(item)] = failure
    items = [a for a in answers if isinstance(a, ApiItem)]
    if items:
        try:
            ctx.lane.submit(items)
        except QueueFull as full:
            raise Refused(429, "busy", str(full), {"retry-after": str(ctx.settings.retry_after_s)}) from None
        results = await _until(
            deadline, request, asyncio.gather(*(asyncio.wrap_future(item.future) for item in items)), items
        )
        for item, result in zip(items, results, strict=True):
            result.fetch_ms = item.fetch_ms  # None for images sent with the request: nothing was fetched
            answers[answers.index(item)] = result
    return [a for a in answers if isinstance(a, Result)]


async def _until(deadline: float, request: Request, work: Awaitable[list[Any]], items: list[ApiItem]) -> list[Any]:
    """``work``'s outcome, unless the deadline passes (504) or the client goes away first; either way the
    request's images still queued are dropped."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {task, gone}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
    if task in done:
        try:
            return task.result()
        except asyncio.CancelledError:
            raise Refused(504, TIMEOUT, "the request's images were dropped") from None
        except Exception as error:  # the model side failed the image (it never should)
            log.exception("an API request failed in the model")
            raise Refused(500, INFERENCE_FAILURE, f"the model failed: {error}") from None
    reason = DISCONNECT if gone in done else DEADLINE
    for item in items:
        item.cancel(reason)
    task.cancel()
    task.add_done_callback(_retrieved)
    if reason == DISCONNECT:
        log.info("client went away: %d queued images dropped", len(items))
        raise ClientGone
    raise Refused(
        504,
        TIMEOUT,
        "not answered by the request's deadline (WORKER_HTTP__TIMEOUT_S): its queued images were dropped; "
        "retry later, or ask an operator to raise the deadline",
    )


def _retrieved(task: asyncio.Future[Any]) -> None:
    """An abandoned task's outcome, taken so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already, so only that can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
