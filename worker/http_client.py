"""http(s) downloads of images, on httpx: the one client behind the stream's fetcher and the archive job's
manifests of urls.

Every request names us (``WORKER_FETCH__USER_AGENT``); at most ``per_host_concurrency`` requests go to one
host at once (its slot taken before the caller's overall one); each attempt has one deadline for connecting,
the headers, every redirect hop and the whole body, kept by the sockets themselves (worker/http_deadline.py:
a host dripping a byte at a time cannot hold a slot for long); bodies over the byte limit are refused by
their declared length or cut off one byte past it. Bodies are asked for unencoded (``Accept-Encoding:
identity``) and read raw: a host that gzips anyway is decoded under the same limit, one layer at most, so
500 bytes of nested gzip cannot become gigabytes in memory. Redirects are followed by hand, each one held to
the same allowed-hosts rule as the first url (worker/http_hosts.py). An image whose host says
``X-Robots-Tag: noai`` or ``noimageai`` (for everyone, or for our user agent) is not read: kind
``opted_out``. Timeouts, dropped connections, 429 and 5xx are worth another attempt
(``TransientFetchError``).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any
from urllib.parse import urljoin

import httpx

from captionfleet.core.failures import (
    FETCH_FAILURE,
    FORBIDDEN,
    MALFORMED,
    NOT_FOUND,
    OPTED_OUT,
    TIMEOUT,
    TOO_LARGE,
    UNAVAILABLE,
    FetchError,
    TransientFetchError,
)
from captionfleet.core.s3 import RetryPolicy
from captionfleet.core.settings import FetchSettings, split_host_port
from captionfleet.worker.http_deadline import DeadlineTransport, attempt_deadline
from captionfleet.worker.http_hosts import address, host_allowed

# Content-Encodings decoded (under the byte limit) when a host sends one although we asked for identity.
_DECODABLE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

# The X-Robots-Tag directives with which sites opt their images out of AI datasets (as img2dataset honours them).
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
# Robots directives written "name: value" or "name:value": a name, not a bot's.
_VALUED_DIRECTIVES = frozenset({"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"})
# A user agent's product token (no spaces: a date's "25-jun-10 15:00" is not one), or "*".
_BOT_NAME = re.compile(r"\*|[a-z0-9][a-z0-9_.\-]*")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def opted_out(values: Iterable[str], user_agent: str) -> str | None:
    """The opt-out directive in these ``X-Robots-Tag`` values that applies to us, or None. A value is
    ``directive, directive`` or ``bot: directive, ...``; a named bot other than ours is someone else's rule.
    Some directives carry a value after a colon (``max-image-preview:large``, ``unavailable_after: <date>``):
    only a leading name that is none of those, and could be a user agent's, names a bot."""
    token = user_agent.split("/", 1)[0].strip().lower()
    for value in values:
        bot = None  # until a value names one, its directives are everyone's
        for part in value.split(","):
            text = part.strip().lower()
            name, colon, rest = (piece.strip() for piece in text.partition(":"))
            if colon and name not in _VALUED_DIRECTIVES and _BOT_NAME.fullmatch(name):
                bot, text = name, rest  # "bot: directive": this and the following directives are bot's
            if text in OPT_OUT_DIRECTIVES and bot in (None, "*", token):
                return text
    return None


class HttpFetcher:
    """Thread-safe; one per process part (its connection pool is shared by every thread)."""

    def __init__(
        self,
        settings: FetchSettings,
        *,
        max_bytes: int,
        retry: RetryPolicy,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        outer_slots: threading.BoundedSemaphore | None = None,
    ) -> None:
        """``outer_slots``: the caller's limit on fetches of every kind at once, taken after this host's slot
        (a slow host's queue then holds none of them)."""
        self.settings = settings
        self.max_bytes = max_bytes
        self.allowed_hosts = frozenset(split_host_port(host) for host in settings.allowed_hosts)
        self._retry = replace(retry, retryable=lambda error: isinstance(error, TransientFetchError), describe=str)
        self._deadline_s = settings.connect_timeout_s + settings.read_timeout_s
        self._clock = clock
        self._outer = outer_slots
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._client = httpx.Client(
            follow_redirects=False,  # each hop is checked against the allowed hosts first
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
            # identity: an image gains nothing from gzip, and httpx's own decoders have no size bound.
            headers={"User-Agent": settings.user_agent, "Accept-Encoding": "identity"},
            limits=limits,
            trust_env=False,  # no proxy from the environment: the allow-list is about where requests go
            # The sockets keep each attempt's deadline: headers and redirect hops too, not only the body.
            transport=transport or DeadlineTransport(limits),
        )
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._hosts_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str) -> bytes:
        """The body, after retries; raises FetchError (its kind the last attempt's)."""
        try:
            data, _attempts = self._retry.call(lambda: self.get_once(url), what=f"fetch {url}")
        except TransientFetchError as error:
            raise FetchError(error.kind, f"{error.message} (gave up after {self._retry.attempts} attempts)") from error
        return data

    def _slot(self, url: str) -> threading.BoundedSemaphore:
        host = address(url)
        with self._hosts_lock:
            if host not in self._hosts:
                self._hosts[host] = threading.BoundedSemaphore(self.settings.per_host_concurrency)
            return self._hosts[host]

    def get_once(self, url: str) -> bytes:
        """One attempt, redirects included. Raises FetchError, or TransientFetchError when another
        attempt may succeed."""
        # The host's slot first, then the caller's: waiting for a busy host holds nothing anyone else needs.
        with self._slot(url), self._outer or contextlib.nullcontext():
            deadline = self._clock() + self._deadline_s
            try:
                with attempt_deadline(time.monotonic() + self._deadline_s):
                    return self._follow(url, deadline)
            except httpx.TimeoutException as error:
                why = f"{error or type(error).__name__}"
                raise TransientFetchError(TIMEOUT, f"not received within {self._deadline_s:g}s ({why})") from error
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as error:
                raise FetchError(MALFORMED, f"{url[:200]!r}: {error}") from error
            except httpx.RemoteProtocolError as error:
                # httpx parses a redirect's Location even when not following it: a broken one (a port that is
                # not a number) is a redirect nowhere allowed, not a failing host.
                if "location header" in str(error).lower():
                    raise FetchError(FORBIDDEN, f"redirect refused: {error}") from error
                raise TransientFetchError(UNAVAILABLE, f"connection failed: {error}") from error
            except httpx.TransportError as error:
                raise TransientFetchError(UNAVAILABLE, f"connection failed: {error or type(error).__name__}") from error

    def _follow(self, url: str, deadline: float) -> bytes:
        current = url
        for _hop in range(self.settings.max_redirects + 1):
            with self._client.stream("GET", current) as response:
                if response.status_code not in _REDIRECTS:
                    return self._body(url, response, deadline)
                location = response.headers.get("location")
            if not location:
                raise FetchError(FETCH_FAILURE, f"{url}: HTTP redirect without a Location")
            current = urljoin(current, location)
            try:
                allowed = host_allowed(current, self.allowed_hosts)
            except ValueError:  # a Location with a broken port
                allowed = False
            if not allowed:
                raise FetchError(
                    FORBIDDEN, f"redirect to {current[:200]!r} refused: not in WORKER_FETCH__ALLOWED_HOSTS"
                )
        raise FetchError(FETCH_FAILURE, f"{url}: more than {self.settings.max_redirects} redirects")

    def _body(self, url: str, response: httpx.Response, deadline: float) -> bytes:
        status = response.status_code
        if status in (404, 410):
            raise FetchError(NOT_FOUND, f"{url}: HTTP {status}")
        if status in (401, 403):
            raise FetchError(FORBIDDEN, f"{url}: HTTP {status}")
        if status == 429 or status >= 500:
            raise TransientFetchError(UNAVAILABLE, f"HTTP {status}")
        if not 200 <= status < 300:
            raise FetchError(FETCH_FAILURE, f"{url}: HTTP {status}")
        if self.settings.honour_opt_out:
            directive = opted_out(response.headers.get_list("x-robots-tag"), self.settings.user_agent)
            if directive is not None:
                raise FetchError(
                    OPTED_OUT,
                    f"{url}: the host opts this image out (X-Robots-Tag: {directive}); it was not read "
                    "(WORKER_FETCH__HONOUR_OPT_OUT=false only with the site's consent)",
                )
        declared = int(response.headers.get("content-length") or 0)
        if declared > self.max_bytes:
            raise FetchError(TOO_LARGE, f"{declared} bytes exceeds the limit of {self.max_bytes} bytes")
        decoder = _decoder(url, response.headers.get_list("content-encoding"))
        chunks: list[bytes] = []
        size = received = 0
        # Checked after every chunk: httpx's read timeout bounds each receive, not the whole body.
        for raw in response.iter_raw():  # raw: httpx would decode every layer, unbounded
            received += len(raw)
            chunk = raw if decoder is None else _decode(decoder, raw, self.max_bytes - size)
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_bytes or received > self.max_bytes:
                raise FetchError(TOO_LARGE, f"more than {self.max_bytes} bytes")
            if self._clock() > deadline:
                raise TransientFetchError(TIMEOUT, f"body not received within {self._deadline_s:g}s")
        return b"".join(chunks)


def _decoder(url: str, values: list[str]) -> Any:
    """A zlib decoder for the one encoding a host applied although we asked for none, or None (identity).
    Several layers, or one we do not decode, are refused: no image needs them."""
    codings = [
        c.strip().lower() for value in values for c in value.split(",") if c.strip().lower() not in ("", "identity")
    ]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in _DECODABLE:
        raise FetchError(
            FETCH_FAILURE,
            f"{url}: the body is sent with Content-Encoding {', '.join(codings)} although identity was asked for: "
            "refused (only one gzip or deflate layer is decoded)",
        )
    return zlib.decompressobj(_DECODABLE[codings[0]])


def _decode(decoder: Any, data: bytes, room: int) -> bytes:
    """At most ``room + 1`` decoded bytes of ``data`` (one past the limit is enough to refuse it)."""
    try:
        return decoder.decompress(data, max(room, 0) + 1)
    except zlib.error as error:
        raise FetchError(FETCH_FAILURE, f"the body's Content-Encoding does not decode: {error}") from error
