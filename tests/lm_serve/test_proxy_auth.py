"""The proxy's keys: client keys checked before forwarding, an admin key for node management, none of it open.

Stub nodes (proxy_harness.py) count the requests they receive and echo the Authorization header they got, so a
request the proxy refused can be shown never to have reached a node.
"""

from __future__ import annotations

import importlib
import subprocess

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
# Loaded after the skips above: the harness imports httpx and runs uvicorn.
h = importlib.import_module("tests.lm_serve.proxy_harness")


stub_script, stubs, make_proxy = h.stub_script, h.stubs, h.make_proxy
T = h.DEADLINE_S


def started_on(node) -> int:
    return httpx.get(f"{node.url}/stub/stats", timeout=T).json()["started"]


def test_without_an_admin_key_node_management_is_refused_and_cli_nodes_still_serve(stubs, make_proxy):
    a, b = stubs["A"], stubs["B"]
    proxy = make_proxy(a.url, admin_key=None)
    assert "node management over HTTP (/nodes, /nodes/add, /nodes/remove) is disabled" in proxy.output
    for method, path, body in [
        ("POST", "/nodes/add", {"url": b.url}),
        ("POST", "/nodes/remove", {"url": a.url}),
        ("GET", "/nodes", None),
        ("GET", "/openapi.json", None),
        ("GET", "/nodes/add", None),  # a method the route lacks: refused too, never forwarded to a node
    ]:
        for headers in ({}, h.ADMIN, h.AUTH):
            refused = httpx.request(method, f"{proxy.url}{path}", json=body, headers=headers, timeout=T)
            assert refused.status_code == 403, (method, path, refused.text)
            error = refused.json()["error"]
            assert error["type"] == "permission_error" and "--admin-key" in error["message"], error
    # The interactive pages are not served, nor forwarded to a node (whose answer would not name the proxy).
    for path in ("/docs", "/redoc"):
        page = httpx.get(f"{proxy.url}{path}", timeout=T)
        assert page.status_code == 404 and "the proxy has no GET" in page.json()["error"]["message"]
    # Nothing changed: A (given on the command line) serves every request, B was never added.
    assert {h.served_by(proxy.url) for _ in range(3)} == {"A"}


def test_client_keys_are_checked_by_the_proxy_and_forwarded(stubs, make_proxy):
    a, b = stubs["A"], stubs["B"]
    other_key = "sk-only-the-proxy-knows"
    # Several keys after one flag, then a NODE_URL argument that must not be taken for a key; admin key from env.
    admin_env = {"LM_PROXY_ADMIN_KEY": h.ADMIN_KEY}
    proxy = make_proxy("--api-keys", h.API_KEY, other_key, a.url, admin_key=None, env=admin_env)
    url = f"{proxy.url}/v1/chat/completions"
    before = started_on(a)
    for headers, message in [
        ({}, "Missing API key"),
        ({"Authorization": "Bearer wrong"}, "Incorrect API key"),
        (h.ADMIN, "Incorrect API key"),  # the admin key is no client key
    ]:
        refused = httpx.post(url, json=h.chat_body(), headers=headers, timeout=T)
        assert refused.status_code == 401 and message in refused.json()["error"]["message"]
        assert httpx.get(f"{proxy.url}/v1/models", headers=headers, timeout=T).status_code == 401
    assert started_on(a) == before  # refused by the proxy itself: the node never saw them
    # A good key passes and reaches the node as sent.
    answer = httpx.post(url, json=h.chat_body(), headers=h.AUTH, timeout=T)
    assert answer.status_code == 200 and answer.json()["auth"] == f"Bearer {h.API_KEY}"
    assert h.nodes_of(proxy)[a.url]["mean_latency"] > 0  # completed answers are timed (for least_latency)
    # A key the proxy accepts but the node does not: the node's own refusal comes back.
    theirs = httpx.post(url, json=h.chat_body(), headers={"Authorization": f"Bearer {other_key}"}, timeout=T)
    assert theirs.status_code == 401 and theirs.json()["error"]["message"] == "stub A: bad api key"
    assert httpx.get(f"{proxy.url}/health", timeout=T).status_code == 200  # open, for load balancers

    # Node management takes the admin key only.
    for headers in ({}, h.AUTH):
        assert httpx.get(f"{proxy.url}/nodes", headers=headers, timeout=T).status_code == 401
        added = httpx.post(f"{proxy.url}/nodes/add", json={"url": b.url}, headers=headers, timeout=T)
        assert added.status_code == 401
    assert list(h.nodes_of(proxy)) == [a.url]
    added = httpx.post(f"{proxy.url}/nodes/add", json={"url": b.url}, headers=h.ADMIN, timeout=T)
    assert added.status_code == 200 and added.json()["healthy"] is True
    assert {h.served_by(proxy.url, model="B-only") for _ in range(2)} == {"B"}
    removed = httpx.post(f"{proxy.url}/nodes/remove", json={"url": b.url}, headers=h.ADMIN, timeout=T)
    assert removed.status_code == 200 and list(h.nodes_of(proxy)) == [a.url]
    schema = httpx.get(f"{proxy.url}/openapi.json", headers=h.ADMIN, timeout=T)
    assert schema.status_code == 200 and "/nodes/add" in schema.json()["paths"]
    assert httpx.get(f"{proxy.url}/openapi.json", headers=h.AUTH, timeout=T).status_code == 401
    assert httpx.get(f"{proxy.url}/docs", timeout=T).status_code == 401


def test_registration_sends_the_admin_key(stubs, make_proxy):
    from lm_serve.proxy import ProxyRegistrationError, register_with_proxy, unregister_from_proxy

    proxy = make_proxy()
    with pytest.raises(ProxyRegistrationError, match=r"refused the registration \(401\)"):
        register_with_proxy(proxy.url, stubs["B"].url)
    with pytest.raises(ProxyRegistrationError, match=r"refused the registration \(401\)"):
        register_with_proxy(proxy.url, stubs["B"].url, admin_key="wrong")
    assert register_with_proxy(proxy.url, stubs["B"].url, admin_key=h.ADMIN_KEY)["healthy"] is True
    assert unregister_from_proxy(proxy.url, stubs["B"].url) is False
    assert unregister_from_proxy(proxy.url, stubs["B"].url, admin_key=h.ADMIN_KEY) is True


def test_lmdeploy_strategy_names(stubs, make_proxy):
    proxy = make_proxy(stubs["A"].url, "--strategy", "min_expected_latency")
    listing = httpx.get(f"{proxy.url}/nodes", headers=h.ADMIN, timeout=T).json()
    assert listing["routing_strategy"] == "least_load"
    unknown = subprocess.run([*h.proxy_command(), "--strategy", "fastest"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "expected one of" in unknown.stderr and "min_expected_latency" in unknown.stderr
    shown = " ".join(subprocess.run([*h.proxy_command(), "--help"], capture_output=True, text=True).stdout.split())
    assert "min_expected_latency means least_load" in shown and "min_observed_latency means least_latency" in shown
