"""The deployable agent: artifact round trip and acting from raw observations in a live Meta-World episode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.builders import smoke_params
from veorl.agent import Agent, AgentError, agent_layout, assemble_agent, build_agent_modules, save_agent

REPO = Path(__file__).resolve().parents[1]


def tiny_agent(root: Path, algo: str = "veorl", use_latent_action: bool = True, episode_length: int = 6) -> Path:
    """A freshly initialised agent at smoke sizes, saved as an artifact (what acting needs, untrained)."""
    model = smoke_params().model
    meta = {
        "algo": algo,
        "env": "metaworld",
        "task": "drawer-open",
        "camera": "corner",
        "image_size": 64,
        "action_dim": 4,
        "episode_length": episode_length,
        "action_kind": "continuous",
        "model": model.model_dump(mode="json"),
        "use_latent_action": use_latent_action and algo == "veorl",
        "bc": {"units": model.actor_units, "layers": model.actor_layers} if algo == "bc" else None,
    }
    torch.manual_seed(0)
    return save_agent(root, build_agent_modules(meta), meta)


@pytest.fixture(scope="module")
def live_env():
    from veorl.envs import make_env

    env = make_env("metaworld", "drawer-open", camera="corner", size=64, episode_length=6, seed=0)
    yield env
    env.close()


@pytest.mark.parametrize("algo", ["veorl", "dreamerv2", "bc"])
def test_agent_acts_from_raw_observations_in_a_live_metaworld_episode(tmp_path, live_env, algo):
    agent = Agent.load(str(tiny_agent(tmp_path, algo)))
    assert agent.action_dim == live_env.action_dim == 4
    obs = live_env.reset(seed=3)
    state = agent.initial_state(1)
    assert all(v.dtype == np.float32 for v in state.values())
    done, steps = False, 0
    while not done:
        action, state = agent.act(obs["image"][None], state)
        assert action.shape == (1, 4) and action.dtype == np.float32
        assert np.all(np.isfinite(action)) and np.abs(action).max() <= 1.0
        obs, reward, done, info = live_env.step(action[0])
        assert np.isfinite(reward) and isinstance(info["success"], bool)
        steps += 1
    assert steps == 6
    if algo == "bc":
        assert state == {}
    else:
        assert set(state) == {"deter", "stoch", "prev_action"}
        assert np.array_equal(state["prev_action"], action)  # the state carries the action just taken
        assert np.abs(state["deter"]).sum() > 0


def test_act_is_deterministic_and_batched(tmp_path):
    agent = Agent.load(str(tiny_agent(tmp_path)))
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    state = agent.initial_state(3)
    first, next_state = agent.act(frames, state)
    second, _ = agent.act(frames, state)
    assert np.array_equal(first, second)
    assert next_state["deter"].shape == (3, agent.modules["trunk_net"].deter_size)
    # A batch element's action depends on its own frame only.
    single, _ = agent.act(frames[1:2], agent.initial_state(1))
    assert np.allclose(single[0], first[1], atol=1e-5)
    # The filter's state matters: the same frame after a different history gives another action.
    later, _ = agent.act(frames, next_state)
    assert not np.allclose(later, first)


def test_act_rejects_bad_inputs(tmp_path):
    agent = Agent.load(str(tiny_agent(tmp_path)))
    with pytest.raises(ValueError, match=r"\(B, 64, 64, 3\)"):
        agent.act(np.zeros((1, 32, 32, 3), np.uint8), agent.initial_state(1))
    with pytest.raises(KeyError, match="deter"):
        agent.act(np.zeros((1, 64, 64, 3), np.uint8), {})


def test_load_refuses_incomplete_or_inconsistent_artifacts(tmp_path):
    with pytest.raises(AgentError, match="agent.json not found"):
        Agent.load(str(tmp_path))
    root = tiny_agent(tmp_path / "a")
    meta = json.loads((root / "agent.json").read_text())
    meta["use_latent_action"] = False  # weights hold fbc/codebook that this description does not
    (root / "agent.json").write_text(json.dumps(meta))
    with pytest.raises(AgentError, match="weights do not match"):
        Agent.load(str(root))


def test_save_agent_refuses_modules_that_do_not_match_the_description(tmp_path):
    root = tiny_agent(tmp_path / "a")
    meta = json.loads((root / "agent.json").read_text())
    modules = build_agent_modules(meta)
    del modules["fbc"]
    with pytest.raises(AgentError, match="fbc"):
        save_agent(tmp_path / "b", modules, meta)
    assert not (tmp_path / "b" / "agent.json").exists()


def test_the_layout_decides_what_an_agent_holds(tmp_path):
    meta = json.loads((tiny_agent(tmp_path / "v") / "agent.json").read_text())
    assert agent_layout(meta) == ("encoder", "trunk_net", "fbc", "codebook", "actor")
    assert agent_layout({**meta, "use_latent_action": False}) == ("encoder", "trunk_net", "actor")
    assert agent_layout({**meta, "algo": "bc"}) == ("policy",)
    assert tuple(build_agent_modules(meta)) == agent_layout(meta)


def test_assemble_agent_takes_the_layout_from_trained_modules(tmp_path):
    meta = json.loads((tiny_agent(tmp_path / "v", use_latent_action=False) / "agent.json").read_text())
    with_latent = dict(build_agent_modules({**meta, "use_latent_action": True}).items())
    fresh = dict(build_agent_modules(meta).items())
    # fbc and codebook exist in training (for the intrinsic reward), but acting without the latent action skips them
    modules = assemble_agent(
        meta, {**fresh, "fbc": with_latent["fbc"], "codebook": with_latent["codebook"], "policy": None}
    )
    assert tuple(modules) == ("encoder", "trunk_net", "actor") and modules["actor"] is fresh["actor"]
    # the actor of a latent-action agent reads a wider input: shapes are checked, not only names
    with pytest.raises(AgentError, match="actor"):
        assemble_agent(meta, with_latent)
    with pytest.raises(AgentError, match="trunk_net"):
        assemble_agent(meta, {**fresh, "trunk_net": None})


def test_acting_imports_no_simulator_and_no_training_code(tmp_path):
    root = tiny_agent(tmp_path)
    code = (
        "import sys; from veorl.agent import Agent; import numpy as np; a = Agent.load(sys.argv[1]); "
        "a.act(np.zeros((1, 64, 64, 3), np.uint8), a.initial_state(1)); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('metaworld', 'mujoco', 'gymnasium', 'mlflow') "
        "or m.startswith(('veorl.algo', 'veorl.envs', 'veorl.data'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_sampling_agent_draws_reproducible_actions_around_its_mode(tmp_path):
    root = tiny_agent(tmp_path)
    mode_agent, sampler = Agent.load(str(root)), Agent.load(str(root), policy="sample")
    frames = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    mode, _ = mode_agent.act(frames, mode_agent.initial_state(4))
    sampler.reseed(7)
    first, first_state = sampler.act(frames, sampler.initial_state(4))
    sampler.reseed(7)
    again, _ = sampler.act(frames, sampler.initial_state(4))
    sampler.reseed(8)
    other, _ = sampler.act(frames, sampler.initial_state(4))
    assert np.array_equal(first, again) and not np.allclose(first, other)
    assert not np.allclose(first, mode) and np.abs(first).max() < 1.0
    assert np.array_equal(first_state["prev_action"], first)  # the filter is told the action actually taken
    with pytest.raises(AgentError, match="policy must be one of"):
        Agent.load(str(root), policy="greedy")


def test_bc_samples_only_what_its_loss_fitted(tmp_path):
    mse = tiny_agent(tmp_path / "mse", "bc")  # an artifact without a recorded loss counts as mse
    with pytest.raises(AgentError, match="bc_loss=mse"):
        Agent.load(str(mse), policy="sample")
    meta = json.loads((mse / "agent.json").read_text())
    frames = np.random.default_rng(2).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
    for loss in ("categorical", "gaussian"):
        root = tmp_path / loss
        root.mkdir()
        (root / "agent.pt").write_bytes((mse / "agent.pt").read_bytes())
        (root / "agent.json").write_text(json.dumps({**meta, "bc": {**meta["bc"], "loss": loss}}))
        agent = Agent.load(str(root), policy="sample")
        actions, state = agent.act(frames, {})
        assert state == {} and actions.shape == (64, 4) and np.abs(actions).max() <= 1.0
        if loss == "categorical":  # one-hot draws from the classifier's logits (the head's raw means)
            assert np.array_equal(actions.sum(-1), np.ones(64)) and set(np.unique(actions)) == {0.0, 1.0}
            assert len({int(a.argmax()) for a in actions}) > 1  # an untrained classifier is near uniform
        else:
            mean, _ = Agent.load(str(root)).act(frames, {})
            assert not np.allclose(actions, mean)
