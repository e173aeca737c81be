"""Seeded, resumable batch samplers over video clips and target episodes, with background prefetch.

Training reads batches through these (see docs/method.md, "Training"):
- memory stays bounded: clips are memory-mapped shards (ClipStore), episodes come through the
  EpisodeStore's small LRU cache; nothing loads a whole dataset;
- the batch of step k is a pure function of (seed, stream, k): its RNG is derived from those numbers,
  so a resumed run sees exactly the batches an uninterrupted run would have seen;
- a background thread prepares the next batches into a bounded queue (pinned host memory when the
  consumer is on CUDA), so in steady state the model does not wait on disk or decompression.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from veorl.data.clips import ClipStore
from veorl.data.episodes import INDEX_KEYS, EpisodeStore

Batch = dict[str, Any]


def step_rng(seed: int, stream: int, step: int, rank: int = 0) -> np.random.Generator:
    """RNG for one batch: independent across (seed, stream, step), reproducible from those numbers alone.
    Each rank of a multi-process run (veorl.distributed) has its own; rank 0's is a single process's."""
    entropy = [int(seed), int(stream), int(step)] + ([int(rank)] if rank else [])
    return np.random.default_rng(np.random.SeedSequence(entropy))


class EpisodeWindowSampler:
    """Windows of `seq_len` consecutive steps from target episodes; `keys` limits the arrays returned."""

    def __init__(
        self,
        store: EpisodeStore,
        batch: int,
        seq_len: int,
        seed: int,
        stream: int = 0,
        keys: tuple[str, ...] | None = None,
        rank: int = 0,
    ):
        if int(store.lengths.max()) < seq_len and not getattr(store, "absorbing", False):
            raise ValueError(
                f"target episodes are at most {int(store.lengths.max())} steps long; "
                f"sequences of seq_len={seq_len} cannot be cut (lower the seq_len parameter)"
            )
        self.store, self.batch, self.seq_len, self.seed, self.stream, self.keys = (
            store,
            batch,
            seq_len,
            seed,
            stream,
            keys,
        )
        self.rank = rank

    def __call__(self, step: int) -> Batch:
        # Window indices among the keys: where each window comes from (EpisodeStore.sample's index).
        index = self.keys is not None and any(key in self.keys for key in INDEX_KEYS)
        data = self.store.sample(self.batch, self.seq_len, step_rng(self.seed, self.stream, step, self.rank), index)
        if self.keys is not None:
            data = {k: data[k] for k in self.keys}
        return data

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "episodes",
            "seed": self.seed,
            "stream": self.stream,
            "batch": self.batch,
            "seq_len": self.seq_len,
        }


class ClipSampler:
    """Source video clips cut to `length` frames: {"image": (batch, length, S, S, 3) uint8}."""

    def __init__(self, store: ClipStore, batch: int, length: int, seed: int, stream: int = 1, rank: int = 0):
        if length > store.window:
            raise ValueError(
                f"{store.root}: clips have {store.window} frames, fewer than the {length} requested "
                f"(lower pretrain.source_len or re-ingest with a longer window)"
            )
        self.store, self.batch, self.length, self.seed, self.stream = store, batch, length, seed, stream
        self.rank = rank

    def __call__(self, step: int) -> Batch:
        rng = step_rng(self.seed, self.stream, step, self.rank)
        return {"image": self.store.sample(self.batch, self.length, rng)}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "clips", "seed": self.seed, "stream": self.stream, "batch": self.batch, "length": self.length}


class JointSampler:
    """Several named samplers drawn at the same step: {"target": {...}, "source": {...}}."""

    def __init__(self, **samplers: Callable[[int], Batch]):
        self.samplers = samplers

    def __call__(self, step: int) -> dict[str, Batch]:
        return {name: sampler(step) for name, sampler in self.samplers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.samplers.items() if hasattr(s, "state_dict")}


def _to_tensors(tree: Any, pin: bool) -> Any:
    if isinstance(tree, dict):
        return {k: _to_tensors(v, pin) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(tree))
        return tensor.pin_memory() if pin else tensor
    return tree


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=True)
    return tree


_DONE = object()


class Prefetcher:
    """Iterate (step, batch) for steps [start, stop) with batches built `depth` ahead in a thread.

    Batches arrive as torch tensors on `device`. depth=0 builds each batch inline (no thread).
    Errors raised while building a batch are re-raised in the consumer with the step number.
    """

    def __init__(
        self,
        make_batch: Callable[[int], Any],
        start: int,
        stop: int,
        depth: int = 2,
        device: str | torch.device = "cpu",
    ):
        self.make_batch, self.start, self.stop, self.depth = make_batch, start, stop, depth
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0 and stop > start:
            self._thread = threading.Thread(target=self._fill, name="veorl-prefetch", daemon=True)
            self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._halt.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        for step in range(self.start, self.stop):
            if self._halt.is_set():
                return
            try:
                item = (step, _to_tensors(self.make_batch(step), self.pin))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                self._put((step, exc))
                return
            if not self._put(item):
                return
        self._put(_DONE)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self._thread is None:
            for step in range(self.start, self.stop):
                yield step, _to_device(_to_tensors(self.make_batch(step), False), self.device)
            return
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            step, batch = item
            if isinstance(batch, BaseException):
                raise RuntimeError(f"building the batch of step {step} failed: {batch}") from batch
            yield step, _to_device(batch, self.device)

    def close(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["step_rng", "EpisodeWindowSampler", "ClipSampler", "JointSampler", "Prefetcher"]
