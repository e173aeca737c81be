"""Fine-tuning: the Trunk Net world model on target data, then phase 3 policy learning with behaviour guidance.

Two phases, each a trainer run by the shared training loop (veorl.algo.loop; method doc: docs/method.md,
"Phase 3"):

WorldModelPhase  ("world_model") the Trunk Net world model on target sequences: image NLL + reward NLL
                 (rewards times finetune.reward_scale) (+ discount NLL with finetune.discount_head) + balanced
                 KL, + mmd_weight * linear MMD(source,
                 target embeddings) when MMD is on and clips are given; its encoder starts from
                 pretraining (veorl). With guidance="aligned" it also trains the guidance in the space
                 where it is used: F_BC on Trunk Net features with targets from the frozen BAN (the
                 quantised latent action of (t, t+1)), and the map M from Trunk Net features to Plan Net
                 states, fitted to the Plan Net posterior on the same target frames. Both read detached
                 features: they follow the Trunk Net without shaping it. guidance="release" trains neither
                 (the authors' behaviour).
PolicyPhase      ("policy") world model frozen: imagination from every posterior state of a target batch
                 (veorl.algo.imagination), lambda-returns with a slow critic, actor by backpropagation
                 through the Trunk Net dynamics (continuous actions) or REINFORCE with the slow critic as
                 baseline (discrete actions), critic by the NLL of the lambda-return. With the discount head
                 (finetune.discount_head, the game domain) each imagined step is discounted by
                 finetune.discount x the head's predicted continuation, as in DreamerV2: returns stop at
                 the terminals the model foresees.

The `bc` baseline replaces both by BehaviourCloning ("bc", veorl.algo.baselines).

Resuming is exact (the loop reseeds torch per update and batches are a pure function of the step); the
networks are built in a fixed order from finetune.seed, so what a checkpoint does not hold (the actor and
critic before the policy phase starts) is rebuilt identically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from veorl import distributed
from veorl.acceleration import clone_module, module_device
from veorl.algo import embedding_cache
from veorl.algo.baselines import BehaviourCloning, Switches, switches
from veorl.algo.embedding_cache import INDEX_KEYS, EmbeddingCache
from veorl.algo.imagination import (
    BehaviourGuidance,
    Imagination,
    PlanStateMap,
    check_release_compatible,
    imagine,
)
from veorl.algo.loop import Phase, Trainer, TrainingLoop, detached, write_curve
from veorl.algo.returns import ReturnNormaliser, discount_weights, lambda_return
from veorl.algo.world_model_losses import linear_mmd, trunk_world_model_loss
from veorl.config import FinetuneParams, ModelParams, Params
from veorl.data.episodes import CARD
from veorl.diagnostics import DIAGNOSTICS_FILE, action_usage, check, policy_diagnostics, target_windows
from veorl.models.actor_critic import Actor, Critic, PixelPolicy, policy_inputs
from veorl.models.networks import preprocess
from veorl.models.rssm import RSSMState
from veorl.models.world_models import (
    TrunkWorldModel,
    VideoWorldModel,
    build_trunk_world_model,
)
from veorl.storage import (
    artifact_hash,
    atomic_torch_save,
    atomic_write_json,
    read_json,
    record_content_hash,
)
from veorl.trees import numeric_leaves

log = logging.getLogger(__name__)

STAGE = "finetune"
SECTIONS = ("model", "finetune")
# Streams of the per-step batch RNG (veorl.data.samplers.step_rng).
TARGET_STREAM, SOURCE_STREAM, START_STREAM, BC_STREAM = 10, 11, 12, 13
# Model sizes the video world model was pretrained with; the Trunk Net must share them to reuse its parts.
PRETRAINED_SIZE_KEYS = (
    "cnn_depth",
    "deter",
    "stoch",
    "stoch_classes",
    "rssm_kind",
    "hidden",
    "min_std",
    "ban_hidden",
    "latent_action_dim",
    "codebook_size",
    "fbc_hidden",
)

Batch = dict[str, torch.Tensor]


class FinetuneError(ValueError):
    """Bad inputs to fine-tuning (missing artifact, incompatible sizes); the message names the file or key."""


def _clip_step(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], clip: float) -> torch.Tensor:
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()
    return grad_norm.detach()


# ------------------------------------------------------------------------------------------------
# Phase A: the Trunk Net world model (and the aligned guidance)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldModelLosses:
    loss: torch.Tensor  # what the Trunk Net optimiser minimises (MMD included)
    image_nll: torch.Tensor
    reward_nll: torch.Tensor
    kl_loss: torch.Tensor  # balanced KL with free nats (optimised)
    kl: torch.Tensor  # raw KL(posterior || prior)
    discount_nll: torch.Tensor | None = None  # with the discount head: Bernoulli NLL of the data's discount
    mmd: torch.Tensor | None = None  # with MMD on and source clips
    fbc_loss: torch.Tensor | None = None  # aligned guidance only: F_BC to the BAN's latent action
    map_loss: torch.Tensor | None = None  # aligned guidance only: M(f) to the Plan Net posterior
    ensemble_loss: torch.Tensor | None = None  # prior ensemble heads to the posterior (reads detached states)
    trunk_grad_norm: torch.Tensor | None = None
    guidance_grad_norm: torch.Tensor | None = None


class WorldModelPhase(Trainer):
    """Updates of the Trunk Net world model on target windows (+ source clips for MMD, + aligned guidance)."""

    name = "world_model"

    def __init__(
        self,
        trunk: TrunkWorldModel,
        params: Params,
        sw: Switches,
        video_wm: VideoWorldModel | None = None,
        guidance: BehaviourGuidance | None = None,
        precision: str = "fp32",
    ):
        fp = params.finetune
        self.trunk, self.fp, self.sw, self.video_wm, self.guidance = trunk, fp, sw, video_wm, guidance
        self.precision, self.autocast_device = precision, module_device(trunk)
        self.optimizer = torch.optim.Adam(trunk.parameters(), lr=fp.world_model_optim.lr, eps=fp.world_model_optim.eps)
        self.train_guidance = guidance is not None and guidance.mode == "aligned"
        self.guidance_optimizer = None
        if self.train_guidance:
            if video_wm is None:
                raise FinetuneError("aligned guidance needs the video world model (BAN and Plan Net targets)")
            self.guidance_optimizer = torch.optim.Adam(
                self.guidance_parameters(), lr=fp.world_model_optim.lr, eps=fp.world_model_optim.eps
            )
        # Several processes: DDP over the Trunk Net (and the trained guidance); None in a single process.
        trained_guidance = self.guidance if self.train_guidance else None
        self.replicas = distributed.replicas(
            {
                "trunk": trunk,
                "fbc": trained_guidance.fbc if trained_guidance else None,
                "state_map": trained_guidance.state_map if trained_guidance else None,
            }
        )

    def guidance_parameters(self) -> list[nn.Parameter]:
        return list(self.guidance.fbc.parameters()) + list(self.guidance.state_map.parameters())

    def losses(self, batch: Batch) -> WorldModelLosses:
        """The terms of one batch (image, action, reward [, discount] [, source clips]); a pure function of the
        batch."""
        with self.autocast():
            return self._losses(batch)

    def _losses(self, batch: Batch) -> WorldModelLosses:
        fp = self.fp
        image = preprocess(batch["image"])
        trunk = trunk_world_model_loss(
            self.trunk,
            image,
            batch["action"],
            batch["reward"],
            discount=batch.get("discount"),
            kl_balance=fp.kl_balance,
            free_nats=fp.free_nats,
            kl_scale=fp.kl_scale,
            reward_scale=fp.reward_scale,
        )
        loss, mmd = trunk.loss, None
        if self.sw.use_mmd and batch.get("source") is not None:
            mmd = linear_mmd(self.trunk.encoder(preprocess(batch["source"])), trunk.embed)
            loss = loss + fp.mmd_weight * mmd
        ensemble_loss = None
        if self.trunk.ensemble is not None:
            # The heads read detached states, so this term trains them and leaves the Trunk Net as it is.
            ensemble_loss = self.trunk.ensemble.loss(trunk.post)
            loss = loss + ensemble_loss
        fbc_loss = map_loss = None
        if self.train_guidance:
            latent_actions, plan_posterior = self.video_wm.plan_posterior(image)
            feature = self.trunk.trunk_net.feature(trunk.post).detach()
            # MSE to the quantised latent action, as in pretraining's phase 2
            fbc_loss = (self.guidance.fbc(feature[:, :-1]) - latent_actions).square().mean()
            map_loss = self.guidance.state_map.loss(feature, plan_posterior)
        return WorldModelLosses(
            loss=loss,
            image_nll=trunk.image_nll,
            reward_nll=trunk.reward_nll,
            kl_loss=trunk.kl_loss,
            kl=trunk.kl,
            discount_nll=trunk.discount_nll,
            mmd=mmd,
            fbc_loss=fbc_loss,
            map_loss=map_loss,
            ensemble_loss=ensemble_loss,
        )

    def update(self, batch: Batch) -> WorldModelLosses:
        if self.replicas is not None:
            return self._replicated_update(batch)
        losses = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        trunk_grad = _clip_step(self.optimizer, list(self.trunk.parameters()), self.fp.world_model_optim.grad_clip)
        guidance_grad = None
        if self.train_guidance:
            self.guidance_optimizer.zero_grad(set_to_none=True)
            (losses.fbc_loss + losses.map_loss).backward()
            guidance_grad = _clip_step(
                self.guidance_optimizer, self.guidance_parameters(), self.fp.world_model_optim.grad_clip
            )
        return replace(detached(losses), trunk_grad_norm=trunk_grad, guidance_grad_norm=guidance_grad)

    def _replicated_update(self, batch: Batch) -> WorldModelLosses:
        """`update` as one rank of several: one backward of the Trunk Net loss plus the guidance losses through
        DDP. The guidance reads detached Trunk Net features, so each parameter gets its own loss's gradient, as
        in the two backward passes of one process; then each optimiser steps on the averaged gradients."""

        def objective() -> tuple[torch.Tensor, WorldModelLosses]:
            losses = self.losses(batch)
            total = losses.loss + (losses.fbc_loss + losses.map_loss if self.train_guidance else 0.0)
            return total, losses

        total, losses = self.replicas(objective)
        self.optimizer.zero_grad(set_to_none=True)
        if self.train_guidance:
            self.guidance_optimizer.zero_grad(set_to_none=True)
        total.backward()
        trunk_grad = _clip_step(self.optimizer, list(self.trunk.parameters()), self.fp.world_model_optim.grad_clip)
        guidance_grad = None
        if self.train_guidance:
            guidance_grad = _clip_step(
                self.guidance_optimizer, self.guidance_parameters(), self.fp.world_model_optim.grad_clip
            )
        return replace(detached(losses), trunk_grad_norm=trunk_grad, guidance_grad_norm=guidance_grad)

    def state_dict(self) -> dict[str, Any]:
        state = {"trunk": self.trunk.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.train_guidance:
            state.update(
                fbc=self.guidance.fbc.state_dict(),
                state_map=self.guidance.state_map.state_dict(),
                guidance_optimizer=self.guidance_optimizer.state_dict(),
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trunk.load_state_dict(state["trunk"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.train_guidance:
            self.guidance.fbc.load_state_dict(state["fbc"])
            self.guidance.state_map.load_state_dict(state["state_map"])
            self.guidance_optimizer.load_state_dict(state["guidance_optimizer"])


# ------------------------------------------------------------------------------------------------
# Phase B: policy learning in imagination (world model frozen)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLosses:
    actor_loss: torch.Tensor
    critic_loss: torch.Tensor
    imagined_return: torch.Tensor  # mean lambda-return
    imagined_reward: torch.Tensor  # mean extrinsic reward predicted on imagined states
    intrinsic: torch.Tensor  # mean intrinsic reward (0 when it is off)
    entropy: torch.Tensor
    value: torch.Tensor  # mean slow-critic value
    return_scale: torch.Tensor | None = None  # what the actor's returns are divided by (1 without normalisation)
    actor_bc_loss: torch.Tensor | None = None  # -log pi(data action | start state), with actor_bc_weight > 0
    uncertainty: torch.Tensor | None = None  # mean ensemble disagreement along imagined states, with the penalty on
    actor_grad_norm: torch.Tensor | None = None
    critic_grad_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class StartStates:
    """Trunk Net posteriors of a target batch, flattened (B*T), and the data action that followed each one."""

    states: RSSMState
    next_action: torch.Tensor  # (B*T, A): the action taken after the observation of each start state
    has_next: torch.Tensor  # (B*T,): 0 for the last step of a window, whose next action is not in the batch


@dataclass(frozen=True)
class ImaginedReturns:
    """One imagined batch and everything the actor and critic losses are computed from.

    Indexing: states t = 0..H; transitions (rewards, returns, weights) t = 0..H-1 (veorl.algo.returns).
    """

    traj: Imagination
    extrinsic: torch.Tensor  # (H, N) reward head on s_1..s_H
    reward: torch.Tensor  # (H, N) extrinsic + intrinsic_weight * intrinsic - uncertainty_weight * disagreement
    values: torch.Tensor  # (H+1, N) slow critic on s_0..s_H, with the rollout's graph
    returns: torch.Tensor  # (H, N) lambda-returns, the critic's targets
    weights: torch.Tensor  # (H, N) discount weights of the start states, no gradient
    uncertainty: torch.Tensor | None = None  # (H, N) ensemble disagreement on s_1..s_H, when the penalty is on


def check_behaviour_term(fp: FinetuneParams, action_kind: str) -> None:
    """The squared-distance behaviour term needs continuous actions: refused before any training."""
    if fp.actor_bc_weight > 0 and fp.actor_bc_loss == "mse" and action_kind != "continuous":
        raise FinetuneError(
            "finetune.actor_bc_loss=mse pulls a continuous action's mode onto the data's; one-hot actions take "
            "actor_bc_loss=nll (the cross-entropy of the data's action)"
        )


class PolicyPhase(Trainer):
    """Actor, critic and slow critic trained on imagined rollouts of the frozen Trunk Net.

    `losses` runs in steps (start states, imagination and returns, actor loss, critic loss) so a new
    term changes one of them. Offline conservatism (each part one setting away from the release):
    - uncertainty penalty: imagined rewards minus uncertainty_weight x the disagreement of the Trunk Net's prior
      ensemble (Offline DreamerV2), so returns fall where the model is guessing;
    - behaviour-regularised actor: actor_bc_weight x the squared distance of the policy's mode from a_data
      (actor_bc_loss=mse) or -log pi(a_data | s) (nll) for the data action that followed each start state, next
      to the return term (TD3+BC's balance: with normalised returns both terms are O(1));
    - return normalisation: the actor's returns (and so its entropy bonus, relative to them) divided by
      max(1, P95 - P5) of the lambda-returns, tracked with an EMA (`ReturnNormaliser`);
    - critic warm-up: the first critic_warmup updates train the critic only.
    """

    name = "policy"

    def __init__(
        self,
        trunk: TrunkWorldModel,
        actor: Actor,
        critic: Critic,
        params: Params,
        sw: Switches,
        guidance: BehaviourGuidance | None = None,
        precision: str = "fp32",
        embeddings: EmbeddingCache | None = None,
    ):
        fp = params.finetune
        if sw.needs_guidance and guidance is None:
            raise FinetuneError("the latent-action input and the intrinsic reward need behaviour guidance")
        check_behaviour_term(fp, actor.kind)
        if fp.uncertainty_weight > 0 and fp.ensemble_size and trunk.ensemble is None:
            raise FinetuneError("finetune.uncertainty_weight > 0 needs the Trunk Net's prior ensemble (ensemble_size)")
        self.trunk, self.actor, self.critic, self.fp, self.sw, self.guidance = trunk, actor, critic, fp, sw, guidance
        self.precision, self.autocast_device = precision, module_device(trunk)
        # The frozen encoder's embeddings of the target frames, when start batches carry window indices instead of
        # images (veorl.algo.embedding_cache); None: every batch is encoded.
        self.embeddings = embeddings
        self.slow_critic = clone_module(critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(actor.parameters(), lr=fp.actor_optim.lr, eps=fp.actor_optim.eps)
        self.critic_optimizer = torch.optim.Adam(critic.parameters(), lr=fp.critic_optim.lr, eps=fp.critic_optim.eps)
        self.normaliser = ReturnNormaliser(fp.return_norm_decay) if fp.return_norm == "percentile" else None
        self.penalise = trunk.ensemble is not None and fp.uncertainty_weight > 0
        self.disagreement_on_data: float | None = None  # EMA of the ensemble disagreement at the start states
        self.updates = 0
        # Several processes: DDP over the actor and the critic; None in a single process.
        self.replicas = distributed.replicas({"actor": actor, "critic": critic})

    def freeze_world_model(self) -> None:
        """Phase 3 never changes the world model; gradients pass through it into the actions only."""
        self.trunk.requires_grad_(False)
        if self.guidance is not None:
            self.guidance.requires_grad_(False)

    def start_states(self, batch: Batch) -> StartStates:
        """Every step of every target sequence is a start state: (B*T, ...), with the data action that followed it.

        A batch with window indices (INDEX_KEYS) instead of images reads its embeddings from `embeddings`."""
        action = batch["action"]
        with torch.no_grad():
            if "image" in batch:
                embed = self.trunk.encoder(preprocess(batch["image"]))
            elif self.embeddings is not None:
                episode, start = (batch[key] for key in INDEX_KEYS)
                embed = self.embeddings.windows(episode, start, action.shape[1])
            else:
                raise FinetuneError(
                    f"a start batch needs images, or window indices {INDEX_KEYS} and the embedding cache"
                )
            posterior, _ = self.trunk.trunk_net.observe(embed, action)
        rows, steps = action.shape[:2]
        # Index t holds the action that led to observation t, so the one taken after it sits at t+1.
        following = torch.cat([action[:, 1:], torch.zeros_like(action[:, :1])], 1)
        has_next = torch.ones(rows, steps, device=action.device, dtype=action.dtype)
        has_next[:, -1] = 0.0
        if "discount" in batch:
            # No action follows a terminal (nor the absorbing steps padded after one, veorl.data.episodes).
            has_next = has_next * (batch["discount"] > 0).to(has_next.dtype)
        return StartStates(
            posterior.reshape_batch(-1).detach(), following.reshape(rows * steps, -1), has_next.reshape(-1)
        )

    def imagine_returns(self, start: RSSMState) -> ImaginedReturns:
        fp, sw = self.fp, self.sw
        guidance = self.guidance if sw.needs_guidance else None
        traj = imagine(
            self.trunk.trunk_net,
            start,
            self.actor,
            fp.horizon,
            guidance,
            use_latent_action=sw.use_latent_action,
            use_intrinsic=sw.use_intrinsic,
            dynamics_gradient=self.actor.kind == "continuous",
        )
        latent = traj.latent_actions if sw.use_latent_action else None
        # The slow critic reads the rollout's features with their graph: returns depend on where actions lead.
        values = self.slow_critic(policy_inputs(traj.features, latent))
        extrinsic = self.trunk.reward_head(traj.features[1:])
        reward = extrinsic + fp.intrinsic_weight * traj.intrinsic[1:] if sw.use_intrinsic else extrinsic
        uncertainty = None
        if self.penalise:
            # In units of the disagreement on the data's own states (an EMA): about 1 where the model was
            # trained, growing where it guesses, so uncertainty_weight reads the same whatever the model's
            # scale. It carries the rollout's graph: the actor is steered away from where it grows.
            uncertainty = self.trunk.ensemble.disagreement(traj.states.deter[1:]) / self.uncertainty_reference
            reward = reward - fp.uncertainty_weight * uncertainty
        discount = torch.full_like(reward, fp.discount)
        if self.trunk.discount_head is not None:
            # DreamerV2: the discount of transition t is gamma x P(the episode goes on after s_t+1).
            discount = discount * torch.sigmoid(self.trunk.discount_head(traj.features[1:]))
        returns = lambda_return(reward, values[1:], discount, fp.lambda_)
        return ImaginedReturns(
            traj=traj,
            extrinsic=extrinsic,
            reward=reward,
            values=values,
            returns=returns,
            weights=discount_weights(discount),
            uncertainty=uncertainty,
        )

    @property
    def uncertainty_reference(self) -> float:
        return self.disagreement_on_data if self.disagreement_on_data else 1.0

    @torch.no_grad()
    def _track_disagreement(self, start: RSSMState) -> None:
        level = distributed.mean_float(float(self.trunk.ensemble.disagreement(start.deter).mean()))
        decay = self.fp.return_norm_decay
        previous = self.disagreement_on_data
        self.disagreement_on_data = level if previous is None else decay * previous + (1.0 - decay) * level

    @property
    def return_scale(self) -> float:
        return self.normaliser.scale if self.normaliser is not None else 1.0

    def actor_loss(self, r: ImaginedReturns) -> torch.Tensor:
        """Maximise normalised returns (backpropagated through the dynamics) or, for discrete actions, REINFORCE
        with the slow critic as baseline; plus the entropy bonus. The scale is the normaliser's before this
        batch (it is updated after the step), so the loss is a pure function of the batch and the state."""
        scale = self.return_scale
        if self.actor.kind == "continuous":
            objective = r.returns / scale
        else:
            objective = r.traj.log_probs * ((r.returns - r.values[:-1]) / scale).detach()
        return -(r.weights * (objective + self.fp.actor_entropy * r.traj.entropies)).mean()

    def behaviour_loss(self, r: ImaginedReturns, start: StartStates) -> torch.Tensor:
        """How far the actor is from the action the data took after each start state: -log pi(a_data | s_0)
        (actor_bc_loss=nll) or |mode(pi(s_0)) - a_data|^2 summed over action dimensions (mse)."""
        latent = r.traj.latent_actions[0] if self.sw.use_latent_action else None
        dist = self.actor(policy_inputs(r.traj.features[0].detach(), latent))
        action = start.next_action
        if self.fp.actor_bc_loss == "mse":
            per_state = (dist.mode() - action).pow(2).sum(-1)
        else:
            if self.actor.kind == "continuous":
                # The truncated normal lives strictly inside (-1, 1); data actions at the bounds are moved just inside.
                action = action.clamp(-1.0 + 1e-3, 1.0 - 1e-3)
            per_state = -dist.log_prob(action)
        return (per_state * start.has_next).sum() / start.has_next.sum().clamp_min(1.0)

    def critic_loss(self, r: ImaginedReturns) -> torch.Tensor:
        """NLL of the lambda-return under the critic, on detached inputs and targets."""
        inputs = r.traj.policy_inputs(self.sw.use_latent_action)[:-1]
        return (r.weights * Critic.nll(self.critic(inputs), r.returns.detach())).mean()

    def losses(self, batch: Batch) -> PolicyLosses:
        """The policy losses of one target batch (its posteriors are the start states)."""
        return self._losses_and_returns(batch)[0]

    def _losses_and_returns(self, batch: Batch) -> tuple[PolicyLosses, torch.Tensor, StartStates]:
        with self.autocast():
            return self._policy_terms(batch)

    def _policy_terms(self, batch: Batch) -> tuple[PolicyLosses, torch.Tensor, StartStates]:
        start = self.start_states(batch)
        if self.penalise and self.disagreement_on_data is None:
            self._track_disagreement(start.states)  # the first batch sets the unit before any penalty
        r = self.imagine_returns(start.states)
        actor_loss = self.actor_loss(r)
        bc = None
        if self.fp.actor_bc_weight > 0:
            bc = self.behaviour_loss(r, start)
            actor_loss = actor_loss + self.fp.actor_bc_weight * bc
        return (
            PolicyLosses(
                actor_loss=actor_loss,
                critic_loss=self.critic_loss(r),
                imagined_return=r.returns.detach().mean(),
                imagined_reward=r.extrinsic.detach().mean(),
                intrinsic=r.traj.intrinsic[1:].detach().mean(),
                entropy=r.traj.entropies.detach().mean(),
                value=r.values.detach().mean(),
                return_scale=torch.tensor(self.return_scale),
                actor_bc_loss=bc,
                uncertainty=r.uncertainty.detach().mean() if r.uncertainty is not None else None,
            ),
            r.returns.detach(),
            start,
        )

    def update(self, batch: Batch) -> PolicyLosses:
        if self.replicas is not None:
            return self._replicated_update(batch)
        losses, returns, start = self._losses_and_returns(batch)
        actor_grad = None
        if self.updates >= self.fp.critic_warmup:
            self.actor_optimizer.zero_grad(set_to_none=True)
            losses.actor_loss.backward()
            actor_grad = _clip_step(self.actor_optimizer, list(self.actor.parameters()), self.fp.actor_optim.grad_clip)
        self.critic_optimizer.zero_grad(set_to_none=True)
        losses.critic_loss.backward()
        critic_grad = _clip_step(self.critic_optimizer, list(self.critic.parameters()), self.fp.critic_optim.grad_clip)
        return self._after_steps(losses, returns, start, actor_grad, critic_grad)

    def _replicated_update(self, batch: Batch) -> PolicyLosses:
        """`update` as one rank of several: one backward of actor loss (after the warm-up) plus critic loss through
        DDP. The critic loss reads detached rollout features and the actor loss the frozen slow critic, so each
        network gets its own loss's gradient, as in the two backward passes of one process."""
        train_actor = self.updates >= self.fp.critic_warmup

        def objective() -> tuple[torch.Tensor, tuple[PolicyLosses, torch.Tensor, StartStates]]:
            losses, returns, start = self._losses_and_returns(batch)
            total = losses.critic_loss + losses.actor_loss if train_actor else losses.critic_loss
            return total, (losses, returns, start)

        total, (losses, returns, start) = self.replicas(objective)
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.critic_optimizer.zero_grad(set_to_none=True)
        total.backward()
        actor_grad = None
        if train_actor:
            actor_grad = _clip_step(self.actor_optimizer, list(self.actor.parameters()), self.fp.actor_optim.grad_clip)
        critic_grad = _clip_step(self.critic_optimizer, list(self.critic.parameters()), self.fp.critic_optim.grad_clip)
        return self._after_steps(losses, returns, start, actor_grad, critic_grad)

    def _after_steps(
        self,
        losses: PolicyLosses,
        returns: torch.Tensor,
        start: StartStates,
        actor_grad: torch.Tensor | None,
        critic_grad: torch.Tensor,
    ) -> PolicyLosses:
        """The bookkeeping after the optimiser steps: return scale, disagreement unit, slow critic."""
        if self.normaliser is not None:
            # With several processes, the percentiles of every rank's returns (the global batch).
            self.normaliser.update(distributed.gather_cat(returns, dim=1))
        if self.penalise:
            self._track_disagreement(start.states)
        self.updates += 1
        if self.updates % self.fp.slow_critic_every == 0:
            self.slow_critic.load_state_dict(self.critic.state_dict())
        if actor_grad is None:  # warm-up: report a zero norm so the column keeps one meaning (no actor step)
            actor_grad = torch.zeros(())
        return replace(detached(losses), actor_grad_norm=actor_grad, critic_grad_norm=critic_grad)

    def state_dict(self) -> dict[str, Any]:
        # With the world model and guidance it imagines in: they were trained by the phase before.
        return {
            "trunk": self.trunk.state_dict(),
            "guidance": self.guidance.state_dict() if self.guidance is not None else None,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "slow_critic": self.slow_critic.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "updates": self.updates,
            "normaliser": self.normaliser.state_dict() if self.normaliser is not None else None,
            "disagreement_on_data": self.disagreement_on_data,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trunk.load_state_dict(state["trunk"])
        if self.embeddings is not None:
            self.embeddings.invalidate()  # made with the encoder's weights before these
        if self.guidance is not None:
            self.guidance.load_state_dict(state["guidance"])
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.slow_critic.load_state_dict(state["slow_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.updates = int(state["updates"])
        if self.normaliser is not None:
            self.normaliser.load_state_dict(state["normaliser"])
        self.disagreement_on_data = state["disagreement_on_data"]


# ------------------------------------------------------------------------------------------------
# Building the pieces from the inputs
# ------------------------------------------------------------------------------------------------


def dataset_metadata(episodes: str | Path, params: Params, action_dim: int) -> dict[str, Any]:
    """env/task/camera/episode length of the target data: from its card.json, else from params.collect."""
    card_path = Path(episodes) / CARD
    card = read_json(card_path) if card_path.is_file() else {}
    collect = params.collect
    fallback = {
        "env": collect.env,
        "task": collect.task,
        "camera": collect.camera,
        "episode_length": collect.episode_length,
    }
    missing = [k for k in fallback if k not in card]
    if missing:
        log.warning("%s does not say %s; taking them from params.collect", card_path, missing)
    return {
        "env": card.get("env", fallback["env"]),
        "task": card.get("task", fallback["task"]),
        "camera": card.get("camera", fallback["camera"]),
        "episode_length": int(card.get("episode_length", fallback["episode_length"])),
        "action_dim": int(action_dim),
        "action_kind": card.get("action_kind", "continuous"),
    }


def check_pretrained_sizes(model: ModelParams, video_wm: VideoWorldModel, where: str) -> None:
    ours, theirs = model.model_dump(), video_wm.params.model_dump()
    differ = [
        f"model.{k}: params {ours[k]!r}, world model {theirs[k]!r}"
        for k in PRETRAINED_SIZE_KEYS
        if ours[k] != theirs[k]
    ]
    if differ:
        raise FinetuneError(
            f"{where} was pretrained with other model sizes; re-run pretraining or restore them:\n  "
            + "\n  ".join(differ)
        )


def build_guidance(
    video_wm: VideoWorldModel, trunk: TrunkWorldModel, mode: str, model: ModelParams
) -> BehaviourGuidance:
    """aligned: a trainable copy of F_BC and a new state map; release: the pretrained F_BC as it is."""
    video_wm.requires_grad_(False)
    if mode == "aligned":
        fbc = clone_module(video_wm.fbc).requires_grad_(True)
        state_map = PlanStateMap(trunk.feat_dim, video_wm.plan_net, units=model.head_units, layers=2)
        return BehaviourGuidance(fbc, video_wm.codebook, video_wm.plan_net, "aligned", state_map)
    check_release_compatible(trunk.trunk_net, video_wm.plan_net)
    return BehaviourGuidance(video_wm.fbc, video_wm.codebook, video_wm.plan_net, "release")


def build_model_based(
    params: Params,
    sw: Switches,
    action_dim: int,
    action_kind: str,
    video_wm: VideoWorldModel | None,
    device: str | torch.device = "cpu",
) -> tuple[TrunkWorldModel, BehaviourGuidance | None, Actor, Critic]:
    """The networks of veorl and dreamerv2 fine-tuning, built in this fixed order (what a resumed run rebuilds):
    the Trunk Net world model (encoder from `video_wm` with the pretrained-encoder switch), the guidance (when a
    switch needs it), the actor and the critic."""
    fp, model = params.finetune, params.model
    trunk = build_trunk_world_model(
        model,
        action_dim,
        video_wm if sw.pretrained_encoder else None,
        discount_head=fp.discount_head,
        ensemble_size=fp.ensemble_size,
    ).to(device)
    guidance = build_guidance(video_wm, trunk, fp.guidance, model).to(device) if sw.needs_guidance else None
    feat_dim = trunk.feat_dim + (model.latent_action_dim if sw.use_latent_action else 0)
    actor = Actor(
        feat_dim, action_dim, model.actor_units, model.actor_layers, kind=action_kind, min_std=model.actor_min_std
    ).to(device)
    critic = Critic(feat_dim, model.critic_units, model.critic_layers).to(device)
    return trunk, guidance, actor, critic


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


def upstream_hashes(world_model: str | None, episodes: str, clips: str | None, sw: Switches) -> dict[str, str]:
    """Content hashes of the inputs this configuration reads, as the steps that wrote them recorded them."""
    hashes = {"target_episodes": artifact_hash(episodes)}
    if world_model is not None and sw.needs_video_world_model:
        hashes["world_model"] = artifact_hash(world_model)
    if clips is not None and sw.use_mmd:
        hashes["video_clips"] = artifact_hash(clips)
    return hashes


@torch.no_grad()
def agent_diagnostics(
    params: Params,
    store,
    trunk: TrunkWorldModel | None,
    actor: Actor | None,
    guidance: BehaviourGuidance | None,
    sw: Switches,
    policy: PixelPolicy | None,
    device: str,
    action_kind: str = "continuous",
) -> dict[str, Any]:
    """The end-of-fine-tuning diagnostics (veorl.diagnostics) on target windows, with threshold warnings.
    `action_kind` (the data's card): a discrete bc policy is summarised by the actions it plays (their argmax)."""
    fp = params.finetune
    length = max(fp.seq_len, fp.horizon + 1)
    windows = target_windows(store, fp.diagnostics_sequences, length, seed=fp.seed)
    if trunk is not None:
        figures = policy_diagnostics(
            trunk,
            actor,
            windows,
            fp.horizon,
            reward_scale=fp.reward_scale,
            guidance=guidance,
            use_latent_action=sw.use_latent_action,
            ensemble=trunk.ensemble,
            seed=fp.seed,
            device=device,
        )
    else:
        mean, _ = policy(preprocess(torch.as_tensor(windows["image"], device=device)).flatten(0, 1))
        # one-hot data (the game): the environment plays the argmax of the policy's mean
        figures = action_usage(mean, discrete=action_kind == "discrete")
    report = {"policy": figures}
    report["warnings"] = check(report, f"finetune ({fp.algo})")
    return report


def finetune(
    world_model: str | None,
    episodes: str,
    out: str,
    params: Params,
    clips: str | None = None,
    checkpoints: str | None = None,
    metrics_path: str | None = "metrics/finetune.json",
    curve_path: str | None = "metrics/finetune_curve.csv",
    parent_run_id: str | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    snapshots: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) and write the agent artifact to `out`; returns the summary written to metrics_path.

    With `snapshots` and finetune.snapshot_every > 0, the agent is also written every snapshot_every updates of
    the last phase (policy, or bc) to snapshots/updates-NNNNNN/, for learning curves (scripts/compare.py).

    Under torchrun with several processes, each is one rank of a data-parallel run (veorl.distributed) and only
    rank 0 writes checkpoints, snapshots, the agent, the metrics files and the MLflow run.
    on_step(global_step) is called after every update (tests use it to simulate a kill).
    """
    from veorl.runtime import resolve_device

    with distributed.session(resolve_device(params.finetune.device)) as ctx:
        result = _finetune(
            ctx,
            world_model,
            episodes,
            out,
            params,
            clips,
            checkpoints,
            metrics_path,
            curve_path,
            parent_run_id,
            progress,
            on_step,
            snapshots,
        )
        distributed.barrier()  # the other ranks return once rank 0 has written the outputs
        return result


def _finetune(
    ctx: distributed.Context,
    world_model: str | None,
    episodes: str,
    out: str,
    params: Params,
    clips: str | None,
    checkpoints: str | None,
    metrics_path: str | None,
    curve_path: str | None,
    parent_run_id: str | None,
    progress: bool,
    on_step: Callable[[int], None] | None,
    snapshots: str | None,
) -> dict[str, Any]:
    from veorl import tracking
    from veorl.acceleration import compile_networks, resolve_precision
    from veorl.agent import REWARD_HEAD_FILE, assemble_agent, save_agent
    from veorl.checkpoint import run_directory
    from veorl.data.clips import ClipStore
    from veorl.data.episodes import EpisodeStore
    from veorl.data.samplers import ClipSampler, EpisodeWindowSampler
    from veorl.models.world_models import load_world_model
    from veorl.runtime import configure_torch_threads, retain_freed_memory, write_resolved_config

    fp, model = params.finetune, params.model
    sw = switches(fp)
    device = str(ctx.device)
    precision = resolve_precision(fp.precision, device)  # once for the stage
    configure_torch_threads(fp.threads)
    retain_freed_memory(fp.retain_memory)
    torch.manual_seed(fp.seed)

    # With the discount head, episodes cut short by a terminal are sampled with absorbing steps after it.
    store = EpisodeStore(episodes, image_size=model.image_size, absorbing=fp.discount_head)
    action_dim = int(store.episode(0)["action"].shape[1])
    meta = dataset_metadata(episodes, params, action_dim)
    if sw.use_mmd and clips is None:
        log.warning("finetune.use_mmd is on but no --clips were given: training the Trunk Net without MMD")
        sw = Switches(sw.pretrained_encoder, False, sw.use_latent_action, sw.use_intrinsic)
    clip_store = None
    if sw.use_mmd:
        clip_store = ClipStore(clips)
        if fp.source_len > clip_store.window:
            raise FinetuneError(
                f"finetune.source_len={fp.source_len} exceeds the {clip_store.window}-frame clips in {clips}"
            )

    video_wm = None
    if fp.algo != "bc" and sw.needs_video_world_model:
        if world_model is None:
            raise FinetuneError(f"finetune.algo={fp.algo} uses the video world model: pass --world-model")
        video_wm, _ = load_world_model(world_model, device=device)
        check_pretrained_sizes(model, video_wm, world_model)
    upstream = upstream_hashes(world_model, episodes, clips, sw)
    config = params.section_dict(*SECTIONS)
    # The precision that runs, not `auto`: a checkpoint continues only in the precision it was trained in.
    config["finetune"]["precision"] = precision
    # one folder per (maths-relevant config, inputs): a new world model or a `dvc exp run -S` variation
    # trains in its own folder instead of being refused by the persisted one
    trained_as = ctx.identity(config)  # + the number of processes, when several
    run_dir = run_directory(checkpoints, trained_as, upstream) if checkpoints else None

    # -- the networks (built in a fixed order from the seed: a resumed run rebuilds the same ones) --------
    trunk = guidance = actor = critic = policy = None
    windows = fp.batch * fp.seq_len
    if fp.algo == "bc":
        policy = PixelPolicy(model.cnn_depth, action_dim, model.actor_units, model.actor_layers).to(device)
        bc_batches = EpisodeWindowSampler(
            store, fp.batch, fp.seq_len, fp.seed, BC_STREAM, keys=("image", "action"), rank=ctx.rank
        )
        phases = [
            Phase(
                "bc",
                fp.bc_steps,
                lambda: BehaviourCloning(policy, fp, precision),
                bc_batches,
                fp.batch * (fp.seq_len - 1),
            )
        ]
    else:
        kind = meta["action_kind"]
        check_behaviour_term(fp, kind)  # here, not after the world-model phase
        trunk, guidance, actor, critic = build_model_based(params, sw, action_dim, kind, video_wm, device)
        ends = ("discount",) if fp.discount_head else ()  # where episodes end: the discount head's targets
        target = EpisodeWindowSampler(
            store,
            fp.batch,
            fp.seq_len,
            fp.seed,
            TARGET_STREAM,
            keys=("image", "action", "reward", *ends),
            rank=ctx.rank,
        )
        source = None
        if clip_store:
            source = ClipSampler(clip_store, fp.source_batch, fp.source_len, fp.seed, SOURCE_STREAM, rank=ctx.rank)
        # Phase 3's start batches: window indices into a table of the frozen encoder's embeddings when it fits the
        # budget (veorl.algo.embedding_cache), else images encoded at every update.
        embeddings = embedding_cache.for_store(store, trunk.encoder, precision, fp.embedding_cache_gb)
        frames = embedding_cache.frame_keys(embeddings)
        starts = EpisodeWindowSampler(
            store, fp.batch, fp.seq_len, fp.seed, START_STREAM, keys=(*frames, "action", *ends), rank=ctx.rank
        )

        def world_model_batch(step: int) -> dict[str, Any]:
            batch = dict(target(step))
            if source is not None:
                batch["source"] = source(step)["image"]
            return batch

        def policy_phase() -> PolicyPhase:
            phase = PolicyPhase(trunk, actor, critic, params, sw, guidance, precision, embeddings)
            phase.freeze_world_model()
            return phase

        phases = [
            Phase(
                "world_model",
                fp.world_model_steps,
                lambda: WorldModelPhase(trunk, params, sw, video_wm, guidance, precision),
                world_model_batch,
                windows,
            ),
            Phase("policy", fp.policy_steps, policy_phase, starts, windows * fp.horizon),
        ]

    if fp.compile:
        compile_networks(trunk, video_wm, guidance, actor, critic, policy)

    def write_agent(
        progress: dict[str, int], folder: str | Path, run_id: str | None, diagnostics: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The deployable agent as it stands after `progress` updates (agent.json last: the completion marker);
        returns its description."""
        agent_meta = {
            "algo": fp.algo,
            **meta,
            "image_size": model.image_size,
            "model": model.model_dump(mode="json"),
            "use_latent_action": sw.use_latent_action,
            "guidance": fp.guidance if sw.needs_guidance else None,
            "switches": {
                "pretrained_encoder": sw.pretrained_encoder,
                "use_mmd": sw.use_mmd,
                "use_latent_action": sw.use_latent_action,
                "use_intrinsic": sw.use_intrinsic,
            },
            "bc": {"units": model.actor_units, "layers": model.actor_layers, "loss": fp.bc_loss}
            if fp.algo == "bc"
            else None,
            "trained_updates": dict(progress),
            "mlflow_run_id": run_id,
            "reward_head": (
                {"units": model.head_units, "layers": model.head_layers, "reward_scale": fp.reward_scale}
                if trunk is not None
                else None
            ),
        }
        trained = {"policy": policy, "actor": actor}
        if trunk is not None:
            trained.update(encoder=trunk.encoder, trunk_net=trunk.trunk_net)
        if guidance is not None:
            trained.update(fbc=guidance.fbc, codebook=guidance.codebook)
        modules = assemble_agent(agent_meta, trained)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "agent.json").unlink(missing_ok=True)
        write_resolved_config(folder, params, SECTIONS, upstream=upstream, algo=fp.algo)
        if diagnostics is not None:
            atomic_write_json(folder / DIAGNOSTICS_FILE, diagnostics)
        if trunk is not None:  # for evaluation's predicted-vs-simulator reward diagnostic; acting never reads it
            head = {k: v.detach().cpu() for k, v in trunk.reward_head.state_dict().items()}
            atomic_torch_save(folder / REWARD_HEAD_FILE, head)
        save_agent(folder, modules, agent_meta)
        record_content_hash(folder)
        return agent_meta

    # learning curves: the agent every `snapshot_every` updates of the last (policy or bc) phase
    before_last = sum(p.steps for p in phases[:-1])
    last = phases[-1]

    def step_hook(global_step: int) -> None:
        phase_step = global_step - before_last
        snapshot = snapshots and fp.snapshot_every and 0 < phase_step < last.steps
        if ctx.is_main and snapshot and phase_step % fp.snapshot_every == 0:
            folder = Path(snapshots) / f"updates-{phase_step:06d}"
            if not (folder / "agent.json").is_file():  # a resumed run keeps the snapshots it already wrote
                write_agent({**{p.name: p.steps for p in phases[:-1]}, last.name: phase_step}, folder, None)
        if on_step is not None:
            on_step(global_step)

    loop = TrainingLoop(
        STAGE,
        phases,
        seed=fp.seed,
        config=trained_as,
        upstream=upstream,
        checkpoints=run_dir,
        log_every=fp.log_every,
        checkpoint_every=fp.checkpoint_every,
        prefetch=fp.prefetch,
        device=device,
        progress=progress,
        on_step=step_hook,
    )

    with tracking.stage_run(
        STAGE,
        params,
        parent_run_id,
        run_dir=run_dir,
        sections=SECTIONS,
        upstream=upstream,
        tags={"veorl.algo": fp.algo, "veorl.guidance": fp.guidance},
        record=ctx.is_main,
    ) as stage:
        tracking.log_params({"finetune.precision_resolved": precision, **ctx.params("finetune")})
        log.info("finetune: %s forward passes%s", precision, ", compiled networks" if fp.compile else "")
        result = loop.run(stage.run_id)
        if not ctx.is_main:  # the same weights as rank 0, which writes the agent
            return {"algo": fp.algo, **result.summary()}

        # -- the agent artifact ----------------------------------------------------------------------
        report = agent_diagnostics(params, store, trunk, actor, guidance, sw, policy, device, meta["action_kind"])
        agent_meta = write_agent(result.progress, out, stage.run_id, diagnostics=report)

        summary = {
            "algo": fp.algo,
            **result.summary(),
            "task": meta["task"],
            "precision": precision,
            "compile": fp.compile,
            "agent": str(out),
            "mlflow_run_id": stage.run_id,
        }
        tracking.log_metrics({f"final/{k}": v for k, v in numeric_leaves(summary).items()})
        tracking.log_dict(agent_meta, "agent/agent.json")
        tracking.log_metrics({f"diagnostics/{k}": v for k, v in numeric_leaves(report).items()})
        tracking.log_dict(report, f"agent/{DIAGNOSTICS_FILE}")
        if metrics_path:
            atomic_write_json(metrics_path, summary)
            tracking.log_artifact(metrics_path)
        if curve_path:
            write_curve(curve_path, result.curve)
            tracking.log_artifact(curve_path)
    return summary


__all__ = [
    "FinetuneError",
    "ImaginedReturns",
    "PolicyLosses",
    "PolicyPhase",
    "WorldModelLosses",
    "WorldModelPhase",
    "build_guidance",
    "build_model_based",
    "dataset_metadata",
    "finetune",
    "upstream_hashes",
]
