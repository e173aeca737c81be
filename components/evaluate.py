"""Evaluate: play the agent in its simulator (deterministic policy by default) and report return and success.

    python -m components.evaluate --agent models/agent --out eval

Task, camera and episode length come from the agent's metadata (the data it was trained on). Episode i is
seeded evaluate.seed + i; episodes run in evaluate.workers processes, each loading the agent itself.
evaluate.policy=sample draws each action from the agent's distribution (stream seeded per episode) instead of
playing its mode; the protocol in metrics.json then carries "policy": "sample".
Writes OUT/metrics.json (last, and only on success), OUT/episodes.csv, OUT/rollouts/*.mp4 (the frames the
agent saw), OUT/returns.png, OUT/config.json and OUT/provenance.json (with the evaluation's content hash, recorded
last). A policy that crashes or emits a
non-finite action fails the evaluation with the episode and step, exit status 1, and no metrics.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from veorl.config import Params
from veorl.runtime import add_component_args, parse_component_args

log = logging.getLogger("veorl.evaluate")
SECTIONS = ("evaluate",)


def run(
    agent: str, out: str, params: Params, *, parent_run_id: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Evaluate the agent artifact `agent` into `out`; returns the contents of OUT/metrics.json."""
    from veorl import tracking
    from veorl.acceleration import resolve_precision
    from veorl.agent import META_FILE, AgentError
    from veorl.evaluation import (
        evaluate_agent,
        plot_returns,
        reward_diagnostics,
        summarise,
        task_success_rates,
        write_episodes_csv,
    )
    from veorl.runtime import write_resolved_config
    from veorl.storage import (
        artifact_hash,
        atomic_write_json,
        read_json,
        record_content_hash,
    )

    ev = params.evaluate
    out_dir = Path(out)
    meta_path = Path(agent) / META_FILE
    if not meta_path.is_file():
        raise AgentError(f"{meta_path} not found: {agent} is not a complete agent artifact (run components.finetune)")
    meta = read_json(meta_path)
    # A stale score from an earlier evaluation must not survive a failed one.
    (out_dir / "metrics.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "rollouts").glob("*.mp4"):
        old.unlink()
    for key in ("task", "camera", "episode_length"):
        if getattr(params.collect, key) != meta[key]:
            log.info(
                "params.collect.%s=%r differs from the agent's %r; evaluating on the agent's",
                key,
                getattr(params.collect, key),
                meta[key],
            )
    protocol = {
        "env": meta["env"],
        "task": meta["task"],
        "camera": meta["camera"],
        "episode_length": int(meta["episode_length"]),
        "episodes": ev.episodes,
        "seed": ev.seed,
    }
    if ev.policy != "mode":  # the default adds no key, so deterministic protocols stay equal to earlier ones
        protocol["policy"] = ev.policy
    upstream = {"agent": artifact_hash(agent)}
    precision = resolve_precision(ev.precision, ev.device)  # once for the stage
    with tracking.stage_run(
        "evaluate",
        params,
        parent_run_id,
        sections=SECTIONS,
        upstream=upstream,
        tags={"veorl.algo": meta["algo"], "veorl.task": meta["task"]},
    ):
        tracking.log_params({f"protocol.{k}": v for k, v in protocol.items()})
        tracking.log_params({"evaluate.precision_resolved": precision})
        results = evaluate_agent(
            agent,
            ev.episodes,
            ev.seed,
            workers=ev.workers,
            videos=ev.videos,
            video_size=ev.video_size,
            video_dir=out_dir / "rollouts",
            device=ev.device,
            fps=ev.video_fps,
            progress=progress,
            precision=precision,
            policy=ev.policy,
        )
        summary = summarise(results)
        write_episodes_csv(out_dir / "episodes.csv", results)
        plot_returns(
            out_dir / "returns.png",
            results,
            title=f"{meta['algo']} on {meta['task']}: success {summary['success_rate']:.2f}",
        )
        write_resolved_config(out_dir, params, SECTIONS, upstream=upstream, protocol=protocol)
        rewards = reward_diagnostics(results)
        if rewards is not None:
            from veorl.diagnostics import DIAGNOSTICS_FILE, check

            report = {"reward": rewards}
            report["warnings"] = check(report, f"evaluate ({meta['algo']})")
            atomic_write_json(out_dir / DIAGNOSTICS_FILE, report)
            tracking.log_metrics({f"diagnostics/reward/{k}": v for k, v in rewards.items() if math.isfinite(v)})
        per_task = task_success_rates(results)
        metrics = {
            "task": meta["task"],
            "algo": meta["algo"],
            **summary,
            **({"success_per_task": per_task} if per_task is not None else {}),
            "protocol": protocol,
            "precision": precision,
            "status": "ok",
        }
        tracking.log_metrics({k: v for k, v in summary.items()})
        if per_task is not None:
            tracking.log_metrics({f"success_per_task/{k}": v for k, v in per_task.items()})
        for r in results:
            episode_metrics = {"episode_return": r.ret, "episode_success": float(r.success)}
            if r.collision is not None:
                episode_metrics["episode_collision"] = float(r.collision)
            tracking.log_metrics(episode_metrics, step=r.episode)
        tracking.log_artifact(out_dir / "episodes.csv")
        tracking.log_artifact(out_dir / "returns.png")
        if ev.videos:
            tracking.log_artifact(out_dir / "rollouts", artifact_path="rollouts")
        atomic_write_json(out_dir / "metrics.json", metrics)
        tracking.log_artifact(out_dir / "metrics.json")
        record_content_hash(out_dir)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agent", required=True, metavar="DIR", help="agent artifact of components.finetune")
    parser.add_argument("--out", required=True, metavar="DIR", help="evaluation output directory")
    add_component_args(parser, tracking=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, params = parse_component_args(build_parser(), argv)
    from veorl.agent import AgentError
    from veorl.evaluation import EvaluationError

    try:
        metrics = run(args.agent, args.out, params, parent_run_id=args.parent_run_id, progress=not args.no_progress)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EvaluationError as exc:
        print(f"evaluation failed, no score reported: {exc}", file=sys.stderr)
        return 1
    collisions = f", collision rate {metrics['collision_rate']:.2f}" if "collision_rate" in metrics else ""
    print(
        f"{metrics['algo']} on {metrics['task']}: success rate {metrics['success_rate']:.2f} "
        f"(+- {metrics['success_std']:.2f}), return {metrics['mean_return']:.1f} +- {metrics['std_return']:.1f}"
        f"{collisions} over {metrics['episodes']} episodes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
