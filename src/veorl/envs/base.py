"""The one small interface every environment adapter implements (no simulator imports here)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


class EnvError(ValueError):
    """Bad environment arguments (unknown task, camera, ...) or misuse (stepping a finished episode)."""


def episode_seed(seed: int | None, variation: int | None, stream: np.random.Generator) -> int:
    """The seed an episode starts from: `seed`, or the next draw of the env's own `stream` when None, with
    `variation` (evaluation's episode index) folded in for simulators whose start states come from the seed alone."""
    if seed is None:
        seed = int(stream.integers(2**31 - 1))
    if variation is not None:
        seed = int(np.random.SeedSequence([int(seed), int(variation)]).generate_state(1)[0] & 0x7FFFFFFF)
    return int(seed)


def continuous_action(action: np.ndarray, action_dim: int) -> np.ndarray:
    """A continuous action checked (size, finite values) and clipped to [-1, 1], as float64 for the simulator."""
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape != (action_dim,):
        raise EnvError(f"action must have {action_dim} values, got shape {action.shape}")
    if not np.all(np.isfinite(action)):
        raise EnvError(f"action contains NaN or inf: {action}")
    return np.clip(action, -1.0, 1.0)


@runtime_checkable
class Env(Protocol):
    """An image-based episodic environment with continuous actions in [-1, 1].

    Observations are dicts {"image": (size, size, 3) uint8, "state": float32 vector}. `step` returns
    (obs, reward, done, info): done is true at `episode_length` steps or at a true termination, and
    info carries at least "success" (bool) and "terminal" (bool: a true terminal, not a time limit).
    """

    action_dim: int
    episode_length: int

    def reset(self, seed: int | None = None, variation: int | None = None) -> dict[str, np.ndarray]: ...

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]: ...

    def close(self) -> None: ...
