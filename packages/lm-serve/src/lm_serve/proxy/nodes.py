"""The proxy's node table: which api_servers it knows, whether each is healthy, and which one takes the next request.

Plain Python plus httpx for the health checks; no FastAPI, so the routing rules are testable on their own. The
least-load rule is lm-core's (`lm_core.routing.least_loaded`), the one the data-parallel engine picks replicas by. All
methods run on the proxy's one event loop: picking a node and counting it busy happen without an `await` between
them, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lm_core.routing import in_turn, least_loaded

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("lm_serve.proxy")

ROUTING_STRATEGIES = ("least_load", "round_robin", "random", "least_latency")
# LMDeploy's proxy strategies (its `--strategy` / `--routing-strategy`) and ours of the same meaning. Its nodes may
# declare a speed; ours never do, so its speed-weighted rules reduce to the unweighted ones.
LMDEPLOY_STRATEGIES = {
    "min_expected_latency": "least_load",  # fewest unfinished requests per unit of speed
    "random": "random",  # random, weighted by speed
    "min_observed_latency": "least_latency",  # lowest mean latency of the node's recent requests
}
# How many of a node's latest completed requests `least_latency` averages.
NUM_LATENCY_SAMPLES = 15


def routing_strategy_from(name: str, field_name: str = "routing_strategy") -> str:
    """One of ROUTING_STRATEGIES for `name`: ours, or LMDeploy's name of the same rule ('-' or '_' alike)."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key in ROUTING_STRATEGIES:
        return key
    if key in LMDEPLOY_STRATEGIES:
        return LMDEPLOY_STRATEGIES[key]
    known = (*ROUTING_STRATEGIES, *(name for name in LMDEPLOY_STRATEGIES if name not in ROUTING_STRATEGIES))
    raise ValueError(f"{field_name}: expected one of {', '.join(known)}, got {name!r}")


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
    """How the proxy routes, watches and guards its nodes.

    `nodes` are api_server base URLs known at start (more may register through `POST /nodes/add`);
    `routing_strategy` is one of ROUTING_STRATEGIES or an LMDeploy name that maps onto one (LMDEPLOY_STRATEGIES).
    `health_interval` is the seconds between two rounds of `GET /health` to every node, `health_timeout` how long one
    check may take before the node counts as unhealthy (and, having not answered at all, as stalled).
    `connect_timeout` bounds opening a connection to a node; `read_timeout` is the longest a node may go without
    sending a byte (a non-streamed answer arrives whole, so it must fit in it; a stream may run for any time).
    `api_keys`: when given, clients must send one as `Authorization: Bearer KEY` (the header is forwarded, so nodes
    holding the same keys accept it). `admin_key`: the key node management (`/nodes`, `/nodes/add`,
    `/nodes/remove`, `/openapi.json`) requires; without it those routes are refused.
    """

    nodes: list[str] = field(default_factory=list)
    routing_strategy: str = "least_load"
    health_interval: float = 5.0
    health_timeout: float = 5.0
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.nodes, str):
            raise ValueError("nodes: expected a list of URLs, got one string")
        urls = [normalize_node_url(url, "nodes") for url in self.nodes]
        self.nodes = list(dict.fromkeys(urls))
        self.routing_strategy = routing_strategy_from(self.routing_strategy)
        for name in ("health_interval", "health_timeout", "connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
        if isinstance(self.api_keys, str) or not all(isinstance(k, str) and k.strip() for k in self.api_keys):
            raise ValueError(f"api_keys: expected a list of non-empty strings, got {self.api_keys!r}")
        self.api_keys = list(dict.fromkeys(k.strip() for k in self.api_keys))
        if self.admin_key is not None:
            if not isinstance(self.admin_key, str) or not self.admin_key.strip():
                raise ValueError("admin_key: expected a non-empty string or None")
            self.admin_key = self.admin_key.strip()
            if self.admin_key in self.api_keys:
                raise ValueError("admin_key: must differ from every client key in api_keys")


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
    # Seconds from sending to the end of the answer, of the node's latest completed requests (`least_latency`).
    latencies: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=NUM_LATENCY_SAMPLES), repr=False, compare=False
    )
    # Set when the node stops answering (a timeout, not a refusal): requests waiting on it give up and fail over.
    # Replaced by a fresh event when the node is healthy again; a request watches the one current at its start.
    stalled: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

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
            "mean_latency": self.mean_latency,
        }

    @property
    def mean_latency(self) -> float | None:
        """Mean seconds of the node's latest completed requests; None before the first."""
        return sum(self.latencies) / len(self.latencies) if self.latencies else None


class NodeTable:
    """The nodes in registration order, with the routing strategy that picks among them."""

    def __init__(self, routing_strategy: str = "least_load") -> None:
        self.routing_strategy = routing_strategy_from(routing_strategy)
        self._nodes: dict[str, Node] = {}
        # Position (in registration order) where the next search starts: just after the last node picked.
        self._cursor = 0

    @property
    def nodes(self) -> list[Node]:
        """The registered nodes, in registration order."""
        return list(self._nodes.values())

    def get(self, url: str) -> Node | None:
        """The node registered under `url` (normalized first), or None."""
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
        candidates = dict(healthy)
        # Ties (in load, in latency) go to the first candidate in round-robin order from the cursor, so they rotate.
        start = self._cursor % len(order)
        if self.routing_strategy == "least_load":
            index = least_loaded({i: node.in_flight for i, node in candidates.items()}, start)
        elif self.routing_strategy == "random":
            index = random.choice(in_turn(candidates, start))
        elif self.routing_strategy == "least_latency":
            # A node not measured yet counts as fastest, so that every node gets measured.
            index = least_loaded({i: node.mean_latency or 0.0 for i, node in candidates.items()}, start)
        else:
            index = in_turn(candidates, start)[0]
        assert index is not None  # candidates is not empty
        node = candidates[index]
        self._cursor = index + 1
        node.in_flight += 1
        node.num_requests += 1
        return node

    def release(self, node: Node, latency: float | None = None) -> None:
        """The request `acquire` counted on `node` has finished (or failed); `latency`: its seconds, if it completed."""
        node.in_flight = max(0, node.in_flight - 1)
        if latency is not None:
            node.latencies.append(latency)

    def mark_failed(self, node: Node, reason: str, stalled: bool = False) -> None:
        """A request could not reach `node`: skip it until a health check finds it healthy again.

        `stalled`: the node accepted but stopped answering (a timeout); requests waiting on it are told to give up.
        """
        if node.healthy:
            logger.warning("node %s failed a request and is marked unhealthy: %s", node.url, reason)
        node.num_failures += 1
        self._set_unhealthy(node, reason, stalled)

    def _set_unhealthy(self, node: Node, reason: str, stalled: bool) -> None:
        node.healthy = False
        node.last_error = reason
        if stalled:
            node.stalled.set()

    async def check(
        self, node: Node, client: httpx.AsyncClient, timeout: float, headers: dict[str, str] | None = None
    ) -> bool:
        """`GET /health` of `node` (and, when healthy, its `/v1/models`); updates and returns its health.

        The whole check is bounded by `timeout` (httpx's own timeouts bound each read, not the sum); a node that does
        not answer in time is marked stalled. `headers` go with `/v1/models` (a client key, for nodes that want one).
        """
        import httpx

        stalled = False
        try:
            response = await asyncio.wait_for(client.get(f"{node.url}/health", timeout=timeout), timeout)
            healthy = response.status_code == 200
            error = None if healthy else f"GET /health answered {response.status_code}"
        except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
            healthy, stalled = False, True
            error = f"GET /health got no answer within {timeout:g} s ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            healthy, error = False, f"GET /health failed: {describe_error(exc)}"
        if healthy != node.healthy:
            log = logger.info if healthy else logger.warning
            log("node %s is %s%s", node.url, "healthy" if healthy else "unhealthy", f" ({error})" if error else "")
        if not healthy:
            self._set_unhealthy(node, error or "unhealthy", stalled)
            return False
        if node.stalled.is_set():
            node.stalled = asyncio.Event()
        node.healthy = True
        node.models = await self._fetch_models(node, client, timeout, headers)
        return True

    async def check_all(self, client: httpx.AsyncClient, timeout: float, headers: dict[str, str] | None = None) -> None:
        """Health-check every node at once."""
        await asyncio.gather(*(self.check(node, client, timeout, headers) for node in self.nodes))

    @staticmethod
    async def _fetch_models(
        node: Node, client: httpx.AsyncClient, timeout: float, headers: dict[str, str] | None
    ) -> list[str] | None:
        # A node that refuses /v1/models (an API key this proxy does not hold) stays model-agnostic (None), not
        # unhealthy.
        import httpx

        try:
            request = client.get(f"{node.url}/v1/models", timeout=timeout, headers=headers)
            response = await asyncio.wait_for(request, timeout)
            if response.status_code != 200:
                return None
            return [str(entry["id"]) for entry in response.json()["data"]]
        except (httpx.HTTPError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
            return None


def describe_error(exc: BaseException) -> str:
    """`exc` as one line: its type, and its message when it has one (httpx's timeouts often have none)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
