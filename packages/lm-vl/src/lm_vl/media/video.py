"""Loading video as RGB frames: a list of frame images, or a video file decoded with PyAV (the `video` extra)."""

from __future__ import annotations

import asyncio
import functools
import importlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from types import ModuleType
from typing import Any, TypeAlias

from PIL import Image

from lm_vl.media.errors import MediaError, refused
from lm_vl.media.image import ImageSource, check_pixels, load_image
from lm_vl.media.policy import MediaPolicy
from lm_vl.media.sources import source_bytes

# A video file (URL, data URL, path or bytes) or its frames, one image source each.
VideoSource: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | Sequence[ImageSource]
_DEFAULT_POLICY = MediaPolicy()
_CONTAINERS = "MP4/MOV, Matroska/WebM or AVI"
# Leading box types of an ISO base media file (MP4, MOV, 3GP); older QuickTime files need not start with `ftyp`.
_ISO_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"})


def load_video(
    source: VideoSource,
    policy: MediaPolicy | None = None,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
) -> list[Image.Image]:
    """RGB frames of `source`, sampled uniformly: `num_frames` of them, or `fps` per second of video, or all.

    A list of frames is sampled by `num_frames` only (it has no frame rate), and only the chosen frames are loaded,
    each through `load_image`. Anything else names a video file, read like an image source under the policy's video
    limits and decoded with PyAV. Raises `MediaError` with `param="video_url"`, and ImportError naming the
    `lm-vl[video]` extra when a file must be decoded without PyAV installed.
    """
    policy = _DEFAULT_POLICY if policy is None else policy
    try:
        if isinstance(source, Sequence) and not isinstance(source, (str, bytes, bytearray, memoryview)):
            return _load_frame_list(source, policy, num_frames=num_frames, fps=fps)
        av = _import_av()
        data = source_bytes(source, policy, "video")
        return _decode_video(av, data, policy, num_frames=num_frames, fps=fps)
    except MediaError as exc:
        exc.param = "video_url"
        raise


async def aload_video(
    source: VideoSource,
    policy: MediaPolicy | None = None,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    executor: Executor | None = None,
) -> list[Image.Image]:
    """`load_video` run in `executor` (default: the event loop's), so fetching and decoding never block the loop."""
    loop = asyncio.get_running_loop()
    call = functools.partial(load_video, source, policy, num_frames=num_frames, fps=fps)
    return await loop.run_in_executor(executor, call)


def sample_frame_indices(
    num_total: int, *, num_frames: int | None = None, fps: float | None = None, source_fps: float | None = None
) -> list[int]:
    """Increasing, distinct indices spread uniformly over `num_total` frames, first and last included.

    `num_frames` picks that many (all if there are fewer); `fps` picks `duration * fps` of them (at least one),
    where duration = `num_total / source_fps`; neither picks all.
    """
    if num_total < 1:
        raise ValueError(f"num_total: must be >= 1, got {num_total}")
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: must be an integer >= 1, got {num_frames!r}")
        count = min(num_frames, num_total)
    elif fps is not None:
        if not fps > 0:
            raise ValueError(f"fps: must be > 0, got {fps!r}")
        if not source_fps or not source_fps > 0:
            raise ValueError("sampling by fps needs the video's frame rate")
        count = max(1, min(num_total, round(num_total / source_fps * fps)))
    else:
        count = num_total
    if count == 1:
        return [0]
    # Integer floor of i * (num_total - 1) / (count - 1): the step is >= 1, so indices never repeat.
    return [i * (num_total - 1) // (count - 1) for i in range(count)]


def _load_frame_list(
    frames: Sequence[ImageSource], policy: MediaPolicy, *, num_frames: int | None, fps: float | None
) -> list[Image.Image]:
    if fps is not None:
        raise refused("a list of frames has no frame rate: sample it with num_frames", "invalid_source")
    if not frames:
        raise refused("a video needs at least one frame", "invalid_source")
    if len(frames) > policy.max_video_frames:
        raise refused(f"video has {len(frames)} frames; the limit is {policy.max_video_frames}", "too_many_frames")
    try:
        indices = sample_frame_indices(len(frames), num_frames=num_frames)
    except ValueError as exc:
        raise refused(str(exc), "invalid_source") from None
    return [load_image(frames[index], policy) for index in indices]


def _import_av() -> ModuleType:
    try:
        # importlib keeps type checkers from requiring the optional dependency.
        return importlib.import_module("av")
    except ImportError as exc:
        raise ImportError("decoding video files needs PyAV: pip install 'lm-vl[video]'") from exc


def _container_format(data: bytes) -> str | None:
    """The FFmpeg demuxer for `data`, from its leading bytes, or None for anything else.

    Naming the demuxer keeps FFmpeg from probing: probing can pick demuxers such as HLS or concat, whose playlists
    make FFmpeg open further URLs and local files on the server's behalf.
    """
    if data[4:8] in _ISO_BOXES:
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def _decode_video(
    av: ModuleType, data: bytes, policy: MediaPolicy, *, num_frames: int | None, fps: float | None
) -> list[Image.Image]:
    container_format = _container_format(data)
    if container_format is None:
        raise refused(f"data is not a video in an allowed container ({_CONTAINERS})", "unsupported_format")
    try:
        num_total, source_fps = _count_frames(av, data, container_format, policy)
        try:
            indices = sample_frame_indices(num_total, num_frames=num_frames, fps=fps, source_fps=source_fps)
        except ValueError as exc:
            raise refused(str(exc), "invalid_source") from None
        frames = _decode_frames(av, data, container_format, indices, policy)
    except MediaError:
        raise
    except Exception as exc:  # FFmpeg reports damaged input through many exception types
        raise refused(f"video data is corrupt or unsupported ({type(exc).__name__})", "corrupt_video") from None
    if not frames:
        raise refused("no frame of the video could be decoded", "corrupt_video")
    return frames


def _count_frames(av: ModuleType, data: bytes, container_format: str, policy: MediaPolicy) -> tuple[int, float | None]:
    """Frames in the first video stream, counted by demuxing (no decoding), and its frame rate.

    The container's own frame count is often absent; one packet per frame is what the codecs we meet produce.
    """
    with av.open(io.BytesIO(data), format=container_format) as container:
        if not container.streams.video:
            raise refused("the file has no video stream", "corrupt_video")
        stream: Any = container.streams.video[0]
        check_pixels((stream.codec_context.width, stream.codec_context.height), policy)
        num_total = 0
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet demux yields at the end
                continue
            num_total += 1
            if num_total > policy.max_video_frames:
                raise refused(f"video has more than {policy.max_video_frames} frames", "too_many_frames")
        if num_total == 0:
            raise refused("the video stream has no frames", "corrupt_video")
        rate = stream.average_rate or stream.guessed_rate
        return num_total, float(rate) if rate else None


def _decode_frames(
    av: ModuleType, data: bytes, container_format: str, indices: list[int], policy: MediaPolicy
) -> list[Image.Image]:
    """The frames at `indices` (increasing), decoding sequentially up to the last one."""
    wanted = set(indices)
    frames: list[Image.Image] = []
    with av.open(io.BytesIO(data), format=container_format) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                # A stream may change resolution midway; each kept frame is held to the cap again.
                check_pixels((frame.width, frame.height), policy)
                frames.append(frame.to_image())  # RGB (rgb24)
            if index >= indices[-1]:
                break
    return frames
