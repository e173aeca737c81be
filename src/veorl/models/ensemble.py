"""An ensemble of Trunk Net prior heads, whose disagreement measures how far imagination strays from the data.

Offline, the actor is trained on the world model's imagination; away from the target data the model's
predictions are guesses and the actor learns to exploit them (a constant corner action whose imagined reward is
several times what the simulator pays). Following Offline DreamerV2 (the V-D4RL benchmark), N extra prior
heads predict the next stochastic state from the same deterministic state h_t as the Trunk Net's own prior.
Each is trained on target data to match the posterior (the prior side of the KL, posterior detached), from its
own random initialisation, so they agree where data was seen and drift apart elsewhere. In imagination the
reward becomes r - lambda * u, with u the spread of the heads' predictions (see `disagreement`).

The heads read h detached: they measure the Trunk Net, they do not shape it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from veorl.acceleration import upcast
from veorl.models.rssm import RSSM, RSSMState


class _Sqrt(torch.autograd.Function):
    """sqrt whose gradient is 0 where the result is 0, as torch.std's is (not the inf of d sqrt(x)/dx at 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        root = x.sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        return (grad / (2.0 * root)).masked_fill_(root == 0, 0.0)


def spread(predictions: torch.Tensor) -> torch.Tensor:
    """The population standard deviation over dim 0 (the heads), as `std(0, unbiased=False)` computes it, in two
    passes (mean, then mean squared deviation). On a CPU, PyTorch's own std over a short leading dim of a large
    tensor is several times slower: at the paper's sizes it was the fifth operator of the phase-3 update by self CPU
    time (benchmarks/profile-phase3-bf16.txt, benchmarks/results_world_model.md). Where every head predicts the same
    value (bf16 predictions can agree exactly) the gradient is 0, as torch.std's is, not the 0 x inf = NaN of a
    plain sqrt."""
    deviation = predictions - predictions.mean(0)
    return _Sqrt.apply(deviation.square().mean(0))


class PriorEnsemble(nn.Module):
    """N prior heads h -> statistics of s (Gaussian mean/std or categorical logits), shaped like the RSSM's own."""

    def __init__(self, rssm: RSSM, size: int, hidden: int | None = None):
        super().__init__()
        if size < 2:
            raise ValueError(f"a prior ensemble needs at least 2 heads to disagree, got {size}")
        self.kind, self.stoch_vars, self.classes, self.min_std = rssm.kind, rssm.stoch_vars, rssm.classes, rssm.min_std
        hidden = hidden or rssm.hidden
        stat_size = rssm.img_stats.out_features
        self.heads = nn.ModuleList(
            # In-place ELU: safe after a linear layer (see veorl.models.networks.MLP).
            nn.Sequential(nn.Linear(rssm.deter_size, hidden), nn.ELU(inplace=True), nn.Linear(hidden, stat_size))
            for _ in range(size)
        )

    @property
    def size(self) -> int:
        return len(self.heads)

    def _stats(self, deter: torch.Tensor, outputs: int | None = None) -> torch.Tensor:
        """(N, ..., stat) raw statistics of every head; only the first `outputs` of each when given (its output layer
        then computes just those rows)."""
        rows = deter.reshape(-1, deter.shape[-1])  # a matrix, so the in-place ELU is not on a view (see MLP)
        stats = torch.stack(
            [F.linear(head[1](head[0](rows)), head[2].weight[:outputs], head[2].bias[:outputs]) for head in self.heads]
        )
        return upcast(stats).reshape(self.size, *deter.shape[:-1], stats.shape[-1])  # fp32 out under bf16 autocast

    def predictions(self, deter: torch.Tensor) -> torch.Tensor:
        """What each head expects s to be: the Gaussian mean, or the class probabilities (flattened): (N, ..., S)."""
        if self.kind == "gaussian":
            # Only the means (the raw stds would be computed, cut off and given zero gradients).
            return self._stats(deter, outputs=self.heads[0][-1].out_features // 2)
        stats = self._stats(deter)
        logits = stats.reshape(*stats.shape[:-1], self.stoch_vars, self.classes)
        return torch.softmax(logits, -1).flatten(-2)

    def disagreement(self, deter: torch.Tensor) -> torch.Tensor:
        """u(h): the standard deviation across heads of their predictions, averaged over the state's dimensions."""
        return spread(self.predictions(deter)).mean(-1)

    def loss(self, posterior: RSSMState) -> torch.Tensor:
        """Mean over heads of KL(sg(posterior) || head prior), each head fitted to the data like the Trunk Net prior."""
        deter = posterior.deter.detach()
        stats = self._stats(deter)
        if self.kind == "gaussian":
            mean, raw_std = stats.chunk(2, -1)
            std = 2.0 * torch.sigmoid(raw_std / 2.0) + self.min_std
            target = torch.distributions.Normal(posterior.mean.detach(), posterior.std.detach())
            kl = torch.distributions.kl_divergence(target, torch.distributions.Normal(mean, std)).sum(-1)
        else:
            logits = stats.reshape(*stats.shape[:-1], self.stoch_vars, self.classes)
            target_log = F.log_softmax(posterior.logits.detach(), -1)
            kl = (target_log.exp() * (target_log - F.log_softmax(logits, -1))).sum((-2, -1))
        return kl.mean()


__all__ = ["PriorEnsemble", "spread"]
