"""Training on several nodes: the Kubeflow Trainer TrainJob a training step creates (pipelines.trainjob).

The manifest is golden-tested; creation goes through the SDK's TrainerClient, checked here against a stand-in for
the Kubernetes API (no cluster in the tests). Regenerate the golden file with VEORL_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("kubeflow.trainer", reason="the cluster extra (kubeflow) is not installed")

from pipelines import trainjob  # noqa: E402
from pipelines.training import processes_per_node, torchrun_command  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "trainjob_pretrain.yaml"
REQUEST = trainjob.request_for(
    "pretrain",
    [
        "--clips",
        "/mnt/shared/trainjob/pretrain/inputs/clips",
        "--episodes",
        "/mnt/shared/trainjob/pretrain/inputs/episodes",
        "--out",
        "/mnt/shared/trainjob/pretrain/outputs/out",
        "--checkpoints",
        "/mnt/shared/pretrain-0123456789ab",
        "--params",
        "/mnt/shared/trainjob/pretrain/params.json",
        "--no-progress",
    ],
    image="registry.example.org/ml/veorl:0.1.0-cuda",
    num_nodes=2,
    gpus_per_node=4,
    env={"MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000"},
)


def test_trainjob_manifest_matches_the_golden_file():
    text = trainjob.to_yaml(trainjob.manifest(REQUEST))
    if os.environ.get("VEORL_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "TrainJob manifest changed; VEORL_UPDATE_GOLDEN=1 rewrites the golden file"


def test_the_manifest_is_what_the_sdk_client_creates(monkeypatch):
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
    from kubernetes import client as k8s

    created = []
    monkeypatch.setattr(KubernetesBackend, "verify_backend", lambda self: None)
    monkeypatch.setattr(
        k8s.CustomObjectsApi,
        "create_namespaced_custom_object",
        lambda self, group, version, namespace, plural, body, **kw: created.append((group, plural, namespace, body)),
    )
    config = KubernetesBackendConfig(namespace="team-a", client_configuration=k8s.Configuration())
    name = trainjob.submit(REQUEST, client=TrainerClient(config))
    ((group, plural, namespace, body),) = created
    assert (group, plural, namespace, name) == ("trainer.kubeflow.org", "trainjobs", "team-a", REQUEST.job_name)
    assert body == trainjob.manifest(REQUEST, namespace="team-a")


def test_processes_per_node_and_the_single_node_command():
    assert [processes_per_node(g) for g in (0, 1, 4)] == [1, 1, 4]
    command = torchrun_command("finetune", 4, ["--out", "x"])
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "components.finetune",
        "--out",
        "x",
    ]
    assert REQUEST.command == ["torchrun", "-m", "components.pretrain"]
