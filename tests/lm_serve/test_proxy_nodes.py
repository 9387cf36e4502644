"""The proxy's node table on its own: routing strategies, model filtering, failures, stalls, config validation."""

from __future__ import annotations

import asyncio
import collections
import socket

import pytest

from lm_serve.proxy.nodes import NodeTable, ProxyConfig, normalize_node_url, routing_strategy_from


def table_of(strategy: str, *urls: str) -> NodeTable:
    table = NodeTable(strategy)
    for url in urls:
        table.add(url).healthy = True
    return table


def test_round_robin_rotates_and_ignores_load():
    table = table_of("round_robin", "http://a:1", "http://b:1", "http://c:1")
    picked = [table.acquire().url for _ in range(6)]  # never released: load must not matter
    assert picked == ["http://a:1", "http://b:1", "http://c:1"] * 2


def test_least_load_picks_the_least_busy_and_rotates_among_equals():
    table = table_of("least_load", "http://a:1", "http://b:1")
    first = table.acquire()
    second = table.acquire()
    assert {first.url, second.url} == {"http://a:1", "http://b:1"}
    table.release(second)
    # a has one in flight, b none: b, then (both at one) the rotation goes on to a.
    assert [table.acquire().url, table.acquire().url] == ["http://b:1", "http://a:1"]
    assert [node.in_flight for node in table.nodes] == [2, 1]
    for _ in range(2):
        table.release(table.get("http://a:1"))
    assert table.acquire().url == "http://a:1"


def test_unhealthy_excluded_and_failed_nodes_are_skipped():
    table = table_of("round_robin", "http://a:1", "http://b:1")
    table.get("http://b:1").healthy = False
    assert {table.acquire().url for _ in range(3)} == {"http://a:1"}
    assert table.acquire(exclude={"http://a:1"}) is None
    node = table.get("http://a:1")
    table.mark_failed(node, "ConnectError: refused")
    assert (node.healthy, node.num_failures, node.last_error) == (False, 1, "ConnectError: refused")
    assert table.acquire() is None


def test_model_filter_prefers_nodes_that_list_the_model():
    table = table_of("least_load", "http://a:1", "http://b:1", "http://c:1")
    table.get("http://a:1").models = ["m1"]
    table.get("http://b:1").models = ["m2"]
    # c's models are unknown (None): it may serve anything.
    assert {table.acquire("m2").url for _ in range(4)} == {"http://b:1", "http://c:1"}
    assert {table.acquire("m1").url for _ in range(4)} == {"http://a:1", "http://c:1"}
    table.get("http://c:1").models = ["m3"]
    # Nobody lists m9: any healthy node gets it, and answers "model not found" itself.
    assert {table.acquire("m9").url for _ in range(3)} == {"http://a:1", "http://b:1", "http://c:1"}


def test_add_is_idempotent_and_remove_forgets():
    table = NodeTable()
    node = table.add("http://a:1/")
    assert table.add("http://a:1") is node
    assert [n.url for n in table.nodes] == ["http://a:1"]
    assert table.remove("http://a:1/") is node
    assert table.remove("http://a:1") is None
    assert table.acquire() is None


@pytest.mark.parametrize("url", ["", "localhost:8000", "ftp://a:1", "http://", "http://a:99999", "http://a:1/?q=1", 3])
def test_bad_node_urls_are_rejected_naming_the_field(url):
    with pytest.raises(ValueError, match=r"^url:"):
        normalize_node_url(url)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("routing_strategy", "fastest"),
        ("read_timeout", 0),
        ("api_keys", "k1"),
        ("api_keys", ["k1", ""]),
        ("admin_key", ""),
        ("health_interval", 0),
        ("health_timeout", -1),
        ("connect_timeout", True),
        ("nodes", "http://a:1"),
        ("nodes", ["http://a:1", "nope"]),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ProxyConfig(**{field: value})


def test_config_normalizes_and_deduplicates_nodes():
    config = ProxyConfig(nodes=["http://a:1/", "http://a:1", "https://b"])
    assert config.nodes == ["http://a:1", "https://b"]


def test_lmdeploy_strategy_names_map_onto_ours():
    assert routing_strategy_from("min_expected_latency") == "least_load"
    assert routing_strategy_from("MIN-EXPECTED-LATENCY") == "least_load"
    assert routing_strategy_from("random") == "random"
    assert routing_strategy_from("min_observed_latency") == "least_latency"
    assert routing_strategy_from("round-robin") == "round_robin"
    assert ProxyConfig(routing_strategy="min_expected_latency").routing_strategy == "least_load"
    with pytest.raises(ValueError, match="expected one of least_load, round_robin, random, least_latency, min_exp"):
        routing_strategy_from("fastest")


def test_least_latency_prefers_unmeasured_then_the_fastest_on_average():
    table = table_of("least_latency", "http://a:1", "http://b:1", "http://c:1")
    a, b, c = (table.get(f"http://{name}:1") for name in "abc")
    for node, latency in [(a, 1.0), (b, 0.2), (b, 0.4)]:
        table.release(node, latency)
    assert table.acquire() is c  # not measured yet
    table.release(c, 2.0)
    assert [table.acquire() for _ in range(3)] == [b] * 3  # mean 0.3 s against 1.0 and 2.0
    table.release(b, 5.0)  # now b's mean is (0.2 + 0.4 + 5.0) / 3
    assert table.acquire() is a and b.mean_latency == pytest.approx(5.6 / 3)
    assert b.to_dict()["mean_latency"] == pytest.approx(5.6 / 3)
    for _ in range(20):
        table.release(a, 3.0)
    assert a.mean_latency == 3.0 and len(a.latencies) == 15  # only the latest requests count


def test_random_strategy_spreads_over_every_healthy_node():
    table = table_of("random", "http://a:1", "http://b:1", "http://c:1")
    table.get("http://c:1").healthy = False
    counts = collections.Counter(table.acquire().url for _ in range(400))
    assert set(counts) == {"http://a:1", "http://b:1"}
    # Uniform: each side of 400 fair coin flips stays within 120..280 except with probability ~1e-15.
    assert 120 < counts["http://a:1"] < 280


def test_admin_key_must_differ_from_the_client_keys():
    config = ProxyConfig(api_keys=["k1", " k2 ", "k1"], admin_key=" admin ")
    assert (config.api_keys, config.admin_key) == (["k1", "k2"], "admin")
    with pytest.raises(ValueError, match=r"^admin_key: must differ"):
        ProxyConfig(api_keys=["k1"], admin_key="k1")


def test_a_node_that_accepts_but_never_answers_fails_its_check_as_stalled():
    import httpx

    async def check() -> tuple[bool, float]:
        table = NodeTable()
        with socket.socket() as silent:
            # Listening but never accepting: the kernel completes the handshake and queues the request unanswered,
            # as it does for a stopped process.
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            node = table.add(f"http://127.0.0.1:{silent.getsockname()[1]}")
            node.healthy = True
            waiting = asyncio.ensure_future(node.stalled.wait())
            async with httpx.AsyncClient() as client:
                started = asyncio.get_running_loop().time()
                healthy = await table.check(node, client, timeout=0.5)
                elapsed = asyncio.get_running_loop().time() - started
            await asyncio.wait_for(waiting, 1)  # requests watching the node are told
        assert not node.healthy and "GET /health got no answer within 0.5 s" in node.last_error
        return healthy, elapsed

    healthy, elapsed = asyncio.run(check())
    assert healthy is False and elapsed < 3


def test_only_a_timeout_marks_a_node_stalled():
    table = table_of("least_load", "http://a:1")
    node = table.get("http://a:1")
    table.mark_failed(node, "ConnectError: refused")
    assert not node.stalled.is_set()  # a refusal: requests already answering from it carry on
    table.mark_failed(node, "ReadTimeout", stalled=True)
    assert node.stalled.is_set() and node.num_failures == 2


def test_node_reader_fails_over_before_commit_and_ends_only_silent_streams_after():
    from lm_serve.proxy.forward import NodeFailed, NodeReader

    async def main() -> None:
        loop = asyncio.get_running_loop()
        table = table_of("least_load", "http://a:1", "http://b:1", "http://c:1")
        a, b, c = (table.get(f"http://{name}:1") for name in "abc")

        # Nothing sent to the client yet: the stall ends the wait at once, and the pending work is cancelled.
        never = loop.create_future()
        loop.call_later(0.05, table.mark_failed, a, "GET /health got no answer within 5 s", True)
        with pytest.raises(NodeFailed, match="no answer within 5 s"):
            await NodeReader(a, silence_limit=30).wait(never)
        assert never.cancelled()

        # Committed, node stalled: bytes that keep coming are relayed; silence_limit of silence ends the stream.
        reader = NodeReader(b, silence_limit=0.3)
        reader.is_committed = True
        table.mark_failed(b, "GET /health got no answer", stalled=True)
        assert await reader.wait(asyncio.sleep(0.1, result=b"data")) == b"data"
        reader.last_byte_at = loop.time()
        started = loop.time()
        with pytest.raises(NodeFailed):
            await reader.wait(loop.create_future())
        assert 0.25 < loop.time() - started < 2

        # A node that recovers (as a passing health check leaves it) is watched afresh: silence is then no failure.
        reader = NodeReader(c, silence_limit=0.1)
        reader.is_committed = True
        table.mark_failed(c, "GET /health got no answer", stalled=True)
        c.healthy, c.stalled = True, asyncio.Event()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.wait(loop.create_future()), 0.5)

    asyncio.run(main())
