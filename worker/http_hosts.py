"""Which http(s) urls the fetcher may request: ``WORKER_FETCH__ALLOWED_HOSTS``' one rule, for the first url
and for every redirect (core/settings.py ``split_host_port`` reads the entries)."""

from __future__ import annotations

import urllib.request
from typing import Any
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def address(url: str) -> str:
    """``host:port`` as the request goes, the scheme's default port filled in."""
    parts = urlsplit(url)
    port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(parts.scheme.lower())
    return f"{(parts.hostname or '').lower()}:{port}"


def host_allowed(url: str, allowed: frozenset[tuple[str, int | None]]) -> bool:
    """The one rule for a first url and each redirect: its host with this port, or the bare host when the
    port is the scheme's default. Raises ValueError for a port that is not one."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    if default is None or "@" in parts.netloc:
        # Credentials in the url ("user@host", or "allowed.host@other.host" dressed up as the allowed one):
        # the fetcher never sends them, and a parser that reads such a netloc otherwise than urlsplit
        # would connect elsewhere.
        return False
    host, port = (parts.hostname or "").lower(), parts.port
    return (host, default if port is None else port) in allowed or (port in (None, default) and (host, None) in allowed)


class RedirectRefused(Exception):
    pass


class HostPinnedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only where the first url could have gone: an allowed host must not bounce us
    anywhere else, another port of itself included."""

    def __init__(self, allowed_hosts: frozenset[tuple[str, int | None]]) -> None:
        self.allowed_hosts = allowed_hosts

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        try:
            allowed = host_allowed(newurl, self.allowed_hosts)
        except ValueError:  # a Location with a broken port
            allowed = False
        if not allowed:
            raise RedirectRefused(f"redirect to {newurl[:200]!r} refused: not in WORKER_FETCH__ALLOWED_HOSTS")
        return super().redirect_request(req, fp, code, msg, headers, newurl)
