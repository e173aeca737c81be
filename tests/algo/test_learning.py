"""Learning regression (slow, about 10 minutes on 2 cores): with a small budget on drawer-open, the model-based
agent does not collapse onto one action and earns more than a random policy on the same evaluation episodes."""

from pathlib import Path

import numpy as np
import pytest

TASK = "drawer-open"
EPISODE_LENGTH = 100
# The cpu preset's networks, less data and fewer updates: the smallest budget at which the agent should act.
OVERRIDES = [
    f"collect.task={TASK}",
    "collect.episodes=16",
    f"collect.episode_length={EPISODE_LENGTH}",
    "collect.workers=1",
    "source_videos.workers=1",
    "ingest.workers=1",
    "pretrain.phase1_steps=100",
    "pretrain.phase2_steps=50",
    "pretrain.checkpoint_every=1000",
    "finetune.world_model_steps=400",
    "finetune.policy_steps=600",
    "finetune.critic_warmup=50",
    "finetune.checkpoint_every=1000",
    "evaluate.episodes=4",
    "evaluate.workers=1",
    "evaluate.videos=0",
]


def random_policy_return(episodes: int, seed: int) -> float:
    """Mean return of uniform random actions on the evaluation's own episodes (seed + i, variation i)."""
    from veorl.envs import make_env

    env = make_env(env="metaworld", task=TASK, camera="corner", size=64, episode_length=EPISODE_LENGTH, seed=0)
    rng = np.random.default_rng(seed)
    returns = []
    try:
        for i in range(episodes):
            env.reset(seed=seed + i, variation=i)
            total, done = 0.0, False
            while not done:
                _, reward, done, _ = env.step(rng.uniform(-1.0, 1.0, env.action_dim))
                total += reward
            returns.append(total)
    finally:
        env.close()
    return float(np.mean(returns))


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo",
    [
        "dreamerv2",
        pytest.param(
            "veorl",
            marks=pytest.mark.xfail(
                reason="known (docs/results.md): at laptop budgets the video-guided Trunk Net over-predicts reward "
                "along the agent's own rollouts and the actor exploits it",
                strict=False,
            ),
        ),
    ],
)
def test_model_based_agent_is_not_collapsed_and_beats_a_random_policy(tmp_path: Path, mlflow_store, algo):
    from components import collect, evaluate, finetune, ingest, pretrain, source_videos
    from veorl.config import resolve
    from veorl.storage import read_json

    params = resolve({}, preset="cpu", overrides=[*OVERRIDES, f"finetune.algo={algo}"])
    data = tmp_path / "data"
    source_videos.run(str(data / "source_videos"), params, progress=False)
    ingest.run([str(data / "source_videos")], str(data / "video_clips"), params, progress=False)
    collect.run(str(data / "episodes"), params, progress=False)
    pretrain.run(
        str(data / "video_clips"),
        str(data / "episodes"),
        str(tmp_path / "world_model"),
        params,
        metrics=str(tmp_path / "pretrain.json"),
        curve=str(tmp_path / "pretrain.csv"),
        progress=False,
    )
    finetune.run(
        str(tmp_path / "world_model"),
        str(data / "episodes"),
        str(tmp_path / "agent"),
        params,
        clips=str(data / "video_clips"),
        metrics=str(tmp_path / "finetune.json"),
        curve=str(tmp_path / "finetune.csv"),
        progress=False,
    )
    metrics = evaluate.run(str(tmp_path / "agent"), str(tmp_path / "eval"), params, progress=False)

    diagnostics = read_json(tmp_path / "agent" / "diagnostics.json")["policy"]
    assert diagnostics["action_spread"] > 0.05, diagnostics
    assert diagnostics["share_at_bounds"] < 0.8, diagnostics
    random_return = random_policy_return(params.evaluate.episodes, params.evaluate.seed)
    assert metrics["mean_return"] > random_return, (metrics["mean_return"], random_return)
