"""Video ingestion end to end on real files written with PyAV: codecs and containers, image sequences,
damaged input, odd sizes and frame rates, clip content, S3 on a local server, re-runs, the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests.builders import smoke_params
from veorl.config import ConfigError
from veorl.data.clips import ClipStore
from veorl.video.decode import open_video, square_frames
from veorl.video.encode import write_video
from veorl.video.ingest import ingest, summarize

REPO = Path(__file__).resolve().parents[2]
# Grey-level step between consecutive frames of the index-coded test videos; codec error stays well under half.
STEP = 10


def smoke(**ingest_settings):
    """Smoke-preset parameters (window 12, stride 6) with ingest settings overridden.

    pretrain.source_len is lowered so that short test windows pass the cross-check source_len <= window.
    """
    return smoke_params(raw={"ingest": ingest_settings, "pretrain": {"source_len": 2}})


def indexed_frames(count: int, height: int, width: int, step: int = STEP):
    """Frame i: its centre square (what a centre crop keeps) is grey level step*i; the rest is pure red."""
    side = min(height, width)
    y0, x0 = (height - side) // 2, (width - side) // 2
    for i in range(count):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = 255
        frame[y0 : y0 + side, x0 : x0 + side] = step * i
        yield frame


def frame_index(frame: np.ndarray, step: int = STEP) -> int:
    return int(round(float(frame[..., 1].mean()) / step))


def save_image(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24").save(str(path))


def entry_for(manifest: dict, suffix: str) -> dict:
    found = [e for e in manifest["sources"] if e["uri"].endswith(suffix)]
    assert len(found) == 1, f"expected one source ending in {suffix!r}, got {[e['uri'] for e in manifest['sources']]}"
    return found[0]


def load_clips(out: Path, entry: dict) -> np.ndarray:
    arrays = [np.load(out / shard["file"]) for shard in entry["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros((0,))


# ----------------------------------------------------------------------------------------------


CODECS = [
    # file name, encoder, decoder name PyAV reports, encoder options
    ("h264.mp4", "libx264", "h264", None),
    ("vp9.webm", "libvpx-vp9", "vp9", None),
    ("mpeg4.avi", "mpeg4", "mpeg4", {"qmax": "2"}),
    ("h264.mkv", "libx264", "h264", None),
    ("hevc.mov", "libx265", "hevc", {"x265-params": "log-level=none"}),
    ("av1.mkv", "libsvtav1", "libdav1d", None),
]


def test_every_codec_and_container_is_ingested_into_clipstore_clips(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    for name, encoder, _, options in CODECS:
        write_video(src / name, indexed_frames(20, 48, 64), fps=10, codec=encoder, options=options)
    (src / "notes.txt").write_text("camera calibration notes, not a video\n")
    out = tmp_path / "clips"

    manifest = ingest([str(src)], out, smoke(window=8, stride=4), progress=False)

    assert sorted(Path(e["uri"]).name for e in manifest["sources"]) == sorted(
        n for n, *_ in CODECS
    )  # notes.txt ignored
    for name, _, decoder, _ in CODECS:
        entry = entry_for(manifest, name)
        assert entry["status"] == "ok", (name, entry["error"])
        assert (entry["codec"], entry["width"], entry["height"], entry["frames"]) == (decoder, 64, 48, 20), name
        assert entry["clips"] == (20 - 8) // 4 + 1
        clips = load_clips(out, entry)
        assert clips.shape == (4, 8, 64, 64, 3) and clips.dtype == np.uint8
        assert [frame_index(f) for f in clips[1]] == list(range(4, 12)), name
    assert manifest["complete"] and manifest["totals"]["clips"] == 4 * len(CODECS)
    store = ClipStore(out)
    assert len(store) == 4 * len(CODECS)
    assert store.sample(3, 5, np.random.default_rng(0)).shape == (3, 5, 64, 64, 3)
    assert (out / "config.json").is_file() and json.loads((out / "provenance.json").read_text())["config"]["ingest"][
        "window"
    ] == 8


def test_clips_follow_window_and_stride_and_keep_only_the_centre_square(tmp_path):
    path = tmp_path / "wide.mp4"
    write_video(path, indexed_frames(40, 64, 96, step=6), fps=10, pix_fmt="yuv444p")

    manifest = ingest([str(path)], tmp_path / "out", smoke(clips_per_shard=2), progress=False)  # window 12, stride 6

    entry = manifest["sources"][0]
    assert entry["clips"] == 5 and [s["clips"] for s in entry["shards"]] == [2, 2, 1]
    assert all(s["file"] == f"clips/{entry['key']}-{k:04d}.npy" for k, s in enumerate(entry["shards"]))
    store = ClipStore(tmp_path / "out")
    assert len(store) == 5
    for c in range(5):
        clip = store.clip(c).astype(int)
        assert [frame_index(f, step=6) for f in clip] == list(range(6 * c, 6 * c + 12))
        # The red side bands lie outside the 64x64 centre square: no red may survive the crop.
        assert np.abs(clip[..., 0] - clip[..., 1]).max() <= 8


def test_odd_size_and_frame_rates_resample_to_the_nearest_frame_in_time(tmp_path):
    odd = tmp_path / "odd_7fps.mkv"  # 97x61 at 7 fps: 21 frames = 3.0 s
    write_video(odd, indexed_frames(21, 61, 97), fps=7, pix_fmt="yuv444p")
    ntsc = tmp_path / "ntsc.mp4"  # 45 frames at 29.97 fps = 1.5015 s
    write_video(ntsc, indexed_frames(45, 48, 64, step=5), fps=Fraction(30000, 1001))

    reader = open_video(odd)
    frames = list(square_frames(reader, 64, fps=10.0))
    assert (reader.info.width, reader.info.height, reader.info.fps_in) == (97, 61, 7.0)
    assert len(frames) == 30
    assert np.abs(frames[0].astype(int)[..., 0] - frames[0].astype(int)[..., 1]).max() <= 8  # crop removed the red
    for k, frame in enumerate(frames):
        source_time = k / 10 * 7  # target time in source frames
        if abs(source_time - math.floor(source_time) - 0.5) > 0.05:  # skip exact ties
            assert frame_index(frame) == round(source_time), k

    for fps, expected_odd in [(None, 21), (10.0, 30), (3.0, 9)]:
        manifest = ingest(
            [str(odd), str(ntsc)], tmp_path / f"out_{fps}", smoke(fps=fps, window=4, stride=2), progress=False
        )
        assert entry_for(manifest, "odd_7fps.mkv")["frames"] == expected_odd
        expected_ntsc = 45 if fps is None else math.ceil(45 * 1001 / 30000 * fps - 1e-3)
        assert entry_for(manifest, "ntsc.mp4")["frames"] == expected_ntsc
        assert manifest["fps"] == fps
    assert entry_for(manifest, "ntsc.mp4")["fps_in"] == pytest.approx(30000 / 1001)


def test_image_sequence_folders_are_trajectories_in_natural_frame_order(tmp_path):
    root = tmp_path / "bridge"
    for i, frame in enumerate(indexed_frames(14, 48, 64)):
        save_image(frame, root / "traj_png" / f"im_{i}.png")  # im_10 must come after im_9
        save_image(frame, root / "scene" / "traj_jpg" / f"{i:03d}.jpg")
    (root / "scene" / "traj_jpg" / "lang.txt").write_text("open the drawer")
    out = tmp_path / "out"

    manifest = ingest([str(root)], out, smoke(), progress=False)

    png, jpg = entry_for(manifest, "traj_png"), entry_for(manifest, "traj_jpg")
    for entry, codec in [(png, "png"), (jpg, "mjpeg")]:
        assert entry["status"] == "ok" and entry["kind"] == "image_sequence" and entry["codec"] == codec
        assert (entry["frames"], entry["clips"], entry["width"], entry["height"]) == (14, 1, 64, 48)
        assert [frame_index(f) for f in load_clips(out, entry)[0]] == list(range(12))

    # A glob over frame files names the same trajectory (same frames, same content hash).
    globbed = ingest([str(root / "traj_png" / "im_*.png")], tmp_path / "glob", smoke(), progress=False)
    assert [(e["uri"], e["kind"], e["content_hash"]) for e in globbed["sources"]] == [
        (png["uri"], "image_sequence", png["content_hash"])
    ]

    # With a target rate, image sequences play at ingest.image_fps: 14 frames at 5 Hz = 2.8 s -> 7 frames at 2.5 fps.
    halved = ingest([str(root / "traj_png")], tmp_path / "half", smoke(fps=2.5, window=3, stride=1), progress=False)
    assert halved["sources"][0]["frames"] == 7
    assert [frame_index(c[0]) for c in load_clips(tmp_path / "half", halved["sources"][0])] == [0, 2, 4, 6, 8]


def _video_with_garbage_packets(path: Path, frames: int, garbage: range) -> None:
    """An H.264 MP4 in which some packets are replaced by random bytes (decoders drop those silently)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        count = 0

        def mux(packets):
            nonlocal count
            for packet in packets:
                if count in garbage:
                    junk = av.Packet(rng.integers(0, 256, max(packet.size, 64), dtype=np.uint8).tobytes())
                    junk.pts, junk.dts, junk.time_base, junk.stream = (
                        packet.pts,
                        packet.dts,
                        packet.time_base,
                        packet.stream,
                    )
                    packet = junk
                container.mux(packet)
                count += 1

        for frame in indexed_frames(frames, 64, 64, step=5):
            mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        mux(stream.encode())


def test_damaged_files_are_recorded_as_failed_and_the_rest_is_ingested(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    write_video(src / "good.mp4", indexed_frames(30, 48, 64, step=5), fps=10)
    (src / "empty.mp4").write_bytes(b"")
    (src / "readme.mp4").write_text("This is not a video.\nDownload failed: 403 Forbidden\n")
    (src / "noise.mkv").write_bytes(np.random.default_rng(1).integers(0, 256, 40_000, dtype=np.uint8).tobytes())
    with av.open(str(src / "speech.mp4"), "w") as container:  # audio only
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, i * 1024
            for packet in stream.encode(samples):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    write_video(src / "cut.webm", indexed_frames(40, 48, 64, step=5), fps=10, codec="libvpx-vp9")
    data = (src / "cut.webm").read_bytes()
    (src / "cut.webm").write_bytes(data[: int(len(data) * 0.6)])  # a download cut short
    _video_with_garbage_packets(src / "garbled.mp4", 40, range(20, 24))

    manifest = ingest([str(src), str(tmp_path / "missing.mp4")], tmp_path / "out", smoke(), progress=False)

    assert entry_for(manifest, "good.mp4")["status"] == "ok" and entry_for(manifest, "good.mp4")["clips"] == 4
    reasons = {Path(e["uri"]).name: e["error"] for e in manifest["sources"] if e["status"] == "failed"}
    assert set(reasons) == {"empty.mp4", "readme.mp4", "noise.mkv", "speech.mp4", "missing.mp4"}
    assert reasons["empty.mp4"] == "empty file (0 bytes)"
    assert reasons["readme.mp4"].startswith("not a video") and "starts with text" in reasons["readme.mp4"]
    assert reasons["noise.mkv"].startswith("not a video")
    assert reasons["speech.mp4"].startswith("no decodable video stream") and "audio" in reasons["speech.mp4"]
    assert reasons["missing.mp4"].startswith("not found")
    # Damaged but partly decodable: the good part is kept, and the warning says what was lost.
    for name, total in [("cut.webm", 40), ("garbled.mp4", 40)]:
        entry = entry_for(manifest, name)
        assert entry["status"] == "ok" and entry["warning"].startswith("truncated: decoded"), (name, entry)
        assert 0 < entry["frames_decoded"] < total
    assert manifest["totals"]["failed"] == 5 and manifest["totals"]["warnings"] == 2
    text = summarize(manifest)
    assert "FAILED" in text and "empty file (0 bytes)" in text and "WARNING" in text


def test_short_source_gives_no_clips_but_is_ok(tmp_path):
    write_video(tmp_path / "short.mp4", indexed_frames(7, 48, 64), fps=10)
    manifest = ingest([str(tmp_path / "short.mp4")], tmp_path / "out", smoke(), progress=False)
    entry = manifest["sources"][0]
    assert (entry["status"], entry["frames"], entry["clips"], entry["shards"]) == ("ok", 7, 0, [])
    assert "shorter than one window" in entry["note"]


def test_s3_prefix_on_a_local_s3_server(tmp_path, s3_bucket, capfd):
    from veorl.storage import s3_client

    client = s3_client()
    local = tmp_path / "local"
    local.mkdir()
    write_video(local / "a.mp4", indexed_frames(20, 48, 64), fps=10)
    write_video(local / "b.webm", indexed_frames(16, 48, 64), fps=10, codec="libvpx-vp9")
    client.upload_file(str(local / "a.mp4"), s3_bucket, "raw/cam0/a.mp4")
    client.upload_file(str(local / "b.webm"), s3_bucket, "raw/b.webm")
    client.put_object(Bucket=s3_bucket, Key="raw/README.txt", Body=b"not a video")
    client.put_object(Bucket=s3_bucket, Key="raw2/ignored.mp4", Body=b"outside the prefix folder")
    for i, frame in enumerate(indexed_frames(13, 48, 64)):
        save_image(frame, local / "seq" / f"{i}.png")
        client.upload_file(str(local / "seq" / f"{i}.png"), s3_bucket, f"raw/traj7/{i}.png")
    out = tmp_path / "out"

    manifest = ingest([f"s3://{s3_bucket}/raw"], out, smoke(), progress=False)

    uris = sorted(e["uri"] for e in manifest["sources"])
    assert uris == sorted(f"s3://{s3_bucket}/raw/{k}" for k in ("cam0/a.mp4", "b.webm", "traj7"))
    assert all(e["status"] == "ok" for e in manifest["sources"]), manifest["sources"]
    video = entry_for(manifest, "cam0/a.mp4")
    assert video["content_hash"] == hashlib.sha256((local / "a.mp4").read_bytes()).hexdigest()
    assert (video["frames"], video["clips"]) == (20, 2)
    assert entry_for(manifest, "traj7")["kind"] == "image_sequence" and entry_for(manifest, "traj7")["frames"] == 13
    assert not (out / ".cache").exists()
    assert len(ClipStore(out)) == 2 + 1 + 1

    again = ingest([f"s3://{s3_bucket}/raw"], out, smoke(), progress=False)
    assert (again["last_run"]["ingested"], again["last_run"]["reused"]) == (0, 3)

    bad = ingest([f"s3://{s3_bucket}-absent/raw"], tmp_path / "bad", smoke(), progress=False)
    assert bad["sources"][0]["status"] == "failed" and "cannot list S3 prefix" in bad["sources"][0]["error"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    assert secret not in (out / "manifest.json").read_text() + (out / "provenance.json").read_text()


def _shard_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()}


def test_rerun_skips_done_sources_resumes_and_reingests_on_param_change(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    for name, n in [("a.mp4", 20), ("b.mp4", 26), ("c.mp4", 18)]:
        write_video(src / name, indexed_frames(n, 48, 64), fps=10)
    out = tmp_path / "out"
    first = ingest([str(src)], out, smoke(), progress=False)
    assert first["last_run"]["ingested"] == 3
    mtimes = _shard_mtimes(out)

    second = ingest([str(src)], out, smoke(), progress=False)
    assert (second["last_run"]["ingested"], second["last_run"]["reused"]) == (0, 3)
    assert _shard_mtimes(out) == mtimes
    strip = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["sources"]]  # noqa: E731
    assert strip(second) == strip(first)

    # A run killed before it recorded c.mp4: the next run does only c.mp4.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sources"] = [e for e in manifest["sources"] if not e["uri"].endswith("c.mp4")]
    (out / "manifest.json").write_text(json.dumps(manifest))
    resumed = ingest([str(src)], out, smoke(), progress=False)
    assert (resumed["last_run"]["ingested"], resumed["last_run"]["reused"]) == (1, 2)
    assert strip(resumed) == strip(first)
    mtimes = _shard_mtimes(out)

    # Same bytes under a new mtime and a copy under a new name: hashed, recognised, nothing decoded or duplicated.
    os.utime(src / "a.mp4", ns=(1, 1))
    (src / "d.mp4").write_bytes((src / "b.mp4").read_bytes())
    touched = ingest([str(src)], out, smoke(), progress=False)
    assert (touched["last_run"]["ingested"], touched["last_run"]["reused"]) == (0, 4)
    assert entry_for(touched, "d.mp4")["duplicate_of"] == entry_for(touched, "b.mp4")["uri"]
    assert len(ClipStore(out)) == touched["totals"]["clips"] == first["totals"]["clips"]
    assert _shard_mtimes(out) == mtimes

    changed = ingest([str(src)], out, smoke(stride=3), progress=False)
    assert changed["params_hash"] != first["params_hash"]
    assert (changed["last_run"]["ingested"], changed["last_run"]["reused"], changed["totals"]["duplicates"]) == (
        3,
        1,
        1,
    )
    referenced = {Path(s["file"]).name for e in changed["sources"] for s in e["shards"]}
    assert set(_shard_mtimes(out)) == referenced and not referenced & set(mtimes)  # old shards removed


def test_two_workers_write_the_same_clips_as_one(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    for i in range(3):
        write_video(src / f"v{i}.mp4", indexed_frames(18 + 4 * i, 48, 64), fps=10)
    one = ingest([str(src)], tmp_path / "one", smoke(workers=1), progress=False)
    two = ingest([str(src)], tmp_path / "two", smoke(workers=2), progress=False)
    assert two["last_run"]["workers"] == 2
    assert [e["key"] for e in one["sources"]] == [e["key"] for e in two["sources"]]
    for entry in two["sources"]:
        for shard in entry["shards"]:
            assert (tmp_path / "two" / shard["file"]).read_bytes() == (tmp_path / "one" / shard["file"]).read_bytes()


@pytest.mark.parametrize(
    "override, key",
    [
        ("ingest.bogus=1", "ingest.bogus"),
        ("ingest.window=1", "ingest.window"),
        ("ingest.fps=0", "ingest.fps"),
        ("ingest.stride=many", "ingest.stride"),
        ("ingest.interpolation=nearest", "ingest.interpolation"),
        ("ingest.video_extensions=[mp4]", "ingest.video_extensions"),
    ],
)
def test_invalid_ingest_parameters_name_the_key(override, key, params):
    with pytest.raises(ConfigError) as err:
        params(override)
    assert key in str(err.value)


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "components.ingest", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_exit_codes(tmp_path):
    (tmp_path / "junk.mp4").write_text("not a video")
    common = [
        "--out",
        str(tmp_path / "out"),
        "--params",
        str(tmp_path / "absent.yaml"),
        "--preset",
        "smoke",
        "--no-progress",
    ]

    nothing = _cli("--source", str(tmp_path / "junk.mp4"), *common)
    assert nothing.returncode == 1
    assert "no source could be ingested" in nothing.stderr and "junk.mp4" in nothing.stdout

    bad_param = _cli("--source", str(tmp_path / "junk.mp4"), *common, "--set", "ingest.window=1")
    assert bad_param.returncode == 2 and "ingest.window" in bad_param.stderr

    write_video(tmp_path / "ok.mp4", indexed_frames(14, 48, 64), fps=10)
    partly = _cli("--source", str(tmp_path / "ok.mp4"), "--source", str(tmp_path / "junk.mp4"), *common)
    assert partly.returncode == 0, partly.stderr
    assert "1/2 sources ok" in partly.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]["clips"] == 1
