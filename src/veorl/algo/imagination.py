"""Phase 3 imagination with model-based behaviour guidance.

From a batch of Trunk Net start states, roll H steps forward in the (frozen) Trunk Net:

    f_t      = [s_t, h_t]                          Trunk Net feature
    abar_t   = nearest codebook vector to F_BC(f_t)   the latent behaviour the video policy would take
    fbar_t+1 = Plan Net prediction from (s_t, abar_t) where the video model says that behaviour leads
    a_t      ~ actor([f_t, abar_t])                   ([f_t] alone without the latent-action input)
    s_t+1    = Trunk Net prior step from (s_t, a_t)
    intrinsic_t = -|| c(s_t) - fbar_t ||_2             (0 at t = 0, where nothing was predicted)

What is compared (c and fbar live in one space):
- guidance="aligned": a learned map M sends a Trunk Net feature to a Plan Net state (trained so that M(f)
  matches the Plan Net posterior on the same target frames). The Plan Net steps from M(f_t) with abar_t;
  fbar_t+1 is the Plan Net feature [s, h] of that prediction and c(s_t+1) is the Plan Net feature of
  M(f_t+1). Both are Plan Net features, so the distance is measured where the Plan Net's predictions live.
- guidance="release" (the authors' behaviour): the Plan Net steps directly from the Trunk Net state and
  fbar_t+1 is compared with the Trunk Net feature f_t+1 itself, although nothing aligns the two spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from veorl.models.actor_critic import Actor, policy_inputs
from veorl.models.ban import Codebook
from veorl.models.networks import FBC, MLP
from veorl.models.rssm import RSSM, RSSMState

GuidanceMode = Literal["aligned", "release"]


class PlanStateMap(nn.Module):
    """M: Trunk Net feature -> Plan Net state (deterministic part and the stochastic part's mean/probabilities)."""

    def __init__(self, trunk_feat_dim: int, plan_net: RSSM, units: int, layers: int = 2):
        super().__init__()
        self.kind = plan_net.kind
        self.deter_size, self.stoch_size = plan_net.deter_size, plan_net.stoch_size
        self.stoch_vars, self.classes = plan_net.stoch_vars, plan_net.classes
        self.net = MLP(trunk_feat_dim, self.deter_size + self.stoch_size, units, layers)

    def forward(self, trunk_feature: torch.Tensor) -> RSSMState:
        out = self.net(trunk_feature)
        raw_deter, raw_stoch = out.split([self.deter_size, self.stoch_size], -1)
        # The layer-normed GRU keeps h inside (-1, 1); tanh keeps the mapped state in the Plan Net's range.
        deter = torch.tanh(raw_deter)
        if self.kind == "gaussian":
            return RSSMState(deter=deter, stoch=raw_stoch, mean=raw_stoch)
        logits = raw_stoch.reshape(*raw_stoch.shape[:-1], self.stoch_vars, self.classes)
        return RSSMState(deter=deter, stoch=torch.softmax(logits, -1).flatten(-2), logits=logits)

    def loss(self, trunk_feature: torch.Tensor, target: RSSMState) -> torch.Tensor:
        """How far M(f) is from the Plan Net posterior `target` (MSE on h; MSE on the mean or CE on the classes of
        s)."""
        mapped = self(trunk_feature)
        deter_term = (mapped.deter - target.deter).square().sum(-1)
        if self.kind == "gaussian":
            stoch_term = (mapped.mean - target.mean).square().sum(-1)
        else:
            target_probs = torch.softmax(target.logits, -1)
            stoch_term = -(target_probs * F.log_softmax(mapped.logits, -1)).sum((-2, -1))
        return (deter_term + stoch_term).mean()


class BehaviourGuidance(nn.Module):
    """F_BC + codebook (latent behaviours) and the Plan Net stepping used for the intrinsic reward."""

    def __init__(
        self,
        fbc: FBC,
        codebook: Codebook,
        plan_net: RSSM | None,
        mode: GuidanceMode,
        state_map: PlanStateMap | None = None,
    ):
        super().__init__()
        if mode not in ("aligned", "release"):
            raise ValueError(f"guidance mode must be 'aligned' or 'release', got {mode!r}")
        if mode == "aligned" and plan_net is not None and state_map is None:
            raise ValueError("aligned guidance steps the Plan Net from mapped states: a PlanStateMap is required")
        self.fbc, self.codebook, self.plan_net, self.mode, self.state_map = fbc, codebook, plan_net, mode, state_map

    def latent_action(self, feature: torch.Tensor) -> torch.Tensor:
        """abar = quantise(F_BC(f)): the nearest codebook vector (a discrete choice: no gradient)."""
        codes, _ = self.codebook.nearest(self.fbc(feature))
        return codes

    def plan_state(self, state: RSSMState, feature: torch.Tensor) -> RSSMState:
        """The Plan Net state a Trunk Net state stands for: M(f) (aligned), or the state itself (release)."""
        if self.mode == "aligned":
            return self.state_map(feature)
        return state

    def comparable(self, state: RSSMState, feature: torch.Tensor, plan_state: RSSMState | None = None) -> torch.Tensor:
        """The representation of a Trunk Net state that Plan Net predictions are compared with. `plan_state`: this
        state's `plan_state`, when the caller has it already (imagination maps each state once)."""
        if self.mode == "aligned":
            return self.plan_net.feature(plan_state if plan_state is not None else self.state_map(feature))
        return feature

    def predict_next(
        self,
        state: RSSMState,
        feature: torch.Tensor,
        latent_action: torch.Tensor,
        plan_state: RSSMState | None = None,
    ) -> torch.Tensor:
        """fbar_{t+1}: the Plan Net feature after behaviour `latent_action` from (the image of) state s_t
        (`plan_state` as in `comparable`)."""
        if self.plan_net is None:
            raise ValueError("this guidance has no Plan Net: the intrinsic reward is unavailable")
        start = plan_state if plan_state is not None else self.plan_state(state, feature)
        predicted = self.plan_net.img_step(start, latent_action, sample=False)
        return self.plan_net.feature(predicted)


def check_release_compatible(trunk_net: RSSM, plan_net: RSSM) -> None:
    """The release steps the Plan Net on Trunk Net states: that needs identical state shapes."""
    if (trunk_net.deter_size, trunk_net.stoch_size, trunk_net.kind) != (
        plan_net.deter_size,
        plan_net.stoch_size,
        plan_net.kind,
    ):
        raise ValueError(
            f"guidance=release steps the Plan Net from Trunk Net states, but their states differ: "
            f"trunk (deter {trunk_net.deter_size}, stoch {trunk_net.stoch_size}, {trunk_net.kind}) vs "
            f"plan (deter {plan_net.deter_size}, stoch {plan_net.stoch_size}, {plan_net.kind})"
        )


def intrinsic_reward(current: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """-|| current - predicted ||_2 over the last axis: 0 when the state is where the video model predicted."""
    if current.shape != predicted.shape:
        raise ValueError(
            f"intrinsic reward compares tensors of one shape, got {tuple(current.shape)} and {tuple(predicted.shape)}"
        )
    return -torch.linalg.vector_norm(current - predicted, dim=-1)


@dataclass
class Imagination:
    """An imagined batch: states/features indexed t = 0..H, actions and their statistics t = 0..H-1."""

    states: RSSMState  # (H+1, N, ...)
    features: torch.Tensor  # (H+1, N, F)
    latent_actions: torch.Tensor | None  # (H+1, N, Z); None without guidance
    actions: torch.Tensor  # (H, N, A)
    log_probs: torch.Tensor  # (H, N)
    entropies: torch.Tensor  # (H, N)
    intrinsic: torch.Tensor  # (H+1, N); zeros at t = 0 and when the intrinsic reward is off

    def policy_inputs(self, use_latent_action: bool) -> torch.Tensor:
        """Actor/critic inputs per state, detached from the rollout: (H+1, N, F [+ Z])."""
        latent = self.latent_actions if use_latent_action else None
        return policy_inputs(self.features, latent).detach()


def imagine(
    trunk_net: RSSM,
    start: RSSMState,
    actor: Actor,
    horizon: int,
    guidance: BehaviourGuidance | None = None,
    use_latent_action: bool = True,
    use_intrinsic: bool = True,
    dynamics_gradient: bool = True,
) -> Imagination:
    """Roll `horizon` steps of the Trunk Net prior under the actor from `start` (N states).

    dynamics_gradient=True keeps the graph from each action through the later states, so returns can be
    backpropagated into the actor (continuous actions); False samples without that graph (REINFORCE).
    The world model's parameters are expected to be frozen by the caller; gradients still flow through
    its computations into the actions. Actor inputs are detached (DreamerV2): the actor is credited only
    through the consequences of its actions, not by moving its own input features.
    """
    if horizon < 1:
        raise ValueError(f"imagination horizon must be >= 1, got {horizon}")
    if (use_latent_action or use_intrinsic) and guidance is None:
        raise ValueError(
            "the latent-action input and the intrinsic reward need behaviour guidance (F_BC, codebook, Plan Net)"
        )
    if start.deter.dim() != 2:
        raise ValueError(f"start states must be flat (N, ...), got deter of shape {tuple(start.deter.shape)}")
    state = start if dynamics_gradient else start.detach()
    states, features, latents, actions, log_probs, entropies, intrinsic = [], [], [], [], [], [], []
    predicted: torch.Tensor | None = None
    for t in range(horizon + 1):
        feature = trunk_net.feature(state)
        latent = guidance.latent_action(feature.detach()) if guidance is not None else None
        # M(f_t) once per state: the intrinsic reward at t compares it, the prediction for t+1 steps from it.
        plan = guidance.plan_state(state, feature) if use_intrinsic else None
        if use_intrinsic and predicted is not None:
            intrinsic.append(intrinsic_reward(guidance.comparable(state, feature, plan), predicted))
        else:
            intrinsic.append(torch.zeros(feature.shape[0], device=feature.device, dtype=feature.dtype))
        states.append(state)
        features.append(feature)
        latents.append(latent)
        if t == horizon:
            break
        if use_intrinsic:
            predicted = guidance.predict_next(state, feature, latent, plan)
        dist = actor(policy_inputs(feature.detach(), latent if use_latent_action else None))
        action = dist.rsample() if dynamics_gradient else dist.sample()
        actions.append(action)
        log_probs.append(dist.log_prob(action.detach()))
        entropies.append(dist.entropy())
        if dynamics_gradient:
            state = trunk_net.img_step(state, action, sample=True)
        else:
            with torch.no_grad():
                state = trunk_net.img_step(state, action, sample=True)
    return Imagination(
        states=RSSMState.stack(states, 0),
        features=torch.stack(features, 0),
        latent_actions=torch.stack(latents, 0) if guidance is not None else None,
        actions=torch.stack(actions, 0),
        log_probs=torch.stack(log_probs, 0),
        entropies=torch.stack(entropies, 0),
        intrinsic=torch.stack(intrinsic, 0),
    )
