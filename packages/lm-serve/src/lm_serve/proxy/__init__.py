"""The proxy (`lm serve proxy`): routes OpenAI requests across api_servers by load, checks their health, relays
streams as they arrive. FastAPI and httpx load only when the proxy runs or registration is called.

    nodes.py         node table, health checks, routing strategies (least_load, round_robin)
    forward.py       relaying one request to a node and its answer back
    app.py           the FastAPI app and the registration routes (/nodes, /nodes/add, /nodes/remove)
    registration.py  register_with_proxy / unregister_from_proxy, for the api_server
    cli.py           the `proxy` click command
"""

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
    "ProxyRegistrationError",
    "aregister_with_proxy",
    "aunregister_from_proxy",
    "register_with_proxy",
    "unregister_from_proxy",
]
