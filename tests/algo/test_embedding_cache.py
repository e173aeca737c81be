"""Phase 3's table of the frozen encoder's embeddings: the same embeddings as encoding each batch, read by window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.algo.test_finetune import build_veorl
from tests.builders import smoke_params, write_episodes
from veorl.acceleration import autocast
from veorl.algo.baselines import switches
from veorl.algo.embedding_cache import GIB, INDEX_KEYS, EmbeddingCache, fits, for_store, frame_keys, table_bytes
from veorl.algo.finetune import FinetuneError, PolicyPhase
from veorl.data.episodes import EpisodeStore, pad_absorbing
from veorl.data.samplers import EpisodeWindowSampler, _to_tensors
from veorl.models.networks import Encoder

SEQ_LEN = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three episodes, one shorter than the window (sampled padded with absorbing steps)."""
    root = write_episodes(tmp_path_factory.mktemp("cache_episodes"), episodes=3, length=[9, 4, 12])
    return EpisodeStore(root, absorbing=True)


def encoder(depth: int = 4, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(depth).requires_grad_(False)


def test_sampled_indices_locate_the_sampled_windows(store):
    plain = store.sample(32, SEQ_LEN, np.random.default_rng(3))
    indexed = store.sample(32, SEQ_LEN, np.random.default_rng(3), index=True)
    assert set(indexed) == set(plain) | set(INDEX_KEYS)
    for key in plain:  # the same draws
        assert np.array_equal(indexed[key], plain[key]), key
    for row, (i, start) in enumerate(zip(indexed["episode"], indexed["start"])):
        episode = pad_absorbing(store.episode(int(i)), SEQ_LEN)
        assert np.array_equal(indexed["image"][row], episode["image"][start : start + SEQ_LEN])
    assert 1 in indexed["episode"]  # the short episode was drawn, so its padding is covered below


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_windows_read_what_encoding_the_batch_gives(store, precision):
    """Each window's embeddings equal the encoder's output on its images, padding included. fp32 to 1e-5 (the
    convolutions run on other batch sizes, so their sums may be ordered differently); bf16 to bf16's rounding of the
    embeddings (a relative 2^-8, on values of order 1)."""
    net = encoder()
    cache = EmbeddingCache(store, net, precision, chunk=5)  # chunks that split episodes
    batch = store.sample(32, SEQ_LEN, np.random.default_rng(3), index=True)
    read = cache.windows(torch.from_numpy(batch["episode"]), torch.from_numpy(batch["start"]), SEQ_LEN)
    with torch.no_grad(), autocast(precision):
        expected = net(torch.from_numpy(batch["image"]))
    assert read.dtype == torch.float32 and read.shape == expected.shape
    tolerance = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    torch.testing.assert_close(read, expected, rtol=tolerance, atol=tolerance)
    assert cache.table.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert cache.table.shape == (store.total_steps, net.output_dim)


def test_the_table_is_built_once_and_again_after_invalidate(store):
    net = encoder()
    cache = EmbeddingCache(store, net, "fp32")
    episode, start = torch.tensor([0, 2]), torch.tensor([1, 3])
    first = cache.windows(episode, start, SEQ_LEN)
    table = cache.table
    net.load_state_dict(encoder(seed=1).state_dict())
    assert cache.windows(episode, start, SEQ_LEN).equal(first) and cache.table is table  # not rebuilt by a read
    cache.invalidate()
    again = cache.windows(episode, start, SEQ_LEN)
    assert not again.allclose(first)
    images = torch.stack([torch.from_numpy(store.episode(i)["image"][s : s + SEQ_LEN]) for i, s in ((0, 1), (2, 3))])
    with torch.no_grad():
        torch.testing.assert_close(again, net(images), rtol=1e-5, atol=1e-5)


def test_the_budget_decides(store):
    dim = encoder().output_dim
    assert table_bytes(store, dim, "fp32") == store.total_steps * dim * 4 == 2 * table_bytes(store, dim, "bf16")
    assert fits(store, dim, "bf16", 1.0)
    assert not fits(store, dim, "bf16", 0.0)  # 0: off
    just = table_bytes(store, dim, "bf16") / GIB
    assert fits(store, dim, "bf16", just) and not fits(store, dim, "bf16", just * 0.99)
    with pytest.raises(ValueError, match="resolved precision"):
        EmbeddingCache(store, encoder(), "auto")
    # What fine-tuning sets phase 3 up with: a cache and window indices, or images to encode.
    cache = for_store(store, encoder(), "bf16", just)
    assert isinstance(cache, EmbeddingCache) and cache.table is None  # nothing encoded before the first read
    assert frame_keys(cache) == INDEX_KEYS
    assert for_store(store, encoder(), "bf16", just * 0.99) is None and for_store(store, encoder(), "bf16", 0) is None
    assert frame_keys(None) == ("image",)


def test_policy_phase_start_states_from_the_cache_match_encoded_batches(tmp_path):
    """The phase reads start batches of window indices from its cache: the same posteriors and losses as the same
    windows given as images (fp32 to 1e-4); loading weights invalidates the table; without a cache, indices alone
    are refused."""
    params = smoke_params()
    root = write_episodes(tmp_path / "episodes", episodes=2, length=10)
    store = EpisodeStore(root)
    video_wm, trunk, guidance, actor, critic = build_veorl(params)
    cache = EmbeddingCache(store, trunk.encoder, "fp32")
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance, embeddings=cache)
    phase.freeze_world_model()
    keys = ("image", "action", *INDEX_KEYS)
    batch = _to_tensors(EpisodeWindowSampler(store, 3, SEQ_LEN, 0, keys=keys)(0), False)
    images = {k: batch[k] for k in ("image", "action")}
    indices = {k: batch[k] for k in ("action", *INDEX_KEYS)}
    torch.manual_seed(5)
    from_images = phase.start_states(images).states
    torch.manual_seed(5)
    from_cache = phase.start_states(indices).states
    torch.testing.assert_close(from_cache.deter, from_images.deter, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_cache.stoch, from_images.stoch, rtol=1e-4, atol=1e-4)
    torch.manual_seed(6)
    loss_images = phase.losses(images)
    torch.manual_seed(6)
    loss_cache = phase.losses(indices)
    torch.testing.assert_close(loss_cache.actor_loss, loss_images.actor_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_cache.critic_loss, loss_images.critic_loss, rtol=1e-4, atol=1e-4)
    assert cache.table is not None
    phase.load_state_dict(phase.state_dict())
    assert cache.table is None  # rebuilt from the loaded weights on the next read
    phase.embeddings = None
    with pytest.raises(FinetuneError, match="window indices"):
        phase.start_states(indices)
