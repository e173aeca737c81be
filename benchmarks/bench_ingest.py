"""Benchmark of video ingestion against bare PyAV decoding, and its memory high-water mark.

    python benchmarks/bench_ingest.py                     # defaults: 12 videos x 300 frames, 256x256 H.264
    python benchmarks/bench_ingest.py --videos 24 --frames 600 --json bench.json

It writes synthetic but realistic videos (a textured scene panning under the camera, moving objects,
sensor noise) into a temporary folder, then measures on the same files:
  bare     PyAV decode + to_ndarray(rgb24) of every frame, nothing else (what a plain decoding loop costs),
           and the decoder alone without any conversion (the floor nobody can beat);
  ingest   the full ingestion (hash, decode, crop/resize, windows, shards, manifest) with workers=1,
           which is the apples-to-apples comparison, and with workers=2;
and the peak resident memory of a fresh process ingesting 10 vs 100 videos (it should be flat).
Each speed is the best of --repeats runs, so noise from other processes on the machine counts less.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm


def synthetic_frames(count: int, size: int, seed: int):
    """A scene a camera pans over: blocky texture + gradient, two moving discs, and per-frame sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((16, 16, 1), np.uint8))  # 2*size square, big enough to pan over
    ramp = np.linspace(0, 60, texture.shape[0], dtype=np.float32)
    texture = np.clip(texture * 0.7 + ramp[:, None, None], 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    colours = rng.integers(60, 256, (2, 3))
    for t in range(count):
        dy, dx = int(size / 2 * (1 + np.sin(t / 40))), (2 * t) % size
        frame = texture[dy : dy + size, dx : dx + size].copy()
        for k in range(2):
            cy = size / 2 + size / 3 * np.sin(t / (9 + 4 * k) + k)
            cx = size / 2 + size / 3 * np.cos(t / (13 + 3 * k))
            frame[(yy - cy) ** 2 + (xx - cx) ** 2 < (size / (8 + 4 * k)) ** 2] = colours[k]
        noise = rng.integers(-6, 7, frame.shape, dtype=np.int16)
        yield np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_videos(folder: Path, count: int, frames: int, size: int, seed: int = 0) -> list[Path]:
    from veorl.video.encode import write_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(count), desc=f"encoding {count} videos", unit="video", file=sys.stderr):
        path = folder / f"video_{i:04d}.mp4"
        write_video(path, synthetic_frames(frames, size, seed + i), fps=30, codec="libx264")
        paths.append(path)
    return paths


def bare_decode(paths: list[Path], to_rgb: bool = True) -> tuple[int, float]:
    """Frames and seconds for decoding every file with PyAV (to full-size RGB arrays, or not at all) and nothing
    else."""
    import av

    started, frames = time.perf_counter(), 0
    for path in paths:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                if to_rgb:
                    frame.to_ndarray(format="rgb24")
                frames += 1
    return frames, time.perf_counter() - started


def full_ingest(paths: list[Path], out: Path, workers: int) -> tuple[int, float, dict]:
    from veorl.config import resolve
    from veorl.video.ingest import ingest

    params = resolve({"ingest": {"workers": workers}}, preset="cpu")
    started = time.perf_counter()
    manifest = ingest([str(p) for p in paths], out, params, progress=False)
    elapsed = time.perf_counter() - started
    if manifest["totals"]["failed"]:
        raise RuntimeError(
            f"benchmark videos failed to ingest: {[e['error'] for e in manifest['sources'] if e['error']]}"
        )
    return manifest["totals"]["frames_decoded"], elapsed, manifest


def memory_child(folder: str, count: int, workers: int, out: str) -> None:
    """Runs in a fresh interpreter: ingest the first `count` videos, print peak RSS (MiB) of itself and its workers."""
    paths = sorted(Path(folder).glob("*.mp4"))[:count]
    frames, seconds, _ = full_ingest(paths, Path(out), workers)
    to_mib = 1 / 1024  # ru_maxrss is in KiB on Linux
    print(
        json.dumps(
            {
                "videos": len(paths),
                "workers": workers,
                "frames": frames,
                "seconds": seconds,
                "peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib,
                "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib,
            }
        )
    )


def measure_memory(folder: Path, count: int, workers: int, scratch: Path) -> dict:
    out = scratch / f"mem_{count}_{workers}"
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(folder), str(count), str(workers), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=12, help="videos for the speed comparison (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=300, help="frames per speed-test video (default: %(default)s)")
    parser.add_argument(
        "--size", type=int, default=256, help="frame side of the synthetic videos (default: %(default)s)"
    )
    parser.add_argument(
        "--memory-counts", default="10,100", help="video counts compared for peak memory (default: %(default)s)"
    )
    parser.add_argument(
        "--memory-frames", type=int, default=90, help="frames per memory-test video (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per speed measurement; the best counts (default: %(default)s)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", nargs=4, metavar=("DIR", "COUNT", "WORKERS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        folder, count, workers, out = args.memory_child
        memory_child(folder, int(count), int(workers), out)
        return 0

    results: dict = {"videos": args.videos, "frames_per_video": args.frames, "size": args.size}
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        scratch = Path(tmp)
        paths = make_videos(scratch / "speed", args.videos, args.frames, args.size)
        bare_decode(paths)  # warm the page cache and FFmpeg's lazy initialisation
        full_ingest(paths[:1], scratch / "warmup", 1)  # and the imports of the ingestion code

        # Interleaved repeats: load from other processes drifts, and drift should hit every variant alike.
        seconds: dict[str, list[float]] = {"bare": [], "decode_only": [], "ingest_w1": [], "ingest_w2": []}
        for repeat in tqdm(range(args.repeats), desc="measuring", unit="round", file=sys.stderr):
            frames, s = bare_decode(paths)
            seconds["bare"].append(s)
            seconds["decode_only"].append(bare_decode(paths, to_rgb=False)[1])
            for workers in (1, 2):
                ingest_frames, s = full_ingest(paths, scratch / f"ingest_w{workers}_{repeat}", workers)[:2]
                if ingest_frames != frames:
                    raise RuntimeError(f"ingestion decoded {ingest_frames} frames, bare decoding {frames}")
                seconds[f"ingest_w{workers}"].append(s)
        for name, runs in seconds.items():
            results[f"{name}_fps"] = frames / min(runs)
        results["overhead_w1"] = results["bare_fps"] / results["ingest_w1_fps"]

        counts = [int(c) for c in args.memory_counts.split(",")]
        make_videos(scratch / "memory", max(counts), args.memory_frames, args.size, seed=1000)
        results["memory"] = [measure_memory(scratch / "memory", c, w, scratch) for w in (1, 2) for c in counts]

    print(
        f"\n{args.videos} videos x {args.frames} frames, {args.size}x{args.size} H.264 -> 64x64 clips "
        f"(best of {args.repeats})"
    )
    print(f"  bare PyAV decode to RGB : {results['bare_fps']:8.0f} frames/s   (full-size RGB arrays, the reference)")
    print(
        f"  PyAV decode, no RGB     : {results['decode_only_fps']:8.0f} frames/s   "
        "(decoder alone, a floor nobody can beat)"
    )
    print(
        f"  ingest, workers=1       : {results['ingest_w1_fps']:8.0f} frames/s   "
        f"(bare/ingest = {results['overhead_w1']:.2f}x; target < 1.3x)"
    )
    print(f"  ingest, workers=2       : {results['ingest_w2_fps']:8.0f} frames/s")
    print(
        f"  decoder alone / ingest  : {results['decode_only_fps'] / results['ingest_w1_fps']:8.2f}x "
        "  (what hashing, crop/resize/RGB, windows and shard writes add to decoding)"
    )
    print(f"peak resident memory, fresh process per row ({args.memory_frames} frames per video):")
    for row in results["memory"]:
        worker = f"{row['peak_rss_worker_mib']:6.1f} MiB" if row["workers"] > 1 else "     (none)"
        print(
            f"  {row['videos']:4d} videos, workers={row['workers']}: main {row['peak_rss_main_mib']:6.1f} MiB, "
            f"largest worker {worker}, {row['frames'] / row['seconds']:6.0f} frames/s"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
