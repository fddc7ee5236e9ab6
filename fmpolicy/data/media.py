"""Decoding camera frames as LeRobot stores them: PNG bytes (`image` features) and mp4 frames at a
timestamp (`video` features), into float32 (3, H, W) in [0, 1], as LeRobot's reader gives them.

PyAV decodes video: its wheels bundle FFmpeg (with dav1d for AV1, lerobot's default codec since 0.4,
and H.264 for older data) on Linux, macOS and Windows, so it installs everywhere from the registry;
torchcodec, LeRobot's default decoder, needs system FFmpeg libraries and a matching torch build.
Pillow decodes PNG. Both are imported when first used, so datasets without images need neither.

Writing (`DatasetWriter`): PNG with Pillow; video with PyAV's libx264 (H.264, yuv420p). H.264 rather
than LeRobot's default AV1 (libsvtav1): every PyAV wheel bundles an H.264 encoder and decoder, every
FFmpeg build and torchcodec decode it, and libx264 is quiet and several times faster than SVT-AV1 on
the small frames of our tasks (SVT-AV1 also logs a banner per file and disables tools below 64 px).
Key frames every 2 frames and no B-frames (LeRobot's `g=2`): decoding one frame needs at most one
earlier frame, and presentation order equals decoding order, so a file can be cut at any frame.
Episodes are appended to an mp4 by remuxing: the episode is encoded on its own, then the file's packets
and the episode's packets are copied (not re-encoded) into a new file that replaces the old one, as
LeRobot's `concatenate_video_files` does, so earlier episodes never lose quality.
"""

from __future__ import annotations

import io
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from fmpolicy.errors import DatasetError

# How far a decoded video frame may lie from the asked timestamp (LeRobot's default tolerance_s).
VIDEO_TOLERANCE_S = 1e-4


def image_hw(feature: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of an `image` / `video` feature. LeRobot stores the shape (H, W, C) with names
    ["height", "width", "channels"]; some converted datasets store (C, H, W)."""
    shape = list(feature["shape"])
    names = feature.get("names")
    if isinstance(names, (list, tuple)) and len(names) == 3 and "height" in names and "width" in names:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    if len(shape) == 3 and shape[0] in (1, 3) and shape[-1] not in (1, 3):
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an encoded image (PNG, or any format PIL reads)."""
    from PIL import Image  # imported here: only image datasets need it

    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only arrays)


def to_chw_float(rgb: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], as LeRobot's ToTensor gives images."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)


_CLOSABLE: "weakref.WeakSet[ProcessCache]" = weakref.WeakSet()


def _close_before_fork() -> None:
    """Close every open video container before this process forks (DataLoader workers): FFmpeg's
    decoder threads may hold a lock at the moment of the fork, and a child inheriting it locked hangs
    (seen in the test suite). The parent reopens its files lazily."""
    for cache in list(_CLOSABLE):
        cache.close_all()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_before_fork)


class ProcessCache(OrderedDict):
    """A small per-process cache (least recently used out). After a fork (DataLoader workers) and when
    pickled it starts empty: an open video container must not be shared between processes (and it is
    closed in the parent just before a fork, see `_close_before_fork`)."""

    def __init__(self, size: int, close=None):
        super().__init__()
        self.size, self.close, self.pid = size, close, os.getpid()
        if close is not None:
            _CLOSABLE.add(self)

    def __hash__(self) -> int:  # identity: a WeakSet member (a dict subclass is unhashable otherwise)
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other

    def close_all(self) -> None:
        if self.pid != os.getpid():
            return
        while self:
            _, value = self.popitem(last=False)
            try:
                self.close(value)
            except Exception:  # noqa: BLE001 (closing must not stop a fork)
                pass

    def __reduce__(self):
        # pickled (a spawned DataLoader worker, a copy): an empty cache; open files stay behind
        return (ProcessCache, (self.size, self.close))

    def get_or(self, key, make):
        if self.pid != os.getpid():
            super().clear()  # the parent's objects: dropped, not closed (they belong to the parent)
            self.pid = os.getpid()
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            _, old = self.popitem(last=False)
            if self.close is not None:
                self.close(old)
        return value


def decode_video_frame(container, ts: float,
                       tolerance_s: float = VIDEO_TOLERANCE_S) -> tuple[np.ndarray | None, float]:
    """The frame of an open PyAV container nearest to `ts` seconds, as (H, W, 3) uint8 RGB, and its
    timestamp (None, inf for an empty stream). Seeks to the key frame at or before ts and decodes
    forward until a frame lies past ts + tolerance_s, as LeRobot's pyav path does."""
    stream = container.streams.video[0]
    tb = float(stream.time_base)
    container.seek(max(0, math.floor(ts / tb)), stream=stream, backward=True, any_frame=False)
    best, best_ts = None, math.inf
    for frame in container.decode(stream):
        f_ts = float(frame.pts * stream.time_base) if frame.pts is not None else float(frame.time)
        if abs(f_ts - ts) < abs(best_ts - ts):
            best, best_ts = frame, f_ts
        if f_ts >= ts + tolerance_s:
            break
    if best is None:
        return None, math.inf
    return best.to_ndarray(format="rgb24"), best_ts


def decode_all_frames(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every frame of an mp4, in order: their timestamps (F,) in seconds and (H, W, 3) uint8 RGB images."""
    container = open_video(path)
    times, frames = [], []
    try:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            times.append(float(frame.pts * stream.time_base) if frame.pts is not None else float(frame.time))
            frames.append(frame.to_ndarray(format="rgb24"))
    except DatasetError:
        raise
    except Exception as e:  # av.error.*
        raise DatasetError(f"video file {path} does not decode: {e}") from e
    finally:
        container.close()
    return np.asarray(times, np.float64), frames


def close_video(container) -> None:
    container.close()


def open_video(path: Path):
    import av  # imported here: only video datasets need it

    try:
        container = av.open(str(path))
        for stream in container.streams.video:
            # one decoding thread: an item needs one frame (FFmpeg's frame threads only add latency), and
            # a process without decoder threads forks cleanly into DataLoader workers
            stream.codec_context.thread_count = 1
        return container
    except Exception as e:  # av.error.* for a corrupt or unreadable file
        raise DatasetError(f"video file {path} cannot be opened: {e}") from e


# ---- writing -------------------------------------------------------------------------------------

VIDEO_CODEC = "libx264"
# g=2: a key frame every 2 frames (cheap random access, as LeRobot); bf=0: no reordering, so a file can
# be cut after any frame; crf 18: visually lossless for H.264.
VIDEO_OPTIONS = {"g": "2", "bf": "0", "crf": "18", "preset": "veryfast"}
VIDEO_PIX_FMT = "yuv420p"


def encode_png(chw: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (3, H, W) (channels first, as our environments render)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def video_rate(fps: float) -> Fraction:
    """fps as the exact fraction a video stream needs (10.0 -> 10, 1 / 0.03 -> 100/3)."""
    return Fraction(fps).limit_denominator(1001)


def encode_mp4(out: IO[bytes], frames: np.ndarray, fps: float) -> None:
    """Write (T, 3, H, W) uint8 frames as an H.264 mp4 to a binary file object; frame k at k / fps s."""
    import av

    _, _, h, w = frames.shape
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream(VIDEO_CODEC, rate=video_rate(fps), options=dict(VIDEO_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = w, h, VIDEO_PIX_FMT
        stream.codec_context.thread_count = 1
        for k, chw in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def append_mp4(out: IO[bytes], old: Path | None, keep_s: float, frames: np.ndarray, fps: float) -> None:
    """Write to `out` the frames of the mp4 `old` before `keep_s` seconds, then `frames` (T, 3, H, W)
    from `keep_s` on, without re-encoding `old` (packets are copied). Frames of `old` at or after
    `keep_s` (left by a killed writer, listed by no episode) are dropped. With no `old`, only `frames`."""
    import av

    episode = io.BytesIO()
    encode_mp4(episode, frames, fps)
    if old is None:
        out.write(episode.getvalue())
        return
    episode.seek(0)
    with av.open(str(old)) as first, av.open(episode, format="mp4") as second, \
            av.open(out, "w", format="mp4") as container:
        stream = container.add_stream_from_template(first.streams.video[0])
        for source, start_s, end_s in ((first, 0.0, keep_s), (second, keep_s, math.inf)):
            src = source.streams.video[0]
            tb = src.time_base
            shift = round(Fraction(start_s).limit_denominator(10**6) / tb)
            for packet in source.demux(src):
                if packet.dts is None:  # the demuxer's flush packet
                    continue
                if float(packet.pts * tb) >= end_s - 0.5 / fps:
                    continue
                packet.pts += shift
                packet.dts += shift
                packet.stream = stream
                container.mux(packet)
