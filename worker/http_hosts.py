"""Which http(s) urls the fetcher may request: ``WORKER_FETCH__ALLOWED_HOSTS``' one rule, for the first url
and for every redirect (core/settings.py ``split_host_port`` reads the entries)."""

from __future__ import annotations

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
