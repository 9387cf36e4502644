"""Images through `lm serve api-server` with a tiny Qwen2.5-VL: the official openai client's `image_url` parts (data
URLs and http URLs from a loopback server, which a hidden test flag lets the server reach), usage counting the image
placeholders, and hostile media answered with an OpenAI-style 4xx naming the part while the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")
pytest.importorskip("lm_vl")

BIG = 25 * 1024 * 1024


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


class _Media(BaseHTTPRequestHandler):
    """/cat.png: an image; /big: 25 MiB; /slow: a body that never comes; /metadata: a redirect to 169.254.169.254."""

    image = b""

    def do_GET(self) -> None:
        if self.path == "/cat.png":
            self._send(200, self.image, "image/png")
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = b"\0" * (1024 * 1024)
            try:
                for _ in range(BIG // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            time.sleep(30)
        elif self.path == "/metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        else:
            self._send(404, b"no", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_url(tiny_vlms):
    _Media.image = png_bytes(tiny_vlms.random_image(3, (96, 80)))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory, tiny_vlms, server_process, light_flags):
    model = tiny_vlms.make_qwen2_5_vl(tmp_path_factory.mktemp("qwen2.5-vl"))
    server = server_process(
        model, *light_flags, "--model-name", "vlm", "--limit-mm-per-prompt", "3", "--media-max-bytes", str(20 << 20)
    )
    loopback = server_process(model, *light_flags, "--model-name", "vlm", "--test-allow-loopback-media")
    yield server, loopback
    server.stop()
    loopback.stop()


def client_of(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def ask(client, *parts, max_tokens: int = 8):
    return client.chat.completions.create(
        model="vlm",
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "Describe the image."}]}],
        max_tokens=max_tokens,
        temperature=0,
    )


def test_data_url_images_get_answers_and_count_their_placeholders(vlm_server, tiny_vlms):
    server, _ = vlm_server
    client = client_of(server)
    image = tiny_vlms.random_image(1, (120, 90))
    one = ask(client, {"type": "image_url", "image_url": {"url": data_url(image)}})
    two = ask(
        client,
        {"type": "image_url", "image_url": {"url": data_url(image), "detail": "low"}},
        {"type": "image_url", "image_url": {"url": data_url(tiny_vlms.random_image(2, (64, 200)))}},
    )
    text = client.chat.completions.create(
        model="vlm", messages=[{"role": "user", "content": "Describe the image."}], max_tokens=8, temperature=0
    )
    assert one.choices[0].message.content and two.choices[0].message.content
    # 120x90 pixels are a 4x4 grid of merged patches: 12 placeholders (the rest is the template and the text).
    assert one.usage.prompt_tokens >= text.usage.prompt_tokens + 12
    assert two.usage.prompt_tokens > one.usage.prompt_tokens
    again = ask(client, {"type": "image_url", "image_url": {"url": data_url(image)}})
    assert again.choices[0].message.content == one.choices[0].message.content


def test_an_http_url_image_equals_the_same_image_as_a_data_url(vlm_server, media_url):
    _, loopback = vlm_server
    client = client_of(loopback)
    by_url = ask(client, {"type": "image_url", "image_url": {"url": f"{media_url}/cat.png"}})
    by_data = ask(
        client,
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_Media.image).decode()}},
    )
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    assert by_url.usage.prompt_tokens == by_data.usage.prompt_tokens


def _status(client, url: str) -> tuple[int, dict]:
    try:
        ask(client, {"type": "image_url", "image_url": {"url": url}})
    except openai.APIStatusError as error:
        return error.status_code, error.body or {}
    return 200, {}


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("http://169.254.169.254/latest/meta-data/", 400, None),
        ("http://[::ffff:127.0.0.1]/cat.png", 400, None),
        ("http://2130706433/cat.png", 400, None),
        ("http://0.0.0.0/cat.png", 400, None),
        ("http://localhost./cat.png", 400, None),
        ("file:///etc/passwd", 400, None),
        ("/etc/passwd", 400, None),
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), 400, None),
        ("ftp://example.com/cat.png", 400, None),
    ],
)
def test_refused_sources_are_a_400_naming_the_part(vlm_server, url, status, code):
    server, _ = vlm_server
    got, body = _status(client_of(server), url)
    assert got == status, body
    assert "image_url" in (body.get("param") or ""), body
    assert body.get("message")


def test_fetch_failures_are_a_422_and_a_redirect_to_metadata_a_400(vlm_server, media_url):
    _, loopback = vlm_server
    client = client_of(loopback)
    assert _status(client, f"{media_url}/big")[0] == 422  # over the 20 MiB cap while streaming
    assert _status(client, f"{media_url}/slow")[0] == 422  # the read timeout
    assert _status(client, f"{media_url}/missing.png")[0] == 422  # upstream 404
    assert _status(client, f"{media_url}/metadata")[0] == 400  # the redirect's target is refused
    assert ask(client, {"type": "image_url", "image_url": {"url": f"{media_url}/cat.png"}}).choices[0].message.content


def test_too_many_images_and_a_pixel_bomb_are_refused_and_the_server_keeps_serving(vlm_server, tiny_vlms):
    server, _ = vlm_server
    client = client_of(server)
    image = {"type": "image_url", "image_url": {"url": data_url(tiny_vlms.random_image(4, (60, 60)))}}
    got, body = 0, {}
    try:
        ask(client, image, image, image, image)
    except openai.BadRequestError as error:
        got, body = error.status_code, error.body
    assert got == 400 and "3" in body["message"] and "image_url" in body["param"]
    # A PNG header claiming 50,000 x 50,000 pixels: refused from the header, before any decoding.
    header = base64.b64decode(data_url(tiny_vlms.random_image(5, (8, 8))).split(",")[1])
    bomb = bytearray(header)
    bomb[16:24] = (50_000).to_bytes(4, "big") + (50_000).to_bytes(4, "big")  # IHDR width, height
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # the IHDR chunk's CRC
    status, body = _status(client, "data:image/png;base64," + base64.b64encode(bytes(bomb)).decode())
    assert status == 400 and "pixel" in body["message"].lower()
    with httpx.Client(timeout=60) as http:
        health = http.get(f"{server.url}/health")
    assert health.status_code == 200
    assert ask(client, image).choices[0].message.content
