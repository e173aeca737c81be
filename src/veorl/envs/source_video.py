"""Rendering unlabeled source videos: scripted episodes of tasks other than the target, frames only.

Manipulation: Meta-World tasks other than the target, filmed from other cameras. Driving: highway-env scenarios
other than the target's highway (merge, roundabout, intersection), filmed in other view styles (zoom, colours);
a driving episode that ends early (a collision) gives a shorter video.

This mirrors the paper's setting (action-free video from a related but visually different domain): the
actions and rewards of these episodes are thrown away, only the frames are encoded as real video files,
and the files then go through ingestion like anybody's videos.

Layout of DIR:
  DIR/<task>-<camera>-<episode:03d>.<container>   one video per camera per episode
  DIR/render_meta/<task>-<episode:03d>.json      the episode's recipe hash and its files (for resuming)
  DIR/card.json                                  every file with its frame count

Visual variety at no cost: every episode is filmed from several cameras, and each episode jitters the
camera positions by a few centimetres (`camera_jitter`; driving: the zoom by a few percent), so no two videos
share an exact viewpoint.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veorl.envs import cached_env, close_cached_env
from veorl.parallel import DIED_REASON, run_parallel, worker_count
from veorl.storage import atomic_write_json, atomic_write_json_if_changed, read_json, sha256_json

META_DIR = "render_meta"
CARD = "card.json"
CARD_VERSION = 1


def video_name(task: str, camera: str, episode: int, container: str) -> str:
    return f"{task}-{camera}-{episode:03d}.{container.lstrip('.')}"


def episode_recipe(cfg: Any, task: str, episode: int) -> dict[str, Any]:
    """Everything that determines one source episode's files (not the worker count, not the other tasks)."""
    return {
        "env": cfg.env,
        "task": task,
        "episode": episode,
        "cameras": list(cfg.cameras),
        "render_size": cfg.render_size,
        "episode_length": cfg.episode_length,
        "action_noise": cfg.action_noise,
        "camera_jitter": cfg.camera_jitter,
        "seed": cfg.seed,
        "fps": cfg.fps,
        "codec": cfg.codec,
        "container": cfg.container,
    }


def _meta_path(out: Path, task: str, episode: int) -> Path:
    return out / META_DIR / f"{task}-{episode:03d}.json"


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------


def render_episode(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Play one noisy scripted episode, film it from every camera, encode one video per camera (runs in a worker)."""
    from veorl.envs.policies import BehaviourPolicy, is_discrete, scripted_policy
    from veorl.video.encode import write_video

    out_text, recipe = job
    out = Path(out_text)
    env = cached_env(
        recipe["env"],
        recipe["task"],
        recipe["cameras"][0],
        recipe["render_size"],
        recipe["episode_length"],
        recipe["seed"],
    )
    task, episode, cameras = recipe["task"], recipe["episode"], recipe["cameras"]
    # Seeds from (seed, task name, episode): independent of the task list's order and of the other tasks.
    streams = np.random.SeedSequence([recipe["seed"], zlib.crc32(task.encode()), episode]).spawn(3)
    env_seed = int(streams[0].generate_state(1)[0] & 0x7FFFFFFF)
    env.jitter_cameras(np.random.default_rng(streams[1]), recipe["camera_jitter"])
    policy = BehaviourPolicy(
        scripted_policy(recipe["env"], task, env=env),
        env.action_dim,
        noise=recipe["action_noise"],
        seed=streams[2],
        discrete=is_discrete(env),
    )
    frames: dict[str, list[np.ndarray]] = {cam: [] for cam in cameras}
    obs = env.reset(seed=env_seed)
    successes = 0
    # `episode_length` counts frames: the reset frame plus episode_length - 1 steps.
    for step in range(recipe["episode_length"]):
        frames[cameras[0]].append(obs["image"])
        for cam in cameras[1:]:
            frames[cam].append(env.render(cam))
        if step + 1 < recipe["episode_length"]:
            obs, _, done, info = env.step(policy(obs["state"]))
            successes += int(info["success"])
            if done and step + 2 < recipe["episode_length"]:  # ended early (a driving collision): keep its last frame
                frames[cameras[0]].append(obs["image"])
                for cam in cameras[1:]:
                    frames[cam].append(env.render(cam))
                break
    files = []
    for cam in cameras:
        name = video_name(task, cam, episode, recipe["container"])
        count = write_video(out / name, frames[cam], fps=recipe["fps"], codec=recipe["codec"])
        files.append(
            {
                "file": name,
                "task": task,
                "camera": cam,
                "episode": episode,
                "frames": count,
                "size": recipe["render_size"],
            }
        )
    meta = {"recipe": recipe, "recipe_hash": sha256_json(recipe), "files": files, "success": successes > 0}
    atomic_write_json(_meta_path(out, task, episode), meta)
    return meta


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


@dataclass
class RenderResult:
    card: dict[str, Any]
    rendered: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    card_changed: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.rendered or self.removed or self.card_changed)


def _done_meta(out: Path, task: str, episode: int, recipe_hash: str) -> dict[str, Any] | None:
    path = _meta_path(out, task, episode)
    if not path.exists():
        return None
    try:
        meta = read_json(path)
    except (OSError, ValueError):
        return None
    if meta.get("recipe_hash") != recipe_hash:
        return None
    if not all((out / f["file"]).is_file() for f in meta.get("files", [])):
        return None
    return meta


def _remove_unplanned(out: Path, planned: set[str], planned_files: set[str]) -> list[str]:
    """Delete videos this stage made earlier that the current parameters no longer ask for (never foreign files)."""
    removed: list[str] = []
    meta_dir = out / META_DIR
    if not meta_dir.is_dir():
        return removed
    for path in sorted(meta_dir.glob("*.json")):
        if path.stem in planned:
            continue
        try:
            files = [f["file"] for f in read_json(path).get("files", [])]
        except (OSError, ValueError, KeyError, TypeError):
            files = []
        for name in files:
            if name not in planned_files and (out / name).is_file():
                (out / name).unlink()
                removed.append(name)
        path.unlink()
        removed.append(f"{META_DIR}/{path.name}")
    return removed


def render_source_videos(
    out: str | Path, cfg: Any, target_task: str | None = None, workers: int | None = None, progress: bool = True
) -> RenderResult:
    """Render `cfg.episodes_per_task` episodes of every task in `cfg.tasks` into `out` (a SourceVideosParams)."""
    from tqdm import tqdm

    if target_task is not None and target_task in cfg.tasks:
        raise ValueError(f"source_videos.tasks must not contain the target task {target_task!r}")
    if not cfg.cameras:
        raise ValueError("source_videos.cameras is empty: at least one camera is needed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = RenderResult(card={})
    plan = [(task, ep) for task in cfg.tasks for ep in range(cfg.episodes_per_task)]
    planned_stems = {f"{task}-{ep:03d}" for task, ep in plan}
    planned_files = {video_name(task, cam, ep, cfg.container) for task, ep in plan for cam in cfg.cameras}
    result.removed = _remove_unplanned(out, planned_stems, planned_files)

    metas: dict[tuple[str, int], dict[str, Any]] = {}
    jobs = []
    for task, ep in plan:
        recipe = episode_recipe(cfg, task, ep)
        meta = _done_meta(out, task, ep, sha256_json(recipe))
        if meta is not None:
            metas[(task, ep)] = meta
            result.kept.append(f"{task}-{ep:03d}")
        else:
            jobs.append((str(out), recipe))

    n_workers = worker_count(workers or cfg.workers, len(jobs))
    bar = tqdm(total=len(jobs), desc="source videos", unit="ep", disable=not progress or not jobs)
    died: list[str] = []
    # Jobs come grouped by task, and a chunk of one task's episodes reuses one worker's cached environment.
    chunk = max(1, min(cfg.episodes_per_task, len(jobs) // n_workers or 1))
    try:
        outcomes = run_parallel(render_episode, jobs, n_workers, cleanup=close_cached_env, chunksize=chunk)
        with contextlib.closing(outcomes):  # an interrupt stops the workers now, not when the generator is collected
            for outcome in outcomes:
                if outcome.died:
                    recipe = jobs[outcome.index][1]
                    died.append(f"{recipe['task']}-{recipe['episode']:03d}")
                else:
                    meta = outcome.value
                    metas[(meta["recipe"]["task"], meta["recipe"]["episode"])] = meta
                bar.update()
    finally:
        bar.close()
    if died:
        # Finished episodes are on disk with their meta files, so a re-run renders only these.
        raise RuntimeError(
            f"rendering source episode(s) {sorted(died)} killed their worker process "
            f"({DIED_REASON}); re-run to retry them"
        )
    result.rendered = sorted(f"{recipe['task']}-{recipe['episode']:03d}" for _, recipe in jobs)

    files = [f for task, ep in plan for f in metas[(task, ep)]["files"]]
    card = {
        "version": CARD_VERSION,
        "source": "rendered",
        "env": cfg.env,
        "target_task": target_task,
        "tasks": list(cfg.tasks),
        "cameras": list(cfg.cameras),
        "episodes_per_task": cfg.episodes_per_task,
        "episode_length": cfg.episode_length,
        "render_size": cfg.render_size,
        "fps": cfg.fps,
        "codec": cfg.codec,
        "container": cfg.container,
        "action_noise": cfg.action_noise,
        "camera_jitter": cfg.camera_jitter,
        "seed": cfg.seed,
        "labels": "none (frames only: no actions, no rewards)",
        "videos": len(files),
        "frames": int(sum(f["frames"] for f in files)),
        "episode_success_rate": float(np.mean([metas[k]["success"] for k in plan])) if plan else 0.0,
        "files": files,
    }
    result.card_changed = atomic_write_json_if_changed(out / CARD, card)
    result.card = card
    return result


__all__ = ["render_source_videos", "render_episode", "video_name", "episode_recipe", "RenderResult"]
