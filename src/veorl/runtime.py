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


# mallopt parameters of glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Whether retain_freed_memory took effect in this process (mallopt acts on the whole process, once set).
_retaining = False
# MemoryBound: how far the resident size may grow over its size after a phase's first update before the retained
# free memory goes back to the system.
RETAINED_GROWTH = 1.5


def _libc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def retain_freed_memory(enabled: bool = True) -> bool:
    """Keep host memory that freed tensors leave for the next ones (`retain_memory` of pretrain and finetune).

    glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it
    again on free. At the paper's sizes an update allocates dozens of such blocks (activations, their gradients,
    the 64x64 reconstructions: 60-250 MB each), so every update faults in and zeroes their pages anew; that kernel
    time made a bf16 phase-1 update about 1.5x slower on a 2-core CPU (benchmarks/results_world_model.md). With
    `M_MMAP_MAX` 0 those blocks come from malloc's heap instead, and with trimming off the freed ones stay there for
    the next update. The price is resident memory: freed blocks stay with the process, and when the shapes of the
    updates vary the heap fragments and grows slowly; the training loop's `MemoryBound` hands them back when the
    resident size has grown by half over a phase's first update.

    Applies to the whole process from the call on; a no-op (returning False) off glibc. Returns whether the setting
    took effect; `enabled=False` does nothing (nor does it undo an earlier call in the same process), so a process
    keeps the system's behaviour unless asked.
    """
    global _retaining
    if not enabled:
        return False
    import ctypes

    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a trim threshold of -1 turns trimming off.
    no_mmap = mallopt(_M_MMAP_MAX, 0) == 1
    no_trim = mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _retaining = _retaining or (no_mmap and no_trim)
    return no_mmap and no_trim


def resident_bytes() -> int | None:
    """The process's resident set size now (Linux /proc/self/statm; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> bool:
    """Hand the free pages malloc holds back to the system (glibc `malloc_trim`); True if it released any."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


class MemoryBound:
    """Keeps retained free memory (retain_freed_memory) from growing without bound, one training phase at a time.

    glibc's heap fragments when the shapes of an update vary (phase 2's keyframe counts): freed blocks do not always
    fit the next requests, so the resident size creeps up over hundreds of updates. After every update this reads
    the resident size; once it exceeds `growth` times its size after the phase's first update, the free pages go
    back to the system (`release_freed_memory`), and the next update faults in what it needs again. Does nothing in
    a process that does not retain freed memory.
    """

    def __init__(self, growth: float = RETAINED_GROWTH):
        self.growth = growth
        self.baseline: int | None = None
        self.releases = 0

    def after_update(self) -> None:
        if not _retaining:
            return
        now = resident_bytes()
        if now is None:
            return
        if self.baseline is None:
            self.baseline = now
        elif now > self.growth * self.baseline:
            release_freed_memory()
            self.releases += 1


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
    "retain_freed_memory",
    "release_freed_memory",
    "resident_bytes",
    "MemoryBound",
    "resolve_device",
    "env_flag",
]
