"""Parsing a remote media URL strictly, so the host we validate is the host the HTTP client talks to."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from lm_vl.media.errors import refused
from lm_vl.media.policy import MediaPolicy

# Characters no URL we accept contains raw. Parsers disagree about them, and a disagreement about where the host ends
# is how `https://example.com\@internal/` (a browser reads host `example.com`, others read `internal`) or a URL with a
# tab or newline in it gets one host checked and another fetched.
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class RemoteTarget:
    """One validated hop: the URL to request and its host as compared and resolved.

    `host` is lower case, IDNA-encoded (`xn--`), without IPv6 brackets or a trailing dot; `url.raw_host` is the form
    the HTTP client puts in the Host header, SNI and its connection pool key.
    """

    url: httpx.URL
    scheme: str
    host: str
    port: int


def parse_remote_url(raw: str, policy: MediaPolicy) -> RemoteTarget:
    """Validate an http(s) URL's form, scheme and host against `policy` (DNS comes later, in `resolve_host`).

    Refused: characters parsers disagree on (whitespace, controls, backslashes), userinfo (`user@host`: an old way to
    make a URL look like it names another host), a scheme outside the policy, an empty host, and a host outside
    `allowed_media_domains` when that list is set.
    """
    match = _FORBIDDEN_CHARS.search(raw)
    if match is not None:
        what = "a backslash" if match.group() == "\\" else f"the character {match.group()!r}"
        raise refused(f"URL contains {what}, which URL parsers disagree on", "invalid_url")
    scheme, sep, rest = raw.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise refused(f"URL scheme of {_shorten(raw)!r} is not http or https", "scheme_not_allowed")
    if scheme not in policy.allowed_schemes:
        raise refused(f"URL scheme {scheme!r} is not allowed", "scheme_not_allowed")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise refused("URLs with userinfo ('user@host') are not accepted", "invalid_url")
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, ValueError) as exc:
        raise refused(f"malformed URL: {exc}", "invalid_url") from None
    if url.userinfo:  # already refused above; a second parser agreeing is the point
        raise refused("URLs with userinfo ('user@host') are not accepted", "invalid_url")
    host = url.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise refused("URL has no host", "invalid_url")
    if policy.allowed_media_domains is not None and not host_allowed(host, policy.allowed_media_domains):
        raise refused(f"host {host!r} is not in the allowed media domains", "domain_not_allowed")
    return RemoteTarget(url=url, scheme=scheme, host=host, port=url.port or _DEFAULT_PORTS[scheme])


def host_allowed(host: str, patterns: Sequence[str]) -> bool:
    """Whether `host` matches an exact entry, or a `*.domain` entry as a subdomain of `domain` (never `domain`)."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
