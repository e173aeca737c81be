"""Video ingestion: raw videos and image sequences -> fixed-size clips in sharded .npy files plus a manifest.

Per trajectory: fetch (S3) -> content hash -> decode (PyAV) -> centre crop, resize, RGB -> resample to
`ingest.fps` by timestamps -> windows of `ingest.window` frames every `ingest.stride` -> shards.

Output (read by veorl.data.clips.ClipStore):
  OUT/manifest.json               what was ingested, per source, and how (see `_manifest`)
  OUT/clips/<key>-<k:04d>.npy     uint8 (n, window, size, size, 3), n <= ingest.clips_per_shard
  OUT/config.json, provenance.json

A source's key joins its content hash and the hash of the settings that shape the clips, so a re-run skips
every source already ingested with the same settings (and resumes a killed run), while changing a setting
re-ingests. The manifest is rewritten atomically as sources finish (after each one, at most once a second).

Damaged input never stops the run: a source that cannot be decoded is recorded with status "failed" and a
reason. A file that decodes for a while and then fails (a truncated download, a corrupt stretch) keeps the
frames decoded before the failure, with status "ok" and a `warning` that says where it stopped: those
frames are genuine, and the warning makes the loss visible. A source shorter than one window is "ok" with
0 clips and a `note`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import shutil
import time
import traceback
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Any

from veorl.config import IngestParams, Params
from veorl.parallel import Outcome, run_parallel
from veorl.storage import Location, atomic_write_json, read_json, redact, sha256_json
from veorl.video.decode import DecodeError, ImageSequenceReader, SquareFrameConverter, open_video, square_frames
from veorl.video.shards import CLIPS_DIR, ClipShardWriter
from veorl.video.sources import IMAGE_SEQUENCE, Source, content_hash, expand_sources, fetched

log = logging.getLogger("veorl.ingest")

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
CACHE_DIR = ".cache"
MANIFEST_SAVE_INTERVAL_S = 1.0
# Frames between progress reports from a decoder: often enough for a live bar, rare enough to cost nothing.
_REPORT_EVERY = 32


def clip_settings(p: IngestParams) -> dict[str, Any]:
    """The settings that change the clips written (workers and file-type lists do not)."""
    return {
        "size": p.size,
        "fps": p.fps,
        "window": p.window,
        "stride": p.stride,
        "clips_per_shard": p.clips_per_shard,
        "image_fps": p.image_fps,
        "interpolation": p.interpolation,
        "format": MANIFEST_VERSION,
    }


def settings_hash(settings: dict[str, Any]) -> str:
    return sha256_json(settings)


def source_key(content_sha256: str, settings_sha256: str) -> str:
    return f"{content_sha256[:16]}-{settings_sha256[:8]}"


# ----------------------------------------------------------------------------------------------
# One source (runs in a worker process, or in the main process when workers == 1)
# ----------------------------------------------------------------------------------------------


def _blank_entry(source: Source) -> dict[str, Any]:
    return {
        "uri": source.uri,
        "kind": source.kind,
        "key": None,
        "content_hash": None,
        "fingerprint": source.fingerprint,
        "status": "failed",
        "error": None,
        "warning": None,
        "note": None,
        "frames": 0,
        "frames_decoded": 0,
        "clips": 0,
        "shards": [],
        "width": None,
        "height": None,
        "fps_in": None,
        "codec": None,
        "seconds": 0.0,
    }


def ingest_source(
    source: Source,
    settings: dict[str, Any],
    out_dir: str | Path,
    reusable_keys: Container[str] = frozenset(),
    report_frames: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Ingest one trajectory; return its manifest entry. Never raises for bad input: the entry says why it failed.

    If the content turns out to be already ingested (its key is in `reusable_keys`), nothing is decoded and the
    entry comes back with status "reuse" for the caller to fill in from the earlier entry.
    """
    started = time.perf_counter()
    entry = _blank_entry(source)
    out_dir = Path(out_dir)
    try:
        if source.problem:
            raise DecodeError(source.problem)
        with fetched(source, out_dir / CACHE_DIR) as paths:
            entry["content_hash"] = content_hash(source, paths)
            key = source_key(entry["content_hash"], settings_hash(settings))
            entry["key"] = key
            if key in reusable_keys:
                entry["status"] = "reuse"
                return entry
            if source.kind == IMAGE_SEQUENCE:
                reader = ImageSequenceReader(paths, settings["image_fps"])
            else:
                reader = open_video(paths[0])
            writer = ClipShardWriter(
                out_dir / CLIPS_DIR,
                key,
                settings["window"],
                settings["stride"],
                settings["clips_per_shard"],
                settings["size"],
            )
            converter = SquareFrameConverter(settings["size"], settings["interpolation"])
            unreported = 0
            for frame in square_frames(reader, settings["size"], settings["fps"], converter=converter):
                writer.add(frame)
                unreported += 1
                if unreported == _REPORT_EVERY:
                    report_frames(unreported)
                    unreported = 0
            report_frames(unreported)
            if reader.frames_decoded == 0:
                raise DecodeError("no decodable frames" + (f" ({reader.truncation})" if reader.truncation else ""))
            writer.close()
            info = reader.info
            entry.update(
                status="ok",
                frames=writer.frames,
                frames_decoded=reader.frames_decoded,
                clips=writer.clips,
                shards=writer.shards,
                width=info.width,
                height=info.height,
                fps_in=info.fps_in,
                codec=info.codec,
                warning=reader.truncation,
            )
            if writer.clips == 0:
                entry["note"] = (
                    f"shorter than one window ({writer.frames} frames < window {settings['window']}): no clips"
                )
    except DecodeError as exc:
        entry["error"] = str(exc)
    except OSError as exc:
        entry["error"] = f"cannot read: {redact(str(exc))}"
    except Exception as exc:  # S3 errors come in many botocore types; one bad source must not end the run
        kind = type(exc).__name__
        if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")):
            entry["error"] = f"S3 download failed: {kind}: {redact(str(exc))}"
        else:
            log.error("unexpected error ingesting %s:\n%s", source.uri, redact(traceback.format_exc()))
            entry["error"] = f"unexpected error: {kind}: {redact(str(exc))}"
    entry["seconds"] = round(time.perf_counter() - started, 3)
    if entry["status"] == "failed":
        entry.update(clips=0, shards=[])
    return entry


# Worker state, set once per process by _init_worker (or in this process when ingesting without a pool).
_worker_frames: Any = None
_worker_reusable: Container[str] = frozenset()


def _init_worker(frames: Any, reusable_keys: Container[str]) -> None:
    """frames: a shared multiprocessing Value (pool workers) or a callable taking a frame count (in process)."""
    global _worker_frames, _worker_reusable
    _worker_frames, _worker_reusable = frames, reusable_keys


def _reset_worker() -> None:
    _init_worker(None, frozenset())


def _report_frames(n: int) -> None:
    if not n or _worker_frames is None:
        return
    if callable(_worker_frames):
        _worker_frames(n)
        return
    with _worker_frames.get_lock():
        _worker_frames.value += n


def _worker_task(job: tuple[int, Source, dict[str, Any], str]) -> tuple[int, dict[str, Any]]:
    index, source, settings, out_dir = job
    return index, ingest_source(source, settings, out_dir, _worker_reusable, _report_frames)


# ----------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------


def _manifest(
    entries: list[dict[str, Any]], settings: dict[str, Any], settings_sha: str, complete: bool, last_run: dict[str, Any]
) -> dict[str, Any]:
    """The manifest for the entries resolved so far (in source order). A later source with the same content as an
    earlier one (same key) keeps its entry but points to the earlier one's shards instead of listing them twice."""
    owner_of_key: dict[str, str] = {}
    sources = []
    for entry in entries:
        entry = dict(entry)
        entry.pop("duplicate_of", None)
        key = entry.get("key")
        if entry["status"] == "ok" and key:
            if key in owner_of_key:
                entry["duplicate_of"] = owner_of_key[key]
                entry["shards"] = []
            else:
                owner_of_key[key] = entry["uri"]
        sources.append(entry)
    ok = [e for e in sources if e["status"] == "ok"]
    unique = [e for e in ok if "duplicate_of" not in e]
    totals = {
        "sources": len(sources),
        "ok": len(ok),
        "failed": len(sources) - len(ok),
        "duplicates": len(ok) - len(unique),
        "warnings": sum(1 for e in ok if e.get("warning")),
        "frames": sum(e["frames"] for e in unique),
        "frames_decoded": sum(e["frames_decoded"] for e in unique),
        "clips": sum(e["clips"] for e in unique),
        "shards": sum(len(e["shards"]) for e in unique),
    }
    return {
        "version": MANIFEST_VERSION,
        "size": settings["size"],
        "window": settings["window"],
        "stride": settings["stride"],
        "fps": settings["fps"],
        "image_fps": settings["image_fps"],
        "interpolation": settings["interpolation"],
        "clips_per_shard": settings["clips_per_shard"],
        "params_hash": settings_sha,
        "complete": complete,
        "sources": sources,
        "totals": totals,
        "last_run": last_run,
    }


def _previous_manifest(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): ingesting every source again", path, exc)
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("version") != MANIFEST_VERSION
        or not isinstance(manifest.get("sources"), list)
    ):
        log.warning("%s has another format: ingesting every source again", path)
        return None
    return manifest


def _reusable_entries(previous: dict[str, Any] | None, settings_sha: str, out_dir: Path) -> dict[str, dict[str, Any]]:
    """key -> earlier entry, for sources ingested with these settings whose shard files are all still there."""
    if previous is None or previous.get("params_hash") != settings_sha:
        return {}
    found: dict[str, dict[str, Any]] = {}
    for entry in previous["sources"]:
        key = entry.get("key")
        if entry.get("status") != "ok" or not key or entry.get("duplicate_of") or key in found:
            continue
        if all((out_dir / shard["file"]).is_file() for shard in entry.get("shards", [])):
            found[key] = entry
    return found


def _reused(entry: dict[str, Any], earlier: dict[str, Any], source: Source) -> dict[str, Any]:
    reused = dict(earlier)
    reused.pop("duplicate_of", None)
    reused.update(uri=source.uri, kind=source.kind, fingerprint=source.fingerprint, seconds=entry.get("seconds", 0.0))
    if entry.get("content_hash"):
        reused["content_hash"] = entry["content_hash"]
    return reused


def _remove_stale_files(out_dir: Path, manifest: dict[str, Any]) -> int:
    """Delete shards no entry refers to (other settings, removed sources, leftovers of killed writers)."""
    referenced = {shard["file"] for entry in manifest["sources"] for shard in entry.get("shards", [])}
    removed = 0
    clips = out_dir / CLIPS_DIR
    if clips.is_dir():
        for path in clips.iterdir():
            if f"{CLIPS_DIR}/{path.name}" not in referenced and path.is_file():
                path.unlink()
                removed += 1
    return removed


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def ingest(sources: Sequence[str | Location], out: str | Path, params: Params, progress: bool = True) -> dict[str, Any]:
    """Ingest every trajectory the `sources` arguments name into `out`; return the manifest written there.

    Credentials written into a source argument are split off first: the manifest, config.json, provenance.json and
    every message see the argument without them.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from veorl.runtime import write_resolved_config

    started = time.perf_counter()
    sources = [Location.parse(source) for source in sources]
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir}: exists and is not a folder")
    (out_dir / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
    # A killed run may have left downloads behind; they are never reused (the hash is taken on each download).
    shutil.rmtree(out_dir / CACHE_DIR, ignore_errors=True)
    p = params.ingest
    settings = clip_settings(p)
    settings_sha = settings_hash(settings)
    write_resolved_config(out_dir, params, ("ingest",), stage="ingest", sources=list(map(str, sources)))

    expanded = expand_sources(sources, p.video_extensions, p.image_extensions, exclude=[out_dir])
    previous = _previous_manifest(out_dir / MANIFEST)
    reusable = _reusable_entries(previous, settings_sha, out_dir)
    previous_by_uri = {e["uri"]: e for e in (previous or {}).get("sources", []) if e.get("key") in reusable}

    resolved: list[dict[str, Any] | None] = [None] * len(expanded)
    stats = {"ingested": 0, "reused": 0, "failed": 0, "workers": 0, "seconds": 0.0}
    pending: list[int] = []
    for index, source in enumerate(expanded):
        earlier = previous_by_uri.get(source.uri)
        if earlier is not None and source.fingerprint and earlier.get("fingerprint") == source.fingerprint:
            resolved[index] = _reused(earlier, reusable[earlier["key"]], source)
            stats["reused"] += 1
        else:
            pending.append(index)

    last_save = [0.0]

    def save(complete: bool, throttle: bool = False) -> dict[str, Any] | None:
        # The manifest grows with the sources, so rewriting it after every one of 10k tiny sources would cost
        # O(n^2); at most one rewrite per MANIFEST_SAVE_INTERVAL_S bounds that, and a killed run loses at most
        # that much finished work (those sources are simply ingested again).
        if throttle and time.monotonic() - last_save[0] < MANIFEST_SAVE_INTERVAL_S:
            return None
        stats["seconds"] = round(time.perf_counter() - started, 3)
        manifest = _manifest([e for e in resolved if e is not None], settings, settings_sha, complete, dict(stats))
        atomic_write_json(out_dir / MANIFEST, manifest)
        last_save[0] = time.monotonic()
        return manifest

    source_bar = tqdm(
        total=len(expanded),
        initial=len(expanded) - len(pending),
        desc="ingest sources",
        unit="src",
        disable=not progress,
        position=0,
        leave=True,
        mininterval=0.5,
    )
    frame_bar = tqdm(desc="ingest frames", unit="frame", disable=not progress, position=1, leave=True, mininterval=0.5)

    def finish_one(index: int, entry: dict[str, Any]) -> None:
        if entry["status"] == "reuse":
            entry = _reused(entry, reusable[entry["key"]], expanded[index])
            stats["reused"] += 1
        elif entry["status"] == "ok":
            stats["ingested"] += 1
            # Later sources with the same bytes (copies under other names) reuse these shards instead of decoding.
            reusable.setdefault(entry["key"], entry)
            if entry.get("warning"):
                log.warning("%s: %s (kept the frames decoded before)", entry["uri"], entry["warning"])
        else:
            stats["failed"] += 1
            log.warning("%s: failed: %s", entry["uri"], entry["error"])
        resolved[index] = entry
        save(complete=False, throttle=True)
        source_bar.update(1)

    save(complete=False)
    workers = max(1, min(p.workers, len(pending)))
    stats["workers"] = workers if pending else 0
    try:
        with logging_redirect_tqdm():  # warnings print above the bars instead of through them
            _run_workers(expanded, pending, settings, out_dir, reusable, workers, finish_one, frame_bar)
    finally:
        source_bar.close()
        frame_bar.close()

    manifest = save(complete=True)
    assert manifest is not None
    removed = _remove_stale_files(out_dir, manifest)
    if removed:
        log.info("removed %d shard files no source refers to any more", removed)
    shutil.rmtree(out_dir / CACHE_DIR, ignore_errors=True)
    content = sorted(e["content_hash"] for e in manifest["sources"] if e["status"] == "ok")
    write_resolved_config(
        out_dir,
        params,
        ("ingest",),
        upstream={"sources_content": sha256_json(content)},
        stage="ingest",
        sources=list(map(str, sources)),
        params_hash=settings_sha,
        totals=manifest["totals"],
    )
    return manifest


def _run_workers(
    expanded: list[Source],
    pending: list[int],
    settings: dict[str, Any],
    out_dir: Path,
    reusable: dict[str, dict[str, Any]],
    workers: int,
    finish_one: Callable[[int, dict[str, Any]], None],
    frame_bar,
) -> None:
    jobs = [(index, expanded[index], settings, str(out_dir)) for index in pending]
    if workers <= 1:
        # In this process the live `reusable` dict is shared, so a later copy of a source ingested in this very
        # run is reused instead of decoded again, and frames count straight into the bar.
        initargs: tuple = (frame_bar.update, reusable)
        poll = None
    else:
        # Pool workers get a snapshot of the keys and count frames in shared memory, read back by `poll`.
        counter = multiprocessing.get_context("spawn").Value("q", 0)
        initargs = (counter, frozenset(reusable))
        shown = [0]

        def poll() -> None:
            frames = counter.value
            frame_bar.update(frames - shown[0])
            shown[0] = frames

    outcomes = run_parallel(
        _worker_task, jobs, workers, initializer=_init_worker, initargs=initargs, cleanup=_reset_worker, poll=poll
    )
    with contextlib.closing(outcomes):  # an interrupt stops the workers now, not when the generator is collected
        for outcome in outcomes:
            _finish_outcome(outcome, pending, expanded, finish_one)
    if poll is not None:
        poll()


def _finish_outcome(
    outcome: Outcome, pending: list[int], expanded: list[Source], finish_one: Callable[[int, dict[str, Any]], None]
) -> None:
    if outcome.died:
        # Only the source whose decoding took the process down (an FFmpeg crash, the OOM killer) lands here: the
        # driver re-ran the sources that shared the pool with it. Failed sources are retried by the next run.
        index = pending[outcome.index]
        entry = _blank_entry(expanded[index])
        entry["error"] = "worker process died while decoding this source; re-run to retry"
    else:
        index, entry = outcome.value
    finish_one(index, entry)


def summarize(manifest: dict[str, Any], out: str | Path | None = None) -> str:
    """A few lines for people: counts, clips, frames, rate, and each failed source with its reason."""
    t, run = manifest["totals"], manifest.get("last_run", {})
    rate = f"{manifest['fps']:g} fps" if manifest.get("fps") else "the source frame rate"
    lines = [
        f"ingest: {t['ok']}/{t['sources']} sources ok, {t['failed']} failed"
        + (f", {t['duplicates']} duplicate content" if t.get("duplicates") else "")
        + (f", {t['warnings']} with warnings" if t.get("warnings") else ""),
        f"  {t['clips']} clips of {manifest['window']} frames ({manifest['size']}x{manifest['size']}, "
        f"stride {manifest['stride']})"
        f" from {t['frames']} frames at {rate}, in {t['shards']} shards" + (f" -> {out}" if out else ""),
        f"  this run: {run.get('ingested', 0)} ingested, {run.get('reused', 0)} already done, "
        f"{run.get('failed', 0)} failed,"
        f" {run.get('seconds', 0):.1f} s",
    ]
    for entry in manifest["sources"]:
        if entry["status"] != "ok":
            lines.append(f"  FAILED {entry['uri']}: {entry['error']}")
        elif entry.get("warning"):
            lines.append(f"  WARNING {entry['uri']}: {entry['warning']}")
    if t["ok"] and not t["clips"]:
        lines.append(f"  note: no clips at all: every source is shorter than one window ({manifest['window']} frames)")
    return "\n".join(lines)


def exit_reason(manifest: dict[str, Any]) -> str | None:
    """Why the ingestion as a whole failed (no source could be ingested), or None."""
    t = manifest["totals"]
    if t["sources"] == 0:
        return "no sources given"
    if t["ok"] == 0:
        return f"no source could be ingested ({t['failed']} failed)"
    return None


__all__ = [
    "ingest",
    "ingest_source",
    "summarize",
    "exit_reason",
    "clip_settings",
    "settings_hash",
    "source_key",
    "MANIFEST",
]
