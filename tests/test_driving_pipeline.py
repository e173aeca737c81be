"""The whole chain for domain=driving on the smoke preset, in process through the components' run() functions:
source_videos -> ingest -> collect -> pretrain -> finetune -> evaluate -> register (about 20 s on 2 shared cores)."""

from __future__ import annotations

import time

import pytest

from tests.builders import pretrain_and_finetune

pytest.importorskip("highway_env")


def test_smoke_pipeline_for_driving_registers_an_agent(tmp_path, mlflow_store, params):
    from components import collect, evaluate, ingest, register, source_videos
    from veorl.storage import read_json

    smoke = params("domain=driving")
    assert smoke.collect.env == "highway" and smoke.register.metric == "mean_return"
    started = time.monotonic()
    data, models = tmp_path / "data", tmp_path / "models"
    videos = source_videos.run(str(data / "source_videos"), smoke, progress=False)
    assert videos["env"] == "highway" and smoke.collect.task not in videos["tasks"]
    ingest.run([str(data / "source_videos")], str(data / "video_clips"), smoke, progress=False)
    card = collect.run(str(data / "episodes"), smoke, progress=False)
    assert card["env"] == "highway" and "collision_rate" in card
    pretrain_and_finetune(data, models / "world_model", models / "agent", tmp_path, smoke)
    agent = read_json(models / "agent" / "agent.json")
    assert (agent["env"], agent["task"], agent["action_dim"], agent["action_kind"]) == (
        "highway",
        "highway",
        2,
        "continuous",
    )
    metrics = evaluate.run(str(models / "agent"), str(tmp_path / "eval"), smoke, progress=False)
    assert metrics["protocol"]["env"] == "highway" and metrics["episodes"] == smoke.evaluate.episodes
    assert 0.0 <= metrics["collision_rate"] <= 1.0 and "collision" in (tmp_path / "eval/episodes.csv").read_text()
    outcome = register.run(
        str(models / "agent"), str(tmp_path / "eval"), str(tmp_path / "eval/registration.json"), smoke
    )
    assert outcome["version"] and outcome["metric"] == "mean_return"
    print(f"driving smoke pipeline: {time.monotonic() - started:.1f} s")
