"""Decoding video files and image-sequence folders into square RGB frames at a chosen frame rate.

Everything goes through PyAV (the FFmpeg it bundles), so any container and codec of the wheel decodes,
and a single jpg/png opens as a one-frame video. Frames are streamed one at a time:

    reader = open_video(path)                      # or ImageSequenceReader(files, image_fps)
    for rgb in square_frames(reader, size=64, fps=10.0):
        ...                                        # (64, 64, 3) uint8, centre crop of the source frame

Damaged input: opening failures raise DecodeError with a reason a person can act on ("empty file (0 bytes)",
"not a video: ...", "no decodable video stream"). A decoding error after some frames were decoded ends the
stream early instead: the frames decoded so far are kept and `reader.truncation` says what happened, so a
truncated download still yields its good part (the ingestion records it as a warning).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import numpy as np
from av.filter.context import FilterContext

# Bytes of the file head read to tell a text file (say, an HTML error page saved as .mp4) from a video.
_SNIFF_BYTES = 256
# A resampled stream may be short by this fraction of an output frame because containers round timestamps
# (Matroska keeps milliseconds); without the slack, 3.000 s at 10 fps could come out as 29 or 31 frames.
_FRAME_COUNT_SLACK = 1e-3


class DecodeError(Exception):
    """A source cannot be decoded at all; `str(err)` is the reason recorded in the manifest."""


@dataclass
class StreamInfo:
    width: int | None
    height: int | None
    fps_in: float | None
    codec: str | None


class FrameReader(Protocol):
    info: StreamInfo
    frames_decoded: int
    truncation: str | None

    def __iter__(self) -> Iterator[tuple[float, av.VideoFrame]]: ...

    def end_time(self) -> float: ...


def ffmpeg_message(exc: BaseException) -> str:
    """FFmpeg's own words without PyAV's errno prefix ("[Errno 1094995529] ...")."""
    return getattr(exc, "strerror", None) or str(exc)


def _reason_not_a_video(path: Path, exc: Exception) -> str:
    message = ffmpeg_message(exc)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        head = b""
    for cut in range(4):  # the sniffed head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip() and "\x00" not in text:
            preview = text.strip().splitlines()[0][:40]
            return f"not a video: FFmpeg says {message!r}; the file starts with text ({preview!r})"
        break
    return f"not a video: FFmpeg says {message!r}"


def _as_float(rate: Fraction | None) -> float | None:
    return float(rate) if rate else None


class VideoReader:
    """(time in seconds, av.VideoFrame) of the first video stream of one file, in presentation order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.frames_decoded = 0
        self.truncation: str | None = None
        self._first_time: float | None = None
        self._last_time: float | None = None
        self._last_duration: float | None = None
        self._seconds_per_tick: float | None = None
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
        try:
            self._container = av.open(str(self.path), mode="r")
        except av.error.FFmpegError as exc:
            raise DecodeError(_reason_not_a_video(self.path, exc)) from None
        except OSError as exc:
            raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
        videos = list(self._container.streams.video)
        if not videos:
            kinds = (
                ", ".join(f"{s.type}/{getattr(s.codec_context, 'name', '?')}" for s in self._container.streams)
                or "none"
            )
            self._container.close()
            raise DecodeError(f"no decodable video stream (streams: {kinds})")
        self._stream = videos[0]
        context = self._stream.codec_context
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        self.info = StreamInfo(
            width=context.width or None, height=context.height or None, fps_in=_as_float(rate), codec=context.name
        )

    def __iter__(self) -> Iterator[tuple[float, av.VideoFrame]]:
        frame_period = 1.0 / self.info.fps_in if self.info.fps_in else None
        try:
            decoded = self._container.decode(self._stream)
            while True:
                try:
                    frame = next(decoded)
                except StopIteration:
                    self.truncation = self._shortfall()
                    break
                except (av.error.FFmpegError, OSError, ValueError) as exc:
                    self.truncation = (
                        f"truncated: decoded {self.frames_decoded} frames then FFmpeg said {ffmpeg_message(exc)!r}"
                    )
                    break
                if frame.is_corrupt:
                    if self.frames_decoded == 0:
                        continue  # an open GOP cut from a longer stream starts with undecodable references
                    self.truncation = f"truncated: decoded {self.frames_decoded} frames then a corrupt frame"
                    break
                time = frame.time
                if time is None or (self._last_time is not None and time <= self._last_time):
                    # Missing or non-increasing timestamps (raw streams, broken muxers): assume a constant rate.
                    if self._last_time is None:
                        time = 0.0
                    else:
                        time = self._last_time + (frame_period or self._last_duration or 1.0 / 30.0)
                if frame.duration and frame.time_base:
                    if self._seconds_per_tick is None:  # Fraction arithmetic per frame would cost ~2% of decoding
                        self._seconds_per_tick = float(frame.time_base)
                    self._last_duration = frame.duration * self._seconds_per_tick
                elif frame_period:
                    self._last_duration = frame_period
                elif self._last_time is not None:
                    self._last_duration = time - self._last_time
                if self._first_time is None:
                    self._first_time = time
                self._last_time = time
                self.frames_decoded += 1
                yield time, frame
        finally:
            self._container.close()

    def _shortfall(self) -> str | None:
        """Damage FFmpeg does not report: decoders drop corrupt packets and demuxers stop quietly at a cut.

        The container's own frame count or duration tells: a few frames of slack are allowed, because edit
        lists may legitimately hide a frame or two.
        """
        stream = self._stream
        declared = stream.frames
        if declared and declared - self.frames_decoded > max(1, declared // 100):
            return f"truncated: decoded {self.frames_decoded} of the {declared} frames the container declares"
        declared_s = None
        if stream.duration and stream.time_base:
            declared_s = float(stream.duration * stream.time_base)
        elif self._container.duration and len(self._container.streams) == 1:
            # The container's duration spans all streams; only trusted when the video is the only one.
            declared_s = self._container.duration / 1_000_000
        if declared_s and self._first_time is not None:
            decoded_s = self.end_time() - self._first_time
            slack = 2.0 / self.info.fps_in if self.info.fps_in else 0.1
            if decoded_s < declared_s - slack:
                return (
                    f"truncated: decoded {self.frames_decoded} frames ({decoded_s:.2f} s) of the {declared_s:.2f} s "
                    "the container declares"
                )
        return None

    def end_time(self) -> float:
        """When the last decoded frame stops being shown (its start plus its duration)."""
        if self._last_time is None:
            return 0.0
        return self._last_time + (self._last_duration or 0.0)


def open_video(path: str | Path) -> VideoReader:
    return VideoReader(path)


class ImageSequenceReader:
    """One trajectory stored as image files (jpg/png, one per frame), at a fixed, declared frame rate."""

    def __init__(self, files: Iterable[str | Path], image_fps: float):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise DecodeError("image sequence without frames")
        self.image_fps = float(image_fps)
        self.frames_decoded = 0
        self.truncation: str | None = None
        self.info = StreamInfo(width=None, height=None, fps_in=self.image_fps, codec=None)

    def _decode_one(self, path: Path) -> av.VideoFrame:
        if path.stat().st_size == 0:
            raise DecodeError(f"{path.name}: empty file (0 bytes)")
        try:
            with av.open(str(path), mode="r") as container:
                if not container.streams.video:
                    raise DecodeError(f"{path.name}: no image in the file")
                stream = container.streams.video[0]
                for frame in container.decode(stream):
                    if self.info.codec is None:
                        self.info.codec = stream.codec_context.name
                    return frame
        except av.error.FFmpegError as exc:
            raise DecodeError(
                f"{path.name}: {_reason_not_a_video(path, exc).replace('not a video', 'not an image')}"
            ) from None
        raise DecodeError(f"{path.name}: no decodable image")

    def __iter__(self) -> Iterator[tuple[float, av.VideoFrame]]:
        for index, path in enumerate(self.files):
            try:
                frame = self._decode_one(path)
            except (DecodeError, OSError) as exc:
                if index == 0:
                    raise DecodeError(f"first frame unreadable: {exc}") from None
                self.truncation = f"truncated: decoded {self.frames_decoded} frames then {exc}"
                return
            if self.info.width is None:
                self.info.width, self.info.height = frame.width, frame.height
            self.frames_decoded += 1
            yield index / self.image_fps, frame

    def end_time(self) -> float:
        return self.frames_decoded / self.image_fps


def nearest_in_time(
    timed_frames: Iterable[tuple[float, av.VideoFrame]], fps: float, end_time: Callable[[], float]
) -> Iterator[av.VideoFrame]:
    """Resample a timestamped stream to `fps`: for each target time t0 + k/fps, the frame shown nearest to it.

    Frames repeat when upsampling and are skipped when downsampling. The output covers the source's whole
    duration (first frame's start to last frame's end), so a 3 s clip gives 3 * fps frames at any source rate.
    """
    step = 1.0 / fps
    start: float | None = None
    produced = 0
    previous: tuple[float, av.VideoFrame] | None = None
    for time, frame in timed_frames:
        if start is None:
            start = time
        while True:
            target = start + produced * step
            if time < target:
                break
            if previous is not None and target - previous[0] <= time - target:
                yield previous[1]
            else:
                yield frame
            produced += 1
        previous = (time, frame)
    if previous is None or start is None:
        return
    total = math.ceil((end_time() - start) * fps - _FRAME_COUNT_SLACK)
    while produced < total:
        yield previous[1]
        produced += 1


class SquareFrameConverter:
    """Centre-crop to a square, resize to `size` and convert to RGB in one FFmpeg filter graph.

    crop + scale + format run inside libavfilter/swscale on the decoder's own pixel format, which is faster
    than converting the full frame to RGB and cropping or resizing in numpy. One graph per input geometry
    and pixel format (image sequences may mix them).
    """

    _MAX_GRAPHS = 8

    def __init__(self, size: int, interpolation: str = "area"):
        self.size = int(size)
        self.interpolation = interpolation
        self._graphs: dict[tuple[int, int, str], tuple[av.filter.Graph, FilterContext, FilterContext]] = {}

    def _graph(self, width: int, height: int, pix_fmt: str):
        key = (width, height, pix_fmt)
        found = self._graphs.get(key)
        if found is not None:
            return found
        if len(self._graphs) >= self._MAX_GRAPHS:
            self._graphs.clear()
        side = min(width, height)
        graph = av.filter.Graph()
        # One thread: parallelism comes from the worker processes, and 64x64 output gains nothing from more.
        graph.threads = 1
        source = graph.add_buffer(width=width, height=height, format=pix_fmt, time_base=Fraction(1, 1000))
        crop = graph.add("crop", f"w={side}:h={side}:x={(width - side) // 2}:y={(height - side) // 2}:exact=1")
        # accurate_rnd + full_chroma_int: without them swscale's fast scaled YUV->RGB path is biased by about
        # -2 grey levels; with them the result matches an unscaled conversion, at no measurable cost here.
        scale = graph.add(
            "scale", f"w={self.size}:h={self.size}:flags={self.interpolation}+accurate_rnd+full_chroma_int"
        )
        rgb = graph.add("format", "rgb24")
        sink = graph.add("buffersink")
        source.link_to(crop)
        crop.link_to(scale)
        scale.link_to(rgb)
        rgb.link_to(sink)
        graph.configure()
        # The graph must stay referenced: its filter contexts point into it and crash once it is freed.
        self._graphs[key] = (graph, source, sink)
        return self._graphs[key]

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        graph, source, sink = self._graph(frame.width, frame.height, frame.format.name)
        source.push(frame)
        out = sink.pull()
        array = out.to_ndarray()
        if array.shape != (self.size, self.size, 3):
            raise DecodeError(f"converter produced {array.shape}, expected {(self.size, self.size, 3)}")
        return array


def square_frames(
    reader: FrameReader,
    size: int,
    fps: float | None = None,
    interpolation: str = "area",
    converter: SquareFrameConverter | None = None,
) -> Iterator[np.ndarray]:
    """(size, size, 3) uint8 RGB frames of `reader`, resampled to `fps` (None keeps every decoded frame).

    Only the frames the resampler picks are converted; a frame picked twice is converted once.
    """
    converter = converter or SquareFrameConverter(size, interpolation)
    frames: Iterable[av.VideoFrame]
    if fps is None:
        frames = (frame for _, frame in reader)
    else:
        frames = nearest_in_time(reader, fps, reader.end_time)
    last_frame: av.VideoFrame | None = None
    last_array: np.ndarray | None = None
    for frame in frames:
        if frame is not last_frame:
            last_frame, last_array = frame, converter(frame)
        assert last_array is not None
        yield last_array


def natural_key(name: str) -> list[object]:
    """Sort key that orders frame_2.png before frame_10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]
