"""Shared by the media tests, which import it as `tests.lm_vl.media_helpers` (under `--import-mode=importlib` pytest
registers `tests` and `tests.lm_vl` as packages of the rootdir): test images, the loopback server, a fake resolver.

The server listens on 127.0.0.1 only; the loader reaches it solely through `MediaPolicy(allow_loopback_for_tests=True)`
(`LOOPBACK_POLICY`). `FakeDNS` replaces `socket.getaddrinfo` and records every name it is asked for; IP literals pass
through to the real resolver (which only parses them).
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import socket
import ssl
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from lm_vl.media import MediaPolicy

MiB = 1024 * 1024
# Short timeouts keep the slow-server tests fast; loopback answers in microseconds.
LOOPBACK_POLICY = MediaPolicy(
    allow_loopback_for_tests=True, connect_timeout=1.0, read_timeout=1.0, total_timeout=3.0, video_total_timeout=3.0
)


def encode_image(image_format: str, size: tuple[int, int] = (32, 24), mode: str = "RGB", **save_args) -> bytes:
    """A solid-colour test image encoded in `image_format`."""
    colour = {"RGB": (200, 30, 60), "RGBA": (200, 30, 60, 255), "L": 128, "P": 3}[mode]
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=image_format, **save_args)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG made of a signature, an IHDR claiming `width` x `height` RGB pixels, and IEND: no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def webp_canvas_header(width: int, height: int) -> bytes:
    """An animated extended WebP (RIFF, VP8X with the animation flag, ANIM) declaring a canvas and holding no frames."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return kind + struct.pack("<I", len(body)) + body

    vp8x = bytes([0x02, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + chunk(b"VP8X", vp8x) + chunk(b"ANIM", bytes(6))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def animated_gif(num_frames: int) -> bytes:
    """A small GIF with `num_frames` frames of different colours."""
    frames = [Image.new("RGB", (8, 8), (index * 40 % 256, 255 - index * 40 % 256, 0)) for index in range(num_frames)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    return buffer.getvalue()


@dataclass
class MediaServer:
    """The loopback server: `url(path)`, the requests it saw (`requests`: (path, Host header)), extra `routes`."""

    port: int
    routes: dict[str, Callable[[BaseHTTPRequestHandler], None]]
    requests: list[tuple[str, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """An http URL of `path` on this server, under `host` (which a test's fake DNS must map to 127.0.0.1)."""
        return f"http://{host}:{self.port}{path}"


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    handler.send_response(status)
    headers.setdefault("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    if body:
        handler.wfile.write(body)


def _stream(handler: BaseHTTPRequestHandler, server: MediaServer, total: int, declare: bool) -> None:
    """Send `total` zero bytes, with a Content-Length or chunked; stop quietly when the client hangs up."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    if declare:
        handler.send_header("Content-Length", str(total))
    else:
        handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    block = b"\0" * (256 * 1024)
    sent = 0
    try:
        while sent < total and not server.stopping.is_set():
            piece = block[: total - sent]
            handler.wfile.write(piece if declare else b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        if not declare:
            handler.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass


def _default_routes(server: MediaServer) -> dict[str, Callable[[BaseHTTPRequestHandler], None]]:
    images = {
        "/image.png": ("image/png", encode_image("PNG")),
        "/image.jpg": ("image/jpeg", encode_image("JPEG")),
        "/image.webp": ("image/webp", encode_image("WEBP")),
        "/image.gif": ("image/gif", encode_image("GIF", mode="P")),
        "/bomb.png": ("image/png", png_header(50_000, 50_000)),
        "/text": ("image/png", b"this is text pretending to be an image\n" * 4),
    }
    routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
    for path, (content_type, body) in images.items():
        routes[path] = lambda h, body=body, content_type=content_type: send(h, 200, body, Content_Type=content_type)

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        target = parse_qs(urlsplit(handler.path).query)["to"][0]
        send(handler, 302, Location=target)

    def chain(handler: BaseHTTPRequestHandler) -> None:
        remaining = int(parse_qs(urlsplit(handler.path).query)["n"][0])
        # `/chain?n=N` is N redirects in a row, then the PNG.
        send(handler, 302, Location="/image.png" if remaining <= 1 else f"/chain?n={remaining - 1}")

    def slow(handler: BaseHTTPRequestHandler) -> None:
        # Headers at once, then one byte every 0.1 s: each read succeeds, only the total deadline can stop it.
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        try:
            for _ in range(100):
                if server.stopping.wait(0.1):
                    return
                handler.wfile.write(b"\0")
                handler.wfile.flush()
        except OSError:
            pass

    def stall(handler: BaseHTTPRequestHandler) -> None:
        server.stopping.wait(10)  # never answers within a test's read timeout

    def gzipped(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 200, gzip.compress(encode_image("PNG")), Content_Type="image/png", Content_Encoding="gzip")

    routes.update(
        {
            "/redirect": redirect,
            "/chain": chain,
            "/huge-declared": lambda h: _stream(h, server, 25 * MiB, declare=True),
            "/huge-chunked": lambda h: _stream(h, server, 25 * MiB, declare=False),
            "/slow": slow,
            "/stall": stall,
            "/gzip": gzipped,
            "/missing": lambda h: send(h, 404, b"not found"),
            "/no-location": lambda h: send(h, 302),
        }
    )
    return routes


class FakeDNS:
    """Stands in for `socket.getaddrinfo`: names answer from `answers`, IP literals go to the real function.

    `add(name, first, then...)`: the first lookup of `name` gets `first`, later ones the next lists (the last one
    repeats). `lookups` lists every name asked for, in order.
    """

    def __init__(self, real: Callable[..., list]) -> None:
        self._real = real
        self._answers: dict[str, list[list[str]]] = {}
        self.lookups: list[str] = []

    def add(self, name: str, *answers: list[str]) -> None:
        self._answers[name] = list(answers)

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        text = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(text.split("%")[0])
            return self._real(host, port, family, type, proto, flags)
        except ValueError:
            pass
        self.lookups.append(text)
        queue = self._answers.get(text)
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        results = []
        for address in addresses:
            if ipaddress.ip_address(address).version == 6:
                results.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port or 0, 0, 0)))
            else:
                results.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0)))
        return results


def start_media_server(ssl_context: ssl.SSLContext | None = None) -> tuple[MediaServer, Callable[[], None]]:
    """A threaded HTTP server on 127.0.0.1 serving test images and hostile responses, and the function that stops it.

    With `ssl_context` (a server context) it speaks HTTPS instead.
    """
    state = MediaServer(port=0, routes={})

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Host", "")))
            route = state.routes.get(urlsplit(self.path).path)
            if route is None:
                send(self, 404)
            else:
                route(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            pass  # clients hanging up mid-response is what several tests do on purpose

    httpd = Server(("127.0.0.1", 0), Handler)
    if ssl_context is not None:
        httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True)
    state.port = httpd.server_address[1]
    state.routes.update(_default_routes(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop() -> None:
        state.stopping.set()
        httpd.shutdown()
        httpd.server_close()

    return state, stop
