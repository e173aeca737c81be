"""Meta-World (Farama `metaworld` 3.x, v3 tasks) behind the veorl Env interface, rendered fast and headless.

Facts this adapter relies on (measured with metaworld 3.1.1 + mujoco 3.3.0 on a CPU-only machine):
- Only v3 tasks exist; params name tasks without the suffix ("drawer-open" -> "drawer-open-v3").
- MuJoCo's default offscreen settings (4x MSAA, 4096^2 shadow map, 640x480 buffer) make a 64x64 frame cost
  ~80 ms on llvmpipe; with MSAA, shadows and reflections off and a buffer of the frame size it is ~7 ms.
- The fixed "corner" cameras are rolled 180 degrees in the task XML, so their frames come out upside down.
  We flip rows (`[::-1]`), which reproduces the frames mujoco-py produced for the authors' release
  (mujoco-py returned bottom-up buffers). Which cameras need it is read from the camera orientation.
- Goal/object positions: `Meta-World/MT1` builds 50 goal configurations from its construction seed (the
  benchmark's own randomisation); each `reset(seed)` picks one of them with that seed, so resets are
  deterministic and different seeds see different positions.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from typing import Any

import numpy as np

from veorl.envs.base import EnvError, continuous_action

MAX_EPISODE_LENGTH = 500
"""Meta-World's own `max_path_length`; longer episodes would step past the benchmark's definition."""


def _import_metaworld():
    # EGL must be chosen before mujoco is first imported; without it mujoco tries GLFW and needs a display.
    if "MUJOCO_GL" not in os.environ and "mujoco" in sys.modules:
        raise EnvError(
            "mujoco was imported before MUJOCO_GL was set, so it cannot render headless; set MUJOCO_GL=egl "
            "in the environment or import veorl.envs before anything that imports mujoco/metaworld"
        )
    os.environ.setdefault("MUJOCO_GL", "egl")
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers the Meta-World/* gymnasium ids)
    import mujoco

    return gym, metaworld, mujoco


def task_id(task: str) -> str:
    return task if task.endswith("-v3") else f"{task}-v3"


def available_tasks() -> list[str]:
    """Task names accepted by `make_env` (without the -v3 suffix)."""
    _, metaworld, _ = _import_metaworld()
    return sorted(name[: -len("-v3")] for name in metaworld.ALL_V3_ENVIRONMENTS)


class MetaWorldEnv:
    """One Meta-World v3 task, observed through one camera at `size` x `size` pixels."""

    def __init__(
        self, task: str, camera: str = "corner", size: int = 64, episode_length: int = MAX_EPISODE_LENGTH, seed: int = 0
    ):
        gym, metaworld, mujoco = _import_metaworld()
        self._mujoco = mujoco
        name = task_id(task)
        if name not in metaworld.ALL_V3_ENVIRONMENTS:
            known = ", ".join(available_tasks())
            raise EnvError(f"unknown Meta-World task {task!r}; known tasks: {known}")
        if not 2 <= episode_length <= MAX_EPISODE_LENGTH:
            raise EnvError(f"episode_length must lie in [2, {MAX_EPISODE_LENGTH}] for Meta-World, got {episode_length}")
        if size < 8:
            raise EnvError(f"size must be at least 8 pixels, got {size}")
        self.task = task
        self.size = int(size)
        self.episode_length = int(episode_length)
        self.seed = int(seed)

        self._gym_env = gym.make("Meta-World/MT1", env_name=name, seed=self.seed, disable_env_checker=True)
        self._env = self._gym_env.unwrapped
        self._goal_tasks = list(self._find_tasks(self._gym_env))
        # The env truncates itself at max_path_length; match it to ours so a shorter episode is a clean cut.
        self._env.max_path_length = self.episode_length
        self.action_dim = int(self._env.action_space.shape[0])
        self.state_dim = int(self._env.observation_space.shape[0])

        model = self._env.model
        self.cameras = [model.camera(i).name for i in range(model.ncam)]
        self._camera_ids: dict[str, int] = {}
        self._flip: dict[str, bool] = {}
        self._original_cam_pos = model.cam_pos.copy()
        self.camera = camera
        try:
            self._camera_id(camera)  # validate now, not at the first reset
        except EnvError:
            self._gym_env.close()
            raise
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = self.size
        model.vis.global_.offheight = self.size
        self._renderer = mujoco.Renderer(model, self.size, self.size)
        flags = mujoco.mjtRndFlag
        self._renderer.scene.flags[flags.mjRND_SHADOW] = False
        self._renderer.scene.flags[flags.mjRND_REFLECTION] = False
        # Close before MuJoCo's own exit hook (registered when its first EGL context was made) terminates EGL:
        # exit hooks run newest first. Left to the garbage collector at exit, the renderer frees its context
        # after EGL is gone and prints tracebacks (worker processes of collection and source videos).
        atexit.register(_close_if_alive, weakref.ref(self))

        self._seed_stream = np.random.default_rng(self.seed)
        self.variation: int | None = None  # the task variation of the current episode (set by reset)
        self._steps = 0
        self._done = True
        self._closed = False

    @staticmethod
    def _find_tasks(env) -> list:
        layer = env
        while layer is not None:
            tasks = getattr(layer, "tasks", None)
            if tasks:
                return tasks
            layer = getattr(layer, "env", None)
        raise EnvError("Meta-World/MT1 exposed no goal configurations (tasks); metaworld version mismatch?")

    def _camera_id(self, camera: str) -> int:
        if camera not in self._camera_ids:
            cam = self._mujoco.mj_name2id(self._env.model, self._mujoco.mjtObj.mjOBJ_CAMERA, camera)
            if cam < 0:
                raise EnvError(
                    f"unknown camera {camera!r} for Meta-World task {self.task!r}; cameras: {', '.join(self.cameras)}"
                )
            self._camera_ids[camera] = cam
        return self._camera_ids[camera]

    def _needs_flip(self, camera: str) -> bool:
        if camera not in self._flip:
            cam = self._camera_id(camera)
            model = self._env.model
            # A camera fixed in the world whose image "up" axis points below the horizon films the world upside
            # down. Read from the model, so the answer does not depend on whether the simulation has run yet.
            in_world = int(model.cam_bodyid[cam]) == 0
            fixed = int(model.cam_mode[cam]) == self._mujoco.mjtCamLight.mjCAMLIGHT_FIXED
            orientation = np.zeros(9)
            self._mujoco.mju_quat2Mat(orientation, model.cam_quat[cam])
            up_world_z = float(orientation.reshape(3, 3)[2, 1])
            self._flip[camera] = in_world and fixed and up_world_z < 0.0
        return self._flip[camera]

    # ------------------------------------------------------------------------------------------
    # Env interface
    # ------------------------------------------------------------------------------------------

    @property
    def variations(self) -> int:
        """How many distinct task variations (goal/object configurations) resets choose from."""
        return len(self._goal_tasks)

    def start_variation(self, seed: int) -> int:
        """The task variation `reset(seed)` starts from when no variation is given: drawn with the seed, so two
        seeds can share one (collection relies on this; evaluation passes its episode index instead)."""
        return int(np.random.default_rng(int(seed)).integers(len(self._goal_tasks)))

    def reset(self, seed: int | None = None, variation: int | None = None) -> dict[str, np.ndarray]:
        """Start an episode. `variation` picks the task variation (modulo `variations`); without it, the seed
        picks one at random (`start_variation`). Evaluation passes it to see distinct starts. The variation the
        episode started from is left in `self.variation`."""
        if self._closed:
            raise EnvError("environment is closed")
        if seed is None:
            seed = int(self._seed_stream.integers(2**31 - 1))
        if variation is None:
            variation = self.start_variation(seed)
        self.variation = int(variation) % len(self._goal_tasks)
        self._env.set_task(self._goal_tasks[self.variation])
        self._env.seed(int(seed))
        state, _ = self._env.reset()
        self._steps = 0
        self._done = False
        return self._observation(state)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        if self._done:
            raise EnvError("step() called on a finished episode; call reset() first")
        action = continuous_action(action, self.action_dim)
        state, reward, terminated, truncated, raw_info = self._env.step(action)
        self._steps += 1
        self._done = bool(terminated) or bool(truncated) or self._steps >= self.episode_length
        info: dict[str, Any] = {
            "success": bool(raw_info.get("success", 0.0) >= 1.0),
            "terminal": bool(terminated),
        }
        for key, value in raw_info.items():
            if key != "success" and np.isscalar(value):
                info[key] = float(value)
        return self._observation(state), float(reward), self._done, info

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._renderer.close()
        self._gym_env.close()

    # ------------------------------------------------------------------------------------------
    # Rendering
    # ------------------------------------------------------------------------------------------

    def render(self, camera: str | None = None) -> np.ndarray:
        """(size, size, 3) uint8 frame of the current state from `camera` (default: the observation camera)."""
        camera = camera or self.camera
        self._renderer.update_scene(self._env.data, camera=self._camera_id(camera))
        frame = self._renderer.render()
        if self._needs_flip(camera):
            frame = frame[::-1]
        return np.ascontiguousarray(frame)

    def render_raw(self, camera: str | None = None) -> np.ndarray:
        """The renderer's output without the orientation fix (for checks and debugging)."""
        camera = camera or self.camera
        self._renderer.update_scene(self._env.data, camera=self._camera_id(camera))
        return self._renderer.render().copy()

    def jitter_cameras(self, rng: np.random.Generator, scale: float) -> None:
        """Move every fixed camera by a Gaussian offset of `scale` metres (visual variety for source video).

        Offsets are applied to the original positions, so repeated calls do not drift.
        """
        model = self._env.model
        model.cam_pos[:] = self._original_cam_pos
        if scale > 0:
            model.cam_pos[:] += rng.normal(0.0, scale, size=model.cam_pos.shape)

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": self.render(), "state": np.asarray(state, dtype=np.float32)}

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_if_alive(env_ref: weakref.ref) -> None:
    env = env_ref()
    if env is not None:
        env.close()
