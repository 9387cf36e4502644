"""Prometheus metrics (`GET /metrics`), in a registry of the app's own so several apps can live in one process.

Request-level numbers (latencies, token counts, finish reasons) are recorded as requests run; engine numbers
(running/waiting requests, KV usage, prefix-cache hit rate) are read from `engine.stats()` at scrape time, per
replica too when the engine is data-parallel.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lm_core.engine import EngineStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


# The engine gauges: name, help, and how to read the value from an `EngineStats`.
_ENGINE_GAUGES: tuple[tuple[str, str, Callable[[EngineStats], float]], ...] = (
    ("lm_requests_running", "Sequences the engine is generating now.", lambda s: s.num_running),
    ("lm_requests_waiting", "Sequences queued in the engine.", lambda s: s.num_waiting),
    ("lm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1).", lambda s: s.kv_usage),
    (
        "lm_prefix_cache_hit_rate",
        "Prompt tokens found in the prefix cache / prompt tokens looked up.",
        lambda s: s.prefix_cache_hit_rate,
    ),
)


class _EngineCollector:
    """Gauges read from the engine when Prometheus scrapes.

    Each gauge has one unlabelled sample, the engine's whole load. A data-parallel engine (`lm_core.data_parallel`)
    reports its replicas' own stats in `extra["replicas"]`: each gauge then also has one sample per replica, labelled
    `replica="0"`, `"1"`, ..., and the requests routed to each replica and in flight there are exported as well.
    """

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        replicas: list[EngineStats] = s.extra.get("replicas") or []
        for name, doc, read in _ENGINE_GAUGES:
            family = GaugeMetricFamily(name, doc)
            family.add_sample(name, {}, float(read(s)))
            for index, replica in enumerate(replicas):
                family.add_sample(name, {"replica": str(index)}, float(read(replica)))
            yield family
        if not replicas:
            return
        routed = CounterMetricFamily(
            "lm_dp_requests_routed", "Requests the data-parallel router sent to each replica.", labels=["replica"]
        )
        for index, count in enumerate(s.extra.get("num_routed", ())):
            routed.add_metric([str(index)], float(count))
        yield routed
        in_flight = GaugeMetricFamily(
            "lm_dp_requests_in_flight",
            "Requests routed to each replica whose streams have not ended.",
            labels=["replica"],
        )
        for index, count in enumerate(s.extra.get("num_in_flight", ())):
            in_flight.add_metric([str(index)], float(count))
        yield in_flight


class ServerMetrics:
    """The server's metrics; `track()` gives a `RequestTracker` per generation request."""

    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.in_flight = Gauge("lm_http_requests_in_flight", "Generation requests the server is answering.", registry=r)
        self.finished = Counter(
            "lm_requests_finished", "Finished sequences, by finish reason.", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("lm_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("lm_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "lm_time_to_first_token_seconds", "Time to the first generated token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "lm_time_per_output_token_seconds",
            "Mean time per generated token after the first.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lm_e2e_request_latency_seconds", "Time from request to last token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        r.register(_EngineCollector(engine_stats))

    def track(self, num_prompt_tokens: int, num_sequences: int, start: float | None = None) -> RequestTracker:
        """A tracker for a request accepted by the engine; `start` is when it arrived (`time.perf_counter()`)."""
        return RequestTracker(self, num_prompt_tokens, num_sequences, start)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class RequestTracker:
    """Times one request: `tokens(index, n)` on each new output, `finish(index, reason)` per sequence, `close()`.

    Sequences still unfinished at `close()` (client gone, error elsewhere) count as finished with reason "abort".
    """

    def __init__(
        self, metrics: ServerMetrics, num_prompt_tokens: int, num_sequences: int, start: float | None = None
    ) -> None:
        self.metrics = metrics
        self.num_sequences = num_sequences
        self._finished: set[int] = set()
        self.start = time.perf_counter() if start is None else start
        self.first_token: float | None = None
        self._first_of: dict[int, float] = {}
        self._count_of: dict[int, int] = {}
        self._closed = False
        metrics.in_flight.inc()
        metrics.prompt_tokens.inc(num_prompt_tokens)

    def tokens(self, index: int, num_new: int) -> None:
        """Counts `num_new` tokens generated for sequence `index` (the first of the request observes its TTFT)."""
        if num_new <= 0:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            self.metrics.ttft.observe(now - self.start)
        self._first_of.setdefault(index, now)
        self._count_of[index] = self._count_of.get(index, 0) + num_new
        self.metrics.generation_tokens.inc(num_new)

    def finish(self, index: int, reason: str | None) -> None:
        """Records sequence `index` as finished with `reason` and observes its time per output token."""
        now = time.perf_counter()
        count = self._count_of.get(index, 0)
        if count > 1:
            self.metrics.tpot.observe((now - self._first_of[index]) / (count - 1))
        self._finished.add(index)
        self.metrics.finished.labels(finish_reason=reason or "abort").inc()

    def close(self) -> None:
        """The request is over (finished, failed or abandoned); idempotent."""
        if self._closed:
            return
        self._closed = True
        num_abandoned = self.num_sequences - len(self._finished)
        if num_abandoned > 0:
            self.metrics.finished.labels(finish_reason="abort").inc(num_abandoned)
        self.metrics.in_flight.dec()
        self.metrics.e2e.observe(time.perf_counter() - self.start)
