"""`/metrics`' engine gauges: one unlabelled sample per gauge for an engine, and per replica too for a data-parallel
engine (its replicas' stats in `EngineStats.extra`), with the requests routed to each replica."""

from __future__ import annotations

from lm_core.engine import EngineStats
from lm_serve.metrics import ServerMetrics

GAUGES = ("lm_requests_running", "lm_requests_waiting", "lm_kv_cache_usage_ratio", "lm_prefix_cache_hit_rate")


def samples_of(metrics: ServerMetrics) -> dict[str, float]:
    samples = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_one_engine_has_one_unlabelled_sample_per_gauge():
    stats = EngineStats(num_running=3, num_waiting=1, kv_usage=0.5, prefix_cache_hit_rate=0.25)
    samples = samples_of(ServerMetrics(lambda: stats))
    assert [samples[name] for name in GAUGES] == [3, 1, 0.5, 0.25]
    assert not [key for key in samples if "replica" in key or key.startswith("lm_dp_")]


def test_replicas_get_a_sample_each_beside_the_whole():
    replicas = [
        EngineStats(num_running=1, num_waiting=0, kv_usage=0.25, prefix_cache_hit_rate=0.5),
        EngineStats(num_running=2, num_waiting=3, kv_usage=0.75, prefix_cache_hit_rate=0.0),
    ]
    whole = EngineStats(
        num_running=3,
        num_waiting=3,
        kv_usage=0.5,
        prefix_cache_hit_rate=0.25,
        extra={"replicas": replicas, "num_routed": [5, 7], "num_in_flight": [1, 2]},
    )
    samples = samples_of(ServerMetrics(lambda: whole))
    assert [samples[name] for name in GAUGES] == [3, 3, 0.5, 0.25]
    for index, replica in enumerate(replicas):
        label = f'{{replica="{index}"}}'
        expected = [replica.num_running, replica.num_waiting, replica.kv_usage, replica.prefix_cache_hit_rate]
        assert [samples[name + label] for name in GAUGES] == expected
    assert samples['lm_dp_requests_routed_total{replica="0"}'] == 5
    assert samples['lm_dp_requests_routed_total{replica="1"}'] == 7
    assert samples['lm_dp_requests_in_flight{replica="0"}'] == 1
    assert samples['lm_dp_requests_in_flight{replica="1"}'] == 2
