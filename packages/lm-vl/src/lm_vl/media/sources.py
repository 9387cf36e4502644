"""Turning a media reference from a request (URL, data URL, `file:` URL or path) into bytes under a `MediaPolicy`."""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import urllib.parse
from typing import Literal

from lm_vl.media.errors import refused
from lm_vl.media.fetch import fetch_url
from lm_vl.media.policy import MediaPolicy

MediaKind = Literal["image", "video"]
# A URL scheme of two or more characters; a one-letter prefix (`C:`) is a Windows drive, i.e. a path.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")


def source_bytes(source: object, policy: MediaPolicy, kind: MediaKind = "image") -> bytes:
    """The bytes of a request's media `source`: raw bytes as they are (held to `kind`'s byte cap), a URL or path
    through `read_media_bytes`; any other type is refused (400)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        limit = _max_bytes(policy, kind)
        if len(data) > limit:
            raise refused(f"{kind} of {len(data)} bytes exceeds the limit of {limit}", "too_large")
        return data
    if isinstance(source, (str, os.PathLike)):
        return read_media_bytes(source, policy, kind)
    article = "an" if kind == "image" else "a"
    raise refused(f"{article} {kind} source cannot be a {type(source).__name__}", "invalid_source")


def _max_bytes(policy: MediaPolicy, kind: MediaKind) -> int:
    return policy.max_bytes if kind == "image" else policy.max_video_bytes


def read_media_bytes(reference: str | os.PathLike[str], policy: MediaPolicy, kind: MediaKind = "image") -> bytes:
    """The bytes `reference` names, fetched or read under `policy`'s limits for `kind`.

    http(s) URLs go through `fetch_url`; `data:` URLs must be base64 with a `kind/...` media type (or none); `file:`
    URLs and paths are read only below `policy.allowed_local_media_path`. Any other scheme is refused.
    """
    max_bytes = _max_bytes(policy, kind)
    if not isinstance(reference, str):
        return read_local_file(os.fspath(reference), policy, max_bytes=max_bytes)
    match = _SCHEME.match(reference)
    if match is None:
        return read_local_file(reference, policy, max_bytes=max_bytes)
    scheme = match.group(1).lower()
    if scheme in ("http", "https"):
        total_timeout = policy.total_timeout if kind == "image" else policy.video_total_timeout
        return fetch_url(reference, policy, max_bytes=max_bytes, total_timeout=total_timeout, accept=f"{kind}/*")
    if scheme == "data":
        if "data" not in policy.allowed_schemes:
            raise refused("data URLs are not allowed", "scheme_not_allowed")
        return read_data_url(reference, max_bytes=max_bytes, media_type_prefix=f"{kind}/")
    if scheme == "file":
        return read_local_file(_file_url_path(reference), policy, max_bytes=max_bytes)
    raise refused(f"URL scheme {scheme!r} is not allowed", "scheme_not_allowed")


def read_data_url(url: str, *, max_bytes: int, media_type_prefix: str = "image/") -> bytes:
    """The decoded payload of a base64 `data:` URL, refused (400) past `max_bytes` before and after decoding."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise refused("data URL has no ',' before its data", "invalid_data_url")
    media_type, *params = (part.strip().lower() for part in header.split(";"))
    if "base64" not in params:
        raise refused("data URLs must be base64-encoded (';base64,')", "invalid_data_url")
    if media_type and not media_type.startswith(media_type_prefix):
        raise refused(f"data URL media type {media_type!r} is not {media_type_prefix}*", "invalid_data_url")
    # Checked on the encoded text first, so an oversized payload is never decoded into memory.
    if len(payload) > 4 * -(-max_bytes // 3) + 4:
        raise refused(f"data URL carries more than the limit of {max_bytes} bytes", "too_large")
    if "%" in payload:
        payload = urllib.parse.unquote(payload)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise refused("data URL payload is not valid base64", "invalid_data_url") from None
    if len(data) > max_bytes:
        raise refused(f"data URL carries more than the limit of {max_bytes} bytes", "too_large")
    return data


def read_local_file(path: str, policy: MediaPolicy, *, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path`, only if it lies below `policy.allowed_local_media_path`.

    A relative `path` is relative to that directory. Containment is decided on real paths (symlinks resolved on
    both sides), so a link inside the directory that points out of it is refused; the final open refuses a symlink
    as the last component too. This guards against API input, not against someone who can write into the directory
    while the server runs. Errors name the path as given, never what it resolves to.
    """
    root = policy.allowed_local_media_path
    if root is None:
        raise refused("local files are not allowed (no allowed_local_media_path is set)", "local_file_not_allowed")
    if "\x00" in path:
        raise refused("path contains a NUL character", "invalid_path")
    real_root = os.path.realpath(root)
    real_path = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real_root, real_path]) != real_root:
        raise refused(f"path {path!r} is outside the allowed media directory", "path_not_allowed")
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real_path, flags)
    except FileNotFoundError:
        raise refused(f"file {path!r} does not exist", "file_not_found") from None
    except OSError as exc:
        raise refused(f"file {path!r} cannot be opened ({exc.strerror})", "file_unreadable") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refused(f"{path!r} is not a regular file", "file_unreadable")
    with os.fdopen(fd, "rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise refused(f"file {path!r} is larger than the limit of {max_bytes} bytes", "too_large")
    return data


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise refused(f"file URL names a remote host ({parts.netloc!r})", "invalid_url")
    if parts.query or parts.fragment:
        raise refused("file URLs may not carry a query or fragment", "invalid_url")
    return urllib.parse.unquote(parts.path)
