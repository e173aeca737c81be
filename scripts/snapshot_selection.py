"""Could fine-tuning's own logs choose the agent snapshot without the simulator? (a script, not a test)

    python scripts/snapshot_selection.py results/laptop-highway/compare/veorl results/laptop-highway/compare/dreamerv2

Each argument is a folder of runs (`seed-*/`) that scripts/compare.py trained with `--snapshot-every`: each run has
a learning curve (learning_curve.csv: the simulator's success rate of every snapshot and of the final agent) and
fine-tuning's training log (finetune_curve.csv). For every policy-phase column of the log that could stand for "this
policy is good" (imagined return or reward, value, ensemble uncertainty, the actor's behaviour term, critic loss,
entropy, each with the direction that should mean better), the script averages the logged values over the `--window`
updates before each snapshot, picks the snapshot the criterion ranks best (ties: the later one), and looks up that
snapshot's success. It prints, per folder and over all of them, the mean success of: the last agent (what training
keeps today), the best snapshot (an oracle: choosing it needs the simulator), the mean over snapshots, and each
criterion's pick; and in how many runs each pick does better and worse than the last agent. A criterion worth using
would beat "last" here; runs without a policy phase (bc) are left out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

# (column of finetune_curve.csv, +1 when larger should mean a better policy, -1 when smaller)
CRITERIA: tuple[tuple[str, int], ...] = (
    ("imagined_return", 1),
    ("imagined_reward", 1),
    ("value", 1),
    ("uncertainty", -1),
    ("actor_bc_loss", -1),
    ("critic_loss", -1),
    ("entropy", 1),
)


def read_curve(run: Path) -> dict[int, float]:
    """Success rate by policy updates, from the run's learning_curve.csv."""
    with (run / "learning_curve.csv").open(newline="") as f:
        return {int(row["updates"]): float(row["success_rate"]) for row in csv.DictReader(f)}


def read_policy_log(run: Path) -> list[dict[str, str]]:
    with (run / "finetune_curve.csv").open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("phase") == "policy"]


def window_mean(rows: list[dict[str, str]], column: str, step: int, window: int) -> float | None:
    values = [
        float(row[column])
        for row in rows
        if step - window < int(row["phase_step"]) <= step and row.get(column) not in (None, "")
    ]
    return statistics.fmean(values) if values else None


def pick(curve: dict[int, float], rows: list[dict[str, str]], column: str, sign: int, window: int) -> int | None:
    """The snapshot (updates) the criterion ranks best; None when the log lacks the column near a snapshot."""
    scores = {step: window_mean(rows, column, step, window) for step in curve}
    if any(score is None for score in scores.values()):
        return None
    return max(sorted(curve, reverse=True), key=lambda step: sign * scores[step])  # ties: the later snapshot


def score_run(run: Path, window: int) -> dict[str, float] | None:
    """Success of the last agent, the best and mean snapshot, and each criterion's pick (None: not usable)."""
    if not (run / "learning_curve.csv").is_file() or not (run / "finetune_curve.csv").is_file():
        return None
    curve, rows = read_curve(run), read_policy_log(run)
    if len(curve) < 2 or not rows:
        return None
    out = {"last": curve[max(curve)], "best": max(curve.values()), "mean": statistics.fmean(curve.values())}
    for column, sign in CRITERIA:
        chosen = pick(curve, rows, column, sign, window)
        if chosen is not None:
            out[column] = curve[chosen]
    return out


def summarise(label: str, scores: list[dict[str, float]]) -> list[str]:
    lines = [f"{label}: {len(scores)} runs"]
    for key in ("last", "best", "mean"):
        note = {"best": " (oracle: needs the simulator)", "mean": " (mean over snapshots)"}.get(key, "")
        lines.append(f"  {key}{note}: {statistics.fmean(s[key] for s in scores):.3f}")
    for column, sign in CRITERIA:
        usable = [s for s in scores if column in s]
        if not usable:
            continue
        mean = statistics.fmean(s[column] for s in usable)
        better = sum(s[column] > s["last"] for s in usable)
        worse = sum(s[column] < s["last"] for s in usable)
        direction = "highest" if sign > 0 else "lowest"
        lines.append(
            f"  {direction} {column}: {mean:.3f} (last {statistics.fmean(s['last'] for s in usable):.3f}; "
            f"better than last in {better}, worse in {worse} of {len(usable)} runs)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders of seed-*/ runs (scripts/compare.py)")
    parser.add_argument("--window", type=int, default=100, help="policy updates averaged before each snapshot")
    args = parser.parse_args(argv)
    everything: list[dict[str, float]] = []
    for folder in args.folders:
        scores = [s for run in sorted(folder.glob("seed-*")) if (s := score_run(run, args.window))]
        if not scores:
            print(f"{folder}: no run with a learning curve and a policy phase")
            continue
        print("\n".join(summarise(str(folder), scores)))
        everything += scores
    if len(args.folders) > 1 and everything:
        print("\n".join(summarise("all folders", everything)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
