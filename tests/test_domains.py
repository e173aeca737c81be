"""The `domain` switch: manipulation resolves exactly as before it existed, driving switches every stage, explicit
keys still win, the game resolves crafter with a categorical model, and unknown domains fail with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veorl.config import DOMAIN_ENVS, ConfigError, load_params, resolve
from veorl.trees import flatten

REPO = Path(__file__).resolve().parents[1]
# Every preset (and params.yaml) resolved by the code before the domain switch existed (commit 16d40f2).
GOLDEN = json.loads((REPO / "tests/golden/params_manipulation.json").read_text())
# Keys added with the switch; their manipulation values are the behaviour the old code had without them.
NEW_KEYS = {"domain": "manipulation", "source_videos.env": "metaworld"}
# Keys added since by other changes (mixed precision, compiled updates, k-step BAN), at their defaults.
NEW_KEYS |= {f"{stage}.precision": "auto" for stage in ("pretrain", "finetune", "evaluate")}
NEW_KEYS |= {f"{stage}.compile": False for stage in ("pretrain", "finetune")}
NEW_KEYS |= {f"{stage}.retain_memory": True for stage in ("pretrain", "finetune")}  # how freed memory is kept
NEW_KEYS |= {"model.ban_horizon": 1}  # the k-step BAN option; 1 is the release's BAN
NEW_KEYS |= {"finetune.discount_head": False}  # the game's discount head (issue 9), off elsewhere
NEW_KEYS |= {"evaluate.policy": "mode"}  # sampled evaluation (issue 9); the mode is the deterministic policy
NEW_KEYS |= {"finetune.actor_bc_loss": "mse"}  # the behaviour term's form (issue 12): mse on continuous actions
NEW_KEYS |= {"collect.starts": "seed"}  # where collected episodes start; the seed draws a variation, as before
NEW_KEYS |= {"finetune.embedding_cache_gb": 2.0}  # phase 3's table of embeddings (issue 10): the same maths


@pytest.mark.parametrize("preset", ["smoke", "cpu", "laptop", "paper", "params.yaml"])
def test_manipulation_resolves_every_preset_exactly_as_before(preset):
    if preset == "params.yaml":
        params = load_params(REPO / "params.yaml")
    else:
        params = resolve({"domain": "manipulation"}, preset=preset)
    now = flatten(params.model_dump(by_alias=True, mode="json"))
    before = flatten(GOLDEN[preset])
    assert {k: now[k] for k in before} == before
    assert {k: now[k] for k in set(now) - set(before)} == NEW_KEYS
    if preset != "params.yaml":  # no domain key at all: manipulation
        assert resolve({}, preset=preset) == params


def test_driving_switches_every_stage():
    params = resolve({"domain": "driving"}, preset="cpu")
    assert (params.collect.env, params.collect.task, params.collect.camera) == ("highway", "highway", "topdown")
    assert params.source_videos.env == "highway" and "highway" not in params.source_videos.tasks
    assert params.model.rssm_kind == "gaussian" and params.register.metric == "mean_return"
    assert params.finetune.actor_bc_loss == "mse"  # continuous actions: the squared distance, as in manipulation
    # the preset's sizes still apply, the Meta-World calibration of the preset does not
    assert params.collect.episodes == 12 and params.collect.medium_random_prob == 0.02
    smoke = resolve({"domain": "driving"}, preset="smoke")
    assert smoke.source_videos.tasks == ["merge"] and smoke.model.deter == 64


def test_explicit_keys_win_over_the_domain_and_the_order_is_documented():
    params = resolve({"domain": "driving", "collect": {"medium_random_prob": 0.1}}, overrides=["collect.camera=wide"])
    assert params.collect.medium_random_prob == 0.1 and params.collect.camera == "wide"
    # --set domain=driving over a params.yaml that says manipulation
    assert load_params(REPO / "params.yaml", overrides=["domain=driving"]).collect.env == "highway"


def test_null_for_a_domain_chosen_key_means_the_domains_value():
    driving = load_params(REPO / "params.yaml", overrides=["domain=driving"])
    assert driving.collect.task == "highway" and driving.register.metric == "mean_return"
    assert load_params(REPO / "params.yaml").collect.task == "drawer-open"
    assert resolve({"domain": "driving"}, overrides=["source_videos.cameras=null"]).source_videos.cameras == [
        "wide",
        "night",
    ]
    with pytest.raises(ConfigError, match="collect.episodes"):  # not a domain-chosen key: null stays invalid
        resolve({}, overrides=["collect.episodes=null"])


def test_a_source_task_equal_to_the_target_is_refused_in_driving_too():
    with pytest.raises(ConfigError, match="must not contain the target task"):
        resolve({"domain": "driving"}, overrides=["collect.task=merge"])


def test_game_switches_every_stage_to_crafter_with_a_categorical_model():
    params = resolve({"domain": "game"}, preset="cpu")
    assert (params.collect.env, params.collect.task, params.collect.camera) == ("crafter", "collect-wood", "native")
    assert params.source_videos.env == "crafter" and "collect-wood" not in params.source_videos.tasks
    assert (params.model.rssm_kind, params.model.stoch, params.model.stoch_classes) == ("categorical", 32, 32)
    assert params.finetune.discount_head and params.register.metric == "success_rate"
    assert params.finetune.bc_loss == "categorical"  # bc is a classifier over the 17 actions
    assert params.finetune.actor_bc_loss == "nll"  # the actor's behaviour term on one-hot actions: cross-entropy
    # the game's calibration, not Meta-World's: 100-step episodes, one-hot actions without Gaussian noise
    assert params.collect.episode_length == 100 and params.collect.medium_random_prob == 0.92
    assert params.collect.medium_noise == 0.0 and params.collect.expert_noise == 0.0
    paper = resolve({"domain": "game"}, preset="paper")
    sizes = (paper.model.stoch, paper.model.stoch_classes, paper.model.deter, paper.model.cnn_depth)
    assert sizes == (32, 32, 4096, 96)
    smoke = resolve({"domain": "game"}, preset="smoke")
    assert smoke.source_videos.tasks == ["explore"] and smoke.model.deter == 64 and smoke.collect.episode_length == 40
    assert load_params(REPO / "params.yaml", overrides=["domain=game"]).collect.task == "collect-wood"


def test_explicit_keys_win_over_the_game_domain():
    params = resolve(
        {"domain": "game", "collect": {"task": "collect-drink"}},
        overrides=["model.stoch_classes=16", "finetune.discount_head=false"],
    )
    assert params.collect.task == "collect-drink" and params.model.stoch_classes == 16
    assert not params.finetune.discount_head and params.model.rssm_kind == "categorical"
    with pytest.raises(ConfigError, match="must not contain the target task"):
        resolve({"domain": "game"}, overrides=["collect.task=explore"])


def test_unknown_domains_fail():
    with pytest.raises(ConfigError, match="domain: must be one of"):
        resolve({"domain": "flying"})


def test_an_environment_of_another_domain_is_refused():
    with pytest.raises(ConfigError, match="collect.env='metaworld' does not belong to domain='driving'"):
        resolve({"domain": "driving", "collect": {"env": "metaworld"}})
    with pytest.raises(ConfigError, match="source_videos.env='highway' does not belong"):
        resolve({"source_videos": {"env": "highway"}})
    assert "carla" in DOMAIN_ENVS["driving"]
    with pytest.raises(ConfigError, match="collect.env='highway' does not belong to domain='game'"):
        resolve({"domain": "game", "collect": {"env": "highway"}})
    with pytest.raises(ConfigError, match="collect.env='crafter' does not belong to domain='manipulation'"):
        resolve({"collect": {"env": "crafter"}})
    assert resolve({"domain": "driving"}, overrides=["collect.env=carla", "collect.camera=firstperson"])
