"""S3 end to end against a local S3-compatible server (moto, from tests/conftest.py) on 127.0.0.1.

Everything goes through the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3,
plus MLFLOW_S3_ENDPOINT_URL for MLflow): DVC's S3 remote, MLflow's artifact store, and the pipeline's S3 video
sources. The credentials are distinctive, and the tests assert they never show up in output, files or MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.builders import make_agent, write_evaluation
from veorl.storage import s3_client, s3_list

REPO = Path(__file__).resolve().parents[2]
ACCESS_KEY_ID = "AKIAVEORLLEAKCHECK42"


@pytest.fixture
def credentials(s3_env, monkeypatch) -> tuple[str, str]:
    """The (key id, secret) in the environment; both distinctive so a leak is unambiguous."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    return ACCESS_KEY_ID, os.environ["AWS_SECRET_ACCESS_KEY"]


def assert_no_credentials(text: str | bytes, credentials: tuple[str, str], where: str) -> None:
    for secret in credentials:
        needle = secret.encode() if isinstance(text, bytes) else secret
        assert needle not in text, f"a credential leaked into {where}"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def test_dvc_push_and_pull_through_an_s3_remote(s3_bucket, credentials, tmp_path):
    """A DVC S3 remote configured by URL only; endpoint and credentials come from the environment."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    payload = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (repo / "data" / "clips.bin").write_bytes(payload)
    (repo / "data" / "card.json").write_text('{"clips": 1}')
    outputs = []

    def run(*args: str) -> None:
        proc = subprocess.run(list(args), cwd=repo, capture_output=True, text=True, timeout=120)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr[-1500:]}"

    dvc = _bin("dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "config", "core.analytics", "false")
    run(dvc, "remote", "add", "-d", "storage", f"s3://{s3_bucket}/dvcstore")
    run(dvc, "add", "-q", "data")
    run(dvc, "push", "-r", "storage")
    pushed = s3_list(f"s3://{s3_bucket}/dvcstore/")
    assert len(pushed) == 3  # two files and the directory listing, content-addressed under files/md5/
    assert all("/files/md5/" in uri for uri, _, _ in pushed)

    for path in (repo / "data").iterdir():
        path.unlink()
    (repo / "data").rmdir()
    subprocess.run(["rm", "-rf", str(repo / ".dvc" / "cache")], check=True)
    run(dvc, "pull", "-r", "storage")
    assert (repo / "data" / "clips.bin").read_bytes() == payload
    run(dvc, "status", "-c", "-r", "storage")
    assert "in sync" in outputs[-1].lower() or "up to date" in outputs[-1].lower()

    # Raw videos tracked straight from the bucket (docs/s3.md): `dvc update` refetches when the objects change.
    client = s3_client()
    client.put_object(Bucket=s3_bucket, Key="raw/a.mp4", Body=b"first take")
    run(dvc, "import-url", f"s3://{s3_bucket}/raw", "external_videos")
    assert (repo / "external_videos" / "a.mp4").read_bytes() == b"first take"
    client.put_object(Bucket=s3_bucket, Key="raw/a.mp4", Body=b"second take")
    run(dvc, "update", "external_videos.dvc")
    assert (repo / "external_videos" / "a.mp4").read_bytes() == b"second take"

    # Credentials stay in the environment: nothing under .dvc/ (config or config.local) holds them.
    assert not (repo / ".dvc" / "config.local").exists()
    for path in (repo / ".dvc").rglob("config*"):
        assert_no_credentials(path.read_text(), credentials, str(path))
    assert_no_credentials("\n".join(outputs), credentials, "dvc output")


def _register(agent: Path, evaluation: Path, out: Path, tracking_uri: str, *sets: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "components.register",
        "--agent",
        str(agent),
        "--evaluation",
        str(evaluation),
        "--out",
        str(out),
        "--preset",
        "smoke",
    ]
    for item in sets:
        command += ["--set", item]
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def test_mlflow_artifacts_in_s3_and_no_credential_leaks(s3_bucket, credentials, tmp_path, monkeypatch, capfd):
    """Registration with the experiment's artifacts in S3: the model round-trips, and no credential leaks anywhere."""
    import mlflow
    from mlflow import MlflowClient

    from veorl.serving import initial_state

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    agent = make_agent(tmp_path / "agent", seed=5)
    evaluation = write_evaluation(tmp_path / "eval", agent, 0.5)
    out = tmp_path / "registration.json"
    proc = _register(
        agent,
        evaluation,
        out,
        uri,
        f"tracking.artifact_location=s3://{s3_bucket}/mlflow",
        "tracking.experiment=veorl-s3",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads(out.read_text())
    assert outcome["alias"] == "champion"

    keys = [item[0] for item in s3_list(f"s3://{s3_bucket}/mlflow/")]
    assert any(k.endswith("/artifacts/MLmodel") for k in keys)
    assert any(k.endswith("/artifacts/agent/agent.pt") for k in keys)  # the agent directory is the model's artifact

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/veorl-agent@champion")  # downloaded back from S3
    served = model.predict({"image": np.zeros((1, 64, 64, 3), np.uint8), **initial_state(model)})
    assert served["action"].shape == (1, 4)

    # The log scan: process output, the outcome file, every run's params and tags, version tags, the store itself.
    assert_no_credentials(proc.stdout + proc.stderr, credentials, "register stdout/stderr")
    assert_no_credentials(out.read_text(), credentials, "registration.json")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("veorl-s3")
    assert experiment.artifact_location == f"s3://{s3_bucket}/mlflow"
    for run in client.search_runs([experiment.experiment_id]):
        assert_no_credentials(
            json.dumps(run.data.params) + json.dumps(run.data.tags), credentials, f"run {run.info.run_id}"
        )
    for version in client.search_model_versions("name = 'veorl-agent'"):
        assert_no_credentials(json.dumps(version.tags), credentials, f"version {version.version} tags")
    assert_no_credentials(db.read_bytes(), credentials, "the MLflow store")
    s3 = s3_client()
    for key in keys:
        if key.endswith(("MLmodel", "requirements.txt", "python_env.yaml", "conda.yaml")):
            body = s3.get_object(Bucket=s3_bucket, Key=key.split("/", 3)[3])["Body"].read()
            assert_no_credentials(body, credentials, key)

    # A failure (no such bucket) reports the error without echoing any credential.
    from components.register import main

    other = make_agent(tmp_path / "other", seed=6)
    code = main(
        [
            "--agent",
            str(other),
            "--evaluation",
            str(write_evaluation(tmp_path / "eval-other", other, 0.5)),
            "--out",
            str(tmp_path / "failed.json"),
            "--preset",
            "smoke",
            "--set",
            "tracking.artifact_location=s3://no-such-bucket-veorl/x",
            "--set",
            "tracking.experiment=veorl-broken",
        ]
    )
    captured = capfd.readouterr()
    assert code == 1
    assert "error: registration failed" in captured.err
    assert_no_credentials(captured.out + captured.err, credentials, "error output")
    assert not (tmp_path / "failed.json").exists()
