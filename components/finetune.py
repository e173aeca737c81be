"""Fine-tune: train the Trunk Net world model on the target episodes, then the policy in imagination, and
write the deployable agent.

    python -m components.finetune --world-model models/video_world_model --episodes data/target_episodes \
        --clips data/video_clips --out models/agent --checkpoints checkpoints/finetune

finetune.algo picks the algorithm: veorl (the full method), dreamerv2 (offline DreamerV2: no video; the
--world-model and --clips arguments are accepted and ignored), bc (behaviour cloning from pixels).
Re-running the same command after an interruption resumes from the latest checkpoint in --checkpoints.
Writes OUT/agent.pt, OUT/agent.json (last: its presence marks a complete agent), OUT/config.json,
OUT/provenance.json, plus --metrics (JSON summary) and --curve (CSV, one row per logged update window).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from veorl.config import Params
from veorl.runtime import add_component_args, parse_component_args


def run(
    world_model: str,
    episodes: str,
    out: str,
    params: Params,
    *,
    clips: str | None = None,
    checkpoints: str | None = None,
    parent_run_id: str | None = None,
    metrics: str | None = "metrics/finetune.json",
    curve: str | None = "metrics/finetune_curve.csv",
    progress: bool = True,
    snapshots: str | None = None,
) -> dict[str, Any]:
    """Fine-tune and write the agent artifact to `out`; returns the summary (also written to `metrics`)."""
    from veorl.algo.finetune import finetune

    return finetune(
        world_model,
        episodes,
        out,
        params,
        clips=clips,
        checkpoints=checkpoints,
        metrics_path=metrics,
        curve_path=curve,
        parent_run_id=parent_run_id,
        progress=progress,
        snapshots=snapshots,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.finetune",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--world-model",
        required=True,
        metavar="DIR",
        help="video world model artifact of components.pretrain (ignored by the dreamerv2 and bc baselines)",
    )
    parser.add_argument("--episodes", required=True, metavar="DIR", help="target episodes of components.collect")
    parser.add_argument("--clips", default=None, metavar="DIR", help="ingested video clips for the MMD term (optional)")
    parser.add_argument("--out", required=True, metavar="DIR", help="agent artifact directory to write")
    parser.add_argument(
        "--checkpoints",
        default=None,
        metavar="DIR",
        help="checkpoint directory; an existing checkpoint there is resumed (default: no checkpoints)",
    )
    parser.add_argument(
        "--metrics", default="metrics/finetune.json", metavar="FILE", help="summary JSON (default: %(default)s)"
    )
    parser.add_argument(
        "--curve",
        default="metrics/finetune_curve.csv",
        metavar="FILE",
        help="training curve CSV (default: %(default)s)",
    )
    parser.add_argument(
        "--snapshots",
        default=None,
        metavar="DIR",
        help="write the agent every finetune.snapshot_every policy (or bc) updates to DIR/updates-NNNNNN/, "
        "for learning curves (default: none)",
    )
    add_component_args(parser, tracking=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, params = parse_component_args(build_parser(), argv)
    from veorl.agent import AgentError
    from veorl.algo.finetune import FinetuneError
    from veorl.checkpoint import CheckpointMismatch
    from veorl.data.episodes import EpisodeError

    try:
        summary = run(
            args.world_model,
            args.episodes,
            args.out,
            params,
            clips=args.clips,
            checkpoints=args.checkpoints,
            parent_run_id=args.parent_run_id,
            metrics=args.metrics,
            curve=args.curve,
            progress=not args.no_progress,
            snapshots=args.snapshots,
        )
    except (FinetuneError, CheckpointMismatch, EpisodeError, AgentError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parts = [f"{summary['algo']} agent written to {args.out}"]
    for phase, key in (("world_model", "loss"), ("policy", "imagined_return"), ("bc", "bc_loss")):
        if phase in summary and key in summary[phase]:
            parts.append(f"{phase} {key} {summary[phase][key]:.4g}")
    print("; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
