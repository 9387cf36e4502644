"""An api_server's membership in a proxy (`lm serve api_server --proxy-url URL`): which URL it advertises, joining
once it listens (retried with backoff), leaving at shutdown.

Registration is best effort by design: a proxy that is down or refuses costs a warning, never the server. The HTTP
calls themselves are in `registration.py`; this module decides what to send and when.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lm_serve.proxy.nodes import normalize_node_url
from lm_serve.proxy.registration import ProxyRegistrationError, aregister_with_proxy, aunregister_from_proxy

logger = logging.getLogger("lm_serve.proxy")

# Addresses that mean "every interface": a listener's address, never one a proxy can connect to.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
REGISTERED_PREFIX = "lm-serve: registered with the proxy at "


def advertised_url(server_name: str, ports: Mapping[int, int], proxy_url: str) -> str:
    """The base URL the proxy at `proxy_url` should use to reach this server.

    `server_name` is the listening address (`--server-name`); `ports` maps each listening socket's address family
    (socket.AF_INET / AF_INET6) to its bound port, which is the real one when `--server-port 0` was asked. A named
    host is advertised as given. A wildcard becomes the local address that routes to the proxy: loopback when the
    proxy is on this host (including a proxy URL naming 0.0.0.0), else the source address the kernel picks for the
    proxy's address.
    """
    if not ports:
        raise ValueError("ports: the server listens on no socket")
    server_name = server_name.strip().strip("[]")
    proxy_host = urllib.parse.urlsplit(normalize_node_url(proxy_url, "proxy_url")).hostname
    if proxy_host is None:
        raise ValueError(f"proxy_url: {proxy_url!r} names no host")
    if server_name not in WILDCARD_HOSTS:
        family = socket.AF_INET6 if ":" in server_name else socket.AF_INET
        host = server_name
        if _is_loopback(server_name) and not _is_local(proxy_host):
            logger.warning(
                "this server listens on %s only: the proxy at %s cannot reach it (use --server-name 0.0.0.0)",
                server_name,
                proxy_url,
            )
    else:
        # "0.0.0.0" listens on IPv4 only and "::" on IPv6 only (asyncio sets IPV6_V6ONLY); "" listens on both.
        families = {"0.0.0.0": [socket.AF_INET], "::": [socket.AF_INET6]}.get(server_name) or [
            family for family in (socket.AF_INET, socket.AF_INET6) if family in ports
        ]
        family, host = _address_toward(proxy_host, families)
    port = ports.get(family, next(iter(ports.values())))
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _address_toward(proxy_host: str, families: Sequence[int]) -> tuple[int, str]:
    """(family, local address) this host would use to reach `proxy_host`, trying `families` in order."""
    try:
        resolved = [str(info[4][0]) for info in socket.getaddrinfo(proxy_host, None, type=socket.SOCK_DGRAM)]
    except OSError:
        resolved = []
    if _is_local(proxy_host) or any(_is_local(address) for address in resolved):
        # The proxy runs on this host: it can connect to our loopback address of either family.
        return families[0], "127.0.0.1" if families[0] == socket.AF_INET else "::1"
    for family in families:
        try:
            infos = socket.getaddrinfo(proxy_host, None, family, socket.SOCK_DGRAM)
        except OSError:
            continue
        for *_, sockaddr in infos:
            target = sockaddr[0]
            try:
                # A UDP "connect" sends nothing: it only asks the kernel's routing table for the source address.
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.connect((target, 9))
                    return family, probe.getsockname()[0]
            except OSError:
                continue
    fallback = socket.getfqdn()
    logger.warning(
        "found no local address that routes to the proxy host %s; advertising this host's name %s instead "
        "(give --server-name an address the proxy can reach)",
        proxy_host,
        fallback,
    )
    return families[0], fallback


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_local(host: str | None) -> bool:
    """Loopback, or the unspecified address (connecting to 0.0.0.0 or :: reaches this very host)."""
    if host is None:
        return False
    try:
        return _is_loopback(host) or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


@dataclass
class RetryPolicy:
    """How often and how patiently `ProxyMembership.join` registers: `num_attempts` tries, waiting `first_delay`
    seconds after the first failure and doubling each time; `timeout` bounds one attempt (the proxy health-checks
    the server before it answers), `leave_timeout` the unregistration at shutdown.
    """

    num_attempts: int = 5
    first_delay: float = 1.0
    timeout: float = 30.0
    leave_timeout: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.num_attempts, bool) or not isinstance(self.num_attempts, int) or self.num_attempts < 1:
            raise ValueError(f"num_attempts: expected an integer >= 1, got {self.num_attempts!r}")
        for name in ("first_delay", "timeout", "leave_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")


class ProxyMembership:
    """This server's registration with one proxy: `start()` once listening, `await leave()` at shutdown.

    `admin_key` is the proxy's `--admin-key` (`--proxy-admin-key` of the api_server), sent with both calls.
    """

    def __init__(
        self, proxy_url: str, own_url: str, policy: RetryPolicy | None = None, admin_key: str | None = None
    ) -> None:
        self.proxy_url = normalize_node_url(proxy_url, "proxy_url")
        self.own_url = normalize_node_url(own_url, "own_url")
        self.policy = policy or RetryPolicy()
        self.admin_key = admin_key or None
        self.is_registered = False
        self._task: asyncio.Task | None = None

    def start(self) -> asyncio.Task:
        """Begin joining in the background (the server keeps serving meanwhile); call on the server's event loop."""
        self._task = asyncio.get_running_loop().create_task(self.join())
        return self._task

    async def join(self) -> bool:
        """Register, retrying unreachable proxies and 5xx answers with backoff; True once registered.

        Never raises: the last failure is logged as a warning and the server goes on serving without the proxy.
        """
        delay = self.policy.first_delay
        for attempt in range(1, self.policy.num_attempts + 1):
            try:
                node = await aregister_with_proxy(self.proxy_url, self.own_url, self.policy.timeout, self.admin_key)
            except ProxyRegistrationError as exc:
                # A 4xx will not change by asking again (a wrong URL or admin key, or not an lm-serve proxy at all).
                is_final = attempt == self.policy.num_attempts or (exc.status_code or 500) < 500
                if is_final:
                    logger.warning(
                        "%s (attempt %d of %d). Serving anyway at %s without the proxy; register by hand with "
                        'POST %s/nodes/add {"url": "%s"} and the proxy\'s admin key',
                        exc,
                        attempt,
                        self.policy.num_attempts,
                        self.own_url,
                        self.proxy_url,
                        self.own_url,
                    )
                    return False
                logger.info("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay *= 2
                continue
            self.is_registered = True
            state = "healthy" if node.get("healthy") else "not healthy yet: its health checks will bring it in"
            print(f"{REGISTERED_PREFIX}{self.proxy_url} as {self.own_url} ({state})", flush=True)
            return True
        return False

    async def leave(self) -> bool:
        """Unregister (best effort, within `policy.leave_timeout`); True if the proxy removed this server."""
        task = self._task
        was_joining = task is not None and not task.done()
        if task is not None and was_joining:
            # Shutting down mid-registration: stop retrying; the proxy may have added us already, so still leave.
            task.cancel()
        if not (self.is_registered or was_joining):
            return False
        try:
            removed = await asyncio.wait_for(
                aunregister_from_proxy(self.proxy_url, self.own_url, self.policy.leave_timeout, self.admin_key),
                self.policy.leave_timeout,
            )
        except asyncio.TimeoutError:
            logger.warning("the proxy at %s did not answer the unregistration in time", self.proxy_url)
            removed = False
        if removed:
            print(f"lm-serve: unregistered from the proxy at {self.proxy_url}", flush=True)
        self.is_registered = False
        return removed
