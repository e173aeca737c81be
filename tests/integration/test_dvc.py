"""The DVC pipeline: stages run from dvc.yaml, a second `dvc repro` does nothing, params changes re-run only what
reads them.

Runs in a throw-away git+DVC copy of the repository on the `smoke` preset.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DATA_STAGES = ["source_videos", "ingest", "collect"]


def _sh(cmd, cwd, env, check=True):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


@pytest.fixture
def dvc_repo(tmp_path):
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    dest = tmp_path / "repo"
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/", "docs/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["preset"] = "smoke"
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(dest)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    _sh(["git", "init", "-q"], dest, env)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest, env)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], dest, env)
    return dest, env


def test_data_stages_run_then_second_repro_does_nothing(dvc_repo):
    repo, env = dvc_repo
    dvc = [sys.executable, "-m", "dvc"]
    first = _sh(dvc + ["repro", *DATA_STAGES], repo, env)
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in first
    assert (repo / "data/video_clips/manifest.json").exists()
    assert (repo / "data/target_episodes/card.json").exists()
    second = _sh(dvc + ["repro", *DATA_STAGES], repo, env)
    assert "Running stage" not in second
    # a parameter only `collect` reads re-runs `collect` alone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["collect"]["seed"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _sh(dvc + ["status"], repo, env)
    assert "collect" in status and "ingest" not in status and "source_videos" not in status


@pytest.mark.slow
def test_full_pipeline_then_experiment_variation(dvc_repo):
    """The whole chain on smoke, then `dvc exp run -S finetune.algo=dreamerv2` on the same data."""
    repo, env = dvc_repo
    dvc = [sys.executable, "-m", "dvc"]
    _sh(dvc + ["repro"], repo, env)
    assert (repo / "eval/metrics.json").exists() and (repo / "eval/registration.json").exists()
    assert "Running stage" not in _sh(dvc + ["repro"], repo, env)
    metrics = _sh(dvc + ["metrics", "show"], repo, env)
    assert "success_rate" in metrics
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo, env)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "run"], repo, env)
    exp = _sh(dvc + ["exp", "run", "-S", "finetune.algo=dreamerv2"], repo, env)
    assert "Running stage 'finetune'" in exp and "Running stage 'pretrain'" not in exp
