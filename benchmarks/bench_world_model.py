"""Throughput of one world-model update at the release's Meta-World sizes (a script, not a test).

    .venv/bin/python benchmarks/bench_world_model.py [--threads 2] [--repeats 2] [--warmup 1]

Paper sizes (ModelParams defaults: d=32, deter 200, stoch 50, hidden 200, K=50, Z=8), batch 50 target
sequences x 50 steps and 50 source clips x 25 frames, 64x64, fp32, CPU. Each variant runs in its own
child process so that its peak resident memory (RSS high-water mark) is its own. Per update it reports
data (sampling the batch from on-disk clip shards and episode files into tensors; in training a
prefetch thread hides this), forward (all losses), backward, and optimizer (gradient clip + Adam),
the process CPU seconds of the whole update (with 1 thread: the compute itself, whatever the machine's
load; with more, it includes OpenMP spin-waiting), then steps/s and samples/s, and compares with the authors'
implementation on the same kind of machine: 10.0 s per phase-1 update, 30.5 s per phase-2 update, 11.9 GB peak
memory.

Variants:
  phase1          release data flow (BAN and Plan Net on target frames; source only via MMD): same maths as the
                  reference
  phase1-source   our default (pretrain.ban_on_source: BAN and Plan Net on source clips too): more work per update
  phase2          keyframe Plan Net + F_BC + MMD on source and target keyframes (this stage's phase 2)
  phase2-trunk    phase2 plus the Trunk Net world-model loss on the target batch: what the release's phase-2 update
                  computes
  phase2-trunk-worst  as phase2-trunk with every transition its own behaviour (most keyframes; the memory worst case)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REFERENCE = {"phase1": 10.0, "phase2": 30.5, "peak_gb": 11.9}
VARIANTS = ("phase1", "phase1-source", "phase2", "phase2-trunk", "phase2-trunk-worst")


def synthetic_video(length: int, rng: np.random.Generator) -> np.ndarray:
    """Coloured squares drifting over a background (so BAN codes are not pure noise)."""
    frames = np.empty((length, 64, 64, 3), np.uint8)
    frames[:] = rng.integers(0, 80, 3)
    squares = [(rng.integers(0, 48, 2), rng.integers(-3, 4, 2), rng.integers(120, 256, 3)) for _ in range(2)]
    for t in range(length):
        for i, (pos, vel, colour) in enumerate(squares):
            if rng.random() < 0.1:
                vel = rng.integers(-3, 4, 2)
            pos = (pos + vel) % 48
            squares[i] = (pos, vel, colour)
            frames[t, pos[0] : pos[0] + 16, pos[1] : pos[1] + 16] = colour
    return frames


def write_dataset(root: Path) -> tuple[Path, Path]:
    from veorl.data.episodes import save_episode

    rng = np.random.default_rng(0)
    clips = root / "video_clips"
    (clips / "clips").mkdir(parents=True)
    np.save(clips / "clips" / "bench-0.npy", np.stack([synthetic_video(25, rng) for _ in range(120)]))
    (clips / "manifest.json").write_text(
        json.dumps(
            {
                "version": 1,
                "size": 64,
                "window": 25,
                "sources": [{"status": "ok", "shards": [{"file": "clips/bench-0.npy", "clips": 120}]}],
            }
        )
    )
    episodes = root / "target_episodes"
    for i in range(6):
        n = 200
        save_episode(
            episodes / "episodes",
            i,
            {
                "image": synthetic_video(n, rng),
                "action": rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                "reward": rng.normal(size=n).astype(np.float32),
                "discount": np.ones(n, np.float32),
            },
        )
    return clips, episodes


def run_variant(variant: str, data_root: Path, threads: int, repeats: int, warmup: int) -> dict:
    import torch

    from veorl.algo.pretrain import Phase1Trainer, Phase2Losses, Phase2Trainer
    from veorl.algo.world_model_losses import trunk_world_model_loss
    from veorl.config import resolve
    from veorl.data.clips import ClipStore
    from veorl.data.episodes import EpisodeStore
    from veorl.data.samplers import ClipSampler, EpisodeWindowSampler, JointSampler, _to_tensors
    from veorl.models.world_models import VideoWorldModel, build_trunk_world_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    params = resolve({}, preset="paper", overrides=[f"pretrain.ban_on_source={variant == 'phase1-source'}"])
    cfg = params.pretrain
    keys = ("image", "action", "reward", "discount") if "trunk" in variant else ("image",)
    sampler = JointSampler(
        target=EpisodeWindowSampler(
            EpisodeStore(data_root / "target_episodes"), cfg.batch, cfg.seq_len, 0, 0, keys=keys
        ),
        source=ClipSampler(ClipStore(data_root / "video_clips"), cfg.source_batch, cfg.source_len, 0, 1),
    )
    model = VideoWorldModel(params.model)
    if variant.startswith("phase1"):
        trainer = Phase1Trainer(model, cfg)
        parameters, extra = trainer.parameters, None
    else:
        model.freeze_behaviours()
        trainer = Phase2Trainer(model, cfg)
        if variant.endswith("worst"):

            def every_transition(frames, shapes, _inner=trainer.transition_codes):
                _inner(frames, shapes)  # keep the frozen-encoder pass in the timing
                return [torch.arange(t - 1).expand(b, t - 1) for b, t in shapes]

            trainer.transition_codes = every_transition
        parameters = list(trainer.parameters)
        extra = None
        if "trunk" in variant:
            extra = build_trunk_world_model(params.model, action_dim=4, video_world_model=model)
            extra.encoder = model.encoder  # the encoder is shared between the Plan Net and the Trunk Net
            parameters += [p for n, p in extra.named_parameters() if not n.startswith("encoder.")]
    optimizer = torch.optim.Adam(parameters, lr=cfg.optim.lr, eps=cfg.optim.eps)
    per_step_sequences = cfg.batch + cfg.source_batch

    timings: list[dict] = []
    info: dict = {}
    for step in range(warmup + repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        batch = _to_tensors(sampler(step), False)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        terms = trainer.losses(batch)
        loss = terms.loss
        if extra is not None:
            target = batch["target"]
            trunk = trunk_world_model_loss(extra, target["image"], target["action"], target["reward"])
            loss = loss + trunk.loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(parameters, cfg.optim.grad_clip)
        optimizer.step()
        t4 = time.perf_counter()
        c4 = time.process_time()
        if step >= warmup:
            timings.append(
                {
                    "data": t1 - t0,
                    "forward": t2 - t1,
                    "backward": t3 - t2,
                    "optimizer": t4 - t3,
                    "update": t4 - t1,
                    "cpu": c4 - c0,
                }
            )
        if isinstance(terms, Phase2Losses):
            info["keyframes"] = float(terms.keyframes)
            info["behaviours_per_seq"] = float(terms.behaviours_per_seq)
    mean = {k: float(np.mean([t[k] for t in timings])) for k in timings[0]}
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {
        "variant": variant,
        "seconds": mean,
        "steps_per_s": 1.0 / mean["update"],
        "samples_per_s": per_step_sequences / mean["update"],
        "peak_rss_gb": peak_gb,
        "repeats": repeats,
        "threads": threads,
        **info,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed updates per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates first (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_variant(args.child, Path(args.data), args.threads, args.repeats, args.warmup)))
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="veorl-bench-") as tmp:
        write_dataset(Path(tmp))
        for variant in args.variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--data",
                tmp,
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
                "--warmup",
                str(args.warmup),
            ]
            done = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            )
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{variant}: {r['seconds']['update']:.2f} s/update", file=sys.stderr, flush=True)

    print(
        f"\nOne world-model update, paper sizes, fp32, CPU, {args.threads} threads, mean of {args.repeats} after "
        f"{args.warmup} warm-up (load average at the end: {os.getloadavg()[0]:.1f})\n"
    )
    print(
        "| variant | update s | data s | forward s | backward s | optimizer s | CPU s | steps/s | samples/s | "
        "peak RSS GB | vs reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["seconds"]
        ref = REFERENCE["phase1"] if r["variant"].startswith("phase1") else REFERENCE["phase2"]
        note = f"{ref / s['update']:.1f}x faster"
        if "keyframes" in r:
            note += f"; {r['keyframes']:.0f} keyframes, {r['behaviours_per_seq']:.1f} behaviours/seq"
        print(
            f"| {r['variant']} | {s['update']:.2f} | {s['data']:.2f} | {s['forward']:.2f} | {s['backward']:.2f} | "
            f"{s['optimizer']:.3f} | {s['cpu']:.2f} | {r['steps_per_s']:.3f} | {r['samples_per_s']:.1f} | "
            f"{r['peak_rss_gb']:.2f} | {note} |"
        )
    print(
        f"\nreference (authors' implementation, same machine class): phase 1 {REFERENCE['phase1']} s, "
        f"phase 2 {REFERENCE['phase2']} s per update, peak {REFERENCE['peak_gb']} GB"
    )
    for r in results:
        ref = REFERENCE["phase1"] if r["variant"].startswith("phase1") else REFERENCE["phase2"]
        print(
            f"ratio {r['variant']}: time {r['seconds']['update'] / ref:.3f} "
            f"of reference, peak memory {r['peak_rss_gb'] / REFERENCE['peak_gb']:.3f} of reference"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
