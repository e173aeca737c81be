"""Replay evaluation episodes of an agent and print where the arm and the task's object go (Meta-World).

Evaluation plays episode i from task variation i with seed SEED + i; this script plays the same episodes with the
same deterministic policy and prints, every `--every` steps, the action, the hand's position (the simulator state's
first three numbers), the object's (numbers 4-6), the reward, the return so far and whether the task is solved.
It shows what a failure is: an arm that never reaches the object, or reaches it and lets go.

    python scripts/replay_episode.py results/laptop-handle-press/compare/veorl/seed-0/agent --episodes 3 4
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def replay(agent_dir: str, episodes: list[int], seed: int, every: int, threads: int) -> None:
    import torch

    from veorl.agent import Agent
    from veorl.evaluation import agent_env

    torch.set_num_threads(threads)
    agent = Agent.load(agent_dir, device="cpu")
    meta = agent.meta
    if meta["env"] != "metaworld":
        raise SystemExit(f"replay_episode.py reads Meta-World's state vector; this agent acts in {meta['env']}")
    env = agent_env(agent, agent_dir)
    np.set_printoptions(precision=3, suppress=True)
    try:
        for episode in episodes:
            obs = env.reset(seed=seed + episode, variation=episode)
            state = agent.initial_state(1)
            print(f"episode {episode} (seed {seed + episode}): hand {obs['state'][:3]} object {obs['state'][4:7]}")
            total, solved = 0.0, False
            for step in range(int(meta["episode_length"])):
                action, state = agent.act(np.asarray(obs["image"], dtype=np.uint8)[None], state)
                obs, reward, done, info = env.step(action[0])
                total += reward
                solved = solved or bool(info["success"])
                if step % every == 0 or done:
                    print(
                        f"  step {step:3d}  action {action[0]}  hand {obs['state'][:3]}  object {obs['state'][4:7]}"
                        f"  reward {reward:5.2f}  return {total:7.1f}  solved {solved}"
                    )
                if done:
                    break
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("agent", help="agent artifact folder (finetune's --out)")
    parser.add_argument("--episodes", type=int, nargs="+", default=[0], help="evaluation episodes (default: 0)")
    parser.add_argument("--seed", type=int, default=1000, help="evaluate.seed of the evaluation (default: 1000)")
    parser.add_argument("--every", type=int, default=20, help="print every this many steps (default: 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    replay(args.agent, args.episodes, args.seed, max(1, args.every), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
