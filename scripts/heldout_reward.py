"""How well each trained agent's world model predicts the reward on held-out target episodes (a script, not a test).

    python scripts/heldout_reward.py --episodes HELDOUT results/laptop-highway/compare/veorl \
        results/laptop-highway/compare/dreamerv2

HELDOUT is a dataset collected like the training data but from other seeds, e.g.

    python -m components.collect --out HELDOUT --params results/laptop-highway/params.yaml \
        --set collect.seed=5000 --set collect.episodes=20

For every finished model-based run (`seed-*/agent` with its Trunk Net's reward head; bc agents have none) it filters
each held-out episode through the agent's encoder and Trunk Net with the episode's own actions, as acting does, and
compares the reward head's prediction on each state with the reward the data recorded for it. It writes
RUN/heldout/diagnostics.json (`reward.predicted_over_data`: predicted over recorded reward summed over the steps,
`reward.correlation`: per-step correlation over all steps, `reward.abs_error`: mean absolute error per step, in the
data's reward units) and prints one row per run; a run that already has that file for the same held-out episodes
is not replayed again. `scripts/diagnostics_vs_success.py` then ranks them against success. Nothing here needs
the simulator: these are candidates for choosing among Trunk Nets offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parent)]

from diagnostics_vs_success import read_run  # noqa: E402

from veorl.agent import Agent  # noqa: E402
from veorl.data.episodes import episode_files, load_episode  # noqa: E402
from veorl.storage import atomic_write_text  # noqa: E402


def replay(agent: Agent, episode: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, recorded) reward of every step after the first: the state filtered from the episode's frame and
    the action that led to it, and the reward that came with that frame."""
    state = agent.initial_state(1)
    predicted, recorded = [], []
    for t in range(len(episode["image"])):
        state = {**state, "prev_action": np.asarray(episode["action"][t], np.float32)[None]}
        _, state = agent.act(np.asarray(episode["image"][t], np.uint8)[None], state)
        if t > 0:
            predicted.append(float(agent.predicted_reward(state)[0]))
            recorded.append(float(episode["reward"][t]))
    return np.asarray(predicted), np.asarray(recorded)


def score(agent: Agent, episodes: list[dict[str, np.ndarray]]) -> dict[str, float]:
    pairs = [replay(agent, episode) for episode in episodes]
    predicted = np.concatenate([p for p, _ in pairs])
    recorded = np.concatenate([r for _, r in pairs])
    paid = float(recorded.sum())
    varies = predicted.std() > 0 and recorded.std() > 0
    return {
        "predicted_over_data": float(predicted.sum()) / paid if abs(paid) > 1e-8 else float("nan"),
        "correlation": float(np.corrcoef(predicted, recorded)[0, 1]) if varies else float("nan"),
        "abs_error": float(np.abs(predicted - recorded).mean()),
        "episodes": len(episodes),
        "steps": int(len(recorded)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", required=True, type=Path, help="a held-out dataset (components.collect --out)")
    parser.add_argument("folders", nargs="+", type=Path, help="folders of seed-*/ runs (scripts/compare.py)")
    parser.add_argument(
        "--evaluation",
        default=None,
        help="also say, per folder, what choosing the seed with the least optimistic held-out reward (the lowest "
        "predicted/recorded) would have scored in this evaluation folder (eval, eval-variations, ...), against the "
        "mean and the best seed",
    )
    args = parser.parse_args(argv)
    files = episode_files(args.episodes)
    if not files:
        parser.error(f"no episode files (*.npz) under {args.episodes}")
    episodes = [load_episode(path) for path in files]
    steps = sum(len(episode["reward"]) - 1 for episode in episodes)
    print(f"{len(episodes)} held-out episodes from {args.episodes}\n")
    print("| run | predicted / recorded reward | correlation | mean abs error |")
    print("|---|---|---|---|")
    choices: list[str] = []
    picks: list[tuple[float, float]] = []  # (chosen, mean over seeds) per folder
    for folder in args.folders:
        scored: list[tuple[float, float]] = []  # (held-out predicted/recorded, success) per run
        for run in sorted(folder.glob("seed-*")):
            agent_dir = run / "agent"
            if not (agent_dir / "agent.json").is_file():
                continue
            reward, note = reused(run, args.episodes, len(episodes), steps), " (reused)"
            if reward is None:
                agent = Agent.load(str(agent_dir))
                if agent.reward_head is None:
                    print(f"| {run} | - | - | - | (no reward head: {agent.algo})")
                    continue
                reward, note = score(agent, episodes), ""
                out = {"reward": reward, "episodes_dir": str(args.episodes)}
                (run / "heldout").mkdir(exist_ok=True)
                atomic_write_text(run / "heldout" / "diagnostics.json", json.dumps(out, indent=2) + "\n")
            print(
                f"| {run} | {reward['predicted_over_data']:.2f} | {reward['correlation']:.2f} | "
                f"{reward['abs_error']:.3f} |{note}",
                flush=True,
            )
            success = read_success(run, args.evaluation) if args.evaluation else None
            if success is not None:
                scored.append((reward["predicted_over_data"], success))
        if len(scored) >= 2:
            line, chosen, mean = describe_choice(folder, scored)
            choices.append(line)
            picks.append((chosen, mean))
    if choices:
        print(f"\nChoosing the seed with the lowest held-out predicted/recorded reward ({args.evaluation}):")
        print("\n".join(choices))
    if len(picks) > 1:
        above = sum(chosen > mean for chosen, mean in picks)
        below = sum(chosen < mean for chosen, mean in picks)
        print(
            f"Over {len(picks)} folders: chosen {np.mean([c for c, _ in picks]):.3f} against the mean over seeds "
            f"{np.mean([m for _, m in picks]):.3f}; above the mean in {above}, below in {below}"
        )
    return 0


def reused(run: Path, episodes_dir: Path, episodes: int, steps: int) -> dict[str, float] | None:
    """The run's earlier result on the same held-out episodes (same folder, episode and step counts), if any."""
    file = run / "heldout" / "diagnostics.json"
    earlier = json.loads(file.read_text()) if file.is_file() else {}
    reward = earlier.get("reward", {})
    same = earlier.get("episodes_dir") == str(episodes_dir) and reward.get("episodes") == episodes
    return reward if same and reward.get("steps") == steps else None


def read_success(run: Path, evaluation: str) -> float | None:
    row = read_run(run, evaluation)  # the success rate of a finished evaluation (status ok), as ranked there
    return row["success"] if row is not None else None


def describe_choice(folder: Path, scored: list[tuple[float, float]]) -> tuple[str, float, float]:
    """The success of the least optimistic run (ties: their mean), against the mean and the best over runs."""
    lowest = min(ratio for ratio, _ in scored)
    chosen = float(np.mean([success for ratio, success in scored if ratio == lowest]))
    ties = sum(ratio == lowest for ratio, _ in scored)
    successes = [success for _, success in scored]
    mean = float(np.mean(successes))
    line = (
        f"  {folder}: chosen {chosen:.2f} (ratio {lowest:.2f}; {ties} run(s)), "
        f"mean over {len(scored)} runs {mean:.2f}, best {max(successes):.2f}"
    )
    return line, chosen, mean


if __name__ == "__main__":
    raise SystemExit(main())
