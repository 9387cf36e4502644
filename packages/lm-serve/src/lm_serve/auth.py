"""API keys: with `--api-keys` (or `LM_API_KEYS`), every route but /health needs `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable

from lm_serve.errors import error_body

OPEN_PATHS = frozenset({"/health"})


def api_keys_from(keys: Iterable[str] | None) -> list[str]:
    """The keys given on the command line, else those in `LM_API_KEYS` (separated by spaces or commas)."""
    found = [k for key in (keys or ()) for k in key.replace(",", " ").split()]
    if not found:
        found = os.environ.get("LM_API_KEYS", "").replace(",", " ").split()
    return list(dict.fromkeys(found))


class APIKeyMiddleware:
    """A plain ASGI middleware (not BaseHTTPMiddleware, which would buffer streaming responses)."""

    def __init__(self, app, api_keys: Iterable[str]) -> None:
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]

    async def __call__(self, scope, receive, send) -> None:
        """Passes open paths and requests with a configured bearer key to the app; answers 401 otherwise."""
        if scope["type"] != "http" or not self.api_keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        problem = self._check(dict(scope.get("headers") or ()).get(b"authorization"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body(problem, "invalid_request_error", None, "invalid_api_key")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="lm-serve"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _check(self, header: bytes | None) -> str | None:
        if not header:
            return "Missing API key: send it as the header 'Authorization: Bearer <key>'."
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return "Malformed Authorization header: expected 'Authorization: Bearer <key>'."
        # Compare against every key (constant time each) so timing does not tell which prefix matched.
        matches = [hmac.compare_digest(token, key) for key in self.api_keys]
        return None if any(matches) else "Incorrect API key provided."
