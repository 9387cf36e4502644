"""`load_video`: frame lists sampled before loading, video files decoded with PyAV (skipped without it), refusals.

Test videos are encoded here with PyAV: frame i is a flat grey of level 8 * i, so a decoded frame tells its index.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import sys

import numpy as np
import pytest
from PIL import Image

from lm_vl.media import MediaError, MediaPolicy, aload_video, load_video, sample_frame_indices

h = importlib.import_module("tests.lm_vl.media_helpers")


@pytest.mark.parametrize(
    ("num_total", "kwargs", "expected"),
    [
        (30, {"num_frames": 4}, [0, 9, 19, 29]),
        (30, {"num_frames": 1}, [0]),
        (5, {"num_frames": 8}, [0, 1, 2, 3, 4]),  # never more than there are
        (5, {}, [0, 1, 2, 3, 4]),
        (30, {"fps": 2.0, "source_fps": 10.0}, [0, 5, 11, 17, 23, 29]),  # 3 s at 2 frames per second
        (30, {"fps": 0.01, "source_fps": 10.0}, [0]),  # at least one
        (2, {"num_frames": 2}, [0, 1]),
    ],
)
def test_sample_frame_indices(num_total, kwargs, expected):
    assert sample_frame_indices(num_total, **kwargs) == expected


@pytest.mark.parametrize("num_total", [1, 2, 7, 30, 1001])
@pytest.mark.parametrize("num_frames", [1, 2, 3, 16, 64])
def test_sampled_indices_are_distinct_increasing_and_span_the_video(num_total, num_frames):
    indices = sample_frame_indices(num_total, num_frames=num_frames)
    assert len(indices) == min(num_total, num_frames)
    assert indices == sorted(set(indices)) and indices[0] == 0
    assert indices[-1] == (num_total - 1 if len(indices) > 1 else 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_frames": 0}, {"num_frames": 2, "fps": 1.0}, {"fps": -1.0, "source_fps": 10.0}, {"fps": 1.0}],
)
def test_sample_frame_indices_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_frame_indices(10, **kwargs)


def _error(source, policy=None, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as caught:
        load_video(source, policy, **kwargs)
    assert caught.value.param == "video_url"
    return caught.value


def test_frame_list_is_sampled_before_loading():
    good = h.encode_image("PNG", (16, 16))
    # Frames 1 and 3 would be refused if loaded; sampling 3 of 5 picks 0, 2 and 4 only.
    frames = load_video([good, b"not an image", good, b"not an image", good], num_frames=3)
    assert [frame.size for frame in frames] == [(16, 16)] * 3 and all(frame.mode == "RGB" for frame in frames)


def test_frame_list_refusals_name_video_url():
    good = Image.new("RGB", (4, 4))
    error = _error([good] * 11, MediaPolicy(max_video_frames=10))
    assert (error.status_code, error.code) == (400, "too_many_frames")
    assert _error([good, good], fps=1.0).code == "invalid_source"
    assert _error([]).code == "invalid_source"
    assert _error([b"not an image"]).code == "unsupported_format"


def test_missing_pyav_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"lm-vl\[video\]"):
        load_video(b"\0\0\0\x18ftypmp42")


# --- files, with PyAV -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mp4() -> bytes:
    """30 frames of 64x48 at 10 fps, MPEG-4 in MP4; frame i is grey level 8 * i."""
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * index, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _grey_levels(frames: list[Image.Image]) -> list[int]:
    return [round(float(np.asarray(frame).mean()) / 8) for frame in frames]


def test_video_file_is_sampled_uniformly(mp4):
    frames = load_video(mp4, num_frames=4)
    assert [frame.size for frame in frames] == [(64, 48)] * 4 and all(frame.mode == "RGB" for frame in frames)
    assert _grey_levels(frames) == [0, 9, 19, 29]
    assert _grey_levels(load_video(mp4, fps=2.0)) == [0, 5, 11, 17, 23, 29]
    assert len(load_video(mp4)) == 30


def test_video_from_url_data_url_and_async(mp4, media_server):
    media_server.routes["/clip.mp4"] = lambda handler: h.send(handler, 200, mp4, Content_Type="video/mp4")
    assert _grey_levels(load_video(media_server.url("/clip.mp4"), h.LOOPBACK_POLICY, num_frames=2)) == [0, 29]
    data_url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    assert len(load_video(data_url, num_frames=3)) == 3
    assert len(asyncio.run(aload_video(mp4, num_frames=5))) == 5


def test_video_url_goes_through_the_same_address_checks(mp4, media_server):
    error = _error(media_server.url("/clip.mp4"))  # default policy: loopback refused
    assert (error.status_code, error.code) == (400, "blocked_address")


def test_video_limits(mp4):
    assert _error(mp4, MediaPolicy(max_video_frames=29)).code == "too_many_frames"
    assert _error(mp4, MediaPolicy(max_image_pixels=64 * 48 - 1)).code == "too_many_pixels"
    assert _error(mp4, MediaPolicy(max_video_bytes=len(mp4) - 1)).code == "too_large"


@pytest.mark.parametrize(
    "data",
    [
        b"not a video at all",
        b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n",  # an HLS playlist is never handed to FFmpeg's prober
        b"ffconcat version 1.0\nfile /etc/passwd\n",
        h.encode_image("PNG"),
    ],
)
def test_non_video_data_is_refused_without_probing(data):
    pytest.importorskip("av")
    error = _error(data)
    assert (error.status_code, error.code) == (400, "unsupported_format")


def test_truncated_video_is_refused(mp4):
    error = _error(mp4[: len(mp4) // 3])
    assert error.status_code == 400 and error.code == "corrupt_video"


def test_image_data_url_is_not_a_video():
    payload = base64.b64encode(h.encode_image("PNG")).decode()
    pytest.importorskip("av")
    assert _error(f"data:image/png;base64,{payload}").code == "invalid_data_url"
