"""Checkpoints (atomic, pruned, safely loaded, config-guarded), their folder per configuration, and resumable,
prefetching samplers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from tests.builders import write_clips, write_episodes
from veorl.checkpoint import CheckpointManager, CheckpointMismatch, assert_resumable, config_differences, run_directory
from veorl.data.clips import ClipStore
from veorl.data.episodes import EpisodeStore
from veorl.data.samplers import ClipSampler, EpisodeWindowSampler, JointSampler, Prefetcher, step_rng


def test_save_load_latest_and_pruning(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    assert manager.load_latest() is None
    for step in (2, 4, 6):
        manager.save(step, {"step": step, "weights": torch.full((3,), float(step))})
    assert [s for s, _ in manager.checkpoints()] == [4, 6]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "ckpt-000000006.pt"
    state = manager.load_latest()
    assert state["step"] == 6 and torch.equal(state["weights"], torch.full((3,), 6.0))
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]


def test_corrupt_latest_falls_back_to_older(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1})
    manager.save(2, {"step": 2})
    manager.path_for(2).write_bytes(b"truncated")
    assert manager.load_latest()["step"] == 1
    (tmp_path / "latest").unlink()
    assert manager.load_latest()["step"] == 1


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        manager.save(2, {"step": 2, "bad": Unpicklable()})
    assert manager.load_latest()["step"] == 1
    assert [s for s, _ in manager.checkpoints()] == [1]


def test_optimizer_state_round_trips_through_the_safe_loader(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(tmp_path)
    manager.save(
        1,
        {
            "optimizer": optimizer.state_dict(),
            "curve": [{"step": 1, "phase": "a", "loss": 0.5}],
            "progress": {"a": 1},
            "mlflow_run_id": None,
        },
    )
    state = manager.load_latest()
    other = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    other.load_state_dict(state["optimizer"])
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert state["curve"][0]["loss"] == 0.5
    # A file holding anything but tensors and plain containers is refused (a tampered file cannot run code on
    # load); the manager falls back to the previous checkpoint.
    manager.save(2, {"thing": threading.Lock})
    assert manager.load_latest()["progress"] == {"a": 1}


def test_run_directory_depends_on_the_maths_and_the_inputs_only(tmp_path):
    config = {"model": {"deter": 200}, "pretrain": {"optim": {"lr": 3e-4}, "phase1_steps": 10, "log_every": 5}}
    upstream = {"video_clips": "aaa", "target_episodes": "bbb"}
    base = run_directory(tmp_path, config, upstream)
    assert base.parent == tmp_path and base.name.startswith("run-")
    # resumable settings (step counts, logging) and the order of the inputs do not move the folder
    longer = {"model": {"deter": 200}, "pretrain": {"optim": {"lr": 3e-4}, "phase1_steps": 99, "log_every": 1}}
    assert run_directory(tmp_path, longer, dict(reversed(upstream.items()))) == base
    other_lr = {"model": {"deter": 200}, "pretrain": {"optim": {"lr": 1e-3}, "phase1_steps": 10, "log_every": 5}}
    assert run_directory(tmp_path, other_lr, upstream) != base
    assert run_directory(tmp_path, config, {**upstream, "target_episodes": "ccc"}) != base


def test_resume_guard_names_the_key():
    saved = {"model": {"deter": 200}, "pretrain": {"optim": {"lr": 3e-4}, "phase1_steps": 10, "log_every": 5}}
    longer = {"model": {"deter": 200}, "pretrain": {"optim": {"lr": 3e-4}, "phase1_steps": 20, "log_every": 1}}
    assert_resumable(saved, longer)  # extending training and logging more often are fine
    changed = {"model": {"deter": 200}, "pretrain": {"optim": {"lr": 1e-3}, "phase1_steps": 10, "log_every": 5}}
    with pytest.raises(CheckpointMismatch, match=r"pretrain\.optim\.lr: checkpoint has 0\.0003, now 0\.001"):
        assert_resumable(saved, changed)
    assert config_differences(saved, {"model": {"deter": 200}})[0][0] == "pretrain.optim.lr"


# ------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------


def _episodes(tmp_path, lengths=(30, 45)) -> EpisodeStore:
    root = write_episodes(tmp_path / "episodes", episodes=len(lengths), length=lengths)
    return EpisodeStore(root, cache_episodes=1)


def _clips(tmp_path, shards=(5, 3), window=10) -> ClipStore:
    """Clips of `window` frames in shards of shards[0], shards[1], ... clips."""
    root = write_clips(tmp_path / "clips", clips=sum(shards), window=window, clips_per_shard=shards[0])
    return ClipStore(root)


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    episodes, clips = _episodes(tmp_path), _clips(tmp_path)
    a = JointSampler(
        target=EpisodeWindowSampler(episodes, 3, 8, seed=5, keys=("image", "action")),
        source=ClipSampler(clips, 4, 6, seed=5),
    )
    b = JointSampler(
        target=EpisodeWindowSampler(EpisodeStore(tmp_path / "episodes"), 3, 8, seed=5, keys=("image", "action")),
        source=ClipSampler(ClipStore(tmp_path / "clips"), 4, 6, seed=5),
    )
    for step in (7, 0, 3, 7):  # any order: no hidden sequential state
        x, y = a(step), b(step)
        assert np.array_equal(x["target"]["image"], y["target"]["image"])
        assert np.array_equal(x["source"]["image"], y["source"]["image"])
    assert a(0)["target"]["image"].shape == (3, 8, 64, 64, 3) and set(a(0)["target"]) == {"image", "action"}
    assert a(0)["source"]["image"].shape == (4, 6, 64, 64, 3)
    assert not np.array_equal(a(1)["target"]["image"], a(2)["target"]["image"])
    other_seed = EpisodeWindowSampler(episodes, 3, 8, seed=6)
    assert not np.array_equal(other_seed(1)["image"], a(1)["target"]["image"])
    assert not np.array_equal(step_rng(0, 0, 1).random(4), step_rng(0, 1, 1).random(4))


def test_samplers_reject_impossible_lengths(tmp_path):
    with pytest.raises(ValueError, match="seq_len=99"):
        EpisodeWindowSampler(_episodes(tmp_path), 2, 99, seed=0)
    with pytest.raises(ValueError, match="source_len"):
        ClipSampler(_clips(tmp_path), 2, 11, seed=0)


def test_prefetcher_yields_in_order_and_equals_inline(tmp_path):
    sampler = EpisodeWindowSampler(_episodes(tmp_path), 2, 5, seed=0, keys=("image",))
    inline = list(Prefetcher(sampler, 3, 8, depth=0))
    with Prefetcher(sampler, 3, 8, depth=2) as threaded:
        ahead = list(threaded)
    assert [s for s, _ in inline] == [s for s, _ in ahead] == [3, 4, 5, 6, 7]
    for (_, x), (_, y) in zip(inline, ahead):
        assert isinstance(y["image"], torch.Tensor) and torch.equal(x["image"], y["image"])


def test_prefetcher_stays_bounded_and_reports_errors():
    built: list[int] = []
    release = threading.Event()

    def make(step):
        built.append(step)
        if step == 6:
            raise OSError("disk gone")
        return {"x": np.full(2, step)}

    with Prefetcher(make, 0, 100, depth=2) as stream:
        it = iter(stream)
        assert next(it)[0] == 0
        time.sleep(0.3)
        # one handed out, `depth` waiting in the queue, one blocked on put: never the whole range
        assert len(built) <= 4
        release.set()
        with pytest.raises(RuntimeError, match="step 6 failed: disk gone"):
            for _ in it:
                pass


def test_settings_added_later_at_their_old_behaviour_keep_the_identity(tmp_path):
    """A checkpoint recorded before `precision` and `domain` existed is still found and resumable with them at the
    values that reproduce the old code (fp32, manipulation); another value is a change of the maths."""
    from veorl.checkpoint import run_directory

    before = {"preset": "cpu", "finetune": {"lr": 1e-3}}
    now = {"preset": "cpu", "domain": "manipulation", "finetune": {"lr": 1e-3, "precision": "fp32", "compile": False}}
    assert run_directory(tmp_path, before, {}) == run_directory(tmp_path, now, {})
    assert_resumable(before, now)
    bf16 = {**now, "finetune": {**now["finetune"], "precision": "bf16"}}
    assert run_directory(tmp_path, before, {}) != run_directory(tmp_path, bf16, {})
    with pytest.raises(CheckpointMismatch, match="finetune.precision"):
        assert_resumable(before, bf16)
    with pytest.raises(CheckpointMismatch, match="domain"):
        assert_resumable(before, {**now, "domain": "driving"})
