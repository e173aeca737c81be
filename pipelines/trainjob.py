"""Training on several nodes: a Kubeflow Trainer TrainJob built and created by the Kubeflow SDK (`kubeflow`).

A training step with `num_nodes > 1` cannot run its processes inside its own pod. It hands them to the Kubeflow
Trainer (v2): one TrainJob on the `torch-distributed` ClusterTrainingRuntime, whose torch plugin starts one pod
per node and sets torchrun's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT,
so each node runs `torchrun -m components.<stage> ...` and the ranks find each other. The job is described with
the SDK's own types (CustomTrainerContainer: image, nodes, resources per node, env; options: name, labels,
command, args) and created by `TrainerClient.train`; `manifest` renders the very object that call would send,
by running the SDK's Kubernetes backend with a recorder in place of the API server (tests/golden holds one).

Needs the `cluster` extra (`pip install -e .[cluster]`: kubeflow 0.5, Trainer v2 API). The trainer pods must
see the step's shared folder (checkpoint_root) at the same path: the runtime mounts it (docs/cluster.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RUNTIME = "torch-distributed"  # the Trainer's ClusterTrainingRuntime for PyTorch
LABEL_STAGE = "veorl.stage"


@dataclass(frozen=True)
class TrainJobRequest:
    """What a training step asks the Trainer for."""

    stage: str  # pretrain | finetune: runs `torchrun -m components.<stage>`
    args: tuple[str, ...]  # the component's command-line arguments (paths on the shared folder)
    image: str
    num_nodes: int
    gpus_per_node: int  # 0: CPU nodes, one process each
    cpu: str = "8"
    memory: str = "32G"
    env: Mapping[str, str] = field(default_factory=dict)
    name: str = ""  # empty: derived from the stage and the arguments (a re-submitted step finds its job)

    @property
    def job_name(self) -> str:
        if self.name:
            return self.name
        digest = hashlib.sha256("\0".join((self.stage, self.image, *self.args)).encode()).hexdigest()[:10]
        return f"veorl-{self.stage}-{digest}"

    @property
    def command(self) -> list[str]:
        # torchrun takes nodes, processes per node, node rank and rendezvous from the PET_* variables the
        # runtime sets.
        return ["torchrun", "-m", f"components.{self.stage}"]


def _sdk():
    try:
        from kubeflow.trainer import CustomTrainerContainer, TrainerClient
        from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
        from kubeflow.trainer.options import Labels, Name, TrainerArgs, TrainerCommand
        from kubeflow.trainer.types import types
    except ImportError as exc:  # pragma: no cover - the message is the point
        raise RuntimeError(
            "training on several nodes needs the Kubeflow SDK: pip install 'veorl[cluster]' (kubeflow)"
        ) from exc
    return {
        "CustomTrainerContainer": CustomTrainerContainer,
        "TrainerClient": TrainerClient,
        "KubernetesBackend": KubernetesBackend,
        "Labels": Labels,
        "Name": Name,
        "TrainerArgs": TrainerArgs,
        "TrainerCommand": TrainerCommand,
        "types": types,
    }


def sdk_arguments(request: TrainJobRequest) -> dict[str, Any]:
    """The keyword arguments of `TrainerClient.train` for this request (runtime, trainer, options)."""
    sdk = _sdk()
    types = sdk["types"]
    # The runtime is named, not looked up: a Runtime object keeps the SDK from asking the cluster for it.
    runtime = types.Runtime(
        name=RUNTIME,
        trainer=types.RuntimeTrainer(
            trainer_type=types.TrainerType.CUSTOM_TRAINER, framework="torch", image=request.image
        ),
        kind=types.RuntimeKind.CLUSTER_TRAINING_RUNTIME,
    )
    resources: dict[str, Any] = {"cpu": request.cpu, "memory": request.memory}
    if request.gpus_per_node > 0:
        resources["gpu"] = request.gpus_per_node
    trainer = sdk["CustomTrainerContainer"](
        image=request.image,
        num_nodes=request.num_nodes,
        resources_per_node=resources,
        env=dict(sorted(request.env.items())) or None,
    )
    options = [
        sdk["Name"](name=request.job_name),
        sdk["Labels"](labels={LABEL_STAGE: request.stage}),
        sdk["TrainerCommand"](command=request.command),
        sdk["TrainerArgs"](args=list(request.args)),
    ]
    return {"runtime": runtime, "trainer": trainer, "options": options}


class _Recorder:
    """Stands in for the Kubernetes CustomObjectsApi: keeps what would have been created."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **_: Any) -> dict:
        self.created.append({"group": group, "version": version, "namespace": namespace, "plural": plural, **body})
        return body


def manifest(request: TrainJobRequest, namespace: str = "kubeflow-user") -> dict[str, Any]:
    """The TrainJob `submit` creates, as the SDK's Kubernetes backend builds it (apiVersion, kind, metadata, spec)."""
    sdk = _sdk()
    backend = sdk["KubernetesBackend"].__new__(sdk["KubernetesBackend"])  # no cluster connection, no checks
    backend.namespace, backend.custom_api = namespace, _Recorder()
    backend.train(**sdk_arguments(request))
    (created,) = backend.custom_api.created
    return {k: v for k, v in created.items() if k not in ("group", "version", "namespace", "plural")}


def to_yaml(document: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(_drop_empty(dict(document)), sort_keys=True)


def _drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_empty(v) for v in value]
    return value


def submit(request: TrainJobRequest, namespace: str | None = None, client: Any = None) -> str:
    """Create the TrainJob through the SDK's TrainerClient (in-cluster or kube-config credentials); its name."""
    sdk = _sdk()
    if client is None:
        from kubeflow.common.types import KubernetesBackendConfig

        client = sdk["TrainerClient"](KubernetesBackendConfig(namespace=namespace))
    return client.train(**sdk_arguments(request))


def run(request: TrainJobRequest, namespace: str | None = None, timeout_s: int = 7 * 24 * 3600) -> str:
    """Submit (or find, when a retried step submitted it already) and wait until the job completes; raise if it
    fails. Returns the job's name."""
    sdk = _sdk()
    from kubeflow.common.types import KubernetesBackendConfig

    client = sdk["TrainerClient"](KubernetesBackendConfig(namespace=namespace))
    try:
        client.get_job(request.job_name)
        name = request.job_name
    except Exception:  # not there yet
        name = submit(request, client=client)
    client.wait_for_job_status(name, status={"Complete"}, timeout=timeout_s)
    return name


def request_for(
    stage: str,
    args: Sequence[str],
    *,
    image: str,
    num_nodes: int,
    gpus_per_node: int,
    env: Mapping[str, str] | None = None,
    cpu: str = "8",
    memory: str = "32G",
) -> TrainJobRequest:
    return TrainJobRequest(
        stage=stage,
        args=tuple(str(a) for a in args),
        image=image,
        num_nodes=int(num_nodes),
        gpus_per_node=int(gpus_per_node),
        cpu=cpu,
        memory=memory,
        env=dict(env or {}),
    )


__all__ = ["RUNTIME", "TrainJobRequest", "manifest", "request_for", "run", "sdk_arguments", "submit", "to_yaml"]
