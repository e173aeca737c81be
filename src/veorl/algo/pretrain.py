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

The phases are separate trainers with separate optimizers, run one after the other by `pretrain`, which
also owns checkpoint/resume (exact: a resumed run reproduces the uninterrupted run's parameters bit for
bit on CPU), MLflow tracking, the metrics files and the artifact.
"""

from __future__ import annotations

import abc
import csv
import io
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from veorl import tracking
from veorl.algo.segmentation import Segments, keyframe_sequence, pad_segments, segment_behaviours
from veorl.algo.world_model_losses import flat_states, linear_mmd, masked_mean
from veorl.checkpoint import CheckpointManager, assert_resumable, rng_state, run_directory, seed_everything, set_rng_state
from veorl.config import Params, PretrainParams
from veorl.data.clips import MANIFEST, ClipStore, clips_hash
from veorl.data.episodes import EpisodeStore, dataset_hash
from veorl.data.samplers import ClipSampler, EpisodeWindowSampler, JointSampler, Prefetcher
from veorl.models.ban import codebook_stats
from veorl.models.networks import IMAGE_SIZE, postprocess, preprocess
from veorl.models.world_models import VideoWorldModel, save_world_model
from veorl.storage import atomic_path, atomic_write_json, provenance

log = logging.getLogger(__name__)

CONFIG_SECTIONS = ("model", "pretrain")
# Each phase draws its batches from its own RNG streams, so phase 2 never replays phase 1's batches.
PHASE_STREAMS = {1: (0, 1), 2: (2, 3)}


# ------------------------------------------------------------------------------------------------
# Phase 1
# ------------------------------------------------------------------------------------------------


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)


class PhaseTrainer(abc.ABC):
    """Shared optimisation step: one Adam over the phase's trainable modules, gradient-norm clipping."""

    phase: int = 0

    def __init__(self, model: VideoWorldModel, cfg: PretrainParams):
        self.model, self.cfg = model, cfg
        self.parameters = [p for m in self.trainable_modules() for p in m.parameters()]
        self.optimizer = torch.optim.Adam(self.parameters, lr=cfg.optim.lr, eps=cfg.optim.eps)
        # Code counts since the last figure; kept on the model's device so counting never forces a sync.
        self.usage = torch.zeros(model.codebook.K, dtype=torch.float32, device=model.codebook.vectors.device)

    @abc.abstractmethod
    def trainable_modules(self) -> list[nn.Module]:
        """The modules this phase optimises (everything else stays untouched)."""

    @abc.abstractmethod
    def losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Scalar loss terms of one batch; "loss" is the total that is minimised."""

    def update(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns detached loss terms and the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.losses(batch)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.optim.grad_clip)
        self.optimizer.step()
        out = {k: v.detach() for k, v in terms.items() if isinstance(v, torch.Tensor) and v.dim() == 0}
        out["grad_norm"] = grad_norm.detach()
        return out

    def _count_codes(self, codes: torch.Tensor) -> None:
        self.usage += torch.bincount(codes.reshape(-1), minlength=self.model.codebook.K).to(self.usage.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "usage": self.usage.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.usage = state["usage"].to(self.usage.device, self.usage.dtype).clone()


class Phase1Trainer(PhaseTrainer):
    """Latent behaviours + Plan Net on frame sequences (encoder, BAN, codebook, Plan Net, decoder learn)."""

    phase = 1

    def trainable_modules(self) -> list[nn.Module]:
        m = self.model
        return [m.encoder, m.ban, m.codebook, m.plan_net, m.decoder]

    @torch.no_grad()
    def initialise_codebook(self, batch: dict[str, dict[str, torch.Tensor]]) -> None:
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

    def losses(self, batch):
        m, cfg = self.model, self.cfg
        target = preprocess(batch["target"]["image"])
        source = preprocess(batch["source"]["image"])
        (b, t), (bs, ts) = target.shape[:2], source.shape[:2]
        # One encoder pass over every frame of both domains; the same tensor is the decoder's target.
        frames = torch.cat([_frames(target), _frames(source)])
        embed = m.encoder(frames)
        target_embed = embed[: b * t].reshape(b, t, -1)
        source_embed = embed[b * t:].reshape(bs, ts, -1)
        mmd = linear_mmd(source_embed, target_embed)

        sequences = [target_embed] + ([source_embed] if cfg.ban_on_source else [])
        pre_quant = [m.ban(e) for e in sequences]
        flat_z = torch.cat([z.reshape(-1, z.shape[-1]) for z in pre_quant])
        flat_zq, codes, vq = m.codebook.quantise(flat_z, beta=cfg.vq_beta)
        self._count_codes(codes)

        posts, priors, features = [], [], []
        offset = 0
        for e, z in zip(sequences, pre_quant):
            count = z.shape[0] * z.shape[1]
            latent_action = flat_zq[offset:offset + count].reshape(z.shape)
            offset += count
            # The Plan Net's action at frame t is the latent action of t-1 -> t (none before frame 0).
            prev_action = torch.cat([latent_action.new_zeros(z.shape[0], 1, z.shape[-1]), latent_action], 1)
            post, prior = m.plan_net.observe(e, prev_action)
            posts.append(post)
            priors.append(prior)
            features.append(m.plan_net.feature(post).reshape(-1, m.feat_dim))
        pixels = frames if cfg.ban_on_source else frames[: b * t]
        image = -m.decoder.log_prob(torch.cat(features), pixels).mean()
        kl, kl_value = m.plan_net.kl_loss(flat_states(*posts), flat_states(*priors), balance=cfg.kl_balance,
                                          free=cfg.free_nats)
        loss = image + cfg.kl_scale * kl + vq + cfg.mmd_weight * mmd
        return {"loss": loss, "image_nll": image, "kl_loss": kl, "kl": kl_value, "vq": vq, "mmd": mmd}


# ------------------------------------------------------------------------------------------------
# Phase 2
# ------------------------------------------------------------------------------------------------


@dataclass
class KeyframeBatch:
    """Source and target keyframe sequences joined along the batch (target rows first)."""

    frame_index: torch.Tensor   # (N, K+1) index into the flat frame tensor of both domains
    prev_action: torch.Tensor   # (N, K+1, Z)
    mask: torch.Tensor          # (N, K+1)
    next_action: torch.Tensor   # (N, K+1, Z)
    next_mask: torch.Tensor     # (N, K+1)
    target_rows: int
    segments: list[Segments] = field(default_factory=list)


class Phase2Trainer(PhaseTrainer):
    """Keyframe Plan Net + F_BC (encoder, Plan Net, keyframe decoder, F_BC learn; BAN side frozen)."""

    phase = 2

    def __init__(self, model: VideoWorldModel, cfg: PretrainParams):
        if not bool(model.behaviour_frozen):
            raise RuntimeError("phase 2 needs the phase-1 BAN side frozen: call model.freeze_behaviours() first")
        super().__init__(model, cfg)

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
            e = embed[offset:offset + b * t].reshape(b, t, -1)
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

    def losses(self, batch):
        m, cfg = self.model, self.cfg
        target = preprocess(batch["target"]["image"])
        source = preprocess(batch["source"]["image"])
        frames = torch.cat([_frames(target), _frames(source)])
        kf = self.keyframes(frames, [tuple(target.shape[:2]), tuple(source.shape[:2])])
        for seg in kf.segments:
            self._count_codes(seg.code[seg.mask])
        rows, slots = kf.mask.shape
        valid = kf.mask.reshape(-1)
        # Only real keyframes are encoded; padded slots get zero embeddings. They come after every real
        # slot of their row, so they cannot influence a real slot's state, and every loss masks them.
        keyframe_pixels = frames[kf.frame_index.reshape(-1)[valid]]
        valid_embed = m.encoder(keyframe_pixels)
        embed = valid_embed.new_zeros(rows * slots, valid_embed.shape[-1]).index_put((valid.nonzero(as_tuple=True)[0],),
                                                                                  valid_embed)
        embed = embed.reshape(rows, slots, -1)
        post, prior = m.plan_net.observe(embed, kf.prev_action)
        feature = m.plan_net.feature(post)
        image = -m.keyframe_decoder.log_prob(feature.reshape(-1, m.feat_dim)[valid], keyframe_pixels).mean()
        kl, kl_value = m.plan_net.kl_loss(post, prior, balance=cfg.kl_balance, free=cfg.free_nats, mask=kf.mask)
        # Like a reward head, F_BC's gradient also shapes the Plan Net state it reads.
        fbc_error = (m.fbc(feature) - kf.next_action).square().mean(-1)
        fbc = masked_mean(fbc_error, kf.next_mask)
        n_target = kf.target_rows
        mmd = linear_mmd(embed[n_target:], embed[:n_target], kf.mask[n_target:], kf.mask[:n_target])
        loss = image + cfg.kl_scale * kl + fbc + cfg.mmd_weight * mmd
        behaviours = kf.mask[:, 1:].sum(1).to(torch.float32)
        return {"loss": loss, "image_nll": image, "kl_loss": kl, "kl": kl_value, "fbc": fbc, "mmd": mmd,
                "behaviours_per_seq": behaviours.mean(), "keyframes": valid.sum().to(torch.float32)}


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
            grid[y:y + h, x:x + w] = frames[r, c]
    return grid


@torch.no_grad()
def reconstruction_figure(model: VideoWorldModel, images: torch.Tensor, frames: int = 8) -> np.ndarray:
    """Row 1: target frames; row 2: Plan Net posterior reconstructions through the phase-1 decoder."""
    x = preprocess(images[:1, :frames])
    embed = model.encoder(x)
    latent_action, _ = model.codebook.nearest(model.ban(model.behaviour_embed(x)))
    prev = torch.cat([latent_action.new_zeros(1, 1, latent_action.shape[-1]), latent_action], 1)
    post, _ = model.plan_net.observe(embed, prev, sample=False)
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
def open_loop_figure(model: VideoWorldModel, images: torch.Tensor, codes: list[int], horizon: int, keyframe: bool,
                     context: int = 4) -> np.ndarray:
    """One row per latent behaviour: from the same start state, the Plan Net rolled forward with that
    codebook vector held fixed, decoded (first column: the start frame's reconstruction)."""
    x = preprocess(images[:1, :context])
    embed = model.encoder(x)
    latent_action, _ = model.codebook.nearest(model.ban(model.behaviour_embed(x)))
    prev = torch.cat([latent_action.new_zeros(1, 1, latent_action.shape[-1]), latent_action], 1)
    post, _ = model.plan_net.observe(embed, prev, sample=False)
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
# Driver: phases, checkpoints, tracking, outputs
# ------------------------------------------------------------------------------------------------


def upstream_hashes(clips: str | Path, episodes: str | Path) -> dict[str, str]:
    """Hashes of the input datasets: the clip manifest (it lists every shard) and the episodes' card."""
    return {"video_clips": clips_hash(clips), "target_episodes": dataset_hash(episodes)}


@dataclass
class TrainingState:
    phase: int = 1                     # phase being trained (or last finished)
    step: int = 0                      # updates done in that phase
    curve: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)


def _write_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = ["step", "phase", "phase_step"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def pretrain(params: Params, clips: str | Path, episodes: str | Path, out: str | Path,
             checkpoints: str | Path | None = None, parent_run_id: str | None = None,
             metrics_path: str | Path = "metrics/pretrain.json", curve_path: str | Path = "metrics/pretrain_curve.csv",
             on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) phases 1 and 2 and write the world-model artifact and metrics. Returns the metrics.

    on_step(global_step) is called after every update (tests use it to simulate a kill).
    """
    from tqdm import tqdm

    from veorl.runtime import configure_torch_threads, resolve_device

    cfg = params.pretrain
    configure_torch_threads(cfg.threads)
    device = torch.device(resolve_device(cfg.device))
    clip_store = ClipStore(clips)
    if clip_store.size != params.model.image_size:
        raise ValueError(f"{Path(clips) / MANIFEST}: clips are {clip_store.size}x{clip_store.size}, "
                         f"the model needs {params.model.image_size}x{params.model.image_size}")
    episode_store = EpisodeStore(episodes, image_size=params.model.image_size)
    # Fail before any MLflow run or checkpoint exists when the data cannot feed the configured batches.
    EpisodeWindowSampler(episode_store, cfg.batch, cfg.seq_len, cfg.seed)
    ClipSampler(clip_store, cfg.source_batch, cfg.source_len, cfg.seed)
    upstream = upstream_hashes(clips, episodes)
    run_config = {**params.section_dict(*CONFIG_SECTIONS), "upstream": upstream}

    seed_everything(cfg.seed)
    model = VideoWorldModel(params.model).to(device)
    if checkpoints is not None:
        checkpoints = run_directory(checkpoints, run_config)
    manager = CheckpointManager(checkpoints) if checkpoints is not None else None
    state = TrainingState()
    saved = manager.load_latest() if manager is not None else None
    if saved is not None:
        assert_resumable(saved["config"], run_config, where=f"checkpoint in {checkpoints}")
        model.load_state_dict(saved["model"])
        state = TrainingState(phase=saved["phase"], step=saved["step"], curve=saved["curve"], summary=saved["summary"])
        log.info("resuming pretraining at phase %d step %d from %s", state.phase, state.step, checkpoints)
    elif checkpoints is None:
        log.info("no --checkpoints directory: this run cannot be resumed if interrupted")

    totals = {1: cfg.phase1_steps, 2: cfg.phase2_steps}
    if saved is not None and state.phase == 2 and saved.get("phase1_steps", totals[1]) != totals[1]:
        log.warning("phase 2 already started after %s phase-1 steps; pretrain.phase1_steps=%d is ignored",
                    saved.get("phase1_steps"), totals[1])
        totals[1] = saved["phase1_steps"]
    per_step_sequences = cfg.batch + cfg.source_batch
    per_step_frames = cfg.batch * cfg.seq_len + cfg.source_batch * cfg.source_len
    started = time.perf_counter()

    with tracking.stage_run("pretrain", params, parent_run_id, run_dir=checkpoints, sections=CONFIG_SECTIONS + ("tracking",),
                            upstream=upstream) as run:
        for phase, trainer_cls in ((1, Phase1Trainer), (2, Phase2Trainer)):
            if state.phase > phase:
                continue
            if phase == 2:
                model.freeze_behaviours()
            trainer = trainer_cls(model, cfg)
            start = state.step if state.phase == phase else 0
            if saved is not None and saved["phase"] == phase:
                trainer.load_state_dict(saved["trainer"])
                set_rng_state(saved["rng"])
                saved = None
            state.phase, state.step = phase, start
            total = totals[phase]
            offset = sum(totals[p] for p in totals if p < phase)
            target_stream, source_stream = PHASE_STREAMS[phase]
            sampler = JointSampler(
                target=EpisodeWindowSampler(episode_store, cfg.batch, cfg.seq_len, cfg.seed, target_stream, keys=("image",)),
                source=ClipSampler(clip_store, cfg.source_batch, cfg.source_len, cfg.seed, source_stream),
            )

            def checkpoint(done: int) -> None:
                if manager is None:
                    return
                manager.save(offset + done, {
                    "format": 1, "phase": phase, "step": done, "phase1_steps": totals[1], "config": run_config,
                    "model": model.state_dict(), "trainer": trainer.state_dict(), "rng": rng_state(),
                    "sampler": sampler.state_dict(), "curve": state.curve, "summary": state.summary,
                    "mlflow_run_id": run.run_id,
                })

            summary = state.summary.setdefault(f"phase{phase}", {})
            session_steps, train_time, wait_time = 0, 0.0, 0.0
            bar = tqdm(total=total, initial=start, desc=f"pretrain phase {phase}", unit="step", file=sys.stderr,
                       dynamic_ncols=True, disable=total == 0)
            with Prefetcher(sampler, start, total, depth=cfg.prefetch, device=device) as batches:
                iterator = iter(batches)
                while True:
                    t0 = time.perf_counter()
                    try:
                        step, batch = next(iterator)
                    except StopIteration:
                        break
                    t1 = time.perf_counter()
                    if phase == 1 and step == 0 and cfg.codebook_init == "data":
                        trainer.initialise_codebook(batch)
                    terms = trainer.update(batch)
                    t2 = time.perf_counter()
                    wait_time += t1 - t0
                    train_time += t2 - t0
                    session_steps += 1
                    done = step + 1
                    state.step = done
                    global_step = offset + done
                    if done % cfg.log_every == 0 or done == total:
                        values = {k: float(v) for k, v in terms.items()}
                        stats = codebook_stats(trainer.usage.cpu().double())
                        steps_per_s = session_steps / max(train_time, 1e-9)
                        values.update({"codebook_perplexity": stats.perplexity, "codebook_used": stats.used,
                                       "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * per_step_sequences,
                                       "frames_per_s": steps_per_s * per_step_frames,
                                       "data_wait_fraction": wait_time / max(train_time, 1e-9)})
                        state.curve.append({"step": global_step, "phase": phase, "phase_step": done,
                                            **{k: round(v, 6) for k, v in values.items()}})
                        tracking.log_metrics({f"phase{phase}/{k}": v for k, v in values.items()}, step=global_step)
                        summary.update({"steps": done, "final": {k: values[k] for k in terms}, "codebook_perplexity":
                                        stats.perplexity, "codebook_used": stats.used,
                                        "throughput": {k: values[k] for k in ("steps_per_s", "samples_per_s", "frames_per_s",
                                                                               "data_wait_fraction")}})
                        bar.set_postfix(loss=f"{values['loss']:.1f}", ppl=f"{stats.perplexity:.1f}")
                    if done % cfg.image_log_every == 0 or done == total:
                        _log_figures(model, batch, trainer, phase, global_step)
                        trainer.usage.zero_()
                    if done % cfg.checkpoint_every == 0 or done == total:
                        checkpoint(done)
                    bar.update(1)
                    if on_step is not None:
                        on_step(global_step)
            bar.close()
            summary.setdefault("steps", state.step)
            if session_steps:
                log.info("phase %d: %d updates in %.1f s (%.2f steps/s, data wait %.0f%%)", phase, session_steps,
                         train_time, session_steps / train_time, 100 * wait_time / max(train_time, 1e-9))
        model.freeze_behaviours()  # a run with phase2_steps=0 still hands over a frozen BAN side
        metrics = {"phase1": state.summary.get("phase1", {}), "phase2": state.summary.get("phase2", {}),
                   "codebook_perplexity": state.summary.get("phase1", {}).get("codebook_perplexity"),
                   "elapsed_s": time.perf_counter() - started, "device": str(device),
                   "resumed": bool(run.resumed), "mlflow_run_id": run.run_id}
        out = Path(out)
        config = params.section_dict(*CONFIG_SECTIONS)
        prov = provenance(config, upstream, stage="pretrain", mlflow_run_id=run.run_id)
        save_world_model(out, model, config, prov)
        atomic_write_json(metrics_path, metrics)
        _write_curve(Path(curve_path), state.curve)
        tracking.log_artifact(out, "video_world_model")
        tracking.log_artifact(metrics_path, "metrics")
        tracking.log_artifact(curve_path, "metrics")
    return metrics


def _log_figures(model: VideoWorldModel, batch: dict[str, dict[str, torch.Tensor]], trainer: PhaseTrainer, phase: int,
                 global_step: int) -> None:
    if tracking.active_run_id() is None:
        return
    target = batch["target"]["image"]
    usage = trainer.usage.cpu().double()
    top_codes = [int(c) for c in torch.argsort(usage, descending=True)[:6] if usage[c] > 0] or [0]
    tag = f"step{global_step:07d}"
    recon = reconstruction_figure(model, target) if phase == 1 else keyframe_figure(model, target)
    tracking.log_image(recon, f"figures/phase{phase}/reconstruction_{tag}.png")
    horizon = min(8, target.shape[1]) if phase == 1 else 4
    tracking.log_image(open_loop_figure(model, target, top_codes, horizon, keyframe=phase == 2),
                       f"figures/phase{phase}/open_loop_{tag}.png")
    tracking.log_figure(usage_figure(usage, f"phase {phase} codebook usage"),
                        f"figures/phase{phase}/codebook_usage_{tag}.png")


__all__ = ["Phase1Trainer", "Phase2Trainer", "PhaseTrainer", "pretrain", "upstream_hashes", "image_grid",
           "reconstruction_figure", "keyframe_figure", "open_loop_figure", "usage_figure"]
