"""How a KFP training step (pretrain, finetune) runs its processes: in the step, under torchrun, or as a TrainJob.

- `gpus_per_node <= 1` and `num_nodes == 1` (the default): the component's `run` in the step's own process, as
  before these parameters existed;
- one node, `gpus_per_node = N > 1`: `torchrun --standalone --nproc_per_node N -m components.<stage>` in the step's
  container, the KFP task holding the N GPUs; the step then reads the metrics file rank 0 wrote;
- `num_nodes > 1`: a Kubeflow Trainer TrainJob (pipelines.trainjob) of num_nodes pods with gpus_per_node GPUs each.
  Its pods cannot see the step's local artifact paths, so the inputs are copied under the shared
  `checkpoint_root` (required), the job writes its outputs there, and the step copies them back into its outputs.

Each rank of a multi-process run is one data-parallel replica (veorl.distributed): the global batch is
per-rank batch x processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from veorl.config import Params, dump_resolved

TRAINER_IMAGE_ENV = "VEORL_TRAINER_IMAGE"  # set on the training tasks at compile time: the image of their pods


def processes_per_node(gpus_per_node: int) -> int:
    return max(1, int(gpus_per_node))


def write_params(params: Params, folder: str | Path) -> str:
    """The step's validated parameters as a params file the component's --params reads back unchanged."""
    path = Path(folder) / "params.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_resolved(params))
    return str(path)


def torchrun_command(stage: str, processes: int, args: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, "-m", f"components.{stage}", *args]


def launch(
    stage: str,
    in_process: Callable[[], dict[str, Any]],
    params: Params,
    *,
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    options: Mapping[str, str | None],
    metrics: str,
    gpus_per_node: int,
    num_nodes: int,
    shared_root: str,
    workdir: str,
) -> dict[str, Any]:
    """Run one training stage as the parameters ask; returns the stage's metrics (what `run` returns).

    inputs / outputs: CLI flag -> local path (`--clips` -> the input artifact, `--out` -> the output artifact);
    options: other flags (checkpoints, parent run id; None left out); metrics: the --metrics file.
    """
    processes = processes_per_node(gpus_per_node)
    if num_nodes <= 1 and processes == 1:
        return in_process()
    if num_nodes <= 1:
        args = _args({**inputs, **outputs, **options, "--metrics": metrics}, write_params(params, workdir))
        subprocess.run(torchrun_command(stage, processes, args), check=True)
        return json.loads(Path(metrics).read_text())
    return _train_job(stage, params, inputs, outputs, options, metrics, gpus_per_node, num_nodes, shared_root)


def training_step(
    stage: str,
    config: str,
    identity: tuple[str, ...],
    in_process: Callable[[Params, dict[str, Any]], dict[str, Any]],
    *,
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    checkpoint_root: str,
    parent_run_id: str,
    log_dir: str,
    gpus_per_node: int,
    num_nodes: int,
    metrics_output: Any,
) -> dict[str, Any]:
    """What the KFP pretrain and finetune steps share; returns the stage's summary.

    The stage's parameters come from the step's `config`; its checkpoints go to a folder under `checkpoint_root`
    named by the config and the upstream content hashes `identity` (a retried step resumes there); its metrics and
    curve files go to `log_dir`. `in_process(params, files)` runs the component's `run` with `files` (checkpoints,
    parent_run_id, metrics, curve) as keywords; `launch` decides whether it runs in the step or as processes.
    Every numeric leaf of the summary is logged to the step's `metrics_output` (a KFP Metrics artifact).
    """
    from pipelines.steps import checkpoint_dir, params_for_stage
    from veorl.trees import numeric_leaves

    os.makedirs(log_dir, exist_ok=True)
    params = params_for_stage(config)
    files = {
        "checkpoints": checkpoint_dir(checkpoint_root, stage, config, *identity),
        "parent_run_id": parent_run_id or None,
        "metrics": os.path.join(log_dir, "metrics.json"),
        "curve": os.path.join(log_dir, "curve.csv"),
    }
    summary = launch(
        stage,
        lambda: in_process(params, files),
        params,
        inputs=inputs,
        outputs=outputs,
        options={f"--{key.replace('_', '-')}": files[key] for key in ("checkpoints", "parent_run_id", "curve")},
        metrics=files["metrics"],
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        shared_root=checkpoint_root,
        workdir=log_dir,
    )
    for name, value in sorted(numeric_leaves(summary).items()):
        metrics_output.log_metric(name, value)
    return summary


def _args(flags: Mapping[str, str | None], params_path: str) -> list[str]:
    args = [str(x) for flag, value in flags.items() if value for x in (flag, value)]
    return [*args, "--params", params_path, "--no-progress"]


def _train_job(
    stage: str,
    params: Params,
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    options: Mapping[str, str | None],
    metrics: str,
    gpus_per_node: int,
    num_nodes: int,
    shared_root: str,
) -> dict[str, Any]:
    from pipelines import trainjob

    if not shared_root:
        raise ValueError(
            f"{stage} on {num_nodes} nodes needs checkpoint_root: a folder every trainer pod mounts at the same path"
        )
    image = os.environ.get(TRAINER_IMAGE_ENV)
    if not image:
        raise ValueError(f"{TRAINER_IMAGE_ENV} is not set: compile the pipeline with pipelines.cli")
    # Named after the checkpoint folder (config and inputs): a retried step finds its staged data and its job.
    staging = Path(shared_root) / "trainjob" / Path(options.get("--checkpoints") or stage).name
    shared_inputs = {}
    for flag, path in inputs.items():
        target = staging / "inputs" / flag.lstrip("-")
        if not target.exists():
            shutil.copytree(path, target)
        shared_inputs[flag] = str(target)
    shared_outputs = {flag: str(staging / "outputs" / flag.lstrip("-")) for flag in outputs}
    shared_metrics = str(staging / "metrics.json")
    flags = {**shared_inputs, **shared_outputs, **options, "--metrics": shared_metrics}
    args = _args(flags, write_params(params, staging))
    # Non-secret settings only (tracking URI, S3 endpoint); secrets reach the pods through the runtime.
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_TRACKING_URI", "AWS_ENDPOINT", "VEORL_"))}
    request = trainjob.request_for(stage, args, image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node, env=env)
    trainjob.run(request)
    for flag, path in outputs.items():
        shutil.copytree(shared_outputs[flag], path, dirs_exist_ok=True)
    shutil.copyfile(shared_metrics, metrics)
    return json.loads(Path(metrics).read_text())


__all__ = ["TRAINER_IMAGE_ENV", "launch", "processes_per_node", "torchrun_command", "training_step", "write_params"]
