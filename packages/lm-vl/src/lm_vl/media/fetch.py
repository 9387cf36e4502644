"""Fetching an http(s) URL under a `MediaPolicy`: every hop validated, the dialed address pinned, the body capped."""

from __future__ import annotations

import ssl
import time

import httpx

from lm_vl.media.addresses import resolve_host
from lm_vl.media.errors import fetch_failed
from lm_vl.media.policy import MediaPolicy
from lm_vl.media.transport import PinnedTransport
from lm_vl.media.urls import RemoteTarget, parse_remote_url

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "lm-vl media fetcher"


def fetch_url(
    url: str,
    policy: MediaPolicy,
    *,
    max_bytes: int | None = None,
    total_timeout: float | None = None,
    accept: str = "image/*",
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """The body of `url` (http or https), at most `max_bytes` (default `policy.max_bytes`) long.

    Each hop, the first and every redirect target, is parsed and checked (`parse_remote_url`), its host resolved
    once and refused unless every address is public (`resolve_host`), and then requested over a connection to that
    address only (`PinnedTransport`). Redirects are followed by hand, at most `policy.max_redirects` of them. The
    whole fetch, redirects included, ends by `total_timeout` (default `policy.total_timeout`). `ssl_context`
    replaces httpx's default certificate store (for a private CA).

    Raises `MediaError`: 400 when a hop breaks the policy, 422 when the fetch fails.
    """
    max_bytes = policy.max_bytes if max_bytes is None else max_bytes
    total_timeout = policy.total_timeout if total_timeout is None else total_timeout
    deadline = time.monotonic() + total_timeout
    target = parse_remote_url(url, policy)
    timeout = httpx.Timeout(
        connect=policy.connect_timeout, read=policy.read_timeout, write=policy.read_timeout, pool=None
    )
    for num_redirects in range(policy.max_redirects + 1):
        address = resolve_host(target.host, target.port, allow_loopback=policy.allow_loopback_for_tests)
        # The transport is used directly, without an httpx.Client: no client-side redirect handling (which parses
        # Location before we see it), cookies, auth or proxies from the environment. One transport per hop: the next
        # hop may be another host, with its own validated address.
        request = httpx.Request("GET", target.url, headers=_request_headers(accept))
        request.extensions["timeout"] = timeout.as_dict()
        transport = PinnedTransport(target.url.raw_host, address, deadline, ssl_context)
        try:
            with transport:
                response = transport.handle_request(request)
                try:
                    if response.status_code not in _REDIRECT_STATUSES:
                        return _read_body(response, target, max_bytes, deadline, total_timeout)
                    location = response.headers.get("location")
                finally:
                    response.close()
        except httpx.TimeoutException:
            raise fetch_failed(
                f"fetching from {target.host!r} timed out (limits: {policy.read_timeout:g} s per read, "
                f"{total_timeout:g} s in all)",
                "timeout",
            ) from None
        except httpx.HTTPError as exc:
            raise fetch_failed(f"fetching from {target.host!r} failed: {exc}", "fetch_failed") from None
        if not policy.allow_redirects:
            raise fetch_failed(f"{target.host!r} answered with a redirect, and redirects are disabled", "redirect")
        if num_redirects == policy.max_redirects:
            break
        if not location:
            raise fetch_failed(f"{target.host!r} answered with a redirect without a Location", "redirect")
        try:
            next_url = str(target.url.join(location))
        except (httpx.InvalidURL, ValueError):
            raise fetch_failed(f"{target.host!r} redirected to a malformed URL", "redirect") from None
        # The next hop is validated exactly like the first URL: form, scheme, allow-list, then DNS.
        target = parse_remote_url(next_url, policy)
    raise fetch_failed(f"more than {policy.max_redirects} redirects", "too_many_redirects")


def _request_headers(accept: str) -> dict[str, str]:
    # `identity`: a compressed body would be inflated past the byte cap before we could count it.
    return {"Accept": accept, "Accept-Encoding": "identity", "User-Agent": _USER_AGENT}


def _read_body(
    response: httpx.Response, target: RemoteTarget, max_bytes: int, deadline: float, total_timeout: float
) -> bytes:
    if response.status_code != 200:
        raise fetch_failed(f"{target.host!r} answered HTTP {response.status_code}", "upstream_status")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise fetch_failed(f"{target.host!r} sent a {encoding!r}-encoded body; only plain bodies are read", "encoding")
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise fetch_failed(f"{target.host!r} declared {int(declared)} bytes; the limit is {max_bytes}", "too_large")
    chunks: list[bytes] = []
    num_bytes = 0
    for chunk in response.iter_raw():
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise fetch_failed(f"the body from {target.host!r} exceeds the limit of {max_bytes} bytes", "too_large")
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout(f"over the total limit of {total_timeout:g} s")
        chunks.append(chunk)
    return b"".join(chunks)
