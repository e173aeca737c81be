"""Phase-3 imagination: shapes, gradient routing, the intrinsic reward and the two guidance paths (smoke sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veorl.algo.finetune import build_guidance
from veorl.algo.imagination import imagine, intrinsic_reward
from veorl.config import resolve
from veorl.models.actor_critic import Actor
from veorl.models.world_models import VideoWorldModel, build_trunk_world_model

ACTION_DIM = 4
HORIZON = 5


def build(guidance_mode: str = "aligned", kind: str = "continuous", action_dim: int = ACTION_DIM):
    """A frozen video world model, a Trunk Net world model with its guidance, and an actor on [f, abar]."""
    params = resolve({}, preset="smoke")
    torch.manual_seed(0)
    video_wm = VideoWorldModel(params.model)
    video_wm.freeze_behaviours()
    trunk = build_trunk_world_model(params.model, action_dim, video_wm, ensemble_size=params.finetune.ensemble_size)
    guidance = build_guidance(video_wm, trunk, guidance_mode, params.model)
    actor = Actor(
        trunk.feat_dim + params.model.latent_action_dim,
        action_dim,
        params.model.actor_units,
        params.model.actor_layers,
        kind=kind,
    )
    trunk.requires_grad_(False)
    guidance.requires_grad_(False)
    return params, video_wm, trunk, guidance, actor


def start_states(trunk, action_dim: int = ACTION_DIM, batch: int = 2, length: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.integers(0, 256, (batch, length, 64, 64, 3), dtype=np.uint8))
    action = torch.from_numpy(rng.uniform(-1, 1, (batch, length, action_dim)).astype(np.float32))
    with torch.no_grad():
        posterior, _ = trunk.trunk_net.observe(trunk.encoder(image), action)
    return posterior.reshape_batch(-1)


def test_imagination_shapes_and_latent_actions_are_codes():
    params, _, trunk, guidance, actor = build()
    start = start_states(trunk)
    n = start.deter.shape[0]
    traj = imagine(trunk.trunk_net, start, actor, HORIZON, guidance)
    feat, z = trunk.feat_dim, params.model.latent_action_dim
    assert traj.features.shape == (HORIZON + 1, n, feat)
    assert traj.latent_actions.shape == (HORIZON + 1, n, z)
    assert traj.actions.shape == (HORIZON, n, ACTION_DIM)
    assert traj.log_probs.shape == traj.entropies.shape == (HORIZON, n)
    assert traj.intrinsic.shape == (HORIZON + 1, n)
    assert traj.states.deter.shape == (HORIZON + 1, n, params.model.deter)
    assert traj.actions.abs().max() <= 1.0
    codes = guidance.codebook.vectors.detach()
    is_code = (traj.latent_actions.reshape(-1, 1, z) == codes[None]).all(-1).any(-1)
    assert bool(is_code.all())
    assert traj.policy_inputs(True).shape == (HORIZON + 1, n, feat + z)
    assert traj.policy_inputs(False).shape == (HORIZON + 1, n, feat)
    assert not traj.policy_inputs(True).requires_grad


@pytest.mark.parametrize("mode", ["aligned", "release"])
def test_intrinsic_reward_is_zero_at_the_start_and_minus_the_distance_to_the_plan_prediction(mode):
    _, _, trunk, guidance, actor = build(mode)
    traj = imagine(trunk.trunk_net, start_states(trunk), actor, HORIZON, guidance)
    assert torch.all(traj.intrinsic[0] == 0)
    for t in range(1, HORIZON + 1):
        # fbar_t: the Plan Net stepped with abar_{t-1} from (the image of) s_{t-1}; compared with (the image of) s_t.
        previous = traj.states[t - 1]
        predicted = guidance.predict_next(previous, traj.features[t - 1], traj.latent_actions[t - 1])
        current = guidance.comparable(traj.states[t], traj.features[t])
        expected = -torch.linalg.vector_norm(current - predicted, dim=-1)
        assert torch.allclose(traj.intrinsic[t], expected, atol=1e-5), t
    assert torch.all(traj.intrinsic[1:] < 0)  # random nets never land exactly where the Plan Net predicts
    off = imagine(trunk.trunk_net, start_states(trunk), actor, HORIZON, guidance, use_intrinsic=False)
    assert torch.all(off.intrinsic == 0)


def test_intrinsic_reward_formula():
    feature = torch.randn(7, 5, 32)
    assert torch.equal(intrinsic_reward(feature, feature.clone()), torch.zeros(7, 5))
    shifted = feature.clone()
    shifted[..., 0] += 3.0
    assert torch.allclose(intrinsic_reward(feature, shifted), torch.full((7, 5), -3.0))
    with pytest.raises(ValueError, match="one shape"):
        intrinsic_reward(feature, feature[..., :8])


def test_release_guidance_steps_the_plan_net_from_the_trunk_state():
    _, video_wm, trunk, guidance, _ = build("release")
    state = trunk.trunk_net.initial(3)
    feature = trunk.trunk_net.feature(state)
    assert torch.equal(guidance.comparable(state, feature), feature)
    latent = guidance.latent_action(feature)
    expected = video_wm.plan_net.feature(video_wm.plan_net.img_step(state, latent, sample=False))
    assert torch.allclose(guidance.predict_next(state, feature, latent), expected)


def test_aligned_guidance_steps_the_plan_net_from_the_mapped_state():
    _, video_wm, trunk, guidance, _ = build("aligned")
    state = start_states(trunk)[:3]
    feature = trunk.trunk_net.feature(state)
    mapped = guidance.state_map(feature)
    assert torch.allclose(guidance.comparable(state, feature), video_wm.plan_net.feature(mapped))
    assert not torch.allclose(guidance.comparable(state, feature)[..., : feature.shape[-1]], feature)
    latent = guidance.latent_action(feature)
    expected = video_wm.plan_net.feature(video_wm.plan_net.img_step(mapped, latent, sample=False))
    assert torch.allclose(guidance.predict_next(state, feature, latent), expected)


def test_imagination_maps_each_state_once_for_both_the_reward_and_the_prediction():
    _, _, trunk, guidance, actor = build("aligned")
    start = start_states(trunk)
    state, feature = start[:3], trunk.trunk_net.feature(start[:3])
    mapped = guidance.plan_state(state, feature)
    latent = guidance.latent_action(feature)
    # Handing over the mapped state is the same computation as mapping inside.
    assert torch.equal(guidance.comparable(state, feature, mapped), guidance.comparable(state, feature))
    handed = guidance.predict_next(state, feature, latent, mapped)
    assert torch.equal(handed, guidance.predict_next(state, feature, latent))
    calls = []
    handle = guidance.state_map.register_forward_hook(lambda *_: calls.append(1))
    try:
        imagine(trunk.trunk_net, start, actor, HORIZON, guidance)
    finally:
        handle.remove()
    assert len(calls) == HORIZON + 1  # one M(f_t) per imagined state, not one per use


def test_continuous_actor_gradient_flows_through_the_trunk_net_dynamics():
    _, _, trunk, guidance, actor = build()
    traj = imagine(
        trunk.trunk_net, start_states(trunk), actor, HORIZON, guidance, use_intrinsic=False, dynamics_gradient=True
    )
    assert traj.features.requires_grad
    # The last state depends on the actor only through the imagined dynamics (actor inputs are detached).
    traj.features[-1].sum().backward()
    grads = [p.grad for p in actor.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in trunk.parameters())  # frozen: gradients pass through, nothing accumulates


def test_discrete_actions_take_no_gradient_through_the_dynamics():
    _, _, trunk, guidance, actor = build(kind="discrete", action_dim=3)
    traj = imagine(
        trunk.trunk_net, start_states(trunk, action_dim=3), actor, HORIZON, guidance, dynamics_gradient=False
    )
    assert set(traj.actions.sum(-1).unique().tolist()) == {1.0}  # one-hot actions
    assert not traj.features.requires_grad and not traj.states.deter.requires_grad
    # REINFORCE: the actor learns through the log-probabilities of its sampled actions only.
    traj.log_probs.sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in actor.parameters()) > 0


def test_plan_posterior_gives_latent_actions_of_transitions_and_the_filtered_posterior():
    _, video_wm, _, _, _ = build()
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (2, 6, 64, 64, 3), dtype=np.uint8))
    latent, posterior = video_wm.plan_posterior(image)
    assert latent.shape == (2, 5, video_wm.latent_action_dim)
    assert posterior.deter.shape == (2, 6, video_wm.plan_net.deter_size)
    codes, _ = video_wm.infer_latent_actions(image)
    assert torch.equal(latent, codes)
    # Frame t's posterior is filtered with the latent action entering it (none at frame 0).
    entering = torch.cat([torch.zeros_like(latent[:, :1]), latent], 1)
    expected, _ = video_wm.plan_net.observe(video_wm.encoder(image), entering, sample=False)
    assert torch.allclose(posterior.deter, expected.deter) and not posterior.deter.requires_grad
    with pytest.raises(ValueError, match="one per transition"):
        video_wm.filter_plan(video_wm.encoder(image), latent[:, :3])
