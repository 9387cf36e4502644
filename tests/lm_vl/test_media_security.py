"""Hostile media input gets a clear 4xx `MediaError` (status, reason code, message), all offline.

SSRF: internal addresses by literal, legacy numeric form, DNS (mocked) or redirect; DNS rebinding, shown impossible by
pinning the dialed address. Parser confusion: userinfo and backslashes. Local files: `file:` URLs and paths outside
the allowed directory, symlinks out of it. Resources: 25 MiB bodies, slow and silent servers, a PNG header claiming
50,000 x 50,000 pixels, non-image bytes, too many images. The loopback media server is reachable only with
`allow_loopback_for_tests`; the tests without it show the default policy refusing it.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import io
import os
import time

import pytest
from PIL import Image, ImageFile

from lm_vl.media import MediaError, MediaPolicy, load_image, load_images

h = importlib.import_module("tests.lm_vl.media_helpers")
PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


def refusal(source, policy=None, *, status=400, code=None, match=None) -> MediaError:
    """Load `source`, expecting a MediaError with `status` (and `code`, and `match` in its message)."""
    with pytest.raises(MediaError) as caught:
        load_image(source, policy)
    error = caught.value
    assert error.status_code == status, error
    assert error.param == "image_url"
    if code is not None:
        assert error.code == code, error
    if match is not None:
        assert match in error.message, error
    return error


# --- addresses ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1/a.png", "loopback"),
        ("http://[::1]/a.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/a.png", "127.0.0.1"),  # IPv4-mapped IPv6 is unwrapped
        ("http://[::ffff:7f00:1]/a.png", "127.0.0.1"),
        ("http://2130706433/a.png", "resolves to 127.0.0.1"),  # decimal
        ("http://0x7f000001/a.png", "resolves to 127.0.0.1"),  # hex
        ("http://0x7f.1/a.png", "resolves to 127.0.0.1"),
        ("http://127.1/a.png", "resolves to 127.0.0.1"),
        ("http://0.0.0.0/a.png", "unspecified"),
        ("http://0/a.png", "unspecified"),
        ("http://[::]/a.png", "unspecified"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/a.png", "link-local"),
        ("http://10.0.0.1/a.png", "private"),
        ("http://172.16.5.4/a.png", "private"),
        ("http://192.168.1.1/a.png", "private"),
        ("http://100.64.0.1/a.png", "carrier-grade NAT"),
        ("http://[fd00::1]/a.png", "unique local"),
        ("http://[2002:7f00:1::]/a.png", "6to4"),
        ("http://[64:ff9b::7f00:1]/a.png", "NAT64"),
        ("http://[::127.0.0.1]/a.png", "IPv4-compatible"),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/a.png", "Teredo"),
        ("http://224.0.0.1/a.png", "multicast"),
        ("http://240.0.0.1/a.png", "reserved"),
        ("http://255.255.255.255/a.png", "reserved"),
        ("http://198.18.0.1/a.png", "benchmarking"),
    ],
)
def test_non_public_address_literals_are_refused_without_dns(url, shown, fake_dns):
    error = refusal(url, code="blocked_address", match="not a public address")
    assert shown in error.message
    assert fake_dns.lookups == []


@pytest.mark.parametrize("host", ["localhost", "localhost.", "LOCALHOST", "img.localhost", "img.localhost."])
def test_localhost_names_are_refused_before_dns(host, fake_dns):
    fake_dns.add(host.lower().rstrip("."), [PUBLIC_V4])  # even a resolver claiming a public address is not asked
    refusal(f"http://{host}/a.png", code="blocked_address", match="loopback")
    assert fake_dns.lookups == []


@pytest.mark.parametrize(
    "url", ["http://0.0.0.0:{port}/image.png", "http://[::]:{port}/image.png", "http://[fe80::1%25lo]:{port}/a.png"]
)
def test_the_test_switch_admits_loopback_only(url, media_server):
    # 0.0.0.0 and :: reach this machine on Linux, but they are not loopback addresses: still refused.
    refusal(url.format(port=media_server.port), h.LOOPBACK_POLICY, code="blocked_address")


def test_the_test_switch_keeps_private_ranges_refused(fake_dns):
    fake_dns.add("internal.test", ["10.1.2.3"])
    refusal("http://internal.test/a.png", h.LOOPBACK_POLICY, code="blocked_address", match="10.1.2.3")


def test_public_name_resolving_to_loopback_is_refused(media_server, fake_dns):
    fake_dns.add("images.example.com", ["127.0.0.1"])
    before = len(media_server.requests)
    error = refusal(media_server.url("/image.png", host="images.example.com"), code="blocked_address")
    assert "resolves to 127.0.0.1" in error.message and "loopback" in error.message
    assert len(media_server.requests) == before  # refused before connecting


@pytest.mark.parametrize(
    "answers",
    [
        [PUBLIC_V4, "127.0.0.1"],
        ["127.0.0.1", PUBLIC_V4],
        [PUBLIC_V4, "169.254.169.254"],
        [PUBLIC_V6, "::1"],
        [PUBLIC_V6, "fd12:3456::1"],
        [PUBLIC_V4, "::ffff:10.0.0.1"],
    ],
)
def test_mixed_public_and_private_dns_answers_are_refused(answers, fake_dns):
    fake_dns.add("mixed.example.com", answers)
    error = refusal("http://mixed.example.com/a.png", code="blocked_address")
    assert "not a public address" in error.message
    assert fake_dns.lookups == ["mixed.example.com"]


def test_unresolvable_host_is_a_fetch_failure(fake_dns):
    refusal("http://nowhere.example.com/a.png", status=422, code="dns_failure", match="could not resolve")


def test_the_validated_address_is_the_one_dialed(media_server, fake_dns):
    # First answer: loopback (admitted by the switch). Any later lookup would get an address nothing listens on; a
    # client that resolved again (DNS rebinding) would time out there instead of reaching the server.
    fake_dns.add("media.test", ["127.0.0.1"], ["10.255.255.1"])
    before = len(media_server.requests)
    image = load_image(media_server.url("/image.png", host="media.test"), h.LOOPBACK_POLICY)
    assert image.size == (32, 24)
    assert fake_dns.lookups == ["media.test"]  # resolved once, by the validator
    # The host name still travels in the Host header.
    assert media_server.requests[before:] == [("/image.png", f"media.test:{media_server.port}")]


def test_each_redirect_hop_is_resolved_and_pinned_again(media_server, fake_dns):
    fake_dns.add("first.test", ["127.0.0.1"])
    fake_dns.add("second.test", ["127.0.0.1"], ["10.255.255.1"])
    target = media_server.url("/image.png", host="second.test")
    assert load_image(media_server.url(f"/redirect?to={target}", host="first.test"), h.LOOPBACK_POLICY)
    assert fake_dns.lookups == ["first.test", "second.test"]


# --- redirects ------------------------------------------------------------------------------------------------------


def test_redirect_to_cloud_metadata_is_refused(media_server):
    before = len(media_server.requests)
    url = media_server.url("/redirect?to=http://169.254.169.254/latest/meta-data/iam/")
    error = refusal(url, h.LOOPBACK_POLICY, code="blocked_address")
    assert "169.254.169.254" in error.message and "link-local" in error.message
    assert len(media_server.requests) == before + 1  # the redirect was received; nothing was dialed after it


@pytest.mark.parametrize(
    ("location", "code"),
    [
        ("http://[::ffff:169.254.169.254]/", "blocked_address"),
        ("http://2852039166/", "blocked_address"),  # 169.254.169.254 as one decimal number
        ("http://0.0.0.0/", "blocked_address"),
        ("http://10.0.0.1/", "blocked_address"),
        ("file:///etc/passwd", "scheme_not_allowed"),
        ("data:image/png;base64,AAAA", "scheme_not_allowed"),
        ("gopher://127.0.0.1:6379/_INFO", "scheme_not_allowed"),
        ("http://user@127.0.0.1/", "invalid_url"),
    ],
)
def test_redirect_targets_are_validated_like_the_first_url(media_server, location, code):
    refusal(media_server.url(f"/redirect?to={location}"), h.LOOPBACK_POLICY, code=code)


def test_redirect_to_a_host_outside_the_allow_list_is_refused_before_dns(media_server, fake_dns):
    policy = dataclasses.replace(h.LOOPBACK_POLICY, allowed_media_domains=["127.0.0.1"])
    assert load_image(media_server.url("/image.png"), policy).size == (32, 24)
    fake_dns.add("evil.example.net", [PUBLIC_V4])
    url = media_server.url("/redirect?to=http://evil.example.net/a.png")
    refusal(url, policy, code="domain_not_allowed", match="evil.example.net")
    assert fake_dns.lookups == []


def test_first_url_outside_the_allow_list_is_refused(fake_dns):
    policy = MediaPolicy(allowed_media_domains=["images.example.com", "*.cdn.example.org"])
    refusal("https://example.org/a.png", policy, code="domain_not_allowed")
    refusal("https://cdn.example.org/a.png", policy, code="domain_not_allowed")
    refusal("https://a.png", MediaPolicy(allowed_media_domains=[]), code="domain_not_allowed")  # empty: none allowed
    assert fake_dns.lookups == []


def test_more_than_three_redirects_fail(media_server):
    refusal(media_server.url("/chain?n=4"), h.LOOPBACK_POLICY, status=422, code="too_many_redirects")


def test_redirects_can_be_switched_off(media_server):
    policy = dataclasses.replace(h.LOOPBACK_POLICY, allow_redirects=False)
    refusal(media_server.url("/chain?n=1"), policy, status=422, code="redirect", match="disabled")


def test_redirect_without_location_fails(media_server):
    refusal(media_server.url("/no-location"), h.LOOPBACK_POLICY, status=422, code="redirect")


# --- URL parsing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "code", "match"),
    [
        ("http://user@127.0.0.1/a.png", "invalid_url", "userinfo"),
        ("http://user:pass@example.com/a.png", "invalid_url", "userinfo"),
        ("http://@example.com/a.png", "invalid_url", "userinfo"),
        ("http://example.com%2F@127.0.0.1/a.png", "invalid_url", "userinfo"),
        ("https://example.com\\@169.254.169.254/", "invalid_url", "backslash"),
        ("https://example.com\\.evil.net/a.png", "invalid_url", "backslash"),
        ("http://127.0.0.1\\/a.png", "invalid_url", "backslash"),
        ("http://exam\tple.com/a.png", "invalid_url", "character"),
        ("http://example.com/a b.png", "invalid_url", "character"),
        ("http://example.com\n.evil/a.png", "invalid_url", "character"),
        ("http:///a.png", "invalid_url", None),
        ("ftp://example.com/a.png", "scheme_not_allowed", None),
        ("gopher://127.0.0.1:70/", "scheme_not_allowed", None),
        ("javascript:alert(1)", "scheme_not_allowed", None),
        ("http:/example.com/a.png", "scheme_not_allowed", None),
    ],
)
def test_userinfo_backslash_and_odd_urls_are_refused(url, code, match, fake_dns):
    refusal(url, code=code, match=match)
    assert fake_dns.lookups == []


def test_schemes_can_be_narrowed():
    policy = MediaPolicy(allowed_schemes=["https"])
    refusal("http://example.com/a.png", policy, code="scheme_not_allowed", match="'http'")
    data_url = "data:image/png;base64," + base64.b64encode(h.encode_image("PNG")).decode()
    refusal(data_url, policy, code="scheme_not_allowed", match="data URLs")


# --- local files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file:///etc/passwd", "/etc/passwd", "etc/passwd", "file://localhost/etc/passwd"])
def test_local_files_are_refused_by_default(source):
    refusal(source, code="local_file_not_allowed", match="allowed_local_media_path")


def test_file_outside_the_allowed_directory_is_refused(tmp_path):
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))
    for source in ["file:///etc/passwd", "/etc/passwd", "../../../../etc/passwd", f"{tmp_path}/../outside.png"]:
        refusal(source, policy, code="path_not_allowed", match="outside the allowed media directory")


def test_symlink_out_of_the_allowed_directory_is_refused(tmp_path):
    (tmp_path / "passwd.png").symlink_to("/etc/passwd")
    (tmp_path / "etc").symlink_to("/etc")
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))
    for source in [str(tmp_path / "passwd.png"), f"file://{tmp_path}/passwd.png", "etc/passwd", "passwd.png"]:
        error = refusal(source, policy, code="path_not_allowed")
        assert "/etc/passwd" not in error.message.replace(source, "")  # the link's target is never revealed


def test_remote_host_in_a_file_url_is_refused(tmp_path):
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))
    refusal("file://fileserver/share/a.png", policy, code="invalid_url")


def test_directories_fifos_and_missing_files_are_refused(tmp_path):
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))
    os.mkfifo(tmp_path / "fifo")  # opening it blocking would wait for a writer forever
    (tmp_path / "dir").mkdir()
    refusal(str(tmp_path / "fifo"), policy, code="file_unreadable", match="not a regular file")
    refusal(str(tmp_path / "dir"), policy, code="file_unreadable")
    refusal(str(tmp_path / "missing.png"), policy, code="file_not_found")
    refusal(str(tmp_path), policy, code="file_unreadable")


def test_local_file_over_the_byte_cap_is_refused(tmp_path):
    (tmp_path / "big.png").write_bytes(h.encode_image("PNG") + b"\0" * 2048)
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path), max_bytes=1024)
    refusal("big.png", policy, code="too_large")


# --- sizes and time -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/huge-declared", "/huge-chunked"])
def test_25_mib_body_is_refused(media_server, path):
    start = time.monotonic()
    error = refusal(media_server.url(path), h.LOOPBACK_POLICY, status=422, code="too_large")
    assert str(20 * 1024 * 1024) in error.message
    assert time.monotonic() - start < 5


def test_declared_length_over_the_cap_is_refused_before_the_body(media_server):
    error = refusal(media_server.url("/huge-declared"), h.LOOPBACK_POLICY, status=422, code="too_large")
    assert "declared" in error.message


def test_slow_server_fails_at_the_total_timeout(media_server):
    policy = dataclasses.replace(h.LOOPBACK_POLICY, read_timeout=1.0, total_timeout=0.8)
    start = time.monotonic()
    refusal(media_server.url("/slow"), policy, status=422, code="timeout", match="timed out")
    assert time.monotonic() - start < 2.0


def test_silent_server_fails_at_the_read_timeout(media_server):
    policy = dataclasses.replace(h.LOOPBACK_POLICY, read_timeout=0.3, total_timeout=5.0)
    start = time.monotonic()
    refusal(media_server.url("/stall"), policy, status=422, code="timeout")
    assert time.monotonic() - start < 2.0


def test_compressed_bodies_are_not_inflated(media_server):
    refusal(media_server.url("/gzip"), h.LOOPBACK_POLICY, status=422, code="encoding")


def test_upstream_error_status_is_a_fetch_failure(media_server):
    refusal(media_server.url("/missing"), h.LOOPBACK_POLICY, status=422, code="upstream_status", match="404")


def test_closed_port_is_a_fetch_failure():
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refusal(f"http://127.0.0.1:{port}/a.png", h.LOOPBACK_POLICY, status=422, code="fetch_failed")


def test_bytes_over_the_cap_are_refused():
    refusal(b"\0" * 2048, MediaPolicy(max_bytes=1024), code="too_large")


# --- decoding -------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Make any pixel decoding fail loudly, to show a refusal came from the header alone."""

    def load(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_png_header_claiming_50000_squared_pixels_is_refused_before_decoding(media_server, no_pixel_decoding):
    header = h.png_header(50_000, 50_000)  # 57 bytes, no pixel data
    for source in [header, media_server.url("/bomb.png")]:
        error = refusal(source, h.LOOPBACK_POLICY, code="too_many_pixels")
        assert "2500000000 pixels" in error.message


def test_pixel_cap_below_pil_default_is_checked_from_the_header(no_pixel_decoding):
    policy = MediaPolicy(max_image_pixels=100 * 100)
    error = refusal(h.png_header(101, 100), policy, code="too_many_pixels")
    assert "101x100 = 10100 pixels" in error.message and "10000" in error.message


def test_animated_webp_canvas_is_checked_before_pil_opens_it(monkeypatch):
    def open_image(*args, **kwargs):
        raise AssertionError("PIL was given the data")

    monkeypatch.setattr(Image, "open", open_image)
    error = refusal(
        h.webp_canvas_header(16_383, 16_383), MediaPolicy(max_image_pixels=10_000_000), code="too_many_pixels"
    )
    assert "16383x16383" in error.message


def test_pil_image_sources_are_held_to_the_pixel_cap():
    refusal(Image.new("RGB", (20, 20)), MediaPolicy(max_image_pixels=399), code="too_many_pixels")


@pytest.mark.parametrize(
    "data",
    [
        b"this is text pretending to be an image",
        b"",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"%PDF-1.4\n",
    ],
)
def test_non_image_bytes_are_refused(data):
    refusal(data, code="unsupported_format", match="not an image in an allowed format")


def test_non_image_body_from_a_url_is_refused(media_server):
    refusal(media_server.url("/text"), h.LOOPBACK_POLICY, code="unsupported_format")


@pytest.mark.parametrize("image_format", ["TIFF", "ICO", "PPM", "TGA"])
def test_formats_outside_the_fixed_set_are_refused(image_format):
    refusal(h.encode_image(image_format, (16, 16)), code="unsupported_format")


def test_allowed_formats_can_be_narrowed():
    refusal(h.encode_image("JPEG"), MediaPolicy(allowed_formats=["PNG"]), code="unsupported_format")


def test_truncated_image_is_refused_not_padded():
    data = h.encode_image("PNG", (256, 256))
    noisy = Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3))  # incompressible, so the cut hits pixels
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    data = buffer.getvalue()
    refusal(data[: len(data) // 2], code="corrupt_image", match="truncated or corrupt")


def test_too_many_frames_are_refused():
    refusal(h.animated_gif(6), MediaPolicy(max_image_frames=5), code="too_many_frames", match="6 frames")


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png,notbase64", "invalid_data_url"),
        ("data:image/png;base64,@@@@", "invalid_data_url"),
        ("data:text/html;base64,PGgxPg==", "invalid_data_url"),
        ("data:image/png;base64", "invalid_data_url"),
        ("data:image/png;base64,aGVsbG8=", "unsupported_format"),
    ],
)
def test_bad_data_urls_are_refused(url, code):
    refusal(url, code=code)


def test_data_url_over_the_cap_is_refused_before_decoding():
    policy = MediaPolicy(max_bytes=1000)
    refusal("data:image/png;base64," + "A" * 2000, policy, code="too_large")
    exactly = base64.b64encode(b"\0" * 1001).decode()  # within the encoded slack, over once decoded
    refusal("data:image/png;base64," + exactly, policy, code="too_large")


# --- counts ---------------------------------------------------------------------------------------------------------


def test_too_many_images_are_refused_before_any_fetch(media_server):
    before = len(media_server.requests)
    with pytest.raises(MediaError) as caught:
        load_images([media_server.url("/image.png")] * 9, h.LOOPBACK_POLICY)
    error = caught.value
    assert (error.status_code, error.code) == (400, "too_many_items")
    assert "9 given, at most 8" in error.message
    assert len(media_server.requests) == before
    assert len(load_images([h.encode_image("PNG")] * 8)) == 8


def test_error_messages_never_echo_fetched_bytes(media_server):
    error = refusal(media_server.url("/text"), h.LOOPBACK_POLICY)
    assert "pretending" not in error.message
