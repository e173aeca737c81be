"""Writing frames to real video files with PyAV (used for source videos and rollout videos)."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

from veorl.storage import atomic_path

# Encoders that need even frame sides in yuv420p; we pad odd sizes by one pixel.
_YUV420_CODECS = {"libx264", "libx265", "h264", "hevc", "libvpx-vp9", "libvpx", "libsvtav1", "mpeg4", "mpeg2video"}


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int | float | Fraction = 30,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
    pix_fmt: str | None = None,
) -> int:
    """Encode (H, W, 3) uint8 RGB frames into `path` (container from the extension), atomically.

    `fps` may be a Fraction (30000/1001 for NTSC rates). `pix_fmt` picks the encoder's pixel format and keeps
    the frame size exactly (yuv444p encodes odd sizes); by default 4:2:0 codecs get yuv420p and odd sides
    are padded by one pixel.
    Returns the number of frames written. Raises ValueError when no frame is given.
    """
    import av

    path = Path(path)
    count = 0
    with atomic_path(path, suffix=".tmp" + path.suffix) as tmp:
        container = av.open(str(tmp), mode="w", format=None)
        try:
            stream = None
            for frame in frames:
                frame = np.ascontiguousarray(frame, dtype=np.uint8)
                if frame.ndim != 3 or frame.shape[2] != 3:
                    raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape}")
                if stream is None:
                    h, w = frame.shape[:2]
                    stream = container.add_stream(codec, rate=fps)
                    if pix_fmt is not None:
                        stream.pix_fmt = pix_fmt
                    elif codec in _YUV420_CODECS:
                        h, w = h + h % 2, w + w % 2
                        stream.pix_fmt = "yuv420p"
                    stream.width, stream.height = w, h
                    opts = {"crf": "18", "preset": "veryfast"} if codec in {"libx264", "libx265"} else {}
                    opts.update(options or {})
                    stream.options = opts
                if frame.shape[:2] != (stream.height, stream.width):
                    frame = np.pad(
                        frame,
                        ((0, stream.height - frame.shape[0]), (0, stream.width - frame.shape[1]), (0, 0)),
                        mode="edge",
                    )
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
                count += 1
            if stream is None:
                raise ValueError(f"no frames to write to {path}")
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()
    return count
