"""The DVC pipeline: stages run from dvc.yaml, a second `dvc repro` does nothing, params changes re-run only what
reads them, and experiments compare with the committed baseline (`dvc exp show`, `dvc metrics diff`, `dvc plots diff`).

Runs in a throw-away git+DVC copy of the repository on the `smoke` preset. The copy starts without dvc.lock and
without the committed metrics: its baseline is its own `dvc repro`, committed as the lead would commit a real run.
"""

import json
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
        # Not the committed results of the real pipeline (dvc.lock, metrics/, eval/): the copy makes its own.
        skipped = rel == "dvc.lock" or rel.startswith(("tests/", "benchmarks/", "docs/", "metrics/", "eval/"))
        if src.is_file() and not skipped:
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


# What dvc.yaml declares `cache: false` (metrics and plots): committed to git beside dvc.lock.
COMMITTED_OUTPUTS = [
    "dvc.lock",
    "eval/episodes.csv",
    "eval/metrics.json",
    "eval/registration.json",
    "metrics/finetune.json",
    "metrics/finetune_curve.csv",
    "metrics/pretrain.json",
    "metrics/pretrain_curve.csv",
]


def _json(cmd, cwd, env):
    """A command's stdout (not its warnings on stderr) as JSON."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout)


def _git(repo, env, *args):
    return _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], repo, env)


def test_full_pipeline_then_an_experiment_compares_with_the_committed_baseline(dvc_repo):
    """The whole chain on smoke, committed as the baseline; `dvc exp run -S finetune.algo=bc` re-runs from finetune
    on, and `dvc exp show`, `dvc metrics diff` and `dvc plots diff` read both revisions' metrics back."""
    repo, env = dvc_repo
    dvc = [sys.executable, "-m", "dvc"]
    _sh(dvc + ["repro"], repo, env)
    assert (repo / "eval/metrics.json").exists() and (repo / "eval/registration.json").exists()
    assert "Running stage" not in _sh(dvc + ["repro"], repo, env)
    assert "success_rate" in _sh(dvc + ["metrics", "show"], repo, env)

    # The baseline commit holds dvc.lock and the metrics, and nothing else the run wrote (.gitignore and DVC agree).
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-qm", "baseline run")
    tracked = set(_git(repo, env, "ls-files").split())
    written = set(_git(repo, env, "show", "--name-only", "--format=", "HEAD").split())
    assert written == set(COMMITTED_OUTPUTS), written ^ set(COMMITTED_OUTPUTS)
    assert not [f for f in tracked if f.startswith(("data/", "models/", "checkpoints/", "eval/rollouts/", "mlruns"))]
    assert _git(repo, env, "status", "--porcelain", "--untracked-files=all") == ""
    for rel in COMMITTED_OUTPUTS:  # no path of this machine in what is committed
        assert str(repo.parent) not in (repo / rel).read_text(), rel
    baseline = json.loads((repo / "eval/metrics.json").read_text())

    exp = _sh(dvc + ["exp", "run", "-S", "finetune.algo=bc"], repo, env)
    assert "Running stage 'finetune'" in exp and "Running stage 'pretrain'" not in exp
    result = json.loads((repo / "eval/metrics.json").read_text())  # the experiment, applied to the workspace
    assert result["algo"] == "bc" and baseline["algo"] == "veorl"

    # dvc exp show: the experiment's evaluation metrics, read from its commit, with no error.
    shown = _json(dvc + ["exp", "show", "--json"], repo, env)
    (head,) = [row for row in shown if row.get("rev") != "workspace"]
    (experiment,) = [rev for e in head["experiments"] for rev in e["revs"]]
    assert experiment.get("error") is None and head["data"]["rev"] == _git(repo, env, "rev-parse", "HEAD").strip()
    for row, expected in ((experiment, result), (head, baseline)):
        metrics = row["data"]["metrics"]
        assert set(metrics) == {"eval/metrics.json", "metrics/finetune.json", "metrics/pretrain.json"}
        assert all("error" not in m for m in metrics.values()), metrics
        evaluation = metrics["eval/metrics.json"]["data"]
        for key in ("success_rate", "mean_return", "algo"):
            assert evaluation[key] == expected[key], (row["rev"], key)

    # dvc metrics diff / plots diff: the baseline commit against the experiment (by name) and the workspace.
    name = experiment["name"]
    diff = _json(dvc + ["metrics", "diff", "HEAD", name, "--all", "--json"], repo, env)
    evaluation = diff["eval/metrics.json"]
    for key in ("success_rate", "mean_return"):
        assert evaluation[key]["old"] == baseline[key] and evaluation[key]["new"] == result[key], key
    assert evaluation["algo"] == {"old": "veorl", "new": "bc"}
    assert "eval/metrics.json" in _json(dvc + ["metrics", "diff", "--json"], repo, env)
    plots = _json(dvc + ["plots", "diff", "HEAD", "--json", "--targets", "eval/episodes.csv"], repo, env)
    (plot,) = plots["data"]["eval/episodes.csv"]
    assert set(plot["revisions"]) == {"workspace", "HEAD"}
