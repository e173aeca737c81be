"""Collecting an offline target dataset with a degraded scripted behaviour policy, resumably and in parallel.

Layout of a dataset directory DIR:
  DIR/episodes/<index:06d>-<length>.npz   one episode each (veorl.data.episodes format)
  DIR/episode_meta/<index:06d>.json       how that episode was made (its recipe hash, seed, behaviour level)
  DIR/card.json                           dataset card: sizes, return and success statistics, per-episode rows

Episode i is fully determined by its recipe: the collect parameters that shape its content, its behaviour
level and its seed (collect.seed + i). So results do not depend on the number of workers, a crashed run
resumes where it stopped (finished episodes are on disk under their final name, written atomically), and
a re-run with the same parameters finds every recipe on disk and writes nothing.

Quality levels, measured on drawer-open (camera corner, 64x64; success = any step flagged success):
  expert  expert + N(0, 0.1)                                  100% success; solved after ~85-90 steps
  medium  medium_noise 0.5, episode_length 200 (cpu preset):
            medium_random_prob 0.3 / 0.4 -> 95% / 95% (20 episodes each)
            medium_random_prob 0.45      -> 55%, return 776 +- 174 (40 episodes)   <- cpu preset
            medium_random_prob 0.5       -> 38%, return ~710 (40 episodes)
          medium_noise 0.5, episode_length 500 (paper sizes):
            medium_random_prob 0.6 / 0.7 / 0.75 -> 83% (12 ep.) / 64% (28 ep.) / 33% (12 ep.)   <- 0.7: default
Random mixing slows the expert rather than stopping it, so the success rate of `medium` depends on the
episode length; the presets pair the probability with the length, and the band we aim for is 30-70%.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veorl.data.episodes import CARD, EPISODE_DIR, EpisodeError, episode_files, load_episode, save_episode
from veorl.envs import ACTION_KINDS, cached_env, close_cached_env
from veorl.parallel import DIED_REASON, run_parallel
from veorl.storage import atomic_write_json, atomic_write_json_if_changed, read_json, sha256_json

META_DIR = "episode_meta"
COLLISION_ENVS = ("highway", "carla")
"""Families whose terminals are collisions: their cards report a collision rate."""
CARD_VERSION = 1

SUCCESS_BANDS = {
    "expert": "90-100% on drawer-open whenever episode_length >= 120 (the expert needs ~90 steps)",
    "medium": "30-70% on drawer-open with medium_random_prob 0.45 at 200 steps (measured 55%) "
    "or 0.7 at 500 steps (measured 64%); driving (highway, 200 steps, noise 0.15, random_prob 0.02): "
    "~50% without a collision; other tasks or lengths are not calibrated",
}

GAME_SUCCESS_BANDS = {
    "expert": "100% on collect-wood (the scripted player needs ~5 steps; measured on 40 worlds)",
    "medium": "57% on collect-wood with medium_random_prob 0.92 at 100 steps and with 0.85 at 40 steps (smoke), 40 "
    "episodes each (scripts/calibrate_game.py); other tasks or lengths are not calibrated",
}
"""The game's bands (crafter), kept apart so the other domains' cards stay as they were."""


def episode_level(index: int, quality: str, mixed_expert_fraction: float) -> str:
    """Behaviour level of episode `index`. `mixed` spreads expert episodes evenly, independent of the episode count."""
    if quality in ("expert", "medium"):
        return quality
    if quality == "mixed":
        # Episode i is expert when the running count floor((i+1)*f) steps up, so every prefix of the dataset holds
        # the expert fraction (to within one episode) and adding episodes never changes earlier ones.
        f = mixed_expert_fraction
        return "expert" if int(np.floor((index + 1) * f + 1e-9)) > int(np.floor(index * f + 1e-9)) else "medium"
    raise ValueError(f"unknown quality {quality!r} (expected expert, medium or mixed)")


def episode_recipe(cfg: Any, index: int) -> dict[str, Any]:
    """Everything that determines episode `index`'s content (and nothing else: not workers, not the count)."""
    level = episode_level(index, cfg.quality, cfg.mixed_expert_fraction)
    recipe: dict[str, Any] = {
        "env": cfg.env,
        "task": cfg.task,
        "camera": cfg.camera,
        "size": cfg.size,
        "episode_length": cfg.episode_length,
        "make_seed": cfg.seed,
        "episode_seed": cfg.seed + index,
        "level": level,
    }
    if cfg.starts == "cycle":  # only then: recipes (and so finished episodes) of seed-drawn starts stay as they were
        recipe["variation"] = index
    if level == "expert":
        recipe["noise"] = cfg.expert_noise
    else:
        recipe.update(noise=cfg.medium_noise, random_prob=cfg.medium_random_prob)
    return recipe


# ------------------------------------------------------------------------------------------------
# Worker side (module-level so spawned processes can import it)
# ------------------------------------------------------------------------------------------------


def collect_episode(job: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
    """Roll out and save one episode (runs in a worker); returns its meta row."""
    from veorl.envs.policies import BehaviourPolicy, is_discrete, scripted_policy
    from veorl.envs.rollout import rollout

    out, index, recipe = job
    env = cached_env(
        recipe["env"], recipe["task"], recipe["camera"], recipe["size"], recipe["episode_length"], recipe["make_seed"]
    )
    expert = scripted_policy(recipe["env"], recipe["task"], env=env)
    # The policy's noise stream is seeded from the episode seed but kept apart from the simulator's seed.
    policy = BehaviourPolicy(
        expert,
        env.action_dim,
        noise=recipe["noise"],
        random_prob=recipe.get("random_prob", 0.0),
        seed=np.random.SeedSequence([recipe["episode_seed"], 0x5EED]),
        discrete=is_discrete(env),
    )
    episode = rollout(env, policy, seed=recipe["episode_seed"], variation=recipe.get("variation"))
    episodes_dir = Path(out) / EPISODE_DIR
    path = save_episode(episodes_dir, index, episode)
    for other in _files_of_index(episodes_dir, index):
        if other != path:
            other.unlink(missing_ok=True)
    meta = {
        "index": index,
        "file": f"{EPISODE_DIR}/{path.name}",
        "recipe": recipe,
        "recipe_hash": sha256_json(recipe),
        "seed": recipe["episode_seed"],
        "level": recipe["level"],
        "return": float(episode["reward"].sum()),
        "success": bool(episode["success"].any()),
    }
    variation = getattr(env, "variation", None)  # Meta-World: which of the task's variations the episode started from
    if variation is not None:
        meta["variation"] = int(variation)
    atomic_write_json(Path(out) / META_DIR / f"{index:06d}.json", meta)
    return meta


def _files_of_index(episodes_dir: Path, index: int) -> list[Path]:
    pattern = re.compile(rf"^{index:06d}-\d+\.npz$")
    return (
        [p for p in episodes_dir.glob(f"{index:06d}-*.npz") if pattern.match(p.name)] if episodes_dir.is_dir() else []
    )


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


@dataclass
class CollectResult:
    card: dict[str, Any]
    collected: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.collected or self.removed)


def _is_done(out: Path, index: int, recipe_hash: str) -> bool:
    meta_path = out / META_DIR / f"{index:06d}.json"
    if not meta_path.exists():
        return False
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        return False
    return meta.get("recipe_hash") == recipe_hash and (out / meta.get("file", "")).is_file()


def _remove_stale(out: Path, episodes: int) -> list[str]:
    """Episode and meta files of indices >= `episodes` (left by a larger earlier run) no longer belong here."""
    removed: list[str] = []
    name = re.compile(r"^(\d{6})(?:-\d+\.npz|\.json)$")
    for folder in (out / EPISODE_DIR, out / META_DIR):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            m = name.match(path.name)
            if m and int(m.group(1)) >= episodes:
                path.unlink()
                removed.append(f"{folder.name}/{path.name}")
    return removed


def collect_dataset(out: str | Path, cfg: Any, workers: int | None = None, progress: bool = True) -> CollectResult:
    """Collect `cfg.episodes` episodes into `out` (a CollectParams); keeps episodes whose recipe is unchanged."""
    from tqdm import tqdm

    out = Path(out)
    (out / EPISODE_DIR).mkdir(parents=True, exist_ok=True)
    result = CollectResult(card={})
    result.removed = _remove_stale(out, cfg.episodes)
    jobs = []
    for index in range(cfg.episodes):
        recipe = episode_recipe(cfg, index)
        if _is_done(out, index, sha256_json(recipe)):
            result.kept.append(index)
        else:
            jobs.append((str(out), index, recipe))

    bar = tqdm(total=len(jobs), desc=f"collect {cfg.task} ({cfg.quality})", unit="ep", disable=not progress or not jobs)
    died: list[int] = []
    try:
        # Each worker opens its own EGL context and MuJoCo model (spawned by the driver, see veorl.parallel) and
        # keeps it in veorl.envs.cached_env for all the episodes it collects.
        outcomes = run_parallel(collect_episode, jobs, workers or cfg.workers, cleanup=close_cached_env)
        with contextlib.closing(outcomes):  # an interrupt stops the workers now, not when the generator is collected
            for outcome in outcomes:
                if outcome.died:
                    died.append(jobs[outcome.index][1])
                else:
                    result.collected.append(outcome.value["index"])
                bar.update()
    finally:
        bar.close()
    if died:
        # The other episodes are on disk under their final names, so a re-run collects only these.
        raise RuntimeError(
            f"collecting episode(s) {sorted(died)} killed their worker process ({DIED_REASON}); re-run to retry them"
        )
    result.collected.sort()
    result.card = dataset_card(out, cfg)
    return result


def _episode_rows(out: Path, collisions: bool = False) -> list[dict[str, Any]]:
    rows = []
    for path in episode_files(out):
        ep = load_episode(path)
        rows.append(
            {
                "file": f"{EPISODE_DIR}/{path.name}",
                "length": int(len(ep["reward"])),
                "steps": int(len(ep["reward"]) - 1),
                "return": float(ep["reward"].astype(np.float64).sum()),
                "success": bool(ep["success"].any()),
            }
        )
        if collisions:  # driving: an episode ends early only on a collision (or on leaving the road)
            rows[-1]["collision"] = bool(ep["is_terminal"].any()) if "is_terminal" in ep else False
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    returns = np.array([r["return"] for r in rows], np.float64)
    return {
        "episodes": len(rows),
        "steps": int(sum(r["steps"] for r in rows)),
        "frames": int(sum(r["length"] for r in rows)),
        "return_mean": float(returns.mean()) if len(rows) else 0.0,
        "return_std": float(returns.std()) if len(rows) else 0.0,
        "success_rate": float(np.mean([r["success"] for r in rows])) if rows else 0.0,
    }


def dataset_card(out: str | Path, cfg: Any) -> dict[str, Any]:
    """The card of a collected dataset, computed from the episode files on disk (so it cannot disagree with them)."""
    out = Path(out)
    rows = _episode_rows(out, collisions=cfg.env in COLLISION_ENVS)
    for row in rows:
        index = int(Path(row["file"]).name.split("-", 1)[0])
        meta_path = out / META_DIR / f"{index:06d}.json"
        if meta_path.exists():
            meta = read_json(meta_path)
            row.update(index=index, seed=meta.get("seed"), level=meta.get("level"))
            if meta.get("variation") is not None:
                row["variation"] = meta["variation"]
    levels = [r.get("level") for r in rows]
    bands = GAME_SUCCESS_BANDS if cfg.env == "crafter" else SUCCESS_BANDS
    card = {
        "version": CARD_VERSION,
        "source": "collected",
        "env": cfg.env,
        "action_kind": ACTION_KINDS[cfg.env],
        "task": cfg.task,
        "camera": cfg.camera,
        "size": cfg.size,
        "episode_length": cfg.episode_length,
        "quality": cfg.quality,
        "seed": cfg.seed,
        "behaviour": {
            "expert_noise": cfg.expert_noise,
            "medium_noise": cfg.medium_noise,
            "medium_random_prob": cfg.medium_random_prob,
            "mixed_expert_fraction": cfg.mixed_expert_fraction,
        },
        "expected_success": {lvl: bands[lvl] for lvl in sorted({lv for lv in levels if lv in bands})},
        "expert_episodes": int(sum(lv == "expert" for lv in levels)),
        **_summary(rows),
        "per_episode": rows,
    }
    started = {r["variation"] for r in rows if "variation" in r}
    if started:  # how many distinct task variations the episodes start from (Meta-World has 50)
        card["variations_started"] = len(started)
    if cfg.env in COLLISION_ENVS:
        card["collision_rate"] = float(np.mean([r["collision"] for r in rows])) if rows else 0.0
    atomic_write_json_if_changed(out / CARD, card)
    return card


@dataclass
class ImportResult:
    card: dict[str, Any]
    rejected: list[tuple[str, str]]


def import_dataset(
    src: str | Path,
    out: str | Path,
    image_size: int | None,
    action_dim: int | None,
    description: dict[str, Any] | None = None,
) -> ImportResult:
    """Validate episode files under `src` (e.g. the authors' release) and copy the good ones into `out`."""
    from veorl.data.episodes import import_episodes

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"--import-from {src}: not a directory")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ValueError(f"--import-from {src} must not lie inside the output directory {out}")
    # Validate and copy into a staging folder first: an import that accepts nothing (or dies half-way) must
    # leave the existing dataset as it was. Only then does it replace the dataset, so episodes of an earlier
    # collection or import never mix with the imported ones.
    staging = out.parent / f".{out.name}.import-staging"
    shutil.rmtree(staging, ignore_errors=True)
    report = import_episodes(src, staging, image_size=image_size, action_dim=action_dim)
    ignored = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and p.suffix != ".npz")
    if not report.accepted:
        shutil.rmtree(staging, ignore_errors=True)
        card = {
            "version": CARD_VERSION,
            "source": "imported",
            "imported_from": str(src),
            "episodes": 0,
            "steps": 0,
            "rejected": [{"file": name, "reason": reason} for name, reason in report.rejected],
            "ignored_non_npz": ignored,
        }
        return ImportResult(card, report.rejected)
    _remove_stale(out, 0)
    (out / EPISODE_DIR).mkdir(parents=True, exist_ok=True)
    for path in sorted((staging / EPISODE_DIR).iterdir()):
        os.replace(path, out / EPISODE_DIR / path.name)
    shutil.rmtree(staging, ignore_errors=True)
    rows = _episode_rows(out)
    for row, original in zip(rows, report.accepted):
        row["imported_from"] = original
    card = {
        "version": CARD_VERSION,
        "source": "imported",
        "imported_from": str(src),
        **(description or {}),
        **_summary(rows),
        "rejected": [{"file": name, "reason": reason} for name, reason in report.rejected],
        "ignored_non_npz": ignored,
        "per_episode": rows,
    }
    atomic_write_json_if_changed(out / CARD, card)
    return ImportResult(card, report.rejected)


__all__ = [
    "collect_dataset",
    "import_dataset",
    "dataset_card",
    "episode_level",
    "episode_recipe",
    "collect_episode",
    "CollectResult",
    "ImportResult",
    "SUCCESS_BANDS",
    "EpisodeError",
]
