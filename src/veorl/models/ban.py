"""Behaviour abstraction network (BAN) and the latent-behaviour codebook.

See docs/method.md ("Networks"): z_t = W3 relu(W1 e_{t+1} + W2 e_t) for each pair
of consecutive frame embeddings, vector-quantised to the nearest of K codebook vectors with a
straight-through estimator; VQ loss = ||sg(z) - c||^2 + beta ||z - sg(c)||^2. The quantised vector
is the latent action of the transition t -> t+1.

A k-step BAN (`model.ban_horizon` = k > 1, an option beyond the release) reads e_{t+k} in place of e_{t+1}:
consecutive frames differ far less than behaviours do, and a longer look ahead shows where the transition
is heading. Near the end of a sequence the look ahead stops at the last frame, so there is still one latent
action per transition and everything downstream keeps its shapes; k = 1 is the release's BAN exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from veorl.acceleration import upcast


class BehaviourAbstraction(nn.Module):
    """BAN: embeddings (..., T, E) -> pre-quantisation latent actions (..., T-1, Z)."""

    def __init__(self, embed_dim: int, hidden: int = 128, latent_dim: int = 8, horizon: int = 1):
        super().__init__()
        if horizon < 1:
            raise ValueError(f"BAN horizon must be at least 1, got {horizon}")
        self.next_proj = nn.Linear(embed_dim, hidden)  # W1, applied to e_{t+k}
        self.this_proj = nn.Linear(embed_dim, hidden, bias=False)  # W2, applied to e_t
        self.out = nn.Linear(hidden, latent_dim)  # W3
        self.embed_dim, self.latent_dim, self.horizon = embed_dim, latent_dim, horizon

    def ahead(self, embed: torch.Tensor) -> torch.Tensor:
        """The embedding each transition t -> t+1 of a sequence (..., T, E) looks ahead to: e_{min(t+k, T-1)}."""
        if embed.shape[-2] < 2:
            raise ValueError(f"BAN needs at least two consecutive embeddings, got shape {tuple(embed.shape)}")
        if self.horizon == 1:
            return embed[..., 1:, :]
        steps = embed.shape[-2]
        index = (torch.arange(steps - 1, device=embed.device) + self.horizon).clamp_max(steps - 1)
        return embed.index_select(-2, index)

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        # Each frame's projection is computed once and shared by the transitions it takes part in.
        hidden = self.next_proj(self.ahead(embed)) + self.this_proj(embed[..., :-1, :])
        return upcast(self.out(F.relu(hidden)))  # fp32 out, also under bf16 autocast (veorl.acceleration)

    def pair(self, embed_now: torch.Tensor, embed_next: torch.Tensor) -> torch.Tensor:
        """Latent action of one explicit transition (embed_now -> embed_next)."""
        return upcast(self.out(F.relu(self.next_proj(embed_next) + self.this_proj(embed_now))))


@dataclass(frozen=True)
class CodebookStats:
    counts: torch.Tensor  # (K,) how often each code was chosen
    perplexity: float  # exp(entropy of the usage distribution): K when uniform, 1 when collapsed
    used: int  # number of codes chosen at least once


class Codebook(nn.Module):
    """K latent behaviours in R^dim, learned by the VQ loss (no EMA)."""

    def __init__(self, K: int = 50, dim: int = 8, beta: float = 1.0):
        super().__init__()
        self.K, self.dim, self.beta = K, dim, beta
        self.vectors = nn.Parameter(torch.empty(K, dim).uniform_(-1.0 / K, 1.0 / K))

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances (..., K) of each z to every code."""
        flat = upcast(z.reshape(-1, self.dim))
        # Which code is nearest is a decision, not a network: fp32 even inside a bf16 autocast region.
        with torch.autocast(device_type=flat.device.type, enabled=False):
            vectors = self.vectors
            dist = flat.square().sum(-1, keepdim=True) - 2.0 * flat @ vectors.t() + vectors.square().sum(-1)[None]
        return dist.reshape(*z.shape[:-1], self.K)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        return self.distances(z).argmin(-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.vectors)

    def nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Snap to the nearest code (no gradient to the codebook or through z): (vectors, indices)."""
        with torch.no_grad():
            idx = self.indices(z)
        return self.lookup(idx).detach(), idx

    def quantise(
        self, z: torch.Tensor, beta: float | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q with straight-through gradient to z, code indices, VQ loss averaged over valid entries)."""
        beta = self.beta if beta is None else beta
        with torch.no_grad():
            idx = self.indices(z)
        codes = self.lookup(idx)
        codebook_term = (codes - z.detach()).square()
        commitment_term = (z - codes.detach()).square()
        # squared L2 norms (summed over the latent dimensions), as the method defines the VQ loss
        per_entry = (codebook_term + beta * commitment_term).sum(-1)
        if mask is None:
            vq_loss = per_entry.mean()
        else:
            weight = mask.to(per_entry.dtype)
            vq_loss = (per_entry * weight).sum() / weight.sum().clamp_min(1.0)
        z_q = z + (codes - z).detach()
        return z_q, idx, vq_loss

    @torch.no_grad()
    def restart_dead(self, counts: torch.Tensor, candidates: torch.Tensor, noise: float = 1e-3) -> int:
        """Move every code with a zero count onto a randomly chosen row of `candidates` (current BAN outputs).

        A code no transition picks gets no gradient from the VQ loss, so once dead it stays dead and the
        codebook shrinks to a few latent behaviours; restarting it on live data gives it transitions to win.
        The small noise keeps two codes restarted on the same row apart. Returns the number restarted.
        """
        dead = (counts.reshape(-1) <= 0).nonzero().flatten()
        flat = candidates.reshape(-1, self.dim)
        if dead.numel() == 0 or flat.shape[0] == 0:
            return 0
        rows = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = flat[rows] + noise * torch.randn(dead.numel(), self.dim, device=flat.device, dtype=flat.dtype)
        self.vectors[dead.to(self.vectors.device)] = fresh.to(self.vectors.dtype)
        return int(dead.numel())

    def usage(self, indices: torch.Tensor, mask: torch.Tensor | None = None) -> CodebookStats:
        flat = indices.reshape(-1)
        if mask is not None:
            flat = flat[mask.reshape(-1).bool()]
        counts = torch.bincount(flat, minlength=self.K).to(torch.float64).cpu()
        return codebook_stats(counts)


def codebook_stats(counts: torch.Tensor) -> CodebookStats:
    total = counts.sum()
    if total <= 0:
        return CodebookStats(counts=counts, perplexity=0.0, used=0)
    probs = counts / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return CodebookStats(counts=counts, perplexity=float(entropy.exp()), used=int((counts > 0).sum()))


__all__ = ["BehaviourAbstraction", "Codebook", "CodebookStats", "codebook_stats"]
