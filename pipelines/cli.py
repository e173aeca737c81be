"""Compile, submit or locally run the VeoRL Kubeflow pipeline.

    python -m pipelines.cli compile [--out pipelines/veorl_pipeline.yaml] [--image IMG] [--gpu-image IMG] ...
    python -m pipelines.cli upload --host https://kfp.example.org [--version v2]
    python -m pipelines.cli submit --host https://kfp.example.org [--preset paper]
        [--set finetune.policy_steps=1000] ...
    python -m pipelines.cli run-local --preset smoke [--pipeline-root local_outputs] [--runner docker --image IMG]

`compile` writes the YAML that is checked in (with no options it reproduces pipelines/veorl_pipeline.yaml).
`upload` registers the compiled pipeline (or a new version of it) in the KFP UI; `submit` compiles with the given
options (or takes --package) and starts a run through kfp.Client. The token for an authenticated endpoint comes
from $KFP_TOKEN (never from the command line, so it stays out of shell history and logs). `run-local` executes the
pipeline on this machine with kfp.local's SubprocessRunner (no cluster, no Docker); run it from the repository
root. With `--runner docker` each step runs in --image instead (kfp.local's DockerRunner; `make images-local` builds
the image), and the steps' MLflow store is a sqlite file in the pipeline root unless --env MLFLOW_TRACKING_URI=... .
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from pipelines.veorl_pipeline import (
    DEFAULT_GPU_IMAGE,
    DEFAULT_IMAGE,
    DEFAULT_RESOURCES,
    GPU_IMAGE_ENV,
    IMAGE_ENV,
    PACKAGE_PATH,
    PIPELINE_NAME,
    CompileOptions,
    build_pipeline,
    compile_pipeline,
)
from veorl.config import PRESETS

TOKEN_ENV = "KFP_TOKEN"


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=VALUE")
    name, value = text.split("=", 1)
    return name.strip(), value


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compile options (fixed in the YAML)")
    group.add_argument(
        "--image", default=None, help=f"image of the CPU steps (default: ${IMAGE_ENV} or {DEFAULT_IMAGE})"
    )
    group.add_argument(
        "--gpu-image",
        default=None,
        help=f"image of pretrain and finetune (default: ${GPU_IMAGE_ENV} or {DEFAULT_GPU_IMAGE})",
    )
    group.add_argument("--cpu", default=None, help="CPU request of every CPU step, e.g. 4 (default: per step)")
    group.add_argument(
        "--memory", default=None, help="memory request/limit of every CPU step, e.g. 8G (default: per step)"
    )
    group.add_argument(
        "--gpu-cpu",
        default=None,
        help=f"CPU request of pretrain and finetune (default: {DEFAULT_RESOURCES['pretrain'][0]})",
    )
    group.add_argument(
        "--gpu-memory",
        default=None,
        help=f"memory request/limit of pretrain and finetune (default: {DEFAULT_RESOURCES['pretrain'][1]})",
    )
    group.add_argument(
        "--gpus", type=int, default=1, help="GPUs per training step; 0 trains on CPU (default: %(default)s)"
    )
    group.add_argument(
        "--accelerator", default="nvidia.com/gpu", help="accelerator resource type (default: %(default)s)"
    )
    group.add_argument("--retries", type=int, default=1, help="retries of the training steps (default: %(default)s)")
    group.add_argument(
        "--env",
        action="append",
        type=_key_value,
        default=[],
        metavar="NAME=VALUE",
        help="constant environment variable in every step (repeatable), e.g. "
        "MLFLOW_TRACKING_URI=http://mlflow.mlflow:5000 or AWS_ENDPOINT_URL_S3=http://minio:9000; "
        "never put credentials here, use --secret-env",
    )
    group.add_argument(
        "--secret-env",
        default="",
        metavar="SECRET",
        help="Kubernetes secret whose keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (see --secret-key) "
        "become env vars of every step (needs kfp-kubernetes)",
    )
    group.add_argument(
        "--secret-key",
        action="append",
        default=[],
        metavar="KEY",
        help="secret key to expose (repeatable; replaces the AWS pair)",
    )


def options_from_args(args: argparse.Namespace) -> CompileOptions:
    resources = dict(DEFAULT_RESOURCES)
    for step, (cpu, memory) in DEFAULT_RESOURCES.items():
        if step in ("pretrain", "finetune"):
            resources[step] = (args.gpu_cpu or cpu, args.gpu_memory or memory)
        else:
            resources[step] = (args.cpu or cpu, args.memory or memory)
    changes = {
        "resources": resources,
        "gpus": args.gpus,
        "accelerator": args.accelerator,
        "retries": args.retries,
        "env": dict(args.env),
        "secret_env": args.secret_env,
    }
    if args.secret_key:
        changes["secret_keys"] = tuple(args.secret_key)
    if args.image:
        changes["image"] = args.image
    if args.gpu_image:
        changes["gpu_image"] = args.gpu_image
    return CompileOptions.from_env(**changes)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline parameters (per run)")
    group.add_argument(
        "--preset", default=None, choices=sorted(PRESETS), help="sizes and step counts (pipeline default: paper)"
    )
    group.add_argument(
        "--domain",
        default=None,
        choices=["manipulation", "driving", "game"],
        help="paper domain (every stage; params.yaml)",
    )
    group.add_argument("--task", default=None, help="target task (collect.task)")
    group.add_argument("--algo", default=None, choices=["veorl", "dreamerv2", "bc"], help="finetune.algo")
    group.add_argument("--model-name", default=None, help="register.model_name")
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="parameter override (repeatable), as for the components",
    )
    group.add_argument(
        "--video-source",
        dest="video_sources",
        action="append",
        default=[],
        metavar="URI",
        help="s3:// prefix of unlabeled videos to ingest instead of rendering (repeatable)",
    )
    group.add_argument("--checkpoint-root", default=None, help="shared checkpoint directory for resumable training")
    group.add_argument("--parent-run-id", default=None, help="MLflow run to nest the stage runs under")
    group.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs of each training node; > 1 runs that many processes under torchrun (default: the compiled --gpus)",
    )
    group.add_argument(
        "--num-nodes",
        type=int,
        default=None,
        help="training nodes; > 1 runs pretrain and finetune as Kubeflow Trainer TrainJobs (default 1)",
    )


def run_arguments(args: argparse.Namespace) -> dict:
    """Pipeline arguments given on the command line (the rest keep the pipeline's defaults)."""
    arguments: dict = {}
    names = ("preset", "domain", "task", "algo", "model_name", "checkpoint_root", "parent_run_id")
    for name in (*names, "gpus_per_node", "num_nodes"):
        value = getattr(args, name)
        if value is not None:
            arguments[name] = value
    if args.overrides:
        arguments["overrides"] = list(args.overrides)
    if args.video_sources:
        arguments["video_sources"] = list(args.video_sources)
    return arguments


def cmd_compile(args: argparse.Namespace) -> int:
    path = compile_pipeline(args.out, options_from_args(args))
    print(f"compiled {PIPELINE_NAME} -> {path}")
    return 0


def _client(args: argparse.Namespace):
    import kfp

    extra = {"namespace": args.namespace} if args.namespace else {}
    return kfp.Client(host=args.host, existing_token=os.environ.get(TOKEN_ENV) or None, **extra)


def cmd_upload(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="veorl-kfp-") as tmp:
        package = args.package or str(compile_pipeline(Path(tmp) / "veorl_pipeline.yaml", options_from_args(args)))
        client = _client(args)
        if args.version:
            pipeline_id = client.get_pipeline_id(args.name)
            if pipeline_id is None:
                raise LookupError(f"no pipeline named {args.name!r} on {args.host}; upload it once without --version")
            uploaded = client.upload_pipeline_version(package, args.version, pipeline_id=pipeline_id)
            print(json.dumps({"pipeline_id": pipeline_id, "version_id": uploaded.pipeline_version_id}, sort_keys=True))
        else:
            uploaded = client.upload_pipeline(package, pipeline_name=args.name, namespace=args.namespace)
            print(json.dumps({"pipeline_id": uploaded.pipeline_id}, sort_keys=True))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    arguments = run_arguments(args)
    with tempfile.TemporaryDirectory(prefix="veorl-kfp-") as tmp:
        package = args.package or str(compile_pipeline(Path(tmp) / "veorl_pipeline.yaml", options_from_args(args)))
        client = _client(args)
        result = client.create_run_from_pipeline_package(
            package,
            arguments=arguments,
            run_name=args.run_name,
            experiment_name=args.experiment,
            namespace=args.namespace,
            pipeline_root=args.pipeline_root,
            enable_caching=not args.no_cache,
            service_account=args.service_account,
        )
    print(json.dumps({"run_id": result.run_id, "host": args.host, "arguments": arguments}, sort_keys=True))
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    import warnings

    from kfp import local

    # Expected on a laptop: resources and the custom image only mean something on a cluster.
    warnings.filterwarnings("ignore", message=r"Task .* have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=r"You may be attemping to run a task that uses custom")
    root = Path(args.pipeline_root).resolve()
    options = options_from_args(args)
    result = {"pipeline_root": str(root)}
    if args.runner == "docker":
        gpu_image_given = bool(args.gpu_image or os.environ.get(GPU_IMAGE_ENV))
        runner, options, result["tracking_uri"] = docker_runner(root, options, gpu_image_given)
        result["image"] = options.image
    else:
        runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=runner, pipeline_root=str(root), enable_caching=args.cache)
    outcome = build_pipeline(options)(**run_arguments(args))
    print(json.dumps({"registered": outcome.output, **result}, sort_keys=True))
    return 0


def docker_runner(root: Path, options: CompileOptions, gpu_image_given: bool = False):
    """kfp.local's DockerRunner for a run under `root`: (runner, options, MLflow tracking URI of the steps).

    DockerRunner mounts the pipeline root at its own path in every container; the steps run as this user, so what
    they write belongs to the caller and a private root (a pytest tmp_path) is reachable. The MLflow store is a
    sqlite file in the root (its artifacts beside it), unless --env MLFLOW_TRACKING_URI names another. The training
    steps use the CPU image unless a GPU image is given: a local Docker engine has no GPU to offer.
    """
    from kfp import local

    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = options.env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlruns.db'}"
    runner = local.DockerRunner(user=f"{os.getuid()}:{os.getgid()}", environment={"MLFLOW_TRACKING_URI": tracking_uri})
    if not gpu_image_given:
        options = replace(options, gpu_image=options.image)
    return runner, options, tracking_uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.cli",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile the pipeline to YAML")
    p.add_argument("--out", default=str(PACKAGE_PATH), help="YAML to write (default: the checked-in %(default)s)")
    _add_compile_options(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("upload", help="upload the pipeline (or a new version of it) to a Kubeflow Pipelines endpoint")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.org/pipeline")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--name", default=PIPELINE_NAME, help="pipeline name in the UI (default: %(default)s)")
    p.add_argument("--version", default=None, help="upload as a new version of the existing pipeline --name")
    p.add_argument(
        "--package", default=None, help="upload this compiled YAML instead of compiling with the options below"
    )
    _add_compile_options(p)
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("submit", help="submit a run to a Kubeflow Pipelines endpoint")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.org/pipeline")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument(
        "--pipeline-root",
        default=None,
        help="where KFP stores this run's artifacts, e.g. s3://bucket/kfp (default: the installation's)",
    )
    p.add_argument(
        "--service-account", default=None, help="Kubernetes service account of the run's pods (e.g. with IRSA)"
    )
    p.add_argument("--experiment", default=PIPELINE_NAME, help="KFP experiment name (default: %(default)s)")
    p.add_argument("--run-name", default=None, help="run name (default: generated by KFP)")
    p.add_argument(
        "--package", default=None, help="submit this compiled YAML instead of compiling with the options below"
    )
    p.add_argument("--no-cache", action="store_true", help="disable step caching for this run")
    _add_run_arguments(p)
    _add_compile_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "run-local", help="run the pipeline here with kfp.local (SubprocessRunner; from the repository root)"
    )
    p.add_argument("--pipeline-root", default="local_outputs", help="where step outputs go (default: %(default)s)")
    p.add_argument(
        "--runner",
        choices=["subprocess", "docker"],
        default="subprocess",
        help="subprocess: the steps run in this Python environment; docker: in --image, through a local Docker "
        "engine, with the MLflow store in the pipeline root (default: %(default)s)",
    )
    p.add_argument("--cache", action="store_true", help="enable kfp.local's step cache")
    _add_run_arguments(p)
    _add_compile_options(p)
    p.set_defaults(func=cmd_run_local)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # a clean one-line error; the endpoint/token never appear in messages we compose
        from veorl.storage import redact

        message = redact(str(exc))  # also removes the $KFP_TOKEN value
        print(f"error: {args.command} failed: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
