"""Cutting a frame stream into overlapping windows and writing them as sharded .npy clip files.

Memory is fixed by the parameters, not by the video: a ring of `window` frames and one shard buffer of
`clips_per_shard` clips. Shards are written atomically (temporary name, then rename), so a killed run
never leaves a half-written shard under its final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from veorl.storage import atomic_path

CLIPS_DIR = "clips"

# One shard buffer per process, reused across the sources a worker handles: a fresh 78 MB allocation per
# source (paper sizes) would only add page faults, and keeping one keeps the memory high-water mark flat.
_shard_buffer: np.ndarray | None = None


def _buffer(shape: tuple[int, ...]) -> np.ndarray:
    global _shard_buffer
    if _shard_buffer is None or _shard_buffer.shape != shape:
        _shard_buffer = None
        _shard_buffer = np.empty(shape, np.uint8)
    return _shard_buffer


def shard_name(key: str, index: int) -> str:
    return f"{key}-{index:04d}.npy"


class ClipShardWriter:
    """Receives (S, S, 3) frames one by one; every `stride` frames after the first `window`, a clip is complete.

    Clip c holds frames [c*stride, c*stride + window); frames after the last complete window are dropped.
    """

    def __init__(self, out_dir: str | Path, key: str, window: int, stride: int, clips_per_shard: int, size: int):
        self.out_dir = Path(out_dir)
        self.key = key
        self.window, self.stride, self.clips_per_shard = int(window), int(stride), int(clips_per_shard)
        self.frames = 0
        self.clips = 0
        self.shards: list[dict[str, int | str]] = []
        self._ring = np.empty((self.window, size, size, 3), np.uint8)
        self._pending = 0
        self._shard = _buffer((self.clips_per_shard, self.window, size, size, 3))

    def add(self, frame: np.ndarray) -> None:
        self._ring[self.frames % self.window] = frame
        self.frames += 1
        start = self.frames - self.window
        if start >= 0 and start % self.stride == 0:
            self._complete_clip()

    def _complete_clip(self) -> None:
        oldest = self.frames % self.window  # ring slot of the window's first frame
        clip = self._shard[self._pending]
        clip[: self.window - oldest] = self._ring[oldest:]
        clip[self.window - oldest :] = self._ring[:oldest]
        self._pending += 1
        self.clips += 1
        if self._pending == self.clips_per_shard:
            self._write_shard()

    def _write_shard(self) -> None:
        name = shard_name(self.key, len(self.shards))
        with atomic_path(self.out_dir / name) as tmp:
            # np.save on an open handle: given a path, it would append ".npy" to the temporary name.
            with open(tmp, "wb") as fh:
                np.save(fh, self._shard[: self._pending], allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
        self.shards.append({"file": f"{CLIPS_DIR}/{name}", "clips": self._pending})
        self._pending = 0

    def close(self) -> None:
        """Write the last, partly filled shard."""
        if self._pending:
            self._write_shard()
