"""Meta-World adapter and scripted behaviour policies (real simulator, 64x64, a few hundred steps in total)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from veorl.envs import BehaviourPolicy, EnvError, behaviour_policy, make_env, scripted_policy

# find_spec, not importorskip: importing metaworld here would load mujoco before MUJOCO_GL is chosen.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="metaworld not installed")

EPISODE_LENGTH = 120


@pytest.fixture(scope="module")
def env():
    environment = make_env("metaworld", "drawer-open", camera="corner", size=64, episode_length=EPISODE_LENGTH, seed=0)
    yield environment
    environment.close()


def test_reset_and_step_shapes_and_dtypes(env):
    obs = env.reset(seed=1)
    assert env.action_dim == 4
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].dtype == np.float32 and obs["state"].ndim == 1 and obs["state"].shape[0] == 39
    assert obs["image"].std() > 5, "frame is blank"
    obs, reward, done, info = env.step(np.zeros(4, np.float32))
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert isinstance(reward, float) and np.isfinite(reward)
    assert done is False
    assert isinstance(info["success"], bool) and info["terminal"] is False


def test_reset_is_deterministic_under_a_seed(env):
    actions = np.random.default_rng(0).uniform(-1, 1, size=(10, 4)).astype(np.float32)

    def play(seed):
        obs = env.reset(seed=seed)
        frames, states, rewards = [obs["image"]], [obs["state"]], []
        for a in actions:
            obs, r, _, _ = env.step(a)
            frames.append(obs["image"])
            states.append(obs["state"])
            rewards.append(r)
        return np.stack(frames), np.stack(states), np.array(rewards)

    first, second, other = play(7), play(7), play(8)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # Another seed places the drawer elsewhere (Meta-World's per-task goal randomisation).
    assert not np.allclose(first[1][0], other[1][0])


def test_episode_ends_at_its_length_and_refuses_further_steps():
    short = make_env("metaworld", "drawer-open", camera="corner", size=32, episode_length=5, seed=0)
    try:
        short.reset(seed=0)
        dones = [short.step(np.zeros(4))[2] for _ in range(5)]
        assert dones == [False, False, False, False, True]
        with pytest.raises(EnvError, match="reset"):
            short.step(np.zeros(4))
        assert short.reset(seed=1)["image"].shape == (32, 32, 3)
    finally:
        short.close()


def _red_pixel_row(image: np.ndarray) -> float:
    """Mean row of the robot's red pixels (the Sawyer arm is the only saturated red object in the scene)."""
    img = image.astype(np.int32)
    red = (img[..., 0] > 100) & (img[..., 1] < 70) & (img[..., 2] < 70)
    assert red.sum() > 50, "robot not visible"
    return float(np.nonzero(red)[0].mean())


def test_corner_camera_images_are_upright(env):
    obs = env.reset(seed=0)
    # The adapter flips the renderer's output for the corner camera...
    np.testing.assert_array_equal(env.render(), env.render_raw()[::-1])
    np.testing.assert_array_equal(obs["image"], env.render())
    # ...and the physics agrees that the result is upright: raising the hand moves the arm up in the image.
    for _ in range(20):
        obs, *_ = env.step(np.array([0, 0, -1, 0], np.float32))
    low_row, low_z = _red_pixel_row(obs["image"]), obs["state"][2]
    for _ in range(40):
        obs, *_ = env.step(np.array([0, 0, 1, 0], np.float32))
    high_row, high_z = _red_pixel_row(obs["image"]), obs["state"][2]
    assert high_z > low_z + 0.1
    assert high_row < low_row - 2, (low_row, high_row)


def test_bad_arguments_name_the_problem():
    with pytest.raises(EnvError, match="unknown Meta-World task 'drawer-opn'"):
        make_env("metaworld", "drawer-opn", camera="corner", size=64, episode_length=10, seed=0)
    with pytest.raises(EnvError, match="unknown camera 'nope'.*corner"):
        make_env("metaworld", "drawer-open", camera="nope", size=64, episode_length=10, seed=0)
    with pytest.raises(EnvError, match="episode_length"):
        make_env("metaworld", "drawer-open", camera="corner", size=64, episode_length=501, seed=0)
    with pytest.raises(EnvError, match="unknown environment family 'atari'"):
        make_env("atari", "pong", camera="corner", size=64, episode_length=10, seed=0)
    with pytest.raises(EnvError, match="no scripted Meta-World policy"):
        scripted_policy("metaworld", "drawer-opn")


def test_expert_solves_drawer_open_within_the_episode(env):
    policy = behaviour_policy(
        "metaworld",
        "drawer-open",
        "expert",
        env.action_dim,
        expert_noise=0.1,
        medium_noise=0.5,
        medium_random_prob=0.5,
        seed=0,
    )
    obs, done, success, ret = env.reset(seed=3), False, False, 0.0
    while not done:
        obs, reward, done, info = env.step(policy(obs["state"]))
        success |= info["success"]
        ret += reward
    assert success, "the scripted expert should open the drawer within 120 steps"
    assert ret > 300


def test_behaviour_policy_mixing_noise_and_seeding():
    expert_action = np.array([0.2, -0.3, 0.4, -1.0], np.float32)

    def expert(_state):
        return expert_action

    state = np.zeros(39, np.float32)
    clean = BehaviourPolicy(expert, 4, noise=0.0, random_prob=0.0, seed=0)
    np.testing.assert_array_equal(clean(state), expert_action)

    noisy = [BehaviourPolicy(expert, 4, noise=0.3, random_prob=0.0, seed=s) for s in (1, 1, 2)]
    a, b, c = (np.stack([p(state) for _ in range(200)]) for p in noisy)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a).max() <= 1.0
    assert 0.2 < (a[:, :3] - expert_action[:3]).std() < 0.4

    random_only = np.stack(
        [BehaviourPolicy(expert, 4, random_prob=1.0, seed=3)(state) for _ in range(1)]
        + [BehaviourPolicy(expert, 4, random_prob=1.0, seed=s)(state) for s in range(300)]
    )
    assert np.abs(random_only).max() <= 1.0
    assert abs(random_only.mean()) < 0.1 and random_only.std() > 0.5  # uniform on [-1, 1], not the expert

    half = BehaviourPolicy(expert, 4, random_prob=0.5, seed=4)
    replaced = np.mean([not np.array_equal(half(state), expert_action) for _ in range(400)])
    assert 0.4 < replaced < 0.6


def test_importing_veorl_envs_does_not_import_a_simulator():
    code = (
        "import sys, veorl.envs, veorl.envs.collection, veorl.envs.source_video, veorl.envs.rollout; "
        "bad = [m for m in ('mujoco', 'metaworld', 'gymnasium') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
