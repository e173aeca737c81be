"""Pretraining updates per second with one process against N processes under torchrun (a script, not a test).

    .venv/bin/python benchmarks/bench_processes.py [--processes 2] [--preset cpu] [--steps 40] [--json out.json]

Runs `components.pretrain` twice on the same small synthetic data (moving squares, written to a temporary folder):
once as one process with `--threads N` threads (pretrain.threads), once as N processes with one thread each
(`torchrun --standalone --nproc_per_node N`, veorl.distributed), each for `--steps` phase-1 updates and no phase 2,
no checkpoints, MLflow in a temporary sqlite store. It prints both rates from the stage's own metrics
(`throughput.phase1.updates_per_s`, rank 0's wall time over the phase) and samples per second: with N processes
every update trains N x pretrain.batch target sequences (plus N x source_batch clips), so samples/s is the figure
to compare; updates/s shows what each update costs.

Only meaningful on an otherwise idle machine with at least N cores: run `uptime` first. Where torch sees CUDA,
pretraining's `device: auto` puts each process on its own GPU (cuda:LOCAL_RANK, NCCL; veorl.distributed), so
`--processes N` compares one GPU with N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{store}", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def run(data: Path, out: Path, preset: str, steps: int, processes: int, threads: int) -> dict:
    args = ["--clips", str(data / "video_clips"), "--episodes", str(data / "target_episodes")]
    args += ["--out", str(out / "world_model"), "--metrics", str(out / "metrics.json"), "--curve", str(out / "c.csv")]
    args += ["--preset", preset, "--no-progress", "--set", f"pretrain.phase1_steps={steps}"]
    args += ["--set", "pretrain.phase2_steps=0", "--set", f"pretrain.threads={threads}"]
    args += ["--set", "pretrain.image_log_every=1000000", "--set", f"pretrain.log_every={steps}"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    else:
        launcher = [sys.executable]
    command = [*launcher, "-m", "components.pretrain", *args]
    subprocess.run(command, cwd=REPO, env=_env(out / "mlruns.db"), check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    rate = metrics["throughput"]["phase1"]
    # rank 0's samples/s counts its own batch; every rank trains one, so the global rate is N times it
    everyone = round(rate["samples_per_s"] * processes, 3)
    return {"processes": processes, "threads_per_process": threads, **rate, "samples_per_s_all_ranks": everyone}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "laptop"])
    parser.add_argument("--steps", type=int, default=40, help="phase-1 updates per run")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    sys.path[:0] = [str(REPO / "src"), str(REPO)]
    from tests.builders import write_clips, write_episodes

    with tempfile.TemporaryDirectory(prefix="veorl-bench-processes-") as tmp:
        root = Path(tmp)
        write_clips(root / "data" / "video_clips", clips=24, window=32)
        write_episodes(root / "data" / "target_episodes", episodes=8, length=60)
        one = run(root / "data", root / "one", args.preset, args.steps, 1, args.processes)
        many = run(root / "data", root / "many", args.preset, args.steps, args.processes, 1)
    from veorl.acceleration import cpu_model_name

    machine = {"cpu_model": cpu_model_name(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0]}
    results = {"preset": args.preset, "steps": args.steps, "machine": machine, "runs": [one, many]}
    print(
        f"Pretraining phase 1, {args.preset} preset, {args.steps} updates per run, CPU {machine['cpu_model']} "
        f"({machine['cpu_count']} logical CPUs; load average at the end: {machine['load_average']:.1f})"
    )
    for r in results["runs"]:
        print(
            f"{r['processes']} process(es) x {r['threads_per_process']} thread(s): {r['updates_per_s']:.3f} updates/s, "
            f"{r['samples_per_s_all_ranks']:.1f} sequences/s over all ranks"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
