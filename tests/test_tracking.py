"""MLflow stage runs against a real, temporary sqlite store: nesting, params, metrics, redaction, resume, status."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

from veorl import tracking
from veorl.config import resolve
from veorl.trees import numeric_leaves


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """An empty MLflow store in this test's tmp_path; MLFLOW_TRACKING_URI points at it."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    return uri


def smoke(*overrides: str):
    return resolve({}, preset="smoke", overrides=list(overrides))


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def parent_run(uri: str, params) -> str:
    experiment = tracking.ensure_experiment(params.tracking.experiment, uri)
    return client(uri).create_run(experiment, run_name="pipeline").info.run_id


def test_a_stage_run_nests_under_the_parent_given_or_from_the_environment(store, monkeypatch):
    params = smoke()
    parent = parent_run(store, params)
    with tracking.stage_run("pretrain", params, parent) as run:
        assert tracking.active_run_id() == run.run_id
    assert client(store).get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent

    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)  # what the pipeline hands each step
    with tracking.stage_run("finetune", params) as second:
        pass
    tags = client(store).get_run(second.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["veorl.stage"] == "finetune"
    assert tracking.active_run_id() is None  # the stage's run ended with the block


def test_params_and_metrics_are_logged_with_numeric_leaves(store):
    params = smoke("pretrain.batch=3")
    with tracking.stage_run("pretrain", params, sections=("pretrain",)) as run:
        tracking.log_metrics(
            {"loss": np.float32(1.5), "steps": 7, "nan": math.nan, "inf": math.inf, "none": None}, step=4
        )
        tracking.log_metrics(numeric_leaves({"eval": {"success_rate": 0.25, "episodes": 2, "ok": True, "name": "x"}}))
        tracking.log_params({"extra.note": "hello"})
    data = client(store).get_run(run.run_id).data
    # Params: every leaf of the chosen sections, flattened with dots; numbers and None as their text.
    assert data.params["pretrain.batch"] == "3" and data.params["pretrain.optim.lr"] == "0.0003"
    assert data.params["pretrain.phase2_free_nats"] == "None" and data.params["preset"] == "smoke"
    assert data.params["extra.note"] == "hello"
    assert not any(key.startswith("model.") for key in data.params)  # only the sections asked for
    # Metrics: finite numbers only (NaN, inf and None are dropped rather than failing the run); booleans and
    # strings are not numeric leaves.
    assert data.metrics == {"loss": 1.5, "steps": 7.0, "eval.success_rate": 0.25, "eval.episodes": 2.0}
    history = client(store).get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(4, 1.5)]


def test_credentials_never_reach_params(store, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIexample")
    # A tracking URI with basic auth in params (MLFLOW_TRACKING_URI, the sqlite store, is what is used).
    params = smoke("tracking.uri=https://alice:pa55word@mlflow.example.com")
    with tracking.stage_run("register", params, sections=("tracking",)) as run:
        tracking.log_params({"endpoint": "s3 key wJalrXUtnFEMIexample used"})
    assert run.tracking_uri == store
    logged = client(store).get_run(run.run_id).data.params
    assert logged["tracking.uri"] == "https://mlflow.example.com"  # credentials split off, not just masked
    assert logged["endpoint"] == "s3 key <AWS_SECRET_ACCESS_KEY> used"
    assert not any("pa55word" in v or "wJalrXUtnFEMIexample" in v for v in logged.values())


def test_resumed_stage_continues_its_run_and_records_changed_settings(store, tmp_path):
    run_dir = tmp_path / "checkpoints"
    with tracking.stage_run("pretrain", smoke(), run_dir=run_dir, sections=("pretrain",)) as first:
        tracking.log_metrics({"loss": 2.0}, step=1)
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == first.run_id and not first.resumed
    with tracking.stage_run(
        "pretrain", smoke("pretrain.log_every=5"), run_dir=run_dir, sections=("pretrain",)
    ) as again:
        tracking.log_metrics({"loss": 1.0}, step=2)
    assert again.run_id == first.run_id and again.resumed
    run = client(store).get_run(first.run_id)
    assert run.data.tags["veorl.resumed"] == "true"
    assert run.data.params["pretrain.log_every"] == "1"  # params are immutable: the first value stays ...
    assert run.data.tags["resumed_with.pretrain.log_every"] == "5"  # ... and the new one is recorded as a tag
    assert [m.value for m in client(store).get_metric_history(first.run_id, "loss")] == [2.0, 1.0]


def test_run_status_follows_how_the_stage_ended(store):
    params = smoke()
    with pytest.raises(ValueError), tracking.stage_run("finetune", params) as failed:
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("finetune", params) as killed:
        raise KeyboardInterrupt
    with tracking.stage_run("finetune", params) as finished:
        pass
    status = {
        name: client(store).get_run(run.run_id).info.status
        for name, run in (("failed", failed), ("killed", killed), ("finished", finished))
    }
    assert status == {"failed": "FAILED", "killed": "KILLED", "finished": "FINISHED"}


def test_logging_helpers_do_nothing_without_a_run(store):
    tracking.log_metrics({"loss": 1.0})
    tracking.log_params({"a": 1})
    tracking.log_dict({"a": 1}, "a.json")
    assert tracking.active_run_id() is None


def test_tracking_uri_and_experiment_helpers(store, tmp_path, monkeypatch, caplog):
    # A relative sqlite path in params becomes absolute (so subprocesses elsewhere open the same file).
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri(smoke("tracking.uri=sqlite:///sub/db.sqlite")) == f"sqlite:///{tmp_path}/sub/db.sqlite"
    assert (tmp_path / "sub").is_dir()
    assert tracking.tracking_uri(smoke("tracking.uri=http://localhost:5000")) == "http://localhost:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.tracking_uri(smoke("tracking.uri=http://localhost:5000")) == store  # the environment wins

    # New experiments keep their artifacts beside a sqlite store; the helper is idempotent.
    first = tracking.ensure_experiment("exp", store)
    assert tracking.ensure_experiment("exp", store) == first
    location = client(store).get_experiment(first).artifact_location
    assert location == (tmp_path / "mlartifacts").as_uri()
    # An explicit location for a new experiment is used; asking another one of an existing experiment only warns.
    wanted = (tmp_path / "elsewhere").as_uri()
    other = tracking.ensure_experiment("exp2", store, artifact_location=wanted)
    assert client(store).get_experiment(other).artifact_location == wanted
    with caplog.at_level(logging.WARNING, logger="veorl.tracking"):
        assert tracking.ensure_experiment("exp", store, artifact_location=wanted) == first
    assert "already stores artifacts" in caplog.text and Path(location[len("file://") :]).name == "mlartifacts"


def test_credentials_in_the_tracking_uri_go_to_the_connection_only(store, monkeypatch):
    """https://user:pass@host: the URI every later step sees has no credentials; MLflow's client still gets them."""
    from mlflow.utils.credentials import get_default_host_creds

    for var in (tracking.USERNAME_ENV, tracking.PASSWORD_ENV):
        monkeypatch.setenv(var, "placeholder")  # recorded, so the test's changes to them are undone afterwards
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:pa55-w0rd%2F@mlflow.example.com:8443/base")
    uri = tracking.tracking_uri(smoke())
    assert uri == "https://mlflow.example.com:8443/base" and os.environ["MLFLOW_TRACKING_URI"] == uri
    creds = get_default_host_creds(uri)
    assert (creds.host, creds.username, creds.password) == (uri, "alice", "pa55-w0rd/")

    # From params (no environment URI): the same split, and the recorded params hold the clean URI.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv(tracking.PASSWORD_ENV)
    params = smoke(
        "tracking.uri=https://bob:s3cr3t-pw@mlflow.example.com", "tracking.artifact_location=s3://K3Y1:S3CR3T2@b/x"
    )
    public = tracking.public_params(params)
    assert public.tracking.uri == "https://mlflow.example.com" and public.tracking.artifact_location == "s3://b/x"
    assert os.environ[tracking.PASSWORD_ENV] == "s3cr3t-pw"
    assert tracking.tracking_uri(params) == "https://mlflow.example.com"
    assert "s3cr3t" not in json.dumps(public.section_dict("tracking")) and "S3CR3T2" not in str(public)


def _open_store_when_all_are_ready(uri: str, barrier) -> str:
    barrier.wait()  # every process reaches the fresh database at the same moment
    params = resolve({"tracking": {"uri": uri, "experiment": "race"}}, preset="smoke")
    with tracking.stage_run("race", params) as run:
        return run.run_id


def test_stages_starting_together_on_a_fresh_sqlite_store_all_get_a_run(tmp_path, monkeypatch):
    """Parallel stages creating a new store's tables at once used to fail with "table ... already exists"."""
    import multiprocessing

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlruns.db'}"
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing created in this process
    with context.Manager() as manager:
        barrier = manager.Barrier(4)
        with context.Pool(4) as pool:
            run_ids = pool.starmap(_open_store_when_all_are_ready, [(uri, barrier)] * 4)
    assert len(set(run_ids)) == 4
