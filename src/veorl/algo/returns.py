"""Lambda-returns and the discount weights of imagined trajectories.

Time convention (used by imagination and the policy phase): an imagined trajectory has states
s_0 .. s_H. Transition t (s_t -a_t-> s_{t+1}) earns `reward[t]` (the reward predicted on s_{t+1}),
is discounted by `discount[t]`, and lands in a state whose value is `next_value[t]` = V(s_{t+1}).
So every argument is indexed by the transition, t = 0 .. H-1, and the result R_t is the target for V(s_t).
"""

from __future__ import annotations

import torch


def lambda_return(
    reward: torch.Tensor, next_value: torch.Tensor, discount: torch.Tensor, lambda_: float
) -> torch.Tensor:
    """TD(lambda) targets, computed backwards over the leading (time) axis.

        R_{H-1} = r_{H-1} + g_{H-1} * V(s_H)
        R_t     = r_t + g_t * ((1 - lambda) * V(s_{t+1}) + lambda * R_{t+1})

    lambda = 0 gives one-step TD targets, lambda = 1 the discounted Monte-Carlo return bootstrapped by V(s_H).
    """
    if not (reward.shape == next_value.shape == discount.shape):
        raise ValueError(
            f"lambda_return: reward {tuple(reward.shape)}, next_value {tuple(next_value.shape)} and "
            f"discount {tuple(discount.shape)} must have the same shape (time first)"
        )
    if reward.shape[0] < 1:
        raise ValueError("lambda_return: the time axis is empty")
    horizon = reward.shape[0]
    returns: list[torch.Tensor] = [torch.empty(0)] * horizon
    following = next_value[-1]
    for t in reversed(range(horizon)):
        # The last transition has no later return to blend with: it bootstraps fully from V(s_H).
        blended = next_value[t] if t == horizon - 1 else (1.0 - lambda_) * next_value[t] + lambda_ * following
        following = reward[t] + discount[t] * blended
        returns[t] = following
    return torch.stack(returns, 0)


def discount_weights(discount: torch.Tensor) -> torch.Tensor:
    """Weight of each start state s_t in the losses: the probability of still being alive there, prod_{k<t} g_k.

    `discount` is indexed by transition (H, ...); the result is indexed by state s_0 .. s_{H-1} and carries no gradient.
    """
    ones = torch.ones_like(discount[:1])
    return torch.cumprod(torch.cat([ones, discount[:-1]], 0), 0).detach()


class ReturnNormaliser:
    """Scale of imagined returns for the actor: S = max(1, P95 - P5) of the lambda-returns, tracked with an EMA.

    Meta-World rewards run 0-10 per step, so raw lambda-returns reach the hundreds while the entropy bonus
    and the behaviour-cloning term are O(1): divided by S, the return term is O(1) whatever the task's reward
    scale, and small returns (S floors at 1) are not blown up into noise. Dividing by a range (not a std)
    keeps rare large returns from shrinking the common ones. The state is two floats and a flag, saved in
    checkpoints so a resumed run continues with the same scale.
    """

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ReturnNormaliser: decay must be in [0, 1), got {decay}")
        self.decay, self.low, self.high = decay, low, high
        self.lo: float | None = None
        self.hi: float | None = None

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> float:
        """Fold the percentiles of a batch of returns into the EMA; returns the scale to divide by."""
        flat = returns.detach().reshape(-1).float()
        quantiles = torch.quantile(flat, torch.tensor([self.low, self.high], device=flat.device, dtype=flat.dtype))
        lo, hi = float(quantiles[0]), float(quantiles[1])
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.decay * self.lo + (1.0 - self.decay) * lo
            self.hi = self.decay * self.hi + (1.0 - self.decay) * hi
        return self.scale

    @property
    def scale(self) -> float:
        if self.lo is None or self.hi is None:
            return 1.0
        return max(1.0, self.hi - self.lo)

    def state_dict(self) -> dict[str, float | None]:
        return {"lo": self.lo, "hi": self.hi}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.lo, self.hi = state["lo"], state["hi"]
