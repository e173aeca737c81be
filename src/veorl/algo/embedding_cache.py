"""Phase 3's encoder embeddings of the target frames, computed once instead of at every update.

Phase 3 trains the actor and critic on a frozen Trunk Net, so its encoder maps a given target frame to the same
embedding at every update. The release encodes the 50 x 50 frames of each start batch afresh: at the paper's sizes
that is about a tenth of a phase-3 update on a CPU (benchmarks/results_world_model.md). With the cache, every frame
of the target data is encoded once, in chunks, the first time the phase needs it (and again after its weights are
loaded from a checkpoint). A start batch then carries each window's episode and first step (`INDEX_KEYS`) instead of
its images, and reads its embeddings from the table.

The mathematics is the same: the encoder is the same network, with the same weights and precision; only the batch
it runs in differs. The table is kept in the precision the encoder computes in. Under bf16 autocast the encoder's
output is the fp32 image of bf16 values, so a bf16 table holds it exactly, at 2 bytes a number. The absorbing steps
padded after a short episode's end repeat its last frame (veorl.data.episodes.pad_absorbing), so their embedding is
that frame's.

`finetune.embedding_cache_gb` bounds the table. When the target data would need more, phase 3 encodes every batch,
as the release does (`fits`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from veorl.acceleration import autocast, module_device
from veorl.data.episodes import INDEX_KEYS, EpisodeStore

log = logging.getLogger(__name__)

GIB = 2**30


def table_bytes(store: EpisodeStore, embed_dim: int, precision: str) -> int:
    """Bytes of the table of every target frame's embedding (bf16: 2 a number, fp32: 4)."""
    return store.total_steps * embed_dim * (2 if precision == "bf16" else 4)


def fits(store: EpisodeStore, embed_dim: int, precision: str, budget_gb: float) -> bool:
    """Whether the table fits `budget_gb` GiB (0: the cache is off)."""
    return budget_gb > 0 and table_bytes(store, embed_dim, precision) <= budget_gb * GIB


def for_store(store: EpisodeStore, encoder: nn.Module, precision: str, budget_gb: float) -> EmbeddingCache | None:
    """The cache phase 3 reads `store`'s embeddings from, or None (every batch is encoded) when it is off or the
    table would not fit `budget_gb` (said in the log). Nothing is encoded until the first read."""
    if fits(store, encoder.output_dim, precision, budget_gb):
        return EmbeddingCache(store, encoder, precision)
    if budget_gb > 0:
        log.info(
            "phase 3: the target frames' embeddings would take %.2f GiB, over embedding_cache_gb=%s: every start "
            "batch is encoded",
            table_bytes(store, encoder.output_dim, precision) / GIB,
            budget_gb,
        )
    return None


def frame_keys(cache: EmbeddingCache | None) -> tuple[str, ...]:
    """What a start batch carries of its frames: window indices into `cache`, or the images themselves."""
    return INDEX_KEYS if cache is not None else ("image",)


class EmbeddingCache:
    """The frozen encoder's embedding of every frame of `store`: built on first use, read by window."""

    def __init__(self, store: EpisodeStore, encoder: nn.Module, precision: str, chunk: int = 512):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"the embedding cache needs a resolved precision (fp32 | bf16), got {precision!r}")
        self.store, self.encoder, self.precision, self.chunk = store, encoder, precision, max(1, chunk)
        self.table: torch.Tensor | None = None
        self.build_seconds: float | None = None
        self._offsets: torch.Tensor | None = None  # row of each episode's first frame
        self._frames: torch.Tensor | None = None  # frames of each episode

    def invalidate(self) -> None:
        """Forget the table (the encoder's weights changed): the next read encodes the data again."""
        self.table = None

    @torch.no_grad()
    def build(self) -> torch.Tensor:
        """Encode every frame of the store, episode by episode, in chunks of `chunk` frames. Rows follow the frames
        the episodes hold, not the lengths read from their file names."""
        t0 = time.perf_counter()
        device = module_device(self.encoder)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        parts, frames = [], []
        for i in range(len(self.store)):
            images = self.store.episode(i)["image"]
            frames.append(len(images))
            for s in range(0, len(images), self.chunk):
                chunk = torch.from_numpy(np.ascontiguousarray(images[s : s + self.chunk])).to(device)
                with autocast(self.precision, device):
                    parts.append(self.encoder(chunk).to(dtype))
        table = torch.cat(parts)
        counts = torch.tensor(frames, dtype=torch.long, device=device)
        self._frames, self._offsets = counts, torch.cumsum(counts, 0) - counts
        self.table = table
        self.build_seconds = time.perf_counter() - t0
        log.info(
            "phase 3: the %d target frames encoded once in %.1f s (%.0f MiB of %s embeddings)",
            len(table),
            self.build_seconds,
            table.numel() * table.element_size() / 2**20,
            self.precision,
        )
        return table

    def windows(self, episode: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
        """(B, length, E) fp32 embeddings of the windows that begin at step `start` of episode `episode` (both (B,))."""
        table = self.table if self.table is not None else self.build()
        episode, start = episode.to(table.device).long(), start.to(table.device).long()
        steps = start[:, None] + torch.arange(length, device=table.device)[None]
        # Absorbing steps after a short episode's end repeat its last frame.
        steps = torch.minimum(steps, self._frames[episode][:, None] - 1)
        return table[self._offsets[episode][:, None] + steps].float()


__all__ = ["GIB", "INDEX_KEYS", "EmbeddingCache", "fits", "for_store", "frame_keys", "table_bytes"]
