"""Throughput of one training update at the release's Meta-World sizes, against this machine's own limits (a script,
not a test).

    .venv/bin/python benchmarks/bench_world_model.py [--threads 2] [--repeats 2] [--warmup 1]
        [--precision auto|fp32|bf16] [--compile] [--variants phase1 phase2-trunk phase3] [--device cpu|cuda]
        [--json out.json]

Paper sizes (ModelParams defaults: d=32, deter 200, stoch 50, hidden 200, K=50, Z=8), batch 50 target sequences x 50
steps and 50 source clips x 25 frames, 64x64, CPU (`--preset smoke` runs the same code at the smoke sizes, to check
the script quickly). Each variant runs in its own child process so that its peak resident memory (RSS high-water
mark) is its own. Per update it reports data (sampling the batch from on-disk clip shards and episode files into
tensors; in training a prefetch thread hides this), forward (all losses; for phase3 everything but the backward
passes and the optimiser steps), backward, and optimizer (gradient clip + Adam; for phase3 the Adam steps), the
process CPU seconds of the whole update (with 1 thread: the compute itself, whatever the machine's load; with more,
it includes OpenMP spin-waiting), then steps/s and samples/s.

Warm-up: at least `--warmup` untimed updates. With memory retained (training's default, retain_memory: true), the
first updates still grow malloc's heap, and every new page is faulted in on first touch; the warm-up goes on (at most
`--settle` updates more) until an update faults in less than 64 MiB, so that the timed updates run on the settled heap
that training runs thousands of updates on. The notes give the warm-up count and the memory faulted in per timed
update.

No figure from another machine is compared with: in the same run, a child process measures this machine's own
limits with the same thread count, before the variants and again after them (the higher of the two counts): a large
GEMM (2048^3 by default) and a convolution shaped like the encoder's largest (256 x 32 x 31 x 31 -> 64 channels,
kernel 4, stride 2, channels-last), each in fp32 and in bf16, timed after warm-up. Each variant's FLOPs are counted
on one update (forward and backward) with torch.utils.flop_counter.FlopCounterMode (matrix products and
convolutions), and its achieved FLOP/s is printed as a fraction of the GEMM and of the convolution throughput in the
precision the variant ran in.

Precision: by default what training does by default (`precision: auto`, veorl.acceleration: bf16 autocast on a CPU
with AVX512-BF16 or AMX, fp32 elsewhere); `--precision fp32|bf16` forces one. `--compile` compiles the networks'
forward as `compile: true` does (the warm-up updates then include the compilation: use --warmup 2 or more).

On a GPU (`--device cuda` or `cuda:N`), the networks and batches live on that GPU, every section's clock waits for
the GPU's queued kernels, the limits are that GPU's own GEMM and convolution throughput, `auto` resolves as training
resolves it there, and the notes add the peak GPU memory (`torch.cuda.max_memory_allocated`). One GPU against all of
them is `benchmarks/bench_processes.py` (pretraining under torchrun, one process per GPU).

Variants:
  phase1          release data flow (BAN and Plan Net on target frames; source only via MMD)
  phase1-source   our default (pretrain.ban_on_source: BAN and Plan Net on source clips too): more work per update
  phase2          keyframe Plan Net + F_BC + MMD on source and target keyframes (this stage's phase 2)
  phase2-trunk    phase2 plus the Trunk Net world-model loss on the target batch: what the release's phase-2 update
                  computes
  phase2-trunk-worst  as phase2-trunk with every transition its own behaviour (most keyframes; the memory worst case)
  phase3          fine-tuning's policy update (veorl.algo.finetune.PolicyPhase.update, the networks built by
                  build_model_based as fine-tuning builds them): Trunk Net posterior over the B x T = 2500 start
                  states, 15-step imagination with behaviour guidance and the ensemble penalty, actor and critic
                  updates (critic warm-up off, so the actor's update is timed too); samples = imagined states.
                  As training does by default, the start states' embeddings come from the table of the frozen
                  encoder's embeddings of the target frames (finetune.embedding_cache_gb), built once before the
                  timed updates (the notes give its time)
  phase3-uncached phase3 encoding the 50 x 50 start frames at every update (embedding_cache_gb: 0; the release's
                  way)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("phase1", "phase1-source", "phase2", "phase2-trunk", "phase2-trunk-worst", "phase3", "phase3-uncached")
ACTION_DIM = 4
# The encoder's largest convolution at d=32: 32 -> 64 channels, kernel 4, stride 2, on 31x31 maps.
CONV_SHAPE = {"channels": 32, "out_channels": 64, "size": 31, "kernel": 4, "stride": 2}
# An update that faults in less new memory than this counts as run on a settled heap (see run_variant).
SETTLED_FAULT_BYTES = 64 * 2**20
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped in on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
                "action": rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
                "reward": rng.normal(size=n).astype(np.float32),
                "discount": np.ones(n, np.float32),
            },
        )
    return clips, episodes


# ------------------------------------------------------------------------------------------------
# This machine's limits
# ------------------------------------------------------------------------------------------------


def machine(device: str = "cpu") -> dict:
    import torch

    from veorl.acceleration import cpu_has_bf16, cpu_model_name

    info = {
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "bf16_instructions": cpu_has_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def synchronizer(device: str):
    """A function that waits until `device` has run the kernels queued on it (a GPU runs them asynchronously, so a
    clock read without it times the queueing); nothing to wait for on a CPU."""
    import torch

    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _throughput(fn, flops: float, seconds: float, warmup: int = 2, sync=lambda: None) -> float:
    """FLOP/s of `fn` (which computes `flops`), timed for at least `seconds` (3 calls at least) after warm-up."""
    for _ in range(warmup):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
        sync()
    return flops * calls / (time.perf_counter() - start)


def measure_peaks(threads: int, gemm: int, conv_batch: int, seconds: float, device: str = "cpu") -> dict:
    """GEMM and convolution throughput (FLOP/s) of this machine (or of `device`) in fp32 and bf16, with `threads`
    threads."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = CONV_SHAPE
    sync = synchronizer(device)
    out: dict = {"gemm_size": gemm, "conv": {**c, "batch": conv_batch}, "threads": threads, "device": device}
    with torch.no_grad():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = (torch.randn(gemm, gemm, dtype=dtype, device=device) for _ in range(2))
            out[f"gemm_{name}"] = _throughput(lambda a=a, b=b: a @ b, 2.0 * gemm**3, seconds, sync=sync)
            x = torch.randn(conv_batch, c["channels"], c["size"], c["size"]).to(
                device=device, dtype=dtype, memory_format=torch.channels_last
            )
            w = torch.randn(c["out_channels"], c["channels"], c["kernel"], c["kernel"]).to(
                device=device, dtype=dtype, memory_format=torch.channels_last
            )

            def conv(x=x, w=w):
                return F.conv2d(x, w, stride=c["stride"])

            with FlopCounterMode(display=False) as counter:
                conv()
            out[f"conv_{name}"] = _throughput(conv, float(counter.get_total_flops()), seconds, sync=sync)
    return out


PEAK_KEYS = ("gemm_fp32", "gemm_bf16", "conv_fp32", "conv_bf16")


def best_peaks(*measurements: dict) -> dict:
    """This machine's limits from several measurements (before and after the variants): the highest of each. A
    VM's throughput drifts over minutes; a limit taken at one slow moment would overstate every fraction of it."""
    best = dict(measurements[0])
    for key in PEAK_KEYS:
        best[key] = max(m[key] for m in measurements)
    best["measurements"] = [{key: m[key] for key in PEAK_KEYS} for m in measurements]
    return best


def attach_limits(result: dict, peaks: dict, info: dict) -> None:
    """Add to a result (with `precision` and `flops_per_s`) the limits in its precision, its fractions of them, the
    machine and the peaks measured."""
    result["peak_gemm_flops_per_s"] = peaks[f"gemm_{result['precision']}"]
    result["peak_conv_flops_per_s"] = peaks[f"conv_{result['precision']}"]
    result["fraction_of_gemm_peak"] = result["flops_per_s"] / result["peak_gemm_flops_per_s"]
    result["fraction_of_conv_peak"] = result["flops_per_s"] / result["peak_conv_flops_per_s"]
    result["machine"], result["peaks"] = info, peaks


def _peak_line(peaks: dict) -> str:
    return (
        f"GEMM fp32 {peaks['gemm_fp32'] / 1e9:.1f}, bf16 {peaks['gemm_bf16'] / 1e9:.1f} GFLOP/s; "
        f"conv fp32 {peaks['conv_fp32'] / 1e9:.1f}, bf16 {peaks['conv_bf16'] / 1e9:.1f} GFLOP/s"
    )


# ------------------------------------------------------------------------------------------------
# One variant
# ------------------------------------------------------------------------------------------------


class SectionClock:
    """Seconds spent in Tensor.backward and in optimizer steps while it is entered (the rest of an update is the
    forward pass and bookkeeping); lets a trainer's own `update` be timed section by section."""

    def __init__(self, optimizers, sync=lambda: None):
        import torch

        self.torch, self.optimizers, self.sync = torch, optimizers, sync
        self.backward = self.optimizer = 0.0
        self._handles: list = []
        self._step_start = 0.0

    def __enter__(self) -> SectionClock:
        original = self.torch.Tensor.backward
        clock = self

        def timed_backward(tensor, *args, **kwargs):
            clock.sync()
            start = time.perf_counter()
            try:
                return original(tensor, *args, **kwargs)
            finally:
                clock.sync()
                clock.backward += time.perf_counter() - start

        self._original = original
        self.torch.Tensor.backward = timed_backward

        def before(*_):
            self.sync()
            self._step_start = time.perf_counter()

        def after(*_):
            self.sync()
            self.optimizer += time.perf_counter() - self._step_start

        for optimizer in self.optimizers:
            self._handles += [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]
        return self

    def __exit__(self, *exc) -> None:
        self.torch.Tensor.backward = self._original
        for handle in self._handles:
            handle.remove()


def build_variant(variant: str, data_root: Path, preset: str, precision: str, compile_: bool, device: str = "cpu"):
    """(update(step) -> (seconds by section, info), samples per update, sample unit) for one variant, its networks
    and batches on `device`."""
    import torch

    from veorl.acceleration import compile_networks
    from veorl.config import resolve
    from veorl.data.clips import ClipStore
    from veorl.data.episodes import EpisodeStore
    from veorl.data.samplers import ClipSampler, EpisodeWindowSampler, JointSampler, _to_device, _to_tensors

    sync = synchronizer(device)

    if variant in ("phase3", "phase3-uncached"):
        from veorl.algo import embedding_cache
        from veorl.algo.baselines import switches
        from veorl.algo.finetune import START_STREAM, PolicyPhase, build_model_based
        from veorl.models.world_models import VideoWorldModel

        overrides = ["finetune.critic_warmup=0"]
        if variant == "phase3-uncached":
            overrides.append("finetune.embedding_cache_gb=0")
        params = resolve({}, preset=preset, overrides=overrides)
        fp = params.finetune
        sw = switches(fp)
        video_wm = VideoWorldModel(params.model).to(device)
        video_wm.freeze_behaviours()
        trunk, guidance, actor, critic = build_model_based(params, sw, ACTION_DIM, "continuous", video_wm, device)
        if compile_:
            compile_networks(trunk, video_wm, guidance, actor, critic)
        # As fine-tuning sets phase 3 up (veorl.algo.finetune.run): window indices into the embedding table when it
        # fits the budget, else images.
        store = EpisodeStore(data_root / "target_episodes")
        embeddings = embedding_cache.for_store(store, trunk.encoder, precision, fp.embedding_cache_gb)
        phase = PolicyPhase(trunk, actor, critic, params, sw, guidance, precision, embeddings)
        phase.freeze_world_model()
        frames = embedding_cache.frame_keys(embeddings)
        starts = EpisodeWindowSampler(store, fp.batch, fp.seq_len, 0, START_STREAM, keys=(*frames, "action"))
        if embeddings is not None:  # before the timed updates, as the first update of the phase builds it
            embeddings.build()

        def update(step: int) -> tuple[dict, dict]:
            t0 = time.perf_counter()
            batch = _to_device(_to_tensors(starts(step), False), device)
            sync()
            t1 = time.perf_counter()
            with SectionClock([phase.actor_optimizer, phase.critic_optimizer], sync) as clock:
                phase.update(batch)
            sync()
            t2 = time.perf_counter()
            rest = t2 - t1 - clock.backward - clock.optimizer
            info = {}
            if embeddings is not None:
                info["embedding_cache"] = {"frames": len(embeddings.table), "build_s": embeddings.build_seconds}
            return {"data": t1 - t0, "forward": rest, "backward": clock.backward, "optimizer": clock.optimizer}, info

        return update, fp.batch * fp.seq_len * fp.horizon, "imagined states"

    from veorl.algo.pretrain import Phase1Trainer, Phase2Losses, Phase2Trainer
    from veorl.algo.world_model_losses import trunk_world_model_loss
    from veorl.models.world_models import VideoWorldModel, build_trunk_world_model

    params = resolve({}, preset=preset, overrides=[f"pretrain.ban_on_source={variant == 'phase1-source'}"])
    cfg = params.pretrain
    keys = ("image", "action", "reward", "discount") if "trunk" in variant else ("image",)
    sampler = JointSampler(
        target=EpisodeWindowSampler(
            EpisodeStore(data_root / "target_episodes"), cfg.batch, cfg.seq_len, 0, 0, keys=keys
        ),
        source=ClipSampler(ClipStore(data_root / "video_clips"), cfg.source_batch, cfg.source_len, 0, 1),
    )
    model = VideoWorldModel(params.model).to(device)
    extra = None
    if variant.startswith("phase1"):
        trainer = Phase1Trainer(model, cfg, precision)
        parameters = trainer.parameters
    else:
        model.freeze_behaviours()
        trainer = Phase2Trainer(model, cfg, precision)
        if variant.endswith("worst"):

            def every_transition(frames, shapes, _inner=trainer.transition_codes):
                _inner(frames, shapes)  # keep the frozen-encoder pass in the timing
                return [torch.arange(t - 1, device=frames.device).expand(b, t - 1) for b, t in shapes]

            trainer.transition_codes = every_transition
        parameters = list(trainer.parameters)
        if "trunk" in variant:
            extra = build_trunk_world_model(params.model, action_dim=ACTION_DIM, video_world_model=model).to(device)
            extra.encoder = model.encoder  # the encoder is shared between the Plan Net and the Trunk Net
            parameters += [p for n, p in extra.named_parameters() if not n.startswith("encoder.")]
    if compile_:
        compile_networks(model, extra)
    optimizer = torch.optim.Adam(parameters, lr=cfg.optim.lr, eps=cfg.optim.eps)

    def update(step: int) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        batch = _to_device(_to_tensors(sampler(step), False), device)
        sync()
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        terms = trainer.losses(batch)  # under the trainer's precision
        loss = terms.loss
        if extra is not None:
            target = batch["target"]
            with trainer.autocast():
                trunk = trunk_world_model_loss(extra, target["image"], target["action"], target["reward"])
            loss = loss + trunk.loss
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(parameters, cfg.optim.grad_clip)
        optimizer.step()
        sync()
        t4 = time.perf_counter()
        info = {}
        if isinstance(terms, Phase2Losses):
            info = {"keyframes": float(terms.keyframes), "behaviours_per_seq": float(terms.behaviours_per_seq)}
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}, info

    return update, cfg.batch + cfg.source_batch, "sequences"


# Operators that do the FLOPs the peaks measure (matrix products and convolutions, forward and backward).
DENSE_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "conv", "mkldnn", "onednn", "gemm")


def profile_update(update, step: int, top: int = 25, device: str = "cpu") -> tuple[str, dict]:
    """One more update under torch.profiler: the operators by self CPU time (on a GPU: self GPU time) in a table, and
    the share of that time spent in dense operators (DENSE_OPS) against everything else."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        update(step)
    averages = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in averages)
    dense = sum(getattr(e, key) for e in averages if any(k in e.key.lower() for k in DENSE_OPS))
    table = averages.table(sort_by=key, row_limit=top)
    return table, {"profiled_s": total / 1e6, "dense_share": dense / total if total else float("nan")}


def run_variant(
    variant: str,
    data_root: Path,
    threads: int,
    repeats: int,
    warmup: int,
    preset: str,
    precision: str,
    compile_: bool,
    profile_dir: str | None = None,
    native_deconv: bool = False,
    system_malloc: bool = False,
    settle: int = 6,
    device: str = "cpu",
) -> dict:
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from veorl.acceleration import eager
    from veorl.models.networks import native_transposed_convolutions
    from veorl.runtime import MemoryBound, retain_freed_memory

    # As the training stages do by default (retain_memory: true), unless --system-malloc compares without it.
    retained = retain_freed_memory(not system_malloc)

    # --native-transposed-convs: the decoders' transposed convolutions all run PyTorch's own forward.
    stack = contextlib.ExitStack()
    if native_deconv:
        stack.enter_context(native_transposed_convolutions())

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    update, per_step, unit = build_variant(variant, data_root, preset, precision, compile_, device)

    timings: list[dict] = []
    faults: list[int] = []
    info: dict = {}
    memory = MemoryBound()  # as the training loop bounds retained memory (its check is not in the timings)
    # With retained memory, the first updates still grow the heap: their new pages are faulted in, one by one, and
    # that costs more than some of the kernels (on a VM, a few microseconds a page). Training runs thousands of
    # updates on a settled heap, so the warm-up goes on until an update faults in less than SETTLED_FAULT_BYTES (at
    # most `settle` updates more). With the system's malloc every update faults its large blocks in afresh, so there
    # is nothing to wait for.
    step, warmed = 0, 0
    while len(timings) < repeats:
        c0, f0 = time.process_time(), _minor_faults()
        seconds, info = update(step)
        c1, f1 = time.process_time(), _minor_faults()
        step += 1
        memory.after_update()
        seconds["update"] = seconds["forward"] + seconds["backward"] + seconds["optimizer"]
        seconds["cpu"] = c1 - c0
        unsettled = retained and (f1 - f0) * PAGE_BYTES >= SETTLED_FAULT_BYTES and warmed < warmup + settle
        if warmed < warmup or unsettled:
            warmed += 1
            continue
        timings.append(seconds)
        faults.append(f1 - f0)
    if profile_dir:  # a settled update too, before the FLOP count's own update changes the heap
        table, shares = profile_update(update, step, device=device)
        tag = f"{variant}-{precision}{'-compiled' if compile_ else ''}{'-native-deconv' if native_deconv else ''}"
        Path(profile_dir, f"profile-{tag}.txt").write_text(table + "\n")
        info = {**info, **shares}
        step += 1
    # FLOPs of one more update (forward and backward), counted on the eager code (same maths when compiled) with the
    # native transposed convolutions: the method's arithmetic, without the zero taps the sub-pixel forward pads.
    with eager(), native_transposed_convolutions(), FlopCounterMode(display=False) as counter:
        update(step)
    flops = float(counter.get_total_flops())
    stack.close()
    mean = {k: float(np.mean([t[k] for t in timings])) for k in timings[0]}
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if device.startswith("cuda"):
        info = {**info, "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    return {
        "variant": variant,
        "device": device,
        "seconds": mean,
        "steps_per_s": 1.0 / mean["update"],
        "samples_per_s": per_step / mean["update"],
        "sample_unit": unit,
        "peak_rss_gb": peak_gb,
        "repeats": repeats,
        "threads": threads,
        "preset": preset,
        "precision": precision,
        "compile": compile_,
        "native_transposed_convs": native_deconv,
        "retain_memory": retained,
        "warmup_updates": warmed,
        "minor_faults_per_update": float(np.mean(faults)),
        "flops_per_update": flops,
        "flops_per_s": flops / mean["update"],
        **info,
    }


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--settle",
        str(args.settle),
        "--preset",
        args.preset,
        "--precision",
        args.precision,
        "--gemm",
        str(args.gemm),
        "--conv-batch",
        str(args.conv_batch),
        "--peak-seconds",
        str(args.peak_seconds),
        "--device",
        args.device,
        *(["--compile"] if args.compile else []),
        *(["--native-transposed-convs"] if args.native_transposed_convs else []),
        *(["--system-malloc"] if args.system_malloc else []),
        *(["--profile", args.profile] if args.profile else []),
        *extra,
    ]
    return run_child(cmd, args.threads)


def run_child(cmd: list[str], threads: int) -> dict:
    """Run a benchmark's child process with `threads` OpenMP threads; its result is the JSON on its last stdout line.
    A failing child's stderr is printed and its exit status ends the caller."""
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed updates per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates first (default: %(default)s)")
    parser.add_argument(
        "--settle",
        type=int,
        default=6,
        help=f"with memory retained, at most this many more untimed updates while an update still faults in "
        f"{SETTLED_FAULT_BYTES // 2**20} MiB or more of new pages, i.e. until the heap has grown to what training "
        "settles at (default: %(default)s)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="forward-pass precision; auto = what training resolves on this machine (default: %(default)s)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks' forward (compile: true)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda / cuda:N: the networks, batches and the limits measured on that GPU",
    )
    parser.add_argument(
        "--native-transposed-convs",
        action="store_true",
        help="run every decoder transposed convolution with PyTorch's own forward, not the sub-pixel one the decoder "
        "picks on a CPU (to compare; benchmarks/bench_deconv.py times the layers alone)",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave malloc as the system sets it, not as training does by default (retain_memory: true keeps freed "
        "host memory for reuse; to compare)",
    )
    parser.add_argument(
        "--preset", default="paper", help="sizes: paper (the release's; default) or smoke (a quick check of the script)"
    )
    parser.add_argument("--gemm", type=int, default=2048, help="side of the square GEMM of the peak (default: 2048)")
    parser.add_argument("--conv-batch", type=int, default=256, help="batch of the peak convolution (default: 256)")
    parser.add_argument(
        "--peak-seconds", type=float, default=2.0, help="seconds each peak measurement is timed for (default: 2)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="profile one more update of each variant (torch.profiler, after the timed ones): DIR/profile-VARIANT-"
        "PRECISION.txt lists the operators by self CPU time, and the table gains the share spent in matrix products "
        "and convolutions",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda"):
            parser.error(f"--device {args.device}: use cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device on this machine")
    if args.child == "peak":
        print(json.dumps(measure_peaks(args.threads, args.gemm, args.conv_batch, args.peak_seconds, args.device)))
        return 0
    if args.child:
        result = run_variant(
            args.child,
            Path(args.data),
            args.threads,
            args.repeats,
            args.warmup,
            args.preset,
            args.precision,
            args.compile,
            args.profile,
            args.native_transposed_convs,
            args.system_malloc,
            args.settle,
            args.device,
        )
        print(json.dumps(result))
        return 0

    from veorl.acceleration import resolve_precision

    args.precision = resolve_precision(args.precision, args.device)  # once, as a training stage does
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    gpu = f", GPU {info['gpu']} ({info['gpu_count']} visible), on {args.device}" if "gpu" in info else ""
    print(
        f"machine: {info['cpu_model']}, {info['cpu_count']} logical CPUs, bf16 instructions: "
        f"{'yes' if info['bf16_instructions'] else 'no'}{gpu}; torch {info['torch']}; {args.threads} threads",
        file=sys.stderr,
        flush=True,
    )
    before = _child(args, "--child", "peak")
    print(f"peak, before: {_peak_line(before)}", file=sys.stderr, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="veorl-bench-") as tmp:
        write_dataset(Path(tmp))
        for variant in args.variants:
            r = _child(args, "--child", variant, "--data", tmp)
            results.append(r)
            print(f"{variant}: {r['seconds']['update']:.2f} s/update", file=sys.stderr, flush=True)
    after = _child(args, "--child", "peak")
    print(f"peak, after: {_peak_line(after)}", file=sys.stderr, flush=True)
    peaks = best_peaks(before, after)
    for r in results:
        attach_limits(r, peaks, info)

    compiled = ", compiled networks" if args.compile else ""
    compiled += ", native transposed-convolution forwards" if args.native_transposed_convs else ""
    compiled += ", system malloc (freed memory not retained)" if args.system_malloc else ""
    print(
        f"\nOne training update, {args.preset} sizes, {args.precision}{compiled}, CPU {info['cpu_model']} "
        f"({info['cpu_count']} logical CPUs, bf16 instructions: {'yes' if info['bf16_instructions'] else 'no'}){gpu}, "
        f"{args.threads} threads, mean of {args.repeats} after at least {args.warmup} warm-up "
        f"(load average at the end: {os.getloadavg()[0]:.1f}); torch {info['torch']}\n"
    )
    c = peaks["conv"]
    where = f"This GPU's limits ({args.device})" if gpu else f"This machine's limits, {args.threads} threads"
    print(
        f"{where} (the higher of {len(peaks['measurements'])} measurements, "
        f"before and after the variants): GEMM {args.gemm}^3 fp32 "
        f"{peaks['gemm_fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['gemm_bf16'] / 1e9:.1f} GFLOP/s; "
        f"conv2d {c['batch']}x{c['channels']}x{c['size']}x{c['size']} -> "
        f"{c['out_channels']} (k{c['kernel']} s{c['stride']}, channels-last) fp32 {peaks['conv_fp32'] / 1e9:.1f} "
        f"GFLOP/s, bf16 {peaks['conv_bf16'] / 1e9:.1f} GFLOP/s\n"
    )
    print(
        "| variant | precision | update s | data s | forward s | backward s | optimizer s | CPU s | steps/s | "
        "samples/s | peak RSS GB | GFLOP/update | GFLOP/s | of GEMM peak | of conv peak | notes |"
    )
    print("|---" * 16 + "|")
    for r in results:
        s = r["seconds"]
        note = f"samples = {r['sample_unit']}; {r['warmup_updates']} warm-up"
        note += f", {r['minor_faults_per_update'] * PAGE_BYTES / 2**20:.0f} MiB faulted in per timed update"
        if "keyframes" in r:
            note += f"; {r['keyframes']:.0f} keyframes, {r['behaviours_per_seq']:.1f} behaviours/seq"
        if "embedding_cache" in r:
            cache = r["embedding_cache"]
            note += f"; embeddings of the {cache['frames']} target frames cached once in {cache['build_s']:.2f} s"
        if "peak_gpu_memory_gb" in r:
            note += f"; peak GPU memory {r['peak_gpu_memory_gb']:.2f} GB"
        if "dense_share" in r:
            time_of = "GPU" if gpu else "CPU"
            note += f"; profiled: {r['dense_share']:.0%} of {time_of} time in matmul/conv operators"
        print(
            f"| {r['variant']} | {r['precision']}{' compiled' if r['compile'] else ''} | {s['update']:.2f} | "
            f"{s['data']:.2f} | {s['forward']:.2f} | {s['backward']:.2f} | {s['optimizer']:.3f} | {s['cpu']:.2f} | "
            f"{r['steps_per_s']:.3f} | {r['samples_per_s']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['flops_per_update'] / 1e9:.1f} | {r['flops_per_s'] / 1e9:.1f} | {r['fraction_of_gemm_peak']:.2f} | "
            f"{r['fraction_of_conv_peak']:.2f} | {note} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
