"""The game domain on crafter: frames, one-hot actions, success and terminals per task, determinism by seed, the
scripted harvesting player and its quality knob, view styles, source videos of other players and collection."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("crafter")

from veorl.envs import ACTION_DIMS, ACTION_KINDS, EnvError, make_env  # noqa: E402
from veorl.envs.game import ACTIONS, NUM_ACTIONS, STYLES, TASKS, CrafterEnv, one_hot  # noqa: E402
from veorl.envs.policies import BehaviourPolicy, behaviour_policy, scripted_policy  # noqa: E402

NOOP, DO = one_hot(0), one_hot(ACTIONS.index("do"))


@pytest.fixture(scope="module")
def env():
    env = make_env("crafter", "collect-wood", camera="native", size=64, episode_length=60, seed=0)
    yield env
    env.close()


def _play(env: CrafterEnv, policy, seed: int) -> tuple[list[dict], list[float]]:
    obs = env.reset(seed=seed)
    infos, rewards, done = [], [], False
    while not done:
        obs, reward, done, info = env.step(policy(obs["state"]))
        infos.append(info)
        rewards.append(reward)
    return infos, rewards


def test_frames_are_64x64_rgb_and_actions_are_17_one_hot(env):
    obs = env.reset(seed=0)
    image = obs["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 10
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (env.state_dim,)
    assert env.action_dim == NUM_ACTIONS == ACTION_DIMS["crafter"] == 17
    assert env.action_kind == ACTION_KINDS["crafter"] == "discrete"
    assert CrafterEnv.action_index(one_hot(5)) == 5 and ACTIONS[5] == "do"
    obs, reward, done, info = env.step(one_hot(ACTIONS.index("move_left")))
    assert info["action_name"] == "move_left" and reward == 0.0 and not done
    assert set(info["tasks"]) == set(TASKS) and len(TASKS) == 22


def test_resets_are_deterministic_per_seed_and_variation(env):
    first = env.reset(seed=7)["image"]
    steps = [env.step(one_hot(i % NUM_ACTIONS))[0]["image"] for i in range(12)]
    assert np.array_equal(env.reset(seed=1)["image"], env.reset(seed=1)["image"])
    assert np.array_equal(env.reset(seed=7)["image"], first)
    assert all(np.array_equal(env.step(one_hot(i % NUM_ACTIONS))[0]["image"], s) for i, s in enumerate(steps))
    assert not np.array_equal(env.reset(seed=7, variation=0)["image"], env.reset(seed=7, variation=1)["image"])


def test_filming_other_views_does_not_change_the_episode():
    """Two runs of one world agree step for step past nightfall (crafter alone does not: its despawning iterates a
    set), and extra renders (whose night noise draws from the world generator) leave the episode alone."""
    env = make_env("crafter", "explore", camera="native", size=64, episode_length=400, seed=0)

    def frames(film: bool) -> list[np.ndarray]:
        obs, out, done = env.reset(seed=0), [], False
        explorer = scripted_policy("crafter", "explore", env=env)
        while not done and len(out) < 260:  # into the night (crafter adds noise from step ~150)
            if film:
                env.render("far"), env.render("dusk")
            obs, _, done, _ = env.step(explorer(obs["state"]))
            out.append(obs["image"])
        assert len(out) > 200  # into the night: crafter's despawning and night noise have had their say
        return out

    assert all(np.array_equal(a, b) for a, b in zip(frames(False), frames(True)))


def test_success_is_the_achievement_a_rewarded_terminal(env):
    expert = scripted_policy("crafter", "collect-wood", env=env)
    infos, rewards = _play(env, expert, seed=0)
    last = infos[-1]
    assert last["success"] and last["terminal"] and last["tasks"]["collect-wood"]
    assert rewards[-1] == 1.0 and sum(rewards) == 1.0
    assert not any(info["success"] for info in infos[:-1])


def test_time_limit_truncates_without_a_terminal():
    env = make_env("crafter", "collect-diamond", camera="native", size=64, episode_length=5, seed=0)
    env.reset(seed=0)
    for _ in range(5):
        _, reward, done, info = env.step(NOOP)
    assert done and not info["terminal"] and not info["success"] and reward == 0.0
    with pytest.raises(EnvError, match="finished episode"):
        env.step(NOOP)


@pytest.mark.parametrize("task", ["collect-wood", "collect-drink", "collect-sapling"])
def test_expert_player_harvests_within_a_few_dozen_steps(task):
    env = make_env("crafter", task, camera="native", size=64, episode_length=60, seed=0)
    for seed in range(3):
        infos, _ = _play(env, scripted_policy("crafter", task, env=env), seed=seed)
        assert infos[-1]["success"], f"{task}: the expert failed in world {seed} within 60 steps"
        assert len(infos) <= 40, f"{task}: the expert needed {len(infos)} steps in world {seed}"


def test_medium_quality_mixes_in_seeded_random_one_hot_actions(env):
    def actions(seed: int) -> list[int]:
        env.reset(seed=3)
        policy = behaviour_policy(
            "crafter",
            "collect-wood",
            "medium",
            NUM_ACTIONS,
            expert_noise=0.0,
            medium_noise=0.0,
            medium_random_prob=0.9,
            seed=seed,
            env=env,
        )
        out = []
        for _ in range(40):
            action = policy(np.zeros(env.state_dim, np.float32))
            assert action.shape == (NUM_ACTIONS,) and action.sum() == 1.0 and set(np.unique(action)) <= {0.0, 1.0}
            out.append(int(action.argmax()))
        return out

    assert actions(1) == actions(1) and actions(1) != actions(2)
    assert len(set(actions(1))) > 5  # mostly random: many different actions
    with pytest.raises(ValueError, match="no Gaussian noise"):
        BehaviourPolicy(lambda s: NOOP, NUM_ACTIONS, noise=0.1, discrete=True)


def test_source_players_never_chop_trees_and_never_succeed():
    for task in ("explore", "forage"):
        env = make_env("crafter", task, camera="native", size=64, episode_length=80, seed=0)
        infos, rewards = _play(env, scripted_policy("crafter", task, env=env), seed=5)
        assert not any(info["success"] for info in infos) and sum(rewards) == 0.0
        assert not infos[-1]["tasks"]["collect-wood"]
        assert len(infos) == 80 or infos[-1]["dead"]
        if task == "explore":
            assert "do" not in {info["action_name"] for info in infos}


def test_view_styles_differ_from_the_target_view(env):
    env.reset(seed=2)
    native = env.render("native")
    assert set(STYLES) >= {"native", "far", "dusk", "sepia"}
    for name in ("far", "dusk", "sepia"):
        frame = env.render(name)
        assert frame.shape == native.shape and frame.dtype == np.uint8
        assert np.abs(frame.astype(int) - native.astype(int)).mean() > 20, name
    with pytest.raises(EnvError, match="unknown game view"):
        env.render("fisheye")


def test_bad_tasks_views_and_actions_fail_clearly(env):
    with pytest.raises(EnvError, match="unknown game task"):
        make_env("crafter", "collect-gold", camera="native", size=64, episode_length=10, seed=0)
    with pytest.raises(EnvError, match="unknown game view"):
        make_env("crafter", "collect-wood", camera="fisheye", size=64, episode_length=10, seed=0)
    env.reset(seed=0)
    with pytest.raises(EnvError, match="vector over the 17"):
        env.step(np.zeros(4, np.float32))
    with pytest.raises(EnvError, match="NaN"):
        env.step(np.full(NUM_ACTIONS, np.nan, np.float32))


def test_source_videos_film_other_players_and_collection_is_discrete(tmp_path, params):
    from components import collect, source_videos
    from veorl.data.episodes import episode_files, load_episode
    from veorl.video.decode import open_video, square_frames

    smoke = params("domain=game", "source_videos.cameras=[far, dusk]", "collect.episodes=3")
    card = source_videos.run(str(tmp_path / "videos"), smoke, progress=False)
    assert card["env"] == "crafter" and "collect-wood" not in card["tasks"] and card["episode_success_rate"] == 0.0
    assert {f["camera"] for f in card["files"]} == {"far", "dusk"}
    far, dusk = (
        np.stack(list(square_frames(open_video(tmp_path / "videos" / f["file"]), 64)))
        for f in sorted(card["files"], key=lambda f: f["camera"])
    )
    assert np.abs(far.astype(int) - dusk.astype(int)).mean() > 20  # two styles, not one
    data = collect.run(str(tmp_path / "episodes"), smoke, progress=False)
    assert data["env"] == "crafter" and data["action_kind"] == "discrete" and data["episodes"] == 3
    for path in episode_files(tmp_path / "episodes"):
        ep = load_episode(path)
        assert ep["action"].shape[1] == NUM_ACTIONS and np.all(ep["action"][1:].sum(-1) == 1.0)
        ended = bool(ep["success"][-1])
        assert ep["discount"][-1] == (0.0 if ended else 1.0) and ep["reward"].sum() == float(ended)
