"""Shared fixtures. Add yours below; keep each one small and documented."""

from __future__ import annotations

import uuid

import pytest

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
    """Standard AWS environment pointing boto3 (veorl.storage.s3_client, MLflow, DVC) at `s3_server`; yields the endpoint.

    Profiles, config files and tokens from the machine are masked, so nothing can reach a real account.
    Child processes (workers, CLI subprocesses) inherit the variables.
    """
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
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
