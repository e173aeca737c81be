"""Typed, validated parameters for every stage.

Resolution order (later wins):
  1. the field defaults below (the release's numbers from the method doc, i.e. the `paper` sizes, for the
     manipulation domain: Meta-World),
  2. the defaults of the domain named by `domain:` (DOMAINS: environment family, target task, source videos,
     model kind, behaviour-policy calibration; empty for `manipulation`),
  3. the preset named by `preset:` in params.yaml (or `--preset`), which changes sizes and step counts only,
  4. the domain's own part of that preset (DOMAIN_PRESETS: e.g. which source tasks the small presets film),
  5. whatever params.yaml writes explicitly,
  6. `--set section.key=value` overrides on the command line (`--set domain=driving` included).
So one `domain:` switch changes every stage, and an explicit key still wins over it. params.yaml therefore
writes no domain-specific key (environment, task, cameras, ...): written there, it would pin every domain to it.
A key the domains choose (DOMAIN_CHOSEN) written as null means "the domain's value": params.yaml says
`collect.task: null`, because DVC needs every key a stage lists in params.yaml.

Unknown keys and bad values fail at load time with the dotted key path and the reason.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """Raised for invalid parameters; the message names each bad key and why."""


Precision = Literal["auto", "fp32", "bf16"]


def training_precision_field() -> Any:
    """`precision` of a training stage (pretrain, finetune): one definition, so their meaning cannot drift apart."""
    return Field(
        default="auto",
        description="Numeric precision of the networks' forward passes: bf16 = bf16 autocast (losses, KL, returns, "
        "weights and optimiser state stay fp32); auto = bf16 on a CPU with AVX512-BF16 or AMX or on a CUDA GPU with "
        "bf16, fp32 elsewhere (resolved once per stage and recorded in its metrics and MLflow params).",
    )


def compile_field() -> Any:
    """`compile` of a training stage (pretrain, finetune)."""
    return Field(
        default=False,
        description="torch.compile the forward of the encoder, decoders, MLPs (heads, actor, critic) and BAN "
        "(the RSSM time loops stay eager); the first updates are slower while it compiles.",
    )


def retain_memory_field() -> Any:
    """`retain_memory` of a training stage (pretrain, finetune)."""
    return Field(
        default=True,
        description="Keep host memory freed by tensors in the process for the next update (glibc malloc: no mmap "
        "for large blocks, no trimming) instead of faulting in fresh pages every update: faster CPU training for "
        "more resident memory, handed back once it grows by half over a phase's first update "
        "(benchmarks/results_world_model.md); no effect off glibc Linux.",
    )


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------------------------
# Data stages
# ----------------------------------------------------------------------------------------------


class SourceVideosParams(Section):
    """Renders unlabeled source videos from tasks other than the target (frames only)."""

    env: Literal["metaworld", "highway", "crafter"] = Field(
        default="metaworld", description="Simulator family the source videos are rendered in."
    )
    tasks: list[str] = Field(
        default=["door-open", "button-press-topdown", "handle-press", "plate-slide", "coffee-push"],
        description="Tasks (Meta-World v3 names without -v3; highway-env scenarios; crafter players such as explore "
        "and forage) to film; must not include the target task.",
    )
    cameras: list[str] = Field(
        default=["corner2", "corner3"],
        description="Cameras (Meta-World) or view styles (highway-env, crafter) filmed, one video per camera per "
        "episode.",
    )
    episodes_per_task: int = Field(default=10, ge=1, description="Scripted episodes rendered per task.")
    episode_length: int = Field(
        default=200, ge=2, le=500, description="Frames kept per episode (Meta-World episodes end at 500 steps)."
    )
    action_noise: float = Field(
        default=0.3, ge=0.0, description="Gaussian sigma added to the scripted policy's actions."
    )
    camera_jitter: float = Field(
        default=0.03,
        ge=0.0,
        description="Per-episode view jitter for visual variety: Gaussian sigma of a camera position offset in metres "
        "(Meta-World), of a relative zoom change (highway-env) or of a relative brightness change (crafter).",
    )
    render_size: int = Field(
        default=96, ge=16, description="Rendered frame side in pixels (ingestion resizes it later)."
    )
    fps: int = Field(default=30, ge=1, description="Frame rate written into the video files.")
    codec: str = Field(default="libx264", description="PyAV encoder used for the files.")
    container: str = Field(default="mp4", description="File extension / container.")
    seed: int = Field(default=0, description="Seed of the scripted policies and noise.")
    workers: int = Field(default=2, ge=1, description="Parallel rendering processes.")


class IngestParams(Section):
    """Decoding raw video into fixed-size clips."""

    size: int = Field(default=64, ge=8, description="Output frame side (centre crop then resize).")
    fps: float | None = Field(default=None, gt=0, description="Target frame rate; null keeps the source's rate.")
    window: int = Field(default=25, ge=2, description="Frames per clip (source video window length).")
    stride: int = Field(default=12, ge=1, description="Frames between the starts of consecutive clips.")
    clips_per_shard: int = Field(default=256, ge=1, description="Clips per shard file.")
    workers: int = Field(default=2, ge=1, description="Parallel decoding processes.")
    image_fps: float = Field(
        default=5.0,
        gt=0,
        description="Frame rate of image-sequence folders (BridgeData records at 5 Hz); used when fps is set.",
    )
    interpolation: Literal["area", "bilinear", "bicubic", "lanczos"] = Field(
        default="area",
        description="swscale filter of the resize (area averages pixels when shrinking, so no aliasing).",
    )
    image_extensions: list[str] = Field(
        default=[".jpg", ".jpeg", ".png"], description="Frame files of image-sequence folders."
    )
    video_extensions: list[str] = Field(
        default=[".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".gif"],
        description="Files treated as videos when a folder or glob is expanded.",
    )

    @field_validator("image_extensions", "video_extensions")
    @classmethod
    def _dotted_lowercase(cls, v: list[str]) -> list[str]:
        bad = [e for e in v if not e.startswith(".") or len(e) < 2]
        if bad:
            raise ValueError("every extension must start with a dot, like '.mp4'")
        return [e.lower() for e in v]


class CollectParams(Section):
    """Offline target dataset collection with a degraded scripted behaviour policy."""

    env: Literal["metaworld", "highway", "carla", "crafter"] = Field(
        default="metaworld",
        description="Simulator family (metaworld: manipulation; highway: highway-env driving; carla: a CARLA 0.9.x "
        "server; crafter: the game; see docs/domains.md).",
    )
    task: str = Field(
        default="drawer-open",
        description="Target task: a Meta-World v3 task name (without -v3), a driving scenario or a crafter "
        "achievement (collect-wood).",
    )
    camera: str = Field(
        default="corner",
        description="Camera (Meta-World), view style (highway-env, crafter) the observations are rendered in.",
    )
    size: int = Field(default=64, ge=8, description="Observation side in pixels.")
    episodes: int = Field(default=20, ge=1, description="Episodes collected.")
    episode_length: int = Field(
        default=500,
        ge=2,
        le=500,
        description="Environment steps per episode (action repeat 1; Meta-World's own limit is 500; a driving step "
        "is 0.2 s; a game episode also ends when its achievement is unlocked).",
    )
    quality: Literal["expert", "medium", "mixed"] = Field(default="medium", description="Behaviour data quality level.")
    medium_random_prob: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="Per-step probability of a uniformly random action in `medium`. It slows the expert, so it is "
        "tuned with episode_length: 0.7 at 500 steps and 0.45 at 200 steps (cpu preset) give ~55-65% success on "
        "drawer-open.",
    )
    medium_noise: float = Field(default=0.5, ge=0.0, description="Gaussian sigma on expert actions in `medium`.")
    expert_noise: float = Field(default=0.1, ge=0.0, description="Gaussian sigma on expert actions in `expert`.")
    mixed_expert_fraction: float = Field(
        default=0.3, ge=0.0, le=1.0, description="Share of expert episodes in `mixed` (rest medium)."
    )
    seed: int = Field(default=0, description="Environment and policy seed.")
    starts: Literal["seed", "cycle"] = Field(
        default="seed",
        description="Where episodes start: `seed` lets each episode's seed draw a task variation (two episodes can "
        "share one: 50 episodes covered 33 of handle-press's 50); `cycle` starts episode i from variation i, so N "
        "episodes cover min(N, 50) (Meta-World only: the other simulators draw every start from the seed).",
    )
    workers: int = Field(default=2, ge=1, description="Parallel collection processes.")

    @model_validator(mode="after")
    def _starts_need_variations(self) -> CollectParams:
        if self.starts == "cycle" and self.env != "metaworld":
            raise ValueError(
                f"starts='cycle' needs a simulator with a fixed set of task variations (metaworld); {self.env!r} "
                "draws every start from the episode seed"
            )
        return self


# ----------------------------------------------------------------------------------------------
# Model and training stages
# ----------------------------------------------------------------------------------------------


class ModelParams(Section):
    """Network sizes shared by pretraining and fine-tuning (method doc defaults)."""

    image_size: int = Field(default=64, description="Input frame side; the conv stack is built for 64.")
    cnn_depth: int = Field(default=32, ge=1, description="d: encoder channels d,2d,4d,8d; decoder mirrors it.")
    deter: int = Field(default=200, ge=1, description="RSSM deterministic (GRU) state size.")
    stoch: int = Field(default=50, ge=1, description="RSSM stochastic state size (Gaussian) or number of categoricals.")
    stoch_classes: int = Field(default=32, ge=2, description="Classes per categorical variable (discrete RSSM only).")
    rssm_kind: Literal["gaussian", "categorical"] = Field(default="gaussian", description="Stochastic state family.")
    hidden: int = Field(default=200, ge=1, description="RSSM MLP hidden size.")
    min_std: float = Field(default=0.1, gt=0, description="Added to the Gaussian state std: 2*sigmoid(x/2)+min_std.")
    ban_hidden: int = Field(default=128, ge=1, description="Behaviour abstraction network hidden size.")
    ban_horizon: int = Field(
        default=1,
        ge=1,
        description="k: the BAN codes transition t -> t+1 from e_t and e_{t+k} (1 = the release's BAN).",
    )
    latent_action_dim: int = Field(default=8, ge=1, description="Z: latent action (codebook vector) size.")
    codebook_size: int = Field(default=50, ge=2, description="K: number of latent behaviours.")
    head_units: int = Field(default=400, ge=1, description="Reward/discount head width.")
    head_layers: int = Field(default=2, ge=1, description="Reward/discount head depth.")
    fbc_hidden: int = Field(default=125, ge=1, description="F_BC hidden size.")
    actor_units: int = Field(default=400, ge=1)
    actor_layers: int = Field(default=4, ge=1)
    critic_units: int = Field(default=400, ge=1)
    critic_layers: int = Field(default=3, ge=1)
    actor_min_std: float = Field(default=0.1, gt=0)

    @field_validator("image_size")
    @classmethod
    def _only_64(cls, v: int) -> int:
        if v != 64:
            raise ValueError("the conv encoder/decoder are defined for 64x64 frames; resize video to 64 at ingestion")
        return v


class OptimParams(Section):
    lr: float = Field(default=3e-4, gt=0, description="Adam learning rate.")
    eps: float = Field(default=1e-5, gt=0, description="Adam epsilon.")
    grad_clip: float = Field(default=100.0, gt=0, description="Gradient-norm clip.")


class PretrainParams(Section):
    """Phases 1 and 2: latent behaviours, Plan Net, keyframe Plan Net, F_BC, MMD."""

    batch: int = Field(default=50, ge=1, description="Target sequences per batch.")
    seq_len: int = Field(default=50, ge=2, description="Steps per target sequence.")
    source_batch: int = Field(default=50, ge=1, description="Source video clips per batch.")
    source_len: int = Field(default=25, ge=2, description="Frames per source clip used (<= ingest.window).")
    phase1_steps: int = Field(default=40_000, ge=0, description="Updates of phase 1.")
    phase2_steps: int = Field(default=40_000, ge=0, description="Updates of phase 2.")
    optim: OptimParams = Field(default_factory=OptimParams)
    kl_balance: float = Field(default=0.8, ge=0, le=1, description="KL balancing: weight on the prior side.")
    free_nats: float = Field(default=1.0, ge=0, description="Free nats of the phase-1 Plan Net KL term.")
    phase2_free_nats: float | None = Field(
        default=None,
        ge=0,
        description="Free nats of the phase-2 (keyframe) Plan Net KL term; null = same as free_nats.",
    )
    kl_scale: float = Field(default=1.0, ge=0)
    forward_weight: float = Field(
        default=1.0,
        ge=0,
        description="Latent-action forward loss: a predictor from (e_t, quantised latent action) to e_t+1, so the code "
        "is the only route to the change (makes latent actions name behaviours); 0 = off (release).",
    )
    diagnostics_sequences: int = Field(default=16, ge=2, description="Target windows the end-of-stage diagnostics use.")
    codebook_restart_every: int = Field(
        default=100,
        ge=0,
        description="Phase-1 updates between dead-code restarts (codes unused since the last check move onto BAN "
        "outputs of the current batch); 0 = never (release).",
    )
    vq_beta: float = Field(default=1.0, ge=0, description="Commitment weight of the VQ loss.")
    codebook_init: Literal["uniform", "data"] = Field(
        default="uniform",
        description="uniform: U(-1/K, 1/K) as in VQ-VAE; data: the codebook starts as K BAN outputs of the first batch "
        "(a common remedy for codebook collapse). Initialisation only; the losses are the same.",
    )
    mmd_weight: float = Field(
        default=5.0, ge=0, description="Weight of linear MMD between source and target embeddings."
    )
    ban_on_source: bool = Field(
        default=True,
        description="Train BAN and Plan Net on source clips too (paper intent); false = release (target frames only).",
    )
    checkpoint_every: int = Field(default=500, ge=1, description="Steps between atomic checkpoints.")
    log_every: int = Field(default=50, ge=1, description="Steps between metric logs.")
    image_log_every: int = Field(default=5000, ge=1, description="Steps between image artifacts.")
    prefetch: int = Field(default=2, ge=0, description="Batches prepared ahead in a background thread.")
    seed: int = Field(default=0)
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N.")
    threads: int = Field(
        default=0,
        ge=0,
        description="torch intra-op threads; 0 = all cores (the cpu preset uses 1: "
        "faster on a small shared CPU, and leaves a core to the prefetch thread).",
    )
    precision: Precision = training_precision_field()
    compile: bool = compile_field()
    retain_memory: bool = retain_memory_field()


class FinetuneParams(Section):
    """Trunk Net world model on target data and phase 3 policy learning (and the baselines)."""

    algo: Literal["veorl", "dreamerv2", "bc"] = Field(
        default="veorl",
        description="veorl: full method; dreamerv2: offline DreamerV2 (no video, no guidance); "
        "bc: behaviour cloning from pixels.",
    )
    guidance: Literal["aligned", "release"] = Field(
        default="aligned",
        description="aligned: F_BC and Plan Net stepping trained on the Trunk Net space (our fix); "
        "release: the authors' behaviour.",
    )
    batch: int = Field(default=50, ge=1, description="Target sequences per batch (world model, start states, bc).")
    seq_len: int = Field(default=50, ge=2, description="Steps per target sequence.")
    source_batch: int = Field(default=50, ge=1, description="Source video clips per batch of the MMD term.")
    source_len: int = Field(default=25, ge=2, description="Frames per source clip of the MMD term (<= ingest.window).")
    world_model_steps: int = Field(default=40_000, ge=0, description="Trunk Net (and guidance alignment) updates.")
    policy_steps: int = Field(default=50_000, ge=0, description="Phase-3 actor/critic updates.")
    bc_steps: int = Field(default=20_000, ge=0, description="Updates of the behaviour-cloning baseline.")
    world_model_optim: OptimParams = Field(
        default_factory=OptimParams, description="Trunk world model and guidance optimiser."
    )
    actor_optim: OptimParams = Field(
        default_factory=lambda: OptimParams(lr=3e-4),
        description="Actor optimiser. 3e-4 (TD3+BC's rate): with the behaviour term the actor has a supervised "
        "target to fit within the budget; lr=8e-5 is the release's rate.",
    )
    critic_optim: OptimParams = Field(default_factory=lambda: OptimParams(lr=8e-5), description="Critic optimiser.")
    bc_optim: OptimParams = Field(default_factory=OptimParams, description="Behaviour-cloning baseline optimiser.")
    bc_loss: Literal["mse", "gaussian", "categorical"] = Field(
        default="mse",
        description="bc: MSE to the dataset action, Gaussian NLL with a learned std, or (one-hot actions: the game "
        "domain's default) cross-entropy over the head's raw outputs as logits.",
    )
    kl_balance: float = Field(default=0.8, ge=0, le=1, description="KL balancing: weight on the prior side.")
    free_nats: float = Field(default=1.0, ge=0, description="Free nats of the KL term.")
    kl_scale: float = Field(default=1.0, ge=0, description="Weight of the KL term.")
    reward_scale: float = Field(
        default=1.0, gt=0, description="Multiplies target rewards before the reward head learns them."
    )
    horizon: int = Field(default=15, ge=1, description="Imagination horizon H.")
    discount: float = Field(default=0.99, gt=0, le=1, description="Discount of imagined returns.")
    discount_head: bool = Field(
        default=False,
        description="Trunk Net discount head (DreamerV2): learns where episodes end (true terminals: discount 0), "
        "imagined returns are discounted by discount x its predicted continuation, and episodes shorter than seq_len "
        "that end in a terminal are sampled padded with absorbing steps. For domains whose episodes end (game).",
    )
    lambda_: float = Field(default=0.95, ge=0, le=1, alias="lambda", description="lambda of the lambda-return.")
    actor_entropy: float = Field(default=1e-4, ge=0, description="Weight of the actor's entropy bonus.")
    slow_critic_every: int = Field(default=100, ge=1, description="Updates between slow-critic refreshes.")
    critic_warmup: int = Field(
        default=1000,
        ge=0,
        description="First policy updates that train the critic only (actor frozen) so the returns "
        "the actor follows come from a fitted critic.",
    )
    return_norm: Literal["percentile", "none"] = Field(
        default="percentile",
        description="percentile: the actor's returns divided by max(1, P95 - P5) of the lambda-returns (EMA); "
        "none = raw returns (release). Entropy and behaviour terms then act on the normalised scale.",
    )
    return_norm_decay: float = Field(default=0.99, ge=0, lt=1, description="EMA decay of the return percentiles.")
    actor_bc_weight: float = Field(
        default=1.0,
        ge=0,
        description="Offline conservatism: weight of the actor's behaviour term (actor_bc_loss) for the data action "
        "that followed each start state, relative to the normalised return (TD3+BC style); 0 = off (release).",
    )
    actor_bc_loss: Literal["nll", "mse"] = Field(
        default="mse",
        description="The behaviour term: mse = squared distance from the policy's mode to a_data (TD3+BC's term; "
        "continuous actions only); nll = -log pi(a_data | s) (one-hot actions: the game domain's default). With "
        "noisy data the nll is nearly flat in the mode, so it hardly constrains the action the agent plays; the mse "
        "pulls the mode to the data's mean action (docs/results.md: better on drawer-open, handle-press and the "
        "highway).",
    )
    embedding_cache_gb: float = Field(
        default=2.0,
        ge=0,
        description="Phase 3 encodes every target frame once with the frozen encoder and reads the start batches' "
        "embeddings from that table (2 bytes a number in bf16, 4 in fp32) when it takes at most this many GiB; "
        "larger data, or 0, encodes every batch (the release's way). The same maths (veorl.algo.embedding_cache).",
    )
    ensemble_size: int = Field(
        default=5,
        ge=0,
        description="Trunk Net prior heads whose disagreement penalises imagined rewards (Offline DreamerV2); 0 = off.",
    )
    uncertainty_weight: float = Field(
        default=5.0,
        ge=0,
        description="lambda of the penalty: imagined reward minus lambda x the ensemble disagreement in units of its "
        "level on the data's own states (about 1 there, more where the model guesses).",
    )
    diagnostics_sequences: int = Field(default=16, ge=2, description="Target windows the end-of-stage diagnostics use.")
    snapshot_every: int = Field(
        default=0,
        ge=0,
        description="With --snapshots DIR: write the agent every this many policy (or bc) updates, for learning "
        "curves; 0 = off.",
    )

    @field_validator("ensemble_size")
    @classmethod
    def _ensemble_disagrees(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one prior head cannot disagree with itself: use 0 (off) or at least 2")
        return value

    intrinsic_weight: float = Field(default=1.0, ge=0, description="Weight of the Plan Net intrinsic reward.")
    use_intrinsic: bool = Field(default=True, description="Ablation: intrinsic reward on/off.")
    use_latent_action: bool = Field(default=True, description="Ablation: latent action input of actor and critic.")
    use_mmd: bool = Field(
        default=False,
        description="MMD term while training the Trunk Net encoder (the release: true). Off by default: measured, it "
        "made the encoder blind to what tells the target scene from the source ones (see docs/architecture.md).",
    )
    pretrained_encoder: bool = Field(
        default=True, description="Ablation: the Trunk Net encoder starts from the video world model's."
    )
    mmd_weight: float = Field(
        default=5.0, ge=0, description="Weight of linear MMD between source and target embeddings."
    )
    checkpoint_every: int = Field(default=500, ge=1, description="Updates between atomic checkpoints.")
    log_every: int = Field(default=50, ge=1, description="Updates between metric logs (curve rows, MLflow).")
    prefetch: int = Field(default=2, ge=0, description="Batches prepared ahead in a background thread.")
    seed: int = Field(default=0, description="Seed of batches, initialisation and imagination noise.")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N.")
    threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0 = all cores.")
    precision: Precision = training_precision_field()
    compile: bool = compile_field()
    retain_memory: bool = retain_memory_field()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class EvaluateParams(Section):
    """Evaluation of the agent in its simulator (deterministic by default)."""

    episodes: int = Field(default=10, ge=1, description="Evaluation episodes.")
    policy: Literal["mode", "sample"] = Field(
        default="mode",
        description="How the agent acts: the mode of its action distribution (deterministic; one-hot actions: the "
        "argmax) or a draw from it, seeded per episode. A sampled evaluation's protocol says so, and the registry "
        "compares it only with other sampled ones. bc trained with bc_loss=mse has no distribution to sample.",
    )
    seed: int = Field(default=1000, description="Seed of the first evaluation episode; episode i uses seed+i.")
    workers: int = Field(default=2, ge=1, description="Parallel evaluation processes.")
    videos: int = Field(default=2, ge=0, description="Rollouts rendered to MP4.")
    video_size: int = Field(
        default=64, ge=16, description="Side of the rendered rollout videos (agent frames upscaled)."
    )
    video_fps: int = Field(default=30, ge=1, description="Frame rate of the rollout videos.")
    device: str = Field(default="cpu", description="Device the agent acts on (cpu | cuda | cuda:N).")
    precision: Precision = Field(
        default="auto",
        description="Numeric precision of the agent's networks while acting: bf16 autocast or fp32; auto = bf16 "
        "where the evaluation device has native bf16 (resolved once, recorded in metrics.json and MLflow params).",
    )


class RegisterParams(Section):
    """Promotion of an evaluated agent in the MLflow model registry (@champion / @challenger)."""

    model_name: str = Field(default="veorl-agent", description="Registered model name in the MLflow registry.")
    metric: Literal["success_rate", "mean_return"] = Field(
        default="success_rate", description="Metric compared for promotion."
    )
    margin: float = Field(default=0.0, ge=0, description="A challenger must beat the champion by more than this.")
    lock_file: str | None = Field(
        default=None,
        description="File lock shared by concurrent registrations; null = next to a local sqlite store "
        "(remote stores then use an optimistic check-then-set with re-verification).",
    )
    verify_delay: float = Field(
        default=0.5, ge=0, description="Seconds to wait before re-verifying @champion on a remote store."
    )


class TrackingParams(Section):
    """Where MLflow records runs and models."""

    experiment: str = Field(default="veorl", description="MLflow experiment name.")
    uri: str = Field(
        default="sqlite:///mlruns.db", description="Default tracking store; MLFLOW_TRACKING_URI wins when set."
    )
    artifact_location: str | None = Field(
        default=None,
        description="Artifact root (e.g. s3://bucket/mlflow) used when the experiment is first created; "
        "null = the store's default. An existing experiment keeps its own.",
    )


PresetName = Literal["smoke", "cpu", "laptop", "paper"]
DomainName = Literal["manipulation", "driving", "game"]


with warnings.catch_warnings():
    # `register` is a stage name; pydantic warns it shadows a (classmethod) name of BaseModel's metaclass.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Params(Section):
        preset: PresetName = Field(
            default="cpu",
            description="Sizes and step counts: smoke (tests), cpu (default, ~10 min), laptop (a working agent in "
            "under an hour on 2 cores), paper (GPU cluster).",
        )
        domain: DomainName = Field(
            default="manipulation",
            description="Paper domain: manipulation (Meta-World), driving (highway-env; CARLA with a server), game "
            "(crafter). Selects every stage's environment, task, source videos and model kind; explicit keys still "
            "win (docs/domains.md).",
        )
        source_videos: SourceVideosParams = Field(default_factory=SourceVideosParams)
        ingest: IngestParams = Field(default_factory=IngestParams)
        collect: CollectParams = Field(default_factory=CollectParams)
        model: ModelParams = Field(default_factory=ModelParams)
        pretrain: PretrainParams = Field(default_factory=PretrainParams)
        finetune: FinetuneParams = Field(default_factory=FinetuneParams)
        evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
        register: RegisterParams = Field(default_factory=RegisterParams)
        tracking: TrackingParams = Field(default_factory=TrackingParams)

        @model_validator(mode="after")
        def _cross_checks(self) -> Params:
            envs = DOMAIN_ENVS.get(self.domain, ())
            for key, env in (("collect.env", self.collect.env), ("source_videos.env", self.source_videos.env)):
                if env not in envs:
                    raise ValueError(
                        f"{key}={env!r} does not belong to domain={self.domain!r} (its environments: {list(envs)})"
                    )
            if self.pretrain.source_len > self.ingest.window:
                raise ValueError(
                    f"pretrain.source_len ({self.pretrain.source_len}) exceeds ingest.window ({self.ingest.window})"
                )
            if self.collect.task in self.source_videos.tasks:
                raise ValueError(
                    f"source_videos.tasks must not contain the target task collect.task={self.collect.task!r}"
                )
            if self.ingest.size != self.model.image_size:
                raise ValueError(
                    f"ingest.size ({self.ingest.size}) must equal model.image_size ({self.model.image_size})"
                )
            if self.collect.size != self.model.image_size:
                raise ValueError(
                    f"collect.size ({self.collect.size}) must equal model.image_size ({self.model.image_size})"
                )
            return self

        def section_dict(self, *names: str) -> dict[str, Any]:
            data = self.model_dump(by_alias=True, mode="json")
            return {"preset": data["preset"], "domain": data["domain"], **{n: data[n] for n in names}}


# ----------------------------------------------------------------------------------------------
# Presets: sizes and step counts only, never the algorithm.
# ----------------------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_SMALL_MODEL = {
    "cnn_depth": 16,
    "deter": 64,
    "stoch": 16,
    "hidden": 64,
    "ban_hidden": 64,
    "codebook_size": 16,
    "head_units": 64,
    "fbc_hidden": 64,
    "actor_units": 64,
    "actor_layers": 2,
    "critic_units": 64,
    "critic_layers": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "source_videos": {"episodes_per_task": 3, "episode_length": 150},
        "collect": {"episodes": 12, "episode_length": 200},
        "model": {
            "cnn_depth": 16,
            "deter": 128,
            "stoch": 32,
            "hidden": 128,
            "head_units": 200,
            "fbc_hidden": 96,
            "actor_units": 200,
            "actor_layers": 3,
            "critic_units": 200,
            "critic_layers": 2,
        },
        "pretrain": {
            "batch": 8,
            "seq_len": 32,
            "source_batch": 8,
            "source_len": 16,
            "phase1_steps": 200,
            "phase2_steps": 200,
            "checkpoint_every": 50,
            "log_every": 10,
            "image_log_every": 200,
            "threads": 1,
            "codebook_restart_every": 20,
        },
        # One torch thread: with the 2 cores shared, a second OpenMP thread spin-waits and doubles wall time.
        "finetune": {
            "batch": 8,
            "seq_len": 32,
            "source_batch": 8,
            "source_len": 16,
            "world_model_steps": 600,
            "policy_steps": 400,
            "bc_steps": 300,
            "horizon": 10,
            "checkpoint_every": 50,
            "log_every": 10,
            "slow_critic_every": 20,
            "threads": 1,
            "critic_warmup": 50,
        },
        "evaluate": {"episodes": 4, "videos": 1},
        "ingest": {"window": 25, "stride": 12},
    },
    "smoke": {
        "source_videos": {"episodes_per_task": 1, "episode_length": 30, "workers": 1},
        "ingest": {"window": 12, "stride": 6, "clips_per_shard": 16, "workers": 1},
        "collect": {"episodes": 2, "episode_length": 40, "workers": 1},
        "model": _SMALL_MODEL,
        "pretrain": {
            "batch": 2,
            "seq_len": 10,
            "source_batch": 2,
            "source_len": 8,
            "phase1_steps": 3,
            "phase2_steps": 3,
            "checkpoint_every": 2,
            "log_every": 1,
            "image_log_every": 3,
            "prefetch": 1,
            "threads": 1,
            "codebook_restart_every": 2,
        },
        "finetune": {
            "batch": 2,
            "seq_len": 10,
            "source_batch": 2,
            "source_len": 8,
            "world_model_steps": 3,
            "policy_steps": 3,
            "bc_steps": 3,
            "horizon": 4,
            "checkpoint_every": 2,
            "log_every": 1,
            "slow_critic_every": 2,
            "prefetch": 1,
            "threads": 1,
            "critic_warmup": 1,
        },
        "evaluate": {"episodes": 2, "workers": 1, "videos": 1},
    },
}

# A working agent on a 2-core laptop: the cpu preset's network and batch sizes with enough target data (50 medium
# episodes) and updates to train on them (whole chain under an hour).
PRESETS["laptop"] = deep_merge(
    PRESETS["cpu"],
    {
        "source_videos": {"episodes_per_task": 4},
        "collect": {"episodes": 50},
        "pretrain": {
            "phase1_steps": 600,
            "phase2_steps": 300,
            "checkpoint_every": 100,
            "log_every": 20,
            "image_log_every": 300,
            "codebook_restart_every": 25,
        },
        "finetune": {
            "world_model_steps": 1200,
            "policy_steps": 1500,
            "bc_steps": 1500,
            "checkpoint_every": 100,
            "log_every": 25,
            "slow_critic_every": 50,
            "critic_warmup": 100,
        },
        "evaluate": {"episodes": 10},
    },
)


# ----------------------------------------------------------------------------------------------
# Domains: one switch for every stage (see the module docstring for where they sit in the resolution order).
# ----------------------------------------------------------------------------------------------

DOMAIN_ENVS: dict[str, tuple[str, ...]] = {
    "manipulation": ("metaworld",),
    "driving": ("highway", "carla"),  # carla: collect/evaluate against a user's CARLA server (docs/domains.md)
    "game": ("crafter",),
}
"""Environment families each domain's collect/source-video stages may use (a cross-check of Params)."""

DOMAINS: dict[str, dict[str, Any]] = {
    # The field defaults are Meta-World's (the release's), so the manipulation domain adds nothing.
    "manipulation": {},
    "driving": {
        # Source videos: other highway-env scenarios (never the target's), filmed in other view styles.
        "source_videos": {
            "env": "highway",
            "tasks": ["merge", "roundabout", "intersection"],
            "cameras": ["wide", "night"],
            "action_noise": 0.05,
            "camera_jitter": 0.1,
        },
        # Target: 4-lane highway with traffic, continuous [throttle, steer], 64x64 top-down, 200 steps = 40 s.
        # Behaviour calibration (highway, 200 steps, 10 episodes each; collision = crash or leaving the road):
        #   expert (noise 0.1)                        0% collisions, return ~100 (expert without noise ~110)
        #   medium noise 0.15, random_prob 0.02       50% collisions, return 61 +- 36   <- default
        #   medium noise 0.15, random_prob 0.03       60% collisions, return 57 +- 38
        #   noise 0.5 alone                           88% collisions (steering noise sends the car off the road)
        "collect": {
            "env": "highway",
            "task": "highway",
            "camera": "topdown",
            "episode_length": 200,
            "medium_noise": 0.15,
            "medium_random_prob": 0.02,
        },
        "model": {"rssm_kind": "gaussian"},  # continuous actions: the actor kind follows the data (its card)
        # The paper reports driving by episode return; a success is rarer and coarser (no collision for 40 s).
        "register": {"metric": "mean_return"},
    },
    "game": {
        # Source videos: crafter played in other worlds (seeds drawn per task and episode, never the target's) by
        # players that never chop a tree (a persistent random walk; a forager: water, saplings, cows), filmed
        # zoomed out with rotated colours (`far`) and zoomed in at dusk (`dusk`), brightness jittered.
        "source_videos": {
            "env": "crafter",
            "tasks": ["explore", "forage"],
            "cameras": ["far", "dusk"],
            "action_noise": 0.0,  # one-hot actions take no Gaussian noise
            "camera_jitter": 0.1,
        },
        # Target: collect-wood (reward 1 and a terminal when wood is first collected), 17 one-hot actions, 64x64.
        # The scripted player reaches a tree in ~5 steps, so `medium` is mostly random actions and the episodes
        # are short (100 steps; success ends an episode earlier). Calibration (collect-wood, worlds of seeds 0..39,
        # 40 episodes per row; `python scripts/calibrate_game.py [--length 40 --random-prob 0.8 0.85 0.9]`):
        #   expert (no random actions), 100 steps    100% success, return 1.00, 5.3 steps per episode
        #   medium random_prob 0.9,   100 steps       78% success, return 0.78 +- 0.42
        #   medium random_prob 0.92,  100 steps       57% success, return 0.57 +- 0.49   <- default (cpu, laptop, paper)
        #   medium random_prob 0.95,  100 steps       35% success
        #   medium random_prob 0.85,   40 steps       57% success, return 0.57 +- 0.49   <- smoke
        # cpu preset, `python -m components.collect --out DIR --set domain=game`: 12 episodes, 67% success.
        "collect": {
            "env": "crafter",
            "task": "collect-wood",
            "camera": "native",
            "episode_length": 100,
            "expert_noise": 0.0,
            "medium_noise": 0.0,
            "medium_random_prob": 0.92,
        },
        # DreamerV2's Crafter/Atari world model: 32 categoricals of 32 classes; the discount head learns episode ends.
        "model": {"rssm_kind": "categorical", "stoch": 32, "stoch_classes": 32},
        # bc on one-hot actions: a classifier (cross-entropy), not a regression onto the one-hot vector.
        # The actor's behaviour term on one-hot actions: the cross-entropy of the data's action (mse needs continuous).
        "finetune": {"discount_head": True, "bc_loss": "categorical", "actor_bc_loss": "nll"},
        "register": {"metric": "success_rate"},
    },
}
"""Domain defaults: applied over the field defaults and under the preset (`resolve`)."""

DOMAIN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # What a preset sets that only makes sense for one domain (task names, cameras, behaviour calibration);
    # applied over the preset's sizes.
    "manipulation": {
        "cpu": {
            "source_videos": {"tasks": ["door-open", "button-press-topdown", "handle-press"]},
            "collect": {"medium_random_prob": 0.45},
        },
        "smoke": {"source_videos": {"tasks": ["door-open", "button-press-topdown"], "cameras": ["corner2"]}},
        # The laptop's source tasks leave out both tasks the results compare on (drawer-open, handle-press).
        "laptop": {
            "source_videos": {"tasks": ["door-open", "button-press-topdown", "plate-slide", "coffee-push"]},
            "collect": {"medium_random_prob": 0.45},
        },
    },
    "driving": {
        # smoke: one short source scenario in one style, so the whole chain stays at seconds.
        "smoke": {"source_videos": {"tasks": ["merge"], "cameras": ["wide"]}},
    },
    "game": {
        # The presets' episode lengths are the manipulation calibration's; the game's medium data is calibrated at
        # 100 steps (smoke: 40), see DOMAINS["game"].
        "cpu": {"collect": {"episode_length": 100}},
        "laptop": {"collect": {"episode_length": 100}},
        # smoke: one source player in one style, 8 classes per categorical, so the chain stays at seconds.
        "smoke": {
            "source_videos": {"tasks": ["explore"], "cameras": ["far"]},
            "collect": {"medium_random_prob": 0.85},
            "model": {"stoch_classes": 8},
        },
        # The release's game sizes (DreamerV2 on Crafter/Atari): 32 x 32 categoricals, a 4096-unit GRU, cnn depth 96.
        "paper": {"model": {"stoch": 32, "stoch_classes": 32, "deter": 4096, "cnn_depth": 96}},
    },
}

NOT_IMPLEMENTED_DOMAINS: dict[str, str] = {}
"""Domains that exist as names but are refused (with the reason); none at present."""


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        keys |= _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


DOMAIN_CHOSEN: frozenset[str] = frozenset(
    {"collect.task"}
    | {k for layer in DOMAINS.values() for k in _dotted_keys(layer)}
    | {k for presets in DOMAIN_PRESETS.values() for layer in presets.values() for k in _dotted_keys(layer)}
)
"""Keys some domain sets; null for one of them in params.yaml or an override means "the domain's value"."""


def _drop_domain_nulls(raw: dict[str, Any]) -> None:
    for dotted in DOMAIN_CHOSEN:
        *sections, key = dotted.split(".")
        node: Any = raw
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] is None:
            del node[key]


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid parameters ({origin}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (not a parameter of this section)")
        elif not path:
            # cross-field checks: the message itself names the keys involved
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {path}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `section.key=value`; the value is read as YAML (so 3, 0.5, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = nxt
    node[path[-1]] = value


def resolve(
    raw: dict[str, Any] | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    origin: str = "params",
) -> Params:
    """Build validated Params from a params.yaml-like dict, an optional preset override and `key=value` overrides."""
    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: top level must be a mapping, got {type(raw).__name__}")
    for text in overrides or []:
        path, value = parse_override(text)
        _set_path(raw, path, value)
    chosen = preset or raw.get("preset", "cpu")
    if not isinstance(chosen, str) or chosen not in PRESETS:
        raise ConfigError(
            f"invalid parameters ({origin}):\n  preset: must be one of {sorted(PRESETS)} (got {chosen!r})"
        )
    raw["preset"] = chosen
    domain = raw.get("domain", "manipulation")
    if not isinstance(domain, str) or domain not in DOMAIN_ENVS:
        raise ConfigError(
            f"invalid parameters ({origin}):\n  domain: must be one of {sorted(DOMAIN_ENVS)} (got {domain!r})"
        )
    if domain in NOT_IMPLEMENTED_DOMAINS:
        raise ConfigError(f"invalid parameters ({origin}):\n  domain: {domain!r} is {NOT_IMPLEMENTED_DOMAINS[domain]}")
    raw["domain"] = domain
    _drop_domain_nulls(raw)
    layers = [DOMAINS[domain], PRESETS[chosen], DOMAIN_PRESETS.get(domain, {}).get(chosen, {}), raw]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_params(
    path: str | Path = "params.yaml", preset: str | None = None, overrides: list[str] | None = None
) -> Params:
    """Load params.yaml (missing file = all defaults), apply a preset and overrides, validate."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return resolve(raw, preset=preset, overrides=overrides, origin=str(path))


def dump_resolved(params: Params, *sections: str) -> str:
    """JSON text of the resolved configuration (all sections, or the named ones plus the preset)."""
    data = params.section_dict(*sections) if sections else params.model_dump(by_alias=True, mode="json")
    return json.dumps(data, indent=2, sort_keys=True)


REFERENCE_PRESETS = ("paper", "cpu", "laptop", "smoke")  # the columns of the parameter reference


def parameters_markdown() -> str:
    """A reference table of every parameter: key, default (paper), each preset's value, meaning."""
    resolved = {name: resolve({}, preset=name).model_dump(by_alias=True, mode="json") for name in REFERENCE_PRESETS}

    def walk(model: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        for name, field in model.model_fields.items():
            key = field.alias or name
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                rows.extend(walk(ann, f"{prefix}{key}."))
            else:
                rows.append((f"{prefix}{key}", field.description or ""))
        return rows

    def value(preset: str, dotted: str) -> str:
        node: Any = resolved[preset]
        for part in dotted.split("."):
            node = node[part]
        return json.dumps(node)

    header = " | ".join(["paper (default)", *REFERENCE_PRESETS[1:]])
    lines = [f"| key | {header} | meaning |", "|---" * (len(REFERENCE_PRESETS) + 2) + "|"]
    for dotted, desc in walk(Params, ""):
        if dotted == "preset":
            continue
        cells = [value(p, dotted) for p in REFERENCE_PRESETS]
        shown = [cells[0]] + [c if c != cells[0] else "=" for c in cells[1:]]
        lines.append(f"| `{dotted}` | {' | '.join(shown)} | {desc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m veorl.config",
        description="Validate params.yaml and print the resolved parameters (or a reference table).",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="override the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--markdown", action="store_true", help="print the parameter reference table instead")
    args = parser.parse_args(argv)
    if args.markdown:
        print(parameters_markdown(), end="")
        return 0
    try:
        params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    print(dump_resolved(params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
