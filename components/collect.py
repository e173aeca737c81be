"""Collect the offline target dataset (or import an existing one) into DIR.

    python -m components.collect --out data/target_episodes [--preset cpu] [--set collect.quality=expert]
    python -m components.collect --import-from release_episodes/ --out data/target_episodes

Collection runs the simulator with a degraded scripted behaviour policy (params section `collect`:
quality expert | medium | mixed) and writes DIR/episodes/*.npz, DIR/card.json, DIR/config.json and
DIR/provenance.json (with the dataset's content hash). Re-running with the same parameters keeps every
finished episode and writes nothing.
Import validates existing episode files (keys, shapes, dtypes, value ranges), copies the good ones and
prints each rejected file with the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from veorl.config import Params
from veorl.data.episodes import dataset_hash
from veorl.envs import ACTION_DIMS
from veorl.envs.collection import collect_dataset, import_dataset
from veorl.runtime import (
    add_component_args,
    parse_component_args,
    write_resolved_config,
)
from veorl.storage import record_content_hash, tree_hash

SECTIONS = ("collect",)


def run(out: str, params: Params, *, progress: bool = True) -> dict[str, Any]:
    """Collect `params.collect.episodes` episodes into `out`; returns the dataset card.

    The dataset's content hash (its card's, as veorl.data.episodes.dataset_hash computes it) is recorded last.
    """
    result = collect_dataset(out, params.collect, progress=progress)
    config_missing = not (Path(out) / "config.json").exists() or not (Path(out) / "provenance.json").exists()
    if result.changed or config_missing:
        write_resolved_config(out, params, SECTIONS, episodes_collected=result.collected, episodes_kept=result.kept)
    record_content_hash(out, dataset_hash(out, recorded=False))
    return result.card


def run_import(source: str, out: str, params: Params) -> dict[str, Any]:
    """Validate and copy episode files from `source` into `out`; returns the card (rejections included)."""
    cfg = params.collect
    description = {"env": cfg.env, "task": cfg.task, "camera": cfg.camera, "size": cfg.size, "quality": "imported"}
    result = import_dataset(
        source, out, image_size=cfg.size, action_dim=ACTION_DIMS.get(cfg.env), description=description
    )
    if result.card["episodes"] > 0:  # an import that accepted nothing left the dataset (and its provenance) alone
        write_resolved_config(out, params, SECTIONS, upstream={"imported_from": tree_hash(source)})
        record_content_hash(out, dataset_hash(out, recorded=False))
    return result.card


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.collect",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quality levels: expert (scripted expert + small noise), medium (expert with random-action mixing and "
        "noise; ~30-70% success on drawer-open at the cpu preset), mixed (a share of expert episodes, rest medium).",
    )
    parser.add_argument("--out", required=True, help="dataset directory to write (episodes/, card.json, config.json)")
    parser.add_argument(
        "--import-from",
        dest="import_from",
        metavar="SRC_DIR",
        default=None,
        help="instead of collecting, validate and import the .npz episode files under SRC_DIR",
    )
    add_component_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, params = parse_component_args(build_parser(), argv)
    if args.import_from:
        try:
            card = run_import(args.import_from, args.out, params)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for row in card["rejected"]:
            print(f"rejected {row['file']}: {row['reason']}", file=sys.stderr)
        print(
            f"imported {card['episodes']} episodes ({card['steps']} steps) into {args.out}; "
            f"rejected {len(card['rejected'])}"
        )
        return 0 if card["episodes"] > 0 else 1
    card = run(args.out, params, progress=not args.no_progress)
    print(
        f"{card['episodes']} episodes ({card['steps']} steps) in {args.out}: "
        f"return {card['return_mean']:.1f} +- {card['return_std']:.1f}, success rate {card['success_rate']:.2f} "
        f"({card['quality']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
