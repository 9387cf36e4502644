"""`lm_vl.media` loading what it should: every source kind, every allowed format, RGB out, the policy's shape.

The refusals (SSRF, local files, bombs, sizes, timeouts) are in test_media_security.py; video in test_media_video.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib
import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

import lm_vl
from lm_vl.media import (
    SUPPORTED_FORMATS,
    MediaError,
    MediaPolicy,
    aload_image,
    aload_images,
    decode_image,
    load_image,
    load_images,
)
from lm_vl.media.urls import host_allowed

h = importlib.import_module("tests.lm_vl.media_helpers")
RED = (200, 30, 60)


@pytest.mark.parametrize(
    ("image_format", "mode", "save_args"),
    [
        ("PNG", "RGB", {}),
        ("JPEG", "RGB", {"quality": 95}),
        ("WEBP", "RGB", {"lossless": True}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
    ],
)
def test_each_allowed_format_decodes_from_bytes_to_rgb(image_format, mode, save_args):
    image = load_image(h.encode_image(image_format, (32, 24), mode, **save_args))
    assert image.mode == "RGB" and image.size == (32, 24)
    if image_format != "GIF":  # a palette image keeps palette entry 3, whatever colour that is
        assert np.abs(np.asarray(image, dtype=int)[5, 5] - RED).max() <= 3


def test_transparent_pixels_become_white_not_black():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (10, 20, 30, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    rgb = load_image(buffer.getvalue())
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (10, 20, 30)
    assert rgb.getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_pil_images_of_any_mode_come_back_rgb(mode):
    assert load_image(Image.new(mode, (5, 3))).mode == "RGB"


def test_a_pil_image_is_copied_not_returned():
    original = Image.new("RGB", (4, 4), RED)
    loaded = load_image(original)
    assert loaded is not original and loaded.tobytes() == original.tobytes()


def test_bytearray_and_memoryview_sources():
    data = h.encode_image("PNG")
    assert load_image(bytearray(data)).size == load_image(memoryview(data)).size == (32, 24)


def test_data_url():
    payload = base64.b64encode(h.encode_image("PNG")).decode()
    assert load_image(f"data:image/png;base64,{payload}").size == (32, 24)
    # The declared subtype is not trusted: the bytes decide the format (still one of the allowed ones).
    assert load_image(f"data:image/jpeg;base64,{payload}").size == (32, 24)
    assert load_image(f"DATA:;base64,{payload}").size == (32, 24)


def test_loopback_url_with_the_test_switch(media_server):
    for path in ["/image.png", "/image.jpg", "/image.webp", "/image.gif"]:
        image = load_image(media_server.url(path), h.LOOPBACK_POLICY)
        assert image.mode == "RGB" and image.size == (32, 24)
    assert media_server.requests[-1][1] == f"127.0.0.1:{media_server.port}"


def test_redirects_up_to_the_limit_are_followed(media_server):
    image = load_image(media_server.url("/chain?n=3"), h.LOOPBACK_POLICY)
    assert image.size == (32, 24)


def test_local_file_below_the_allowed_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cat.png").write_bytes(h.encode_image("PNG"))
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))
    assert load_image(str(tmp_path / "sub" / "cat.png"), policy).size == (32, 24)
    assert load_image(tmp_path / "sub" / "cat.png", policy).size == (32, 24)  # a Path
    assert load_image("sub/cat.png", policy).size == (32, 24)  # relative to the allowed directory
    assert load_image(f"file://{tmp_path}/sub/cat.png", policy).size == (32, 24)
    assert load_image(f"file://localhost{tmp_path}/sub/%63at.png", policy).size == (32, 24)


def test_symlink_that_stays_inside_the_allowed_directory_is_followed(tmp_path):
    (tmp_path / "real.png").write_bytes(h.encode_image("PNG"))
    (tmp_path / "alias").symlink_to(tmp_path)
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path / "alias"))
    assert load_image(str(tmp_path / "alias" / "real.png"), policy).size == (32, 24)


def test_animated_gif_yields_its_first_frame():
    image = load_image(h.animated_gif(5))
    assert image.mode == "RGB" and image.size == (8, 8)


def test_load_images_and_async_forms(media_server):
    data = h.encode_image("PNG")
    assert [image.size for image in load_images([data, data])] == [(32, 24), (32, 24)]

    async def main():
        one = await aload_image(media_server.url("/image.png"), h.LOOPBACK_POLICY)
        many = await aload_images([data, media_server.url("/image.jpg")], h.LOOPBACK_POLICY)
        return one, many

    one, many = asyncio.run(main())
    assert one.size == (32, 24) and [image.size for image in many] == [(32, 24), (32, 24)]


def test_async_errors_are_media_errors(media_server):
    with pytest.raises(MediaError) as caught:
        asyncio.run(aload_image(media_server.url("/image.png")))  # default policy: loopback refused
    assert caught.value.status_code == 400 and caught.value.code == "blocked_address"


def test_decode_image_leaves_load_truncated_images_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    decode_image(h.encode_image("PNG"), MediaPolicy())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_default_policy_is_strict():
    policy = MediaPolicy()
    assert policy.allowed_schemes == {"http", "https", "data"}
    assert policy.allowed_formats == SUPPORTED_FORMATS == {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
    assert policy.allowed_local_media_path is None and policy.allowed_media_domains is None
    assert policy.allow_loopback_for_tests is False
    assert (policy.max_redirects, policy.max_bytes, policy.max_image_pixels) == (3, 20 * 1024 * 1024, 178_956_970)
    assert policy.limit_per_prompt == 8 and policy.total_timeout == 10.0


def test_policy_normalizes_its_fields():
    policy = MediaPolicy(
        allowed_schemes=["HTTPS"],
        allowed_formats={"png", "jpeg"},
        allowed_media_domains=["Images.Example.COM.", "*.cdn.example.org", "[2606:4700::1111]"],
    )
    assert policy.allowed_schemes == frozenset({"https"})
    assert policy.allowed_formats == frozenset({"PNG", "JPEG"})
    assert policy.allowed_media_domains == ("images.example.com", "*.cdn.example.org", "2606:4700::1111")
    assert hash(policy)  # frozen and hashable, so it can key a cache


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"allowed_schemes": ["ftp"]}, "allowed_schemes"),
        ({"allowed_schemes": ["file"]}, "allowed_schemes"),
        ({"allowed_schemes": "https"}, "allowed_schemes"),
        ({"allowed_formats": ["TIFF"]}, "allowed_formats"),
        ({"allowed_local_media_path": "relative/dir"}, "allowed_local_media_path"),
        ({"allowed_media_domains": "example.com"}, "allowed_media_domains"),
        ({"allowed_media_domains": ["exa*mple.com"]}, "allowed_media_domains"),
        ({"allowed_media_domains": ["*."]}, "allowed_media_domains"),
        ({"allowed_media_domains": ["user@example.com"]}, "allowed_media_domains"),
        ({"max_redirects": -1}, "max_redirects"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_image_pixels": 1.5}, "max_image_pixels"),
        ({"limit_per_prompt": True}, "limit_per_prompt"),
        ({"total_timeout": 0}, "total_timeout"),
        ({"read_timeout": float("inf")}, "read_timeout"),
        ({"allow_loopback_for_tests": 1}, "allow_loopback_for_tests"),
    ],
)
def test_policy_rejects_bad_fields_naming_them(changes, field):
    with pytest.raises(ValueError, match=field):
        MediaPolicy(**changes)


def test_policy_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MediaPolicy().max_bytes = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("images.example.com", True),
        ("a.cdn.example.org", True),
        ("a.b.cdn.example.org", True),
        ("cdn.example.org", False),  # a wildcard matches subdomains only
        ("evilcdn.example.org", False),
        ("example.com", False),
        ("images.example.com.evil.net", False),
    ],
)
def test_domain_allow_list_matching(host, allowed):
    assert host_allowed(host, ("images.example.com", "*.cdn.example.org")) is allowed


def test_media_error_maps_to_an_http_error_and_pickles():
    error = MediaError("nope", code="blocked_address")
    assert isinstance(error, ValueError) and str(error) == "nope"
    assert (error.status_code, error.param, error.code, error.message) == (400, "image_url", "blocked_address", "nope")
    copy = pickle.loads(pickle.dumps(MediaError("late", code="timeout", status_code=422, param="video_url")))
    assert (copy.message, copy.code, copy.status_code, copy.param) == ("late", "timeout", 422, "video_url")


def test_lm_vl_exports_the_loaders_lazily_and_imports_no_torch():
    assert lm_vl.load_image is load_image and lm_vl.MediaPolicy is MediaPolicy
    with pytest.raises(AttributeError):
        _ = lm_vl.no_such_name
    code = "import sys; sys.modules['torch'] = None; import lm_vl, lm_vl.media; lm_vl.load_image; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
