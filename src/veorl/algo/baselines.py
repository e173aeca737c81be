"""The baselines run by the same fine-tuning pipeline (`finetune.algo`).

- dreamerv2: offline DreamerV2. The Trunk Net world model is trained from scratch on the target data
  (no pretrained encoder, no video, no MMD), and the actor and critic read f alone with the world
  model's reward only. It is the VeoRL code path with every video-derived switch off (`switches`).
- bc: behaviour cloning from pixels, a conv encoder + MLP policy regressing the dataset action that
  followed each frame (MSE, or Gaussian NLL with a learned std).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from veorl import distributed
from veorl.acceleration import module_device
from veorl.algo.loop import Trainer, detached
from veorl.config import FinetuneParams
from veorl.models.actor_critic import PixelPolicy


@dataclass(frozen=True)
class Switches:
    """What the chosen algorithm actually uses (ablation flags resolved against the algorithm)."""

    pretrained_encoder: bool
    use_mmd: bool
    use_latent_action: bool
    use_intrinsic: bool

    @property
    def needs_video_world_model(self) -> bool:
        return self.pretrained_encoder or self.use_latent_action or self.use_intrinsic

    @property
    def needs_guidance(self) -> bool:
        return self.use_latent_action or self.use_intrinsic


def switches(fp: FinetuneParams) -> Switches:
    if fp.algo == "veorl":
        return Switches(
            pretrained_encoder=fp.pretrained_encoder,
            use_mmd=fp.use_mmd,
            use_latent_action=fp.use_latent_action,
            use_intrinsic=fp.use_intrinsic,
        )
    if fp.algo == "dreamerv2":
        return Switches(pretrained_encoder=False, use_mmd=False, use_latent_action=False, use_intrinsic=False)
    if fp.algo == "bc":
        return Switches(pretrained_encoder=False, use_mmd=False, use_latent_action=False, use_intrinsic=False)
    raise ValueError(f"finetune.algo: unknown algorithm {fp.algo!r}")


# The model-based actor's behaviour term: behaviour cloning's policy learns by finetune.bc_loss and never reads it.
_BEHAVIOUR_TERM = frozenset({"finetune.actor_bc_loss", "finetune.actor_bc_weight"})


def unread_settings(algo: str) -> frozenset[str]:
    """Settings (flat keys) an algorithm never reads, so that a run's value of them does not make it another agent:
    a bc run trained before the behaviour term's default changed is still the bc run of today's config."""
    return _BEHAVIOUR_TERM if algo == "bc" else frozenset()


def bc_pairs(image: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame t, action t+1) pairs of windows (B, T, ...): index t holds the obs reached by action t, so the
    action chosen after seeing frame t is action t+1."""
    if image.shape[:2] != action.shape[:2] or image.shape[1] < 2:
        raise ValueError(
            f"bc needs windows of >= 2 steps with matching image {tuple(image.shape)} and action {tuple(action.shape)}"
        )
    frames = image[:, :-1].reshape(-1, *image.shape[2:])
    targets = action[:, 1:].reshape(-1, action.shape[-1])
    return frames, targets


@dataclass(frozen=True)
class BCLosses:
    bc_loss: torch.Tensor  # what is minimised: MSE, the Gaussian NLL or the cross-entropy (finetune.bc_loss)
    action_mse: torch.Tensor  # squared error of the mean action, whatever the loss
    grad_norm: torch.Tensor | None = None


def bc_loss(policy: PixelPolicy, frames: torch.Tensor, targets: torch.Tensor, kind: str) -> BCLosses:
    raw_mean, raw_log_std = policy.raw(frames)
    mean, log_std = policy.squash(raw_mean, raw_log_std)
    mse = (mean - targets).square().sum(-1).mean()
    if kind == "mse":
        loss = mse
    elif kind == "gaussian":
        dist = torch.distributions.Normal(mean, log_std.exp())
        loss = -dist.log_prob(targets).sum(-1).mean()
    elif kind == "categorical":
        loss = categorical_bc_loss(raw_mean, targets)
    else:
        raise ValueError(f"finetune.bc_loss: unknown loss {kind!r} (mse | gaussian | categorical)")
    return BCLosses(bc_loss=loss, action_mse=mse)


def categorical_bc_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one-hot dataset actions under logits (N, A). All-zero rows (the absorbing steps padded
    after an episode's end, veorl.data.episodes) carry no action and are left out."""
    taken = targets.sum(-1) > 0
    chosen = targets[taken]
    if not bool(((chosen == 0) | (chosen == 1)).all()) or not bool((chosen.sum(-1) == 1).all()):
        raise ValueError(
            "finetune.bc_loss=categorical needs one-hot dataset actions (a discrete action space such as the game "
            "domain's); these actions are continuous: use mse or gaussian"
        )
    if not bool(taken.any()):
        return logits.sum() * 0.0  # a batch of padding alone: nothing to imitate, but a graph to step through
    return F.cross_entropy(logits[taken].float(), chosen.argmax(-1))


class BehaviourCloning(Trainer):
    """One update = one batch of (frame, next action) pairs."""

    name = "bc"

    def __init__(self, policy: PixelPolicy, fp: FinetuneParams, precision: str = "fp32"):
        self.policy, self.fp = policy, fp
        self.precision, self.autocast_device = precision, module_device(policy)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=fp.bc_optim.lr, eps=fp.bc_optim.eps)
        self.replicas = distributed.replicas({"policy": policy})  # several processes: DDP; else None

    def losses(self, batch: dict[str, torch.Tensor]) -> BCLosses:
        frames, targets = bc_pairs(batch["image"], batch["action"])
        with self.autocast():
            return bc_loss(self.policy, frames, targets, self.fp.bc_loss)

    def update(self, batch: dict[str, torch.Tensor]) -> BCLosses:
        if self.replicas is None:
            losses = self.losses(batch)
            loss = losses.bc_loss
        else:
            loss, losses = self.replicas(lambda: self._objective(batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.fp.bc_optim.grad_clip)
        self.optimizer.step()
        return replace(detached(losses), grad_norm=grad.detach())

    def _objective(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, BCLosses]:
        losses = self.losses(batch)
        return losses.bc_loss, losses

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
