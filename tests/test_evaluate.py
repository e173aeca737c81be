"""Evaluation: the CLI's outputs on a live simulator, and loud failures for broken policies."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from veorl.agent import Agent, build_agent_modules, save_agent
from veorl.config import resolve
from veorl.evaluation import EpisodeResult, EvaluationError, evaluate_agent, play_episode, summarise, upscale

REPO = Path(__file__).resolve().parents[1]
EPISODE_LENGTH = 5


def tiny_agent(root: Path, poison: bool = False) -> Path:
    """An untrained agent at smoke sizes; `poison` fills the actor's output layer with NaN."""
    model = resolve({}, preset="smoke").model
    meta = {"algo": "veorl", "env": "metaworld", "task": "drawer-open", "camera": "corner", "image_size": 64, "action_dim": 4,
            "episode_length": EPISODE_LENGTH, "action_kind": "continuous", "model": model.model_dump(mode="json"),
            "use_latent_action": True, "bc": None}
    torch.manual_seed(0)
    modules = build_agent_modules(meta)
    if poison:
        with torch.no_grad():
            modules["actor"].net[-1].weight.fill_(float("nan"))
    return save_agent(root, modules, meta)


@pytest.fixture
def tracking_env(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return {**os.environ, "MLFLOW_TRACKING_URI": uri}


def test_evaluate_cli_writes_metrics_episodes_videos_and_plot(tmp_path, tracking_env):
    agent = tiny_agent(tmp_path / "agent")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "components.evaluate", "--preset", "smoke", "--agent", str(agent), "--out", str(out),
           "--set", "evaluate.video_size=128", "--no-progress"]
    result = subprocess.run(cmd, cwd=REPO, env=tracking_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["algo"] == "veorl" and metrics["task"] == "drawer-open"
    assert metrics["protocol"] == {"env": "metaworld", "task": "drawer-open", "camera": "corner",
                                   "episode_length": EPISODE_LENGTH, "episodes": 2, "seed": 1000}
    with open(out / "episodes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["episode"]) for r in rows] == [0, 1] and all(int(r["length"]) == EPISODE_LENGTH for r in rows)
    returns = [float(r["return"]) for r in rows]
    assert metrics["episodes"] == 2 and metrics["mean_return"] == pytest.approx(np.mean(returns), rel=1e-5)
    assert metrics["std_return"] == pytest.approx(np.std(returns), rel=1e-4, abs=1e-6)
    assert metrics["success_rate"] == pytest.approx(np.mean([int(r["success"]) for r in rows]))
    assert metrics["mean_length"] == EPISODE_LENGTH
    import av

    videos = sorted((out / "rollouts").glob("*.mp4"))
    assert [v.name for v in videos] == ["episode_000.mp4"]
    with av.open(str(videos[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == EPISODE_LENGTH + 1 and frames[0].shape == (128, 128, 3)  # first obs + one per step, upscaled
    assert (out / "returns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = json.loads((out / "provenance.json").read_text())
    assert set(provenance["upstream"]) == {"agent"}


def test_nan_policy_fails_with_episode_and_step(tmp_path):
    agent = tiny_agent(tmp_path / "agent", poison=True)
    with pytest.raises(EvaluationError, match=r"episode 0 \(seed 7\), step 0: the policy produced a non-finite action"):
        evaluate_agent(agent, episodes=2, seed=7, workers=1, progress=False)


def test_failed_evaluation_exits_nonzero_and_leaves_no_score(tmp_path, tracking_env, capsys):
    from components.evaluate import main

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"status": "ok", "success_rate": 1.0}))  # stale, from an earlier run
    agent = tiny_agent(tmp_path / "agent", poison=True)
    assert main(["--preset", "smoke", "--agent", str(agent), "--out", str(out), "--no-progress"]) == 1
    assert "no score reported" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_a_crashing_policy_is_reported_with_its_step(tmp_path):
    from veorl.envs import make_env

    class CrashesAtStepTwo:
        action_dim = 4

        def __init__(self):
            self.calls = 0

        def initial_state(self, batch):
            return {}

        def act(self, image, state):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return np.zeros((1, 4), np.float32), state

    env = make_env("metaworld", "drawer-open", camera="corner", size=64, episode_length=EPISODE_LENGTH, seed=0)
    try:
        with pytest.raises(EvaluationError, match=r"episode 4 \(seed 9\), step 2: the policy crashed: RuntimeError: boom"):
            play_episode(CrashesAtStepTwo(), env, episode=4, seed=9, max_steps=EPISODE_LENGTH)
    finally:
        env.close()


def test_missing_agent_is_a_clear_error(tmp_path, tracking_env, capsys):
    from components.evaluate import main

    assert main(["--preset", "smoke", "--agent", str(tmp_path / "nothing"), "--out", str(tmp_path / "eval")]) == 2
    assert "agent.json not found" in capsys.readouterr().err


def test_summary_statistics_and_upscaling():
    results = [EpisodeResult(0, 0, 10.0, True, 5), EpisodeResult(1, 1, 20.0, False, 7)]
    assert summarise(results) == {"episodes": 2, "mean_return": 15.0, "std_return": 5.0, "success_rate": 0.5,
                                  "success_std": 0.5, "mean_length": 6.0}
    with pytest.raises(EvaluationError):
        summarise([])
    frame = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    big = upscale(frame, 4)
    assert big.shape == (4, 4, 3) and np.array_equal(big[:2, :2], np.broadcast_to(frame[0, 0], (2, 2, 3)))


@pytest.mark.slow
def test_parallel_workers_give_the_same_episodes_as_one_process(tmp_path):
    agent = tiny_agent(tmp_path / "agent")
    serial = evaluate_agent(agent, episodes=3, seed=11, workers=1, progress=False)
    parallel = evaluate_agent(agent, episodes=3, seed=11, workers=2, progress=False)
    assert [(r.episode, r.seed, r.length, r.success) for r in serial] == [(r.episode, r.seed, r.length, r.success) for r in parallel]
    assert [r.ret for r in serial] == pytest.approx([r.ret for r in parallel], rel=1e-5)
    assert Agent.load(str(agent)).meta["episode_length"] == EPISODE_LENGTH
