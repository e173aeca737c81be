"""The whole chain for domain=game on the smoke preset, in process through the components' run() functions:
source_videos -> ingest -> collect -> pretrain -> finetune -> evaluate -> register. The agent must be discrete
(one-hot actions over crafter's 17) and the evaluation must report the success rate per task."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest

from tests.builders import pretrain_and_finetune

pytest.importorskip("crafter")


def test_smoke_pipeline_for_the_game_trains_a_discrete_agent(tmp_path, mlflow_store, params):
    from components import collect, evaluate, ingest, register, source_videos
    from veorl.agent import Agent
    from veorl.envs.game import NUM_ACTIONS, TASKS
    from veorl.storage import read_json

    smoke = params("domain=game")
    assert (smoke.collect.env, smoke.collect.task, smoke.model.rssm_kind) == ("crafter", "collect-wood", "categorical")
    assert smoke.finetune.discount_head
    started = time.monotonic()
    data, models = tmp_path / "data", tmp_path / "models"
    videos = source_videos.run(str(data / "source_videos"), smoke, progress=False)
    assert videos["env"] == "crafter" and smoke.collect.task not in videos["tasks"]
    ingest.run([str(data / "source_videos")], str(data / "video_clips"), smoke, progress=False)
    card = collect.run(str(data / "episodes"), smoke, progress=False)
    assert card["env"] == "crafter" and card["action_kind"] == "discrete"
    pretrain_and_finetune(data, models / "world_model", models / "agent", tmp_path, smoke)
    meta = read_json(models / "agent" / "agent.json")
    assert (meta["env"], meta["task"], meta["action_dim"], meta["action_kind"]) == (
        "crafter",
        "collect-wood",
        NUM_ACTIONS,
        "discrete",
    )
    assert "discount_nll" in (tmp_path / "finetune.csv").read_text().splitlines()[0]  # the discount head trained
    # the end-of-stage diagnostics speak of one-hot actions: each of the 17 held constant, usage by frequency
    figures = read_json(models / "agent" / "diagnostics.json")["policy"]
    assert sorted(figures["best_corner"]) == [0.0] * (NUM_ACTIONS - 1) + [1.0]
    assert 1 <= figures["distinct_actions"] <= NUM_ACTIONS and 0 < figures["top_action_share"] <= 1
    assert sum(figures["action_mean"]) == pytest.approx(1.0) and "share_at_bounds" not in figures

    # The finetuned agent is discrete: every action is one of crafter's 17, as a one-hot vector.
    agent = Agent.load(str(models / "agent"))
    state = agent.initial_state(3)
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    for _ in range(3):
        action, state = agent.act(frames, state)
        assert action.shape == (3, NUM_ACTIONS)
        assert set(np.unique(action)) <= {0.0, 1.0} and np.all(action.sum(-1) == 1.0)

    # a sampled evaluation draws its actions, and its protocol says so
    sampled = evaluate.run(
        str(models / "agent"),
        str(tmp_path / "eval-sampled"),
        params("domain=game", "evaluate.policy=sample"),
        progress=False,
    )
    assert sampled["protocol"]["policy"] == "sample" and sampled["episodes"] == smoke.evaluate.episodes
    metrics = evaluate.run(str(models / "agent"), str(tmp_path / "eval"), smoke, progress=False)
    assert "policy" not in metrics["protocol"]
    assert metrics["protocol"]["env"] == "crafter" and metrics["episodes"] == smoke.evaluate.episodes
    per_task = metrics["success_per_task"]
    assert set(per_task) == set(TASKS) and per_task["collect-wood"] == metrics["success_rate"]
    assert "mean_return" in metrics
    with open(tmp_path / "eval/episodes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == smoke.evaluate.episodes and "achievements" in rows[0]
    outcome = register.run(
        str(models / "agent"), str(tmp_path / "eval"), str(tmp_path / "eval/registration.json"), smoke
    )
    assert outcome["version"] and outcome["metric"] == "success_rate"
    print(f"game smoke pipeline: {time.monotonic() - started:.1f} s")
