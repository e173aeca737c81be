"""Shared command-line plumbing for the components: params flags, logging, provenance files."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from veorl.config import PRESETS, ConfigError, Params, dump_resolved, load_params
from veorl.storage import atomic_write_json, provenance

log = logging.getLogger("veorl")


def add_params_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parameters")
    group.add_argument(
        "--params", default="params.yaml", help="params.yaml to read (default: %(default)s; missing = defaults)"
    )
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="override the preset named in params.yaml (sizes and step counts only)",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter (repeatable), e.g. --set ingest.window=16",
    )


def add_component_args(parser: argparse.ArgumentParser, progress: bool = True, tracking: bool = False) -> None:
    """The flags every component shares: logging, progress bars (for the ones that show any), the MLflow parent
    run (for the ones that track to MLflow) and parameters."""
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if tracking:
        parser.add_argument(
            "--parent-run-id",
            default=None,
            metavar="ID",
            help="MLflow run to nest this stage's run under (default: $VEORL_PARENT_RUN_ID, else none)",
        )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_params_args(parser)


def parse_component_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Params]:
    """Parse a component's command line, set up logging and load the validated parameters (exit 2 when invalid)."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        # Progress bars are for terminals; in a log file (DVC, KFP, CI) every redraw would be a line of noise.
        args.no_progress = True
    return args, load_from_args(args)


def load_from_args(args: argparse.Namespace) -> Params:
    try:
        return load_params(args.params, preset=args.preset, overrides=args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def write_resolved_config(
    out_dir: str | Path, params: Params, sections: tuple[str, ...], upstream: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    """Write OUT/config.json (resolved params) and OUT/provenance.json next to an artifact."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = params.section_dict(*sections)
    atomic_write_json(out_dir / "config.json", cfg)
    prov = provenance(cfg, upstream, **extra)
    atomic_write_json(out_dir / "provenance.json", prov)
    return prov


def configure_torch_threads(threads: int) -> None:
    """0 = leave torch's default (all cores)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes", "on"}


__all__ = [
    "add_params_args",
    "add_component_args",
    "parse_component_args",
    "load_from_args",
    "setup_logging",
    "write_resolved_config",
    "dump_resolved",
    "configure_torch_threads",
    "resolve_device",
    "env_flag",
]
