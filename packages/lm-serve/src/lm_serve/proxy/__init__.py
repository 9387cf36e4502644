"""The proxy (`lm serve proxy`): routes OpenAI requests across api_servers by load, checks their health, relays
streams as they arrive, fails over from nodes that stop answering. FastAPI and httpx load only when the proxy runs or
registration is called.

    nodes.py         node table, health checks, stalls, routing strategies (least_load, round_robin, random)
    forward.py       relaying one request to a node and its answer back, failing over until the first byte
    app.py           the FastAPI app, its keys (clients', admin's) and the registration routes (/nodes, ...)
    registration.py  register_with_proxy / unregister_from_proxy: the /nodes calls
    membership.py    the api_server's side of `--proxy-url`: the URL it advertises, join with retries, leave
    cli.py           the `proxy` click command
"""

from lm_serve.proxy.membership import ProxyMembership, RetryPolicy, advertised_url
from lm_serve.proxy.nodes import ROUTING_STRATEGIES, ProxyConfig
from lm_serve.proxy.registration import (
    ProxyRegistrationError,
    aregister_with_proxy,
    aunregister_from_proxy,
    register_with_proxy,
    unregister_from_proxy,
)

__all__ = [
    "ROUTING_STRATEGIES",
    "ProxyConfig",
    "ProxyMembership",
    "ProxyRegistrationError",
    "RetryPolicy",
    "advertised_url",
    "aregister_with_proxy",
    "aunregister_from_proxy",
    "register_with_proxy",
    "unregister_from_proxy",
]
