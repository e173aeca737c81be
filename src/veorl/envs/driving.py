"""Driving with highway-env (the CARLA substitute of this project) behind the veorl Env interface.

    env = make_env("highway", "highway", camera="topdown", size=64, episode_length=200, seed=0)

Facts this adapter relies on (highway-env 1.12.1, pygame-ce 2.5.8, measured on a 2-core CPU machine without a
display, see docs/domains.md):
- `SDL_VIDEODRIVER=dummy` makes highway-env's viewer switch itself off and every frame comes out black. The adapter
  sets `offscreen` when the variable is unset or `dummy` (before pygame is first imported); both render headless.
- The simulation, not the renderer, is the cost: a 64x64 frame takes ~0.3 ms, one policy step of highway-v0 with
  50 cars and 15 simulation substeps ~200 ms. The target scenario therefore runs 20 cars, 10 Hz simulation and
  5 Hz decisions (2 substeps per action), and the adapter drives the simulation itself: gymnasium's `step` would
  also compute a kinematics observation and highway-env's own reward, which this adapter replaces.

Tasks (scenarios): `highway` is the target (4 lanes, traffic). `merge`, `roundabout` and `intersection` are the
source scenarios of the driving domain's unlabeled videos; they run behind the same interface.

Actions: [throttle, steer] in [-1, 1]^2 (highway-env's ContinuousAction order: acceleration then steering).
Throttle maps linearly to an acceleration in [-5, 5] m/s^2 (negative = braking), steer to a wheel angle in
[-pi/4, pi/4] (positive turns clockwise on screen, i.e. towards the right of the direction of travel).

Reward per step (the paper's highway semantics: speed, lane keeping, collisions), in [0, 1] while driving:
    0.5 * clip((v_forward - 20) / (30 - 20), 0, 1) + 0.5 * clip(1 - |lateral offset| / (lane width / 2), 0, 1)
and `-COLLISION_PENALTY` on the step of a collision. Leaving the road counts as a collision (a highway has
barriers). Episodes end on a collision or at `episode_length` steps (0.2 s each). info["collision"] says whether
this episode's last step was a collision; info["success"] is true on the last step of an episode that reached
`episode_length` without one ("no collision and reached the end").

Behaviour policy: `expert_action()` is highway-env's own IDM (longitudinal) and MOBIL (lane change) controllers,
as its traffic cars use them, evaluated for the ego car and mapped onto the continuous action; the collect stage
degrades it with random-action mixing and noise like the Meta-World experts (veorl.envs.policies).

Views ("cameras"): a top-down view around the ego car in a named style (zoom and colours). `topdown` is the
target's; the others film the source videos so that source and target differ visually, as in the paper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from veorl.envs.base import EnvError, continuous_action, episode_seed

TARGET_TASK = "highway"
SIMULATION_FREQUENCY = 10  # Hz: physics substeps
POLICY_FREQUENCY = 5  # Hz: one env step = 0.2 s
ACCELERATION_RANGE = 5.0  # m/s^2 at |throttle| = 1
STEERING_RANGE = np.pi / 4  # rad at |steer| = 1
SPEED_RANGE = (20.0, 30.0)  # m/s: forward speed earning 0 .. 1 speed reward
COLLISION_PENALTY = 5.0
EXPERT_TARGET_SPEED = 28.0  # m/s the IDM expert cruises at when the road ahead is free
MAX_EPISODE_LENGTH = 1000

# Scenario name -> (gymnasium id, config). Speed-tuned: fewer cars and substeps than highway-env's defaults.
_COMMON = {
    "simulation_frequency": SIMULATION_FREQUENCY,
    "policy_frequency": POLICY_FREQUENCY,
    "action": {"type": "ContinuousAction"},
    "observation": {"type": "Kinematics", "vehicles_count": 1},  # computed once per reset only
    "offscreen_rendering": True,
    "render_agent": False,
    "show_trajectories": False,
    "duration": 10_000,  # highway-env never truncates; episode_length does
}
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "highway": ("HighwayEnv", {"lanes_count": 4, "vehicles_count": 20, "vehicles_density": 1.0}),
    "merge": ("MergeEnv", {}),
    "roundabout": ("RoundaboutEnv", {}),
    "intersection": ("IntersectionEnv", {"spawn_probability": 0.6}),
}
EGO_COLOUR = (50, 200, 0)  # highway-env's own ego colour; traffic is blue


@dataclass(frozen=True)
class Style:
    """A view: pixels per metre (zoom) and a colour map applied to highway-env's palette."""

    scaling: float
    channels: tuple[int, int, int] = (0, 1, 2)  # output channel c takes input channel channels[c]
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        if self.channels == (0, 1, 2) and self.gain == (1.0, 1.0, 1.0) and self.bias == (0.0, 0.0, 0.0):
            return frame
        out = frame[..., list(self.channels)].astype(np.float32) * np.asarray(self.gain, np.float32)
        out += np.asarray(self.bias, np.float32)
        return np.clip(out, 0, 255).astype(np.uint8)


STYLES: dict[str, Style] = {
    "topdown": Style(scaling=2.0),
    # source-video views: other zoom levels and colours (night: dark and blue; sepia: warm, channels swapped)
    "wide": Style(scaling=1.2, channels=(2, 0, 1), gain=(0.9, 1.0, 1.1), bias=(10.0, 0.0, 20.0)),
    "night": Style(scaling=2.6, channels=(0, 1, 2), gain=(0.35, 0.45, 0.8), bias=(0.0, 5.0, 30.0)),
    "sepia": Style(scaling=1.6, channels=(1, 0, 2), gain=(1.1, 0.9, 0.6), bias=(30.0, 15.0, 0.0)),
}


def _import_highway_env():
    # Before pygame's first import: `dummy` yields black frames (highway-env disables its viewer on it).
    if os.environ.get("SDL_VIDEODRIVER", "dummy") == "dummy":
        os.environ["SDL_VIDEODRIVER"] = "offscreen"
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")  # silences SDL's warning; nothing is written there
    try:
        import highway_env.envs as scenarios
        from highway_env.vehicle.behavior import IDMVehicle
        from highway_env.vehicle.kinematics import Vehicle
    except ImportError as exc:
        raise EnvError(
            f"the driving domain needs highway-env ({exc}); install it with `pip install 'veorl[envs]'` "
            "(highway-env==1.12.1)"
        ) from exc
    return scenarios, IDMVehicle, Vehicle


_EGO_CLASS = None


def _ego_class():
    """An IDM/MOBIL vehicle that follows the actions it is given and only *computes* what IDM/MOBIL would do."""
    global _EGO_CLASS
    if _EGO_CLASS is None:
        _, IDMVehicle, Vehicle = _import_highway_env()

        class ExpertEgo(IDMVehicle):
            def act(self, action: dict | str | None = None) -> None:
                # highway-env calls act() without an action on every vehicle at each substep: keep the last command.
                if isinstance(action, dict):
                    Vehicle.act(self, action)

            def expert_command(self) -> dict[str, float]:
                """IDMVehicle.act's decision for this car (lane choice, steering, IDM acceleration), not applied."""
                if self.crashed:
                    return {"steering": 0.0, "acceleration": -ACCELERATION_RANGE}
                self.follow_road()
                if self.enable_lane_change:
                    self.change_lane_policy()
                steering = float(
                    np.clip(self.steering_control(self.target_lane_index), -STEERING_RANGE, STEERING_RANGE)
                )
                front, rear = self.road.neighbour_vehicles(self, self.lane_index)
                acceleration = self.acceleration(ego_vehicle=self, front_vehicle=front, rear_vehicle=rear)
                if self.lane_index != self.target_lane_index:
                    front, rear = self.road.neighbour_vehicles(self, self.target_lane_index)
                    acceleration = min(
                        acceleration, self.acceleration(ego_vehicle=self, front_vehicle=front, rear_vehicle=rear)
                    )
                return {"steering": steering, "acceleration": float(acceleration)}

        _EGO_CLASS = ExpertEgo
    return _EGO_CLASS


def _wrap(angle: float) -> float:
    return float(np.arctan2(np.sin(angle), np.cos(angle)))


_QUIET: dict[type, type] = {}


def _quiet(scenario: type) -> type:
    """The scenario without its per-step info dict: highway-env computes its own rewards there (at every reset too),
    and merge/roundabout's reward code fails on continuous actions. This adapter computes its own reward."""
    if scenario not in _QUIET:
        _QUIET[scenario] = type(f"Quiet{scenario.__name__}", (scenario,), {"_info": lambda self, obs, action=None: {}})
    return _QUIET[scenario]


def available_tasks() -> list[str]:
    return sorted(SCENARIOS)


class HighwayEnv:
    """One highway-env scenario with continuous [throttle, steer] actions, observed top-down at size x size."""

    action_kind = "continuous"

    def __init__(
        self, task: str = TARGET_TASK, camera: str = "topdown", size: int = 64, episode_length: int = 200, seed: int = 0
    ):
        if task not in SCENARIOS:
            raise EnvError(f"unknown driving task {task!r}; known tasks: {', '.join(available_tasks())}")
        if camera not in STYLES:
            raise EnvError(f"unknown driving view {camera!r}; views: {', '.join(sorted(STYLES))}")
        if not 2 <= episode_length <= MAX_EPISODE_LENGTH:
            raise EnvError(
                f"episode_length must lie in [2, {MAX_EPISODE_LENGTH}] for highway-env, got {episode_length}"
            )
        if size < 8:
            raise EnvError(f"size must be at least 8 pixels, got {size}")
        scenarios, _, _ = _import_highway_env()
        class_name, extra = SCENARIOS[task]
        config = {**_COMMON, **extra, "screen_width": int(size), "screen_height": int(size)}
        config["scaling"] = STYLES[camera].scaling
        self.task = task
        self.camera = camera
        self.cameras = sorted(STYLES)
        self.size = int(size)
        self.episode_length = int(episode_length)
        self.seed = int(seed)
        self.action_dim = 2
        self.state_dim = 6
        self._env = _quiet(getattr(scenarios, class_name))(config=config, render_mode="rgb_array")
        self._seed_stream = np.random.default_rng(self.seed)
        self._steps = 0
        self._done = True
        self._closed = False
        self._ego = None
        self._zoom = 1.0

    # ------------------------------------------------------------------------------------------
    # Env interface
    # ------------------------------------------------------------------------------------------

    @property
    def variations(self) -> int:
        """Start configurations are drawn from the seed (traffic is random), so any count of variations exists."""
        return 2**31 - 1

    def reset(self, seed: int | None = None, variation: int | None = None) -> dict[str, np.ndarray]:
        """Start an episode; `variation` (evaluation's episode index) is folded into the seed of the traffic draw."""
        if self._closed:
            raise EnvError("environment is closed")
        seed = episode_seed(seed, variation, self._seed_stream)
        self._env.reset(seed=int(seed))
        self._swap_ego()
        self._steps = 0
        self._done = False
        return self._observation()

    def _swap_ego(self) -> None:
        """Replace the scenario's ego car by an ExpertEgo in the same state (same road, same place in the list)."""
        env = self._env
        old = env.vehicle
        ego = _ego_class()(env.road, np.array(old.position, dtype=float), heading=old.heading, speed=old.speed)
        ego.target_speed = max(EXPERT_TARGET_SPEED if self.task == TARGET_TASK else float(old.speed), 1.0)
        ego.route = list(getattr(old, "route", None) or []) or None
        ego.color = EGO_COLOUR
        vehicles = env.road.vehicles
        vehicles[vehicles.index(old)] = ego
        env.controlled_vehicles[0] = ego
        env.action_type.controlled_vehicle = ego
        self._ego = ego

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        if self._done:
            raise EnvError("step() called on a finished episode; call reset() first")
        action = continuous_action(action, self.action_dim)
        env = self._env
        env.time += 1.0 / POLICY_FREQUENCY
        env._simulate(action)  # highway-env's substeps; ContinuousAction maps [-1, 1] onto its ranges
        if hasattr(env, "_spawn_vehicle"):  # intersection-v0 renews its traffic after every step
            env._clear_vehicles()
            env._spawn_vehicle(spawn_probability=env.config["spawn_probability"])
        self._steps += 1
        ego = self._ego
        offroad = not ego.on_road
        collision = bool(ego.crashed) or offroad
        if collision:
            reward = -COLLISION_PENALTY
        else:
            reward = 0.5 * self._speed_term() + 0.5 * self._lane_term()
        truncated = self._steps >= self.episode_length
        self._done = collision or truncated
        info: dict[str, Any] = {
            "success": bool(truncated and not collision),
            "terminal": collision,
            "collision": collision,
            "offroad": offroad,
            "speed": float(ego.speed),
        }
        return self._observation(), float(reward), self._done, info

    def expert_action(self) -> np.ndarray:
        """What IDM + MOBIL would do now, as [throttle, steer] in [-1, 1] (the scripted behaviour policy)."""
        if self._ego is None:
            raise EnvError("expert_action() before reset()")
        command = self._ego.expert_command()
        return np.clip(
            np.array([command["acceleration"] / ACCELERATION_RANGE, command["steering"] / STEERING_RANGE], np.float32),
            -1.0,
            1.0,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._env.close()

    # ------------------------------------------------------------------------------------------
    # Observation, reward terms, rendering
    # ------------------------------------------------------------------------------------------

    def _lane_frame(self) -> tuple[float, float, float]:
        """(forward speed along the lane, lateral offset from its centre [m], lane width [m])."""
        ego = self._ego
        lane = ego.lane
        longitudinal, lateral = lane.local_coordinates(ego.position)
        heading_error = _wrap(ego.heading - lane.heading_at(longitudinal))
        width = float(lane.width_at(longitudinal))
        return float(ego.speed * np.cos(heading_error)), float(lateral), width

    def _speed_term(self) -> float:
        forward, _, _ = self._lane_frame()
        low, high = SPEED_RANGE
        return float(np.clip((forward - low) / (high - low), 0.0, 1.0))

    def _lane_term(self) -> float:
        _, lateral, width = self._lane_frame()
        return float(np.clip(1.0 - abs(lateral) / (width / 2.0), 0.0, 1.0))

    def _state(self) -> np.ndarray:
        ego = self._ego
        forward, lateral, width = self._lane_frame()
        lane = ego.lane
        heading_error = _wrap(ego.heading - lane.heading_at(lane.local_coordinates(ego.position)[0]))
        front, _ = ego.road.neighbour_vehicles(ego, ego.lane_index)
        gap = float(ego.lane_distance_to(front)) if front is not None else 100.0
        front_speed = float(front.speed) if front is not None else float(ego.speed)
        return np.array(
            [
                forward / 30.0,
                lateral / width,
                heading_error,
                min(gap, 100.0) / 100.0,
                (front_speed - ego.speed) / 30.0,
                float(ego.crashed),
            ],
            np.float32,
        )

    def render(self, camera: str | None = None) -> np.ndarray:
        """(size, size, 3) uint8 top-down frame around the ego car in the style `camera` (default: the env's)."""
        name = camera or self.camera
        if name not in STYLES:
            raise EnvError(f"unknown driving view {name!r}; views: {', '.join(sorted(STYLES))}")
        style = STYLES[name]
        env = self._env
        if env.viewer is None:
            env.render()  # creates the viewer with the configured scaling
        env.viewer.sim_surface.scaling = style.scaling * self._zoom
        frame = env.render()
        return np.ascontiguousarray(style.apply(np.asarray(frame, dtype=np.uint8)))

    def jitter_cameras(self, rng: np.random.Generator, scale: float) -> None:
        """Zoom every view by a factor exp(N(0, scale)) (visual variety for source video; 0 = the styles' zoom)."""
        self._zoom = float(np.clip(np.exp(rng.normal(0.0, scale)), 0.5, 2.0)) if scale > 0 else 1.0

    def _observation(self) -> dict[str, np.ndarray]:
        return {"image": self.render(), "state": self._state()}

    def __enter__(self) -> HighwayEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
