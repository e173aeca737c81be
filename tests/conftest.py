"""Shared fixtures. Add yours below; keep each one small and documented."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import builders
from veorl.config import Params

# Deliberately distinctive, so a test can assert it never shows up in output or files.
S3_TEST_SECRET = "veorl-test-secret-value-0123456789"


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto, in a thread) on 127.0.0.1 at a free port; yields its endpoint URL.

    It lives for the whole test session; use a fresh bucket per test (the `s3_bucket` fixture).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Standard AWS environment pointing boto3 (veorl.storage.s3_client, MLflow, DVC) at `s3_server`; yields the
    endpoint.

    Profiles, config files and tokens from the machine are masked, so nothing can reach a real account.
    Child processes (workers, CLI subprocesses) inherit the variables.
    """
    for var in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    yield s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A new, empty bucket on the local S3 server (with `s3_env` set); yields its name."""
    from veorl.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    yield name


# ------------------------------------------------------------------------------------------------
# Parameters, tracking store and small datasets (plain builders in tests/builders.py)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def params() -> Callable[..., Params]:
    """Factory of validated smoke-preset Params: `params("pretrain.batch=3", "finetune.algo=bc")`.

    Positional arguments are `section.key=value` overrides (as `--set` takes them); `raw=` a params.yaml-like dict
    applied before them; `preset=` another preset. Bad keys or values raise veorl.config.ConfigError.
    """
    return builders.smoke_params


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> Iterator[str]:
    """An empty MLflow sqlite store for this test; yields its tracking URI.

    MLFLOW_TRACKING_URI is set for the test (subprocesses inherit it) and restored afterwards; a pipeline parent
    run id from the outer environment (VEORL_PARENT_RUN_ID) is removed so runs are not nested under it, and
    MLflow's telemetry is off. The database file is created by the first MLflow call, in the test's tmp_path.
    """
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("VEORL_PARENT_RUN_ID", raising=False)
    yield uri


def _unique_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    if path.exists():
        raise FileExistsError(f"{path} already exists: give each dataset of a test its own name")
    return path


@pytest.fixture
def clip_builder(tmp_path) -> Callable[..., Path]:
    """Factory writing an ingested-clips directory under tmp_path; returns its path (a ClipStore reads it).

    `clip_builder(name="video_clips", clips=3, window=12, stride=6, sources=1, clips_per_shard=16, failed=0,
    seed=1)`: manifest.json and clips/<key>-<k>.npy shards as veorl.video.ingest writes them; each source holds
    `clips` moving-square clips (see builders.write_clips).
    """

    def build(name: str = "video_clips", **kwargs) -> Path:
        return builders.write_clips(_unique_dir(tmp_path, name), **kwargs)

    return build


@pytest.fixture
def episode_builder(tmp_path) -> Callable[..., Path]:
    """Factory writing a target episode dataset under tmp_path; returns its path (an EpisodeStore reads it).

    `episode_builder(name="target_episodes", episodes=2, length=16, seed=0, params=None, successes=None)`:
    episodes/*.npz, episode_meta/*.json and card.json as components.collect writes them, 64x64 frames and
    4-d actions; `length` may also be one length per episode (see builders.write_episodes).
    """

    def build(name: str = "target_episodes", **kwargs) -> Path:
        return builders.write_episodes(_unique_dir(tmp_path, name), **kwargs)

    return build
