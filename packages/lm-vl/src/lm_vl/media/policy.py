"""`MediaPolicy`: what media a request may name and how much of it may be fetched and decoded. Strict by default."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

MiB = 1024 * 1024
# Schemes a policy may allow. Local files are governed by `allowed_local_media_path` alone (`file:` URLs and plain
# paths alike), never by a scheme entry, so no scheme list can open the filesystem by accident.
SUPPORTED_SCHEMES = frozenset({"http", "https", "data"})
# PIL format names (as `Image.format` reports them) a policy may allow. Every other PIL plugin stays unreachable from
# request input: `Image.open` is only ever given this list.
SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
# PIL's own decompression-bomb threshold (2 x Image.MAX_IMAGE_PIXELS), above which `Image.open` raises regardless.
PIL_BOMB_PIXELS = 178_956_970
# An allow-list entry: a host name or IP address, or `*.` followed by a domain (which matches its subdomains only).
_DOMAIN_PATTERN = re.compile(r"(\*\.)?[a-z0-9_.:-]+")


@dataclass(frozen=True)
class MediaPolicy:
    """Limits applied to every image and video a request names; the defaults are the strict server defaults.

    Remote media: only `allowed_schemes` (http, https, data URLs). A host is resolved once; if any of its addresses is
    not a public unicast address the URL is refused, otherwise the connection goes to that validated address (the
    host name still drives the Host header, TLS SNI and certificate check). Redirects are followed by hand, at most
    `max_redirects`, each hop validated again like the first URL. `allowed_media_domains` (None: any public host; an
    empty list: none) holds exact hosts and `*.domain` wildcards that match subdomains of `domain` only; it is checked
    on every hop. Bodies are streamed under `max_bytes` (a larger `Content-Length` is refused before reading), each
    socket operation under `connect_timeout`/`read_timeout` and the whole fetch, redirects included, under
    `total_timeout`. Host name resolution itself is bounded by the system resolver's own timeout.

    Local files: refused unless `allowed_local_media_path` names a directory; then a path (or `file:` URL) is opened
    only if it lies below that directory after resolving symlinks.

    Decoding: only `allowed_formats`; the pixel count from the image header must not exceed `max_image_pixels` (PIL's
    own bomb check refuses anything above 178,956,970 whatever this says); animated images may have at most
    `max_image_frames` frames (the first is used). `limit_per_prompt` caps the images and videos of one request,
    `limit_per_modality` (None: no more) those of each modality (``{"image": 4, "video": 1}``).

    Video: files up to `max_video_bytes` fetched within `video_total_timeout`, with at most `max_video_frames` frames
    (a frame list's length or a file's packets): that count bounds demuxing and decoding work. Each frame is held to
    `max_image_pixels`.

    `allow_loopback_for_tests` lets URLs reach loopback addresses (127.0.0.0/8, ::1) and `localhost`, so tests can
    serve media from a local HTTP server. Never set it in a server: every other private range stays refused, but
    loopback is where a server's own admin endpoints live.
    """

    allowed_schemes: AbstractSet[str] = SUPPORTED_SCHEMES
    allowed_local_media_path: str | None = None
    allowed_media_domains: Sequence[str] | None = None
    allow_redirects: bool = True
    max_redirects: int = 3
    max_bytes: int = 20 * MiB
    connect_timeout: float = 5.0
    read_timeout: float = 5.0
    total_timeout: float = 10.0
    allowed_formats: AbstractSet[str] = SUPPORTED_FORMATS
    max_image_pixels: int = PIL_BOMB_PIXELS
    max_image_frames: int = 1000
    limit_per_prompt: int = 8
    limit_per_modality: Mapping[str, int] | None = None
    max_video_bytes: int = 200 * MiB
    video_total_timeout: float = 30.0
    max_video_frames: int = 20_000
    allow_loopback_for_tests: bool = False

    def __post_init__(self) -> None:
        schemes = _string_set(self.allowed_schemes, "allowed_schemes", str.lower)
        if not schemes <= SUPPORTED_SCHEMES:
            raise ValueError(
                f"allowed_schemes: {sorted(schemes - SUPPORTED_SCHEMES)} not supported (choose from "
                f"{sorted(SUPPORTED_SCHEMES)}; local files are enabled by allowed_local_media_path)"
            )
        formats = _string_set(self.allowed_formats, "allowed_formats", str.upper)
        if not formats <= SUPPORTED_FORMATS:
            raise ValueError(
                f"allowed_formats: {sorted(formats - SUPPORTED_FORMATS)} not supported (choose from "
                f"{sorted(SUPPORTED_FORMATS)})"
            )
        object.__setattr__(self, "allowed_schemes", schemes)
        object.__setattr__(self, "allowed_formats", formats)

        if self.allowed_local_media_path is not None:
            path = os.fspath(self.allowed_local_media_path)
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ValueError(f"allowed_local_media_path: must be an absolute path, got {path!r}")
            object.__setattr__(self, "allowed_local_media_path", path)

        if self.allowed_media_domains is not None:
            object.__setattr__(self, "allowed_media_domains", _domain_patterns(self.allowed_media_domains))

        for name in ("allow_redirects", "allow_loopback_for_tests"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        _check_int(self, "max_redirects", low=0)
        for name in (
            "max_bytes",
            "max_image_pixels",
            "max_image_frames",
            "limit_per_prompt",
            "max_video_bytes",
            "max_video_frames",
        ):
            _check_int(self, name, low=1)
        if self.limit_per_modality is not None:
            limits = self.limit_per_modality
            if not isinstance(limits, Mapping) or not all(
                key in ("image", "video") and isinstance(value, int) and not isinstance(value, bool) and value >= 0
                for key, value in limits.items()
            ):
                raise ValueError(f"limit_per_modality: must map 'image' and/or 'video' to counts >= 0, got {limits!r}")
            object.__setattr__(self, "limit_per_modality", dict(limits))
        for name in ("connect_timeout", "read_timeout", "total_timeout", "video_total_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name}: must be a positive finite number of seconds, got {value!r}")


def _string_set(values: object, name: str, normalize: Callable[[str], str]) -> frozenset[str]:
    if isinstance(values, str) or not isinstance(values, (AbstractSet, Sequence)):
        raise ValueError(f"{name}: must be a set or list of strings, got {values!r}")
    if not all(isinstance(value, str) for value in values):
        raise ValueError(f"{name}: must hold strings only, got {values!r}")
    return frozenset(normalize(value) for value in values)


def _domain_patterns(patterns: object) -> tuple[str, ...]:
    if isinstance(patterns, str) or not isinstance(patterns, (Sequence, AbstractSet)):
        raise ValueError(f"allowed_media_domains: must be a list of host patterns, got {patterns!r}")
    normalized = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"allowed_media_domains: must hold strings, got {pattern!r}")
        # Hosts compare in the form URL parsing produces: lower case, no trailing dot, IPv6 without brackets.
        host = pattern.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
        if not _DOMAIN_PATTERN.fullmatch(host) or host in ("*.", "") or "*" in host[1:]:
            raise ValueError(
                f"allowed_media_domains: {pattern!r} is not a host name, an IP address or a '*.domain' wildcard "
                "(international names in their xn-- form)"
            )
        normalized.append(host)
    return tuple(normalized)


def _check_int(policy: MediaPolicy, name: str, low: int) -> None:
    value = getattr(policy, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
