"""Compare algorithms over training seeds on the same data, and write the table and chart into docs/results.md.

    python scripts/compare.py --world-model models/video_world_model --episodes data/target_episodes \
        --clips data/video_clips --algos veorl dreamerv2 --seeds 0 1 2 --results results/compare

Each (algo, seed) runs `components.finetune` (finetune.algo=ALGO, finetune.seed=SEED) and then
`components.evaluate` on the agent, into RESULTS/ALGO/seed-SEED/. The upstream artifacts are reused as
they are (run `dvc repro pretrain` first); every run is evaluated on the same episodes (evaluate.seed is
not varied), so seeds differ only in training. A run whose evaluation finished (eval/metrics.json with
status ok) is skipped on a re-run; an interrupted one resumes from its checkpoints. A run that fails is
reported and left out of the table (never given a made-up score), and the script exits non-zero.

Statistics per algorithm over seeds: mean, sample standard deviation and a 95% confidence interval of
the mean (Student t with n-1 degrees of freedom) of the success rate and of the mean episode return.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make `components` and `veorl` importable from the checkout
    sys.path.insert(0, str(REPO))

from veorl.config import PRESETS  # noqa: E402
from veorl.storage import atomic_path, atomic_write_text, read_json  # noqa: E402

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (beyond: the normal 1.96 is within 2%).
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]
METRICS = (("success_rate", "success rate"), ("mean_return", "return"))


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError("a confidence interval needs at least two seeds")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def seed_statistics(values: list[float]) -> dict[str, float | int | None]:
    """mean, sample std (ddof=1) and the 95% t-interval of the mean; std/interval are None for one seed."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


# ------------------------------------------------------------------------------------------------
# Running one (algo, seed)
# ------------------------------------------------------------------------------------------------


def run_dir(results: Path, algo: str, seed: int) -> Path:
    return results / algo / f"seed-{seed}"


def finished(path: Path) -> dict[str, Any] | None:
    metrics = path / "eval" / "metrics.json"
    if not metrics.is_file():
        return None
    data = read_json(metrics)
    return data if data.get("status") == "ok" else None


def stale_reason(path: Path, args: argparse.Namespace, algo: str, seed: int) -> str | None:
    """Why a finished run no longer matches this invocation (other settings or inputs), or None when it does.

    The agent's provenance holds the resolved config it was trained with and the hashes of the inputs it read.
    """
    from veorl.algo.baselines import Switches, switches
    from veorl.algo.finetune import upstream_hashes
    from veorl.config import load_params

    provenance = path / "agent" / "provenance.json"
    if not provenance.is_file():
        return "its agent has no provenance.json"
    saved = read_json(provenance)
    params = load_params(
        args.params, preset=args.preset, overrides=[f"finetune.algo={algo}", f"finetune.seed={seed}", *args.overrides]
    )
    current = params.section_dict(*[k for k in saved["config"] if k != "preset"])
    if saved["config"] != current:
        keys = sorted(k for k in current if saved["config"].get(k) != current[k])
        return f"it was trained with other settings (sections {keys})"
    sw = switches(params.finetune)
    if sw.use_mmd and args.clips is None:
        sw = Switches(sw.pretrained_encoder, False, sw.use_latent_action, sw.use_intrinsic)
    if saved["upstream"] != upstream_hashes(args.world_model, args.episodes, args.clips, sw):
        return "its inputs (world model, episodes or clips) have changed"
    return None


def _stage_args(args: argparse.Namespace, algo: str, seed: int) -> list[str]:
    common = ["--params", args.params, "--set", f"finetune.algo={algo}", "--set", f"finetune.seed={seed}"]
    if args.preset:
        common += ["--preset", args.preset]
    for override in args.overrides:
        common += ["--set", override]
    return common


def run_one(args: argparse.Namespace, algo: str, seed: int) -> dict[str, Any]:
    """Finetune + evaluate one (algo, seed); returns the evaluation metrics. Raises on failure."""
    path = run_dir(Path(args.results), algo, seed)
    done = finished(path)
    if done is not None:
        reason = stale_reason(path, args, algo, seed)
        if reason is None:
            print(f"[compare] {algo} seed {seed}: finished earlier, skipping ({path})", file=sys.stderr)
            return done
        raise RuntimeError(
            f"{path} holds a finished {algo} run that does not match this comparison: {reason}; "
            f"use another --results folder or delete it"
        )
    path.mkdir(parents=True, exist_ok=True)
    common = _stage_args(args, algo, seed)
    finetune_argv = [
        "--world-model",
        args.world_model,
        "--episodes",
        args.episodes,
        "--out",
        str(path / "agent"),
        "--checkpoints",
        str(path / "checkpoints"),
        "--metrics",
        str(path / "finetune.json"),
        "--curve",
        str(path / "finetune_curve.csv"),
        "--no-progress",
        *common,
    ]
    if args.clips:
        finetune_argv += ["--clips", args.clips]
    evaluate_argv = ["--agent", str(path / "agent"), "--out", str(path / "eval"), "--no-progress", *common]
    if args.snapshot_every:
        finetune_argv += ["--snapshots", str(path / "snapshots")]
    for module, argv in (("finetune", finetune_argv), ("evaluate", evaluate_argv)):
        run_stage(args, module, argv, path / f"{module}.log", f"{algo} seed {seed}")
    if args.snapshot_every:
        learning_curve(args, path, common, f"{algo} seed {seed}")
    result = finished(path)
    if result is None:
        raise RuntimeError(f"{path / 'eval' / 'metrics.json'} missing or not ok after a successful evaluation")
    return result


def run_stage(args: argparse.Namespace, module: str, argv: list[str], log_path: Path, label: str) -> None:
    """One component (`components.MODULE`) in a subprocess with its log in `log_path` (or in this process)."""
    started = time.perf_counter()
    if args.in_process:
        import importlib

        code = importlib.import_module(f"components.{module}").main(argv)
    else:
        with atomic_path(log_path) as tmp, open(tmp, "w") as log_file:
            code = subprocess.run(
                [sys.executable, "-m", f"components.{module}", *argv],
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            ).returncode
    print(f"[compare] {label}: {module} exit {code} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    if code != 0:
        raise RuntimeError(f"{module} failed for {label} (exit {code}; see {log_path})")


def learning_curve(args: argparse.Namespace, path: Path, common: list[str], label: str) -> list[dict[str, float]]:
    """Evaluate the run's agent snapshots (each once; finished ones are reused) and write learning_curve.csv:
    success rate and mean return against the updates of the last phase (policy or bc), the final agent last."""
    rows = []
    for snapshot in sorted((path / "snapshots").glob("updates-*")):
        if not (snapshot / "agent.json").is_file():
            continue  # interrupted while being written; the final curve simply lacks that point
        out = path / "curve" / snapshot.name
        metrics = out / "metrics.json"
        if not (metrics.is_file() and read_json(metrics).get("status") == "ok"):
            argv = ["--agent", str(snapshot), "--out", str(out), "--no-progress", *common]
            run_stage(args, "evaluate", argv, path / "curve" / f"{snapshot.name}.log", f"{label} {snapshot.name}")
        rows.append({"updates": int(snapshot.name.split("-")[1]), **_scores(read_json(metrics))})
    trained = read_json(path / "agent" / "agent.json")["trained_updates"]
    rows.append({"updates": int(list(trained.values())[-1]), **_scores(read_json(path / "eval" / "metrics.json"))})
    lines = ["updates,success_rate,mean_return"]
    lines += [f"{r['updates']},{r['success_rate']},{r['mean_return']}" for r in rows]
    atomic_write_text(path / "learning_curve.csv", "\n".join(lines) + "\n")
    return rows


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(metrics[key]) for key, _ in METRICS}


def read_learning_curve(path: Path) -> list[dict[str, float]] | None:
    file = path / "learning_curve.csv"
    if not file.is_file():
        return None
    header, *rows = file.read_text().strip().splitlines()
    keys = header.split(",")
    return [dict(zip(keys, map(float, row.split(",")))) for row in rows]


def aggregate_curves(curves: dict[str, dict[int, list[dict[str, float]]]]) -> dict[str, list[dict[str, Any]]]:
    """Per algorithm and update count: mean and sample std over the seeds that have that point."""
    out: dict[str, list[dict[str, Any]]] = {}
    for algo, by_seed in curves.items():
        points: dict[int, list[dict[str, float]]] = {}
        for rows in by_seed.values():
            for row in rows:
                points.setdefault(int(row["updates"]), []).append(row)
        out[algo] = []
        for updates in sorted(points):
            entry: dict[str, Any] = {"updates": updates, "seeds": len(points[updates])}
            for key, _ in METRICS:
                stats = seed_statistics([r[key] for r in points[updates]])
                entry[key] = {"mean": stats["mean"], "std": stats["std"]}
            out[algo].append(entry)
    return out


def curve_chart(path: Path, curves: dict[str, list[dict[str, Any]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (key, label) in zip(axes, METRICS):
        for algo, points in curves.items():
            x = [p["updates"] for p in points]
            mean = [p[key]["mean"] for p in points]
            std = [p[key]["std"] or 0.0 for p in points]
            ax.plot(x, mean, marker="o", label=algo)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.set_xlabel("policy (or bc) updates")
        ax.set_ylabel(label)
        if key == "success_rate":
            ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (line: mean over seeds, band: +- 1 std)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Table, chart, document
# ------------------------------------------------------------------------------------------------


def aggregate(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for algo, by_seed in runs.items():
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        table[algo] = {
            "seeds": seeds,
            **{key: seed_statistics([float(by_seed[s][key]) for s in seeds]) for key, _ in METRICS},
            "per_seed": {str(s): {key: by_seed[s][key] for key, _ in METRICS} for s in seeds},
        }
    return table


def _fmt(stats: dict[str, Any], digits: int) -> tuple[str, str, str]:
    mean = f"{stats['mean']:.{digits}f}"
    if stats["std"] is None:
        return mean, "n/a", "n/a"
    return mean, f"{stats['std']:.{digits}f}", f"[{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"


def markdown_table(table: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| algorithm | seeds | success rate: mean | std | 95% CI | return: mean | std | 95% CI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo, row in table.items():
        s_mean, s_std, s_ci = _fmt(row["success_rate"], 3)
        r_mean, r_std, r_ci = _fmt(row["mean_return"], 1)
        lines.append(f"| {algo} | {len(row['seeds'])} | {s_mean} | {s_std} | {s_ci} | {r_mean} | {r_std} | {r_ci} |")
    return "\n".join(lines)


def bar_chart(path: Path, table: dict[str, dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, (key, label) in zip(axes, METRICS):
        means = [table[a][key]["mean"] for a in algos]
        errors = [
            [0.0 if table[a][key]["std"] is None else table[a][key]["mean"] - table[a][key]["ci_low"] for a in algos]
        ] * 2
        ax.bar(
            algos, means, yerr=errors, capsize=6, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(algos)]
        )
        for i, a in enumerate(algos):  # each seed as a dot, so the spread is visible, not only summarised
            values = [float(v[key]) for v in table[a]["per_seed"].values()]
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        ax.set_title(label)
        if key == "success_rate":
            ax.set_ylim(0.0, 1.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_document(
    doc: Path,
    figure: Path,
    table: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    protocol: dict[str, Any],
    failures: list[str],
    curve_figure: Path | None = None,
) -> None:
    relative_figure = os.path.relpath(figure.resolve(), doc.resolve().parent)
    command = "python scripts/compare.py " + " ".join(args.argv)
    lines = [
        "# Results: VeoRL against its baselines",
        "",
        f"Generated by `scripts/compare.py` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        "re-run the command below to reproduce (finished runs are reused).",
        "",
        "```",
        command,
        "```",
        "",
        "## Protocol",
        "",
        f"- task: `{protocol.get('task')}` ({protocol.get('env')}, camera `{protocol.get('camera')}`, "
        f"episodes of {protocol.get('episode_length')} steps); preset `{protocol.get('preset')}`",
        f"- each seed trains one agent (`finetune.seed`); every agent is evaluated on the same "
        f"{protocol.get('episodes')} episodes (seeds {protocol.get('seed')}.."
        f"{protocol.get('seed', 0) + protocol.get('episodes', 1) - 1}; episode i starts from task variation i, so the "
        "starts are distinct), deterministic policy; success = any step flagged success",
        "- upstream artifacts (shared by all runs): "
        + ", ".join(f"`{k}` {v}" for k, v in protocol.get("upstream", {}).items()),
        "- statistics over seeds: mean, sample standard deviation, 95% confidence interval of the mean (Student t)",
        "",
        "## Table",
        "",
        markdown_table(table),
        "",
        "![success rate and return per algorithm (bars: mean over seeds, whiskers: 95% CI, dots: seeds)]"
        f"({relative_figure})",
        "",
        "## Per seed",
        "",
        "| algorithm | seed | success rate | return |",
        "|---|---|---|---|",
    ]
    for algo, row in table.items():
        for seed, values in row["per_seed"].items():
            lines.append(f"| {algo} | {seed} | {values['success_rate']:.3f} | {values['mean_return']:.1f} |")
    if curve_figure is not None:
        relative_curves = os.path.relpath(curve_figure.resolve(), doc.resolve().parent)
        lines += [
            "",
            "## Learning curves",
            "",
            "Each agent was also saved every few policy (or bc) updates and evaluated on the same episodes as the "
            "final one.",
            "",
            f"![success rate and return against updates, mean over seeds with a one-std band]({relative_curves})",
        ]
    if failures:
        lines += ["", "## Runs that failed (not in the table)", ""] + [f"- {f}" for f in failures]
    if args.notes:
        lines += ["", "## Observations", "", Path(args.notes).read_text().strip()]
    lines += [
        "",
        "The numbers above are what these runs measured, whatever they show; small presets train for minutes "
        "on a CPU and are not comparable to the paper's 40k+50k-step GPU runs.",
        "",
    ]
    atomic_write_text(doc, "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/compare.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--world-model", required=True, metavar="DIR", help="video world model artifact (components.pretrain)"
    )
    parser.add_argument("--episodes", required=True, metavar="DIR", help="target episodes (components.collect)")
    parser.add_argument("--clips", default=None, metavar="DIR", help="ingested video clips (MMD term of veorl)")
    parser.add_argument(
        "--algos",
        nargs="+",
        default=["veorl", "dreamerv2"],
        choices=["veorl", "dreamerv2", "bc"],
        help="algorithms to compare (default: %(default)s)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: %(default)s)")
    parser.add_argument(
        "--results", default="results/compare", metavar="DIR", help="run folders (default: %(default)s)"
    )
    parser.add_argument(
        "--doc", default="docs/results.md", metavar="FILE", help="markdown written (default: %(default)s)"
    )
    parser.add_argument(
        "--figure", default="docs/results.png", metavar="FILE", help="bar chart written (default: %(default)s)"
    )
    parser.add_argument("--params", default="params.yaml", help="params.yaml (default: %(default)s)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="override the preset of params.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="parameter override applied to every run (repeatable)",
    )
    parser.add_argument(
        "--notes",
        default=None,
        metavar="FILE",
        help="markdown appended under 'Observations' (what the runs show, written by a person)",
    )
    parser.add_argument(
        "--snapshot-every",
        type=int,
        default=0,
        metavar="N",
        help="learning curves: snapshot each agent every N policy (or bc) updates, evaluate every snapshot and "
        "plot success and return against updates (default: 0, final agents only)",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="run the stages in this process (faster start; tests)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="start no training: tabulate the runs that have finished (e.g. while others still run elsewhere)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.snapshot_every < 0:
        print("error: --snapshot-every must be >= 0", file=sys.stderr)
        return 2
    if args.snapshot_every:
        args.overrides.append(f"finetune.snapshot_every={args.snapshot_every}")
    # The stages run with the repository as their working directory: paths given relative to where this
    # script was started are made absolute first.
    for name in ("world_model", "episodes", "clips", "results", "params", "doc", "figure", "notes"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, str(Path(value).resolve()))
    from veorl.config import ConfigError, load_params

    try:
        params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs: dict[str, dict[int, dict[str, Any]]] = {algo: {} for algo in args.algos}
    failures: list[str] = []
    protocol: dict[str, Any] = {}
    pending: list[str] = []
    for algo in args.algos:
        for seed in args.seeds:
            if args.report_only and finished(run_dir(Path(args.results), algo, seed)) is None:
                pending.append(f"{algo} seed {seed}")
                continue
            try:
                runs[algo][seed] = run_one(args, algo, seed)
            except Exception as exc:  # one failed run must not hide the others; it is reported, not scored
                failures.append(f"{algo} seed {seed}: {exc}")
                print(f"[compare] FAILED {algo} seed {seed}: {exc}", file=sys.stderr)
                continue
            if not protocol:
                protocol = {**runs[algo][seed]["protocol"], "preset": params.preset, "upstream": {}}
            provenance = run_dir(Path(args.results), algo, seed) / "agent" / "provenance.json"
            if provenance.is_file():  # the union: baselines read only some of the upstream artifacts
                protocol["upstream"].update({k: v[:12] for k, v in read_json(provenance)["upstream"].items()})
    if pending:
        print(f"[compare] not finished, left out: {', '.join(pending)}", file=sys.stderr)
    runs = {algo: by_seed for algo, by_seed in runs.items() if by_seed}
    table = aggregate(runs)
    if not table:
        print("error: no run finished; nothing to report", file=sys.stderr)
        return 1
    results = Path(args.results)
    summary = {"protocol": protocol, "table": table, "failures": failures}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    figure, doc = Path(args.figure), Path(args.doc)
    bar_chart(figure, table, title=f"{protocol.get('task')} ({params.preset} preset), {len(args.seeds)} seeds")
    curves = {
        algo: {seed: c for seed in by_seed if (c := read_learning_curve(run_dir(results, algo, seed)))}
        for algo, by_seed in runs.items()
    }
    curves = aggregate_curves({algo: by_seed for algo, by_seed in curves.items() if by_seed})
    curve_figure = None
    if any(len(points) > 1 for points in curves.values()):
        curve_figure = figure.with_name(figure.stem + "_curves.png")
        curve_chart(curve_figure, curves, title=f"{protocol.get('task')} ({params.preset} preset)")
        summary["curves"] = curves
        atomic_write_text(results / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_document(doc, figure, table, args, protocol, failures, curve_figure)
    print(markdown_table(table))
    print(f"written: {doc}, {figure}, {results / 'summary.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
