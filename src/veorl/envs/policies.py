"""Scripted behaviour policies: Meta-World's hand-written experts, the driving expert (IDM/MOBIL, read from the
environment), and degraded versions of them.

Quality levels used for offline datasets (see components.collect):
- expert: the scripted expert plus small Gaussian action noise (sigma `expert_noise`).
- medium: the expert, but at each step with probability `random_prob` a uniformly random action is taken
  instead, and Gaussian noise (sigma `noise`) is added to the expert's actions. Noise alone is not enough:
  Meta-World's experts keep ~90-100% success even at sigma 1.0, because they are closed-loop controllers
  that correct every perturbation; random actions that replace the controller's output are what slows it.
  Driving is the opposite: steering noise alone sends the car off the road (sigma 0.5: ~90% collisions), so the
  driving domain uses small noise and rare random actions (calibration in veorl.config.DOMAINS).
- discrete actions (the game domain, crafter): actions are one-hot vectors; a random action is a uniformly drawn
  one-hot action, and Gaussian noise has no meaning there, so `noise` must be 0 (the game domain sets
  expert_noise and medium_noise to 0): random_prob alone degrades the scripted player.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np

from veorl.envs.base import EnvError

StatePolicy = Callable[[np.ndarray], np.ndarray]


def scripted_policy(env_name: str, task: str, env: object | None = None) -> StatePolicy:
    """The simulator's scripted expert for `task`: a callable mapping the state observation to an action in [-1, 1].

    Driving experts (highway, carla) and the game's scripted player (crafter) read the simulator rather than the
    state vector, so they need the `env` they act in: the callable returns `env.expert_action()`.
    """
    if env_name in ("highway", "carla", "crafter"):
        if env is None or not hasattr(env, "expert_action"):
            raise EnvError(f"the {env_name} expert reads the environment: pass the env it drives")

        def drive(state: np.ndarray) -> np.ndarray:
            return np.clip(np.asarray(env.expert_action(), dtype=np.float32), -1.0, 1.0)

        return drive
    if env_name != "metaworld":
        raise EnvError(
            f"no scripted policies for environment family {env_name!r} (known: metaworld, highway, carla, crafter)"
        )
    os.environ.setdefault("MUJOCO_GL", "egl")
    from metaworld.policies import ENV_POLICY_MAP

    from veorl.envs.meta_world import task_id

    name = task_id(task)
    if name not in ENV_POLICY_MAP:
        known = ", ".join(sorted(n[: -len("-v3")] for n in ENV_POLICY_MAP))
        raise EnvError(f"no scripted Meta-World policy for task {task!r}; known: {known}")
    expert = ENV_POLICY_MAP[name]()

    def act(state: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # The experts' proportional gains exceed 1 on purpose and warn on every step; we clip anyway.
            warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
            action = expert.get_action(np.asarray(state, dtype=np.float64))
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

    return act


def is_discrete(env: object | None) -> bool:
    """Whether `env` takes one-hot discrete actions (its `action_kind`; continuous when it does not say)."""
    return getattr(env, "action_kind", "continuous") == "discrete"


class BehaviourPolicy:
    """A degraded expert: random-action mixing and Gaussian noise, driven by its own seeded generator.

    With `discrete`, actions are one-hot vectors: a random action is a uniformly drawn one-hot one, and there is no
    Gaussian noise (`noise` must be 0)."""

    def __init__(
        self,
        expert: StatePolicy,
        action_dim: int,
        noise: float = 0.0,
        random_prob: float = 0.0,
        seed: int | None = None,
        discrete: bool = False,
    ):
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if discrete and noise > 0:
            raise ValueError(f"discrete (one-hot) actions take no Gaussian noise: set the noise to 0, got {noise}")
        if not 0.0 <= random_prob <= 1.0:
            raise ValueError(f"random_prob must lie in [0, 1], got {random_prob}")
        self.expert = expert
        self.action_dim = int(action_dim)
        self.noise = float(noise)
        self.random_prob = float(random_prob)
        self.discrete = bool(discrete)
        self.rng = np.random.default_rng(seed)

    def __call__(self, state: np.ndarray) -> np.ndarray:
        # Query the expert every step, even when its action is discarded, so its internal phase logic and the
        # random stream advance the same way whatever the mixing draws.
        action = np.asarray(self.expert(state), dtype=np.float32)
        if self.random_prob > 0 and self.rng.random() < self.random_prob:
            if self.discrete:
                return np.eye(self.action_dim, dtype=np.float32)[self.rng.integers(self.action_dim)]
            action = self.rng.uniform(-1.0, 1.0, size=self.action_dim).astype(np.float32)
        elif self.noise > 0:
            action = action + self.rng.normal(0.0, self.noise, size=self.action_dim).astype(np.float32)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def behaviour_policy(
    env_name: str,
    task: str,
    level: str,
    action_dim: int,
    *,
    expert_noise: float,
    medium_noise: float,
    medium_random_prob: float,
    seed: int,
    env: object | None = None,
) -> BehaviourPolicy:
    """The behaviour policy of one quality level ("expert" or "medium"; "mixed" is a per-episode choice of these)."""
    expert = scripted_policy(env_name, task, env=env)
    discrete = is_discrete(env)
    if level == "expert":
        return BehaviourPolicy(expert, action_dim, noise=expert_noise, random_prob=0.0, seed=seed, discrete=discrete)
    if level == "medium":
        return BehaviourPolicy(
            expert, action_dim, noise=medium_noise, random_prob=medium_random_prob, seed=seed, discrete=discrete
        )
    raise EnvError(f"unknown behaviour level {level!r} (expected 'expert' or 'medium')")
