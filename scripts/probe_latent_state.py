"""Does a model-based agent's latent state know where things are? A linear probe (Meta-World).

The agent plays `--variations` task variations (its own actions plus Gaussian noise, so the hand wanders) for
`--steps` steps each; at every step the script keeps the Trunk Net's filtered latent state (stoch and deter) and the
simulator's positions of the hand (state 0-2) and of the task's object (state 4-6). Ridge regressions from the
latent state to each coordinate are scored by R^2 on held-out variations (5 folds, grouped by variation, so a probe
never sees the scene it is tested on), next to the same probe from the image itself (16x16 pixels), a reference for
what is linearly visible. An R^2 near 1 means the latent state encodes the position; near 0 or below, it does not.

    python scripts/probe_latent_state.py results/laptop-handle-press/compare/veorl/seed-0/agent
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

TARGETS = ("object x", "object y", "object z", "hand x", "hand y", "hand z")


def collect(agent_dir: str, variations: int, steps: int, noise: float, seed: int, threads: int):
    import torch

    from veorl.agent import Agent
    from veorl.evaluation import agent_env

    torch.set_num_threads(threads)
    agent = Agent.load(agent_dir, device="cpu")
    meta = agent.meta
    if agent.algo == "bc" or meta["env"] != "metaworld":
        raise SystemExit("probe_latent_state.py needs a model-based agent (veorl, dreamerv2) acting in Meta-World")
    env = agent_env(agent, agent_dir)
    rng = np.random.default_rng(seed)
    latents, pixels, targets, groups = [], [], [], []
    try:
        for variation in range(variations):
            obs = env.reset(seed=seed + variation, variation=variation)
            state = agent.initial_state(1)
            for step in range(steps):
                image = np.asarray(obs["image"], dtype=np.uint8)[None]
                action, state = agent.act(image, state)
                if step >= 2:  # the filter has seen a few frames
                    latents.append(np.concatenate([state["stoch"][0], state["deter"][0]]))
                    pixels.append(image[0, ::4, ::4].reshape(-1) / 255.0)
                    targets.append(np.concatenate([obs["state"][4:7], obs["state"][:3]]))
                    groups.append(variation)
                noisy = np.clip(action[0] + rng.normal(0.0, noise, action.shape[-1]), -1.0, 1.0)
                obs, _, done, _ = env.step(noisy)
                if done:
                    break
    finally:
        env.close()
    return np.asarray(latents), np.asarray(pixels), np.asarray(targets), np.asarray(groups)


def grouped_ridge_r2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, penalty: float, folds: int = 5) -> np.ndarray:
    """R^2 per column of y of a ridge regression on standardised x, predicted on held-out groups."""
    prediction = np.zeros_like(y)
    fold = groups % folds
    for k in range(folds):
        train, test = fold != k, fold == k
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        xt, xs = (x[train] - mean) / std, (x[test] - mean) / std
        y_mean = y[train].mean(0)
        weights = np.linalg.solve(xt.T @ xt + penalty * np.eye(x.shape[1]), xt.T @ (y[train] - y_mean))
        prediction[test] = xs @ weights + y_mean
    residual = ((prediction - y) ** 2).sum(0)
    total = ((y - y.mean(0)) ** 2).sum(0)
    return 1.0 - residual / np.maximum(total, 1e-12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("agent", help="agent artifact folder of a veorl or dreamerv2 agent")
    parser.add_argument("--variations", type=int, default=50, help="task variations played (default: 50)")
    parser.add_argument("--steps", type=int, default=30, help="steps per variation (default: 30)")
    parser.add_argument("--noise", type=float, default=0.3, help="std of the noise added to actions (default: 0.3)")
    parser.add_argument("--seed", type=int, default=2000, help="episode seeds start here (default: 2000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    if args.variations < 5 or args.steps < 3:
        parser.error("the probe needs --variations >= 5 (five folds) and --steps >= 3")
    latents, pixels, targets, groups = collect(
        args.agent, args.variations, args.steps, args.noise, args.seed, args.threads
    )
    print(f"{len(targets)} states from {args.variations} variations; R^2 on held-out variations")
    print(f"| input | ridge penalty | {' | '.join(TARGETS)} |")
    print(f"|---|---|{'---|' * len(TARGETS)}")
    for name, x in (("latent state", latents), ("16x16 pixels", pixels)):
        for penalty in (1.0, 10.0, 100.0):
            r2 = grouped_ridge_r2(x, targets, groups, penalty)
            print(f"| {name} | {penalty:g} | {' | '.join(f'{v:.2f}' for v in r2)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
