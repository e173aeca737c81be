"""Reading ingested video clips.

Layout written by `components.ingest` (see veorl.video.ingest):
  <out>/manifest.json        {"version": 1, "size": S, "window": L, "sources": [...], ...}
  <out>/clips/<key>-<k>.npy  uint8 array (N, L, S, S, 3); each source writes its own shards

Shards are opened with numpy memory mapping, so sampling touches only the clips it returns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from veorl.storage import (
    PROVENANCE,
    read_json,
    recorded_content_hash,
    sha256_file,
    tree_hash,
)

MANIFEST = "manifest.json"


def clips_hash(root: str | Path, recorded: bool = True) -> str:
    """Content hash of ingested clips: the one components.ingest recorded in provenance.json, else the hash of
    their manifest (which lists every shard with its content hash), else of every file.

    The ingest step records exactly this value (computed with recorded=False), so every reader of the clips,
    whether it looks at the record or at the files, names them by the same hash.
    """
    if recorded:
        hashed = recorded_content_hash(root)
        if hashed:
            return hashed
    manifest = Path(root) / MANIFEST
    return sha256_file(manifest) if manifest.is_file() else tree_hash(root, exclude=(PROVENANCE,))


class ClipStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} not found: run components.ingest first")
        self.manifest = read_json(manifest_path)
        self.window = int(self.manifest["window"])
        self.size = int(self.manifest["size"])
        shards: list[tuple[Path, int]] = []
        for src in self.manifest["sources"]:
            if src.get("status") != "ok":
                continue
            for shard in src.get("shards", []):
                shards.append((self.root / shard["file"], int(shard["clips"])))
        if not shards:
            raise ValueError(f"{manifest_path}: no ingested clips (every source failed or produced no clip)")
        self.shard_paths = [p for p, _ in shards]
        self.counts = np.array([n for _, n in shards], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.counts.sum())

    def _shard(self, i: int) -> np.ndarray:
        arr = self._maps.get(i)
        if arr is None:
            arr = np.load(self.shard_paths[i], mmap_mode="r")
            self._maps[i] = arr
        return arr

    def clip(self, index: int) -> np.ndarray:
        offsets = np.cumsum(self.counts)
        shard = int(np.searchsorted(offsets, index, side="right"))
        within = index - (int(offsets[shard - 1]) if shard else 0)
        return np.asarray(self._shard(shard)[within])

    def sample(self, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """(batch, length, S, S, 3) uint8: random clips, each cut at a random offset to `length` frames."""
        if length > self.window:
            raise ValueError(f"requested clips of {length} frames but ingested windows have {self.window}")
        shard_idx = rng.choice(len(self.counts), size=batch, p=self.counts / self.counts.sum())
        out = np.empty((batch, length, self.size, self.size, 3), np.uint8)
        for b, s in enumerate(shard_idx):
            arr = self._shard(int(s))
            c = int(rng.integers(0, arr.shape[0]))
            start = int(rng.integers(0, self.window - length + 1))
            out[b] = arr[c, start : start + length]
        return out
