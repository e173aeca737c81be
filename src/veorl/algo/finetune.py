"""Fine-tuning: the Trunk Net world model on target data, then phase 3 policy learning with behaviour guidance.

Two phases, each its own class and loop (method doc: docs/method.md, "Phase 3"):

WorldModelPhase  the Trunk Net world model on target sequences: image NLL + reward NLL (rewards times
                 finetune.reward_scale) + balanced KL, + mmd_weight * linear MMD(source, target embeddings)
                 when MMD is on and clips are given; its encoder starts from pretraining (veorl).
                 With guidance="aligned" it also trains the guidance in the space where it is used:
                 F_BC on Trunk Net features with targets from the frozen BAN (the quantised latent action
                 of (t, t+1)), and the map M from Trunk Net features to Plan Net states, fitted to the Plan
                 Net posterior on the same target frames. Both read detached features: they follow the
                 Trunk Net without shaping it. guidance="release" trains neither (the authors' behaviour).
PolicyPhase      world model frozen: imagination from every posterior state of a target batch
                 (veorl.algo.imagination), lambda-returns with a slow critic, actor by backpropagation
                 through the Trunk Net dynamics (continuous actions) or REINFORCE with the slow critic as
                 baseline (discrete actions), critic by the NLL of the lambda-return.

The `bc` baseline replaces both by BehaviourCloning (veorl.algo.baselines).

Resuming: every batch is a pure function of (seed, stream, step) and every update reseeds torch from
(seed, phase, step), so a run resumed from a checkpoint (weights, optimiser states, counters, curve)
takes exactly the updates an uninterrupted run would have taken.
"""

from __future__ import annotations

import copy
import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from veorl.algo.baselines import BehaviourCloning, Switches, switches
from veorl.algo.imagination import BehaviourGuidance, PlanStateMap, check_release_compatible, imagine
from veorl.algo.returns import discount_weights, lambda_return
from veorl.algo.world_model_losses import linear_mmd, trunk_world_model_loss
from veorl.config import ModelParams, Params
from veorl.data.clips import clips_hash
from veorl.data.episodes import CARD, dataset_hash
from veorl.models.actor_critic import Actor, Critic, PixelPolicy, policy_inputs
from veorl.models.networks import preprocess
from veorl.models.rssm import RSSMState
from veorl.models.world_models import TrunkWorldModel, VideoWorldModel, build_trunk_world_model
from veorl.storage import atomic_path, atomic_write_json, read_json, tree_hash
from veorl.trees import numeric_leaves

log = logging.getLogger(__name__)

STAGE = "finetune"
SECTIONS = ("model", "finetune")
# Streams of the per-step batch RNG (veorl.data.samplers.step_rng) and of the per-update torch seed.
TARGET_STREAM, SOURCE_STREAM, START_STREAM, BC_STREAM = 10, 11, 12, 13
PHASE_SEED = {"world_model": 1, "policy": 2, "bc": 3}
# Model sizes the video world model was pretrained with; the Trunk Net must share them to reuse its parts.
PRETRAINED_SIZE_KEYS = ("cnn_depth", "deter", "stoch", "stoch_classes", "rssm_kind", "hidden", "min_std", "ban_hidden",
                        "latent_action_dim", "codebook_size", "fbc_hidden")
CURVE_COLUMNS = (
    "step", "phase",
    "wm_loss", "image_nll", "reward_nll", "kl", "kl_value", "mmd", "fbc_loss", "map_loss", "wm_grad_norm",
    "actor_loss", "critic_loss", "imagined_return", "imagined_reward", "intrinsic", "entropy", "value",
    "actor_grad_norm", "critic_grad_norm",
    "bc_loss", "bc_mse", "bc_grad_norm",
    "seconds_per_update", "samples_per_second",
)


class FinetuneError(ValueError):
    """Bad inputs to fine-tuning (missing artifact, incompatible sizes); the message names the file or key."""


def reseed(seed: int, phase: str, step: int) -> None:
    """Seed torch for one update from (seed, phase, step) alone, so a resumed run draws the same noise."""
    state = np.random.SeedSequence([int(seed), PHASE_SEED[phase], int(step)]).generate_state(1, dtype=np.uint64)[0]
    torch.manual_seed(int(state) & ((1 << 63) - 1))


def _clip_step(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], clip: float) -> float:
    grad_norm = torch.nn.utils.clip_grad_norm_(list(parameters), clip)
    optimizer.step()
    return float(grad_norm)


# ------------------------------------------------------------------------------------------------
# Phase A: the Trunk Net world model (and the aligned guidance)
# ------------------------------------------------------------------------------------------------


def plan_posterior_targets(video_wm: VideoWorldModel, image: torch.Tensor) -> tuple[torch.Tensor, RSSMState]:
    """What the frozen video model says about target frames (B, T): the quantised latent actions of
    (t, t+1) (B, T-1, Z) from the BAN, and the Plan Net posterior (B, T) filtered with those latent actions."""
    with torch.no_grad():
        latent_actions, _ = video_wm.infer_latent_actions(image)
        preceding = torch.cat([torch.zeros_like(latent_actions[:, :1]), latent_actions], 1)
        posterior, _ = video_wm.plan_net.observe(video_wm.encoder(image), preceding, sample=False)
    return latent_actions, posterior


class WorldModelPhase:
    """Updates of the Trunk Net world model on target windows (+ source clips for MMD, + aligned guidance)."""

    def __init__(self, trunk: TrunkWorldModel, params: Params, sw: Switches, video_wm: VideoWorldModel | None = None,
                 guidance: BehaviourGuidance | None = None):
        fp = params.finetune
        self.trunk, self.fp, self.sw, self.video_wm, self.guidance = trunk, fp, sw, video_wm, guidance
        self.optimizer = torch.optim.Adam(trunk.parameters(), lr=fp.world_model_optim.lr, eps=fp.world_model_optim.eps)
        self.train_guidance = guidance is not None and guidance.mode == "aligned"
        self.guidance_optimizer = None
        if self.train_guidance:
            if video_wm is None:
                raise FinetuneError("aligned guidance needs the video world model (BAN and Plan Net targets)")
            self.guidance_optimizer = torch.optim.Adam(self.guidance_parameters(), lr=fp.world_model_optim.lr,
                                                       eps=fp.world_model_optim.eps)

    def guidance_parameters(self) -> list[nn.Parameter]:
        return list(self.guidance.fbc.parameters()) + list(self.guidance.state_map.parameters())

    def losses(self, batch: dict[str, torch.Tensor], source: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """(world-model loss, guidance loss or None, metrics) of one batch; a pure function of the batch."""
        fp = self.fp
        image = preprocess(batch["image"])
        trunk = trunk_world_model_loss(self.trunk, image, batch["action"], batch["reward"], kl_balance=fp.kl_balance,
                                       free_nats=fp.free_nats, kl_scale=fp.kl_scale, reward_scale=fp.reward_scale)
        loss = trunk.loss
        metrics = {"image_nll": float(trunk.image.detach()), "reward_nll": float(trunk.reward.detach()),
                   "kl": float(trunk.kl.detach()), "kl_value": float(trunk.kl_value)}
        if self.sw.use_mmd and source is not None:
            mmd = linear_mmd(self.trunk.encoder(preprocess(source)), trunk.embed)
            loss = loss + fp.mmd_weight * mmd
            metrics["mmd"] = float(mmd.detach())
        metrics["wm_loss"] = float(loss.detach())
        guidance_loss = None
        if self.train_guidance:
            latent_actions, plan_posterior = plan_posterior_targets(self.video_wm, image)
            feature = self.trunk.trunk_net.feature(trunk.post).detach()
            # MSE to the quantised latent action, as in pretraining's phase 2
            fbc_loss = (self.guidance.fbc(feature[:, :-1]) - latent_actions).square().mean()
            map_loss = self.guidance.state_map.loss(feature, plan_posterior)
            guidance_loss = fbc_loss + map_loss
            metrics.update(fbc_loss=float(fbc_loss.detach()), map_loss=float(map_loss.detach()))
        return loss, guidance_loss, metrics

    def update(self, batch: dict[str, torch.Tensor], source: torch.Tensor | None) -> dict[str, float]:
        loss, guidance_loss, metrics = self.losses(batch, source)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["wm_grad_norm"] = _clip_step(self.optimizer, self.trunk.parameters(), self.fp.world_model_optim.grad_clip)
        if guidance_loss is not None:
            self.guidance_optimizer.zero_grad(set_to_none=True)
            guidance_loss.backward()
            _clip_step(self.guidance_optimizer, self.guidance_parameters(), self.fp.world_model_optim.grad_clip)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = {"trunk": self.trunk.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.train_guidance:
            state.update(fbc=self.guidance.fbc.state_dict(), state_map=self.guidance.state_map.state_dict(),
                         guidance_optimizer=self.guidance_optimizer.state_dict())
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
    actor: torch.Tensor
    critic: torch.Tensor
    metrics: dict[str, float]


class PolicyPhase:
    """Actor, critic and slow critic trained on imagined rollouts of the frozen Trunk Net."""

    def __init__(self, trunk: TrunkWorldModel, actor: Actor, critic: Critic, params: Params, sw: Switches,
                 guidance: BehaviourGuidance | None = None):
        fp = params.finetune
        if sw.needs_guidance and guidance is None:
            raise FinetuneError("the latent-action input and the intrinsic reward need behaviour guidance")
        self.trunk, self.actor, self.critic, self.fp, self.sw, self.guidance = trunk, actor, critic, fp, sw, guidance
        self.slow_critic = copy.deepcopy(critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(actor.parameters(), lr=fp.actor_optim.lr, eps=fp.actor_optim.eps)
        self.critic_optimizer = torch.optim.Adam(critic.parameters(), lr=fp.critic_optim.lr, eps=fp.critic_optim.eps)
        self.updates = 0

    def freeze_world_model(self) -> None:
        """Phase 3 never changes the world model; gradients pass through it into the actions only."""
        self.trunk.requires_grad_(False)
        if self.guidance is not None:
            self.guidance.requires_grad_(False)

    def start_states(self, batch: dict[str, torch.Tensor]) -> RSSMState:
        """Trunk Net posteriors of a target batch, every step of every sequence a start state: (B*T, ...)."""
        with torch.no_grad():
            embed = self.trunk.encoder(preprocess(batch["image"]))
            posterior, _ = self.trunk.trunk_net.observe(embed, batch["action"])
        return posterior.reshape_batch(-1).detach()

    def losses(self, start: RSSMState) -> PolicyLosses:
        fp, sw = self.fp, self.sw
        dynamics = self.actor.kind == "continuous"
        traj = imagine(self.trunk.trunk_net, start, self.actor, fp.horizon, self.guidance if sw.needs_guidance else None,
                       use_latent_action=sw.use_latent_action, use_intrinsic=sw.use_intrinsic, dynamics_gradient=dynamics)
        latent = traj.latent_actions if sw.use_latent_action else None
        # The slow critic reads the rollout's features with their graph: returns depend on where actions lead.
        values = self.slow_critic(policy_inputs(traj.features, latent))
        extrinsic = self.trunk.reward_head(traj.features[1:])
        reward = extrinsic + fp.intrinsic_weight * traj.intrinsic[1:] if sw.use_intrinsic else extrinsic
        discount = torch.full_like(reward, fp.discount)
        returns = lambda_return(reward, values[1:], discount, fp.lambda_)
        weights = discount_weights(discount)
        if dynamics:
            objective = returns
        else:
            objective = traj.log_probs * (returns - values[:-1]).detach()
        actor_loss = -(weights * (objective + fp.actor_entropy * traj.entropies)).mean()
        inputs = traj.policy_inputs(sw.use_latent_action)[:-1]
        critic_loss = (weights * Critic.nll(self.critic(inputs), returns.detach())).mean()
        metrics = {
            "actor_loss": float(actor_loss.detach()), "critic_loss": float(critic_loss.detach()),
            "imagined_return": float(returns.detach().mean()), "imagined_reward": float(extrinsic.detach().mean()),
            "intrinsic": float(traj.intrinsic[1:].detach().mean()), "entropy": float(traj.entropies.detach().mean()),
            "value": float(values.detach().mean()),
        }
        return PolicyLosses(actor_loss, critic_loss, metrics)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        out = self.losses(self.start_states(batch))
        self.actor_optimizer.zero_grad(set_to_none=True)
        out.actor.backward()
        actor_grad = _clip_step(self.actor_optimizer, self.actor.parameters(), self.fp.actor_optim.grad_clip)
        self.critic_optimizer.zero_grad(set_to_none=True)
        out.critic.backward()
        critic_grad = _clip_step(self.critic_optimizer, self.critic.parameters(), self.fp.critic_optim.grad_clip)
        self.updates += 1
        if self.updates % self.fp.slow_critic_every == 0:
            self.slow_critic.load_state_dict(self.critic.state_dict())
        return {**out.metrics, "actor_grad_norm": actor_grad, "critic_grad_norm": critic_grad}

    def state_dict(self) -> dict[str, Any]:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(), "slow_critic": self.slow_critic.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.slow_critic.load_state_dict(state["slow_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.updates = int(state["updates"])


# ------------------------------------------------------------------------------------------------
# Building the pieces from the inputs
# ------------------------------------------------------------------------------------------------


def dataset_metadata(episodes: str | Path, params: Params, action_dim: int) -> dict[str, Any]:
    """env/task/camera/episode length of the target data: from its card.json, else from params.collect."""
    card_path = Path(episodes) / CARD
    card = read_json(card_path) if card_path.is_file() else {}
    collect = params.collect
    fallback = {"env": collect.env, "task": collect.task, "camera": collect.camera, "episode_length": collect.episode_length}
    missing = [k for k in fallback if k not in card]
    if missing:
        log.warning("%s does not say %s; taking them from params.collect", card_path, missing)
    return {
        "env": card.get("env", fallback["env"]), "task": card.get("task", fallback["task"]),
        "camera": card.get("camera", fallback["camera"]),
        "episode_length": int(card.get("episode_length", fallback["episode_length"])),
        "action_dim": int(action_dim), "action_kind": card.get("action_kind", "continuous"),
    }


def check_pretrained_sizes(model: ModelParams, video_wm: VideoWorldModel, where: str) -> None:
    ours, theirs = model.model_dump(), video_wm.params.model_dump()
    differ = [f"model.{k}: params {ours[k]!r}, world model {theirs[k]!r}" for k in PRETRAINED_SIZE_KEYS if ours[k] != theirs[k]]
    if differ:
        raise FinetuneError(f"{where} was pretrained with other model sizes; re-run pretraining or restore them:\n  "
                            + "\n  ".join(differ))


def build_guidance(video_wm: VideoWorldModel, trunk: TrunkWorldModel, mode: str, model: ModelParams) -> BehaviourGuidance:
    """aligned: a trainable copy of F_BC and a new state map; release: the pretrained F_BC as it is."""
    video_wm.requires_grad_(False)
    if mode == "aligned":
        fbc = copy.deepcopy(video_wm.fbc).requires_grad_(True)
        state_map = PlanStateMap(trunk.feat_dim, video_wm.plan_net, units=model.head_units, layers=2)
        return BehaviourGuidance(fbc, video_wm.codebook, video_wm.plan_net, "aligned", state_map)
    check_release_compatible(trunk.trunk_net, video_wm.plan_net)
    return BehaviourGuidance(video_wm.fbc, video_wm.codebook, video_wm.plan_net, "release")


def agent_modules(algo: str, trunk: TrunkWorldModel | None, actor: Actor | None, guidance: BehaviourGuidance | None,
                  sw: Switches, policy: PixelPolicy | None = None) -> nn.ModuleDict:
    """Exactly what acting needs, in the layout veorl.agent.build_agent_modules rebuilds."""
    if algo == "bc":
        return nn.ModuleDict({"policy": policy})
    modules: dict[str, nn.Module] = {"encoder": trunk.encoder, "trunk_net": trunk.trunk_net}
    if sw.use_latent_action:
        modules.update(fbc=guidance.fbc, codebook=guidance.codebook)
    modules["actor"] = actor
    return nn.ModuleDict(modules)


# ------------------------------------------------------------------------------------------------
# Curve and metrics files
# ------------------------------------------------------------------------------------------------


class MetricWindow:
    """Averages of metrics since the last log."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def flush(self) -> dict[str, float]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out


def write_curve(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CURVE_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


@dataclass
class PhaseLoop:
    """One phase's loop: `update(batch)` for steps [done, total), checkpoints and logs by global step."""

    name: str
    total: int
    offset: int                     # global step of this phase's step 0
    samples_per_update: int
    update: Callable[[dict[str, Any]], dict[str, float]]
    make_batch: Callable[[int], dict[str, Any]]


def upstream_hashes(world_model: str | None, episodes: str, clips: str | None, sw: Switches) -> dict[str, str]:
    hashes = {"target_episodes": dataset_hash(episodes)}
    if world_model is not None and sw.needs_video_world_model:
        hashes["world_model"] = tree_hash(world_model)
    if clips is not None and sw.use_mmd:
        hashes["video_clips"] = clips_hash(clips)
    return hashes


def finetune(world_model: str | None, episodes: str, out: str, params: Params, clips: str | None = None,
             checkpoints: str | None = None, metrics_path: str | None = "metrics/finetune.json",
             curve_path: str | None = "metrics/finetune_curve.csv", parent_run_id: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Train (or resume) and write the agent artifact to `out`; returns the summary written to metrics_path."""
    from tqdm import tqdm

    from veorl import tracking
    from veorl.agent import build_agent_modules, save_agent
    from veorl.checkpoint import CheckpointManager, CheckpointMismatch, assert_resumable, run_directory
    from veorl.data.clips import ClipStore
    from veorl.data.episodes import EpisodeStore
    from veorl.data.samplers import ClipSampler, EpisodeWindowSampler, Prefetcher
    from veorl.models.world_models import load_world_model
    from veorl.runtime import configure_torch_threads, resolve_device, write_resolved_config

    fp, model = params.finetune, params.model
    sw = switches(fp)
    device = resolve_device(fp.device)
    configure_torch_threads(fp.threads)
    torch.manual_seed(fp.seed)

    store = EpisodeStore(episodes, image_size=model.image_size)
    action_dim = int(store.episode(0)["action"].shape[1])
    meta = dataset_metadata(episodes, params, action_dim)
    if sw.use_mmd and clips is None:
        log.warning("finetune.use_mmd is on but no --clips were given: training the Trunk Net without MMD")
        sw = Switches(sw.pretrained_encoder, False, sw.use_latent_action, sw.use_intrinsic)
    clip_store = None
    if sw.use_mmd:
        clip_store = ClipStore(clips)
        if fp.source_len > clip_store.window:
            raise FinetuneError(f"finetune.source_len={fp.source_len} exceeds the {clip_store.window}-frame clips in {clips}")

    video_wm = None
    if fp.algo != "bc" and sw.needs_video_world_model:
        if world_model is None:
            raise FinetuneError(f"finetune.algo={fp.algo} uses the video world model: pass --world-model")
        video_wm, _ = load_world_model(world_model, device=device)
        check_pretrained_sizes(model, video_wm, world_model)
    upstream = upstream_hashes(world_model, episodes, clips, sw)

    # -- the networks ------------------------------------------------------------------------------
    trunk = guidance = actor = critic = policy = None
    loops: list[PhaseLoop] = []
    phases: dict[str, Any] = {}
    seq_samples = fp.batch * fp.seq_len
    if fp.algo == "bc":
        policy = PixelPolicy(model.cnn_depth, action_dim, model.actor_units, model.actor_layers).to(device)
        phases["bc"] = BehaviourCloning(policy, fp)
        bc_batches = EpisodeWindowSampler(store, fp.batch, fp.seq_len, fp.seed, BC_STREAM, keys=("image", "action"))
        loops.append(PhaseLoop("bc", fp.bc_steps, 0, fp.batch * (fp.seq_len - 1), phases["bc"].update, bc_batches))
    else:
        trunk = build_trunk_world_model(model, action_dim, video_wm if sw.pretrained_encoder else None).to(device)
        if sw.needs_guidance:
            guidance = build_guidance(video_wm, trunk, fp.guidance, model).to(device)
        feat_dim = trunk.feat_dim + (model.latent_action_dim if sw.use_latent_action else 0)
        actor = Actor(feat_dim, action_dim, model.actor_units, model.actor_layers, kind=meta["action_kind"],
                      min_std=model.actor_min_std).to(device)
        critic = Critic(feat_dim, model.critic_units, model.critic_layers).to(device)
        phases["world_model"] = WorldModelPhase(trunk, params, sw, video_wm, guidance)
        phases["policy"] = PolicyPhase(trunk, actor, critic, params, sw, guidance)
        target = EpisodeWindowSampler(store, fp.batch, fp.seq_len, fp.seed, TARGET_STREAM, keys=("image", "action", "reward"))
        source = ClipSampler(clip_store, fp.source_batch, fp.source_len, fp.seed, SOURCE_STREAM) if clip_store else None

        def world_model_batch(step: int) -> dict[str, Any]:
            batch = dict(target(step))
            if source is not None:
                batch["source"] = source(step)["image"]
            return batch

        def world_model_update(batch: dict[str, Any]) -> dict[str, float]:
            return phases["world_model"].update(batch, batch.get("source"))

        starts = EpisodeWindowSampler(store, fp.batch, fp.seq_len, fp.seed, START_STREAM, keys=("image", "action"))
        loops.append(PhaseLoop("world_model", fp.world_model_steps, 0, seq_samples, world_model_update, world_model_batch))
        loops.append(PhaseLoop("policy", fp.policy_steps, fp.world_model_steps, seq_samples * fp.horizon,
                               phases["policy"].update, starts))

    # -- resume ------------------------------------------------------------------------------------
    config = params.section_dict(*SECTIONS)
    if checkpoints:
        # one folder per (maths-relevant config, inputs): a new world model or a `dvc exp run -S` variation
        # trains in its own folder instead of being refused by the persisted one
        checkpoints = run_directory(checkpoints, {**config, "upstream": upstream})
    manager = CheckpointManager(checkpoints) if checkpoints else None
    progress_state = {loop.name: 0 for loop in loops}
    curve: list[dict[str, Any]] = []
    elapsed = {loop.name: 0.0 for loop in loops}
    saved = manager.load_latest() if manager else None
    if saved is not None:
        assert_resumable(saved["config"], config, where=f"{checkpoints}")
        if saved["upstream"] != upstream:
            raise CheckpointMismatch(f"refusing to resume from {checkpoints}: its inputs differ (checkpoint "
                                     f"{saved['upstream']}, now {upstream}); delete the directory to train from scratch")
        for name, state in saved["phases"].items():
            phases[name].load_state_dict(state)
        progress_state.update(saved["progress"])
        curve = list(saved["curve"])
        elapsed.update(saved["elapsed"])
        log.info("resumed from %s at %s", checkpoints, progress_state)

    def checkpoint(global_step: int) -> None:
        if manager is None:
            return
        manager.save(global_step, {"config": config, "upstream": upstream, "progress": dict(progress_state),
                                   "phases": {n: p.state_dict() for n, p in phases.items()}, "curve": curve,
                                   "elapsed": dict(elapsed)})

    # -- train -------------------------------------------------------------------------------------
    run_dir = checkpoints
    with tracking.stage_run(STAGE, params, parent_run_id, run_dir=run_dir, sections=SECTIONS, upstream=upstream,
                            tags={"veorl.algo": fp.algo, "veorl.guidance": fp.guidance}) as stage:
        for loop in loops:
            done = min(progress_state[loop.name], loop.total) if loop.name in progress_state else 0
            if loop.name == "policy":
                phases["policy"].freeze_world_model()
            if done >= loop.total:
                continue
            window = MetricWindow()
            bar = tqdm(total=loop.total, initial=done, desc=f"finetune {loop.name}", unit="update", disable=not progress)
            with Prefetcher(loop.make_batch, done, loop.total, depth=fp.prefetch, device=device) as batches:
                for step, batch in batches:
                    reseed(fp.seed, loop.name, step)
                    started = time.perf_counter()
                    metrics = loop.update(batch)
                    seconds = time.perf_counter() - started
                    elapsed[loop.name] += seconds
                    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
                    if bad:
                        raise FloatingPointError(f"finetune {loop.name} step {step + 1}: non-finite {bad} ({metrics})")
                    window.add({**metrics, "seconds_per_update": seconds, "samples_per_second": loop.samples_per_update / seconds})
                    progress_state[loop.name] = step + 1
                    global_step = loop.offset + step + 1
                    bar.update(1)
                    if (step + 1) % fp.log_every == 0 or step + 1 == loop.total:
                        row = window.flush()
                        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("wm_loss", "actor_loss", "imagined_return", "bc_loss")
                                         if k in row})
                        curve.append({"step": global_step, "phase": loop.name, **row})
                        tracking.log_metrics({f"{loop.name}/{k}": v for k, v in row.items()}, step=global_step)
                    if (step + 1) % fp.checkpoint_every == 0 or step + 1 == loop.total:
                        checkpoint(global_step)
            bar.close()

        # -- the agent artifact ----------------------------------------------------------------------
        agent_meta = {
            "algo": fp.algo, **meta, "image_size": model.image_size, "model": model.model_dump(mode="json"),
            "use_latent_action": sw.use_latent_action, "guidance": fp.guidance if sw.needs_guidance else None,
            "switches": {"pretrained_encoder": sw.pretrained_encoder, "use_mmd": sw.use_mmd,
                         "use_latent_action": sw.use_latent_action, "use_intrinsic": sw.use_intrinsic},
            "bc": {"units": model.actor_units, "layers": model.actor_layers, "loss": fp.bc_loss} if fp.algo == "bc" else None,
            "trained_updates": dict(progress_state), "mlflow_run_id": stage.run_id,
        }
        modules = agent_modules(fp.algo, trunk, actor, guidance, sw, policy)
        expected = build_agent_modules(agent_meta)
        if set(expected.state_dict()) != set(modules.state_dict()):
            raise RuntimeError("the agent modules do not match the layout veorl.agent rebuilds")
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "agent.json").unlink(missing_ok=True)
        write_resolved_config(out, params, SECTIONS, upstream=upstream, algo=fp.algo)
        save_agent(out, modules, agent_meta)

        summary = summarise(fp.algo, curve, progress_state, elapsed, loops)
        summary.update(task=meta["task"], agent=str(out))
        tracking.log_metrics({f"final/{k}": v for k, v in numeric_leaves(summary).items()})
        tracking.log_dict(agent_meta, "agent/agent.json")
        if metrics_path:
            atomic_write_json(metrics_path, summary)
            tracking.log_artifact(metrics_path)
        if curve_path:
            write_curve(curve_path, curve)
            tracking.log_artifact(curve_path)
    return summary




def summarise(algo: str, curve: list[dict[str, Any]], progress: dict[str, int], elapsed: dict[str, float],
              loops: list[PhaseLoop]) -> dict[str, Any]:
    """metrics/finetune.json: the last logged window of each phase, update counts, time and throughput."""
    summary: dict[str, Any] = {"algo": algo, "updates": dict(progress), "seconds": {k: round(v, 3) for k, v in elapsed.items()}}
    for loop in loops:
        rows = [r for r in curve if r["phase"] == loop.name]
        if rows:
            summary[loop.name] = {k: v for k, v in rows[-1].items() if k not in ("step", "phase")}
        if elapsed.get(loop.name, 0.0) > 0 and progress.get(loop.name, 0) > 0:
            summary.setdefault("throughput", {})[f"{loop.name}_samples_per_second"] = round(
                loop.samples_per_update * progress[loop.name] / elapsed[loop.name], 3)
    return summary


__all__ = ["finetune", "WorldModelPhase", "PolicyPhase", "PolicyLosses", "build_guidance", "plan_posterior_targets",
           "dataset_metadata", "reseed", "FinetuneError", "CURVE_COLUMNS"]
