"""Environment adapters behind one small interface, and scripted behaviour policies.

    env = make_env("metaworld", "drawer-open", camera="corner", size=64, episode_length=500, seed=0)
    env = make_env("highway", "highway", camera="topdown", size=64, episode_length=200, seed=0)   # driving
    env = make_env("crafter", "collect-wood", camera="native", size=64, episode_length=200, seed=0)  # game
    obs = env.reset(seed=3)                       # {"image": (64, 64, 3) uint8, "state": float32 vector}
    obs, reward, done, info = env.step(action)    # action in [-1, 1]^env.action_dim (one-hot for crafter);
                                                  # info["success"]: bool
    env.close()

Simulators are imported lazily inside `make_env`/`scripted_policy`, so importing veorl.envs is cheap and
works without any simulator installed.
"""

from __future__ import annotations

from veorl.envs.base import Env, EnvError
from veorl.envs.policies import BehaviourPolicy, StatePolicy, behaviour_policy, scripted_policy

ENV_FAMILIES = ("metaworld", "highway", "carla", "crafter")
ACTION_DIMS = {"metaworld": 4, "highway": 2, "carla": 2, "crafter": 17}
"""Action size per environment family, known without importing the simulator (e.g. to validate imported data)."""
ACTION_KINDS = {"metaworld": "continuous", "highway": "continuous", "carla": "continuous", "crafter": "discrete"}
"""Action kind per environment family: the actor fine-tuning builds for data collected there (via the data card)."""


def make_env(env: str, task: str, camera: str, size: int, episode_length: int, seed: int) -> Env:
    """Build an environment of family `env` for `task`, observed from `camera` (a camera or a view style).

    metaworld: Meta-World v3; highway: highway-env driving (veorl.envs.driving); carla: a client of a running
    CARLA 0.9.x server (veorl.envs.carla_client; host and port from $CARLA_HOST / $CARLA_PORT); crafter: the game
    domain (veorl.envs.game; one-hot actions over crafter's 17).
    """
    if env == "metaworld":
        from veorl.envs.meta_world import MetaWorldEnv

        return MetaWorldEnv(task, camera=camera, size=size, episode_length=episode_length, seed=seed)
    if env == "highway":
        from veorl.envs.driving import HighwayEnv

        return HighwayEnv(task, camera=camera, size=size, episode_length=episode_length, seed=seed)
    if env == "carla":
        from veorl.envs.carla_client import CarlaEnv, CarlaSettings

        settings = CarlaSettings.from_environment(task=task, camera=camera, size=size, episode_length=episode_length)
        return CarlaEnv(settings, seed=seed)
    if env == "crafter":
        from veorl.envs.game import CrafterEnv

        return CrafterEnv(task, camera=camera, size=size, episode_length=episode_length, seed=seed)
    raise EnvError(f"unknown environment family {env!r} (known: {', '.join(ENV_FAMILIES)})")


_cached_env: tuple[tuple, Env] | None = None


def cached_env(env: str, task: str, camera: str, size: int, episode_length: int, seed: int) -> Env:
    """One simulator per worker process, rebuilt only when its settings change (building one takes seconds)."""
    global _cached_env
    key = (env, task, camera, size, episode_length, seed)
    if _cached_env is None or _cached_env[0] != key:
        close_cached_env()
        _cached_env = (key, make_env(*key))
    return _cached_env[1]


def close_cached_env() -> None:
    global _cached_env
    if _cached_env is not None:
        _cached_env[1].close()
    _cached_env = None


__all__ = [
    "Env",
    "EnvError",
    "make_env",
    "cached_env",
    "close_cached_env",
    "scripted_policy",
    "behaviour_policy",
    "BehaviourPolicy",
    "StatePolicy",
    "ENV_FAMILIES",
    "ACTION_DIMS",
    "ACTION_KINDS",
]
