"""Running a behaviour policy in an environment and recording the episode in the offline-dataset layout.

Layout (see veorl.data.episodes): index t holds the observation reached by action t; index 0 holds the
reset observation with a zero action, zero reward and no success. Meta-World only truncates, so every
discount is 1.0; a true terminal (info["terminal"]) would get discount 0 and is_terminal True.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from veorl.envs.base import Env

ActionFn = Callable[[np.ndarray], np.ndarray]


def rollout(env: Env, policy: ActionFn, seed: int, variation: int | None = None) -> dict[str, np.ndarray]:
    """One full episode from `env.reset(seed, variation)`; returns image, action, reward, discount, success,
    is_terminal, is_first."""
    obs = env.reset(seed=seed, variation=variation)
    images = [obs["image"]]
    actions = [np.zeros(env.action_dim, np.float32)]
    rewards = [0.0]
    successes = [False]
    terminals = [False]
    done = False
    while not done:
        action = np.clip(np.asarray(policy(obs["state"]), dtype=np.float32), -1.0, 1.0)
        obs, reward, done, info = env.step(action)
        images.append(obs["image"])
        actions.append(action)
        rewards.append(reward)
        successes.append(bool(info["success"]))
        terminals.append(bool(info.get("terminal", False)))
    is_terminal = np.array(terminals, bool)
    is_first = np.zeros(len(images), bool)
    is_first[0] = True
    return {
        "image": np.stack(images).astype(np.uint8, copy=False),
        "action": np.stack(actions).astype(np.float32),
        "reward": np.array(rewards, np.float32),
        "discount": (1.0 - is_terminal).astype(np.float32),
        "success": np.array(successes, bool),
        "is_terminal": is_terminal,
        "is_first": is_first,
    }
