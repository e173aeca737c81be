"""Fine-tuning: imagination, gradient routing, the world-model phase, resume, and the CLI for every algorithm."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.algo.trainer_checks import assert_update_trains_exactly
from tests.builders import ACTION_DIM, smoke_params, write_clips, write_episodes
from veorl.agent import Agent
from veorl.algo.baselines import switches
from veorl.algo.finetune import FinetuneError, PolicyPhase, WorldModelPhase, build_guidance, check_behaviour_term
from veorl.models.actor_critic import Actor, Critic, policy_inputs
from veorl.models.world_models import VideoWorldModel, build_trunk_world_model, save_world_model
from veorl.storage import artifact_hash

REPO = Path(__file__).resolve().parents[2]
EPISODE_FRAMES = 16  # per target episode; the dataset card (and so the agent) counts the steps: one fewer


# ------------------------------------------------------------------------------------------------
# Tiny inputs: target episodes, ingested clips, a video world model artifact (smoke sizes)
# ------------------------------------------------------------------------------------------------


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
    return {
        "episodes": write_episodes(root / "episodes", length=EPISODE_FRAMES),
        "clips": write_clips(root / "clips", clips=3, window=12),
        "world_model": world_model,
        "mlflow": f"sqlite:///{root / 'mlruns.db'}",
    }


@pytest.fixture(autouse=True)
def _tracking(inputs, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", inputs["mlflow"])


def target_batch(
    batch: int = 2, length: int = 6, action_dim: int = ACTION_DIM, seed: int = 0
) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {
        "image": torch.from_numpy(rng.integers(0, 256, (batch, length, 64, 64, 3), dtype=np.uint8)),
        "action": torch.from_numpy(rng.uniform(-1, 1, (batch, length, action_dim)).astype(np.float32)),
        "reward": torch.from_numpy(rng.uniform(0, 1, (batch, length)).astype(np.float32)),
    }


def build_veorl(params, guidance_mode: str = "aligned", action_dim: int = ACTION_DIM, kind: str = "continuous"):
    torch.manual_seed(0)
    video_wm = VideoWorldModel(params.model)
    video_wm.freeze_behaviours()
    trunk = build_trunk_world_model(params.model, action_dim, video_wm, ensemble_size=params.finetune.ensemble_size)
    guidance = build_guidance(video_wm, trunk, guidance_mode, params.model)
    in_dim = trunk.feat_dim + params.model.latent_action_dim
    actor = Actor(in_dim, action_dim, params.model.actor_units, params.model.actor_layers, kind=kind)
    critic = Critic(in_dim, params.model.critic_units, params.model.critic_layers)
    return video_wm, trunk, guidance, actor, critic


def stage_modules(video_wm, trunk, guidance, actor, critic, *extra: torch.nn.Module) -> torch.nn.ModuleDict:
    """Every module of the fine-tuning stage, for checks of what one update may change."""
    modules = {"video_wm": video_wm, "trunk": trunk, "guidance": guidance, "actor": actor, "critic": critic}
    return torch.nn.ModuleDict({**modules, **{f"extra{i}": m for i, m in enumerate(extra)}})


def with_source(batch: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    source = np.random.default_rng(seed).integers(0, 256, (2, 5, 64, 64, 3), dtype=np.uint8)
    return {**batch, "source": torch.from_numpy(source)}


# ------------------------------------------------------------------------------------------------
# Policy phase
# ------------------------------------------------------------------------------------------------


def _grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_policy_losses_route_gradients_to_actor_and_critic_only():
    # No entropy bonus: any actor gradient must have come through the imagined states.
    params = smoke_params("finetune.actor_entropy=0.0")
    video_wm, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    out = phase.losses(target_batch())
    out.actor_loss.backward()
    actor_grads = _grads(actor)
    assert all(g is not None for g in actor_grads)
    assert sum(float(g.abs().sum()) for g in actor_grads) > 0
    for frozen in (trunk, guidance, video_wm, phase.slow_critic):
        assert all(g is None for g in _grads(frozen)), f"{type(frozen).__name__} received a gradient"
    assert all(g is None for g in _grads(critic))
    before = [g.clone() for g in actor_grads]
    out.critic_loss.backward()
    assert sum(float(g.abs().sum()) for g in _grads(critic)) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, _grads(actor)))  # the critic loss leaves the actor alone
    assert all(g is None for g in _grads(trunk))


def test_discrete_actions_use_reinforce_with_the_critic_baseline():
    params = smoke_params("finetune.actor_entropy=0.0", "finetune.actor_bc_loss=nll")  # one-hot: the cross-entropy
    video_wm, trunk, guidance, actor, critic = build_veorl(params, action_dim=3, kind="discrete")
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    batch = target_batch(action_dim=3)
    batch["action"] = torch.nn.functional.one_hot(torch.randint(0, 3, batch["action"].shape[:2]), 3).float()
    returns = phase.imagine_returns(phase.start_states(batch).states)
    assert not returns.returns.requires_grad  # nothing to backpropagate through the dynamics
    phase.actor_loss(returns).backward()
    assert sum(float(g.abs().sum()) for g in _grads(actor)) > 0  # through the log-probabilities
    assert all(g is None for g in _grads(trunk))


def test_the_discount_head_learns_terminals_and_cuts_imagined_returns():
    """finetune.discount_head (the game): the world-model phase fits the data's discount, the policy phase discounts
    each imagined step by gamma x the predicted continuation, and no data action follows a terminal."""
    params = smoke_params(
        "finetune.discount_head=true",
        "finetune.critic_warmup=0",
        "finetune.ensemble_size=0",
        "finetune.actor_bc_loss=nll",
    )
    torch.manual_seed(0)
    video_wm = VideoWorldModel(params.model)
    video_wm.freeze_behaviours()
    trunk = build_trunk_world_model(params.model, 3, video_wm, discount_head=True)
    guidance = build_guidance(video_wm, trunk, "aligned", params.model)
    in_dim = trunk.feat_dim + params.model.latent_action_dim
    actor = Actor(in_dim, 3, params.model.actor_units, params.model.actor_layers, kind="discrete")
    critic = Critic(in_dim, params.model.critic_units, params.model.critic_layers)
    batch = target_batch(action_dim=3)
    batch["action"] = torch.nn.functional.one_hot(torch.randint(0, 3, batch["action"].shape[:2]), 3).float()
    batch["discount"] = torch.ones(2, 6)
    batch["discount"][0, 3:] = 0.0  # a terminal at step 3, absorbing steps after it
    world = WorldModelPhase(trunk, params, switches(params.finetune), video_wm, guidance)
    losses = world.losses(batch)
    assert losses.discount_nll is not None and losses.discount_nll > 0
    head_before = [p.clone() for p in trunk.discount_head.parameters()]
    world.update(batch)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, trunk.discount_head.parameters()))

    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    start = phase.start_states(batch)
    assert start.has_next.reshape(2, 6)[0].tolist() == [1, 1, 1, 0, 0, 0]
    with torch.no_grad():  # a head sure that every episode ends now: no weight beyond the first imagined step
        trunk.discount_head.mlp.net[-1].bias.fill_(-30.0)
    ended = phase.imagine_returns(start.states)
    assert torch.all(ended.weights[1:] < 1e-6) and torch.allclose(ended.weights[0], torch.ones_like(ended.weights[0]))
    assert torch.allclose(ended.returns[0], ended.reward[0], atol=1e-4)  # nothing after the terminal counts
    with torch.no_grad():  # sure it goes on: gamma alone, as without the head
        trunk.discount_head.mlp.net[-1].bias.fill_(30.0)
    going_on = phase.imagine_returns(start.states)
    gamma = params.finetune.discount
    assert torch.allclose(going_on.weights[2], torch.full_like(going_on.weights[2], gamma**2), atol=1e-5)


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_policy_update_trains_actor_and_critic_only(kind):
    behaviour = "mse" if kind == "continuous" else "nll"  # one-hot actions: the cross-entropy
    params = smoke_params(
        "finetune.actor_optim.lr=0.05",
        "finetune.critic_optim.lr=0.05",
        "finetune.critic_warmup=0",
        f"finetune.actor_bc_loss={behaviour}",
    )
    action_dim = 4 if kind == "continuous" else 3
    video_wm, trunk, guidance, actor, critic = build_veorl(params, action_dim=action_dim, kind=kind)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    batch = target_batch(action_dim=action_dim)
    losses = assert_update_trains_exactly(
        phase, batch, [actor, critic], stage_modules(video_wm, trunk, guidance, actor, critic, phase.slow_critic)
    )
    assert losses.actor_grad_norm > 0 and losses.critic_grad_norm > 0 and losses.intrinsic < 0


def test_policy_update_refreshes_the_slow_critic_and_keeps_the_world_model():
    params = smoke_params("finetune.slow_critic_every=2")
    _, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    trunk_before = {k: v.clone() for k, v in trunk.state_dict().items()}
    phase.update(target_batch(seed=1))
    assert not all(torch.equal(a, b) for a, b in zip(phase.slow_critic.parameters(), critic.parameters()))
    phase.update(target_batch(seed=2))
    assert all(torch.equal(a, b) for a, b in zip(phase.slow_critic.parameters(), critic.parameters()))
    assert all(torch.equal(trunk_before[k], v) for k, v in trunk.state_dict().items())


# ------------------------------------------------------------------------------------------------
# World-model phase and the bc baseline
# ------------------------------------------------------------------------------------------------


def test_world_model_phase_trains_every_trunk_parameter_and_the_aligned_guidance_only():
    # Free nats off: below them the KL is a constant and the prior would rightly get no gradient.
    params = smoke_params("finetune.world_model_optim.lr=0.01", "finetune.free_nats=0.0", "finetune.use_mmd=true")
    video_wm, trunk, guidance, actor, critic = build_veorl(params)
    phase = WorldModelPhase(trunk, params, switches(params.finetune), video_wm, guidance)
    losses = assert_update_trains_exactly(
        phase,
        with_source(target_batch()),
        [trunk, guidance.fbc, guidance.state_map],
        stage_modules(video_wm, trunk, guidance, actor, critic),
    )
    assert {f.name for f in dataclasses.fields(losses) if getattr(losses, f.name) is not None} == {
        "loss",
        "image_nll",
        "reward_nll",
        "kl_loss",
        "kl",
        "mmd",
        "fbc_loss",
        "map_loss",
        "ensemble_loss",
        "trunk_grad_norm",
        "guidance_grad_norm",
    }
    assert guidance.fbc is not video_wm.fbc


def test_release_guidance_is_not_retrained():
    params = smoke_params("finetune.world_model_optim.lr=0.01", "finetune.free_nats=0.0")
    video_wm, trunk, guidance, actor, critic = build_veorl(params, "release")
    phase = WorldModelPhase(trunk, params, switches(params.finetune), video_wm, guidance)
    losses = assert_update_trains_exactly(
        phase, target_batch(), [trunk], stage_modules(video_wm, trunk, guidance, actor, critic)
    )
    assert losses.fbc_loss is None and losses.mmd is None and losses.guidance_grad_norm is None
    assert guidance.fbc is video_wm.fbc


def test_world_model_losses_are_a_pure_function_of_the_batch():
    params = smoke_params()
    video_wm, trunk, guidance, _, _ = build_veorl(params)
    phase = WorldModelPhase(trunk, params, switches(params.finetune), video_wm, guidance)
    batch = with_source(target_batch())
    torch.manual_seed(5)
    first = phase.losses(batch)
    torch.manual_seed(5)
    second = phase.losses(batch)
    assert all(
        torch.equal(getattr(first, f.name), getattr(second, f.name))
        for f in dataclasses.fields(first)
        if getattr(first, f.name) is not None
    )


@pytest.mark.parametrize("loss", ["mse", "gaussian"])
def test_behaviour_cloning_update_trains_the_policy(loss):
    from veorl.algo.baselines import BehaviourCloning
    from veorl.models.actor_critic import PixelPolicy

    params = smoke_params("finetune.bc_optim.lr=0.01", f"finetune.bc_loss={loss}")
    torch.manual_seed(0)
    policy = PixelPolicy(params.model.cnn_depth, ACTION_DIM, params.model.actor_units, params.model.actor_layers)
    trainer = BehaviourCloning(policy, params.finetune)
    losses = assert_update_trains_exactly(trainer, target_batch(), [policy], torch.nn.ModuleDict({"policy": policy}))
    assert torch.equal(losses.bc_loss, losses.action_mse) == (loss == "mse")


def test_categorical_behaviour_cloning_is_the_cross_entropy_of_the_taken_actions():
    from veorl.algo.baselines import BehaviourCloning, bc_loss, bc_pairs
    from veorl.models.actor_critic import PixelPolicy

    actions = 17
    batch = target_batch(action_dim=actions)
    chosen = torch.from_numpy(np.random.default_rng(1).integers(0, actions, batch["action"].shape[:2]))
    batch["action"] = torch.nn.functional.one_hot(chosen, actions).float()
    batch["action"][0, -2:] = 0.0  # absorbing steps padded after an episode's end: no action to imitate
    params = smoke_params("finetune.bc_optim.lr=0.01", "finetune.bc_loss=categorical")
    torch.manual_seed(0)
    policy = PixelPolicy(params.model.cnn_depth, actions, params.model.actor_units, params.model.actor_layers)
    frames, targets = bc_pairs(batch["image"], batch["action"])
    taken = targets.sum(-1) > 0
    assert int((~taken).sum()) == 2
    logits, _ = policy.raw(frames)
    by_hand = -torch.log_softmax(logits[taken], -1)[torch.arange(int(taken.sum())), targets[taken].argmax(-1)].mean()
    loss = bc_loss(policy, frames, targets, "categorical").bc_loss
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # acting plays the argmax of tanh(logits), the same action the logits rank first
    assert torch.equal(policy(frames)[0].argmax(-1), logits.argmax(-1))
    trainer = BehaviourCloning(policy, params.finetune)
    assert_update_trains_exactly(trainer, batch, [policy], torch.nn.ModuleDict({"policy": policy}))
    with pytest.raises(ValueError, match="one-hot"):
        bc_loss(policy, frames, torch.rand_like(targets) * 2 - 1, "categorical")


# ------------------------------------------------------------------------------------------------
# The component: every algorithm, resume, errors
# ------------------------------------------------------------------------------------------------


def _finetune_args(inputs, out: Path, *extra: str, world_model: str | None = None) -> list[str]:
    return [
        "--preset",
        "smoke",
        "--world-model",
        world_model or str(inputs["world_model"]),
        "--episodes",
        str(inputs["episodes"]),
        "--clips",
        str(inputs["clips"]),
        "--out",
        str(out / "agent"),
        "--metrics",
        str(out / "finetune.json"),
        "--curve",
        str(out / "curve.csv"),
        "--no-progress",
        *extra,
    ]


def _check_agent(agent_dir: Path, algo: str) -> Agent:
    for name in ("agent.pt", "agent.json", "config.json", "provenance.json"):
        assert (agent_dir / name).is_file(), name
    agent = Agent.load(str(agent_dir))
    assert agent.meta["algo"] == algo and agent.meta["task"] == "drawer-open"
    assert agent.meta["episode_length"] == EPISODE_FRAMES - 1
    state = agent.initial_state(2)
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    action, state = agent.act(frames, state)
    assert action.shape == (2, ACTION_DIM) and action.dtype == np.float32
    assert np.all(np.isfinite(action)) and np.abs(action).max() <= 1.0
    return agent


def test_finetune_cli_veorl_subprocess(inputs, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": inputs["mlflow"]}
    cmd = [
        sys.executable,
        "-m",
        "components.finetune",
        *_finetune_args(inputs, tmp_path, "--checkpoints", str(tmp_path / "ckpt"), "--set", "finetune.use_mmd=true"),
    ]
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
    assert rows[0].startswith("step,phase,phase_step,") and len(rows) == 1 + 6  # smoke logs every update
    header = rows[0].split(",")
    assert {
        "loss",
        "kl_loss",
        "kl",
        "fbc_loss",
        "map_loss",
        "actor_loss",
        "critic_loss",
        "actor_grad_norm",
        "time/update_s",
        "throughput/samples_per_s",
    } <= set(header)
    provenance = json.loads((tmp_path / "agent" / "provenance.json").read_text())
    assert set(provenance["upstream"]) == {"world_model", "target_episodes", "video_clips"}
    assert provenance["upstream"]["world_model"] == artifact_hash(inputs["world_model"])
    assert provenance["content_hash"] == artifact_hash(tmp_path / "agent")
    (run_dir,) = (tmp_path / "ckpt").glob("run-*")  # one folder per training configuration and inputs
    assert (run_dir / "latest").is_file()


@pytest.mark.parametrize("algo,modules", [("dreamerv2", {"encoder", "trunk_net", "actor"}), ("bc", {"policy"})])
def test_finetune_cli_baselines_do_not_need_the_world_model(inputs, tmp_path, algo, modules):
    from components.finetune import main

    code = main(
        _finetune_args(inputs, tmp_path, "--set", f"finetune.algo={algo}", world_model=str(tmp_path / "absent"))
    )
    assert code == 0
    agent = _check_agent(tmp_path / "agent", algo)
    assert set(agent.modules.keys()) == modules
    provenance = json.loads((tmp_path / "agent" / "provenance.json").read_text())
    assert "world_model" not in provenance["upstream"]
    summary = json.loads((tmp_path / "finetune.json").read_text())
    assert summary["algo"] == algo


@pytest.mark.parametrize("algo", ["dreamerv2", "bc"])
def test_snapshots_are_complete_agents_of_the_last_phase(inputs, tmp_path, algo):
    """With --snapshots, the agent is written every snapshot_every updates of the last phase (not at its end:
    that is the agent itself), each loadable and recording the updates it had."""
    from components.finetune import main

    steps = "finetune.policy_steps=5" if algo == "dreamerv2" else "finetune.bc_steps=5"
    extra = ["--set", f"finetune.algo={algo}", "--set", steps, "--set", "finetune.snapshot_every=2"]
    assert main(_finetune_args(inputs, tmp_path, *extra, "--snapshots", str(tmp_path / "snaps"))) == 0
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["updates-000002", "updates-000004"]
    last = "policy" if algo == "dreamerv2" else "bc"
    for updates in (2, 4):
        snapshot = tmp_path / "snaps" / f"updates-{updates:06d}"
        agent = _check_agent(snapshot, algo)
        assert agent.meta["trained_updates"][last] == updates
        assert json.loads((snapshot / "provenance.json").read_text())["content_hash"] == artifact_hash(snapshot)
    final = Agent.load(str(tmp_path / "agent"))
    assert final.meta["trained_updates"][last] == 5
    # the snapshot is the actor of that moment, not the final one
    snap = Agent.load(str(tmp_path / "snaps" / "updates-000002"))
    module = "policy" if algo == "bc" else "actor"
    differ = [
        not torch.equal(a, b)
        for a, b in zip(snap.modules[module].state_dict().values(), final.modules[module].state_dict().values())
    ]
    assert any(differ)


def test_veorl_without_latent_action_input_and_release_guidance(inputs, tmp_path):
    from components.finetune import main

    code = main(
        _finetune_args(
            inputs,
            tmp_path,
            "--set",
            "finetune.use_latent_action=false",
            "--set",
            "finetune.guidance=release",
            "--set",
            "finetune.use_mmd=false",
        )
    )
    assert code == 0
    agent = _check_agent(tmp_path / "agent", "veorl")
    assert set(agent.modules.keys()) == {"encoder", "trunk_net", "actor"}
    assert agent.meta["switches"] == {
        "pretrained_encoder": True,
        "use_mmd": False,
        "use_latent_action": False,
        "use_intrinsic": True,
    }
    summary = json.loads((tmp_path / "finetune.json").read_text())
    assert summary["policy"]["intrinsic"] < 0 and "mmd" not in summary["world_model"]


def test_resume_continues_exactly_where_an_interrupted_run_stopped(inputs, tmp_path):
    from components.finetune import run

    def train(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
        params = smoke_params("finetune.checkpoint_every=1", "finetune.precision=fp32", *overrides)
        run(
            str(inputs["world_model"]),
            str(inputs["episodes"]),
            str(out / "agent"),
            params,
            clips=str(inputs["clips"]),
            checkpoints=str(out / "ckpt"),
            metrics=str(out / "m.json"),
            curve=str(out / "c.csv"),
            progress=False,
        )
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


class Killed(KeyboardInterrupt):
    pass


def test_killed_runs_resume_to_the_uninterrupted_result(inputs, tmp_path):
    from veorl.algo.finetune import finetune

    # Checkpoints at global steps 2, 3 (world-model end), 5 and 6 (policy end); rows every 3 updates of a phase
    # (its end here), so the checkpoints at steps 2 and 5 hold an open window of two updates that must be restored.
    params = smoke_params("finetune.checkpoint_every=2", "finetune.log_every=3", "finetune.precision=fp32")

    def train(out: Path, kill_at: int | None = None) -> None:
        def on_step(global_step: int) -> None:
            if global_step == kill_at:
                raise Killed(f"simulated kill after step {kill_at}")

        finetune(
            str(inputs["world_model"]),
            str(inputs["episodes"]),
            str(out / "agent"),
            params,
            clips=str(inputs["clips"]),
            checkpoints=str(out / "ckpt"),
            metrics_path=str(out / "m.json"),
            curve_path=str(out / "c.csv"),
            progress=False,
            on_step=on_step,
        )

    train(tmp_path / "straight")
    # mid world model; one update into the policy phase (back to the world-model end); mid policy
    for kill_at in (2, 4, 5):
        with pytest.raises(Killed):
            train(tmp_path / "killed", kill_at)
    assert not (tmp_path / "killed" / "agent" / "agent.json").exists()
    train(tmp_path / "killed")
    straight = torch.load(tmp_path / "straight" / "agent" / "agent.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "agent" / "agent.pt", weights_only=True)
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert straight.keys() == resumed.keys() and not different, different[:5]

    def curve(path: Path) -> list[list[str]]:
        rows = [line.split(",") for line in path.read_text().splitlines()]
        keep = [i for i, name in enumerate(rows[0]) if not name.startswith(("time/", "throughput/"))]
        return [[row[i] for i in keep] for row in rows]

    assert curve(tmp_path / "straight" / "c.csv") == curve(tmp_path / "killed" / "c.csv")
    assert [r[:3] for r in curve(tmp_path / "straight" / "c.csv")[1:]] == [
        ["3", "world_model", "3"],
        ["6", "policy", "3"],
    ]
    summary = json.loads((tmp_path / "killed" / "m.json").read_text())
    assert summary["resumed"] and summary["updates"] == {"world_model": 3, "policy": 3}
    assert summary["precision"] == "fp32" and summary["compile"] is False


def test_other_settings_train_in_their_own_checkpoint_folder(inputs, tmp_path):
    from components.finetune import main
    from veorl.checkpoint import CheckpointManager, CheckpointMismatch, assert_resumable

    args = _finetune_args(
        inputs,
        tmp_path,
        "--checkpoints",
        str(tmp_path / "ckpt"),
        "--set",
        "finetune.policy_steps=0",
        "--set",
        "finetune.world_model_steps=1",
    )
    assert main(args) == 0
    (first,) = (tmp_path / "ckpt").glob("run-*")
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    # a `dvc exp run -S finetune.discount=0.5` must not be blocked by the persisted checkpoint of the default run
    assert main(args + ["--set", "finetune.discount=0.5"]) == 0
    (second,) = set((tmp_path / "ckpt").glob("run-*")) - {first}
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before
    # while resuming one configuration from the other's checkpoint is refused, naming the key
    with pytest.raises(CheckpointMismatch, match="finetune.discount"):
        assert_resumable(
            CheckpointManager(first).load_latest()["config"], CheckpointManager(second).load_latest()["config"]
        )
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


# ------------------------------------------------------------------------------------------------
# Offline conservatism: each switch changes what the actor optimises, and off means off
# ------------------------------------------------------------------------------------------------


def _actor_loss(*overrides: str, batch_seed: int = 3) -> float:
    params = smoke_params(*overrides)
    _, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    torch.manual_seed(1)
    return float(phase.losses(target_batch(seed=batch_seed)).actor_loss.detach())


@pytest.mark.parametrize(
    "switch", ["finetune.actor_bc_weight=0", "finetune.actor_bc_loss=nll", "finetune.uncertainty_weight=0"]
)
def test_each_conservatism_switch_changes_the_actor_objective(switch):
    assert _actor_loss() != pytest.approx(_actor_loss(switch), rel=1e-6, abs=1e-6)


def test_the_behaviour_term_is_the_data_actions_negative_log_likelihood():
    params = smoke_params("finetune.uncertainty_weight=0", "finetune.actor_bc_loss=nll")
    _, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    batch = target_batch(seed=4)
    torch.manual_seed(1)
    losses = phase.losses(batch)
    torch.manual_seed(1)
    start = phase.start_states(batch)
    # the action that followed observation t is the one stored at t+1; the last step of a window has none
    assert torch.equal(start.next_action.reshape(2, -1, ACTION_DIM)[:, :-1], batch["action"][:, 1:])
    assert start.has_next.reshape(2, -1)[:, -1].sum() == 0 and start.has_next.reshape(2, -1)[:, :-1].all()
    r = phase.imagine_returns(start.states)
    expected = phase.actor_loss(r) + params.finetune.actor_bc_weight * phase.behaviour_loss(r, start)
    assert float(losses.actor_loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(losses.actor_bc_loss.detach()) == pytest.approx(
        float(phase.behaviour_loss(r, start).detach()), rel=1e-5
    )


@pytest.mark.parametrize("form", ["nll", "mse"])
def test_the_behaviour_term_measures_the_actor_against_the_following_data_action(form):
    params = smoke_params("finetune.uncertainty_weight=0", f"finetune.actor_bc_loss={form}")
    _, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    batch = target_batch(seed=6)
    batch["action"] = batch["action"].clamp(-0.9, 0.9)  # inside the bounds: no clamping in either form
    torch.manual_seed(1)
    start = phase.start_states(batch)
    r = phase.imagine_returns(start.states)
    dist = actor(policy_inputs(r.traj.features[0].detach(), r.traj.latent_actions[0]))
    if form == "nll":
        per_state = -dist.log_prob(start.next_action)
    else:
        per_state = ((dist.mode() - start.next_action) ** 2).sum(-1)
    expected = per_state[start.has_next > 0].mean()
    assert float(phase.behaviour_loss(r, start).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_the_squared_behaviour_term_refuses_one_hot_actions():
    params = smoke_params("finetune.actor_bc_loss=mse")
    _, trunk, guidance, actor, critic = build_veorl(params, action_dim=3, kind="discrete")
    with pytest.raises(FinetuneError, match="actor_bc_loss=nll"):
        PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    PolicyPhase(trunk, actor, critic, smoke_params("finetune.actor_bc_loss=nll"), switches(params.finetune), guidance)
    assert smoke_params("domain=game").finetune.actor_bc_loss == "nll"  # the one-hot domain's default
    # finetune() runs the same check on the data's action kind before the world-model phase
    with pytest.raises(FinetuneError, match="actor_bc_loss=nll"):
        check_behaviour_term(params.finetune, "discrete")
    check_behaviour_term(params.finetune, "continuous")
    check_behaviour_term(smoke_params("finetune.actor_bc_loss=mse", "finetune.actor_bc_weight=0").finetune, "discrete")


def test_the_uncertainty_penalty_lowers_imagined_rewards_by_the_ensemble_disagreement():
    params = smoke_params("finetune.uncertainty_weight=2.0")
    _, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    torch.manual_seed(1)
    r = phase.imagine_returns(phase.start_states(target_batch(seed=5)).states)
    assert r.uncertainty is not None and (r.uncertainty > 0).all()
    intrinsic = params.finetune.intrinsic_weight * r.traj.intrinsic[1:]
    assert torch.allclose(r.reward, r.extrinsic + intrinsic - 2.0 * r.uncertainty, atol=1e-5)


def test_return_normalisation_divides_the_return_term_and_is_restored_on_resume():
    params = smoke_params("finetune.actor_bc_weight=0", "finetune.uncertainty_weight=0", "finetune.critic_warmup=0")
    _, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    phase.normaliser.lo, phase.normaliser.hi = 0.0, 40.0
    torch.manual_seed(1)
    r = phase.imagine_returns(phase.start_states(target_batch(seed=6)).states)
    raw = -(r.weights * r.returns).mean()
    entropy = -(r.weights * params.finetune.actor_entropy * r.traj.entropies).mean()
    assert float(phase.actor_loss(r).detach()) == pytest.approx(float((raw / 40.0 + entropy).detach()), rel=1e-5)
    phase.update(target_batch(seed=7))
    state = phase.state_dict()
    _, trunk2, guidance2, actor2, critic2 = build_veorl(params)
    restored = PolicyPhase(trunk2, actor2, critic2, params, switches(params.finetune), guidance2)
    restored.load_state_dict(state)
    assert restored.return_scale == phase.return_scale != 40.0


def test_critic_warmup_keeps_the_actor_frozen_then_releases_it():
    params = smoke_params("finetune.critic_warmup=2", "finetune.actor_optim.lr=0.05")
    _, trunk, guidance, actor, critic = build_veorl(params)
    phase = PolicyPhase(trunk, actor, critic, params, switches(params.finetune), guidance)
    phase.freeze_world_model()
    before = [p.detach().clone() for p in actor.parameters()]
    for seed in (8, 9):
        losses = phase.update(target_batch(seed=seed))
        assert float(losses.actor_grad_norm) == 0.0 and float(losses.critic_grad_norm) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))
    phase.update(target_batch(seed=10))
    assert not all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))
