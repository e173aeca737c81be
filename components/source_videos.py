"""Render unlabeled source videos (Meta-World tasks other than the target) into DIR as real video files.

    python -m components.source_videos --out data/source_videos [--preset cpu] [--set source_videos.cameras=[corner3]]

Scripted experts with action noise play `source_videos.tasks`; every episode is filmed from each camera in
`source_videos.cameras` and encoded with PyAV as DIR/<task>-<camera>-<episode:03d>.<container>. Only frames
are kept (no actions, no rewards). Writes DIR/card.json (files and frame counts), DIR/config.json and
DIR/provenance.json. Finished videos whose parameters did not change are kept on a re-run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from veorl.config import Params
from veorl.envs.source_video import render_source_videos
from veorl.runtime import add_component_args, parse_component_args, write_resolved_config

SECTIONS = ("source_videos",)


def run(out: str, params: Params, progress: bool = True) -> dict[str, Any]:
    """Render the source videos into `out`; returns the card (every file with its frame count)."""
    result = render_source_videos(out, params.source_videos, target_task=params.collect.task, progress=progress)
    config_missing = not (Path(out) / "config.json").exists() or not (Path(out) / "provenance.json").exists()
    if result.changed or config_missing:
        write_resolved_config(out, params, SECTIONS, target_task=params.collect.task, videos_rendered=result.rendered,
                              videos_kept=result.kept)
    return result.card


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.source_videos", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the video files, card.json and config.json")
    add_component_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, params = parse_component_args(build_parser(), argv)
    try:
        card = run(args.out, params, progress=not args.no_progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{card['videos']} videos ({card['frames']} frames) of {', '.join(card['tasks'])} in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
