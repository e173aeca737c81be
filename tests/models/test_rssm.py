"""The RSSM (Plan Net and Trunk Net): shapes, the fused loops against single steps, observe against imagine,
the categorical state's straight-through sample, and the balanced KL with free nats (docs/method.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from veorl.models.rssm import RSSM, LayerNormGRUCell, RSSMState

SIZES = [
    pytest.param(dict(deter=16, stoch=6, hidden=12, embed=128), id="tiny"),
    pytest.param(dict(deter=24, stoch=10, hidden=20, embed=256), id="small"),
]
KINDS = ["gaussian", "categorical"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_rssm(kind: str = "gaussian", **sizes) -> RSSM:
    """float64, so that comparisons of two computation orders are exact up to ~1e-15 on any CPU."""
    args = dict(action_dim=3, embed_dim=12, deter=10, stoch=4, hidden=8, kind=kind, classes=3) | sizes
    return RSSM(**args).double()


def test_layer_norm_gru_cell_formula():
    # float64: the cell adds two projections where the reference does one product over [x, h], so the float32
    # results would differ by summation order (CPU-dependent); in float64 that is ~1e-16 and the check is exact.
    cell = LayerNormGRUCell(5, 4).double()
    x, h = torch.randn(3, 5, dtype=torch.double), torch.randn(3, 4, dtype=torch.double)
    fused = torch.cat([cell.input_proj.weight, cell.state_proj.weight], 1).t()
    gates = F.layer_norm(torch.cat([x, h], -1) @ fused, (12,), cell.norm.weight, cell.norm.bias)
    r, c, u = gates.chunk(3, -1)
    c = torch.tanh(torch.sigmoid(r) * c)
    u = torch.sigmoid(u - 1)
    assert torch.allclose(cell(x, h), u * c + (1 - u) * h, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
@pytest.mark.parametrize("size", SIZES)
def test_rssm_shapes(size, kind):
    classes = 5
    rssm = RSSM(
        action_dim=3,
        embed_dim=size["embed"],
        deter=size["deter"],
        stoch=size["stoch"],
        hidden=size["hidden"],
        kind=kind,
        classes=classes,
    )
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
    assert one_post.stoch.shape == (B, stoch_size)
    assert rssm.img_step(one_post, torch.randn(B, 3)).deter.shape == (B, size["deter"])
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
    grads = torch.autograd.grad(
        only_prior, [rssm.obs_stats.weight, rssm.img_stats.weight], allow_unused=True, retain_graph=True
    )
    assert grads[0] is None or grads[0].abs().sum() == 0  # posterior side is detached under balance=1
    assert grads[1].abs().sum() > 0
    only_post, _ = rssm.kl_loss(post, prior, balance=0.0, free=0.0)
    grads = torch.autograd.grad(only_post, [rssm.obs_stats.weight, rssm.img_stats.weight], allow_unused=True)
    assert grads[0].abs().sum() > 0
    assert grads[1] is None or grads[1].abs().sum() == 0


def test_rssm_state_helpers():
    state = RSSMState(torch.randn(2, 3, 4), torch.randn(2, 3, 5), mean=torch.randn(2, 3, 5), std=torch.rand(2, 3, 5))
    flat = state.reshape_batch(-1)
    assert flat.deter.shape == (6, 4) and flat.std.shape == (6, 5)
    assert RSSMState.stack([state[:, 0], state[:, 1]], 1).deter.shape == (2, 2, 4)
    assert RSSMState.cat([flat, flat]).stoch.shape == (12, 5)
    assert state.detach().logits is None


# ----------------------------------------------------------------------------------------------
# observe against imagine
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_imagining_one_step_from_a_posterior_gives_observes_prior(kind):
    """The prior observe returns for step t is the one-step imagination from the posterior of step t-1 under the
    same action: both run the same transition, observe only adds the embedding afterwards."""
    rssm = small_rssm(kind)
    embed, action = torch.randn(2, 6, 12, dtype=torch.double), torch.randn(2, 6, 3, dtype=torch.double)
    post, prior = rssm.observe(embed, action, sample=True)  # sampled posteriors: the states imagine starts from
    stats = ("mean", "std") if kind == "gaussian" else ("logits",)
    starts = [rssm.initial(2)] + [post[:, t - 1] for t in range(1, 6)]
    for t, start in enumerate(starts):
        imagined = rssm.imagine(action[:, t : t + 1], start, sample=False)[:, 0]
        assert torch.allclose(imagined.deter, prior.deter[:, t], rtol=0, atol=1e-12)
        assert torch.allclose(imagined.deter, post.deter[:, t], rtol=0, atol=1e-12)  # the posterior shares h_t
        for name in stats:
            assert torch.allclose(getattr(imagined, name), getattr(prior, name)[:, t], rtol=0, atol=1e-12), (t, name)


@pytest.mark.parametrize("kind", KINDS)
def test_imagine_over_several_steps_equals_chained_one_step_imagination(kind):
    rssm = small_rssm(kind)
    post, _ = rssm.observe(torch.randn(2, 3, 12, dtype=torch.double), torch.randn(2, 3, 3, dtype=torch.double))
    actions = torch.randn(2, 4, 3, dtype=torch.double)
    whole = rssm.imagine(actions, post[:, -1], sample=False)
    state = post[:, -1]
    for t in range(4):
        state = rssm.imagine(actions[:, t : t + 1], state, sample=False)[:, 0]
        assert torch.allclose(rssm.feature(state), rssm.feature(whole[:, t]), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# The categorical state
# ----------------------------------------------------------------------------------------------


def test_categorical_state_is_exactly_one_hot_and_the_mode_is_the_argmax():
    rssm = small_rssm("categorical", stoch=5, classes=4)
    embed, action = torch.randn(3, 4, 12, dtype=torch.double), torch.randn(3, 4, 3, dtype=torch.double)
    for sample in (True, False):
        post, prior = rssm.observe(embed, action, sample=sample)
        for state in (post, prior):
            one_hot = state.stoch.reshape(3, 4, 5, 4)
            assert set(one_hot.unique().tolist()) <= {0.0, 1.0}  # values, not just close: the ST term adds exactly 0
            assert torch.equal(one_hot.sum(-1), torch.ones(3, 4, 5, dtype=torch.double))
    post, _ = rssm.observe(embed, action, sample=False)
    assert torch.equal(post.stoch.reshape(3, 4, 5, 4).argmax(-1), post.logits.argmax(-1))


def test_categorical_samples_follow_the_softmax_of_the_logits():
    rssm = small_rssm("categorical", stoch=1, classes=3)
    probs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.double)
    with torch.no_grad():  # the posterior's logits are then the bias alone, whatever the inputs
        rssm.obs_stats.weight.zero_()
        rssm.obs_stats.bias.copy_(probs.log())
    post, _ = rssm.obs_step(
        rssm.initial(6000), torch.zeros(6000, 3, dtype=torch.double), torch.randn(6000, 12, dtype=torch.double)
    )
    frequencies = post.stoch.mean(0)
    assert torch.allclose(frequencies, probs, atol=0.03), frequencies  # binomial std <= 0.0065


def test_categorical_sample_passes_gradients_straight_through_the_softmax():
    rssm = small_rssm("categorical", stoch=5, classes=4)
    action, embed = torch.randn(3, 3, dtype=torch.double), torch.randn(3, 12, dtype=torch.double)
    post, _ = rssm.obs_step(rssm.initial(3), action, embed)
    weights = torch.randn_like(post.stoch)
    through_sample = torch.autograd.grad((post.stoch * weights).sum(), rssm.obs_stats.weight, retain_graph=True)[0]
    through_probs = torch.autograd.grad(
        (F.softmax(post.logits, -1).flatten(-2) * weights).sum(), rssm.obs_stats.weight
    )[0]
    assert through_sample.abs().sum() > 0
    assert torch.allclose(through_sample, through_probs, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Balanced KL and free nats
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_kl_balance_scales_the_prior_and_posterior_gradients(kind):
    """balance * grad of KL reaches the prior's parameters, (1 - balance) * grad the posterior's (free = 0)."""
    rssm = small_rssm(kind)
    # One step: the prior (img_stats) cannot depend on the posterior network (obs_stats) there.
    post, prior = rssm.observe(torch.randn(4, 1, 12, dtype=torch.double) * 3, torch.randn(4, 1, 3, dtype=torch.double))
    sides = [rssm.obs_stats.weight, rssm.img_stats.weight]
    plain = torch.autograd.grad(rssm.kl_divergence(post, prior).mean(), sides, retain_graph=True)
    loss, value = rssm.kl_loss(post, prior, balance=0.8, free=0.0)
    balanced = torch.autograd.grad(loss, sides)
    assert plain[0].abs().sum() > 0 and plain[1].abs().sum() > 0
    assert torch.allclose(balanced[0], 0.2 * plain[0], rtol=1e-9, atol=1e-12)
    assert torch.allclose(balanced[1], 0.8 * plain[1], rtol=1e-9, atol=1e-12)
    # With free = 0 the loss value is the mean KL whatever the balance; the reported value is detached.
    assert torch.allclose(loss, rssm.kl_divergence(post, prior).mean()) and not value.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_free_nats_clip_the_average_kl_not_each_step(kind):
    rssm = small_rssm(kind)
    post, prior = rssm.observe(torch.randn(3, 5, 12, dtype=torch.double) * 3, torch.randn(3, 5, 3, dtype=torch.double))
    kl = rssm.kl_divergence(post, prior).detach()
    mean = float(kl.mean())
    assert float(kl.min()) < mean  # some steps lie below the average

    # Free nats between the smallest step KL and the mean: a per-step clip would raise the loss, ours does not.
    free = (float(kl.min()) + mean) / 2
    loss, value = rssm.kl_loss(post, prior, free=free)
    assert torch.allclose(loss, kl.mean()) and torch.allclose(value, kl.mean())
    assert float(kl.clamp_min(free).mean()) > loss.item()

    # Free nats above the mean: the loss is the constant `free`, no gradient at all, and the value is still the KL.
    loss, value = rssm.kl_loss(post, prior, free=mean + 1.0)
    assert loss.item() == pytest.approx(mean + 1.0) and torch.allclose(value, kl.mean())
    grads = torch.autograd.grad(loss, list(rssm.parameters()), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
