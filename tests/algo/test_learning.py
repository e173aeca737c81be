"""Learning regression (slow): with a small budget on a simple task (handle-press: the behaviour data succeeds in nearly
every episode), the model-based agent does not collapse onto one action and earns more than a random policy on the
same evaluation episodes. When last run (2-core AMD EPYC, fp32, 7.3 min, behaviour term mse): VeoRL 285 against
random 54. On drawer-open, the harder task of docs/results.md, this budget is too small for that (VeoRL acted but did
not beat random there); the laptop preset is the test of it."""

import numpy as np
import pytest

from tests.builders import pretrain_and_finetune

TASK = "handle-press"
EPISODE_LENGTH = 100
# The cpu preset's networks, less data and fewer updates: the smallest budget at which the agent should act.
OVERRIDES = [
    f"collect.task={TASK}",
    "source_videos.tasks=[door-open, button-press-topdown]",  # the cpu preset's third source task is handle-press
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
    # fp32 everywhere: the same numbers on every x86-64 CPU (auto would train in bf16 on CPUs with AVX512-BF16 or AMX)
    "pretrain.precision=fp32",
    "finetune.precision=fp32",
    "evaluate.precision=fp32",
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Collect, pretrain, fine-tune (VeoRL with its defaults) and evaluate, once."""
    import os

    from components import collect, evaluate, ingest, source_videos
    from veorl.config import resolve
    from veorl.storage import read_json

    root = tmp_path_factory.mktemp("learning")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns.db'}"
    params = resolve({}, preset="cpu", overrides=[*OVERRIDES, "finetune.algo=veorl"])
    data = root / "data"
    source_videos.run(str(data / "source_videos"), params, progress=False)
    ingest.run([str(data / "source_videos")], str(data / "video_clips"), params, progress=False)
    collect.run(str(data / "episodes"), params, progress=False)
    pretrain_and_finetune(data, root / "world_model", root / "agent", root, params)
    metrics = evaluate.run(str(root / "agent"), str(root / "eval"), params, progress=False)
    yield {
        "params": params,
        "metrics": metrics,
        "diagnostics": read_json(root / "agent" / "diagnostics.json")["policy"],
    }
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.mark.slow
def test_model_based_agent_does_not_collapse_onto_one_action(trained):
    diagnostics = trained["diagnostics"]
    assert diagnostics["action_spread"] > 0.05, diagnostics
    assert diagnostics["share_at_bounds"] < 0.8, diagnostics


@pytest.mark.slow
def test_model_based_agent_beats_a_random_policy(trained):
    params = trained["params"]
    random_return = random_policy_return(params.evaluate.episodes, params.evaluate.seed)
    print(f"agent mean return {trained['metrics']['mean_return']:.1f}, random policy {random_return:.1f}")
    assert trained["metrics"]["mean_return"] > random_return, (trained["metrics"]["mean_return"], random_return)
