"""CARLA 0.9.x behind the veorl Env interface, for users who run a CARLA server (the paper's driving simulator).

    export CARLA_HOST=gpu-box CARLA_PORT=2000        # defaults: localhost, 2000; CARLA_TIMEOUT (s) defaults to 10
    python -m components.collect --out data/target_episodes --set domain=driving --set collect.env=carla

Not run against a server here: this project's machines cannot run the CARLA server (multi-GB Unreal package, GPU).
Everything that needs no server is unit-tested (settings, action and image conversion, the expert's steering
law, the unreachable-server error); the calls into the simulator follow CARLA 0.9.x's documented Python API
(`carla.Client`, `World.apply_settings` in synchronous mode, `sensor.camera.rgb`, `sensor.other.collision`,
`Map.get_waypoint`). The client is `pip install carla==0.9.16` (a cp311 manylinux wheel exists on PyPI and
installs with no dependencies; it is optional, extra `carla`) and must match the server's version.

Same semantics as the highway-env adapter (veorl.envs.driving): actions [throttle, steer] in [-1, 1]^2 (negative
throttle brakes), 64x64 RGB frames, but from a first-person camera on the hood; reward per step
0.5 * speed term + 0.5 * lane keeping, -COLLISION_PENALTY on a collision, which ends the episode; success = the
episode reached `episode_length` steps without one. Route: a spawn point on a road with at least three driving
lanes in the ego's direction (Town04's highway loop), traffic from CARLA's Traffic Manager.
"""

from __future__ import annotations

import math
import os
import queue
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from veorl.envs.base import EnvError
from veorl.envs.driving import COLLISION_PENALTY, SPEED_RANGE

CLIENT_VERSION = "0.9.16"


class CarlaUnreachable(EnvError):
    """No CARLA server answered at the configured host and port."""


@dataclass(frozen=True)
class CarlaSettings:
    host: str = "localhost"
    port: int = 2000
    timeout: float = 10.0  # seconds for connecting and for each server call
    town: str = "Town04"  # the paper's highway town
    task: str = "highway"
    camera: str = "firstperson"
    size: int = 64
    fov: float = 90.0
    episode_length: int = 200
    delta_seconds: float = 0.2  # one env step = one synchronous tick of 0.2 s (5 Hz, as highway-env)
    traffic: int = 30  # Traffic Manager cars spawned around the ego
    min_lanes: int = 3  # a spawn point counts as highway when its direction has this many driving lanes
    target_speed: float = 25.0  # m/s the expert cruises at
    vehicle: str = "vehicle.tesla.model3"

    @classmethod
    def from_environment(cls, **overrides: Any) -> CarlaSettings:
        """Defaults, then $CARLA_HOST / $CARLA_PORT / $CARLA_TIMEOUT / $CARLA_TOWN, then `overrides`."""
        env = os.environ
        settings = cls(
            host=env.get("CARLA_HOST", cls.host),
            port=int(env.get("CARLA_PORT", cls.port)),
            timeout=float(env.get("CARLA_TIMEOUT", cls.timeout)),
            town=env.get("CARLA_TOWN", cls.town),
        )
        settings = replace(settings, **overrides)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.task != "highway":
            raise EnvError(f"CARLA task {self.task!r}: only 'highway' (a {self.town} highway route) is defined")
        if self.camera != "firstperson":
            raise EnvError(f"CARLA camera {self.camera!r}: only 'firstperson' (hood camera) is defined")
        if not 1 <= self.port <= 65535:
            raise EnvError(f"CARLA port must lie in [1, 65535], got {self.port}")
        if self.timeout <= 0:
            raise EnvError(f"CARLA timeout must be positive, got {self.timeout}")
        if self.size < 8 or self.episode_length < 2:
            raise EnvError(f"size >= 8 and episode_length >= 2 needed, got {self.size}, {self.episode_length}")


# ------------------------------------------------------------------------------------------------
# Conversions (pure: tested without a server)
# ------------------------------------------------------------------------------------------------


def action_to_control(action: np.ndarray) -> dict[str, float]:
    """[throttle, steer] in [-1, 1] -> CARLA VehicleControl fields (negative throttle is the brake)."""
    action = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
    if action.shape != (2,) or not np.all(np.isfinite(action)):
        raise EnvError(f"action must be 2 finite values [throttle, steer], got {action}")
    throttle, steer = float(action[0]), float(action[1])
    return {"throttle": max(throttle, 0.0), "brake": max(-throttle, 0.0), "steer": steer}


def image_to_array(raw: bytes | np.ndarray, width: int, height: int) -> np.ndarray:
    """A carla.Image's raw_data (BGRA, row-major) -> (height, width, 3) uint8 RGB."""
    data = np.frombuffer(bytes(raw) if not isinstance(raw, np.ndarray) else raw.tobytes(), dtype=np.uint8)
    if data.size != width * height * 4:
        raise EnvError(f"camera image has {data.size} bytes, expected {width}x{height}x4 (BGRA)")
    return np.ascontiguousarray(data.reshape(height, width, 4)[:, :, 2::-1])


def pursuit_steer(yaw_deg: float, position: tuple[float, float], target: tuple[float, float], gain: float = 1.5):
    """Steering in [-1, 1] towards `target` for a car at `position` heading `yaw_deg` (CARLA: left-handed, y right).

    A positive angle from the heading to the target (clockwise seen from above, i.e. to the right) steers right.
    """
    angle = math.atan2(target[1] - position[1], target[0] - position[0]) - math.radians(yaw_deg)
    angle = math.atan2(math.sin(angle), math.cos(angle))
    return float(np.clip(gain * angle, -1.0, 1.0))


def driving_reward(forward_speed: float, lateral_offset: float, lane_width: float, collision: bool) -> float:
    if collision:
        return -COLLISION_PENALTY
    low, high = SPEED_RANGE
    speed = float(np.clip((forward_speed - low) / (high - low), 0.0, 1.0))
    lane = float(np.clip(1.0 - abs(lateral_offset) / max(lane_width / 2.0, 1e-3), 0.0, 1.0))
    return 0.5 * speed + 0.5 * lane


# ------------------------------------------------------------------------------------------------
# Connection and the environment
# ------------------------------------------------------------------------------------------------


def import_carla():
    try:
        import carla
    except ImportError as exc:
        raise EnvError(
            f"the CARLA adapter needs the CARLA Python client ({exc}): `pip install carla=={CLIENT_VERSION}` "
            "(extra `veorl[carla]`), matching your server's version"
        ) from exc
    return carla


def connect(settings: CarlaSettings, carla: Any = None) -> Any:
    """A connected carla.Client, or CarlaUnreachable naming host and port when no server answers in time."""
    carla = carla or import_carla()
    try:
        client = carla.Client(settings.host, settings.port)
        client.set_timeout(settings.timeout)
        client.get_server_version()  # the first call that needs the server: it times out when none answers
    except RuntimeError as exc:
        raise CarlaUnreachable(
            f"no CARLA server answered at {settings.host}:{settings.port} within {settings.timeout:g} s ({exc}); "
            "start the server (CarlaUE4.sh) or set CARLA_HOST / CARLA_PORT"
        ) from None
    return client


class CarlaEnv:
    """One ego car on a CARLA highway, first-person 64x64 camera, synchronous ticks of `delta_seconds`."""

    action_kind = "continuous"

    def __init__(self, settings: CarlaSettings, seed: int = 0, carla: Any = None):
        settings.validate()
        self.settings = settings
        self.task, self.camera, self.size = settings.task, settings.camera, settings.size
        self.cameras = [settings.camera]
        self.episode_length = settings.episode_length
        self.action_dim = 2
        self.state_dim = 3
        self.seed = int(seed)
        self._carla = carla or import_carla()
        self._client = connect(settings, self._carla)
        world = self._client.get_world()
        if not world.get_map().name.endswith(settings.town):
            world = self._client.load_world(settings.town)
        self._world = world
        self._map = world.get_map()
        world_settings = world.get_settings()
        self._original_settings = world.get_settings()
        world_settings.synchronous_mode = True
        world_settings.fixed_delta_seconds = settings.delta_seconds
        world.apply_settings(world_settings)
        self._traffic_manager = self._client.get_trafficmanager()
        self._traffic_manager.set_synchronous_mode(True)
        self._spawn_points = [p for p in self._map.get_spawn_points() if self._is_highway(p)]
        if not self._spawn_points:
            raise EnvError(f"{settings.town} has no spawn point with {settings.min_lanes} lanes in one direction")
        self._actors: list[Any] = []
        self._images: queue.Queue = queue.Queue()
        self._collided = False
        self._seed_stream = np.random.default_rng(self.seed)
        self._steps = 0
        self._done = True
        self._closed = False
        self._ego = None
        self._last_image: np.ndarray | None = None

    def _is_highway(self, transform: Any) -> bool:
        lanes, waypoint = 1, self._map.get_waypoint(transform.location)
        for side in ("get_left_lane", "get_right_lane"):
            other = getattr(waypoint, side)()
            while (
                other is not None and str(other.lane_type).endswith("Driving") and other.lane_id * waypoint.lane_id > 0
            ):
                lanes += 1
                other = getattr(other, side)()
        return lanes >= self.settings.min_lanes

    def _destroy_actors(self) -> None:
        for actor in reversed(self._actors):
            if hasattr(actor, "stop"):
                actor.stop()
            actor.destroy()
        self._actors.clear()

    def reset(self, seed: int | None = None, variation: int | None = None) -> dict[str, np.ndarray]:
        if self._closed:
            raise EnvError("environment is closed")
        seed = int(self._seed_stream.integers(2**31 - 1)) if seed is None else int(seed)
        rng = np.random.default_rng([seed, variation or 0])
        carla, world = self._carla, self._world
        self._destroy_actors()
        library = world.get_blueprint_library()
        start = self._spawn_points[int(rng.integers(len(self._spawn_points)))]
        self._ego = world.spawn_actor(library.find(self.settings.vehicle), start)
        self._actors.append(self._ego)
        camera_bp = library.find("sensor.camera.rgb")
        camera_bp.set_attribute("image_size_x", str(self.size))
        camera_bp.set_attribute("image_size_y", str(self.size))
        camera_bp.set_attribute("fov", str(self.settings.fov))
        hood = carla.Transform(carla.Location(x=1.5, z=1.7))
        camera = world.spawn_actor(camera_bp, hood, attach_to=self._ego)
        self._images = queue.Queue()
        camera.listen(self._images.put)
        collision = world.spawn_actor(library.find("sensor.other.collision"), carla.Transform(), attach_to=self._ego)
        self._collided = False
        collision.listen(lambda event: setattr(self, "_collided", True))
        self._actors += [camera, collision]
        self._traffic_manager.set_random_device_seed(seed & 0x7FFFFFFF)
        others = [p for p in self._map.get_spawn_points() if p.location.distance(start.location) > 10.0]
        for index in rng.permutation(len(others))[: self.settings.traffic]:
            blueprint = library.filter("vehicle.*")[int(rng.integers(len(library.filter("vehicle.*"))))]
            car = world.try_spawn_actor(blueprint, others[int(index)])
            if car is not None:
                car.set_autopilot(True, self._traffic_manager.get_port())
                self._actors.append(car)
        self._steps, self._done = 0, False
        return self._tick()

    def _tick(self) -> dict[str, np.ndarray]:
        frame = self._world.tick()
        while True:
            try:
                image = self._images.get(timeout=self.settings.timeout)
            except queue.Empty:
                raise EnvError(
                    f"the CARLA camera sent no image for frame {frame} in {self.settings.timeout:g} s"
                ) from None
            if image.frame >= frame:
                break
        self._last_image = image_to_array(image.raw_data, image.width, image.height)
        forward, lateral, _ = self._lane_frame()
        return {
            "image": self._last_image,
            "state": np.array([forward / 30.0, lateral, float(self._collided)], np.float32),
        }

    def _lane_frame(self) -> tuple[float, float, float]:
        transform, velocity = self._ego.get_transform(), self._ego.get_velocity()
        waypoint = self._map.get_waypoint(transform.location)
        yaw = math.radians(waypoint.transform.rotation.yaw)
        direction = (math.cos(yaw), math.sin(yaw))
        forward = velocity.x * direction[0] + velocity.y * direction[1]
        dx = transform.location.x - waypoint.transform.location.x
        dy = transform.location.y - waypoint.transform.location.y
        lateral = -dx * direction[1] + dy * direction[0]
        return float(forward), float(lateral), float(waypoint.lane_width)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        if self._done:
            raise EnvError("step() called on a finished episode; call reset() first")
        self._ego.apply_control(self._carla.VehicleControl(**action_to_control(action)))
        obs = self._tick()
        self._steps += 1
        forward, lateral, width = self._lane_frame()
        collision = bool(self._collided)
        reward = driving_reward(forward, lateral, width, collision)
        truncated = self._steps >= self.episode_length
        self._done = collision or truncated
        info = {"success": bool(truncated and not collision), "terminal": collision, "collision": collision}
        return obs, reward, self._done, info

    def expert_action(self) -> np.ndarray:
        """Pure pursuit on the lane's waypoints 10 m ahead and a proportional speed controller."""
        transform, velocity = self._ego.get_transform(), self._ego.get_velocity()
        waypoint = self._map.get_waypoint(transform.location)
        target = waypoint.next(10.0)[0].transform.location
        steer = pursuit_steer(
            transform.rotation.yaw, (transform.location.x, transform.location.y), (target.x, target.y)
        )
        speed = math.hypot(velocity.x, velocity.y)
        throttle = float(np.clip(0.5 * (self.settings.target_speed - speed), -1.0, 1.0))
        return np.array([throttle, steer], np.float32)

    def render(self, camera: str | None = None) -> np.ndarray:
        if camera not in (None, self.camera):
            raise EnvError(f"CARLA adapter films only {self.camera!r}")
        if self._last_image is None:
            raise EnvError("render() before reset()")
        return self._last_image

    def jitter_cameras(self, rng: np.random.Generator, scale: float) -> None:
        """Source videos are not rendered in CARLA by this project; nothing to jitter."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._destroy_actors()
            self._world.apply_settings(self._original_settings)
            self._traffic_manager.set_synchronous_mode(False)
        except RuntimeError:
            pass  # the server went away; nothing left to clean up on it
