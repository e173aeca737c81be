"""Which task variations the target data starts from, and where evaluated agents fail (a script, not a test).

    python scripts/data_variations.py --episodes results/laptop-handle-press/data/target_episodes \
        --runs results/laptop-handle-press/compare/veorl results/laptop-handle-press/compare/bc \
        --evaluation eval-variations

Meta-World tasks have 50 variations (goal and object positions). Collection lets each episode's seed pick one, so
50 episodes start from fewer than 50 distinct variations; evaluation starts episode i from variation i. The
variation of each data episode is read from the dataset's card.json (recorded since collection did so) or, for
older data, recomputed from the episode's seed with the simulator's own rule. With --runs (folders of `seed-*/` runs, as
scripts/compare.py writes them) it lists every variation some agent failed, with the data episodes that started
there, and each folder's failure rate on variations the data covers and on those it does not.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def data_variations(episodes: Path) -> tuple[dict[int, list[bool]], int]:
    """{variation: [success of each data episode that started there]} and the task's number of variations."""
    from veorl.envs import make_env

    card = json.loads((episodes / "card.json").read_text())
    if card.get("env") != "metaworld":
        raise SystemExit(
            f"{episodes}: env {card.get('env')!r} draws every start from the seed; only Meta-World "
            "tasks have a finite set of variations"
        )
    rows = card.get("per_episode", [])
    if not rows or any(row.get("seed") is None for row in rows):
        raise SystemExit(f"{episodes}: card.json records no episode seeds (an imported dataset?)")
    env = make_env(card["env"], card["task"], card["camera"], card["size"], card["episode_length"], card["seed"])
    try:
        by_variation: dict[int, list[bool]] = {}
        for row in rows:
            variation = row.get("variation")
            if variation is None:
                variation = env.start_variation(row["seed"])
            by_variation.setdefault(int(variation), []).append(bool(row["success"]))
        return by_variation, int(env.variations)
    finally:
        env.close()


def run_failures(folder: Path, evaluation: str, count: int) -> tuple[int, dict[int, int], set[int]]:
    """(finished runs, {variation: runs that failed it}, variations evaluated) over a folder's seed-*/ runs."""
    runs, failures, seen = 0, {}, set()
    for run in sorted(folder.glob("seed-*")):
        table = run / evaluation / "episodes.csv"
        if not table.is_file():
            continue
        runs += 1
        with table.open() as f:
            for row in csv.DictReader(f):
                variation = int(row["episode"]) % count
                seen.add(variation)
                if not int(row["success"]):
                    failures[variation] = failures.get(variation, 0) + 1
    return runs, failures, seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=Path, required=True, help="a collected target_episodes folder")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="folders holding seed-*/ runs")
    parser.add_argument("--evaluation", default="eval", help="evaluation folder in each run (eval, eval-variations)")
    args = parser.parse_args(argv)

    data, count = data_variations(args.episodes)
    missing = sorted(set(range(count)) - set(data))
    episodes = sum(len(v) for v in data.values())
    print(f"{episodes} data episodes start from {len(data)} of {count} variations; never from: {missing}")
    if not args.runs:
        return 0

    folders = [(str(folder), *run_failures(folder, args.evaluation, count)) for folder in args.runs]
    failed = sorted({v for _, _, failures, _ in folders for v in failures})
    print(
        "\n| variation | data episodes (successes) | "
        + " | ".join(f"{name}: runs failed" for name, *_ in folders)
        + " |"
    )
    print("|---|---|" + "---|" * len(folders))
    for v in failed:
        cell = f"{len(data[v])} ({sum(data[v])})" if v in data else "none"
        print(
            f"| {v} | {cell} | "
            + " | ".join(f"{failures.get(v, 0)} of {runs}" for _, runs, failures, _ in folders)
            + " |"
        )
    print("\nfailure rate (failed episodes / episodes) on variations the data covers | does not cover:")
    for name, runs, failures, seen in folders:
        parts = []
        for label, chosen in (("covered", seen & set(data)), ("not covered", seen - set(data))):
            total = runs * len(chosen)
            lost = sum(failures.get(v, 0) for v in chosen)
            parts.append(f"{label} {lost}/{total} = {lost / total:.2f}" if total else f"{label}: none evaluated")
        print(f"  {name} ({runs} runs): " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
