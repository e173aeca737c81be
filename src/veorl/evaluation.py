"""Evaluating a deployable agent in its simulator.

Each worker process loads the agent and builds its own environment (simulators are neither
fork- nor pickle-safe), then plays whole episodes with the deterministic policy: episode i is
reset with seed `seed + i`, so a result does not depend on how episodes were spread over workers.
A policy that raises or emits a non-finite action stops the evaluation with an EvaluationError
naming the episode and the step; nothing is averaged over the episodes that did finish.
"""

from __future__ import annotations

import concurrent.futures as futures
import csv
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veorl.storage import atomic_path


class EvaluationError(RuntimeError):
    """The policy or the simulator failed during evaluation; the message names the episode and the step."""


@dataclass(frozen=True)
class EpisodeResult:
    episode: int
    seed: int
    ret: float
    success: bool
    length: int
    video: str | None = None


def upscale(frame: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W, 3) frame to (size, size, 3): keeps the pixels the agent saw, only bigger."""
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    rows = (np.arange(size) * frame.shape[0] // size).astype(np.int64)
    cols = (np.arange(size) * frame.shape[1] // size).astype(np.int64)
    return frame[rows][:, cols]


def play_episode(agent: Any, env: Any, episode: int, seed: int, max_steps: int,
                 record: bool = False) -> tuple[EpisodeResult, list[np.ndarray]]:
    """One deterministic episode; returns the result and (when `record`) the frames the agent observed."""
    where = f"episode {episode} (seed {seed})"
    try:
        obs = env.reset(seed=seed)
    except Exception as exc:
        raise EvaluationError(f"{where}: the simulator failed to reset: {type(exc).__name__}: {exc}") from exc
    state = agent.initial_state(1)
    frames: list[np.ndarray] = [obs["image"]] if record else []
    total, success, steps = 0.0, False, 0
    for step in range(max_steps):
        image = np.asarray(obs["image"], dtype=np.uint8)[None]
        try:
            action, state = agent.act(image, state)
        except Exception as exc:
            raise EvaluationError(f"{where}, step {step}: the policy crashed: {type(exc).__name__}: {exc}") from exc
        action = np.asarray(action)
        if action.shape != (1, agent.action_dim):
            raise EvaluationError(f"{where}, step {step}: the policy returned an action of shape {action.shape}, "
                                  f"expected (1, {agent.action_dim})")
        if not np.all(np.isfinite(action)):
            raise EvaluationError(f"{where}, step {step}: the policy produced a non-finite action {action[0].tolist()}")
        try:
            obs, reward, done, info = env.step(action[0])
        except Exception as exc:
            raise EvaluationError(f"{where}, step {step}: the simulator failed: {type(exc).__name__}: {exc}") from exc
        if not np.isfinite(reward):
            raise EvaluationError(f"{where}, step {step}: the simulator returned a non-finite reward {reward}")
        total += float(reward)
        success = success or bool(info.get("success", False))
        steps = step + 1
        if record:
            frames.append(obs["image"])
        if done:
            break
    return EpisodeResult(episode=episode, seed=seed, ret=total, success=success, length=steps), frames


# ----------------------------------------------------------------------------------------------
# Worker processes: each one holds its own agent and environment.
# ----------------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(agent_dir: str, device: str, threads: int) -> None:
    import torch

    from veorl.agent import Agent
    from veorl.envs import make_env

    # Several workers share the cores: one intra-op thread each avoids oversubscription (0 = leave as is).
    if threads > 0:
        torch.set_num_threads(threads)
    agent = Agent.load(agent_dir, device=device)
    meta = agent.meta
    env = make_env(env=meta["env"], task=meta["task"], camera=meta["camera"], size=int(meta["image_size"]),
                   episode_length=int(meta["episode_length"]), seed=0)
    if int(env.action_dim) != agent.action_dim:
        raise EvaluationError(f"agent {agent_dir} acts in {agent.action_dim} dimensions but {meta['env']}/{meta['task']} "
                              f"expects {env.action_dim}")
    _worker.update(agent=agent, env=env, episode_length=int(meta["episode_length"]))


def _close_worker() -> None:
    env = _worker.pop("env", None)
    if env is not None:
        env.close()
    _worker.clear()


def _run_one(episode: int, seed: int, video_path: str | None, video_size: int, fps: int) -> EpisodeResult:
    result, frames = play_episode(_worker["agent"], _worker["env"], episode, seed, _worker["episode_length"],
                                  record=video_path is not None)
    if video_path is None:
        return result
    from veorl.video.encode import write_video

    write_video(video_path, (upscale(f, video_size) for f in frames), fps=fps)
    return EpisodeResult(**{**asdict(result), "video": video_path})


def evaluate_agent(agent_dir: str | Path, episodes: int, seed: int, workers: int = 1, videos: int = 0,
                   video_size: int = 64, video_dir: str | Path | None = None, device: str = "cpu", fps: int = 30,
                   progress: bool = True) -> list[EpisodeResult]:
    """Play `episodes` deterministic episodes (episode i seeded `seed + i`); the first `videos` are rendered to MP4."""
    from tqdm import tqdm

    if videos and video_dir is None:
        raise ValueError("evaluate_agent: video_dir is required when videos > 0")
    jobs = []
    for i in range(episodes):
        path = str(Path(video_dir) / f"episode_{i:03d}.mp4") if video_dir is not None and i < videos else None
        jobs.append((i, seed + i, path, video_size, fps))
    workers = max(1, min(workers, episodes))
    results: list[EpisodeResult] = []
    bar = tqdm(total=episodes, desc="evaluate", unit="episode", disable=not progress)
    try:
        if workers == 1:
            # One worker: play in this process and skip the start-up cost of a pool.
            _init_worker(str(agent_dir), device, threads=0)
            try:
                for job in jobs:
                    results.append(_run_one(*job))
                    bar.update(1)
            finally:
                _close_worker()
        else:
            from veorl.agent import Agent

            # Fail here with the loader's own message rather than as an anonymous broken worker pool.
            Agent.load(str(agent_dir), device="cpu")
            context = multiprocessing.get_context("spawn")
            with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                             initargs=(str(agent_dir), device, 1)) as pool:
                pending = [pool.submit(_run_one, *job) for job in jobs]
                try:
                    for done in futures.as_completed(pending):
                        results.append(done.result())
                        bar.update(1)
                except BaseException:
                    for other in pending:
                        other.cancel()
                    raise
    except BrokenProcessPool as exc:
        raise EvaluationError(f"an evaluation worker died (killed or out of memory): {exc}") from exc
    finally:
        bar.close()
    return sorted(results, key=lambda r: r.episode)


def summarise(results: list[EpisodeResult]) -> dict[str, float | int]:
    if not results:
        raise EvaluationError("no evaluation episode finished; refusing to report a score")
    returns = np.array([r.ret for r in results], dtype=np.float64)
    successes = np.array([r.success for r in results], dtype=np.float64)
    lengths = np.array([r.length for r in results], dtype=np.float64)
    return {
        "episodes": len(results),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "success_rate": float(successes.mean()),
        "success_std": float(successes.std()),
        "mean_length": float(lengths.mean()),
    }


def write_episodes_csv(path: str | Path, results: list[EpisodeResult]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["episode", "return", "success", "length"])
            for r in results:
                writer.writerow([r.episode, f"{r.ret:.6f}", int(r.success), r.length])


def plot_returns(path: str | Path, results: list[EpisodeResult], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    episodes = [r.episode for r in results]
    returns = [r.ret for r in results]
    colours = ["tab:green" if r.success else "tab:grey" for r in results]
    ax.bar(episodes, returns, color=colours)
    ax.axhline(float(np.mean(returns)), color="tab:blue", linestyle="--", label=f"mean {np.mean(returns):.1f}")
    ax.set_xlabel("episode (green: success)")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
