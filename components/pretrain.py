"""Pipeline step: pretrain the video world model (phases 1 and 2) from video clips and target frames.

    python -m components.pretrain --clips data/video_clips --episodes data/target_episodes \\
        --out models/video_world_model --checkpoints checkpoints/pretrain [--preset smoke] [--set pretrain.seed=1]

Re-running the same command after an interruption resumes from the last checkpoint (phase and step).
Writes the world-model artifact to --out (weights, model_config.json, config.json, provenance.json),
final metrics to --metrics and the learning curve to --curve, and records an MLflow run.
The method: docs/method.md; the code: veorl.algo.pretrain.
"""

from __future__ import annotations

import argparse
import logging
import sys

from veorl.config import Params
from veorl.runtime import add_component_args, parse_component_args

log = logging.getLogger("veorl.components.pretrain")


def run(
    clips: str,
    episodes: str,
    out: str,
    params: Params,
    *,
    checkpoints: str | None = None,
    parent_run_id: str | None = None,
    metrics: str = "metrics/pretrain.json",
    curve: str = "metrics/pretrain_curve.csv",
    progress: bool = True,
) -> dict:
    """Pretrain (or resume) and write the artifact and metrics files; returns the metrics dict."""
    from veorl.algo.pretrain import pretrain

    return pretrain(
        params,
        clips,
        episodes,
        out,
        checkpoints=checkpoints,
        parent_run_id=parent_run_id,
        metrics_path=metrics,
        curve_path=curve,
        progress=progress,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.pretrain",
        description="Pretrain the VeoRL video world model: phase 1 (latent behaviours, Plan Net, MMD) then "
        "phase 2 (keyframe Plan Net, F_BC, MMD). Resumes from --checkpoints when re-run.",
    )
    parser.add_argument("--clips", required=True, help="ingested video clips directory (components.ingest output)")
    parser.add_argument(
        "--episodes", required=True, help="target episodes directory (components.collect output); frames only are read"
    )
    parser.add_argument("--out", required=True, help="output directory of the world-model artifact")
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="checkpoint directory; re-running with the same directory resumes (default: no checkpoints)",
    )
    parser.add_argument("--metrics", default="metrics/pretrain.json", help="final metrics JSON (default: %(default)s)")
    parser.add_argument(
        "--curve", default="metrics/pretrain_curve.csv", help="learning curve CSV (default: %(default)s)"
    )
    add_component_args(parser, tracking=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, params = parse_component_args(build_parser(), argv)
    try:
        metrics = run(
            args.clips,
            args.episodes,
            args.out,
            params,
            checkpoints=args.checkpoints,
            parent_run_id=args.parent_run_id,
            metrics=args.metrics,
            curve=args.curve,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    p1, p2 = metrics.get("phase1", {}), metrics.get("phase2", {})
    log.info(
        "pretraining done: phase 1 loss %s, phase 2 loss %s, codebook perplexity %s -> %s",
        p1.get("loss"),
        p2.get("loss"),
        metrics.get("codebook_perplexity"),
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
