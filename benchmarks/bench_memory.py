"""Speed and resident memory over many training updates, by how the process handles freed host memory (a script, not
a test).

    .venv/bin/python benchmarks/bench_memory.py [--variant phase2-trunk] [--updates 40] [--threads 2]
        [--modes system retained-unbounded retained] [--json out.json]

The updates are bench_world_model.py's (same variants, paper sizes by default, bf16 where the CPU has it, as
training resolves `precision: auto`). Each mode runs in its own child process, one after the other, so that its
resident memory is its own:

  system              glibc's malloc as the system sets it (retain_memory: false): every block above 32 MiB is a
                      fresh mapping, faulted in page by page and unmapped when freed
  retained-unbounded  retain_memory without the training loop's bound: freed blocks stay in malloc's heap
  retained            what training does by default: retained, and handed back to the system (malloc_trim) after
                      any update that leaves the resident size above 1.5x its size after the first update
                      (veorl.runtime.MemoryBound)

Per mode it prints the mean seconds per update after the first `--skip` updates (and the fastest, median and slowest
of them), the peak resident size (the process's high-water mark), the resident size after the last update and at a
few points on the way, and how often the bound returned memory. Phase 2's updates vary in shape (the number of
keyframes differs from batch to batch), which is what makes a retained heap fragment and grow; phase 1's and phase
3's shapes are fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("system", "retained-unbounded", "retained")


def run_mode(mode: str, variant: str, data_root: Path, updates: int, threads: int, preset: str, precision: str) -> dict:
    import torch
    from bench_world_model import build_variant

    from veorl.runtime import MemoryBound, resident_bytes, retain_freed_memory

    retained = retain_freed_memory(mode != "system")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    update, _, _ = build_variant(variant, data_root, preset, precision, False)
    bound = MemoryBound() if mode == "retained" else None
    seconds, resident = [], []
    for step in range(updates):
        start = time.perf_counter()
        update(step)
        if bound is not None:
            bound.after_update()  # inside the timing: a release, and the faults after it, are part of the cost
        seconds.append(time.perf_counter() - start)
        resident.append(resident_bytes() / 1e9)
    return {
        "mode": mode,
        "retained": retained,
        "seconds": seconds,
        "resident_gb": resident,
        "peak_resident_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # ru_maxrss: KiB
        "releases": bound.releases if bound is not None else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant", default="phase2-trunk", help="a bench_world_model.py variant (default: %(default)s)"
    )
    parser.add_argument("--updates", type=int, default=40, help="updates per mode (default: %(default)s)")
    parser.add_argument("--skip", type=int, default=2, help="first updates left out of the mean (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--preset", default="paper", help="sizes: paper (default) or smoke (to check the script)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--json", default=None, help="also write the results (with every update's figures) here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.updates <= args.skip:
        parser.error("--updates must exceed --skip")

    from veorl.acceleration import resolve_precision

    precision = resolve_precision(args.precision, "cpu")
    if args.child:
        result = run_mode(args.child, args.variant, Path(args.data), args.updates, args.threads, args.preset, precision)
        print(json.dumps(result))
        return 0

    from bench_world_model import machine, run_child, write_dataset

    info = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="veorl-bench-memory-") as tmp:
        write_dataset(Path(tmp))
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", mode, "--data", tmp, "--variant", args.variant]
            cmd += ["--updates", str(args.updates), "--threads", str(args.threads), "--preset", args.preset]
            cmd += ["--precision", precision]
            results.append(run_child(cmd, args.threads))
            print(f"{mode}: done", file=sys.stderr, flush=True)

    marks = sorted({m for m in (10, 25, 50, 100, 200) if m < args.updates} | {args.updates})
    print(
        f"\n{args.variant}, {args.preset} sizes, {precision}, {args.updates} updates per mode, CPU {info['cpu_model']} "
        f"({info['cpu_count']} logical CPUs), {args.threads} threads (load average at the end: "
        f"{os.getloadavg()[0]:.1f}); torch {info['torch']}\n"
    )
    print(
        f"| mode | s/update (mean after {args.skip}) | fastest / median / slowest | peak RSS GB | "
        + " | ".join(f"RSS GB after {m}" for m in marks)
        + " | releases |"
    )
    print("|---" * (5 + len(marks)) + "|")
    for r in results:
        timed = r["seconds"][args.skip :]
        mean = float(np.mean(timed))
        spread = f"{min(timed):.2f} / {float(np.median(timed)):.2f} / {max(timed):.2f}"
        after = " | ".join(f"{r['resident_gb'][m - 1]:.2f}" for m in marks)
        mode = r["mode"] + ("" if r["retained"] or r["mode"] == "system" else " (not applied on this system)")
        print(f"| {mode} | {mean:.2f} | {spread} | {r['peak_resident_gb']:.2f} | {after} | {r['releases']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "variant": args.variant, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
