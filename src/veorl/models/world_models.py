"""The video world model (pretraining's artifact) and the Trunk Net world model built on it.

See docs/method.md: the video world model groups the encoder E, decoder D, BAN +
codebook, the Plan Net (an RSSM whose action is the 8-d latent action), the keyframe decoder
(initialised from D at the start of phase 2), F_BC, and the frozen phase-1 encoder copy that feeds
the BAN after phase 1 (`behaviour_encoder`). The Trunk Net world model (RSSM on real actions, reward
head, optional discount head) is trained during fine-tuning; `build_trunk_world_model` creates it with
its encoder initialised from pretraining.

Artifact layout written by `save_world_model`:
  world_model.pt      torch state_dict (written atomically)
  model_config.json   the ModelParams needed to rebuild the module
  config.json         resolved configuration of the run that produced it
  provenance.json     config, upstream data hashes, code version
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from veorl.config import ModelParams
from veorl.models.ban import BehaviourAbstraction, Codebook
from veorl.models.ensemble import PriorEnsemble
from veorl.models.networks import FBC, MLP, BinaryHead, Decoder, DenseHead, Encoder
from veorl.models.rssm import RSSM, RSSMState
from veorl.storage import atomic_torch_save, atomic_write_json, read_json

WEIGHTS_FILE = "world_model.pt"
MODEL_CONFIG_FILE = "model_config.json"


def build_rssm(params: ModelParams, action_dim: int, embed_dim: int) -> RSSM:
    return RSSM(
        action_dim=action_dim,
        embed_dim=embed_dim,
        deter=params.deter,
        stoch=params.stoch,
        hidden=params.hidden,
        kind=params.rssm_kind,
        classes=params.stoch_classes,
        min_std=params.min_std,
    )


class VideoWorldModel(nn.Module):
    """Everything pretraining learns from action-free video (and target frames)."""

    def __init__(self, params: ModelParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params.cnn_depth)
        embed_dim = self.encoder.output_dim
        self.behaviour_encoder = Encoder(params.cnn_depth)
        self.ban = BehaviourAbstraction(embed_dim, params.ban_hidden, params.latent_action_dim, params.ban_horizon)
        self.codebook = Codebook(params.codebook_size, params.latent_action_dim)
        self.plan_net = build_rssm(params, params.latent_action_dim, embed_dim)
        feat_dim = self.plan_net.feat_dim
        self.decoder = Decoder(feat_dim, params.cnn_depth)
        self.keyframe_decoder = Decoder(feat_dim, params.cnn_depth)
        self.fbc = FBC(feat_dim, params.fbc_hidden, params.latent_action_dim)
        # Predicts the change e_t+1 - e_t from (e_t, quantised latent action); trained in phase 1 with
        # pretrain.forward_weight > 0 so the code, its only route to the change, has to describe the motion.
        self.latent_forward = MLP(embed_dim + params.latent_action_dim, embed_dim, params.ban_hidden, 2)
        # Set once phase 2 begins: from then on the BAN reads the frozen phase-1 encoder copy.
        self.register_buffer("behaviour_frozen", torch.tensor(False))
        self.behaviour_encoder.load_state_dict(self.encoder.state_dict())
        # Never trained by gradient: it is a snapshot of the phase-1 encoder.
        self.behaviour_encoder.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return self.encoder.output_dim

    @property
    def feat_dim(self) -> int:
        return self.plan_net.feat_dim

    @property
    def latent_action_dim(self) -> int:
        return self.codebook.dim

    # -- phase switching ----------------------------------------------------------------------------

    def freeze_behaviours(self) -> None:
        """End of phase 1: copy the encoder for the BAN, freeze it with BAN and codebook, seed the keyframe decoder.

        Idempotent: calling it again after phase 2 has started changes nothing.
        """
        if bool(self.behaviour_frozen):
            self._set_behaviour_requires_grad(False)
            return
        with torch.no_grad():
            self.behaviour_encoder.load_state_dict(self.encoder.state_dict())
            self.keyframe_decoder.load_state_dict(self.decoder.state_dict())
            self.behaviour_frozen.fill_(True)
        self._set_behaviour_requires_grad(False)

    def _set_behaviour_requires_grad(self, flag: bool) -> None:
        self.ban.requires_grad_(flag)
        self.codebook.requires_grad_(flag)

    def frozen_modules(self) -> list[nn.Module]:
        return (
            [self.behaviour_encoder, self.ban, self.codebook]
            if bool(self.behaviour_frozen)
            else [self.behaviour_encoder]
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._set_behaviour_requires_grad(not bool(self.behaviour_frozen))
        return result

    # -- inference helpers used downstream ------------------------------------------------------------

    def forward_prediction_loss(self, embed: torch.Tensor, latent_actions: torch.Tensor) -> torch.Tensor:
        """How much of the change e_t+1 - e_t a predictor from (e_t, abar_t) leaves unexplained: the squared
        error summed over the embedding, divided by the batch's mean squared change (so 1 = no better than
        predicting no change, whatever the embedding's scale; consecutive frames differ little, and an
        unnormalised error would vanish next to the image NLL). Embeddings enter detached: this term shapes
        the BAN and codebook (through the straight-through latent actions), not the encoder. With a k-step BAN
        the change predicted is the one the code looks at, e_t+k - e_t (`BehaviourAbstraction.ahead`)."""
        now = embed[..., :-1, :].detach()
        change = (self.ban.ahead(embed) - embed[..., :-1, :]).detach()
        predicted = self.latent_forward(torch.cat([now, latent_actions], -1))
        scale = change.square().sum(-1).mean().clamp_min(1e-8)
        return (predicted - change).square().sum(-1).mean() / scale

    def behaviour_embed(self, image: torch.Tensor) -> torch.Tensor:
        """Embeddings the BAN reads: the frozen phase-1 encoder copy after phase 1, the live encoder before."""
        return (self.behaviour_encoder if bool(self.behaviour_frozen) else self.encoder)(image)

    @torch.no_grad()
    def infer_latent_actions(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantised latent actions (..., T-1, Z) and their codes (..., T-1) of frame sequences (..., T, 64, 64, 3)."""
        z = self.ban(self.behaviour_embed(image))
        return self.codebook.nearest(z)

    def filter_plan(
        self, embed: torch.Tensor, latent_actions: torch.Tensor, sample: bool = True
    ) -> tuple[RSSMState, RSSMState]:
        """Plan Net posterior and prior over frame embeddings (B, T, E) given the latent actions of their
        transitions (B, T-1, Z): the action entering frame t is the latent action of t-1 -> t, none at frame 0."""
        if latent_actions.shape[:-1] != (embed.shape[0], embed.shape[1] - 1):
            raise ValueError(
                f"latent actions {tuple(latent_actions.shape)} must be one per transition of the "
                f"embeddings {tuple(embed.shape)}"
            )
        entering = torch.cat(
            [latent_actions.new_zeros(latent_actions.shape[0], 1, latent_actions.shape[-1]), latent_actions], 1
        )
        return self.plan_net.observe(embed, entering, sample=sample)

    @torch.no_grad()
    def plan_posterior(self, image: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, RSSMState]:
        """What the video model says about frame sequences (B, T, 64, 64, 3): the quantised latent actions of
        their transitions (B, T-1, Z) and the Plan Net posterior (B, T) filtered with them (at its mean by default)."""
        latent_actions, _ = self.infer_latent_actions(image)
        posterior, _ = self.filter_plan(self.encoder(image), latent_actions, sample=sample)
        return latent_actions, posterior

    def next_latent_action(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F_BC's prediction snapped to the nearest codebook vector: (latent action, code)."""
        return self.codebook.nearest(self.fbc(feature))

    def plan_step(self, state: RSSMState, latent_action: torch.Tensor, sample: bool = False) -> RSSMState:
        """One behaviour-level Plan Net step: where the scene is after executing `latent_action`."""
        return self.plan_net.img_step(state, latent_action, sample=sample)


class TrunkWorldModel(nn.Module):
    """DreamerV2 world model on target data with real actions (trained during fine-tuning)."""

    def __init__(self, params: ModelParams, action_dim: int, discount_head: bool = False, ensemble_size: int = 0):
        super().__init__()
        self.params = params
        self.action_dim = action_dim
        self.encoder = Encoder(params.cnn_depth)
        self.trunk_net = build_rssm(params, action_dim, self.encoder.output_dim)
        feat_dim = self.trunk_net.feat_dim
        self.decoder = Decoder(feat_dim, params.cnn_depth)
        self.reward_head = DenseHead(feat_dim, 1, params.head_units, params.head_layers)
        self.discount_head = BinaryHead(feat_dim, params.head_units, params.head_layers) if discount_head else None
        # Offline conservatism: extra prior heads whose disagreement penalises imagined rewards (None = off).
        self.ensemble = PriorEnsemble(self.trunk_net, ensemble_size) if ensemble_size else None

    @property
    def feat_dim(self) -> int:
        return self.trunk_net.feat_dim


def build_trunk_world_model(
    params: ModelParams,
    action_dim: int,
    video_world_model: VideoWorldModel | None = None,
    discount_head: bool = False,
    init_decoder: bool = False,
    ensemble_size: int = 0,
) -> TrunkWorldModel:
    """A Trunk Net world model whose encoder (and optionally decoder) starts from the pretrained video model."""
    trunk = TrunkWorldModel(params, action_dim, discount_head, ensemble_size)
    if video_world_model is not None:
        trunk.encoder.load_state_dict(video_world_model.encoder.state_dict())
        if init_decoder:
            if video_world_model.feat_dim != trunk.feat_dim:
                raise ValueError(
                    f"cannot initialise the Trunk Net decoder: feature sizes differ "
                    f"({video_world_model.feat_dim} vs {trunk.feat_dim})"
                )
            trunk.decoder.load_state_dict(video_world_model.decoder.state_dict())
    return trunk


# ------------------------------------------------------------------------------------------------
# Artifact
# ------------------------------------------------------------------------------------------------


def save_world_model(
    path_dir: str | Path, model: VideoWorldModel, config: dict[str, Any], provenance: dict[str, Any]
) -> Path:
    """Write the world-model artifact; the weights land atomically so a reader never sees a partial file."""
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(out / WEIGHTS_FILE, state)
    atomic_write_json(out / MODEL_CONFIG_FILE, model.params.model_dump(mode="json"))
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "provenance.json", provenance)
    return out


def load_world_model(
    path_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[VideoWorldModel, dict[str, Any]]:
    """Rebuild a VideoWorldModel from an artifact directory: (model in eval mode, meta dict)."""
    root = Path(path_dir)
    for name in (WEIGHTS_FILE, MODEL_CONFIG_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} not found: {root} is not a world-model artifact (run components.pretrain)"
            )
    try:
        params = ModelParams.model_validate(read_json(root / MODEL_CONFIG_FILE))
    except ValueError as exc:
        raise ValueError(f"{root / MODEL_CONFIG_FILE}: invalid model configuration: {exc}") from None
    model = VideoWorldModel(params)
    state = torch.load(root / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{root / WEIGHTS_FILE}: weights do not match {MODEL_CONFIG_FILE} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.to(device).eval()
    meta: dict[str, Any] = {"model_config": params.model_dump(mode="json")}
    for name in ("config", "provenance"):
        path = root / f"{name}.json"
        meta[name] = read_json(path) if path.is_file() else {}
    return model, meta


__all__ = [
    "MODEL_CONFIG_FILE",
    "WEIGHTS_FILE",
    "TrunkWorldModel",
    "VideoWorldModel",
    "build_rssm",
    "build_trunk_world_model",
    "load_world_model",
    "save_world_model",
]
