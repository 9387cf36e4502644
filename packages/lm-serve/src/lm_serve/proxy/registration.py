"""How an api_server joins and leaves a proxy (`lm serve api_server --proxy-url URL`).

The api_server (through `membership.ProxyMembership`) calls `aregister_with_proxy(proxy_url, own_url, admin_key=...)`
once it accepts connections (the proxy health-checks the node as it registers, so the call must not block the
server's own event loop) and `aunregister_from_proxy(proxy_url, own_url, admin_key=...)` at shutdown. `own_url` must be
the address the proxy can reach the api_server at (not 0.0.0.0); `admin_key` is the proxy's `--admin-key`, without
which it refuses node management. The blocking twins serve scripts and other processes.
"""

from __future__ import annotations

import logging

from lm_core.errors import LMDeployError

logger = logging.getLogger("lm_serve.proxy")


class ProxyRegistrationError(LMDeployError):
    """The proxy could not be reached (`status_code` None), or refused the registration (`status_code` its answer's)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _request(proxy_url: str, own_url: str, admin_key: str | None) -> tuple[str, dict, dict]:
    """(proxy URL, JSON body, headers) of a /nodes call."""
    from lm_serve.proxy.nodes import normalize_node_url

    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    return normalize_node_url(proxy_url, "proxy_url"), {"url": normalize_node_url(own_url, "own_url")}, headers


def _check_registered(response, proxy_url: str) -> dict:
    if response.status_code != 200:
        raise ProxyRegistrationError(
            f"the proxy at {proxy_url} refused the registration ({response.status_code}): {response.text[:500]}",
            response.status_code,
        )
    try:
        node = response.json()
    except ValueError:
        node = None
    if not isinstance(node, dict):
        # Something answered 200 that is not an lm-serve proxy (a wrong --proxy-url pointing at another server).
        raise ProxyRegistrationError(
            f"{proxy_url}/nodes/add answered 200 without the node's JSON entry: is {proxy_url} an lm-serve proxy?",
            response.status_code,
        )
    return node


def register_with_proxy(proxy_url: str, own_url: str, timeout: float = 30.0, admin_key: str | None = None) -> dict:
    """Register the api_server at `own_url` with the proxy at `proxy_url`; returns the proxy's entry for the node.

    `admin_key`: the proxy's `--admin-key`. Raises ProxyRegistrationError when the proxy is unreachable or refuses
    (401 for a wrong key, 403 when the proxy has no admin key), ValueError for a malformed URL.
    """
    import httpx

    proxy_url, payload, headers = _request(proxy_url, own_url, admin_key)
    try:
        response = httpx.post(f"{proxy_url}/nodes/add", json=payload, headers=headers, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        raise ProxyRegistrationError(f"cannot register with the proxy at {proxy_url}: {exc}") from exc
    return _check_registered(response, proxy_url)


def unregister_from_proxy(proxy_url: str, own_url: str, timeout: float = 10.0, admin_key: str | None = None) -> bool:
    """Remove the api_server at `own_url` from the proxy; True if the proxy removed it.

    Never raises for an unreachable proxy (this runs at shutdown, when the proxy may be gone already): it logs a
    warning and returns False.
    """
    import httpx

    proxy_url, payload, headers = _request(proxy_url, own_url, admin_key)
    try:
        response = httpx.post(
            f"{proxy_url}/nodes/remove", json=payload, headers=headers, timeout=timeout, trust_env=False
        )
    except httpx.HTTPError as exc:
        logger.warning("could not unregister %s from the proxy at %s: %s", payload["url"], proxy_url, exc)
        return False
    return response.status_code == 200


async def aregister_with_proxy(
    proxy_url: str, own_url: str, timeout: float = 30.0, admin_key: str | None = None
) -> dict:
    """`register_with_proxy` for code running on an event loop."""
    import httpx

    proxy_url, payload, headers = _request(proxy_url, own_url, admin_key)
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            response = await client.post(f"{proxy_url}/nodes/add", json=payload, headers=headers)
    except httpx.HTTPError as exc:
        raise ProxyRegistrationError(f"cannot register with the proxy at {proxy_url}: {exc}") from exc
    return _check_registered(response, proxy_url)


async def aunregister_from_proxy(
    proxy_url: str, own_url: str, timeout: float = 10.0, admin_key: str | None = None
) -> bool:
    """`unregister_from_proxy` for code running on an event loop."""
    import httpx

    proxy_url, payload, headers = _request(proxy_url, own_url, admin_key)
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            response = await client.post(f"{proxy_url}/nodes/remove", json=payload, headers=headers)
    except httpx.HTTPError as exc:
        logger.warning("could not unregister %s from the proxy at %s: %s", payload["url"], proxy_url, exc)
        return False
    return response.status_code == 200
