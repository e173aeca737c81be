"""The VeoRL Kubeflow pipeline (KFP v2):

    resolve-config -> source-videos -> ingest --+
                   -> collect ------------------+-> pretrain -> finetune -> evaluate -> register

Every step is a lightweight Python component whose body calls `components.<name>.run(...)`, the function
DVC's stages and the Docker entry point run, through a few lines that map KFP's artifact paths and outputs.
kfp.local's SubprocessRunner can therefore execute the pipeline on a laptop (the project imports from the
working directory), and on a cluster the same YAML runs in the project's image (docker/), where /app holds
params.yaml, components/ and pipelines/.

Fixed at compile time (KFP bakes them into the YAML): the images (VEORL_IMAGE for CPU steps, VEORL_GPU_IMAGE for
pretrain and finetune), resource requests, GPU count and type, constant environment variables and, optionally,
a Kubernetes secret exposed as environment variables (S3/MLflow credentials). Chosen per run: the pipeline
parameters below. See docs/cluster.md.

Caching follows the data: each step returns the content hash its component recorded in the artifact's
provenance.json, and downstream steps take those hashes as input parameters; each step's configuration is the
validated document restricted to the keys it reads (see pipelines/steps.py). Registration is never cached: it
acts on the registry, which lives outside the pipeline.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from veorl import __version__

PIPELINE_NAME = "veorl"
PACKAGE_PATH = Path(__file__).with_name("veorl_pipeline.yaml")
DEFAULT_IMAGE = f"localhost:5000/veorl:{__version__}-cpu"
DEFAULT_GPU_IMAGE = f"localhost:5000/veorl:{__version__}-cuda"
IMAGE_ENV = "VEORL_IMAGE"
GPU_IMAGE_ENV = "VEORL_GPU_IMAGE"

# Per-step requests on the cluster (CPU cores, memory). Rendering, decoding and simulation parallelise over
# processes (workers in params.yaml); training is GPU-bound and mostly needs host memory for the batch prefetcher.
DEFAULT_RESOURCES: dict[str, tuple[str, str]] = {
    "resolve-config": ("0.5", "1G"),
    "source-videos": ("4", "8G"),
    "ingest": ("4", "8G"),
    "collect": ("4", "8G"),
    "pretrain": ("8", "32G"),
    "finetune": ("8", "32G"),
    "evaluate": ("4", "8G"),
    "register": ("1", "4G"),
}
GPU_STEPS = ("pretrain", "finetune")


@dataclass(frozen=True)
class CompileOptions:
    """Everything KFP fixes at compile time. Defaults are what the checked-in YAML is compiled with."""

    image: str = DEFAULT_IMAGE
    gpu_image: str = DEFAULT_GPU_IMAGE
    resources: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    gpus: int = 1
    accelerator: str = "nvidia.com/gpu"
    retries: int = 1  # training steps only; they resume from checkpoint_root when it is set
    env: dict[str, str] = field(
        default_factory=dict
    )  # non-secret settings, e.g. MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL_S3
    secret_env: str = ""  # Kubernetes secret exposed to every step as env vars (needs kfp-kubernetes)
    secret_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # secret keys = env var names

    @classmethod
    def from_env(cls, **changes) -> "CompileOptions":
        """Defaults, with the images taken from VEORL_IMAGE / VEORL_GPU_IMAGE when set."""
        options = cls(
            image=os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE,
            gpu_image=os.environ.get(GPU_IMAGE_ENV) or DEFAULT_GPU_IMAGE,
        )
        return replace(options, **changes)


# ----------------------------------------------------------------------------------------------
# Component bodies. KFP serialises each function's source into the YAML and runs it in the image, so the
# bodies import what they need and call the component's `run`. Upstream *_hash inputs are not used in the
# body beyond provenance: they exist so that the cache key changes when an upstream artifact's content does.
# ----------------------------------------------------------------------------------------------


def resolve_config(preset: str, domain: str, task: str, algo: str, model_name: str, overrides: list[str]) -> NamedTuple(
    "StageConfigs", source_videos=str, ingest=str, collect=str, pretrain=str, finetune=str, evaluate=str, register=str
):
    """Validate the whole configuration once; emit each stage's part of it (the keys it reads) as JSON."""
    from collections import namedtuple

    from pipelines.steps import STAGE_PARAMS, resolve_stage_documents

    knobs = {"domain": domain, "task": task, "algo": algo, "model_name": model_name}
    documents = resolve_stage_documents(preset, list(overrides), knobs)
    StageConfigs = namedtuple("StageConfigs", list(STAGE_PARAMS))
    return StageConfigs(**documents)


def source_videos(config: str, video_sources: list[str], videos: Output[Dataset]) -> str:
    """Render unlabeled source videos, or record external ones (s3:// prefixes) with a content fingerprint."""
    from components.source_videos import run, run_external
    from pipelines.steps import params_for_stage
    from veorl.storage import artifact_hash

    params = params_for_stage(config)
    if video_sources:
        run_external(list(video_sources), videos.path, params)
    else:
        run(videos.path, params)
    content_hash = artifact_hash(videos.path)
    videos.metadata["content_hash"] = content_hash
    return content_hash


def ingest(config: str, videos_hash: str, videos: Input[Dataset], clips: Output[Dataset]) -> str:
    """Decode, resize and window the videos into clips."""
    from components.ingest import run
    from pipelines.steps import params_for_stage
    from veorl.storage import artifact_hash

    run([videos.path], clips.path, params_for_stage(config))
    content_hash = artifact_hash(clips.path)
    clips.metadata.update({"content_hash": content_hash, "upstream_videos": videos_hash})
    return content_hash


def collect(config: str, episodes: Output[Dataset]) -> str:
    """Collect the small offline target dataset in the simulator."""
    from components.collect import run
    from pipelines.steps import params_for_stage
    from veorl.storage import artifact_hash

    run(episodes.path, params_for_stage(config))
    content_hash = artifact_hash(episodes.path)
    episodes.metadata["content_hash"] = content_hash
    return content_hash


def pretrain(
    config: str,
    clips_hash: str,
    episodes_hash: str,
    checkpoint_root: str,
    parent_run_id: str,
    gpus_per_node: int,
    num_nodes: int,
    clips: Input[Dataset],
    episodes: Input[Dataset],
    world_model: Output[Model],
    metrics: Output[Metrics],
    training_log: Output[Artifact],
) -> str:
    """Phases 1 and 2: the action-free video world model (in the step, under torchrun, or as a TrainJob)."""
    from components.pretrain import run
    from pipelines.training import training_step
    from veorl.storage import artifact_hash

    training_step(
        "pretrain",
        config,
        (clips_hash, episodes_hash),
        lambda params, files: run(clips.path, episodes.path, world_model.path, params, **files),
        inputs={"--clips": clips.path, "--episodes": episodes.path},
        outputs={"--out": world_model.path},
        checkpoint_root=checkpoint_root,
        parent_run_id=parent_run_id,
        log_dir=training_log.path,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        metrics_output=metrics,
    )
    content_hash = artifact_hash(world_model.path)
    world_model.metadata.update(
        {"content_hash": content_hash, "upstream_clips": clips_hash, "upstream_episodes": episodes_hash}
    )
    return content_hash


def finetune(
    config: str,
    world_model_hash: str,
    episodes_hash: str,
    clips_hash: str,
    checkpoint_root: str,
    parent_run_id: str,
    gpus_per_node: int,
    num_nodes: int,
    world_model: Input[Model],
    episodes: Input[Dataset],
    clips: Input[Dataset],
    agent: Output[Model],
    metrics: Output[Metrics],
    training_log: Output[Artifact],
) -> str:
    """The Trunk Net world model and phase-3 policy learning: the deployable agent (in the step, under torchrun,
    or as a TrainJob)."""
    from components.finetune import run
    from pipelines.training import training_step
    from veorl.storage import artifact_hash

    training_step(
        "finetune",
        config,
        (world_model_hash, episodes_hash, clips_hash),
        lambda params, files: run(world_model.path, episodes.path, agent.path, params, clips=clips.path, **files),
        inputs={"--world-model": world_model.path, "--episodes": episodes.path, "--clips": clips.path},
        outputs={"--out": agent.path},
        checkpoint_root=checkpoint_root,
        parent_run_id=parent_run_id,
        log_dir=training_log.path,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        metrics_output=metrics,
    )
    content_hash = artifact_hash(agent.path)
    agent.metadata.update({"content_hash": content_hash, "upstream_world_model": world_model_hash})
    return content_hash


def evaluate(
    config: str,
    agent_hash: str,
    parent_run_id: str,
    agent: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    """Deterministic-policy episodes in the simulator: metrics.json, episodes.csv, rollout videos."""
    from components.evaluate import run
    from pipelines.steps import params_for_stage
    from veorl.storage import artifact_hash

    summary = run(agent.path, evaluation.path, params_for_stage(config), parent_run_id=parent_run_id or None)
    for name in ("mean_return", "std_return", "success_rate", "success_std", "mean_length"):
        if isinstance(summary.get(name), (int, float)):
            metrics.log_metric(name, float(summary[name]))
    content_hash = artifact_hash(evaluation.path)
    evaluation.metadata.update({"content_hash": content_hash, "upstream_agent": agent_hash})
    return content_hash


def register(
    config: str,
    agent_hash: str,
    evaluation_hash: str,
    parent_run_id: str,
    agent: Input[Model],
    evaluation: Input[Artifact],
    registration: Output[Artifact],
) -> str:
    """Register the agent in MLflow; @champion moves only when its evaluation wins. Returns models:/NAME/VERSION."""
    import os

    from components.register import run
    from pipelines.steps import params_for_stage

    os.makedirs(registration.path, exist_ok=True)
    outcome = run(
        agent.path,
        evaluation.path,
        os.path.join(registration.path, "registration.json"),
        params_for_stage(config),
        parent_run_id=parent_run_id or None,
    )
    registration.metadata.update(
        {
            "version": outcome["version"],
            "alias": outcome["alias"] or "none",
            "reason": outcome["reason"],
            "agent_hash": agent_hash,
            "evaluation_hash": evaluation_hash,
        }
    )
    return outcome["model_uri"]


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def _configure(
    task: dsl.PipelineTask, step: str, options: CompileOptions, gpus_per_node: Any = None
) -> dsl.PipelineTask:
    cpu, memory = options.resources.get(step, DEFAULT_RESOURCES[step])
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    if step in GPU_STEPS and options.gpus > 0:
        # The pipeline parameter gpus_per_node (default: options.gpus); with several nodes the TrainJob's pods
        # hold the GPUs, and this step only waits for them.
        task.set_accelerator_type(options.accelerator).set_accelerator_limit(
            options.gpus if gpus_per_node is None else gpus_per_node
        )
    if step in GPU_STEPS:
        task.set_env_variable("VEORL_TRAINER_IMAGE", options.gpu_image)
    if step in GPU_STEPS and options.retries > 0:
        task.set_retry(num_retries=options.retries)
    for name, value in sorted(options.env.items()):
        task.set_env_variable(name, value)
    if options.secret_env:
        try:
            from kfp import kubernetes
        except ImportError as exc:
            raise RuntimeError(
                "secret_env needs the kfp-kubernetes package (pip install kfp-kubernetes) "
                "to expose a Kubernetes secret as environment variables"
            ) from exc
        kubernetes.use_secret_as_env(
            task, secret_name=options.secret_env, secret_key_to_env={key: key for key in options.secret_keys}
        )
    return task


def build_pipeline(options: CompileOptions | None = None) -> Callable:
    """The pipeline function for these compile options (images and resources are baked into its components)."""
    options = options or CompileOptions()

    def component(func: Callable, gpu: bool = False):
        return dsl.component(func, base_image=options.gpu_image if gpu else options.image)

    resolve_op = component(resolve_config)
    source_videos_op, ingest_op, collect_op = component(source_videos), component(ingest), component(collect)
    pretrain_op, finetune_op = component(pretrain, gpu=True), component(finetune, gpu=True)
    evaluate_op, register_op = component(evaluate), component(register)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="VeoRL: a video world model from unlabeled action-free video guides offline model-based RL; "
        "ends with the agent registered in MLflow (@champion only when it beats the champion).",
    )
    def veorl(
        preset: str = "paper",
        domain: str = "",
        task: str = "",
        algo: str = "",
        model_name: str = "",
        overrides: list[str] = [],  # noqa: B006 - kfp compiles the literal default into the YAML; never mutated
        video_sources: list[str] = [],  # noqa: B006 - kfp compiles the literal default into the YAML; never mutated
        checkpoint_root: str = "",
        parent_run_id: str = "",
        gpus_per_node: int = options.gpus,
        num_nodes: int = 1,
    ) -> str:
        """Run the VeoRL workflow end to end.

        Args:
            preset: smoke | cpu | laptop | paper (sizes and step counts).
            domain: manipulation | driving | game (environment, target task, source videos, model kind of every stage);
                empty keeps params.yaml.
            task: target task (collect.task); empty keeps the domain's / params.yaml's.
            algo: veorl | dreamerv2 | bc (finetune.algo); empty keeps params.yaml.
            model_name: registered model name (register.model_name); empty keeps params.yaml.
            overrides: params overrides such as finetune.policy_steps=1000 (section.key=value).
            video_sources: s3:// prefixes (or paths inside the image) of unlabeled videos; empty renders them.
            checkpoint_root: shared directory for training checkpoints so that a retried step resumes; empty for none.
            parent_run_id: MLflow run to nest the stage runs under; empty for top-level runs.
            gpus_per_node: GPUs of each training node (pretrain, finetune); more than 1 runs that many processes
                under torchrun, 0 trains on CPU.
            num_nodes: training nodes; more than 1 runs pretrain and finetune as Kubeflow Trainer TrainJobs (needs
                checkpoint_root on a volume the trainer pods mount).

        Returns:
            The registered model version as models:/NAME/VERSION.
        """
        configs = _configure(
            resolve_op(preset=preset, domain=domain, task=task, algo=algo, model_name=model_name, overrides=overrides),
            "resolve-config",
            options,
        )
        config = configs.outputs
        videos = _configure(
            source_videos_op(config=config["source_videos"], video_sources=video_sources), "source-videos", options
        )
        clips = _configure(
            ingest_op(config=config["ingest"], videos_hash=videos.outputs["Output"], videos=videos.outputs["videos"]),
            "ingest",
            options,
        )
        episodes = _configure(collect_op(config=config["collect"]), "collect", options)
        world_model = _configure(
            pretrain_op(
                config=config["pretrain"],
                clips_hash=clips.outputs["Output"],
                episodes_hash=episodes.outputs["Output"],
                checkpoint_root=checkpoint_root,
                parent_run_id=parent_run_id,
                gpus_per_node=gpus_per_node,
                num_nodes=num_nodes,
                clips=clips.outputs["clips"],
                episodes=episodes.outputs["episodes"],
            ),
            "pretrain",
            options,
            gpus_per_node,
        )
        agent = _configure(
            finetune_op(
                config=config["finetune"],
                world_model_hash=world_model.outputs["Output"],
                episodes_hash=episodes.outputs["Output"],
                clips_hash=clips.outputs["Output"],
                checkpoint_root=checkpoint_root,
                parent_run_id=parent_run_id,
                gpus_per_node=gpus_per_node,
                num_nodes=num_nodes,
                world_model=world_model.outputs["world_model"],
                episodes=episodes.outputs["episodes"],
                clips=clips.outputs["clips"],
            ),
            "finetune",
            options,
            gpus_per_node,
        )
        evaluation = _configure(
            evaluate_op(
                config=config["evaluate"],
                agent_hash=agent.outputs["Output"],
                parent_run_id=parent_run_id,
                agent=agent.outputs["agent"],
            ),
            "evaluate",
            options,
        )
        registration = _configure(
            register_op(
                config=config["register"],
                agent_hash=agent.outputs["Output"],
                evaluation_hash=evaluation.outputs["Output"],
                parent_run_id=parent_run_id,
                agent=agent.outputs["agent"],
                evaluation=evaluation.outputs["evaluation"],
            ),
            "register",
            options,
        )
        registration.set_caching_options(enable_caching=False)
        return registration.outputs["Output"]

    return veorl


def compile_pipeline(package_path: str | Path = PACKAGE_PATH, options: CompileOptions | None = None) -> Path:
    """Compile to YAML. The output depends only on the options and the code (no timestamps), so it can be diffed."""
    package_path = Path(package_path)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    from veorl.storage import atomic_path

    with atomic_path(package_path, suffix=".tmp.yaml") as tmp:
        compiler.Compiler().compile(build_pipeline(options), str(tmp))
    return package_path
