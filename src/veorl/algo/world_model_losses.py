"""World-model losses shared by pretraining and fine-tuning.

See docs/method.md ("Training"): image NLL under a unit Gaussian, balanced KL with
free nats, linear MMD between the mean source and target embeddings, and the DreamerV2 loss of the
Trunk Net (image + reward (+ discount) NLL + balanced KL). Every reduction accepts a validity mask so
padded slots contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from veorl.models.networks import preprocess
from veorl.models.rssm import RSSMState
from veorl.models.world_models import TrunkWorldModel


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` over entries where mask is true (all entries without a mask)."""
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype)
    while weight.dim() < values.dim():
        weight = weight.unsqueeze(-1)
    weight = weight.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def masked_embedding_mean(embed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean embedding (E,) over all leading dimensions of embed (..., E), counting only valid entries."""
    flat = embed.reshape(-1, embed.shape[-1])
    if mask is None:
        return flat.mean(0)
    weight = mask.reshape(-1, 1).to(embed.dtype)
    return (flat * weight).sum(0) / weight.sum().clamp_min(1.0)


def linear_mmd(
    source_embed: torch.Tensor,
    target_embed: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear MMD: squared distance between the (masked) mean source and mean target embeddings."""
    diff = masked_embedding_mean(source_embed, source_mask) - masked_embedding_mean(target_embed, target_mask)
    return diff.square().sum()


def image_nll(
    decoder: torch.nn.Module, feature: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean negative log-likelihood per frame. With a mask only valid frames are decoded at all."""
    if mask is not None:
        keep = mask.reshape(-1).bool()
        feature = feature.reshape(-1, feature.shape[-1])[keep]
        target = target.reshape(-1, *target.shape[-3:])[keep]
        if feature.shape[0] == 0:
            return feature.sum() * 0.0
    return -decoder.log_prob(feature, target).mean()


@dataclass(frozen=True)
class TrunkLosses:
    """The Trunk Net loss (`loss`, minimised) and its terms, with the posterior and embeddings it computed."""

    loss: torch.Tensor
    image_nll: torch.Tensor
    reward_nll: torch.Tensor
    discount_nll: torch.Tensor | None
    kl_loss: torch.Tensor  # the optimised KL term: balanced, with free nats
    kl: torch.Tensor  # the raw KL(posterior || prior), detached
    post: RSSMState
    embed: torch.Tensor


def trunk_world_model_loss(
    model: TrunkWorldModel,
    image: torch.Tensor,
    action: torch.Tensor,
    reward: torch.Tensor,
    discount: torch.Tensor | None = None,
    kl_balance: float = 0.8,
    free_nats: float = 1.0,
    kl_scale: float = 1.0,
    reward_scale: float = 1.0,
) -> TrunkLosses:
    """DreamerV2 world-model loss of the Trunk Net on target sequences with real actions.

    image (B,T,64,64,3) uint8 or preprocessed; action (B,T,A) with action t leading to observation t;
    reward (B,T) is multiplied by reward_scale before the reward head learns it.
    """
    pixels = preprocess(image)
    embed = model.encoder(pixels)
    post, prior = model.trunk_net.observe(embed, action)
    feature = model.trunk_net.feature(post)
    image_loss = -model.decoder.log_prob(feature, pixels).mean()
    reward_loss = -model.reward_head.log_prob(feature, reward * reward_scale).mean()
    loss = image_loss + reward_loss
    discount_loss = None
    if model.discount_head is not None and discount is not None:
        discount_loss = -model.discount_head.log_prob(feature, discount).mean()
        loss = loss + discount_loss
    kl_loss, kl_value = model.trunk_net.kl_loss(post, prior, balance=kl_balance, free=free_nats)
    loss = loss + kl_scale * kl_loss
    return TrunkLosses(
        loss=loss,
        image_nll=image_loss,
        reward_nll=reward_loss,
        discount_nll=discount_loss,
        kl_loss=kl_loss,
        kl=kl_value,
        post=post,
        embed=embed,
    )


def flat_states(*states: RSSMState) -> RSSMState:
    """Concatenate (B_i, T_i, ...) states from several sequences into one flat (sum B_i*T_i, ...) state."""
    return RSSMState.cat([s.reshape_batch(-1) for s in states], 0)


__all__ = [
    "TrunkLosses",
    "flat_states",
    "image_nll",
    "linear_mmd",
    "masked_embedding_mean",
    "masked_mean",
    "trunk_world_model_loss",
]
