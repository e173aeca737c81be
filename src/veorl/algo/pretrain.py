"""World-model pretraining: phase 1 (latent behaviours, Plan Net) and phase 2 (keyframe Plan Net, F_BC).

See docs/method.md ("Training, in three phases").

Phase 1 (`Phase1Trainer`): encode frames, infer the latent action of every consecutive pair with the
BAN + codebook, filter the Plan Net over the sequence with those latent actions, reconstruct frames
through the decoder. Loss = image NLL + balanced KL (free nats) + VQ loss + mmd_weight * linear MMD
between source and target embeddings. With `pretrain.ban_on_source` the BAN and Plan Net learn from
source clips and target frames together (the paper's intent); without it, from target frames only and
the source video enters through the MMD term alone (the release).

Phase 2 (`Phase2Trainer`): the phase-1 encoder is copied and frozen together with the BAN and codebook;
their codes segment every source and target sequence into behaviours (veorl.algo.segmentation). The
Plan Net is trained one step per behaviour on the keyframes with its own keyframe decoder (initialised
from the phase-1 decoder), F_BC learns to predict the next behaviour's latent action from the Plan Net
state, and MMD keeps the two domains aligned. Every term is masked on padded behaviour slots.

The method doc's phase 2 also trains the Trunk Net (a DreamerV2 world model on target sequences with real
actions). In this project that belongs to fine-tuning (components.finetune), which starts from this
stage's artifact; `veorl.algo.world_model_losses.trunk_world_model_loss` is the shared loss it uses.

The phases are separate trainers with separate optimizers, run one after the other by `pretrain` through
the shared training loop (veorl.algo.loop: checkpoints and exact resume, curve, MLflow metrics and figures).
`pretrain` writes the world-model artifact and the metrics files.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veorl import distributed, tracking
from veorl.algo.loop import Phase, Trainer, TrainingLoop, detached, write_curve
from veorl.algo.segmentation import (
    Segments,
    keyframe_sequence,
    pad_segments,
    segment_behaviours,
)
from veorl.algo.world_model_losses import flat_states, linear_mmd, masked_mean
from veorl.checkpoint import run_directory
from veorl.config import Params, PretrainParams
from veorl.data.clips import MANIFEST, ClipStore
from veorl.data.episodes import EpisodeStore
from veorl.data.samplers import ClipSampler, EpisodeWindowSampler, JointSampler
from veorl.diagnostics import DIAGNOSTICS_FILE, check, codebook_diagnostics, target_windows
from veorl.models.ban import codebook_stats
from veorl.models.networks import IMAGE_SIZE, postprocess, preprocess
from veorl.models.world_models import VideoWorldModel, save_world_model
from veorl.storage import (
    artifact_hash,
    atomic_write_json,
    provenance,
    record_content_hash,
)
from veorl.trees import numeric_leaves

log = logging.getLogger(__name__)

STAGE = "pretrain"
CONFIG_SECTIONS = ("model", "pretrain")
# Each phase draws its batches from its own RNG streams, so phase 2 never replays phase 1's batches.
PHASE_STREAMS = {"phase1": (0, 1), "phase2": (2, 3)}

Batch = dict[str, dict[str, torch.Tensor]]


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase1Losses:
    loss: torch.Tensor  # what phase 1 minimises
    image_nll: torch.Tensor
    kl_loss: torch.Tensor  # balanced KL with free nats (optimised)
    kl: torch.Tensor  # raw KL(posterior || prior)
    vq_loss: torch.Tensor
    mmd: torch.Tensor
    forward_loss: torch.Tensor | None = None  # latent-action forward prediction (pretrain.forward_weight > 0)
    grad_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class Phase2Losses:
    loss: torch.Tensor
    image_nll: torch.Tensor
    kl_loss: torch.Tensor
    kl: torch.Tensor
    fbc_loss: torch.Tensor
    mmd: torch.Tensor
    behaviours_per_seq: torch.Tensor
    keyframes: torch.Tensor
    grad_norm: torch.Tensor | None = None


class PhaseTrainer(Trainer):
    """Shared optimisation step: one Adam over the phase's trainable modules, gradient-norm clipping.

    It counts the codes the batches use: since the last curve row (codebook perplexity and usage, added
    to each row) and since the last figure (the usage figure).
    """

    def __init__(self, model: VideoWorldModel, cfg: PretrainParams, precision: str = "fp32"):
        self.model, self.cfg = model, cfg
        self.precision = precision  # resolved (fp32 | bf16): the stage resolves pretrain.precision once
        self.autocast_device = model.codebook.vectors.device
        self.parameters = [p for m in self.trainable_modules() for p in m.parameters()]
        self.optimizer = torch.optim.Adam(self.parameters, lr=cfg.optim.lr, eps=cfg.optim.eps)
        # Kept on the model's device so counting never waits for it.
        device = model.codebook.vectors.device
        self.usage = torch.zeros(model.codebook.K, dtype=torch.float32, device=device)
        self.figure_usage = torch.zeros_like(self.usage)
        # Several processes: DDP over the trained modules (veorl.distributed); None in a single process.
        self.replicas = distributed.replicas({f"m{i}": m for i, m in enumerate(self.trainable_modules())})

    @abc.abstractmethod
    def trainable_modules(self) -> list[nn.Module]:
        """The modules this phase optimises (everything else stays untouched)."""

    @abc.abstractmethod
    def forward(self, batch: Batch) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """(losses, [(codes, mask or None), ...] the batch chose), without side effects."""

    def losses(self, batch: Batch) -> Any:
        """The loss terms of one batch (a pure function of the batch and torch's RNG); `loss` is minimised."""
        with self.autocast():
            return self.forward(batch)[0]

    def update(self, batch: Batch) -> Any:
        self.optimizer.zero_grad(set_to_none=True)
        if self.replicas is None:
            with self.autocast():
                losses, codes = self.forward(batch)
            losses.loss.backward()
        else:
            loss, (losses, codes) = self.replicas(lambda: self._replicated_forward(batch))
            loss.backward()  # gradients averaged across ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.optim.grad_clip)
        self.optimizer.step()
        for chosen, mask in codes:
            index = chosen.reshape(-1)
            weights = (
                torch.ones_like(index, dtype=self.usage.dtype)
                if mask is None
                else mask.reshape(-1).to(self.usage.dtype)
            )
            self.count_codes(index, weights)
        return replace(detached(losses), grad_norm=grad_norm.detach())

    def _replicated_forward(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        with self.autocast():
            losses, codes = self.forward(batch)
        return losses.loss, (losses, codes)

    def count_codes(self, index: torch.Tensor, weights: torch.Tensor) -> None:
        # index_add_ rather than bincount, which reads the largest code back to size its output (a sync).
        self.usage.index_add_(0, index, weights)
        self.figure_usage.index_add_(0, index, weights)

    def extra_metrics(self) -> dict[str, float]:
        distributed.sum_(self.usage)  # the codes of every rank's batches
        stats = codebook_stats(self.usage.double().cpu())
        self.usage.zero_()
        return {"codebook_perplexity": stats.perplexity, "codebook_used": float(stats.used)}

    def figures(self, batch: Batch) -> dict[str, Any]:
        usage = self.figure_usage.double().cpu()
        self.figure_usage.zero_()
        target = batch["target"]["image"]
        top_codes = [int(c) for c in torch.argsort(usage, descending=True)[:6] if usage[c] > 0] or [0]
        keyframe = self.name == "phase2"
        horizon = 4 if keyframe else min(8, target.shape[1])
        recon = keyframe_figure(self.model, target) if keyframe else reconstruction_figure(self.model, target)
        return {
            "reconstruction": recon,
            "open_loop": open_loop_figure(self.model, target, top_codes, horizon, keyframe=keyframe),
            "codebook_usage": usage_figure(usage, f"{self.name} codebook usage"),
        }

    def state_dict(self) -> dict[str, Any]:
        # The whole model: the phase reads modules it does not train (phase 2: the frozen BAN side).
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "usage": self.usage.cpu().clone(),
            "figure_usage": self.figure_usage.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.usage.copy_(state["usage"])
        self.figure_usage.copy_(state["figure_usage"])


# ------------------------------------------------------------------------------------------------
# Phase 1
# ------------------------------------------------------------------------------------------------


class Phase1Trainer(PhaseTrainer):
    """Latent behaviours + Plan Net on frame sequences (encoder, BAN, codebook, Plan Net, decoder learn)."""

    name = "phase1"

    def __init__(self, model: VideoWorldModel, cfg: PretrainParams, precision: str = "fp32"):
        super().__init__(model, cfg, precision)
        # Code counts since the last dead-code restart, and updates taken (the restart schedule).
        self.restart_usage = torch.zeros_like(self.usage)
        self.updates = 0

    def trainable_modules(self) -> list[nn.Module]:
        m = self.model
        modules = [m.encoder, m.ban, m.codebook, m.plan_net, m.decoder]
        return modules + [m.latent_forward] if self.cfg.forward_weight > 0 else modules

    def update(self, batch: Batch) -> Any:
        losses = super().update(batch)
        self.updates += 1
        every = self.cfg.codebook_restart_every
        if every and self.updates % every == 0:
            self.restart_dead_codes(batch)
        return losses

    def count_codes(self, index: torch.Tensor, weights: torch.Tensor) -> None:
        super().count_codes(index, weights)
        self.restart_usage.index_add_(0, index, weights)

    @torch.no_grad()
    def restart_dead_codes(self, batch: Batch) -> int:
        """Codes no transition chose since the last restart move onto BAN outputs of this batch."""
        m = self.model
        sequences = [batch["target"]["image"]] + ([batch["source"]["image"]] if self.cfg.ban_on_source else [])
        z = torch.cat([m.ban(m.encoder(preprocess(x))).reshape(-1, m.latent_action_dim) for x in sequences])
        distributed.sum_(self.restart_usage)  # dead on every rank's batches
        restarted = m.codebook.restart_dead(self.restart_usage, z)
        distributed.broadcast_(m.codebook.vectors.data)  # rank 0's restarted codes (from its batch) everywhere
        self.restart_usage.zero_()
        if restarted:
            log.debug("phase 1 update %d: restarted %d dead codes", self.updates, restarted)
        return restarted

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "restart_usage": self.restart_usage.cpu().clone(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.restart_usage.copy_(state["restart_usage"])
        self.updates = int(state["updates"])

    def before_first_update(self, batch: Batch) -> None:
        if self.cfg.codebook_init == "data":
            self.initialise_codebook(batch)

    @torch.no_grad()
    def initialise_codebook(self, batch: Batch) -> None:
        """Set the codebook to K distinct BAN outputs of `batch` (pretrain.codebook_init = "data").

        With the VQ-VAE default U(-1/K, 1/K) the codes sit far from the BAN's outputs, so a handful of
        codes win every transition and the rest never receive a gradient (collapse). Starting the codes
        on the data spreads them over the transitions actually seen.
        """
        m = self.model
        sequences = [batch["target"]["image"]] + ([batch["source"]["image"]] if self.cfg.ban_on_source else [])
        z = torch.cat([m.ban(m.encoder(preprocess(x))).reshape(-1, m.latent_action_dim) for x in sequences])
        K = m.codebook.K
        distinct = min(K, z.shape[0])
        chosen = torch.randperm(z.shape[0], device=z.device)[:distinct]
        if distinct < K:  # fewer transitions than codes: repeat some
            chosen = torch.cat([chosen, torch.randint(0, z.shape[0], (K - distinct,), device=z.device)])
        vectors = z[chosen]
        vectors[distinct:] += 1e-3 * torch.randn_like(vectors[distinct:])  # repeated codes nudged apart
        m.codebook.vectors.copy_(vectors)
        distributed.broadcast_(m.codebook.vectors.data)  # several processes: rank 0's batch initialises the codes

    def forward(self, batch: Batch) -> tuple[Phase1Losses, list[tuple[torch.Tensor, None]]]:
        m, cfg = self.model, self.cfg
        target = preprocess(batch["target"]["image"])
        source = preprocess(batch["source"]["image"])
        (b, t), (bs, ts) = target.shape[:2], source.shape[:2]
        # One encoder pass over every frame of both domains; the same tensor is the decoder's target. This
        # shared pass (and the straight-through quantisation the BAN learns by) is why phase 1 does not use
        # VideoWorldModel.plan_posterior, only the Plan Net filtering step it shares with it (filter_plan).
        frames = torch.cat([_frames(target), _frames(source)])
        embed = m.encoder(frames)
        target_embed = embed[: b * t].reshape(b, t, -1)
        source_embed = embed[b * t :].reshape(bs, ts, -1)
        mmd = linear_mmd(source_embed, target_embed)

        sequences = [target_embed] + ([source_embed] if cfg.ban_on_source else [])
        pre_quant = [m.ban(e) for e in sequences]
        flat_z = torch.cat([z.reshape(-1, z.shape[-1]) for z in pre_quant])
        flat_zq, codes, vq = m.codebook.quantise(flat_z, beta=cfg.vq_beta)

        posts, priors, features, forward_terms = [], [], [], []
        offset = 0
        for e, z in zip(sequences, pre_quant):
            count = z.shape[0] * z.shape[1]
            latent_actions = flat_zq[offset : offset + count].reshape(z.shape)
            offset += count
            if cfg.forward_weight > 0:
                forward_terms.append(m.forward_prediction_loss(e, latent_actions))
            post, prior = m.filter_plan(e, latent_actions)
            posts.append(post)
            priors.append(prior)
            features.append(m.plan_net.feature(post).reshape(-1, m.feat_dim))
        pixels = frames if cfg.ban_on_source else frames[: b * t]
        image = -m.decoder.log_prob(torch.cat(features), pixels).mean()
        kl_loss, kl = m.plan_net.kl_loss(
            flat_states(*posts), flat_states(*priors), balance=cfg.kl_balance, free=cfg.free_nats
        )
        loss = image + cfg.kl_scale * kl_loss + vq + cfg.mmd_weight * mmd
        forward_loss = None
        if forward_terms:
            forward_loss = sum(forward_terms) / len(forward_terms)
            loss = loss + cfg.forward_weight * forward_loss
        losses = Phase1Losses(
            loss=loss, image_nll=image, kl_loss=kl_loss, kl=kl, vq_loss=vq, mmd=mmd, forward_loss=forward_loss
        )
        return losses, [(codes, None)]


# ------------------------------------------------------------------------------------------------
# Phase 2
# ------------------------------------------------------------------------------------------------


@dataclass
class KeyframeBatch:
    """Source and target keyframe sequences joined along the batch (target rows first)."""

    frame_index: torch.Tensor  # (N, K+1) index into the flat frame tensor of both domains
    prev_action: torch.Tensor  # (N, K+1, Z)
    mask: torch.Tensor  # (N, K+1)
    next_action: torch.Tensor  # (N, K+1, Z)
    next_mask: torch.Tensor  # (N, K+1)
    target_rows: int
    segments: list[Segments] = field(default_factory=list)


class Phase2Trainer(PhaseTrainer):
    """Keyframe Plan Net + F_BC (encoder, Plan Net, keyframe decoder, F_BC learn; BAN side frozen)."""

    name = "phase2"

    def __init__(self, model: VideoWorldModel, cfg: PretrainParams, precision: str = "fp32"):
        if not bool(model.behaviour_frozen):
            raise RuntimeError("phase 2 needs the phase-1 BAN side frozen: call model.freeze_behaviours() first")
        super().__init__(model, cfg, precision)

    def trainable_modules(self) -> list[nn.Module]:
        m = self.model
        return [m.encoder, m.plan_net, m.keyframe_decoder, m.fbc]

    @torch.no_grad()
    def transition_codes(self, frames: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Latent-action codes (B, T-1) of each sequence set, from the frozen phase-1 encoder copy and BAN."""
        m = self.model
        codes_per_set: list[torch.Tensor] = []
        embed = m.behaviour_encoder(frames)
        offset = 0
        for b, t in shapes:
            e = embed[offset : offset + b * t].reshape(b, t, -1)
            codes_per_set.append(m.codebook.indices(m.ban(e)))
            offset += b * t
        return codes_per_set

    @torch.no_grad()
    def keyframes(self, frames: torch.Tensor, shapes: list[tuple[int, int]]) -> KeyframeBatch:
        """Segment each sequence set (target first, then source) into behaviours and join their keyframes."""
        m = self.model
        segments = [segment_behaviours(c) for c in self.transition_codes(frames, shapes)]
        slots = max(s.slots for s in segments)
        parts = []
        offset = 0
        for seg, (b, t) in zip(segments, shapes):
            seg = pad_segments(seg, slots)
            seq = keyframe_sequence(seg, m.codebook.lookup(seg.code))
            rows = torch.arange(b, device=frames.device)[:, None] * t
            parts.append((seq, seq.frame_index + rows + offset))
            offset += b * t
        return KeyframeBatch(
            frame_index=torch.cat([flat for _, flat in parts]),
            prev_action=torch.cat([s.prev_action for s, _ in parts]),
            mask=torch.cat([s.mask for s, _ in parts]),
            next_action=torch.cat([s.next_action for s, _ in parts]),
            next_mask=torch.cat([s.next_mask for s, _ in parts]),
            target_rows=shapes[0][0],
            segments=segments,
        )

    def forward(self, batch: Batch) -> tuple[Phase2Losses, list[tuple[torch.Tensor, torch.Tensor]]]:
        m, cfg = self.model, self.cfg
        target = preprocess(batch["target"]["image"])
        source = preprocess(batch["source"]["image"])
        frames = torch.cat([_frames(target), _frames(source)])
        kf = self.keyframes(frames, [tuple(target.shape[:2]), tuple(source.shape[:2])])
        rows, slots = kf.mask.shape
        valid = kf.mask.reshape(-1)
        # Only real keyframes are encoded; padded slots get zero embeddings. They come after every real
        # slot of their row, so they cannot influence a real slot's state, and every loss masks them.
        keyframe_pixels = frames[kf.frame_index.reshape(-1)[valid]]
        valid_embed = m.encoder(keyframe_pixels)
        embed = valid_embed.new_zeros(rows * slots, valid_embed.shape[-1]).index_put(
            (valid.nonzero(as_tuple=True)[0],), valid_embed
        )
        embed = embed.reshape(rows, slots, -1)
        post, prior = m.plan_net.observe(embed, kf.prev_action)
        feature = m.plan_net.feature(post)
        image = -m.keyframe_decoder.log_prob(feature.reshape(-1, m.feat_dim)[valid], keyframe_pixels).mean()
        free = cfg.free_nats if cfg.phase2_free_nats is None else cfg.phase2_free_nats
        kl_loss, kl = m.plan_net.kl_loss(post, prior, balance=cfg.kl_balance, free=free, mask=kf.mask)
        # Like a reward head, F_BC's gradient also shapes the Plan Net state it reads.
        fbc_error = (m.fbc(feature) - kf.next_action).square().mean(-1)
        fbc = masked_mean(fbc_error, kf.next_mask)
        n_target = kf.target_rows
        mmd = linear_mmd(embed[n_target:], embed[:n_target], kf.mask[n_target:], kf.mask[:n_target])
        loss = image + cfg.kl_scale * kl_loss + fbc + cfg.mmd_weight * mmd
        behaviours = kf.mask[:, 1:].sum(1).to(torch.float32)
        losses = Phase2Losses(
            loss=loss,
            image_nll=image,
            kl_loss=kl_loss,
            kl=kl,
            fbc_loss=fbc,
            mmd=mmd,
            behaviours_per_seq=behaviours.mean(),
            keyframes=valid.sum().to(torch.float32),
        )
        return losses, [(seg.code, seg.mask) for seg in kf.segments]


# ------------------------------------------------------------------------------------------------
# Figures (no RNG consumed: states are taken at their means, so logging never perturbs training)
# ------------------------------------------------------------------------------------------------


def image_grid(frames: np.ndarray, border: int = 2) -> np.ndarray:
    """(rows, cols, H, W, 3) uint8 -> one (rows*(H+b), cols*(W+b), 3) image."""
    rows, cols, h, w, _ = frames.shape
    grid = np.full((rows * (h + border) + border, cols * (w + border) + border, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = border + r * (h + border), border + c * (w + border)
            grid[y : y + h, x : x + w] = frames[r, c]
    return grid


@torch.no_grad()
def reconstruction_figure(model: VideoWorldModel, images: torch.Tensor, frames: int = 8) -> np.ndarray:
    """Row 1: target frames; row 2: Plan Net posterior reconstructions through the phase-1 decoder."""
    x = preprocess(images[:1, :frames])
    _, post = model.plan_posterior(x)
    recon = model.decoder(model.plan_net.feature(post))
    rows = torch.stack([postprocess(x[0]), postprocess(recon[0])])
    return image_grid(rows.cpu().numpy())


@torch.no_grad()
def keyframe_figure(model: VideoWorldModel, images: torch.Tensor, slots: int = 8) -> np.ndarray:
    """Row 1: the keyframes of one target sequence (frame 0, then each behaviour's end frame);
    row 2: their reconstructions by the keyframe Plan Net through the keyframe decoder."""
    x = preprocess(images[:1])
    codes = model.codebook.indices(model.ban(model.behaviour_embed(x)))
    seg = segment_behaviours(codes)
    seq = keyframe_sequence(seg, model.codebook.lookup(seg.code))
    keyframes = x[0, seq.frame_index[0, :slots]][None]
    post, _ = model.plan_net.observe(model.encoder(keyframes), seq.prev_action[:, :slots], sample=False)
    recon = model.keyframe_decoder(model.plan_net.feature(post))
    rows = torch.stack([postprocess(keyframes[0]), postprocess(recon[0])])
    return image_grid(rows.cpu().numpy())


@torch.no_grad()
def open_loop_figure(
    model: VideoWorldModel, images: torch.Tensor, codes: list[int], horizon: int, keyframe: bool, context: int = 4
) -> np.ndarray:
    """One row per latent behaviour: from the same start state, the Plan Net rolled forward with that
    codebook vector held fixed, decoded (first column: the start frame's reconstruction)."""
    x = preprocess(images[:1, :context])
    _, post = model.plan_posterior(x)
    start = post[:, -1]
    decoder = model.keyframe_decoder if keyframe else model.decoder
    count = len(codes)
    start = start.map(lambda t: t.expand(count, *t.shape[1:]))
    actions = model.codebook.lookup(torch.tensor(codes, device=x.device))[:, None].expand(count, horizon, -1)
    priors = model.plan_net.imagine(actions, start, sample=False)
    first = decoder(model.plan_net.feature(start))[:, None]
    rollout = decoder(model.plan_net.feature(priors))
    grid = postprocess(torch.cat([first, rollout], 1))
    return image_grid(grid.cpu().numpy())


def usage_figure(counts: torch.Tensor, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(np.arange(len(counts)), counts.numpy())
    stats = codebook_stats(counts)
    ax.set_title(f"{title}: {stats.used}/{len(counts)} codes used, perplexity {stats.perplexity:.2f}")
    ax.set_xlabel("code")
    ax.set_ylabel("count")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Driver: the phases, the artifact, the metrics files
# ------------------------------------------------------------------------------------------------


def upstream_hashes(clips: str | Path, episodes: str | Path) -> dict[str, str]:
    """Content hashes of the inputs, as the steps that wrote them recorded them (veorl.storage.artifact_hash)."""
    return {"video_clips": artifact_hash(clips), "target_episodes": artifact_hash(episodes)}


def pretrain(
    params: Params,
    clips: str | Path,
    episodes: str | Path,
    out: str | Path,
    checkpoints: str | Path | None = None,
    parent_run_id: str | None = None,
    metrics_path: str | Path = "metrics/pretrain.json",
    curve_path: str | Path = "metrics/pretrain_curve.csv",
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) phases 1 and 2 and write the world-model artifact and metrics. Returns the metrics.

    Under torchrun with several processes, each is one rank of a data-parallel run (veorl.distributed) and only
    rank 0 writes checkpoints, the artifact, the metrics files and the MLflow run.
    on_step(global_step) is called after every update (tests use it to simulate a kill).
    """
    from veorl.runtime import configure_torch_threads, resolve_device, retain_freed_memory

    configure_torch_threads(params.pretrain.threads)
    retain_freed_memory(params.pretrain.retain_memory)
    with distributed.session(resolve_device(params.pretrain.device)) as ctx:
        result = _pretrain(
            params, ctx, clips, episodes, out, checkpoints, parent_run_id, metrics_path, curve_path, on_step, progress
        )
        distributed.barrier()  # the other ranks return once rank 0 has written the outputs
        return result


def _pretrain(
    params: Params,
    ctx: distributed.Context,
    clips: str | Path,
    episodes: str | Path,
    out: str | Path,
    checkpoints: str | Path | None,
    parent_run_id: str | None,
    metrics_path: str | Path,
    curve_path: str | Path,
    on_step: Callable[[int], None] | None,
    progress: bool,
) -> dict[str, Any]:
    from veorl.acceleration import compile_networks, resolve_precision

    cfg = params.pretrain
    device = ctx.device
    precision = resolve_precision(cfg.precision, device)  # once for the stage
    clip_store = ClipStore(clips)
    if clip_store.size != params.model.image_size:
        raise ValueError(
            f"{Path(clips) / MANIFEST}: clips are {clip_store.size}x{clip_store.size}, "
            f"the model needs {params.model.image_size}x{params.model.image_size}"
        )
    episode_store = EpisodeStore(episodes, image_size=params.model.image_size)
    # Fail before any MLflow run or checkpoint exists when the data cannot feed the configured batches.
    EpisodeWindowSampler(episode_store, cfg.batch, cfg.seq_len, cfg.seed)
    ClipSampler(clip_store, cfg.source_batch, cfg.source_len, cfg.seed)
    upstream = upstream_hashes(clips, episodes)
    config = params.section_dict(*CONFIG_SECTIONS)
    # The precision that runs, not `auto`: a checkpoint continues only in the precision it was trained in.
    config["pretrain"]["precision"] = precision

    torch.manual_seed(cfg.seed)
    model = VideoWorldModel(params.model).to(device)
    if cfg.compile:
        compile_networks(model)
    trained_as = ctx.identity(config)
    run_dir = run_directory(checkpoints, trained_as, upstream) if checkpoints is not None else None

    def sampler(phase: str) -> JointSampler:
        target_stream, source_stream = PHASE_STREAMS[phase]
        return JointSampler(
            target=EpisodeWindowSampler(
                episode_store, cfg.batch, cfg.seq_len, cfg.seed, target_stream, keys=("image",), rank=ctx.rank
            ),
            source=ClipSampler(clip_store, cfg.source_batch, cfg.source_len, cfg.seed, source_stream, rank=ctx.rank),
        )

    def phase2() -> Phase2Trainer:
        model.freeze_behaviours()
        return Phase2Trainer(model, cfg, precision)

    sequences = cfg.batch + cfg.source_batch
    loop = TrainingLoop(
        STAGE,
        [
            Phase(
                "phase1", cfg.phase1_steps, lambda: Phase1Trainer(model, cfg, precision), sampler("phase1"), sequences
            ),
            Phase("phase2", cfg.phase2_steps, phase2, sampler("phase2"), sequences),
        ],
        seed=cfg.seed,
        config=trained_as,
        upstream=upstream,
        checkpoints=run_dir,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        figure_every=cfg.image_log_every,
        prefetch=cfg.prefetch,
        device=device,
        progress=progress,
        on_step=on_step,
    )

    with tracking.stage_run(
        STAGE,
        params,
        parent_run_id,
        run_dir=run_dir,
        sections=CONFIG_SECTIONS + ("tracking",),
        upstream=upstream,
        record=ctx.is_main,
    ) as run:
        tracking.log_params({"pretrain.precision_resolved": precision, **ctx.params("pretrain")})
        log.info("pretrain: %s forward passes%s", precision, ", compiled networks" if cfg.compile else "")
        result = loop.run(run.run_id)
        model.freeze_behaviours()  # a run with phase2_steps=0 still hands over a frozen BAN side
        metrics = result.summary()
        if not ctx.is_main:  # the same weights as rank 0, which writes them
            return metrics
        metrics.update(
            codebook_perplexity=metrics.get("phase1", {}).get("codebook_perplexity"),
            precision=precision,
            compile=cfg.compile,
            mlflow_run_id=run.run_id,
        )
        out = Path(out)
        windows = target_windows(episode_store, cfg.diagnostics_sequences, cfg.seq_len, seed=cfg.seed)
        report = {"codebook": codebook_diagnostics(model, windows, device=device)}
        report["warnings"] = check(report, "pretrain")
        metrics["diagnostics"] = report["codebook"]
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / DIAGNOSTICS_FILE, report)
        tracking.log_metrics({f"diagnostics/{k}": v for k, v in numeric_leaves(report).items()})
        save_world_model(out, model, config, provenance(config, upstream, stage=STAGE, mlflow_run_id=run.run_id))
        record_content_hash(out)
        atomic_write_json(metrics_path, metrics)
        write_curve(curve_path, result.curve)
        tracking.log_artifact(out, "video_world_model")
        tracking.log_artifact(metrics_path, "metrics")
        tracking.log_artifact(curve_path, "metrics")
    return metrics


__all__ = [
    "KeyframeBatch",
    "Phase1Losses",
    "Phase1Trainer",
    "Phase2Losses",
    "Phase2Trainer",
    "PhaseTrainer",
    "image_grid",
    "keyframe_figure",
    "open_loop_figure",
    "pretrain",
    "reconstruction_figure",
    "upstream_hashes",
    "usage_figure",
]
