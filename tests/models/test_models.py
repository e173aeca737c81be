"""Network modules: shapes at two sizes, exact equivalences of the fast paths, masks, artifact round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from veorl.config import ModelParams, resolve
from veorl.models.ban import BehaviourAbstraction, Codebook, codebook_stats
from veorl.models.networks import FBC, MLP, BinaryHead, Decoder, DenseHead, Encoder, postprocess, preprocess
from veorl.models.rssm import RSSM, LayerNormGRUCell, RSSMState
from veorl.models.world_models import (VideoWorldModel, build_trunk_world_model, load_world_model, save_world_model)

SIZES = [
    pytest.param(dict(depth=4, deter=16, stoch=6, hidden=12, embed=128), id="tiny"),
    pytest.param(dict(depth=8, deter=24, stoch=10, hidden=20, embed=256), id="small"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("size", SIZES)
def test_encoder_decoder_shapes(size):
    d = size["depth"]
    enc = Encoder(d)
    images = torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8)
    embed = enc(images)
    assert embed.shape == (2, 3, 32 * d) == (2, 3, size["embed"])
    # uint8 and the equivalent preprocessed floats give the same embedding.
    assert torch.allclose(enc(preprocess(images)), embed)
    dec = Decoder(30, d)
    out = dec(torch.randn(2, 3, 30))
    assert out.shape == (2, 3, 64, 64, 3)
    assert dec.log_prob(torch.randn(5, 30), torch.randn(5, 64, 64, 3)).shape == (5,)
    with pytest.raises(ValueError, match="64, 64, 3"):
        enc(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))


def test_paper_size_encoder_is_1024_dimensional():
    assert Encoder(32)(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).shape == (1, 1024)


def test_decoder_first_layer_gemm_equals_transposed_conv():
    dec = Decoder(20, 4).double()
    feature = torch.randn(3, 20, dtype=torch.double)
    x = dec.linear(feature).reshape(-1, 128, 1, 1)
    reference = dec.deconvs(x).permute(0, 2, 3, 1)
    assert torch.allclose(dec(feature), reference, atol=1e-12)


def test_preprocess_roundtrip_and_type_check():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = preprocess(pixels)
    assert torch.allclose(x, torch.tensor([-0.5, 128 / 255 - 0.5, 0.5]))
    assert torch.equal(postprocess(x), pixels)
    with pytest.raises(TypeError):
        preprocess(torch.tensor([1, 2], dtype=torch.int64))


@pytest.mark.parametrize("size", SIZES)
def test_heads_shapes(size):
    feat = size["deter"] + size["stoch"]
    x = torch.randn(4, 5, feat)
    assert MLP(feat, 7, 11, 3)(x).shape == (4, 5, 7)
    head = DenseHead(feat, 1, 13, 2)
    assert head(x).shape == (4, 5)
    target = torch.randn(4, 5)
    expected = -0.5 * (target - head(x)) ** 2 - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(head.log_prob(x, target), expected)
    assert DenseHead(feat, 3, 13, 2).log_prob(x, torch.randn(4, 5, 3)).shape == (4, 5)
    assert BinaryHead(feat, 9, 1).log_prob(x, torch.ones(4, 5)).shape == (4, 5)
    assert FBC(feat, 9, 8)(x).shape == (4, 5, 8)


def test_layer_norm_gru_cell_formula():
    cell = LayerNormGRUCell(5, 4)
    x, h = torch.randn(3, 5), torch.randn(3, 4)
    gates = F.layer_norm(torch.cat([x, h], -1) @ torch.cat([cell.input_proj.weight, cell.state_proj.weight], 1).t(), (12,),
                         cell.norm.weight, cell.norm.bias)
    r, c, u = gates.chunk(3, -1)
    c = torch.tanh(torch.sigmoid(r) * c)
    u = torch.sigmoid(u - 1)
    assert torch.allclose(cell(x, h), u * c + (1 - u) * h, atol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
@pytest.mark.parametrize("size", SIZES)
def test_rssm_shapes(size, kind):
    classes = 5
    rssm = RSSM(action_dim=3, embed_dim=size["embed"], deter=size["deter"], stoch=size["stoch"], hidden=size["hidden"],
                kind=kind, classes=classes)
    stoch_size = size["stoch"] * classes if kind == "categorical" else size["stoch"]
    B, T = 2, 6
    post, prior = rssm.observe(torch.randn(B, T, size["embed"]), torch.randn(B, T, 3))
    for state in (post, prior):
        assert state.deter.shape == (B, T, size["deter"]) and state.stoch.shape == (B, T, stoch_size)
        if kind == "gaussian":
            assert state.mean.shape == state.std.shape == (B, T, size["stoch"])
            assert (state.std > 0.1 - 1e-6).all() and (state.std < 2.1 + 1e-6).all()
        else:
            assert state.logits.shape == (B, T, size["stoch"], classes)
            one_hot = state.stoch.reshape(B, T, size["stoch"], classes)
            assert torch.allclose(one_hot.sum(-1), torch.ones(B, T, size["stoch"]))
    assert rssm.feature(post).shape == (B, T, rssm.feat_dim) == (B, T, stoch_size + size["deter"])
    imagined = rssm.imagine(torch.randn(B, 4, 3), post[:, -1])
    assert imagined.deter.shape == (B, 4, size["deter"])
    one_post, one_prior = rssm.obs_step(rssm.initial(B), torch.randn(B, 3), torch.randn(B, size["embed"]))
    assert one_post.stoch.shape == (B, stoch_size) and rssm.img_step(one_post, torch.randn(B, 3)).deter.shape == (B, size["deter"])
    loss, value = rssm.kl_loss(post, prior)
    assert loss.dim() == 0 and value.dim() == 0 and loss >= 1.0 - 1e-6  # free nats floor
    sample = post.stoch if kind == "gaussian" else post.stoch.reshape(B, T, size["stoch"], classes)
    assert rssm.get_dist(post).log_prob(sample).shape == (B, T)


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_observe_and_imagine_equal_step_by_step(kind):
    """The fused, precomputed loops must equal plain obs_step / img_step calls (states at their modes)."""
    rssm = RSSM(action_dim=3, embed_dim=12, deter=10, stoch=4, hidden=8, kind=kind, classes=3).double()
    embed, action = torch.randn(2, 5, 12, dtype=torch.double), torch.randn(2, 5, 3, dtype=torch.double)
    post, prior = rssm.observe(embed, action, sample=False)
    state = rssm.initial(2)
    for t in range(5):
        state, p = rssm.obs_step(state, action[:, t], embed[:, t], sample=False)
        for name in ("deter", "stoch", "mean", "std", "logits"):
            if getattr(state, name) is not None:
                assert torch.allclose(getattr(state, name), getattr(post, name)[:, t], atol=1e-12), name
                assert torch.allclose(getattr(p, name), getattr(prior, name)[:, t], atol=1e-12), name
    imagined = rssm.imagine(action, post[:, 0], sample=False)
    state = post[:, 0]
    for t in range(5):
        state = rssm.img_step(state, action[:, t], sample=False)
        assert torch.allclose(state.deter, imagined.deter[:, t], atol=1e-12)
        assert torch.allclose(state.stoch, imagined.stoch[:, t], atol=1e-12)


def test_sampled_observe_draws_gaussian_noise():
    rssm = RSSM(action_dim=3, embed_dim=12, deter=10, stoch=4, hidden=8)
    embed, action = torch.randn(64, 3, 12), torch.zeros(64, 3, 3)
    post, _ = rssm.observe(embed, action)
    z = ((post.stoch - post.mean) / post.std).detach()
    assert abs(float(z.mean())) < 0.2 and abs(float(z.std()) - 1.0) < 0.2


def test_gaussian_kl_matches_torch_distributions():
    rssm = RSSM(action_dim=2, embed_dim=8, deter=6, stoch=5, hidden=4)
    post, prior = rssm.observe(torch.randn(3, 4, 8), torch.randn(3, 4, 2))
    expected = torch.distributions.kl_divergence(rssm.get_dist(post), rssm.get_dist(prior))
    assert torch.allclose(rssm.kl_divergence(post, prior), expected, atol=1e-5)


def test_categorical_kl_matches_torch_distributions():
    rssm = RSSM(action_dim=2, embed_dim=8, deter=6, stoch=3, hidden=4, kind="categorical", classes=4)
    post, prior = rssm.observe(torch.randn(3, 4, 8), torch.randn(3, 4, 2))
    p = torch.distributions.Independent(torch.distributions.Categorical(logits=post.logits), 1)
    q = torch.distributions.Independent(torch.distributions.Categorical(logits=prior.logits), 1)
    assert torch.allclose(rssm.kl_divergence(post, prior), torch.distributions.kl_divergence(p, q), atol=1e-5)


def test_kl_loss_balance_free_nats_and_mask():
    rssm = RSSM(action_dim=2, embed_dim=8, deter=6, stoch=5, hidden=4)
    post, prior = rssm.observe(torch.randn(3, 4, 8) * 5, torch.randn(3, 4, 2))
    kl = rssm.kl_divergence(post, prior)
    loss, value = rssm.kl_loss(post, prior, balance=0.8, free=0.0)
    assert torch.allclose(loss, kl.mean()) and torch.allclose(value, kl.mean())
    loss_free, _ = rssm.kl_loss(post, prior, free=1e6)
    assert torch.allclose(loss_free, torch.tensor(1e6))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    masked, masked_value = rssm.kl_loss(post, prior, free=0.0, mask=mask)
    assert torch.allclose(masked_value, kl[mask].mean())
    # Padded steps' statistics do not matter.
    noisy_post = post.map(lambda t: t.clone())
    noisy_post.mean[~mask] += 100.0
    noisy_loss, _ = rssm.kl_loss(noisy_post, prior, free=0.0, mask=mask)
    assert torch.equal(noisy_loss, masked)


def test_kl_balance_routes_gradients():
    rssm = RSSM(action_dim=2, embed_dim=8, deter=6, stoch=5, hidden=4)
    # One step from the initial state: the prior cannot depend on the posterior network there.
    post, prior = rssm.observe(torch.randn(2, 1, 8) * 3, torch.randn(2, 1, 2))
    only_prior, _ = rssm.kl_loss(post, prior, balance=1.0, free=0.0)
    grads = torch.autograd.grad(only_prior, [rssm.obs_stats.weight, rssm.img_stats.weight], allow_unused=True,
                                retain_graph=True)
    assert grads[0] is None or grads[0].abs().sum() == 0  # posterior side is detached under balance=1
    assert grads[1].abs().sum() > 0
    only_post, _ = rssm.kl_loss(post, prior, balance=0.0, free=0.0)
    grads = torch.autograd.grad(only_post, [rssm.obs_stats.weight, rssm.img_stats.weight], allow_unused=True)
    assert grads[0].abs().sum() > 0
    assert grads[1] is None or grads[1].abs().sum() == 0


@pytest.mark.parametrize("embed_dim,latent", [(16, 3), (64, 8)])
def test_ban_formula_and_codebook(embed_dim, latent):
    ban = BehaviourAbstraction(embed_dim, 10, latent)
    embed = torch.randn(2, 5, embed_dim)
    z = ban(embed)
    assert z.shape == (2, 4, latent)
    manual = ban.out(F.relu(ban.next_proj(embed[:, 1:]) + ban.this_proj(embed[:, :-1])))
    assert torch.allclose(z, manual)
    assert torch.allclose(ban.pair(embed[:, 0], embed[:, 1]), z[:, 0])

    book = Codebook(K=7, dim=latent)
    z = z.detach().requires_grad_()
    z_q, idx, vq = book.quantise(z, beta=1.0)
    brute = ((z[..., None, :] - book.vectors) ** 2).sum(-1).argmin(-1)
    assert torch.equal(idx, brute) and idx.shape == (2, 4)
    assert torch.allclose(z_q, book.vectors[idx])
    # beta = 1: codebook term + commitment term = twice the mean squared distance to the chosen codes.
    # ||sg(z)-c||^2 + beta ||z-sg(c)||^2 with beta = 1: twice the squared distance, summed over the latent dims
    assert torch.allclose(vq, 2 * (z.detach() - book.vectors[idx].detach()).square().sum(-1).mean(), atol=1e-6)
    (z_q.sum() + vq).backward()
    assert z.grad is not None and book.vectors.grad is not None and book.vectors.grad.abs().sum() > 0
    snapped, nearest_idx = book.nearest(z)
    assert torch.equal(nearest_idx, idx) and not snapped.requires_grad


def test_vq_loss_terms_and_mask():
    book = Codebook(K=3, dim=2)
    with torch.no_grad():
        book.vectors.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    z = torch.tensor([[0.1, 0.0], [0.9, 1.2], [100.0, 100.0]])
    _, idx, vq = book.quantise(z, beta=0.5, mask=torch.tensor([True, True, False]))
    assert idx.tolist() == [0, 1, 2]
    per = torch.tensor([0.01, 0.01 + 0.04])  # squared L2 distances to the chosen codes
    assert torch.allclose(vq, (per * 1.5).mean())


def test_codebook_usage_stats():
    book = Codebook(K=4, dim=2)
    stats = book.usage(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert stats.used == 4 and abs(stats.perplexity - 4.0) < 1e-6
    collapsed = codebook_stats(torch.tensor([10.0, 0, 0, 0], dtype=torch.float64))
    assert collapsed.used == 1 and abs(collapsed.perplexity - 1.0) < 1e-9


def test_rssm_state_helpers():
    state = RSSMState(torch.randn(2, 3, 4), torch.randn(2, 3, 5), mean=torch.randn(2, 3, 5), std=torch.rand(2, 3, 5))
    flat = state.reshape_batch(-1)
    assert flat.deter.shape == (6, 4) and flat.std.shape == (6, 5)
    assert RSSMState.stack([state[:, 0], state[:, 1]], 1).deter.shape == (2, 2, 4)
    assert RSSMState.cat([flat, flat]).stoch.shape == (12, 5)
    assert state.detach().logits is None


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_video_world_model_and_trunk_factory(preset):
    params = resolve({}, preset=preset).model
    model = VideoWorldModel(params)
    assert model.embed_dim == 32 * params.cnn_depth
    assert model.feat_dim == params.deter + params.stoch
    images = torch.randint(0, 256, (2, 5, 64, 64, 3), dtype=torch.uint8)
    latent, codes = model.infer_latent_actions(images)
    assert latent.shape == (2, 4, params.latent_action_dim) and codes.shape == (2, 4)
    state = model.plan_net.initial(2)
    assert model.plan_step(state, latent[:, 0]).deter.shape == (2, params.deter)
    action, code = model.next_latent_action(model.plan_net.feature(state))
    assert torch.allclose(action, model.codebook.vectors[code])
    trunk = build_trunk_world_model(params, action_dim=4, video_world_model=model, discount_head=True, init_decoder=True)
    assert all(torch.equal(a, b) for a, b in zip(trunk.encoder.parameters(), model.encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(trunk.decoder.parameters(), model.decoder.parameters()))
    assert trunk.trunk_net.action_dim == 4 and trunk.reward_head(torch.randn(3, trunk.feat_dim)).shape == (3,)


def test_freeze_behaviours_copies_and_freezes():
    model = VideoWorldModel(resolve({}, preset="smoke").model)
    with torch.no_grad():
        model.encoder.convs[0].weight.add_(1.0)
        model.decoder.linear.weight.add_(1.0)
    model.freeze_behaviours()
    assert torch.equal(model.behaviour_encoder.convs[0].weight, model.encoder.convs[0].weight)
    assert torch.equal(model.keyframe_decoder.linear.weight, model.decoder.linear.weight)
    assert not any(p.requires_grad for m in model.frozen_modules() for p in m.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    with torch.no_grad():
        model.encoder.convs[0].weight.add_(1.0)
    model.freeze_behaviours()  # idempotent: the phase-1 copy is not overwritten
    assert not torch.equal(model.behaviour_encoder.convs[0].weight, model.encoder.convs[0].weight)


def test_save_and_load_world_model(tmp_path):
    params = ModelParams(cnn_depth=4, deter=12, stoch=5, hidden=8, ban_hidden=8, codebook_size=6, fbc_hidden=7)
    model = VideoWorldModel(params)
    model.freeze_behaviours()
    save_world_model(tmp_path / "wm", model, {"model": params.model_dump()}, {"upstream": {"video_clips": "abc"}})
    loaded, meta = load_world_model(tmp_path / "wm", "cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert bool(loaded.behaviour_frozen) and not any(p.requires_grad for p in loaded.ban.parameters())
    assert meta["model_config"]["deter"] == 12 and meta["provenance"]["upstream"]["video_clips"] == "abc"
    assert not list((tmp_path / "wm").glob(".*"))  # no temporary files left behind
    with pytest.raises(FileNotFoundError, match="world_model.pt"):
        load_world_model(tmp_path / "missing")
