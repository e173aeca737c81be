r"""Compare algorithms over training seeds on the same data; table and chart into a section of docs/results.md.

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

The document holds one section per invocation (one per target task, one per ablation table), between
<!-- compare:KEY --> and <!-- /compare:KEY --> (--section KEY, default: the task). Only that section is
replaced (or appended); the rest of the document is kept byte for byte. A missing document is created.

Ablation table: --report-only --ablation NAME=DIR [--ablation NAME=DIR@ALGO ...] makes one row per NAME
from the finished runs in DIR/ALGO/seed-*/ (ALGO: each of --algos unless given), e.g.

    python scripts/compare.py --report-only --algos veorl --section drawer-open-ablations \
        --ablation "veorl (full)=results/compare" --ablation "no intrinsic reward=results/ablations/no_intrinsic" \
        --ablation "no video (= dreamerv2)=results/compare@dreamerv2" --figure docs/results_ablations.png

Each row has its own overrides, so its runs are not checked against this command's settings (the script
prints which runs it read; their settings are in each run's agent/provenance.json).

Another evaluation of the same agents: --evaluation NAME writes and reads RUN/eval-NAME/ and RUN/curve-NAME/
instead of RUN/eval/ and RUN/curve/, and a run whose agent is complete is not fine-tuned again, e.g. sampled
actions next to the deterministic evaluation:

    python scripts/compare.py ... --evaluation sampled --set evaluate.policy=sample --section TASK-sampled
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make `components` and `veorl` importable from the checkout
    sys.path.insert(0, str(REPO))

from veorl.checkpoint import legacy_value, without_legacy  # noqa: E402
from veorl.config import PRESETS  # noqa: E402
from veorl.storage import atomic_path, atomic_write_text, read_json  # noqa: E402
from veorl.trees import flatten  # noqa: E402

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
EXTRA_METRICS = (("collision_rate", "collision rate"),)
"""Columns a domain's evaluation adds (driving: collisions); tabled when every run of a row reports them."""
ALGOS = ("veorl", "dreamerv2", "bc")


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


# Settings that only say what is recorded about a run (snapshots for learning curves), not how its agent trains.
_BOOKKEEPING = frozenset({"finetune.snapshot_every"})

# The folders of a run that one evaluation writes (--evaluation NAME: eval-NAME, curve-NAME); set once by main.
EVALUATION = {
    "eval": "eval",
    "curve": "curve",
    "csv": "learning_curve.csv",
    "log": "evaluate.log",
    "summary": "summary.json",
}


def set_evaluation(name: str | None) -> None:
    """Point every reader and writer of this script at the folders of evaluation `name` (None: the default)."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"--evaluation {name!r}: use letters, digits, '.', '_' and '-' only")
    suffix = f"-{name}" if name else ""
    EVALUATION.update(
        eval=f"eval{suffix}",
        curve=f"curve{suffix}",
        csv=f"learning_curve{suffix}.csv",
        log=f"evaluate{suffix}.log",
        summary=f"summary{suffix}.json",  # beside the default evaluation's summary, never over it
    )


def agent_complete(path: Path) -> bool:
    """The run's fine-tuning finished: its agent (agent.json: the completion marker) and finetune.json exist."""
    return (path / "agent" / "agent.json").is_file() and (path / "finetune.json").is_file()


def finished(path: Path) -> dict[str, Any] | None:
    metrics = path / EVALUATION["eval"] / "metrics.json"
    if not metrics.is_file():
        return None
    data = read_json(metrics)
    return data if data.get("status") == "ok" else None


def stale_reason(path: Path, args: argparse.Namespace, algo: str, seed: int) -> str | None:
    """Why a finished run no longer matches this invocation (other settings or inputs), or None when it does.

    The agent's provenance holds the resolved config it was trained with and the hashes of the inputs it read.
    """
    from veorl.algo.baselines import Switches, switches, unread_settings
    from veorl.algo.finetune import upstream_hashes
    from veorl.config import load_params

    provenance = path / "agent" / "provenance.json"
    if not provenance.is_file():
        return "its agent has no provenance.json"
    saved = read_json(provenance)
    params = load_params(
        args.params, preset=args.preset, overrides=[f"finetune.algo={algo}", f"finetune.seed={seed}", *args.overrides]
    )
    current = params.section_dict(*[k for k in saved["config"] if k not in ("preset", "domain")])
    # a setting introduced after the run was made counts as what the code did before it existed
    old, new = without_legacy(flatten(saved["config"])), without_legacy(flatten(current))
    # bookkeeping is not training: a run made with other snapshots is the same agent, and its curve has the points
    # its snapshots give; nor is a setting the algorithm never reads
    ignored = _BOOKKEEPING | unread_settings(algo)
    differ = sorted(
        k for k in set(old) | set(new) if k not in ignored and old.get(k, "<absent>") != new.get(k, "<absent>")
    )
    if differ:
        return f"it was trained with other settings ({', '.join(differ[:6])}{', ...' if len(differ) > 6 else ''})"
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
    evaluate_argv = ["--agent", str(path / "agent"), "--out", str(path / EVALUATION["eval"]), "--no-progress", *common]
    if args.snapshot_every:
        finetune_argv += ["--snapshots", str(path / "snapshots")]
    stages = [("finetune", finetune_argv), ("evaluate", evaluate_argv)]
    if args.evaluation and agent_complete(path):
        # another evaluation of a trained agent: only if it was trained with this comparison's settings
        reason = stale_reason(path, args, algo, seed)
        if reason is not None:
            raise RuntimeError(f"{path} holds a {algo} agent that does not match this comparison: {reason}")
        stages = stages[1:]
    for module, argv in stages:
        log_name = "finetune.log" if module == "finetune" else EVALUATION["log"]
        run_stage(args, module, argv, path / log_name, f"{algo} seed {seed}")
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
    for snapshot in sorted((path / "snapshots").glob("updates-*")):
        if not (snapshot / "agent.json").is_file():
            continue  # interrupted while being written; the final curve simply lacks that point
        out = path / EVALUATION["curve"] / snapshot.name
        if not _evaluated(out):
            argv = ["--agent", str(snapshot), "--out", str(out), "--no-progress", *common]
            log_path = path / EVALUATION["curve"] / f"{snapshot.name}.log"
            run_stage(args, "evaluate", argv, log_path, f"{label} {snapshot.name}")
    rows = curve_rows(path)
    lines = ["updates,success_rate,mean_return"]
    lines += [f"{r['updates']},{r['success_rate']},{r['mean_return']}" for r in rows]
    atomic_write_text(path / EVALUATION["csv"], "\n".join(lines) + "\n")
    return rows


def _evaluated(out: Path) -> bool:
    return (out / "metrics.json").is_file() and read_json(out / "metrics.json").get("status") == "ok"


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(metrics[key]) for key, _ in METRICS}


def final_updates(trained: dict[str, int]) -> int:
    """Updates of the phase the curve's x axis counts: policy for the model-based agents, bc for bc."""
    for phase in ("policy", "bc"):
        if phase in trained:
            return int(trained[phase])
    raise ValueError(f"no policy or bc phase in trained_updates {trained}")


def curve_rows(path: Path) -> list[dict[str, float]]:
    """The learning curve of a finished run from what was evaluated: its snapshots, then the final agent."""
    rows = [
        {"updates": int(out.name.split("-")[1]), **_scores(read_json(out / "metrics.json"))}
        for out in sorted((path / EVALUATION["curve"]).glob("updates-*"))
        if _evaluated(out)
    ]
    trained = read_json(path / "agent" / "agent.json")["trained_updates"]
    rows.append({"updates": final_updates(trained), **_scores(read_json(path / EVALUATION["eval"] / "metrics.json"))})
    return rows


def read_learning_curve(path: Path) -> list[dict[str, float]] | None:
    """A finished run's learning curve (None without snapshots): rebuilt from its evaluations, no new one started."""
    if not (path / EVALUATION["curve"]).is_dir():
        return None
    return curve_rows(path)


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
        keys = [key for key, _ in METRICS]
        keys += [key for key, _ in EXTRA_METRICS if all(key in by_seed[s] for s in seeds)]
        table[algo] = {
            "seeds": seeds,
            **{key: seed_statistics([float(by_seed[s][key]) for s in seeds]) for key in keys},
            "per_seed": {str(s): {key: by_seed[s][key] for key in keys} for s in seeds},
        }
    return table


def extra_columns(table: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The EXTRA_METRICS every row of the table has."""
    return [(key, label) for key, label in EXTRA_METRICS if table and all(key in row for row in table.values())]


def _fmt(stats: dict[str, Any], digits: int) -> tuple[str, str, str]:
    mean = f"{stats['mean']:.{digits}f}"
    if stats["std"] is None:
        return mean, "n/a", "n/a"
    return mean, f"{stats['std']:.{digits}f}", f"[{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"


def markdown_table(table: dict[str, dict[str, Any]]) -> str:
    extras = extra_columns(table)
    lines = [
        "| algorithm | seeds | success rate: mean | std | 95% CI | return: mean | std | 95% CI |"
        + "".join(f" {label}: mean | std | 95% CI |" for _, label in extras),
        "|---|---|---|---|---|---|---|---|" + "---|---|---|" * len(extras),
    ]
    for algo, row in table.items():
        cells = [*_fmt(row["success_rate"], 3), *_fmt(row["mean_return"], 1)]
        for key, _ in extras:
            cells += _fmt(row[key], 3)
        lines.append(f"| {algo} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_label(table: dict[str, dict[str, Any]]) -> str:
    """'3 seeds', or '1-3 seeds' when the rows have different numbers of finished seeds."""
    counts = sorted({len(row["seeds"]) for row in table.values()})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{n} seed" + ("" if n == "1" else "s")


def bar_chart(path: Path, table: dict[str, dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(table)
    palette = plt.get_cmap("tab10").colors
    long_labels = len(labels) > 3 or any(len(label) > 10 for label in labels)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2 if long_labels else 3.5))
    for ax, (key, label) in zip(axes, METRICS):
        means = [table[a][key]["mean"] for a in labels]
        errors = [
            [0.0 if table[a][key]["std"] is None else table[a][key]["mean"] - table[a][key]["ci_low"] for a in labels]
        ] * 2
        ax.bar(labels, means, yerr=errors, capsize=6, color=[palette[i % len(palette)] for i in range(len(labels))])
        for i, a in enumerate(labels):  # each seed as a dot, so the spread is visible, not only summarised
            values = [float(v[key]) for v in table[a]["per_seed"].values()]
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        ax.set_title(label)
        if long_labels:
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
        if key == "success_rate":
            ax.set_ylim(0.0, 1.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


DOC_TITLE = "# Results: VeoRL against its baselines"
DOC_INTRO = (
    "Each section below is written by one `scripts/compare.py` invocation (one per target task, one per ablation "
    "table; they may run in different sessions) between its HTML comment markers `compare:KEY` and `/compare:KEY`. "
    "Re-running an invocation replaces only its own section; text outside the markers is kept as it is."
)
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def section_markers(key: str) -> tuple[str, str]:
    if not _KEY.fullmatch(key):
        raise ValueError(f"section key {key!r}: use letters, digits, '-', '_' or '.'")
    return f"<!-- compare:{key} -->", f"<!-- /compare:{key} -->"


def replace_section(text: str | None, key: str, body: str) -> str:
    """The document `text` (None: no document yet) with section `key` set to `body`.

    An existing section is replaced in place, a missing one is appended at the end; all other bytes are kept.
    A new document starts with the title and the intro paragraph.
    """
    start, end = section_markers(key)
    block = f"{start}\n{body.strip()}\n{end}"
    if text is None:
        return f"{DOC_TITLE}\n\n{DOC_INTRO}\n\n{block}\n"
    i = text.find(start)
    if i < 0:
        if end in text:
            raise ValueError(f"the document has the end marker of section {key!r} but not its start: {start}")
        if not text.strip():
            return text + block + "\n"
        separator = "" if text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
        return text + separator + block + "\n"
    j = text.find(end, i)
    if j < 0:
        raise ValueError(f"the document has the start marker of section {key!r} but not its end: {end}")
    if start in text[i + len(start) :] or end in text[j + len(end) :]:
        raise ValueError(f"the document has section {key!r} more than once")
    return text[:i] + block + text[j + len(end) :]


def write_section(doc: Path, key: str, body: str) -> None:
    atomic_write_text(doc, replace_section(doc.read_text() if doc.exists() else None, key, body))


def section_markdown(
    doc: Path,
    figure: Path,
    table: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    protocol: dict[str, Any],
    failures: list[str],
    title: str,
    curve_figure: Path | None = None,
    sources: list[dict[str, Any]] | None = None,
) -> str:
    """One section of the results document (without its markers): heading, command, protocol, table, chart,
    per-seed table, learning curves, failures, observations. `sources`: the rows of an ablation table."""
    relative_figure = os.path.relpath(figure.resolve(), doc.resolve().parent)
    command = "python scripts/compare.py " + " ".join(shlex.quote(a) for a in args.argv)
    first_seed = protocol.get("seed", 0)
    lines = [f"## {title}", ""]
    if args.intro:
        lines += [args.intro.strip(), ""]
    lines += [
        f"Generated by `scripts/compare.py` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        "re-run the command below to reproduce (finished runs are reused).",
        "",
        "```",
        command,
        "```",
        "",
        "### Protocol",
        "",
        f"- task: `{protocol.get('task')}` ({protocol.get('env')}, camera `{protocol.get('camera')}`, "
        f"episodes of {protocol.get('episode_length')} steps); preset `{protocol.get('preset')}`",
        f"- each seed trains one agent (`finetune.seed`); every agent is evaluated on the same "
        f"{protocol.get('episodes')} episodes (seeds {first_seed}.."
        f"{first_seed + protocol.get('episodes', 1) - 1}; episode i starts from task variation i, so the "
        "starts are distinct), "
        + (
            "actions sampled from each agent's policy (the stream restarted per episode at the episode's seed)"
            if protocol.get("policy") == "sample"
            else "deterministic policy"
        )
        + "; success = any step flagged success",
        "- upstream artifacts the runs read (content hashes; 'a / b': runs read different versions): "
        + (", ".join(f"`{k}` {v}" for k, v in protocol.get("upstream", {}).items()) or "none recorded"),
        "- statistics over seeds: mean, sample standard deviation, 95% confidence interval of the mean (Student t)",
    ]
    if sources is not None:
        lines += [
            "",
            "### Rows",
            "",
            "Each row is tabulated from the finished runs (evaluation status ok) in its folder, over whatever seeds "
            "finished. Their settings were not checked against this command: each row's settings (the resolved "
            "config it was trained with, and the hashes of the inputs it read) are in its runs' "
            "`agent/provenance.json`.",
            "",
        ]
        for source in sources:
            line = f"- {source['label']}: `{source['algo']}` runs in `{source['folder']}`"
            differs = source.get("differs")
            if not source["seeds"]:
                line += ": none finished yet (not in the table)"
            elif differs is None:
                line += f" (seeds {', '.join(map(str, source['seeds']))}); no provenance.json to read its settings from"
            else:
                line += f" (seeds {', '.join(map(str, source['seeds']))})"
                if differs:
                    line += f"; settings other than {source['reference']}'s: " + ", ".join(f"`{d}`" for d in differs)
            lines.append(line)
    extras = extra_columns(table)
    lines += [
        "",
        "### Table",
        "",
        markdown_table(table),
        "",
        "![success rate and return per algorithm (bars: mean over seeds, whiskers: 95% CI, dots: seeds)]"
        f"({relative_figure})",
        "",
        "### Per seed",
        "",
        "| algorithm | seed | success rate | return |" + "".join(f" {label} |" for _, label in extras),
        "|---|---|---|---|" + "---|" * len(extras),
    ]
    for algo, row in table.items():
        for seed, values in row["per_seed"].items():
            extra = "".join(f" {values[key]:.3f} |" for key, _ in extras)
            lines.append(f"| {algo} | {seed} | {values['success_rate']:.3f} | {values['mean_return']:.1f} |{extra}")
    if curve_figure is not None:
        relative_curves = os.path.relpath(curve_figure.resolve(), doc.resolve().parent)
        lines += [
            "",
            "### Learning curves",
            "",
            "Each agent was also saved every few policy (or bc) updates and evaluated on the same episodes as the "
            "final one.",
            "",
            f"![success rate and return against updates, mean over seeds with a one-std band]({relative_curves})",
        ]
    if failures:
        lines += ["", "### Runs that failed (not in the table)", ""] + [f"- {f}" for f in failures]
    if args.notes:
        lines += ["", "### Observations", "", Path(args.notes).read_text().strip()]
    lines += [
        "",
        "The numbers above are what these runs measured, whatever they show; small presets train for minutes "
        "on a CPU and are not comparable to the paper's 40k+50k-step GPU runs.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Which runs: a comparison (train what is missing) or ablation rows (read what has finished)
# ------------------------------------------------------------------------------------------------


def collect_comparison(
    args: argparse.Namespace,
) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, dict[int, Path]], list[str]]:
    """Each (algo, seed) of --algos x --seeds: run (or reuse) it; with --report-only only what has finished."""
    runs: dict[str, dict[int, dict[str, Any]]] = {algo: {} for algo in args.algos}
    paths: dict[str, dict[int, Path]] = {algo: {} for algo in args.algos}
    failures: list[str] = []
    pending: list[str] = []
    for algo in args.algos:
        for seed in args.seeds:
            path = run_dir(Path(args.results), algo, seed)
            if args.report_only and finished(path) is None:
                pending.append(f"{algo} seed {seed}")
                continue
            try:
                runs[algo][seed] = run_one(args, algo, seed)
            except Exception as exc:  # one failed run must not hide the others; it is reported, not scored
                failures.append(f"{algo} seed {seed}: {exc}")
                print(f"[compare] FAILED {algo} seed {seed}: {exc}", file=sys.stderr)
                continue
            paths[algo][seed] = path
    if pending:
        print(f"[compare] not finished, left out: {', '.join(pending)}", file=sys.stderr)
    return runs, paths, failures


def parse_ablations(values: list[str], algos: list[str]) -> list[dict[str, Any]]:
    """--ablation NAME=RESULTS_DIR[@ALGO] -> [{label, algo, folder (as given), path}], one per (name, algo)."""
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for value in values:
        name, sep, folder = value.rpartition("=")  # the name may hold "=", the folder not
        name = name.strip()
        if not sep or not name or not folder:
            raise ValueError(f"--ablation {value!r}: expected NAME=RESULTS_DIR (or NAME=RESULTS_DIR@ALGO)")
        if "|" in name or name in names:
            raise ValueError(f"--ablation {value!r}: the name must be unique and hold no '|'")
        names.add(name)
        head, at, algo = folder.rpartition("@")
        row_algos = [algo] if at and algo in ALGOS else algos
        if at and algo in ALGOS:
            folder = head
        for row_algo in row_algos:
            label = name if len(row_algos) == 1 else f"{name}: {row_algo}"
            out.append({"label": label, "algo": row_algo, "folder": folder, "path": Path(folder).resolve()})
    return out


def collect_ablations(
    sources: list[dict[str, Any]],
) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, dict[int, Path]]]:
    """The finished runs under each row's RESULTS_DIR/ALGO/seed-*/ (no staleness check: each row has its own
    overrides, recorded in its runs' agent/provenance.json)."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    paths: dict[str, dict[int, Path]] = {}
    for source in sources:
        label, folder = source["label"], source["path"] / source["algo"]
        runs[label], paths[label], pending = {}, {}, []
        for path in sorted(folder.glob("seed-*")):
            try:
                seed = int(path.name.removeprefix("seed-"))
            except ValueError:
                continue
            done = finished(path)
            if done is None:
                pending.append(path.name)
                continue
            runs[label][seed], paths[label][seed] = done, path
        source["seeds"] = sorted(runs[label])
        configs = [paths[label][s] / "agent" / "provenance.json" for s in source["seeds"]]
        source["config"] = next((flatten(read_json(p).get("config", {})) for p in configs if p.is_file()), None)
        read = ", ".join(f"seed-{s}" for s in source["seeds"]) or "nothing finished"
        left = f"; not finished, left out: {', '.join(pending)}" if pending else ""
        print(f"[compare] ablation {label!r}: read {folder}/ {read}{left}", file=sys.stderr)
    return runs, paths


# Settings that differ between rows without making them different agents: the seed, and snapshots (learning curves).
_UNCOMPARED = {"finetune.seed", *_BOOKKEEPING}


def settings_differences(sources: list[dict[str, Any]]) -> None:
    """Each row's `differs`: its settings (from its first run's provenance) other than those of the first row
    that has a provenance (seed, snapshots and settings either row's algorithm never reads aside); None where the
    row's runs have none."""
    from veorl.algo.baselines import unread_settings

    reference = next((s for s in sources if s.get("config") is not None), None)
    for source in sources:
        config = source.get("config")
        source["differs"] = None if config is None else []
        if reference is None or config is None or source is reference:
            continue
        # a setting recorded at the value that reproduces what the code did before it existed counts as absent
        compared, base = without_legacy(config), without_legacy(reference["config"])
        ignored = _UNCOMPARED | unread_settings(source["algo"]) | unread_settings(reference["algo"])
        keys = sorted(k for k in set(compared) | set(base) if k not in ignored and compared.get(k) != base.get(k))
        # shown as recorded; a setting the run predates shows the value the code then had
        source["differs"] = [f"{k}={json.dumps(config[k] if k in config else legacy_value(k))}" for k in keys]
        source["reference"] = reference["label"]


def common_protocol(
    runs: dict[str, dict[int, dict[str, Any]]], paths: dict[str, dict[int, Path]], failures: list[str]
) -> dict[str, Any]:
    """The evaluation protocol of the first run; runs evaluated under another protocol are taken out of `runs`
    and reported in `failures`. Adds the union of the inputs the runs' agents read (baselines read only some)."""
    protocol: dict[str, Any] | None = None
    upstream: dict[str, list[str]] = {}
    for label, by_seed in runs.items():
        for seed in list(by_seed):
            own = by_seed[seed].get("protocol", {})
            if protocol is None:
                protocol = own
            elif own != protocol:
                del by_seed[seed]
                failures.append(f"{label} seed {seed}: evaluated under another protocol ({own}, not {protocol})")
                print(f"[compare] left out {label} seed {seed}: evaluated under another protocol", file=sys.stderr)
                continue
            provenance = paths[label][seed] / "agent" / "provenance.json"
            if provenance.is_file():
                for key, value in read_json(provenance)["upstream"].items():
                    if value[:12] not in upstream.setdefault(key, []):
                        upstream[key].append(value[:12])
    for key, values in upstream.items():
        if len(values) > 1:
            print(f"[compare] warning: the runs read different {key} ({', '.join(values)})", file=sys.stderr)
    return {**(protocol or {}), "upstream": {k: " / ".join(v) for k, v in sorted(upstream.items())}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/compare.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--world-model", metavar="DIR", help="video world model artifact (components.pretrain); required to train"
    )
    parser.add_argument("--episodes", metavar="DIR", help="target episodes (components.collect); required to train")
    parser.add_argument("--clips", default=None, metavar="DIR", help="ingested video clips (MMD term of veorl)")
    parser.add_argument(
        "--algos",
        nargs="+",
        default=["veorl", "dreamerv2"],
        choices=ALGOS,
        help="algorithms to compare (default: %(default)s); with --ablation: the algorithm of each row",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: %(default)s)")
    parser.add_argument(
        "--results",
        default="results/compare",
        metavar="DIR",
        help="run folders and summary.json (default: %(default)s); with --ablation only summary-SECTION.json",
    )
    parser.add_argument(
        "--doc",
        default="docs/results.md",
        metavar="FILE",
        help="markdown document whose section is written (default: %(default)s)",
    )
    parser.add_argument(
        "--section",
        default=None,
        metavar="KEY",
        help="the section of --doc written, between <!-- compare:KEY --> markers (default: the runs' task; "
        "with --ablation: TASK-ablations)",
    )
    parser.add_argument(
        "--title",
        default=None,
        metavar="TEXT",
        help="heading of the section (default: 'TASK (PRESET preset)', with --ablation 'TASK: ablations (...)')",
    )
    parser.add_argument(
        "--intro", default=None, metavar="TEXT", help="a paragraph under the section's heading (what the rows are)"
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
    parser.add_argument(
        "--evaluation",
        default=None,
        metavar="NAME",
        help="another evaluation of the same agents (with its own --set evaluate.*): written to and read from "
        "RUN/eval-NAME/ and RUN/curve-NAME/; complete agents are not fine-tuned again (default: RUN/eval/)",
    )
    parser.add_argument(
        "--ablation",
        dest="ablations",
        action="append",
        default=[],
        metavar="NAME=RESULTS_DIR[@ALGO]",
        help="with --report-only: a row NAME of the finished runs in RESULTS_DIR/ALGO/seed-*/ (ALGO: each of "
        "--algos unless given; repeatable). The runs are not checked against this command's settings",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.snapshot_every < 0:
        print("error: --snapshot-every must be >= 0", file=sys.stderr)
        return 2
    if args.ablations and not args.report_only:
        print("error: --ablation tabulates finished runs: use it with --report-only", file=sys.stderr)
        return 2
    if not args.ablations and (args.world_model is None or args.episodes is None):
        print("error: --world-model and --episodes are required (except with --ablation)", file=sys.stderr)
        return 2
    try:
        set_evaluation(args.evaluation)
        sources = parse_ablations(args.ablations, args.algos)
        if args.section is not None:
            section_markers(args.section)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
    failures: list[str] = []
    if sources:
        runs, paths = collect_ablations(sources)
        settings_differences(sources)
    else:
        runs, paths, failures = collect_comparison(args)
    protocol = {**common_protocol(runs, paths, failures), "preset": params.preset}
    runs = {label: by_seed for label, by_seed in runs.items() if by_seed}
    table = aggregate(runs)
    if not table:
        reason = f"all {len(failures)} failed or were left out (see above)" if failures else "no run finished"
        print(f"error: {reason}; nothing to report", file=sys.stderr)
        return 1
    task = protocol.get("task")
    key = args.section or (f"{task}-ablations" if sources else str(task))
    title = args.title or (
        f"{task}: ablations ({params.preset} preset)" if sources else f"{task} ({params.preset} preset)"
    )
    results, figure, doc = Path(args.results), Path(args.figure), Path(args.doc)
    try:  # a document with broken markers fails before anything is written
        replace_section(doc.read_text() if doc.exists() else None, key, "")
    except ValueError as exc:
        print(f"error: {doc}: {exc}", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {"protocol": protocol, "table": table, "failures": failures}
    if sources:
        summary["rows"] = [{k: v for k, v in s.items() if k not in ("path", "config")} for s in sources]
    summary_path = results / (f"summary-{key}.json" if sources else EVALUATION["summary"])
    bar_chart(figure, table, title=f"{title}, {seeds_label(table)}")
    curves = {
        label: {seed: c for seed, path in by_seed.items() if (c := read_learning_curve(path))}
        for label, by_seed in paths.items()
        if label in table
    }
    curves = aggregate_curves({label: by_seed for label, by_seed in curves.items() if by_seed})
    curve_figure = None
    # an ablation table shows curves only when they compare rows (the full agent's alone are in its task section)
    if sum(len(points) > 1 for points in curves.values()) >= (2 if sources else 1):
        curve_figure = figure.with_name(figure.stem + "_curves.png")
        curve_chart(curve_figure, curves, title=title)
        summary["curves"] = curves
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    body = section_markdown(doc, figure, table, args, protocol, failures, title, curve_figure, sources or None)
    write_section(doc, key, body)
    print(markdown_table(table))
    print(f"written: section {key!r} of {doc}, {figure}, {summary_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
