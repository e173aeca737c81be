"""How well each end-of-stage diagnostic of finished runs ranks their evaluation success (a script, not a test).

    python scripts/diagnostics_vs_success.py results/laptop-drawer-open/compare/veorl \
        results/laptop-drawer-open/ablations/no_intrinsic/veorl ...

Each argument is a folder of runs (`seed-*/`, as scripts/compare.py writes them). For every finished run it reads
the evaluation's success rate (eval/metrics.json), the reward check along the agent's own evaluation rollouts
(eval/diagnostics.json: predicted over simulator return, per-step correlation) and the fine-tuning diagnostics
(agent/diagnostics.json: imagined return of data vs shuffled actions, corner vs data, action spread, share at the
bounds) and, where scripts/heldout_reward.py wrote it, the reward check on held-out target episodes
(heldout/diagnostics.json); it prints one row per run and, over all runs, the Spearman rank correlation of each
diagnostic with success (ties get their mean rank). The diagnostics in eval/ need the simulator; those in agent/
and heldout/ do not. `--evaluation eval-variations` (or another evaluation's folder) reads success and the
rollout check from that evaluation instead.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLUMNS = (
    ("eval", ("reward", "predicted_over_simulator"), "predicted/simulator reward"),
    ("eval", ("reward", "correlation"), "reward correlation"),
    ("agent", ("policy", "data_over_shuffled"), "data/shuffled imagined return"),
    ("agent", ("policy", "corner_over_data"), "corner/data imagined return"),
    ("agent", ("policy", "action_spread"), "action spread"),
    ("agent", ("policy", "share_at_bounds"), "share at bounds"),
    ("agent", ("policy", "top_action_share"), "top action share"),
    ("heldout", ("reward", "predicted_over_data"), "held-out predicted/recorded reward"),
    ("heldout", ("reward", "abs_error"), "held-out reward abs error"),
)


def mean_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation; nan when either side is constant (no ranking to compare)."""
    rx, ry = mean_ranks(x), mean_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def read_run(run: Path, evaluation: str = "eval") -> dict[str, float] | None:
    """Success and the reward check along the rollouts from the `evaluation` folder (eval, or another evaluation
    such as eval-variations), and the diagnostics of agent/ and heldout/."""
    file = run / evaluation / "metrics.json"
    metrics = json.loads(file.read_text()) if file.is_file() else {}
    if metrics.get("status") != "ok":
        return None
    row = {"success": float(metrics["success_rate"])}
    for folder, path, label in COLUMNS:
        file = run / (evaluation if folder == "eval" else folder) / "diagnostics.json"
        value = json.loads(file.read_text()) if file.is_file() else {}
        for key in path:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        if isinstance(value, (int, float)):
            row[label] = float(value)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="folders holding seed-*/ runs")
    parser.add_argument(
        "--evaluation",
        default="eval",
        help="the evaluation folder success is read from: eval (default), or e.g. eval-variations, eval-episodes50",
    )
    args = parser.parse_args(argv)
    rows: list[tuple[str, dict[str, float]]] = []
    for folder in args.runs:
        for run in sorted(Path(folder).glob("seed-*")):
            row = read_run(run, args.evaluation)
            if row is not None:
                rows.append((str(run), row))
    if len(rows) < 3:
        parser.error(f"{len(rows)} finished runs: a rank correlation needs at least 3")
    labels = [label for _, _, label in COLUMNS]
    print("| run | success | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name, row in rows:
        cells = [f"{row[label]:.2f}" if label in row else "-" for label in labels]
        print(f"| {name} | {row['success']:.2f} | " + " | ".join(cells) + " |")
    print(f"\nSpearman rank correlation with success over {len(rows)} runs:")
    for label in labels:
        pairs = [(row[label], row["success"]) for _, row in rows if label in row]
        if len(pairs) >= 3:
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            if len(set(xs)) == 1 or len(set(ys)) == 1:
                side = "the diagnostic" if len(set(xs)) == 1 else "success"
                print(f"  {label}: undefined, {side} is constant over these runs ({len(pairs)} runs)")
                continue
            rho = spearman(xs, ys)
            print(f"  {label}: {rho:+.2f} ({len(pairs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
