"""Return and success of uniformly random actions on an evaluation protocol (a floor for docs/results.md).

    python scripts/random_policy.py --task drawer-open --episodes 10 --seed 1000 --episode-length 200
    python scripts/random_policy.py --env highway --task highway --camera topdown --constant 0 0   # hold one action

--constant A1 ... plays that action at every step instead (e.g. driving on without throttle or steering).
A simulator that reports collisions (driving) also gets its collision rate.

Episode i is reset like evaluation resets it (seed + i, task variation i), so the figure is comparable with the
agents' on the same episodes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from veorl.envs import make_env  # noqa: E402  (sets the headless rendering backend before mujoco loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/random_policy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="metaworld")
    parser.add_argument("--task", default="drawer-open")
    parser.add_argument("--camera", default="corner")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000, help="evaluate.seed of the protocol")
    parser.add_argument("--episode-length", type=int, default=200)
    parser.add_argument("--action-seed", type=int, default=0, help="seed of the random actions")
    parser.add_argument(
        "--constant", type=float, nargs="+", default=None, metavar="A", help="play this action at every step"
    )
    args = parser.parse_args(argv)
    env = make_env(
        env=args.env, task=args.task, camera=args.camera, size=64, episode_length=args.episode_length, seed=0
    )
    rng = np.random.default_rng(args.action_seed)
    if args.constant is not None and len(args.constant) != env.action_dim:
        env.close()
        parser.error(f"--constant needs {env.action_dim} values for {args.env}, got {len(args.constant)}")
    constant = None if args.constant is None else np.asarray(args.constant, dtype=np.float64)
    returns, successes, collisions = [], [], []
    reports_collisions = False
    try:
        for i in range(args.episodes):
            env.reset(seed=args.seed + i, variation=i)
            total, success, collision, done = 0.0, False, False, False
            while not done:
                action = rng.uniform(-1.0, 1.0, env.action_dim) if constant is None else constant
                _, reward, done, info = env.step(action)
                reports_collisions = reports_collisions or "collision" in info
                total += reward
                success = success or bool(info.get("success", False))
                collision = collision or bool(info.get("collision", False))
            returns.append(total)
            successes.append(success)
            collisions.append(collision)
    finally:
        env.close()
    policy = "random policy" if args.constant is None else f"constant action {args.constant}"
    collision_rate = f", collision rate {np.mean(collisions):.2f}" if reports_collisions else ""
    print(
        f"{policy} on {args.task}, {args.episodes} episodes from seed {args.seed}: "
        f"return {np.mean(returns):.1f} +- {np.std(returns):.1f}, success rate {np.mean(successes):.2f}"
        f"{collision_rate}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
