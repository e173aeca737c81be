"""Offline episodes: the on-disk format (compatible with the authors' release), validation and a store.

One episode per `.npz` file under `<dataset>/episodes/`, named `<index:06d>-<length>.npz`, with arrays
  image    (T, H, W, 3) uint8
  action   (T, A)       float32 in [-1, 1]; index 0 holds a zero action (t holds the obs reached by action t)
  reward   (T,)         float32
  discount (T,)         float32 in [0, 1]
  success  (T,)         bool     (optional in imported files; missing = all False)
  is_terminal (T,)      bool     (optional)
The release's DreamerV2-style episode files (image/action/reward/discount[/success]) load as they are.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from veorl.storage import (
    PROVENANCE,
    atomic_write_bytes,
    recorded_content_hash,
    sha256_file,
    tree_hash,
)

REQUIRED_KEYS = ("image", "action", "reward", "discount")
OPTIONAL_BOOL_KEYS = ("success", "is_terminal", "is_first")
EPISODE_DIR = "episodes"
CARD = "card.json"  # the dataset card written by components.collect
# What EpisodeStore.sample(index=True) adds to a batch: each window's episode and first step (phase 3's start batches
# carry them instead of images when it reads embeddings from veorl.algo.embedding_cache).
INDEX_KEYS: tuple[str, str] = ("episode", "start")
_NAME = re.compile(r"^(\d+)-(\d+)\.npz$")


def dataset_hash(dataset: str | Path, recorded: bool = True) -> str:
    """Content hash of an episode dataset: the one components.collect recorded in provenance.json, else the hash
    of its card (which records every episode), else of every file.

    The collect step records exactly this value (computed with recorded=False), so every reader of the dataset
    names it by the same hash.
    """
    if recorded:
        hashed = recorded_content_hash(dataset)
        if hashed:
            return hashed
    card = Path(dataset) / CARD
    return sha256_file(card) if card.is_file() else tree_hash(dataset, exclude=(PROVENANCE,))


class EpisodeError(ValueError):
    """An episode file is malformed; the message starts with the file name."""


def validate_episode(
    ep: dict[str, np.ndarray], name: str = "<episode>", image_size: int | None = None, action_dim: int | None = None
) -> dict[str, np.ndarray]:
    """Check keys, shapes, dtypes and value ranges; return the episode with optional keys filled in."""

    def fail(reason: str) -> None:
        raise EpisodeError(f"{name}: {reason}")

    missing = [k for k in REQUIRED_KEYS if k not in ep]
    if missing:
        fail(f"missing keys {missing} (has {sorted(ep)})")
    image, action, reward, discount = (np.asarray(ep[k]) for k in REQUIRED_KEYS)
    if image.ndim != 4 or image.shape[-1] != 3:
        fail(f"image must be (T, H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        fail(f"image must be uint8, got {image.dtype}")
    T = image.shape[0]
    if T < 2:
        fail(f"episode has {T} steps; at least 2 are needed")
    if image_size is not None and image.shape[1:3] != (image_size, image_size):
        fail(f"image frames are {image.shape[1]}x{image.shape[2]}, expected {image_size}x{image_size}")
    if action.ndim != 2 or action.shape[0] != T:
        fail(f"action must be (T={T}, A), got shape {action.shape}")
    if action_dim is not None and action.shape[1] != action_dim:
        fail(f"action has {action.shape[1]} dimensions, expected {action_dim}")
    if not np.issubdtype(action.dtype, np.floating):
        fail(f"action must be float, got {action.dtype}")
    if not np.all(np.isfinite(action)):
        fail("action contains NaN or inf")
    if np.abs(action).max(initial=0.0) > 1.0 + 1e-5:
        fail(f"action values must lie in [-1, 1], found {float(np.abs(action).max()):.3f}")
    for key, arr in (("reward", reward), ("discount", discount)):
        if arr.shape != (T,):
            fail(f"{key} must be (T={T},), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            fail(f"{key} contains NaN or inf")
    if discount.min() < 0 or discount.max() > 1:
        fail(f"discount must lie in [0, 1], found [{discount.min():.3f}, {discount.max():.3f}]")
    out = {
        "image": image,
        "action": action.astype(np.float32, copy=False),
        "reward": reward.astype(np.float32, copy=False),
        "discount": discount.astype(np.float32, copy=False),
    }
    for key in OPTIONAL_BOOL_KEYS:
        if key in ep:
            arr = np.asarray(ep[key])
            if arr.shape != (T,):
                fail(f"{key} must be (T={T},), got shape {arr.shape}")
            out[key] = arr.astype(bool)
        elif key == "success":
            out[key] = np.zeros(T, bool)
    return out


def save_episode(directory: str | Path, index: int, ep: dict[str, np.ndarray]) -> Path:
    """Validate and write one episode atomically; returns its path."""
    ep = validate_episode(ep, name=f"episode {index}")
    T = len(ep["image"])
    final = Path(directory) / f"{index:06d}-{T}.npz"
    buf = io.BytesIO()
    np.savez_compressed(buf, **ep)
    atomic_write_bytes(final, buf.getvalue())
    return final


def load_episode(
    path: str | Path, image_size: int | None = None, action_dim: int | None = None
) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            ep = {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise EpisodeError(f"{path.name}: not a readable .npz file ({exc})") from None
    return validate_episode(ep, name=path.name, image_size=image_size, action_dim=action_dim)


def episode_files(dataset: str | Path) -> list[Path]:
    """Episode files of a dataset directory (its `episodes/` folder, or the folder itself)."""
    root = Path(dataset)
    folder = root / EPISODE_DIR if (root / EPISODE_DIR).is_dir() else root
    return sorted(p for p in folder.glob("*.npz") if not p.name.startswith("."))


def episode_length(path: Path) -> int:
    """Length from the file name when it follows our scheme (cheap), else by reading the file."""
    m = _NAME.match(path.name)
    if m:
        return int(m.group(2))
    m = re.search(r"-(\d+)\.npz$", path.name)  # release names: <timestamp>-<uuid>-<length>.npz
    if m:
        return int(m.group(1))
    with np.load(path) as data:
        return int(data["reward"].shape[0])


@dataclass
class ImportReport:
    accepted: list[str]
    rejected: list[tuple[str, str]]


def import_episodes(
    src: str | Path,
    dest: str | Path,
    image_size: int | None = None,
    action_dim: int | None = None,
    start_index: int = 0,
) -> ImportReport:
    """Validate existing episode files (e.g. the authors' release) and copy the good ones into `dest`.

    Bad files are rejected with their name and the reason; good ones are rewritten in our naming scheme.
    """
    accepted: list[str] = []
    rejected: list[tuple[str, str]] = []
    out = Path(dest) / EPISODE_DIR
    index = start_index
    for path in sorted(Path(src).rglob("*.npz")):
        try:
            ep = load_episode(path, image_size=image_size, action_dim=action_dim)
        except EpisodeError as exc:
            rejected.append((path.name, str(exc).split(": ", 1)[-1]))
            continue
        save_episode(out, index, ep)
        accepted.append(path.name)
        index += 1
    return ImportReport(accepted, rejected)


def pad_absorbing(ep: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """`ep` extended to `length` steps by absorbing steps after its end: the last frame again, a zero action, zero
    reward, discount 0 (the episode has ended: nothing after it counts), no success, terminal."""
    missing = length - len(ep["reward"])
    if missing <= 0:
        return ep
    fill = {
        "image": np.repeat(ep["image"][-1:], missing, 0),
        "action": np.zeros((missing, *ep["action"].shape[1:]), ep["action"].dtype),
        "reward": np.zeros(missing, ep["reward"].dtype),
        "discount": np.zeros(missing, ep["discount"].dtype),
        "success": np.zeros(missing, bool),
        "is_terminal": np.ones(missing, bool),
        "is_first": np.zeros(missing, bool),
    }
    return {k: np.concatenate([v, fill[k]]) if k in fill else v for k, v in ep.items()}


class EpisodeStore:
    """Random access to a folder of episodes with a bounded in-memory LRU cache (never the whole dataset).

    With `absorbing`, an episode shorter than the window is not skipped: it is sampled as one window from its start,
    padded with absorbing steps (`pad_absorbing`). Collection cuts an episode short only at a true terminal (a
    game's success or death, a collision), so the padding says what a terminal means: nothing more happens. The
    game domain needs it (its successful episodes end after a few steps); without it, sampling is as it always was.
    """

    def __init__(
        self, dataset: str | Path, cache_episodes: int = 32, image_size: int | None = None, absorbing: bool = False
    ):
        self.files = episode_files(dataset)
        if not self.files:
            raise FileNotFoundError(f"no episode files (*.npz) under {dataset}")
        self.lengths = np.array([episode_length(p) for p in self.files], dtype=np.int64)
        self.cache_episodes = max(1, cache_episodes)
        self.image_size = image_size
        self.absorbing = bool(absorbing)
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def total_steps(self) -> int:
        return int(self.lengths.sum())

    def episode(self, i: int) -> dict[str, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        ep = load_episode(self.files[i], image_size=self.image_size)
        self._cache[i] = ep
        if len(self._cache) > self.cache_episodes:
            self._cache.popitem(last=False)
        return ep

    def sample(self, batch: int, seq_len: int, rng: np.random.Generator, index: bool = False) -> dict[str, np.ndarray]:
        """`batch` windows of `seq_len` consecutive steps, episodes chosen proportionally to their usable length.

        index=True adds where each window comes from (INDEX_KEYS): "episode" (its episode's index) and "start" (its
        first step), int64 arrays of shape (batch,). The draws are the same either way."""
        usable = np.maximum(self.lengths - seq_len + 1, 1 if self.absorbing else 0)
        if usable.sum() == 0:
            raise ValueError(f"no episode is at least seq_len={seq_len} steps long (longest: {self.lengths.max()})")
        eps = rng.choice(len(self.files), size=batch, p=usable / usable.sum())
        out: dict[str, list[np.ndarray]] = {}
        starts = []
        for i in eps:
            ep = self.episode(int(i))
            if self.absorbing and len(ep["reward"]) < seq_len:
                ep = pad_absorbing(ep, seq_len)
            start = int(rng.integers(0, len(ep["reward"]) - seq_len + 1))
            starts.append(start)
            for key, arr in ep.items():
                out.setdefault(key, []).append(arr[start : start + seq_len])
        windows = {k: np.stack(v) for k, v in out.items()}
        if index:
            episode_key, start_key = INDEX_KEYS
            windows[episode_key] = eps.astype(np.int64)
            windows[start_key] = np.asarray(starts, dtype=np.int64)
        return windows
