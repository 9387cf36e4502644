"""`GET /docs`: the API reference as one self-contained HTML page rendered from the OpenAPI schema.

Swagger UI and ReDoc load their scripts from a CDN and show a blank page on a machine without internet access; this
page has no script and loads nothing, so it works wherever the server does. The schema itself is at /openapi.json.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.op { border: 1px solid #ddd; border-radius: 6px; margin: 1em 0; padding: .6em 1em; }
.method { font-weight: bold; font-family: monospace; padding: .1em .5em; border-radius: 4px; background: #e8eef8; }
.path { font-family: monospace; font-size: 1.1em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
details summary { cursor: pointer; }
"""

_METHODS = ("get", "head", "post", "put", "patch", "delete", "options")


def _schema_link(schema: dict[str, Any] | None) -> str:
    if not schema:
        return ""
    ref = schema.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[-1]
        return f'<a href="#schema-{escape(name)}">{escape(name)}</a>'
    return f"<code>{escape(json.dumps(schema))}</code>"


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    parts = [
        f'<div class="op"><span class="method">{method.upper()}</span> <span class="path">{escape(path)}</span>',
        f"<p>{escape(op.get('summary', ''))}</p>",
    ]
    if op.get("description"):
        parts.append(f"<p>{escape(op['description'])}</p>")
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body:
        parts.append(f"<p>Request body: {_schema_link(body)}</p>")
    params = op.get("parameters") or []
    if params:
        names = ", ".join(f"<code>{escape(p.get('name', ''))}</code> ({escape(p.get('in', ''))})" for p in params)
        parts.append(f"<p>Parameters: {names}</p>")
    codes = ", ".join(escape(str(code)) for code in op.get("responses", {}))
    if codes:
        parts.append(f"<p>Responses: {codes}</p>")
    parts.append("</div>")
    return "\n".join(parts)


def render_docs(spec: dict[str, Any]) -> str:
    """The HTML page for an OpenAPI `spec` (routes with their request schemas, then every schema as JSON)."""
    info = spec.get("info", {})
    title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    out = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head><body>',
        f"<h1>{title}</h1>",
        f"<p>{escape(info.get('description', ''))}</p>",
        '<p>Machine-readable schema: <a href="openapi.json">openapi.json</a>.</p>',
        "<h2>Routes</h2>",
    ]
    for path, item in spec.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                out.append(_operation(path, method, item[method]))
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        out.append("<h2>Schemas</h2>")
        for name, schema in schemas.items():
            text = escape(json.dumps(schema, indent=2, ensure_ascii=False))
            out.append(
                f'<details id="schema-{escape(name)}"><summary><code>{escape(name)}</code></summary>'
                f"<pre>{text}</pre></details>"
            )
    out.append("</body></html>")
    return "\n".join(out)
