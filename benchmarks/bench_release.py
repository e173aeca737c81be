"""The authors' release against veorl, one training update each, side by side on this machine in one run (a script,
not a test).

    .venv/bin/python benchmarks/bench_release.py --release PATH/TO/VeoRL [--phases phase1 phase2 phase3]
        [--precisions auto fp32] [--compile] [--sides release veorl] [--release-malloc system|retained]
        [--threads 2] [--repeats 2] [--warmup 1] [--json out.json]

`--release` is a checkout of the authors' public release (github.com/panmt/VeoRL), which the user provides: nothing
is downloaded, and nothing of it is copied into veorl. Its modules (models.py, networks.py, tools.py) are imported
from that folder as they are; only two things stand in around them: `torch.utils.tensorboard` when tensorboard is
not installed (tools.py imports it for its logger, which the benchmark never calls), and the config namespace that
its dreamer.py would build with argparse (dreamer.py itself imports the CARLA and Meta-World environments, so it is
not imported). The release runs at its own Meta-World settings (configs.yaml: `defaults` then `metaworld`), on the
CPU in fp32 (its mixed precision is CUDA's autocast and gradient scaler, which do nothing on a CPU), with the
system's malloc, as a user would run it (`--release-malloc retained` gives it the freed-memory retention that veorl's
training turns on by default, to see how much of the gap that alone makes).

What one update is, on each side (the issue's pairing):

  phase   the release                                        veorl (bench_world_model.py variant)
  phase1  WorldModel._train_lam: BAN, its RSSM and decoder   phase1: the same data flow (BAN and Plan Net on target
          on 50 x 50 target frames, MMD to 50 x 25 source    frames, source frames only through the MMD term)
          frames
  phase2  WorldModel._train at a step between step_train_ban  phase2-trunk: keyframe Plan Net, F_BC and MMD on source
          and step_train_wm: latent world model on target     and target keyframes plus the Trunk Net's world-model
          (50 x 200 frames) and source keyframes, MMD,        loss on the 50 x 50 target batch
          imitation net, and the Trunk Net on 50 x 50 frames
  phase3  WorldModel._train_stop (Trunk Net posterior) then   phase3: fine-tuning's PolicyPhase.update (posterior,
          ImagBehavior._train (15-step imagination, actor      15-step imagination with guidance, actor and critic),
          and critic)                                          with the start frames' embeddings read from the table
                                                               fine-tuning builds once (bench_world_model.py's
                                                               phase3-uncached encodes them at every update)

Each update of each side runs in its own child process (so each peak resident size is its own), timed after
`--warmup` untimed updates (veorl's side also warms up until its retained heap has settled, as bench_world_model.py
does). Times are the whole update (the release's includes turning its numpy batch into tensors, which its training
loop does inside the update; veorl's leaves out the sampling, which its prefetch thread hides). The FLOPs of one
update of each side are counted with torch.utils.flop_counter.FlopCounterMode and, with this machine's own GEMM and
convolution throughput measured in the same run (before the updates and after them; the higher counts), give each
side's fraction of the peak in the precision it ran in.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ACTION_DIM = 4  # Meta-World's action space
PHASES = ("phase1", "phase2", "phase3")
VEORL_VARIANT = {"phase1": "phase1", "phase2": "phase2-trunk", "phase3": "phase3"}


# ------------------------------------------------------------------------------------------------
# The release's side (in a child process)
# ------------------------------------------------------------------------------------------------


def check_release(release: Path) -> None:
    """Stop, naming what is missing, unless `release` holds the release's files the benchmark uses."""
    expected = ("models.py", "networks.py", "tools.py", "configs.yaml")
    missing = [name for name in expected if not (release / name).is_file()]
    if missing:
        raise SystemExit(
            f"--release {release}: {', '.join(missing)} not found there; expected a checkout of the authors' release "
            "(github.com/panmt/VeoRL)"
        )


def import_release(release: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The release's `models` and `tools` modules, imported from its checkout."""
    check_release(release)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # tools.py imports SummaryWriter for its Logger, which the benchmark does not use

        class SummaryWriter:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("tensorboard is not installed; the benchmark does not log")

        stand_in = types.ModuleType("torch.utils.tensorboard")
        stand_in.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = stand_in
    sys.path.insert(0, str(release))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.cuda.amp.* is deprecated; the release uses it
    return importlib.import_module("models"), importlib.import_module("tools")


def release_config(release: Path, tools: types.ModuleType, suite: str = "metaworld") -> types.SimpleNamespace:
    """The namespace dreamer.py builds: configs.yaml's defaults, then the suite's, each value converted with the
    release's own `tools.args_type` (as its argparse defaults are); then what its main() and Dreamer() set."""
    import torch
    from ruamel.yaml import YAML

    configs = YAML(typ="safe").load((release / "configs.yaml").read_text())
    values = {**configs["defaults"], **configs[suite]}
    config = types.SimpleNamespace(**{key: tools.args_type(value)(value) for key, value in values.items()})
    config.act = getattr(torch.nn, config.act)
    config.device = "cpu"
    config.precision = 32  # its AMP is CUDA autocast + GradScaler: on a CPU the release computes in fp32 either way
    config.num_actions = ACTION_DIM
    for name in ("actor_entropy", "actor_state_entropy", "imag_gradient_mix"):  # Dreamer.__init__'s schedules
        setattr(config, name, lambda x=getattr(config, name): tools.schedule(x, 0))
    return config


def release_batches(config: types.SimpleNamespace, rng: np.random.Generator) -> dict:
    """Numpy batches shaped as the release's dataset generators yield them."""
    from bench_world_model import synthetic_video

    def target(length: int) -> dict:
        b = config.batch_size
        return {
            "image": np.stack([synthetic_video(length, rng) for _ in range(b)]),
            "action": rng.uniform(-1, 1, (b, length, config.num_actions)).astype(np.float32),
            "reward": rng.normal(size=(b, length)).astype(np.float32),
            "discount": np.ones((b, length), np.float32),
        }

    source = {"image": np.stack([synthetic_video(config.batch_length_source, rng) for _ in range(config.batch_size)])}
    return {"target": target(config.batch_length), "large": target(config.batch_length_large), "source": source}


def build_release_update(phase: str, release: Path):
    """update(step): one update of one of the release's phases, with its networks and optimisers as it builds them."""
    import torch

    models, tools = import_release(release)
    config = release_config(release, tools)
    torch.manual_seed(0)
    wm = models.WorldModel(0, config)
    behavior = models.ImagBehavior(config, wm, config.behavior_stop_grad)
    wm.requires_grad_(False)  # as dreamer.py's main() leaves the agent; tools.RequiresGrad switches it per update
    behavior.requires_grad_(False)
    data = release_batches(config, np.random.default_rng(0))
    first_phase2 = int(config.step_train_ban) + 1

    def update(step: int) -> None:
        if phase == "phase1":
            wm._train_lam(data["target"], data["source"])
        elif phase == "phase2":
            wm._train(data["target"], data["large"], data["source"], first_phase2 + step)
        else:  # Dreamer._train's branch after step_train_wm
            post, _, _ = wm._train_stop(data["target"], int(config.step_train_wm) + 1 + step)
            behavior._train(post, lambda f, s, a: wm.heads["reward"](wm.dynamics.get_feat(s)).mode())

    return update


def run_release(phase: str, release: Path, threads: int, repeats: int, warmup: int, malloc: str = "system") -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if malloc == "retained":
        from veorl.runtime import retain_freed_memory

        retain_freed_memory(True)
    torch.set_num_threads(threads)
    update = build_release_update(phase, release)
    seconds, cpu = [], []
    for step in range(warmup + repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        update(step)
        t1, c1 = time.perf_counter(), time.process_time()
        if step >= warmup:
            seconds.append(t1 - t0)
            cpu.append(c1 - c0)
    with FlopCounterMode(display=False) as counter:
        update(warmup + repeats)
    update_s = float(np.mean(seconds))
    flops = float(counter.get_total_flops())
    return {
        "side": "release",
        "phase": phase,
        "precision": "fp32",
        "malloc": malloc,
        "update_s": update_s,
        "cpu_s": float(np.mean(cpu)),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,  # ru_maxrss: KiB
        "flops_per_update": flops,
        "flops_per_s": flops / update_s,
        "warmup_updates": warmup,
        "repeats": repeats,
    }


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--release", required=True, metavar="PATH", help="a checkout of the authors' release (github.com/panmt/VeoRL)"
    )
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["auto", "fp32"],
        choices=("auto", "fp32", "bf16"),
        help="veorl's precisions to time (the release runs fp32 on a CPU); auto = what training resolves here "
        "(default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed updates per phase and side (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates first (default: %(default)s)")
    parser.add_argument(
        "--sides", nargs="+", default=["release", "veorl"], choices=("release", "veorl"), help="what to time"
    )
    parser.add_argument("--compile", action="store_true", help="veorl with compiled networks (compile: true)")
    parser.add_argument(
        "--release-malloc",
        choices=("system", "retained"),
        default="system",
        help="the release's malloc: as shipped (system), or keeping freed memory as veorl's training does by default "
        "(retain_memory: true), to see how much of the gap that alone makes (default: %(default)s)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    release = Path(args.release).resolve()

    if args.child:
        result = run_release(args.child, release, args.threads, args.repeats, args.warmup, args.release_malloc)
        print(json.dumps(result))
        return 0

    check_release(release)  # fail early, with the reason, if the folder is not the release
    from bench_world_model import attach_limits, best_peaks, machine, run_child, write_dataset

    from veorl.acceleration import resolve_precision

    precisions = list(dict.fromkeys(resolve_precision(p, "cpu") for p in args.precisions))
    info = machine()
    print(
        f"machine: {info['cpu_model']}, {info['cpu_count']} logical CPUs; torch {info['torch']}; "
        f"{args.threads} threads",
        file=sys.stderr,
        flush=True,
    )
    world_model = [sys.executable, str(HERE / "bench_world_model.py"), "--threads", str(args.threads)]
    world_model += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    world_model += ["--compile"] if args.compile else []
    before = run_child([*world_model, "--child", "peak"], args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="veorl-bench-release-") as tmp:
        write_dataset(Path(tmp))
        for phase in args.phases:
            if "release" in args.sides:
                cmd = [sys.executable, __file__, "--release", str(release), "--child", phase]
                cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
                cmd += ["--release-malloc", args.release_malloc]
                results.append(run_child(cmd, args.threads))
                print(f"release {phase}: {results[-1]['update_s']:.2f} s/update", file=sys.stderr, flush=True)
            for precision in precisions if "veorl" in args.sides else []:
                r = run_child(
                    [*world_model, "--precision", precision, "--child", VEORL_VARIANT[phase], "--data", tmp],
                    args.threads,
                )
                results.append(
                    {
                        "side": "veorl",
                        "phase": phase,
                        "variant": r["variant"],
                        "precision": r["precision"],
                        "compile": r["compile"],
                        "malloc": "retained" if r["retain_memory"] else "system",
                        "update_s": r["seconds"]["update"],
                        "cpu_s": r["seconds"]["cpu"],
                        "peak_rss_gb": r["peak_rss_gb"],
                        "flops_per_update": r["flops_per_update"],
                        "flops_per_s": r["flops_per_s"],
                        "warmup_updates": r["warmup_updates"],
                        "repeats": r["repeats"],
                    }
                )
                print(
                    f"veorl {phase} ({precision}): {results[-1]['update_s']:.2f} s/update", file=sys.stderr, flush=True
                )
    after = run_child([*world_model, "--child", "peak"], args.threads)
    peaks = best_peaks(before, after)
    for r in results:
        attach_limits(r, peaks, info)
        r["threads"] = args.threads

    sides = []
    if "release" in args.sides:
        sides.append(f"the release (fp32, {args.release_malloc} malloc)")
    if "veorl" in args.sides:
        sides.append(f"veorl ({', '.join(precisions)}{', compiled' if args.compile else ''})")
    print(
        f"\nOne training update, {' against '.join(sides)}, CPU "
        f"{info['cpu_model']} ({info['cpu_count']} logical CPUs, bf16 instructions: "
        f"{'yes' if info['bf16_instructions'] else 'no'}), {args.threads} threads, mean of {args.repeats} after at "
        f"least {args.warmup} warm-up (load average at the end: {os.getloadavg()[0]:.1f}); torch {info['torch']}\n"
    )
    print(
        "This machine's limits (the higher of 2 measurements, before and after the updates): "
        f"GEMM fp32 {peaks['gemm_fp32'] / 1e9:.1f}, bf16 {peaks['gemm_bf16'] / 1e9:.1f} GFLOP/s; "
        f"conv fp32 {peaks['conv_fp32'] / 1e9:.1f}, bf16 {peaks['conv_bf16'] / 1e9:.1f} GFLOP/s\n"
    )
    print(
        "| phase | side | precision | malloc | update s | speed-up over the release | peak RSS GB | GFLOP/update | "
        "GFLOP/s | of GEMM peak | of conv peak |"
    )
    print("|---" * 11 + "|")
    for phase in args.phases:
        rows = [r for r in results if r["phase"] == phase]
        base = [r["update_s"] for r in rows if r["side"] == "release"]
        for r in rows:
            name = "release" if r["side"] == "release" else f"veorl ({r['variant']})"
            precision = r["precision"] + (" compiled" if r.get("compile") else "")
            speedup = f"{base[0] / r['update_s']:.2f}x" if base else "-"
            print(
                f"| {phase} | {name} | {precision} | {r['malloc']} | {r['update_s']:.2f} | {speedup} | "
                f"{r['peak_rss_gb']:.2f} | {r['flops_per_update'] / 1e9:.1f} | {r['flops_per_s'] / 1e9:.1f} | "
                f"{r['fraction_of_gemm_peak']:.2f} | {r['fraction_of_conv_peak']:.2f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
