"""The proxy's node table: which api_servers it knows, whether each is healthy, and which one takes the next request.

Plain Python plus httpx for the health checks; no FastAPI, so the routing rules are testable on their own. All
methods run on the proxy's one event loop: picking a node and counting it busy happen without an `await` between
them, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("lm_serve.proxy")

ROUTING_STRATEGIES = ("least_load", "round_robin")


def normalize_node_url(url: str, name: str = "url") -> str:
    """`url` as the proxy stores it: an absolute http(s) URL without a trailing slash; ValueError naming `name`."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{name}: expected a URL like http://HOST:PORT, got {url!r}")
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name}: expected a URL like http://HOST:PORT, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{name}: a node URL has no query or fragment, got {url!r}")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(f"{name}: bad port in {url!r}") from None
    return url


@dataclass
class ProxyConfig:
    """How the proxy routes and watches its nodes.

    `nodes` are api_server base URLs known at start (more may register through `POST /nodes/add`);
    `health_interval` is the seconds between two rounds of `GET /health` to every node, `health_timeout` how long one
    check may take before the node counts as unhealthy; `connect_timeout` bounds opening a connection to a node
    (a request's own duration is unbounded: generations may be long).
    """

    nodes: list[str] = field(default_factory=list)
    routing_strategy: str = "least_load"
    health_interval: float = 5.0
    health_timeout: float = 10.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.nodes, str):
            raise ValueError("nodes: expected a list of URLs, got one string")
        urls = [normalize_node_url(url, "nodes") for url in self.nodes]
        self.nodes = list(dict.fromkeys(urls))
        if self.routing_strategy not in ROUTING_STRATEGIES:
            raise ValueError(f"routing_strategy: expected one of {ROUTING_STRATEGIES}, got {self.routing_strategy!r}")
        for name in ("health_interval", "health_timeout", "connect_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")


@dataclass
class Node:
    """One api_server behind the proxy, with what the proxy knows about it."""

    url: str
    healthy: bool = False
    # Requests the proxy has sent to this node whose answers have not finished streaming yet.
    in_flight: int = 0
    num_requests: int = 0
    num_failures: int = 0
    # Model ids from the node's `GET /v1/models`; None while unknown (then the node is eligible for any model).
    models: list[str] | None = None
    last_error: str | None = None

    def to_dict(self) -> dict:
        """The node as `GET /nodes` shows it."""
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "num_requests": self.num_requests,
            "num_failures": self.num_failures,
            "models": self.models,
            "last_error": self.last_error,
        }


class NodeTable:
    """The nodes in registration order, with the routing strategy that picks among them."""

    def __init__(self, routing_strategy: str = "least_load") -> None:
        if routing_strategy not in ROUTING_STRATEGIES:
            raise ValueError(f"routing_strategy: expected one of {ROUTING_STRATEGIES}, got {routing_strategy!r}")
        self.routing_strategy = routing_strategy
        self._nodes: dict[str, Node] = {}
        # Position (in registration order) where the next search starts: just after the last node picked.
        self._cursor = 0

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def get(self, url: str) -> Node | None:
        return self._nodes.get(normalize_node_url(url))

    def add(self, url: str) -> Node:
        """Add the node at `url` (unhealthy until checked); adding a known URL returns its existing entry."""
        url = normalize_node_url(url)
        if url not in self._nodes:
            self._nodes[url] = Node(url)
        return self._nodes[url]

    def remove(self, url: str) -> Node | None:
        """Forget the node at `url`; its requests in flight finish normally. Returns it, or None if unknown."""
        return self._nodes.pop(normalize_node_url(url), None)

    def acquire(self, model: str | None = None, exclude: set[str] | frozenset[str] = frozenset()) -> Node | None:
        """Pick a healthy node for a request (for `model`, if given) and count it busy; None when there is none.

        Nodes known to serve `model` are preferred; if no healthy node lists it, any healthy node is picked so that
        the node answers with its own "model not found" error. The caller must `release` the node afterwards.
        """
        order = self.nodes
        healthy = [(i, node) for i, node in enumerate(order) if node.healthy and node.url not in exclude]
        if model is not None:
            serving = [(i, node) for i, node in healthy if node.models is None or model in node.models]
            healthy = serving or healthy
        if not healthy:
            return None
        # Candidates in round-robin order from the cursor, so ties in load also rotate among the nodes.
        ranked = sorted(healthy, key=lambda item: (item[0] - self._cursor) % len(order))
        if self.routing_strategy == "least_load":
            index, node = min(ranked, key=lambda item: item[1].in_flight)  # min keeps the first of equals
        else:
            index, node = ranked[0]
        self._cursor = index + 1
        node.in_flight += 1
        node.num_requests += 1
        return node

    def release(self, node: Node) -> None:
        """The request `acquire` counted on `node` has finished (or failed)."""
        node.in_flight = max(0, node.in_flight - 1)

    def mark_failed(self, node: Node, reason: str) -> None:
        """A request could not reach `node`: skip it until a health check finds it healthy again."""
        if node.healthy:
            logger.warning("node %s failed a request and is marked unhealthy: %s", node.url, reason)
        node.healthy = False
        node.num_failures += 1
        node.last_error = reason

    async def check(self, node: Node, client: httpx.AsyncClient, timeout: float) -> bool:
        """`GET /health` of `node` (and, when healthy, its `/v1/models`); updates and returns its health."""
        import httpx

        try:
            response = await client.get(f"{node.url}/health", timeout=timeout)
            healthy = response.status_code == 200
            error = None if healthy else f"GET /health answered {response.status_code}"
        except httpx.HTTPError as exc:
            healthy, error = False, f"GET /health failed: {describe_error(exc)}"
        if healthy != node.healthy:
            log = logger.info if healthy else logger.warning
            log("node %s is %s%s", node.url, "healthy" if healthy else "unhealthy", f" ({error})" if error else "")
        node.healthy = healthy
        node.last_error = error if error else node.last_error
        if healthy:
            node.models = await self._fetch_models(node, client, timeout)
        return healthy

    async def check_all(self, client: httpx.AsyncClient, timeout: float) -> None:
        """Health-check every node at once."""
        await asyncio.gather(*(self.check(node, client, timeout) for node in self.nodes))

    @staticmethod
    async def _fetch_models(node: Node, client: httpx.AsyncClient, timeout: float) -> list[str] | None:
        # A node that guards /v1/models with an API key stays model-agnostic (None) rather than unhealthy.
        import httpx

        try:
            response = await client.get(f"{node.url}/v1/models", timeout=timeout)
            if response.status_code != 200:
                return None
            return [str(entry["id"]) for entry in response.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None


def describe_error(exc: BaseException) -> str:
    """`exc` as one line: its type, and its message when it has one (httpx's timeouts often have none)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
