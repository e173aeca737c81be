"""Plain builders for test inputs, in the layouts the real stages write them.

tests/conftest.py wraps the main ones as fixtures (`params`, `clip_builder`, `episode_builder`); tests that
need an input at import time or in a module-scoped fixture call these functions directly. Every builder
writes only what the readers need and nothing from the machine (no simulator, no video codec, no network):

- `smoke_params`       validated Params of the smoke preset, with `section.key=value` overrides
- `moving_square_video` frames with learnable structure (a coloured square drifting over a plain background)
- `make_episode`, `write_variants`   single episode dicts, and a folder of good and malformed episode files
- `write_episodes`     an episode dataset as components.collect lays it out (episodes/, episode_meta/, card.json)
- `write_clips`        an ingested-clips directory as veorl.video.ingest lays it out (manifest.json + clips/ shards)
- `make_agent`, `write_evaluation`   an (untrained) agent artifact and an evaluation directory for the registry

tests/test_builders.py checks each output against the real readers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from veorl.config import Params, resolve

ACTION_DIM = 4  # Meta-World
IMAGE_SIZE = 64  # the only frame size the networks accept

# The evaluation protocol of the smoke preset (what components.evaluate records next to the scores).
EVALUATION_PROTOCOL = {
    "env": "metaworld",
    "task": "drawer-open",
    "camera": "corner",
    "episode_length": 40,
    "episodes": 2,
    "seed": 1000,
}


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------


def smoke_params(*overrides: str, raw: dict[str, Any] | None = None, preset: str = "smoke") -> Params:
    """Validated Params: the preset (smoke unless told), then `raw` (a params.yaml-like dict), then the overrides.

    Raises veorl.config.ConfigError for an unknown key or a bad value, exactly as a component would.
    """
    return resolve(raw or {}, preset=preset, overrides=list(overrides), origin="test params")


def pretrain_and_finetune(data: Path, world_model: Path, agent: Path, logs: Path, params: Params) -> None:
    """The real pretrain and finetune stages on prepared data (`data`/video_clips, `data`/episodes, as the
    source_videos -> ingest -> collect chain writes them): the world model into `world_model`, the agent into
    `agent`, each stage's metrics and curve into `logs` (pretrain.json/.csv, finetune.json/.csv)."""
    from components import finetune, pretrain

    pretrain.run(
        str(data / "video_clips"),
        str(data / "episodes"),
        str(world_model),
        params,
        metrics=str(logs / "pretrain.json"),
        curve=str(logs / "pretrain.csv"),
        progress=False,
    )
    finetune.run(
        str(world_model),
        str(data / "episodes"),
        str(agent),
        params,
        clips=str(data / "video_clips"),
        metrics=str(logs / "finetune.json"),
        curve=str(logs / "finetune.csv"),
        progress=False,
    )


# ------------------------------------------------------------------------------------------------
# Frames and episodes
# ------------------------------------------------------------------------------------------------


def moving_square_video(length: int, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """(length, size, size, 3) uint8: a 16-pixel square of one colour drifting (wrapping) over a plain background."""
    rng = np.random.default_rng(seed)
    side = max(1, size // 4)
    span = size - side
    frames = np.empty((length, size, size, 3), np.uint8)
    frames[:] = rng.integers(0, 80, 3)
    colour = rng.integers(120, 256, 3)
    y, x = rng.integers(0, span, 2)
    velocity = rng.integers(-3, 4, 2)
    for t in range(length):
        if rng.random() < 0.2:
            velocity = rng.integers(-3, 4, 2)
        y, x = (y + velocity[0]) % span, (x + velocity[1]) % span
        frames[t, y : y + side, x : x + side] = colour
    return frames


def make_episode(T: int = 6, size: int = 16, action_dim: int = ACTION_DIM, seed: int = 0) -> dict[str, np.ndarray]:
    """One valid episode of random content: zero action at t=0, success on the last two steps, no terminal."""
    rng = np.random.default_rng(seed)
    action = rng.uniform(-1, 1, size=(T, action_dim)).astype(np.float32)
    action[0] = 0
    success = np.zeros(T, bool)
    success[-2:] = True
    return {
        "image": rng.integers(0, 256, size=(T, size, size, 3), dtype=np.uint8),
        "action": action,
        "reward": rng.normal(size=T).astype(np.float32),
        "discount": np.ones(T, np.float32),
        "success": success,
        "is_terminal": np.zeros(T, bool),
    }


def bad_episode_variants(size: int = 16) -> dict[str, tuple[dict[str, np.ndarray] | bytes, str]]:
    """{file name: (content, the start of the reason the validator must give)} for each way an episode can be broken."""
    good = make_episode(size=size)
    missing = dict(good)
    del missing["reward"]
    nan_reward = good["reward"].copy()
    nan_reward[2] = np.nan
    return {
        "missing_key.npz": (missing, "missing keys ['reward']"),
        "float_image.npz": ({**good, "image": good["image"].astype(np.float32)}, "image must be uint8"),
        "reward_shape.npz": ({**good, "reward": np.zeros((6, 2), np.float32)}, "reward must be (T=6,)"),
        "action_range.npz": ({**good, "action": good["action"] * 3}, "action values must lie in [-1, 1]"),
        "nan_reward.npz": ({**good, "reward": nan_reward}, "reward contains NaN"),
        "image_channels.npz": ({**good, "image": good["image"][..., :1]}, "image must be (T, H, W, 3)"),
        "garbage.npz": (b"this is not a zip archive at all" * 10, "not a readable .npz file"),
    }


def write_variants(folder: Path, size: int = 16) -> dict[str, str]:
    """Two good episode files (good_a: seed 1, good_b: seed 2) and every bad variant, as raw .npz files (the
    release's naming, not ours) in `folder`; returns {bad file name: expected reason}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "good_a.npz", **make_episode(size=size, seed=1))
    np.savez_compressed(folder / "good_b.npz", **make_episode(size=size, seed=2))
    expected = {}
    for name, (content, reason) in bad_episode_variants(size).items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            np.savez_compressed(folder / name, **content)
        expected[name] = reason
    return expected


def synthetic_episode(
    length: int, seed: int, action_dim: int = ACTION_DIM, size: int = IMAGE_SIZE, success: bool = False
) -> dict[str, np.ndarray]:
    """An episode in the rollout layout (veorl.envs.rollout): moving-square frames, a zero action, reward and
    success at t=0, rewards in [0, 1], discount 1, `is_first` only at t=0; with `success`, the last quarter succeeds."""
    rng = np.random.default_rng([seed, 0xE915])
    action = rng.uniform(-1, 1, (length, action_dim)).astype(np.float32)
    action[0] = 0.0
    reward = rng.uniform(0, 1, length).astype(np.float32)
    reward[0] = 0.0
    flags = np.zeros(length, bool)
    if success:
        flags[length - max(1, length // 4) :] = True
    is_first = np.zeros(length, bool)
    is_first[0] = True
    return {
        "image": moving_square_video(length, seed, size),
        "action": action,
        "reward": reward,
        "discount": np.ones(length, np.float32),
        "success": flags,
        "is_terminal": np.zeros(length, bool),
        "is_first": is_first,
    }


def write_episodes(
    root: Path,
    episodes: int = 2,
    length: int | Sequence[int] = 16,
    seed: int = 0,
    params: Params | None = None,
    successes: int | None = None,
) -> Path:
    """An episode dataset in `root`, laid out as components.collect writes it; returns `root`.

    root/episodes/<i:06d>-<length>.npz   written by veorl.data.episodes.save_episode (validated on the way)
    root/episode_meta/<i:06d>.json       the recipe of episode i under `params.collect` (so collection resumes
                                         over these episodes instead of re-collecting them)
    root/card.json                       veorl.envs.collection.dataset_card: env, task, camera, sizes, statistics

    Episodes have `length` frames (length - 1 environment steps, which is what the card's `episode_length`
    counts), or `length[i]` frames for episode i when a sequence is given (the card then records the longest);
    frames are moving squares, episode i is made from seed + i. The first `successes` episodes (default: every
    other one) reach success. `params` defaults to the smoke preset.
    """
    from veorl.config import CollectParams
    from veorl.data.episodes import EPISODE_DIR, save_episode
    from veorl.envs.collection import META_DIR, dataset_card, episode_recipe
    from veorl.storage import atomic_write_json, sha256_json

    lengths = [length] * episodes if isinstance(length, int) else [int(n) for n in length]
    if len(lengths) != episodes or min(lengths) < 3:
        raise ValueError(f"need one length >= 3 frames (2 environment steps) per episode, got {length!r}")
    root = Path(root)
    params = params or smoke_params()
    # Validated (model_copy(update=...) would not check the new values).
    update = {"episodes": episodes, "episode_length": max(lengths) - 1, "seed": seed}
    cfg = CollectParams.model_validate({**params.collect.model_dump(), **update})
    succeeded = set(range(successes)) if successes is not None else set(range(0, episodes, 2))
    for index in range(episodes):
        recipe = episode_recipe(cfg, index)
        episode = synthetic_episode(
            lengths[index], recipe["episode_seed"], ACTION_DIM, cfg.size, success=index in succeeded
        )
        path = save_episode(root / EPISODE_DIR, index, episode)
        atomic_write_json(
            root / META_DIR / f"{index:06d}.json",
            {
                "index": index,
                "file": f"{EPISODE_DIR}/{path.name}",
                "recipe": recipe,
                "recipe_hash": sha256_json(recipe),
                "seed": recipe["episode_seed"],
                "level": recipe["level"],
                "return": float(episode["reward"].sum()),
                "success": bool(episode["success"].any()),
            },
        )
    dataset_card(root, cfg)
    return root


# ------------------------------------------------------------------------------------------------
# Ingested clips
# ------------------------------------------------------------------------------------------------


def write_clips(
    root: Path,
    clips: int = 3,
    window: int = 12,
    stride: int = 6,
    sources: int = 1,
    clips_per_shard: int = 16,
    failed: int = 0,
    seed: int = 1,
    size: int = IMAGE_SIZE,
) -> Path:
    """An ingested-clips directory in `root`, laid out as veorl.video.ingest writes it; returns `root`.

    Each of `sources` synthetic sources is a moving-square frame stream just long enough for `clips` windows
    of `window` frames every `stride` frames, cut and sharded by the real veorl.video.shards.ClipShardWriter
    (root/clips/<key>-<k:04d>.npy, at most `clips_per_shard` clips each). root/manifest.json has the
    ingest manifest's fields, with one entry per source plus `failed` failed sources (no shards).
    """
    from veorl.config import IngestParams
    from veorl.storage import atomic_write_json, sha256_bytes
    from veorl.video.ingest import MANIFEST, MANIFEST_VERSION, clip_settings, settings_hash, source_key
    from veorl.video.shards import CLIPS_DIR, ClipShardWriter

    if clips < 1 or sources < 1:
        raise ValueError(f"clips and sources must be >= 1, got clips={clips}, sources={sources}")
    root = Path(root)
    settings = clip_settings(IngestParams(size=size, window=window, stride=stride, clips_per_shard=clips_per_shard))
    settings_sha = settings_hash(settings)
    frames_per_source = window + (clips - 1) * stride
    entries: list[dict[str, Any]] = []
    for s in range(sources):
        frames = moving_square_video(frames_per_source, seed * 1000 + s, size)
        content = sha256_bytes(frames.tobytes())
        key = source_key(content, settings_sha)
        writer = ClipShardWriter(root / CLIPS_DIR, key, window, stride, clips_per_shard, size)
        for frame in frames:
            writer.add(frame)
        writer.close()
        entries.append(
            _source_entry(
                f"synthetic/source-{s}.mp4",
                key,
                content,
                status="ok",
                frames=writer.frames,
                clips=writer.clips,
                shards=writer.shards,
                size=size,
            )
        )
    for f in range(failed):
        entries.append(
            _source_entry(
                f"synthetic/broken-{f}.mp4",
                None,
                None,
                status="failed",
                error="no decodable frames (synthetic failure)",
            )
        )
    ok = [e for e in entries if e["status"] == "ok"]
    totals = {
        "sources": len(entries),
        "ok": len(ok),
        "failed": len(entries) - len(ok),
        "duplicates": 0,
        "warnings": 0,
        "frames": sum(e["frames"] for e in ok),
        "frames_decoded": sum(e["frames_decoded"] for e in ok),
        "clips": sum(e["clips"] for e in ok),
        "shards": sum(len(e["shards"]) for e in ok),
    }
    manifest = {
        "version": MANIFEST_VERSION,
        "size": size,
        "window": window,
        "stride": stride,
        "fps": settings["fps"],
        "image_fps": settings["image_fps"],
        "interpolation": settings["interpolation"],
        "clips_per_shard": clips_per_shard,
        "params_hash": settings_sha,
        "complete": True,
        "sources": entries,
        "totals": totals,
        "last_run": {"ingested": len(ok), "reused": 0, "failed": failed, "workers": 1, "seconds": 0.0},
    }
    atomic_write_json(root / MANIFEST, manifest)
    return root


def _source_entry(
    uri: str,
    key: str | None,
    content: str | None,
    *,
    status: str,
    frames: int = 0,
    clips: int = 0,
    shards: list | None = None,
    size: int = IMAGE_SIZE,
    error: str | None = None,
) -> dict[str, Any]:
    ok = status == "ok"
    return {
        "uri": uri,
        "kind": "video",
        "key": key,
        "content_hash": content,
        "fingerprint": None,
        "status": status,
        "error": error,
        "warning": None,
        "note": None,
        "frames": frames,
        "frames_decoded": frames,
        "clips": clips,
        "shards": list(shards or []),
        "width": size if ok else None,
        "height": size if ok else None,
        "fps_in": 30.0 if ok else None,
        "codec": "synthetic" if ok else None,
        "seconds": 0.0,
    }


# ------------------------------------------------------------------------------------------------
# Agent and evaluation artifacts
# ------------------------------------------------------------------------------------------------


def make_agent(
    path: Path, seed: int = 0, task: str = "drawer-open", episode_length: int = 40, params: Params | None = None
) -> Path:
    """A real, untrained agent artifact at the smoke preset's model sizes (`seed` makes its weights distinct)."""
    import torch

    from veorl.agent import build_agent_modules, save_agent
    from veorl.storage import atomic_write_json

    model = (params or smoke_params()).model
    meta = {
        "algo": "veorl",
        "env": "metaworld",
        "task": task,
        "camera": "corner",
        "image_size": IMAGE_SIZE,
        "action_dim": ACTION_DIM,
        "episode_length": episode_length,
        "model": model.model_dump(mode="json"),
        "use_latent_action": True,
        "action_kind": "continuous",
    }
    torch.manual_seed(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "provenance.json", {"upstream": {"world_model": f"wm-{seed}"}, "code_version": "test"})
    save_agent(path, build_agent_modules(meta), meta)
    return path


def write_evaluation(
    path: Path,
    agent: Path,
    success_rate: float,
    *,
    status: str = "ok",
    task: str = "drawer-open",
    protocol: dict[str, Any] | None = None,
    mean_return: float = 100.0,
) -> Path:
    """An evaluation directory as components.evaluate writes it: metrics.json, the per-episode records that give it
    (episodes.csv, see `episode_records`) and a provenance naming the agent and recording the content hash.

    metrics.json is written with plain json.dumps, so a NaN score lands in the file as NaN (as a buggy writer would);
    a score no whole number of successes gives (NaN) gets records of zero successes.
    """
    from veorl.storage import artifact_hash, atomic_write_json, record_content_hash

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows = episode_records(success_rate, mean_return)
    summary = summarise_records(rows)
    metrics = {
        "task": task,
        "algo": "veorl",
        **summary,
        "success_rate": success_rate if not math.isfinite(success_rate) else summary["success_rate"],
        "protocol": dict(protocol or EVALUATION_PROTOCOL, task=task),
        "status": status,
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    write_episode_records(path / "episodes.csv", rows)
    atomic_write_json(path / "provenance.json", {"upstream": {"agent": artifact_hash(agent)}})
    record_content_hash(path)
    return path


def episode_records(success_rate: float, mean_return: float = 100.0, length: int = 40) -> list[dict[str, Any]]:
    """Per-episode records (episode, return, success, length) whose summary is `success_rate` and `mean_return`.

    As few episodes as give the rate exactly (at least 2; 0.25 needs 4); returns alternate mean_return -+ 5.
    A non-finite rate gives 2 episodes without success.
    """
    rate = success_rate if math.isfinite(success_rate) else 0.0
    count = next((n for n in range(2, 101) if abs(round(rate * n) - rate * n) < 1e-9), 100)
    successes = round(rate * count)
    offsets = [-5.0 if i % 2 == 0 else 5.0 for i in range(count)]
    if count % 2:
        offsets[-1] = 0.0
    return [
        {"episode": i, "return": mean_return + offsets[i], "success": int(i < successes), "length": length}
        for i in range(count)
    ]


def summarise_records(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary numbers of metrics.json for `rows`, as veorl.evaluation.summarise computes them."""
    returns = np.array([r["return"] for r in rows], np.float64)
    successes = np.array([r["success"] for r in rows], np.float64)
    lengths = np.array([r["length"] for r in rows], np.float64)
    return {
        "episodes": len(rows),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "success_rate": float(successes.mean()),
        "success_std": float(successes.std()),
        "mean_length": float(lengths.mean()),
    }


def write_episode_records(path: Path, rows: list[dict[str, Any]]) -> None:
    """episodes.csv in veorl.evaluation.write_episodes_csv's format."""
    lines = ["episode,return,success,length"]
    lines += [f"{r['episode']},{float(r['return']):.6f},{int(r['success'])},{int(r['length'])}" for r in rows]
    Path(path).write_text("\r\n".join(lines) + "\r\n")
