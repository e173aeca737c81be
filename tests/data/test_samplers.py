"""Batch samplers and the prefetcher: reproducible from (seed, stream, step), and windows that respect lengths.

The datasets are written here with the real writers (save_episode, the ingest manifest layout), with contents
that encode where every frame and step came from, so a test can tell whether a window is contiguous.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from veorl.data.clips import ClipStore
from veorl.data.episodes import EPISODE_DIR, EpisodeStore, save_episode
from veorl.data.samplers import ClipSampler, EpisodeWindowSampler, JointSampler, Prefetcher, step_rng

SIZE = 8  # frame side; ClipStore takes the size from the manifest
WINDOW = 6
EPISODE_LENGTHS = (5, 12, 20)


def write_episodes(root: Path, lengths=EPISODE_LENGTHS) -> Path:
    """Episodes whose reward is 1000 * episode + step, so a window shows its episode and its steps."""
    for index, length in enumerate(lengths):
        steps = np.arange(length)
        save_episode(
            root / EPISODE_DIR,
            index,
            {
                "image": np.full((length, 64, 64, 3), index, np.uint8),
                "action": np.zeros((length, 4), np.float32),
                "reward": (1000 * index + steps).astype(np.float32),
                "discount": np.ones(length, np.float32),
            },
        )
    return root


def write_clips(root: Path, shards=(3, 2)) -> Path:
    """Ingested clips in the manifest layout; pixel [0, 0, 0] of frame f of clip c in shard s is 100*s + 10*c + f."""
    sources = []
    (root / "clips").mkdir(parents=True)
    for s, count in enumerate(shards):
        clips = np.zeros((count, WINDOW, SIZE, SIZE, 3), np.uint8)
        for c in range(count):
            for f in range(WINDOW):
                clips[c, f, 0, 0, 0] = 100 * s + 10 * c + f
        name = f"clips/src{s}-0000.npy"
        np.save(root / name, clips)
        sources.append({"uri": f"src{s}", "status": "ok", "shards": [{"file": name, "clips": count}]})
    (root / "manifest.json").write_text(json.dumps({"version": 1, "size": SIZE, "window": WINDOW, "sources": sources}))
    return root


@pytest.fixture
def episodes(tmp_path) -> EpisodeStore:
    return EpisodeStore(write_episodes(tmp_path / "episodes"))


@pytest.fixture
def clips(tmp_path) -> ClipStore:
    return ClipStore(write_clips(tmp_path / "clips"))


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# Reproducibility
# ----------------------------------------------------------------------------------------------


def test_step_rng_depends_on_seed_stream_and_step_only():
    draw = lambda *key: step_rng(*key).integers(0, 2**62, 4)  # noqa: E731
    assert np.array_equal(draw(1, 0, 5), draw(1, 0, 5))
    variants = [draw(1, 0, 5), draw(2, 0, 5), draw(1, 1, 5), draw(1, 0, 6)]
    assert len({tuple(v) for v in variants}) == 4


def test_batches_are_a_pure_function_of_seed_stream_and_step(tmp_path, episodes, clips):
    # A second store and sampler (as after a restart) queried in another order gives the same batches.
    fresh_episodes = EpisodeStore(tmp_path / "episodes", cache_episodes=1)
    first = EpisodeWindowSampler(episodes, batch=4, seq_len=4, seed=7, stream=0)
    again = EpisodeWindowSampler(fresh_episodes, batch=4, seq_len=4, seed=7, stream=0)
    forward = {step: first(step) for step in (0, 1, 2, 9)}
    for step in (9, 2, 0, 1):
        assert equal(again(step), forward[step]), step
    assert not equal(forward[0], forward[1])  # steps differ

    clip_a, clip_b = ClipSampler(clips, 3, 4, seed=7), ClipSampler(ClipStore(clips.root), 3, 4, seed=7)
    assert equal(clip_b(4), clip_a(4)) and equal(clip_a(4), clip_a(4))
    assert first.state_dict() == {"kind": "episodes", "seed": 7, "stream": 0, "batch": 4, "seq_len": 4}


def test_different_streams_and_seeds_give_different_batches(episodes, clips):
    base = EpisodeWindowSampler(episodes, 8, 4, seed=3, stream=0)(5)
    assert not equal(EpisodeWindowSampler(episodes, 8, 4, seed=3, stream=1)(5), base)
    assert not equal(EpisodeWindowSampler(episodes, 8, 4, seed=4, stream=0)(5), base)
    assert not equal(ClipSampler(clips, 6, 4, seed=3, stream=1)(5), ClipSampler(clips, 6, 4, seed=3, stream=2)(5))
    # The joint sampler draws each member on its own stream: target and source stay independent of each other.
    joint = JointSampler(
        target=EpisodeWindowSampler(episodes, 8, 4, seed=3, stream=0), source=ClipSampler(clips, 6, 4, seed=3, stream=1)
    )
    both = joint(5)
    assert equal(both["target"], base) and equal(both["source"], ClipSampler(clips, 6, 4, seed=3, stream=1)(5))
    assert joint.state_dict()["source"]["stream"] == 1


# ----------------------------------------------------------------------------------------------
# Lengths
# ----------------------------------------------------------------------------------------------


def test_episode_windows_are_consecutive_steps_of_long_enough_episodes(episodes):
    sampler = EpisodeWindowSampler(episodes, batch=64, seq_len=8, seed=0)
    seen = set()
    for step in range(5):
        batch = sampler(step)
        assert batch["image"].shape == (64, 8, 64, 64, 3) and batch["reward"].shape == (64, 8)
        for row in batch["reward"].astype(np.int64):
            episode, start = divmod(int(row[0]), 1000)
            assert np.array_equal(row, 1000 * episode + start + np.arange(8))  # one episode, consecutive steps
            assert start + 8 <= EPISODE_LENGTHS[episode]  # the window ends inside the episode
            assert EPISODE_LENGTHS[episode] >= 8  # the 5-step episode is never drawn
            seen.add(episode)
        assert np.all(batch["image"][:, :, 0, 0, 0] == (batch["reward"][:, :1] // 1000))  # arrays stay aligned
    assert seen == {1, 2}


def test_episode_sampler_keys_and_length_limits(episodes):
    only = EpisodeWindowSampler(episodes, 2, 3, seed=0, keys=("reward", "action"))(0)
    assert set(only) == {"reward", "action"}
    assert EpisodeWindowSampler(episodes, 2, max(EPISODE_LENGTHS), seed=0)(0)["reward"].shape == (2, 20)
    with pytest.raises(ValueError, match="seq_len=21"):
        EpisodeWindowSampler(episodes, 2, max(EPISODE_LENGTHS) + 1, seed=0)


def test_absorbing_store_pads_short_terminal_episodes_and_leaves_the_rest_alone(tmp_path, episodes):
    """With `absorbing` (the discount head's data), the 5-step episode is drawn too: from its start, then absorbing
    steps (last frame, zero action and reward, discount 0). Long episodes are sampled exactly as before."""
    absorbing = EpisodeStore(write_episodes(tmp_path / "absorbing"), absorbing=True)
    batch = EpisodeWindowSampler(absorbing, batch=64, seq_len=8, seed=0)(0)
    short = batch["reward"][:, 0] < 1000
    assert short.any()
    assert np.array_equal(batch["reward"][short][:, :5], np.tile(np.arange(5.0), (short.sum(), 1)))
    assert np.all(batch["reward"][short][:, 5:] == 0) and np.all(batch["discount"][short][:, 5:] == 0)
    assert np.all(batch["discount"][short][:, :5] == 1) and np.all(batch["image"][short][:, 5:] == 0)
    assert np.all(batch["action"][short][:, 5:] == 0) and "is_terminal" not in batch  # no key is invented
    # every window is as long as asked; at seq_len 20 only the padded short episode and the 20-step one fit whole
    assert EpisodeWindowSampler(absorbing, 4, 20, seed=0)(0)["reward"].shape == (4, 20)
    # no short episode in play: the same windows as a store without padding
    assert equal(
        EpisodeWindowSampler(EpisodeStore(write_episodes(tmp_path / "long", (12, 20)), absorbing=True), 8, 8, 3)(2),
        EpisodeWindowSampler(EpisodeStore(write_episodes(tmp_path / "plain", (12, 20))), 8, 8, 3)(2),
    )


def test_clip_windows_are_contiguous_pieces_of_one_clip(clips):
    sampler = ClipSampler(clips, batch=32, length=4, seed=1)
    for step in range(4):
        images = sampler(step)["image"]
        assert images.shape == (32, 4, SIZE, SIZE, 3) and images.dtype == np.uint8
        codes = images[:, :, 0, 0, 0].astype(np.int64)
        for row in codes:
            shard, rest = divmod(int(row[0]), 100)
            clip, frame = divmod(rest, 10)
            assert shard in (0, 1) and clip < (3, 2)[shard] and frame + 4 <= WINDOW
            assert np.array_equal(row, row[0] + np.arange(4))
    assert ClipSampler(clips, 2, WINDOW, seed=0)(0)["image"].shape[1] == WINDOW
    with pytest.raises(ValueError, match="fewer than the 7 requested"):
        ClipSampler(clips, 2, WINDOW + 1, seed=0)


# ----------------------------------------------------------------------------------------------
# Prefetcher
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_yields_steps_in_order_with_the_direct_batches(episodes, clips, depth):
    sampler = JointSampler(target=EpisodeWindowSampler(episodes, 4, 5, seed=2), source=ClipSampler(clips, 3, 4, seed=2))
    with Prefetcher(sampler, start=3, stop=11, depth=depth) as prefetch:
        got = list(prefetch)
    assert [step for step, _ in got] == list(range(3, 11))
    for step, batch in got:
        assert isinstance(batch["target"]["reward"], torch.Tensor) and batch["source"]["image"].dtype == torch.uint8
        direct = sampler(step)
        assert equal({k: v.numpy() for k, v in batch["target"].items()}, direct["target"])
        assert equal(batch["source"]["image"].numpy(), direct["source"]["image"])


def test_prefetcher_reports_the_failing_step_and_stops_early_without_hanging():
    def make(step: int):
        if step == 4:
            raise OSError("disk gone")
        return {"x": np.full(2, step)}

    seen = []
    with pytest.raises(RuntimeError, match="step 4 failed: disk gone"), Prefetcher(make, 0, 10, depth=2) as prefetch:
        for step, batch in prefetch:
            seen.append((step, int(batch["x"][0])))
    assert seen == [(0, 0), (1, 1), (2, 2), (3, 3)]

    prefetch = Prefetcher(lambda step: {"x": np.zeros(1)}, 0, 10_000, depth=2)
    for step, _ in prefetch:
        if step == 2:
            break
    producer = prefetch._thread
    prefetch.close()  # the producer, blocked on a full queue, notices and ends
    assert producer is not None and not producer.is_alive()
    assert list(Prefetcher(make, 5, 5, depth=2)) == []  # an empty range starts no thread
