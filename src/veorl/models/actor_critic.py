"""Actor and critic of the policy phase.

Both read the model state feature f (and, with the latent-action input, abar = quantise(F_BC(f))).
Continuous actions use a truncated normal on [-1, 1] whose location is tanh-squashed and whose std
has a floor (min_std), as in DreamerV2; it is reparameterised, so the actor can be trained by
backpropagating imagined returns through the world-model dynamics. Discrete actions use a one-hot
categorical with a straight-through sample (trained by REINFORCE with the critic as baseline).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from veorl.models.networks import MLP, Encoder

ActionKind = Literal["continuous", "discrete"]

_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / _SQRT2))


def _std_normal_pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


class TruncatedNormal:
    """Normal(loc, scale) restricted to [low, high], independent over the last axis (the action dimensions).

    Sampling is by inverse CDF, which is differentiable in loc and scale (reparameterised).
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, low: float = -1.0, high: float = 1.0, eps: float = 1e-6):
        self.loc, self.scale, self.low, self.high, self.eps = loc, scale, low, high, eps
        self._alpha = (low - loc) / scale
        self._beta = (high - loc) / scale
        self._cdf_alpha = _std_normal_cdf(self._alpha)
        self._mass = (_std_normal_cdf(self._beta) - self._cdf_alpha).clamp_min(eps)

    def rsample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        uniform = torch.rand(self.loc.shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        p = (self._cdf_alpha + uniform * self._mass).clamp(self.eps, 1.0 - self.eps)
        x = self.loc + self.scale * _SQRT2 * torch.erfinv(2.0 * p - 1.0)
        return x.clamp(self.low + self.eps, self.high - self.eps)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw without gradients; `generator` makes it reproducible without touching torch's global stream."""
        with torch.no_grad():
            return self.rsample(generator)

    def mode(self) -> torch.Tensor:
        # The density is the normal's restricted to the interval, so its peak is loc clipped into it.
        return self.loc.clamp(self.low, self.high)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        z = (value - self.loc) / self.scale
        per_dim = -0.5 * z * z - torch.log(self.scale) - 0.5 * math.log(2.0 * math.pi) - torch.log(self._mass)
        return per_dim.sum(-1)

    def entropy(self) -> torch.Tensor:
        correction = (self._alpha * _std_normal_pdf(self._alpha) - self._beta * _std_normal_pdf(self._beta)) / (
            2.0 * self._mass
        )
        per_dim = _LOG_SQRT_2PI_E + torch.log(self.scale) + torch.log(self._mass) + correction
        return per_dim.sum(-1)


class OneHotCategorical:
    """Categorical over action indices, sampled as one-hot vectors with straight-through gradients."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self._dist = torch.distributions.Categorical(logits=logits)

    def rsample(self) -> torch.Tensor:
        index = self._dist.sample()
        one_hot = F.one_hot(index, self.logits.shape[-1]).to(self.logits.dtype)
        probs = self._dist.probs
        return one_hot + probs - probs.detach()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A one-hot draw without gradients; `generator` makes it reproducible without touching torch's global
        stream."""
        with torch.no_grad():
            if generator is None:
                index = self._dist.sample()
            else:
                probs = self._dist.probs.reshape(-1, self.logits.shape[-1]).float()
                index = torch.multinomial(probs, 1, generator=generator).reshape(self.logits.shape[:-1])
            return F.one_hot(index, self.logits.shape[-1]).to(self.logits.dtype)

    def mode(self) -> torch.Tensor:
        return F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).to(self.logits.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._dist.log_prob(value.argmax(-1))

    def entropy(self) -> torch.Tensor:
        return self._dist.entropy()


class Actor(nn.Module):
    """pi(a | f [, abar]): an ELU MLP producing a truncated normal (continuous) or a one-hot categorical (discrete)."""

    def __init__(
        self,
        input_dim: int,
        action_dim: int,
        units: int,
        layers: int,
        kind: ActionKind = "continuous",
        min_std: float = 0.1,
    ):
        super().__init__()
        if kind not in ("continuous", "discrete"):
            raise ValueError(f"Actor: kind must be 'continuous' or 'discrete', got {kind!r}")
        self.input_dim, self.action_dim, self.kind, self.min_std = input_dim, action_dim, kind, min_std
        self.net = MLP(input_dim, 2 * action_dim if kind == "continuous" else action_dim, units, layers)

    def forward(self, inputs: torch.Tensor) -> TruncatedNormal | OneHotCategorical:
        if inputs.shape[-1] != self.input_dim:
            raise ValueError(f"Actor expects inputs with {self.input_dim} features, got {tuple(inputs.shape)}")
        out = self.net(inputs)
        if self.kind == "discrete":
            return OneHotCategorical(out)
        raw_loc, raw_std = out.chunk(2, -1)
        # The std floor keeps exploration and gradients alive; 2*sigmoid(x/2) starts near 1 and stays bounded.
        scale = 2.0 * torch.sigmoid(raw_std / 2.0) + self.min_std
        return TruncatedNormal(torch.tanh(raw_loc), scale)


class Critic(nn.Module):
    """V(f [, abar]): the mean of a unit-variance Gaussian over the lambda-return."""

    def __init__(self, input_dim: int, units: int, layers: int):
        super().__init__()
        self.input_dim = input_dim
        self.net = MLP(input_dim, 1, units, layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[-1] != self.input_dim:
            raise ValueError(f"Critic expects inputs with {self.input_dim} features, got {tuple(inputs.shape)}")
        return self.net(inputs).squeeze(-1)

    @staticmethod
    def nll(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element negative log-likelihood of `target` under Normal(value, 1), constant dropped."""
        return 0.5 * (value - target) ** 2


def policy_inputs(feature: torch.Tensor, latent_action: torch.Tensor | None) -> torch.Tensor:
    """The actor/critic input: [f, abar] with the latent-action input, f alone without it."""
    return feature if latent_action is None else torch.cat([feature, latent_action], -1)


class PixelPolicy(nn.Module):
    """The behaviour-cloning baseline: conv encoder + MLP from one frame to an action.

    The head outputs a tanh-squashed mean and a log-std; acting uses the mean, training uses either
    the mean (MSE) or both (Gaussian NLL on the dataset action). For one-hot actions the raw mean serves as the
    logits of a categorical (cross-entropy); the environment plays the argmax, which tanh leaves unchanged.
    """

    def __init__(self, cnn_depth: int, action_dim: int, units: int, layers: int):
        super().__init__()
        self.encoder = Encoder(cnn_depth)
        self.action_dim = action_dim
        self.head = MLP(self.encoder.output_dim, 2 * action_dim, units, layers)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean in [-1, 1], log-std clamped to [-5, 2]) of the action for each frame."""
        return self.squash(*self.raw(image))

    @staticmethod
    def squash(raw_mean: torch.Tensor, raw_log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's raw outputs as (mean in [-1, 1], log-std clamped to [-5, 2])."""
        return torch.tanh(raw_mean), raw_log_std.clamp(-5.0, 2.0)

    def raw(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's outputs before squashing and clamping: (raw mean, raw log-std)."""
        raw_mean, raw_log_std = self.head(self.encoder(image)).chunk(2, -1)
        return raw_mean, raw_log_std
