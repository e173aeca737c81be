"""Fine-tuning: imagination, gradient routing, the world-model phase, resume, and the CLI for every algorithm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from veorl.agent import Agent
from veorl.algo.baselines import switches
from veorl.algo.finetune import PolicyPhase, WorldModelPhase, build_guidance, plan_posterior_targets
from veorl.algo.imagination import imagine, intrinsic_reward
from veorl.config import resolve
from veorl.data.episodes import save_episode
from veorl.models.actor_critic import Actor, Critic
from veorl.models.world_models import VideoWorldModel, build_trunk_world_model, save_world_model

REPO = Path(__file__).resolve().parents[2]
ACTION_DIM = 4


# ------------------------------------------------------------------------------------------------
# Tiny inputs: target episodes, ingested clips, a video world model artifact (smoke sizes)
# ------------------------------------------------------------------------------------------------


def smoke_params(*overrides: str):
    return resolve({}, preset="smoke", overrides=list(overrides))


def make_episodes(root: Path, episodes: int = 2, length: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(episodes):
        action = rng.uniform(-1, 1, (length, ACTION_DIM)).astype(np.float32)
        action[0] = 0.0
        save_episode(root / "episodes", i, {
            "image": rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8), "action": action,
            "reward": rng.uniform(0, 1, length).astype(np.float32), "discount": np.ones(length, np.float32)})
    (root / "card.json").write_text(json.dumps({"env": "metaworld", "task": "drawer-open", "camera": "corner",
                                                "size": 64, "episode_length": 12}))
    return root


def make_clips(root: Path, clips: int = 3, window: int = 12, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    (root / "clips").mkdir(parents=True)
    np.save(root / "clips" / "src-0.npy", rng.integers(0, 256, (clips, window, 64, 64, 3), dtype=np.uint8))
    (root / "manifest.json").write_text(json.dumps({"version": 1, "size": 64, "window": window,
                                                    "sources": [{"status": "ok", "shards": [{"file": "clips/src-0.npy", "clips": clips}]}]}))
    return root


def make_world_model(root: Path, params) -> tuple[Path, VideoWorldModel]:
    torch.manual_seed(0)
    model = VideoWorldModel(params.model)
    model.freeze_behaviours()
    save_world_model(root, model, {}, {})
    return root, model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_inputs")
    params = smoke_params()
    world_model, _ = make_world_model(root / "world_model", params)
    return {"episodes": make_episodes(root / "episodes"), "clips": make_clips(root / "clips"), "world_model": world_model,
            "mlflow": f"sqlite:///{root / 'mlruns.db'}"}


@pytest.fixture(autouse=True)
def _tracking(inputs, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", inputs["mlflow"])


def target_batch(batch: int = 2, length: int = 6, action_dim: int = ACTION_DIM, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {"image": torch.from_numpy(rng.integers(0, 256, (batch, length, 64, 64, 3), dtype=np.uint8)),
            "action": torch.from_numpy(rng.uniform(-1, 1, (batch, length, action_dim)).astype(np.float32)),
            "reward": torch.from_numpy(rng.uniform(0, 1, (batch, length)).astype(np.float32))}


def build_veorl(params, guidance_mode: str = "aligned", action_dim: int = ACTION_DIM, kind: str = "continuous"):
    torch.manual_seed(0)
    video_wm = VideoWorldModel(params.model)
    video_wm.freeze_behaviours()
    trunk = build_trunk_world_model(params.model, action_dim, video_wm)
    guidance = build_guidance(video_wm, trunk, guidance_mode, params.model)
    in_dim = trunk.feat_dim + params.model.latent_action_dim
    actor = Actor(in_dim, action_dim, params.model.actor_units, params.model.actor_layers, kind=kind)
    critic = Critic(in_dim, params.model.critic_units, params.model.critic_layers)
    return video_wm, trunk, guidance, actor, critic


# ------------------------------------------------------------------------------------------------
# Imagination and gradient routing
# ------------------------------------------------------------------------------------------------


def test_imagination_shapes_and_first_intrinsic_is_zero():
    params = smoke_params()
    _, trunk, guidance, actor, _ = build_veorl(params)
    posterior, _ = trunk.trunk_net.observe(trunk.encoder(target_batch()["image"]), target_batch()["action"])
    start = posterior.reshape_batch(-1)
    horizon, n = 5, 12
    traj = imagine(trunk.trunk_net, start, actor, horizon, guidance)
    feat, z = trunk.feat_dim, params.model.latent_action_dim
    assert traj.features.shape == (horizon + 1, n, feat)
    assert traj.latent_actions.shape == (horizon + 1, n, z)
    assert traj.actions.shape == (horizon, n, ACTION_DIM)
    assert traj.log_probs.shape == traj.entropies.shape == (horizon, n)
    assert traj.intrinsic.shape == (horizon + 1, n)
    assert traj.states.deter.shape == (horizon + 1, n, params.model.deter)
    assert torch.all(traj.intrinsic[0] == 0)
    assert torch.all(traj.intrinsic[1:] < 0)  # random nets never land exactly where the Plan Net predicts
    assert traj.actions.abs().max() <= 1.0
    # Every latent action is one of the codebook vectors.
    codes = guidance.codebook.vectors.detach()
    is_code = (traj.latent_actions.reshape(-1, 1, z) == codes[None]).all(-1).any(-1)
    assert bool(is_code.all())
    assert traj.policy_inputs(True).shape == (horizon + 1, n, feat + z)
    assert not traj.policy_inputs(True).requires_grad


def test_intrinsic_reward_is_zero_when_the_plan_prediction_equals_the_feature():
    feature = torch.randn(7, 5, 32)
    assert torch.equal(intrinsic_reward(feature, feature.clone()), torch.zeros(7, 5))
    shifted = feature.clone()
    shifted[..., 0] += 3.0
    assert torch.allclose(intrinsic_reward(feature, shifted), torch.full((7, 5), -3.0))


def test_release_guidance_compares_the_plan_prediction_with_the_trunk_feature():
    params = smoke_params()
    video_wm, trunk, guidance, _, _ = build_veorl(params, "release")
    state = trunk.trunk_net.initial(3)
    feature = trunk.trunk_net.feature(state)
    assert torch.equal(guidance.comparable(state, feature), feature)
    # Stepped from the Trunk Net state itself, as the release does.
    latent = guidance.latent_action(feature)
    expected = video_wm.plan_net.feature(video_wm.plan_net.img_step(state, latent, sample=False))
    assert torch.allclose(guidance.predict_next(state, feature, latent), expected)


def _grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_actor_gradient_flows_through_the_dynamics_but_not_into_the_frozen_world_model():
    # No entropy bonus: any actor gradient must have come through the imagined states.
    params = smoke_params("finetune.actor_entropy=0.0")
    video_wm, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    out = phase.losses(phase.start_states(target_batch()))
    out.actor.backward()
    actor_grads = _grads(actor)
    assert all(g is not None for g in actor_grads)
    assert sum(float(g.abs().sum()) for g in actor_grads) > 0
    for frozen in (trunk, guidance, video_wm, phase.slow_critic):
        assert all(g is None for g in _grads(frozen)), f"{type(frozen).__name__} received a gradient"
    assert all(g is None for g in _grads(critic))
    before = [g.clone() for g in actor_grads]
    out.critic.backward()
    assert sum(float(g.abs().sum()) for g in _grads(critic)) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, _grads(actor)))  # the critic loss leaves the actor alone
    assert all(g is None for g in _grads(trunk))


def test_discrete_actions_use_reinforce_with_the_critic_baseline():
    params = smoke_params("finetune.actor_entropy=0.0")
    video_wm, trunk, guidance, actor, critic = build_veorl(params, action_dim=3, kind="discrete")
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    batch = target_batch(action_dim=3)
    batch["action"] = torch.nn.functional.one_hot(torch.randint(0, 3, batch["action"].shape[:2]), 3).float()
    out = phase.losses(phase.start_states(batch))
    out.actor.backward()
    assert sum(float(g.abs().sum()) for g in _grads(actor)) > 0
    assert all(g is None for g in _grads(trunk))
    traj = imagine(trunk.trunk_net, phase.start_states(batch), actor, 3, guidance, dynamics_gradient=False)
    assert set(traj.actions.sum(-1).unique().tolist()) == {1.0}  # one-hot actions
    assert not traj.features.requires_grad  # no graph through the dynamics in the REINFORCE branch


def test_policy_update_changes_actor_and_critic_and_refreshes_the_slow_critic():
    params = smoke_params("finetune.slow_critic_every=2")
    _, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    trunk_before = {k: v.clone() for k, v in trunk.state_dict().items()}
    actor_before = [p.detach().clone() for p in actor.parameters()]
    phase.update(target_batch(seed=1))
    assert any(not torch.equal(a, p) for a, p in zip(actor_before, actor.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(phase.slow_critic.parameters(), critic.parameters()))
    phase.update(target_batch(seed=2))
    assert all(torch.equal(a, b) for a, b in zip(phase.slow_critic.parameters(), critic.parameters()))
    assert all(torch.equal(trunk_before[k], v) for k, v in trunk.state_dict().items())


# ------------------------------------------------------------------------------------------------
# World-model phase
# ------------------------------------------------------------------------------------------------


def test_world_model_phase_trains_every_trunk_parameter_and_the_aligned_guidance_only():
    # Free nats off: below them the KL is a constant and the prior would rightly get no gradient.
    params = smoke_params("finetune.world_model_optim.lr=0.01", "finetune.free_nats=0.0")
    video_wm, trunk, guidance, _, _ = build_veorl(params)
    phase = WorldModelPhase(trunk, params, switches(params.finetune), video_wm, guidance)
    before = {name: p.detach().clone() for name, p in trunk.named_parameters()}
    guidance_before = {name: p.detach().clone() for name, p in guidance.named_parameters()}
    video_before = {name: p.detach().clone() for name, p in video_wm.named_parameters()}
    source = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 5, 64, 64, 3), dtype=np.uint8))
    metrics = phase.update(target_batch(), source)
    assert {"image_nll", "reward_nll", "kl", "mmd", "fbc_loss", "map_loss", "wm_loss"} <= set(metrics)
    unchanged = [n for n, p in trunk.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, f"one large-lr step left these Trunk world-model parameters untouched: {unchanged}"
    trained = {n for n, p in guidance.named_parameters() if not torch.equal(guidance_before[n], p)}
    assert any(n.startswith("fbc.") for n in trained) and any(n.startswith("state_map.") for n in trained)
    assert not any(n.startswith(("codebook.", "plan_net.")) for n in trained)
    assert all(torch.equal(video_before[n], p) for n, p in video_wm.named_parameters())


def test_release_guidance_is_not_retrained():
    params = smoke_params()
    video_wm, trunk, guidance, _, _ = build_veorl(params, "release")
    phase = WorldModelPhase(trunk, params, switches(params.finetune), video_wm, guidance)
    fbc_before = [p.detach().clone() for p in guidance.fbc.parameters()]
    metrics = phase.update(target_batch(), None)
    assert "fbc_loss" not in metrics and "mmd" not in metrics
    assert guidance.fbc is video_wm.fbc
    assert all(torch.equal(a, b) for a, b in zip(fbc_before, guidance.fbc.parameters()))


def test_plan_posterior_targets_are_latent_actions_of_transitions():
    params = smoke_params()
    video_wm, *_ = build_veorl(params)
    latent, posterior = plan_posterior_targets(video_wm, target_batch(length=6)["image"].float() / 255 - 0.5)
    assert latent.shape == (2, 5, params.model.latent_action_dim)
    assert posterior.deter.shape == (2, 6, params.model.deter)


# ------------------------------------------------------------------------------------------------
# The component: every algorithm, resume, errors
# ------------------------------------------------------------------------------------------------


def _finetune_args(inputs, out: Path, *extra: str, world_model: str | None = None) -> list[str]:
    return ["--preset", "smoke", "--world-model", world_model or str(inputs["world_model"]), "--episodes",
            str(inputs["episodes"]), "--clips", str(inputs["clips"]), "--out", str(out / "agent"),
            "--metrics", str(out / "finetune.json"), "--curve", str(out / "curve.csv"), "--no-progress", *extra]


def _check_agent(agent_dir: Path, algo: str) -> Agent:
    for name in ("agent.pt", "agent.json", "config.json", "provenance.json"):
        assert (agent_dir / name).is_file(), name
    agent = Agent.load(str(agent_dir))
    assert agent.meta["algo"] == algo and agent.meta["task"] == "drawer-open" and agent.meta["episode_length"] == 12
    state = agent.initial_state(2)
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    action, state = agent.act(frames, state)
    assert action.shape == (2, ACTION_DIM) and action.dtype == np.float32
    assert np.all(np.isfinite(action)) and np.abs(action).max() <= 1.0
    return agent


def test_finetune_cli_veorl_subprocess(inputs, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": inputs["mlflow"]}
    cmd = [sys.executable, "-m", "components.finetune", *_finetune_args(inputs, tmp_path, "--checkpoints", str(tmp_path / "ckpt"))]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "veorl agent written" in result.stdout
    agent = _check_agent(tmp_path / "agent", "veorl")
    assert set(agent.modules.keys()) == {"encoder", "trunk_net", "fbc", "codebook", "actor"}
    assert set(agent.initial_state(1)) == {"deter", "stoch", "prev_action"}
    summary = json.loads((tmp_path / "finetune.json").read_text())
    assert summary["updates"] == {"world_model": 3, "policy": 3}
    assert np.isfinite(summary["policy"]["imagined_return"]) and summary["world_model"]["mmd"] >= 0
    rows = (tmp_path / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("step,phase") and len(rows) == 1 + 6  # smoke logs every update
    provenance = json.loads((tmp_path / "agent" / "provenance.json").read_text())
    assert set(provenance["upstream"]) == {"world_model", "target_episodes", "video_clips"}
    (run_dir,) = (tmp_path / "ckpt").glob("run-*")  # one folder per training configuration and inputs
    assert (run_dir / "latest").is_file()


@pytest.mark.parametrize("algo,modules", [("dreamerv2", {"encoder", "trunk_net", "actor"}), ("bc", {"policy"})])
def test_finetune_cli_baselines_do_not_need_the_world_model(inputs, tmp_path, algo, modules):
    from components.finetune import main

    code = main(_finetune_args(inputs, tmp_path, "--set", f"finetune.algo={algo}", world_model=str(tmp_path / "absent")))
    assert code == 0
    agent = _check_agent(tmp_path / "agent", algo)
    assert set(agent.modules.keys()) == modules
    provenance = json.loads((tmp_path / "agent" / "provenance.json").read_text())
    assert "world_model" not in provenance["upstream"]
    summary = json.loads((tmp_path / "finetune.json").read_text())
    assert summary["algo"] == algo


def test_veorl_without_latent_action_input_and_release_guidance(inputs, tmp_path):
    from components.finetune import main

    code = main(_finetune_args(inputs, tmp_path, "--set", "finetune.use_latent_action=false", "--set",
                               "finetune.guidance=release", "--set", "finetune.use_mmd=false"))
    assert code == 0
    agent = _check_agent(tmp_path / "agent", "veorl")
    assert set(agent.modules.keys()) == {"encoder", "trunk_net", "actor"}
    assert agent.meta["switches"] == {"pretrained_encoder": True, "use_mmd": False, "use_latent_action": False,
                                      "use_intrinsic": True}
    summary = json.loads((tmp_path / "finetune.json").read_text())
    assert summary["policy"]["intrinsic"] < 0 and "mmd" not in summary["world_model"]


def test_resume_continues_exactly_where_an_interrupted_run_stopped(inputs, tmp_path):
    from components.finetune import run

    def train(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
        params = smoke_params("finetune.checkpoint_every=1", *overrides)
        run(str(inputs["world_model"]), str(inputs["episodes"]), str(out / "agent"), params, clips=str(inputs["clips"]),
            checkpoints=str(out / "ckpt"), metrics=str(out / "m.json"), curve=str(out / "c.csv"), progress=False)
        return torch.load(out / "agent" / "agent.pt", weights_only=True)

    straight = train(tmp_path / "straight")
    # "Interrupted" after 2 world-model updates, then the same command with the full step counts.
    train(tmp_path / "resumed", "finetune.world_model_steps=2", "finetune.policy_steps=0")
    resumed = train(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"
    assert (tmp_path / "straight" / "c.csv").read_text() != ""
    straight_rows = (tmp_path / "straight" / "c.csv").read_text().splitlines()
    resumed_rows = (tmp_path / "resumed" / "c.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in straight_rows] == [r.split(",")[:3] for r in resumed_rows]


def test_other_settings_train_in_their_own_checkpoint_folder(inputs, tmp_path):
    from components.finetune import main
    from veorl.checkpoint import CheckpointManager, CheckpointMismatch, assert_resumable

    args = _finetune_args(inputs, tmp_path, "--checkpoints", str(tmp_path / "ckpt"), "--set", "finetune.policy_steps=0",
                          "--set", "finetune.world_model_steps=1")
    assert main(args) == 0
    (first,) = (tmp_path / "ckpt").glob("run-*")
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    # a `dvc exp run -S finetune.discount=0.5` must not be blocked by the persisted checkpoint of the default run
    assert main(args + ["--set", "finetune.discount=0.5"]) == 0
    (second,) = set((tmp_path / "ckpt").glob("run-*")) - {first}
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before
    # while resuming one configuration from the other's checkpoint is refused, naming the key
    with pytest.raises(CheckpointMismatch, match="finetune.discount"):
        assert_resumable(CheckpointManager(first).load_latest()["config"], CheckpointManager(second).load_latest()["config"])
    # extending the step counts keeps resuming the first folder
    assert main(args[:-1] + ["finetune.world_model_steps=2"]) == 0
    assert set((tmp_path / "ckpt").glob("run-*")) == {first, second}


def test_world_model_of_other_sizes_is_rejected_with_the_keys(inputs, tmp_path, capsys):
    from components.finetune import main

    other, _ = make_world_model(tmp_path / "wm", smoke_params("model.deter=32"))
    assert main(_finetune_args(inputs, tmp_path, world_model=str(other))) == 2
    err = capsys.readouterr().err
    assert "model.deter" in err and str(other) in err
    assert not (tmp_path / "agent" / "agent.json").exists()
