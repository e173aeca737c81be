"""The game domain: crafter (the MineDojo substitute of this project) behind the veorl Env interface.

    env = make_env("crafter", "collect-wood", camera="native", size=64, episode_length=200, seed=0)

Facts this adapter relies on (crafter 1.8.3; numba installed makes world generation ~20x faster; see docs/domains.md):
- `crafter.Env(size=(64, 64), seed=s)` renders 64x64x3 uint8 frames natively: a 9x7-tile top-down view around the
  player with a 9x2-tile inventory strip below it. It has 17 discrete actions and the old 4-tuple `step` API; its
  action space (a namedtuple without gym) has no `.sample()`.
- crafter seeds each world from `hash((seed, episode counter))`; the adapter resets that counter so that
  `reset(seed)` alone decides the world (the same seed gives the same world and, with the same actions, the same
  frames).
- crafter is not deterministic by itself: every 10 steps it despawns a creature picked by index from a `set` of
  objects, whose order follows memory addresses, so two runs of one seed part ways after ~150 steps. The adapter's
  crafter hands that code the chunk's objects sorted by position (`_deterministic_env_class`); nothing else changes.
  Its night-time noise also draws from the world's generator, so `render` of another view puts the generator back
  (filming source videos from several views does not change the episode).

Tasks. The target tasks are crafter's achievements written with hyphens (`collect-wood`, the default target;
`collect-drink`, `collect-sapling`, ... any of the 22 in TASKS), in the spirit of the paper's harvesting tasks:
- reward 1.0 on the step the task's achievement is first unlocked, 0 otherwise (sparse, as the paper's Minecraft
  harvest tasks; no shaping: crafter's own health-change reward would pay for survival, not for the task);
- success = that achievement unlocked; the episode then ends with a true terminal (discount 0), so the discount
  head learns where episodes end. Death (health 0) is a terminal too, without success. Otherwise the episode is
  truncated at `episode_length` steps (discount stays 1).
- info["tasks"] says for every task in TASKS whether its achievement was unlocked this episode (evaluation's
  per-task success rates).
Two more tasks exist only to film source videos, never as targets: `explore` (a persistent random walk that never
presses `do`) and `forage` (a player that drinks, gathers saplings, plants them and hunts cows, never touching a
tree). They have no reward and never succeed.

Actions: a one-hot vector over the 17 crafter actions (ACTIONS), as the project's discrete actor emits them
(veorl.models.actor_critic.OneHotCategorical); `step` plays the argmax, so any vector works. Index 0 is `noop`.

Behaviour player (`expert_action`): reads crafter's world (material and object maps, the player's position and
facing), finds the nearest reachable cell next to the task's resource by breadth-first search over walkable cells
(grass, sand, path; never lava, never through creatures), walks there, turns to face the resource and presses
`do`; with nothing reachable in sight it walks in a persistent random direction. Harvest tasks it plays:
collect-wood (trees), collect-drink (water), collect-sapling (grass), eat-cow (cows). The collect stage degrades it
with random-action mixing (veorl.envs.policies; calibration in veorl.config.DOMAINS).

Views ("cameras"): `native` is crafter's own rendering (the target's). The source videos use other styles: `far`
(13x13 tiles: zoomed out, channels rotated), `dusk` (7x7 tiles: zoomed in, dark and blue) and `sepia`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from veorl.envs.base import EnvError, episode_seed

ACTIONS = (
    "noop",
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "do",
    "sleep",
    "place_stone",
    "place_table",
    "place_furnace",
    "place_plant",
    "make_wood_pickaxe",
    "make_stone_pickaxe",
    "make_iron_pickaxe",
    "make_wood_sword",
    "make_stone_sword",
    "make_iron_sword",
)
"""crafter 1.8.3's action list, in its order (crafter/data.yaml); checked against crafter when an env is built."""
NUM_ACTIONS = len(ACTIONS)
ACHIEVEMENTS = (
    "collect_coal",
    "collect_diamond",
    "collect_drink",
    "collect_iron",
    "collect_sapling",
    "collect_stone",
    "collect_wood",
    "defeat_skeleton",
    "defeat_zombie",
    "eat_cow",
    "eat_plant",
    "make_iron_pickaxe",
    "make_iron_sword",
    "make_stone_pickaxe",
    "make_stone_sword",
    "make_wood_pickaxe",
    "make_wood_sword",
    "place_furnace",
    "place_plant",
    "place_stone",
    "place_table",
    "wake_up",
)
TASKS: dict[str, str] = {name.replace("_", "-"): name for name in ACHIEVEMENTS}
"""Target tasks: task name -> the crafter achievement whose unlocking is the task's success."""
SOURCE_ONLY_TASKS = ("explore", "forage")
"""Tasks with no achievement: they film the source videos (no reward, never a success)."""
TARGET_TASK = "collect-wood"
MAX_EPISODE_LENGTH = 10_000  # crafter's own episode limit

_MOVES = {(-1, 0): 1, (1, 0): 2, (0, -1): 3, (0, 1): 4}  # direction (dx, dy) -> action index
_DIRECTIONS = tuple(_MOVES)
_DO, _SLEEP, _PLACE_PLANT = 5, 6, 10
_WALKABLE = ("grass", "sand", "path")
# What the behaviour player walks to and presses `do` on, per task: a material, or a creature ("cow").
RESOURCES = {"collect-wood": "tree", "collect-drink": "water", "collect-sapling": "grass", "eat-cow": "cow"}
SEARCH_RADIUS = 24  # cells: how far the player's breadth-first search looks (crafter's view is 9x7)
FORAGE_GOALS = ("water", "grass", "cow")


@dataclass(frozen=True)
class Style:
    """A view: how many tiles are visible (crafter's `view`) and a colour map applied to its frame."""

    view: int = 9
    channels: tuple[int, int, int] = (0, 1, 2)  # output channel c takes input channel channels[c]
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def apply(self, frame: np.ndarray, brightness: float = 1.0) -> np.ndarray:
        plain = self.channels == (0, 1, 2) and self.gain == (1.0, 1.0, 1.0) and self.bias == (0.0, 0.0, 0.0)
        if plain and brightness == 1.0:
            return frame
        out = frame[..., list(self.channels)].astype(np.float32) * (np.asarray(self.gain, np.float32) * brightness)
        out += np.asarray(self.bias, np.float32)
        return np.clip(out, 0, 255).astype(np.uint8)


STYLES: dict[str, Style] = {
    "native": Style(),
    "far": Style(view=13, channels=(2, 0, 1), gain=(0.9, 1.0, 1.1), bias=(10.0, 0.0, 20.0)),
    "dusk": Style(view=7, gain=(0.35, 0.45, 0.8), bias=(0.0, 5.0, 30.0)),
    "sepia": Style(view=11, channels=(1, 0, 2), gain=(1.1, 0.9, 0.6), bias=(30.0, 15.0, 0.0)),
}


def _import_crafter():
    try:
        import crafter
        from crafter import constants, engine, objects
    except ImportError as exc:
        raise EnvError(
            f"the game domain needs crafter ({exc}); install it with `pip install 'veorl[envs]'` "
            "(crafter==1.8.3, numba==0.68.1 for fast world generation)"
        ) from exc
    return crafter, constants, engine, objects


_ENV_CLASS = None


def _deterministic_env_class():
    """crafter.Env whose creature balancing sees each chunk's objects in a fixed order (by position: one object per
    cell) instead of a set's, so one seed and one action sequence always give one episode."""
    global _ENV_CLASS
    if _ENV_CLASS is None:
        crafter, _, _, _ = _import_crafter()

        class DeterministicCrafter(crafter.Env):
            def _balance_chunk(self, chunk, objs):
                super()._balance_chunk(chunk, sorted(objs, key=lambda obj: (int(obj.pos[0]), int(obj.pos[1]))))

        _ENV_CLASS = DeterministicCrafter
    return _ENV_CLASS


def available_tasks() -> list[str]:
    return sorted(TASKS) + list(SOURCE_ONLY_TASKS)


def one_hot(index: int) -> np.ndarray:
    action = np.zeros(NUM_ACTIONS, np.float32)
    action[int(index)] = 1.0
    return action


class CrafterEnv:
    """One crafter world per episode, a task (achievement) to unlock, one-hot actions, size x size frames."""

    action_kind = "discrete"

    def __init__(
        self, task: str = TARGET_TASK, camera: str = "native", size: int = 64, episode_length: int = 200, seed: int = 0
    ):
        if task not in TASKS and task not in SOURCE_ONLY_TASKS:
            raise EnvError(f"unknown game task {task!r}; known tasks: {', '.join(available_tasks())}")
        if camera not in STYLES:
            raise EnvError(f"unknown game view {camera!r}; views: {', '.join(sorted(STYLES))}")
        if not 2 <= episode_length <= MAX_EPISODE_LENGTH:
            raise EnvError(f"episode_length must lie in [2, {MAX_EPISODE_LENGTH}] for crafter, got {episode_length}")
        if size < 16:
            raise EnvError(f"size must be at least 16 pixels, got {size}")
        _, constants, engine, objects = _import_crafter()
        if tuple(constants.actions) != ACTIONS:
            raise EnvError(f"this adapter knows crafter 1.8.3's actions; the installed crafter has {constants.actions}")
        self._engine, self._objects = engine, objects
        self.task = task
        self.camera = camera
        self.cameras = sorted(STYLES)
        self.size = int(size)
        self.episode_length = int(episode_length)
        self.seed = int(seed)
        self.action_dim = NUM_ACTIONS
        self.state_dim = 20
        # crafter's own episode limit is ours; its reward is replaced by the task's.
        self._env = _deterministic_env_class()(
            size=(self.size, self.size), view=(STYLES[camera].view,) * 2, seed=self.seed
        )
        self._views: dict[int, tuple[Any, Any]] = {}
        self._seed_stream = np.random.default_rng(self.seed)
        self._brightness = 1.0
        self._steps = 0
        self._done = True
        self._closed = False
        self._player_rng = np.random.default_rng(0)
        self._heading = (0, 1)
        self._heading_left = 0
        self._forage_goal = FORAGE_GOALS[0]
        self._forage_left = 0

    # ------------------------------------------------------------------------------------------
    # Env interface
    # ------------------------------------------------------------------------------------------

    @property
    def variations(self) -> int:
        """Worlds are generated from the seed, so any number of start configurations exists."""
        return 2**31 - 1

    def reset(self, seed: int | None = None, variation: int | None = None) -> dict[str, np.ndarray]:
        """Generate the world of `seed` (folded with `variation`, evaluation's episode index) and start in it."""
        if self._closed:
            raise EnvError("environment is closed")
        seed = episode_seed(seed, variation, self._seed_stream)
        # crafter draws the world from (its seed, its episode counter): pin both so the seed alone decides.
        self._env._seed = int(seed)
        self._env._episode = 0
        frame = self._env.reset()
        self._player_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0FFEE]))
        self._heading, self._heading_left = _DIRECTIONS[int(self._player_rng.integers(4))], 0
        self._forage_goal, self._forage_left = FORAGE_GOALS[0], 0
        self._steps = 0
        self._done = False
        return self._observation(frame)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        if self._done:
            raise EnvError("step() called on a finished episode; call reset() first")
        index = self.action_index(action)
        frame, _, crafter_done, crafter_info = self._env.step(index)
        self._steps += 1
        unlocked = crafter_info["achievements"]
        target = TASKS.get(self.task)
        success = target is not None and unlocked[target] > 0
        dead = self._env._player.health <= 0
        terminal = bool(success or dead)
        truncated = self._steps >= self.episode_length or bool(crafter_done)
        self._done = terminal or truncated
        info: dict[str, Any] = {
            "success": bool(success),
            "terminal": terminal,
            "dead": bool(dead),
            "action_name": ACTIONS[index],
            "tasks": {task: bool(unlocked[name] > 0) for task, name in TASKS.items()},
        }
        return self._observation(frame), 1.0 if success else 0.0, self._done, info

    @staticmethod
    def action_index(action: Any) -> int:
        """The crafter action a one-hot (or any score) vector over the 17 actions stands for: its argmax."""
        vector = np.asarray(action, dtype=np.float64).reshape(-1)
        if vector.shape != (NUM_ACTIONS,):
            raise EnvError(f"action must be a vector over the {NUM_ACTIONS} crafter actions, got shape {vector.shape}")
        if not np.all(np.isfinite(vector)):
            raise EnvError(f"action contains NaN or inf: {vector}")
        return int(np.argmax(vector))

    def close(self) -> None:
        self._closed = True

    # ------------------------------------------------------------------------------------------
    # The behaviour player
    # ------------------------------------------------------------------------------------------

    def expert_action(self) -> np.ndarray:
        """The scripted player's action for this env's task, one-hot (the behaviour policy of collect and of the
        source videos)."""
        if self._done and self._steps == 0:
            raise EnvError("expert_action() before reset()")
        return one_hot(self._player_action())

    def _player_action(self) -> int:
        player = self._env._player
        if player.sleeping:
            return _SLEEP  # crafter overrides every action while asleep; say what happens
        if self.task == "explore":
            return self._wander()
        if self.task == "forage":
            return self._forage()
        resource = RESOURCES.get(self.task)
        if resource is None:
            return self._wander()
        return self._harvest(resource)

    def _forage(self) -> int:
        """Drink, gather saplings, plant one now and then, hunt cows: a new goal every 15-40 steps; never a tree."""
        player = self._env._player
        if self._forage_left <= 0:
            self._forage_goal = FORAGE_GOALS[int(self._player_rng.integers(len(FORAGE_GOALS)))]
            self._forage_left = int(self._player_rng.integers(15, 41))
        self._forage_left -= 1
        if player.inventory["sapling"] > 0 and self._player_rng.random() < 0.1:
            material, obj = self._env._world[tuple(np.asarray(player.pos) + np.asarray(player.facing))]
            if material == "grass" and obj is None:
                return _PLACE_PLANT
        return self._harvest(self._forage_goal)

    def _harvest(self, resource: str) -> int:
        """Face the resource and press `do`, or take the first step of the shortest walk to a cell beside one."""
        world, player = self._env._world, self._env._player
        pos = tuple(int(v) for v in player.pos)
        facing = tuple(int(v) for v in player.facing)
        if self._is_resource(world, (pos[0] + facing[0], pos[1] + facing[1]), resource):
            return _DO
        if resource != "grass":
            # Beside a resource already: moving towards a non-walkable cell only turns the player to face it.
            for direction in _DIRECTIONS:
                if self._is_resource(world, (pos[0] + direction[0], pos[1] + direction[1]), resource):
                    return _MOVES[direction]
        first = self._first_step_towards(world, pos, resource)
        return _MOVES[first] if first is not None else self._wander()

    def _is_resource(self, world: Any, cell: tuple[int, int], resource: str) -> bool:
        material, obj = world[cell]
        if resource == "cow":
            return isinstance(obj, self._objects.Cow)
        return material == resource and obj is None

    def _walkable(self, world: Any, cell: tuple[int, int]) -> bool:
        material, obj = world[cell]
        return material in _WALKABLE and obj is None

    def _first_step_towards(self, world: Any, start: tuple[int, int], resource: str) -> tuple[int, int] | None:
        """Breadth-first search over free walkable cells for a cell whose neighbour in the direction of arrival
        is the resource (so arriving there faces it); returns the first direction of that walk."""
        first: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
        frontier = deque([(start, 0)])
        while frontier:
            cell, depth = frontier.popleft()
            if depth >= SEARCH_RADIUS:
                continue
            for direction in _DIRECTIONS:
                nxt = (cell[0] + direction[0], cell[1] + direction[1])
                if nxt in first:
                    continue
                origin = first[cell] or direction
                if self._is_resource(world, nxt, resource) and (resource != "grass" or cell != start):
                    # Standing on `cell` and moving in `direction` faces the resource (a non-walkable one) or
                    # steps onto it facing on (grass): either way the walk is found.
                    return origin
                if self._walkable(world, nxt):
                    first[nxt] = origin
                    frontier.append((nxt, depth + 1))
        return None

    def _wander(self) -> int:
        """A persistent random walk: keep a heading for 3-8 steps, turn when blocked; never `do`."""
        world, player = self._env._world, self._env._player
        pos = tuple(int(v) for v in player.pos)
        blocked = not self._walkable(world, (pos[0] + self._heading[0], pos[1] + self._heading[1]))
        if self._heading_left <= 0 or blocked:
            open_directions = [d for d in _DIRECTIONS if self._walkable(world, (pos[0] + d[0], pos[1] + d[1]))] or list(
                _DIRECTIONS
            )
            self._heading = open_directions[int(self._player_rng.integers(len(open_directions)))]
            self._heading_left = int(self._player_rng.integers(3, 9))
        self._heading_left -= 1
        return _MOVES[self._heading]

    # ------------------------------------------------------------------------------------------
    # Observation and rendering
    # ------------------------------------------------------------------------------------------

    def _state(self) -> np.ndarray:
        """Inventory (16 counts / 9), facing (2) and position / world size (2): what the player knows of itself."""
        player = self._env._player
        inventory = np.array(list(player.inventory.values())[:16], np.float32) / 9.0
        area = np.asarray(self._env._world.area, np.float32)
        return np.concatenate(
            [inventory, np.asarray(player.facing, np.float32), np.asarray(player.pos, np.float32) / area]
        ).astype(np.float32)

    def render(self, camera: str | None = None) -> np.ndarray:
        """(size, size, 3) uint8 frame of the player's surroundings in the style `camera` (default: the env's)."""
        name = camera or self.camera
        if name not in STYLES:
            raise EnvError(f"unknown game view {name!r}; views: {', '.join(sorted(STYLES))}")
        style = STYLES[name]
        # crafter's night-time noise draws from the world's generator: filming must not change what happens next.
        random = self._env._world.random
        saved = random.get_state()
        try:
            frame = self._env.render() if style.view == STYLES[self.camera].view else self._render_view(style.view)
        finally:
            random.set_state(saved)
        return np.ascontiguousarray(style.apply(np.asarray(frame, np.uint8), self._brightness))

    def _render_view(self, view: int) -> np.ndarray:
        """crafter's own render (crafter.Env.render) with another number of visible tiles."""
        if view not in self._views:
            engine = self._engine
            items = len(self._env._player.inventory) if self._env._player is not None else 16
            item_rows = int(np.ceil(items / view))
            self._views[view] = (
                engine.LocalView(self._env._world, self._env._textures, [view, view - item_rows]),
                engine.ItemView(self._env._textures, [view, item_rows]),
            )
        local_view, item_view = self._views[view]
        size = np.array([self.size, self.size])
        unit = size // view
        canvas = np.zeros((self.size, self.size, 3), np.uint8)
        player = self._env._player
        frame = np.concatenate([local_view(player, unit), item_view(player.inventory, unit)], 1)
        border = (size - unit * view) // 2
        (x, y), (w, h) = border, frame.shape[:2]
        canvas[x : x + w, y : y + h] = frame
        return canvas.transpose((1, 0, 2))

    def jitter_cameras(self, rng: np.random.Generator, scale: float) -> None:
        """Scale every view's brightness by exp(N(0, scale)) (visual variety for source video; 0 = the styles')."""
        self._brightness = float(np.clip(np.exp(rng.normal(0.0, scale)), 0.5, 1.5)) if scale > 0 else 1.0

    def _observation(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        """crafter's own frame (rendered in this env's view) in the env's style, and the state vector."""
        image = STYLES[self.camera].apply(np.asarray(frame, np.uint8), self._brightness)
        return {"image": np.ascontiguousarray(image), "state": self._state()}

    def __enter__(self) -> CrafterEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
