"""Evaluating a deployable agent in its simulator.

Each worker process loads the agent and builds its own environment (simulators are neither
fork- nor pickle-safe), then plays whole episodes with the deterministic policy (`policy="mode"`, the default) or
with actions drawn from it (`policy="sample"`): episode i is reset with seed `seed + i`, and a sampling agent's
stream is reseeded with the same number, so a result does not depend on how episodes were spread over workers.
A policy that raises or emits a non-finite action stops the evaluation with an EvaluationError
naming the episode and the step; nothing is averaged over the episodes that did finish.

Simulators whose steps report info["collision"] (driving) add a collision rate: the share of episodes that
ended in a collision (or by leaving the road). Their success is "no collision and reached the end".
Simulators whose steps report info["tasks"] (the game: {task: achievement unlocked this episode} for every crafter
achievement) add a success rate per task (`success_per_task`; the target task's equals `success_rate`) and an
`achievements` column in episodes.csv.
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veorl.parallel import run_parallel, worker_count
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
    collision: bool | None = None  # driving: the episode ended in a collision; None where the simulator has none
    tasks: dict[str, bool] | None = None  # game: whether each task's achievement was unlocked; None elsewhere
    predicted_return: float | None = None  # the world model's reward summed over the steps it was compared on
    simulator_return: float | None = None  # the simulator's reward over the same steps
    reward_correlation: float | None = None  # per-step correlation of the two (nan when either is constant)


def upscale(frame: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W, 3) frame to (size, size, 3): keeps the pixels the agent saw, only
    bigger."""
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    rows = (np.arange(size) * frame.shape[0] // size).astype(np.int64)
    cols = (np.arange(size) * frame.shape[1] // size).astype(np.int64)
    return frame[rows][:, cols]


def play_episode(
    agent: Any, env: Any, episode: int, seed: int, max_steps: int, record: bool = False
) -> tuple[EpisodeResult, list[np.ndarray]]:
    """One episode; returns the result and (when `record`) the frames the agent observed. An agent that samples
    its actions draws them from a stream restarted at `seed`."""
    where = f"episode {episode} (seed {seed})"
    try:
        # Episode i plays task variation i: the episodes of one evaluation start from distinct configurations
        # (a seed alone picks a variation at random, and 10 seeds can share one).
        obs = env.reset(seed=seed, variation=episode)
    except Exception as exc:
        raise EvaluationError(f"{where}: the simulator failed to reset: {type(exc).__name__}: {exc}") from exc
    if hasattr(agent, "reseed"):
        agent.reseed(seed)
    state = agent.initial_state(1)
    frames: list[np.ndarray] = [obs["image"]] if record else []
    total, success, steps = 0.0, False, 0
    collision: bool | None = None
    tasks: dict[str, bool] | None = None
    # The world model's reward on each state the agent filtered, against the reward that came with that
    # observation (the first observation comes with none).
    compare = getattr(agent, "reward_head", None) is not None
    predicted, paid, last_reward = [], [], None
    for step in range(max_steps):
        image = np.asarray(obs["image"], dtype=np.uint8)[None]
        try:
            action, state = agent.act(image, state)
        except Exception as exc:
            raise EvaluationError(f"{where}, step {step}: the policy crashed: {type(exc).__name__}: {exc}") from exc
        if compare and last_reward is not None:
            predicted.append(float(agent.predicted_reward(state)[0]))
            paid.append(last_reward)
        action = np.asarray(action)
        if action.shape != (1, agent.action_dim):
            raise EvaluationError(
                f"{where}, step {step}: the policy returned an action of shape {action.shape}, "
                f"expected (1, {agent.action_dim})"
            )
        if not np.all(np.isfinite(action)):
            raise EvaluationError(f"{where}, step {step}: the policy produced a non-finite action {action[0].tolist()}")
        try:
            obs, reward, done, info = env.step(action[0])
        except Exception as exc:
            raise EvaluationError(f"{where}, step {step}: the simulator failed: {type(exc).__name__}: {exc}") from exc
        if not np.isfinite(reward):
            raise EvaluationError(f"{where}, step {step}: the simulator returned a non-finite reward {reward}")
        total += float(reward)
        last_reward = float(reward)
        success = success or bool(info.get("success", False))
        if "collision" in info:
            collision = bool(collision) or bool(info["collision"])
        if "tasks" in info:
            tasks = {name: bool(done_) for name, done_ in info["tasks"].items()}
        steps = step + 1
        if record:
            frames.append(obs["image"])
        if done:
            break
    comparison = {}
    if predicted:
        p, r = np.asarray(predicted), np.asarray(paid)
        correlation = float(np.corrcoef(p, r)[0, 1]) if p.std() > 0 and r.std() > 0 else float("nan")
        comparison = {
            "predicted_return": float(p.sum()),
            "simulator_return": float(r.sum()),
            "reward_correlation": correlation,
        }
    result = EpisodeResult(
        episode=episode,
        seed=seed,
        ret=total,
        success=success,
        length=steps,
        collision=collision,
        tasks=tasks,
        **comparison,
    )
    return result, frames


# ----------------------------------------------------------------------------------------------
# Worker processes: each one holds its own agent and environment.
# ----------------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def agent_env(agent: Any, agent_dir: str | Path) -> Any:
    """The simulator an agent was trained for (its meta: env, task, camera, image size, episode length), checked
    against the agent's action size."""
    from veorl.envs import make_env

    meta = agent.meta
    env = make_env(
        env=meta["env"],
        task=meta["task"],
        camera=meta["camera"],
        size=int(meta["image_size"]),
        episode_length=int(meta["episode_length"]),
        seed=0,
    )
    if int(env.action_dim) != agent.action_dim:
        env.close()
        raise EvaluationError(
            f"agent {agent_dir} acts in {agent.action_dim} dimensions but {meta['env']}/{meta['task']} "
            f"expects {env.action_dim}"
        )
    return env


def _init_worker(agent_dir: str, device: str, threads: int, precision: str = "fp32", policy: str = "mode") -> None:
    import torch

    from veorl.agent import Agent

    if threads > 0:  # 0 = leave torch's setting as it is
        torch.set_num_threads(threads)
    agent = Agent.load(agent_dir, device=device, precision=precision, policy=policy)
    env = agent_env(agent, agent_dir)
    _worker.update(agent=agent, env=env, episode_length=int(agent.meta["episode_length"]))


def _close_worker() -> None:
    env = _worker.pop("env", None)
    if env is not None:
        env.close()
    _worker.clear()


def _run_one(job: tuple[int, int, str | None, int, int]) -> EpisodeResult:
    episode, seed, video_path, video_size, fps = job
    result, frames = play_episode(
        _worker["agent"], _worker["env"], episode, seed, _worker["episode_length"], record=video_path is not None
    )
    if video_path is None:
        return result
    from veorl.video.encode import write_video

    write_video(video_path, (upscale(f, video_size) for f in frames), fps=fps)
    return EpisodeResult(**{**asdict(result), "video": video_path})


def evaluate_agent(
    agent_dir: str | Path,
    episodes: int,
    seed: int,
    workers: int = 1,
    videos: int = 0,
    video_size: int = 64,
    video_dir: str | Path | None = None,
    device: str = "cpu",
    fps: int = 30,
    progress: bool = True,
    precision: str = "fp32",
    policy: str = "mode",
) -> list[EpisodeResult]:
    """Play `episodes` episodes (episode i seeded `seed + i`); the first `videos` are rendered to MP4.

    `precision` (fp32 | bf16, resolved by the caller) is what the agent's networks act in; `policy` is how they
    act: the distribution's mode (deterministic) or a draw from it (veorl.agent.POLICIES).
    """
    from tqdm import tqdm

    if videos and video_dir is None:
        raise ValueError("evaluate_agent: video_dir is required when videos > 0")
    jobs = []
    for i in range(episodes):
        path = str(Path(video_dir) / f"episode_{i:03d}.mp4") if video_dir is not None and i < videos else None
        jobs.append((i, seed + i, path, video_size, fps))
    workers = worker_count(workers, episodes)
    if workers > 1:
        from veorl.agent import Agent

        # Fail here with the loader's own message rather than from inside every worker.
        Agent.load(str(agent_dir), device="cpu", policy=policy)
    results: list[EpisodeResult] = []
    bar = tqdm(total=episodes, desc="evaluate", unit="episode", disable=not progress)
    try:
        # Several workers share the cores: one intra-op thread each avoids oversubscription; in this process
        # (threads 0) torch keeps its own setting.
        outcomes = run_parallel(
            _run_one,
            jobs,
            workers,
            initializer=_init_worker,
            initargs=(str(agent_dir), device, 1 if workers > 1 else 0, precision, policy),
            cleanup=_close_worker,
        )
        # closing(): raising below stops the other workers now, not whenever the generator is collected.
        with contextlib.closing(outcomes):
            for outcome in outcomes:
                if outcome.died:
                    episode = jobs[outcome.index][0]
                    raise EvaluationError(
                        f"episode {episode} (seed {seed + episode}): the evaluation worker died "
                        f"(killed, out of memory or crashed in the simulator); no score is reported"
                    )
                results.append(outcome.value)
                bar.update(1)
    finally:
        bar.close()
    return sorted(results, key=lambda r: r.episode)


def summarise(results: list[EpisodeResult]) -> dict[str, float | int]:
    if not results:
        raise EvaluationError("no evaluation episode finished; refusing to report a score")
    returns = np.array([r.ret for r in results], dtype=np.float64)
    successes = np.array([r.success for r in results], dtype=np.float64)
    lengths = np.array([r.length for r in results], dtype=np.float64)
    summary = {
        "episodes": len(results),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "success_rate": float(successes.mean()),
        "success_std": float(successes.std()),
        "mean_length": float(lengths.mean()),
    }
    if any(r.collision is not None for r in results):
        summary["collision_rate"] = float(np.mean([bool(r.collision) for r in results]))
    return summary


def task_success_rates(results: list[EpisodeResult]) -> dict[str, float] | None:
    """Share of episodes that unlocked each task's achievement (the game), None for simulators without tasks."""
    reported = [r.tasks for r in results if r.tasks is not None]
    if not reported:
        return None
    names = sorted(set().union(*reported))
    return {name: float(np.mean([bool(tasks.get(name, False)) for tasks in reported])) for name in names}


def reward_diagnostics(results: list[EpisodeResult]) -> dict[str, float] | None:
    """Predicted vs simulator reward along the agent's own rollouts (None for agents without a reward head).

    A world model that over-predicts on the states the agent visits is what a collapsed actor exploits."""
    compared = [r for r in results if r.predicted_return is not None]
    if not compared:
        return None
    predicted = float(np.mean([r.predicted_return for r in compared]))
    paid = float(np.mean([r.simulator_return for r in compared]))
    correlations = [
        r.reward_correlation for r in compared if r.reward_correlation is not None and np.isfinite(r.reward_correlation)
    ]
    return {
        "predicted_return": predicted,
        "simulator_return": paid,
        "predicted_over_simulator": predicted / paid if paid > 1e-8 else float("nan"),
        "correlation": float(np.mean(correlations)) if correlations else float("nan"),
    }


def write_episodes_csv(path: str | Path, results: list[EpisodeResult]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            collisions = any(r.collision is not None for r in results)
            tasks = any(r.tasks is not None for r in results)
            writer.writerow(
                ["episode", "return", "success", "length"]
                + (["collision"] if collisions else [])
                + (["achievements"] if tasks else [])
            )
            for r in results:
                row = [r.episode, f"{r.ret:.6f}", int(r.success), r.length]
                row += [int(bool(r.collision))] if collisions else []
                row += [";".join(sorted(k for k, v in (r.tasks or {}).items() if v))] if tasks else []
                writer.writerow(row)


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
