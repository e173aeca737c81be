"""Calibration of the game domain's behaviour data and the crafter adapter's speed (a script, not a test).

    python scripts/calibrate_game.py                                   # the defaults' rows (below)
    python scripts/calibrate_game.py --task collect-drink --random-prob 0.9 0.95 --length 100 --episodes 40
    python scripts/calibrate_game.py --speed                           # steps/s of the adapter only

For each random-action probability P (the `collect.medium_random_prob` knob; 0 is the expert) it plays
--episodes episodes of --task with the collect stage's own behaviour policy (veorl.envs.policies.BehaviourPolicy
around the scripted player, one-hot random actions with probability P, seeded like the collect stage: episode i
resets the world of seed i and draws its random actions from SeedSequence([i, 0x5EED])), and prints the success
rate, the return (mean +- std), the mean episode length and the steps per second of the whole loop (world
generation at every reset included).

--speed measures the adapter: steps/s of uniformly random one-hot actions in one world (crafter step and the 64x64
frame), of the scripted player (its breadth-first search each step), and the time of a reset (world generation;
numba makes it ~20x faster, see docs/domains.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from veorl.envs import make_env
from veorl.envs.game import NUM_ACTIONS, one_hot
from veorl.envs.policies import BehaviourPolicy, scripted_policy


def calibrate(task: str, length: int, random_prob: float, episodes: int) -> dict[str, float]:
    env = make_env("crafter", task, camera="native", size=64, episode_length=length, seed=0)
    returns, successes, lengths = [], [], []
    started, steps = time.perf_counter(), 0
    for seed in range(episodes):
        obs = env.reset(seed=seed)
        policy = BehaviourPolicy(
            scripted_policy("crafter", task, env=env),
            NUM_ACTIONS,
            random_prob=random_prob,
            seed=np.random.SeedSequence([seed, 0x5EED]),
            discrete=True,
        )
        total, done, n, success = 0.0, False, 0, False
        while not done:
            obs, reward, done, info = env.step(policy(obs["state"]))
            total, n, success = total + reward, n + 1, success or info["success"]
        returns.append(total)
        successes.append(success)
        lengths.append(n)
        steps += n
    elapsed = time.perf_counter() - started
    return {
        "success_rate": float(np.mean(successes)),
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "length_mean": float(np.mean(lengths)),
        "steps_per_s": steps / elapsed,
    }


def speed(steps: int) -> None:
    env = make_env("crafter", "collect-diamond", camera="native", size=64, episode_length=10_000, seed=0)
    env.reset(seed=0)  # the first reset compiles numba's noise functions (when numba is installed)
    started = time.perf_counter()
    for seed in range(1, 11):
        env.reset(seed=seed)
    reset_s = (time.perf_counter() - started) / 10
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(steps):
        if env.step(one_hot(int(rng.integers(NUM_ACTIONS))))[2]:  # died (lava, zombies): a new world
            env.reset(seed=int(rng.integers(2**31 - 1)))
    random_rate = steps / (time.perf_counter() - started)
    player = make_env("crafter", "explore", camera="native", size=64, episode_length=10_000, seed=0)
    obs = player.reset(seed=1)
    policy = scripted_policy("crafter", "explore", env=player)
    started = time.perf_counter()
    for _ in range(steps):
        obs, _, done, _ = player.step(policy(obs["state"]))
        if done:
            obs = player.reset(seed=2)
    explore_rate = steps / (time.perf_counter() - started)
    forage = make_env("crafter", "forage", camera="native", size=64, episode_length=10_000, seed=0)
    obs = forage.reset(seed=1)
    policy = scripted_policy("crafter", "forage", env=forage)
    started = time.perf_counter()
    for _ in range(steps):
        obs, _, done, _ = forage.step(policy(obs["state"]))
        if done:
            obs = forage.reset(seed=2)
    forage_rate = steps / (time.perf_counter() - started)
    print(f"reset (world generation): {reset_s * 1000:.0f} ms")
    print(f"random one-hot actions: {random_rate:.0f} steps/s (step + 64x64 frame; a reset only after a death)")
    print(f"scripted explorer: {explore_rate:.0f} steps/s; scripted forager (search every step): {forage_rate:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="collect-wood", help="target task (default: %(default)s)")
    parser.add_argument("--length", type=int, default=100, help="episode length in steps (default: %(default)s)")
    parser.add_argument("--episodes", type=int, default=40, help="episodes per row (default: %(default)s)")
    parser.add_argument(
        "--random-prob", type=float, nargs="+", default=[0.0, 0.85, 0.9, 0.92, 0.95], help="rows: 0 = the expert"
    )
    parser.add_argument("--speed", action="store_true", help="measure the adapter's steps/s instead")
    parser.add_argument("--steps", type=int, default=3000, help="steps per --speed measurement")
    args = parser.parse_args(argv)
    if args.speed:
        speed(args.steps)
        return 0
    print(f"{args.task}, {args.length} steps, {args.episodes} episodes (seeds 0..{args.episodes - 1}) per row")
    print("| random_prob | success rate | return | mean length | steps/s |")
    print("|---|---|---|---|---|")
    for p in args.random_prob:
        r = calibrate(args.task, args.length, p, args.episodes)
        print(
            f"| {p:g} | {r['success_rate']:.2f} | {r['return_mean']:.2f} +- {r['return_std']:.2f} "
            f"| {r['length_mean']:.1f} | {r['steps_per_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
