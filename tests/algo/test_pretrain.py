"""Pretraining phases, exact resume, MLflow tracking and the components.pretrain CLI (smoke sizes)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.algo.trainer_checks import assert_update_trains_exactly
from tests.builders import moving_square_video, smoke_params, write_clips, write_episodes
from veorl.algo.pretrain import KeyframeBatch, Phase1Trainer, Phase2Trainer, pretrain
from veorl.checkpoint import CheckpointManager, CheckpointMismatch, assert_resumable
from veorl.models.world_models import VideoWorldModel, load_world_model
from veorl.storage import artifact_hash, tree_hash

REPO = Path(__file__).resolve().parents[2]
CONSTANT_NLL = 64 * 64 * 3 * 0.5 * math.log(2 * math.pi)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """Moving-square clips in the ingest layout and two 40-frame target episodes, shared by the module's tests."""
    root = tmp_path_factory.mktemp("data")
    return write_clips(root / "video_clips", clips=6, window=12), write_episodes(root / "target_episodes", length=40)


# Even smaller than `smoke` for in-process loops (same algorithm, fewer channels and steps per sequence).
TINY = (
    "model.cnn_depth=8",
    "model.deter=32",
    "model.stoch=8",
    "model.hidden=32",
    "pretrain.seq_len=6",
    "pretrain.source_len=6",
)


def fixed_batch(params, seed: int = 0) -> dict:
    cfg = params.pretrain
    target = np.stack([moving_square_video(cfg.seq_len, seed + i) for i in range(cfg.batch)])
    source = np.stack([moving_square_video(cfg.source_len, seed + 50 + i) for i in range(cfg.source_batch)])
    return {"target": {"image": torch.from_numpy(target)}, "source": {"image": torch.from_numpy(source)}}


# ------------------------------------------------------------------------------------------------
# One large step: what learns, what stays frozen
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ban_on_source", [True, False])
def test_phase1_step_changes_every_trainable_parameter(ban_on_source):
    torch.manual_seed(0)
    # free_nats=0: under the free-nats floor the KL (and so the prior network) gets no gradient at all.
    params = smoke_params("pretrain.optim.lr=0.1", "pretrain.free_nats=0", f"pretrain.ban_on_source={ban_on_source}")
    model = VideoWorldModel(params.model)
    trainer = Phase1Trainer(model, params.pretrain)
    codebook = model.codebook.vectors.detach().clone()
    m = model
    trained = [m.encoder, m.ban, m.codebook, m.plan_net, m.decoder, m.latent_forward]
    losses = assert_update_trains_exactly(trainer, fixed_batch(params), trained, model)
    assert set(vars(losses)) == {"loss", "image_nll", "kl_loss", "kl", "vq_loss", "mmd", "forward_loss", "grad_norm"}
    # Codebook vectors learn only when chosen in the batch (the VQ loss touches the selected codes).
    used = trainer.usage > 0
    rows_moved = (codebook != model.codebook.vectors.detach()).any(1)
    assert torch.equal(rows_moved, used) and used.any()


def test_phase2_step_changes_trainable_and_keeps_frozen():
    torch.manual_seed(0)
    params = smoke_params("pretrain.optim.lr=0.1", "pretrain.free_nats=0")
    model = VideoWorldModel(params.model)
    with pytest.raises(RuntimeError, match="freeze_behaviours"):
        Phase2Trainer(model, params.pretrain)
    model.freeze_behaviours()
    trainer = Phase2Trainer(model, params.pretrain)
    m = model
    losses = assert_update_trains_exactly(
        trainer, fixed_batch(params), [m.encoder, m.plan_net, m.keyframe_decoder, m.fbc], model
    )
    assert float(losses.keyframes) >= params.pretrain.batch + params.pretrain.source_batch  # frame 0 of every row


def test_phase_trainer_state_round_trip_and_codebook_metrics():
    params = smoke_params("pretrain.optim.lr=0.01", *TINY)
    torch.manual_seed(0)
    model = VideoWorldModel(params.model)
    trainer = Phase1Trainer(model, params.pretrain)
    trainer.update(fixed_batch(params))
    state = trainer.state_dict()
    torch.manual_seed(1)
    other = Phase1Trainer(VideoWorldModel(params.model), params.pretrain)
    other.load_state_dict(state)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(2)
    after_a = trainer.update(fixed_batch(params, seed=1))
    torch.manual_seed(2)
    after_b = other.update(fixed_batch(params, seed=1))
    assert torch.equal(after_a.loss, after_b.loss)  # optimiser state restored too
    # Codebook usage since the last row: K codes at most, reset once read.
    extra = trainer.extra_metrics()
    assert 1.0 <= extra["codebook_perplexity"] <= params.model.codebook_size and extra["codebook_used"] >= 1
    assert trainer.extra_metrics() == {"codebook_perplexity": 0.0, "codebook_used": 0.0}


# ------------------------------------------------------------------------------------------------
# Learning and masking
# ------------------------------------------------------------------------------------------------


def test_losses_fall_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    params = smoke_params("pretrain.optim.lr=0.001", *TINY)
    model = VideoWorldModel(params.model)
    batch = fixed_batch(params)
    phase1 = Phase1Trainer(model, params.pretrain)
    history = [phase1.update(batch) for _ in range(30)]
    first, last = (float(history[i].image_nll) - CONSTANT_NLL for i in (0, -1))
    assert last < 0.6 * first, f"phase-1 reconstruction error did not fall: {first:.1f} -> {last:.1f}"
    assert float(history[-1].loss) < float(history[0].loss)
    model.freeze_behaviours()
    phase2 = Phase2Trainer(model, params.pretrain)
    history = [phase2.update(batch) for _ in range(20)]
    first_fbc, last_fbc = float(history[0].fbc_loss), float(history[-1].fbc_loss)
    assert last_fbc < first_fbc, f"F_BC error did not fall: {first_fbc:.4f} -> {last_fbc:.4f}"
    assert float(history[-1].loss) < float(history[0].loss)


def test_data_codebook_init_uses_more_codes_than_uniform():
    torch.manual_seed(0)
    params = smoke_params(*TINY)
    batch = fixed_batch(params)
    model = VideoWorldModel(params.model)
    trainer = Phase1Trainer(model, params.pretrain)
    with torch.no_grad():
        z = torch.cat(
            [
                model.ban(model.encoder(batch[k]["image"])).reshape(-1, params.model.latent_action_dim)
                for k in ("target", "source")
            ]
        )
        uniform_codes = model.codebook.indices(z).unique().numel()
        trainer.initialise_codebook(batch)
        data_codes = model.codebook.indices(z).unique().numel()
        # every code is one of the batch's BAN outputs
        distances = torch.cdist(model.codebook.vectors, z).min(1).values
    assert data_codes > uniform_codes, (uniform_codes, data_codes)
    assert float(distances.max()) < 1e-2


def test_phase2_padded_slots_do_not_change_the_loss():
    torch.manual_seed(0)
    params = smoke_params()
    model = VideoWorldModel(params.model)
    model.freeze_behaviours()
    trainer = Phase2Trainer(model, params.pretrain)
    batch = fixed_batch(params)
    cfg = params.pretrain
    rows, slots, z = cfg.batch + cfg.source_batch, 4, params.model.latent_action_dim
    n_frames = cfg.batch * cfg.seq_len + cfg.source_batch * cfg.source_len
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    next_mask = torch.cat([mask[:, 1:], torch.zeros(rows, 1, dtype=torch.bool)], 1)
    base = KeyframeBatch(
        frame_index=torch.randint(0, n_frames, (rows, slots), generator=g),
        prev_action=torch.randn(rows, slots, z, generator=g),
        mask=mask,
        next_action=torch.randn(rows, slots, z, generator=g),
        next_mask=next_mask,
        target_rows=cfg.batch,
    )

    def loss_with(kf: KeyframeBatch):
        trainer.keyframes = lambda frames, shapes: kf  # the segmentation itself is tested elsewhere
        torch.manual_seed(1)
        with torch.no_grad():
            return trainer.losses(batch)

    reference = loss_with(base)
    noisy = KeyframeBatch(
        frame_index=torch.where(mask, base.frame_index, torch.randint(0, n_frames, (rows, slots), generator=g)),
        prev_action=torch.where(mask[..., None], base.prev_action, 50 * torch.randn(rows, slots, z, generator=g)),
        mask=mask,
        next_action=torch.where(next_mask[..., None], base.next_action, 50 * torch.randn(rows, slots, z, generator=g)),
        next_mask=next_mask,
        target_rows=cfg.batch,
    )
    padded_changed = loss_with(noisy)
    for key in ("loss", "image_nll", "kl_loss", "kl", "fbc_loss", "mmd"):
        assert torch.equal(getattr(reference, key), getattr(padded_changed, key)), key
    # ... while a change in a real slot does change it (the comparison can fail).
    real_changed = loss_with(
        KeyframeBatch(
            frame_index=base.frame_index.roll(1, 0),
            prev_action=base.prev_action,
            mask=mask,
            next_action=base.next_action,
            next_mask=next_mask,
            target_rows=cfg.batch,
        )
    )
    assert not torch.equal(reference.image_nll, real_changed.image_nll)


def test_masked_mmd_and_image_nll_ignore_padding():
    from veorl.algo.world_model_losses import image_nll, linear_mmd, masked_mean
    from veorl.models.networks import Decoder

    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(3, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    src_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    tgt_mask = torch.ones(2, 4, dtype=torch.bool)
    expected = (src[src_mask].mean(0) - tgt.reshape(-1, 6).mean(0)).square().sum()
    assert torch.allclose(linear_mmd(src, tgt, src_mask, tgt_mask), expected)
    src_noisy = torch.where(src_mask[..., None], src, torch.full_like(src, 1e3))
    assert torch.equal(linear_mmd(src_noisy, tgt, src_mask, tgt_mask), linear_mmd(src, tgt, src_mask, tgt_mask))
    assert torch.allclose(
        masked_mean(torch.tensor([[1.0, 5.0], [3.0, 9.0]]), torch.tensor([[1, 0], [1, 0]])), torch.tensor(2.0)
    )
    dec = Decoder(5, 2)
    feat, pixels = torch.randn(2, 3, 5, generator=g), torch.rand(2, 3, 64, 64, 3, generator=g) - 0.5
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    noisy = torch.where(mask[..., None, None, None], pixels, torch.full_like(pixels, 7.0))
    assert torch.equal(image_nll(dec, feat, pixels, mask), image_nll(dec, feat, noisy, mask))


# ------------------------------------------------------------------------------------------------
# Driver: resume, tracking, outputs
# ------------------------------------------------------------------------------------------------


class Killed(KeyboardInterrupt):
    pass


def kill_at(step: int):
    def hook(global_step: int) -> None:
        if global_step == step:
            raise Killed(f"simulated kill after step {step}")

    return hook


def test_resume_equals_uninterrupted(dataset, tmp_path, mlflow_store):
    clips, episodes = dataset
    # smoke: 3 + 3 steps, checkpoints every 2 steps and at each phase end; the data-driven codebook
    # initialisation draws random numbers at step 0, which the resumed run must not repeat. Exactness is checked in
    # fp32 (auto would be bf16 on a CPU with bf16 instructions).
    exact = ("pretrain.image_log_every=100", "pretrain.codebook_init=data", "pretrain.precision=fp32", *TINY)
    params = smoke_params(*exact)

    def outputs(name):
        d = tmp_path / name
        return dict(out=d / "wm", checkpoints=d / "ckpt", metrics_path=d / "m.json", curve_path=d / "c.csv")

    straight = outputs("straight")
    pretrain(params, clips, episodes, **straight)
    interrupted = outputs("interrupted")
    # Killed one step into phase 2: the last checkpoint is phase 1's end, so phase 2's first step is redone.
    with pytest.raises(Killed):
        pretrain(params, clips, episodes, **interrupted, on_step=kill_at(4))
    assert not (interrupted["out"] / "world_model.pt").exists()
    (run_dir,) = interrupted["checkpoints"].glob("run-*")  # one folder per training configuration
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    # A second kill inside phase 2 after a fresh checkpoint, then the final resume.
    with pytest.raises(Killed):
        pretrain(params, clips, episodes, **interrupted, on_step=kill_at(5))
    metrics = pretrain(params, clips, episodes, **interrupted)
    assert metrics["resumed"] and metrics["mlflow_run_id"] == run_id
    assert metrics["precision"] == "fp32" and metrics["compile"] is False

    a, _ = load_world_model(straight["out"])
    b, _ = load_world_model(interrupted["out"])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs after resume"

    def losses(path):
        with open(path) as fh:
            return [(r["step"], r["phase"], r["loss"], r["kl"], r["mmd"]) for r in csv.DictReader(fh)]

    assert losses(straight["curve_path"]) == losses(interrupted["curve_path"])
    assert [int(r[0]) for r in losses(straight["curve_path"])] == [1, 2, 3, 4, 5, 6]

    import mlflow

    run = mlflow.tracking.MlflowClient(mlflow_store).get_run(run_id)
    assert run.data.tags["veorl.stage"] == "pretrain" and run.data.tags["veorl.resumed"] == "true"
    assert run.data.params["pretrain.precision"] == "fp32" and run.data.params["pretrain.precision_resolved"] == "fp32"
    history = mlflow.tracking.MlflowClient(mlflow_store).get_metric_history(run_id, "phase2/loss")
    assert sorted({m.step for m in history}) == [4, 5, 6]

    # Changing the maths (not the step counts) trains from scratch in a folder of its own, leaving the old run intact.
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    other = pretrain(
        smoke_params(*exact, "pretrain.optim.lr=0.01"),
        clips,
        episodes,
        **interrupted,
    )
    assert not other["resumed"] and other["mlflow_run_id"] != run_id
    assert len(list(interrupted["checkpoints"].glob("run-*"))) == 2
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    # Resuming straight from a checkpoint of another configuration is still refused, naming the key.
    (other_dir,) = set(interrupted["checkpoints"].glob("run-*")) - {run_dir}
    with pytest.raises(CheckpointMismatch, match="pretrain.optim.lr"):
        assert_resumable(
            CheckpointManager(run_dir).load_latest()["config"],
            CheckpointManager(other_dir).load_latest()["config"],
            where="test",
        )
    # Extending training continues from the checkpoint instead of starting over.
    longer = pretrain(
        smoke_params(*exact, "pretrain.phase2_steps=4"),
        clips,
        episodes,
        **interrupted,
    )
    assert longer["updates"] == {"phase1": 3, "phase2": 4}


def test_stage_run_nesting_resume_and_status(tmp_path, mlflow_store, monkeypatch):
    import mlflow

    from veorl import tracking

    params = smoke_params()
    client = mlflow.tracking.MlflowClient(mlflow_store)
    mlflow.set_tracking_uri(mlflow_store)
    parent = client.create_run(tracking.ensure_experiment(params.tracking.experiment, mlflow_store)).info.run_id
    monkeypatch.setenv("VEORL_PARENT_RUN_ID", parent)
    with tracking.stage_run("unit", params, run_dir=tmp_path, sections=("pretrain",), upstream={"data": "abc"}) as run:
        tracking.log_metrics({"x": 1.0, "bad": float("nan")}, step=0)
        tracking.log_image(np.zeros((8, 8, 3), np.uint8), "figures/blank")
    first = client.get_run(run.run_id)
    assert first.info.status == "FINISHED" and first.data.tags["mlflow.parentRunId"] == parent
    assert first.data.tags["upstream.data"] == "abc" and first.data.params["pretrain.optim.lr"] == str(
        params.pretrain.optim.lr
    )
    assert "x" in first.data.metrics and "bad" not in first.data.metrics
    assert [a.path for a in client.list_artifacts(run.run_id, "figures")] == ["figures/blank.png"]
    with pytest.raises(ValueError):
        with tracking.stage_run(
            "unit", smoke_params("pretrain.phase1_steps=9"), run_dir=tmp_path, sections=("pretrain",)
        ) as again:
            raise ValueError("boom")
    assert again.run_id == run.run_id and again.resumed
    resumed = client.get_run(run.run_id)
    assert resumed.info.status == "FAILED" and resumed.data.tags["resumed_with.pretrain.phase1_steps"] == "9"
    artifact_root = first.info.artifact_uri
    assert artifact_root.startswith((tmp_path / "mlartifacts").as_uri())


def test_cli_smoke_run_and_rerun(dataset, tmp_path, mlflow_store):
    clips, episodes = dataset
    out, ckpt = tmp_path / "wm", tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "components.pretrain",
        "--clips",
        str(clips),
        "--episodes",
        str(episodes),
        "--out",
        str(out),
        "--checkpoints",
        str(ckpt),
        "--metrics",
        str(tmp_path / "metrics" / "pretrain.json"),
        "--curve",
        str(tmp_path / "metrics" / "curve.csv"),
        "--params",
        str(tmp_path / "absent.yaml"),
        "--preset",
        "smoke",
        "--set",
        "pretrain.threads=1",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pretrain phase1" in done.stderr  # progress bar on stderr
    model, meta = load_world_model(out)
    assert bool(model.behaviour_frozen) and meta["model_config"]["cnn_depth"] == 16
    prov = json.loads((out / "provenance.json").read_text())
    assert set(prov["upstream"]) == {"video_clips", "target_episodes"} and prov["code_version"]
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["updates"] == {"phase1": 3, "phase2": 3}
    assert math.isfinite(metrics["phase2"]["loss"]) and metrics["throughput"]["phase1"]["updates_per_s"] > 0
    assert 1.0 <= metrics["codebook_perplexity"] <= 16
    assert prov["content_hash"] == artifact_hash(out) == tree_hash(out, exclude=("provenance.json",))

    import mlflow

    client = mlflow.tracking.MlflowClient(mlflow_store)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["veorl.stage"] == "pretrain"
    assert {"phase1/image_nll", "phase1/vq_loss", "phase2/fbc_loss", "phase2/time/update_s"} <= set(run.data.metrics)
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures/phase2")}
    assert any("open_loop" in f for f in figures) and any("codebook_usage" in f for f in figures)
    assert any(a.path.endswith("world_model.pt") for a in client.list_artifacts(run.info.run_id, "video_world_model"))

    # Re-running the same command after completion resumes (nothing left to train) into the same run.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "metrics" / "pretrain.json").read_text())["mlflow_run_id"] == run.info.run_id
    experiments = client.search_runs([run.info.experiment_id])
    assert len(experiments) == 1


def test_cli_reports_bad_inputs(tmp_path, capsys, mlflow_store, clip_builder, episode_builder):
    from components.pretrain import main

    clips, episodes = clip_builder(clips=2, window=6), episode_builder(episodes=1, length=12)
    code = main(
        [
            "--clips",
            str(tmp_path / "nowhere"),
            "--episodes",
            str(episodes),
            "--out",
            str(tmp_path / "o"),
            "--params",
            str(tmp_path / "absent.yaml"),
            "--preset",
            "smoke",
        ]
    )
    assert code == 2 and "manifest.json not found" in capsys.readouterr().err
    # smoke wants 8-frame source clips, these have 6.
    code = main(
        [
            "--clips",
            str(clips),
            "--episodes",
            str(episodes),
            "--out",
            str(tmp_path / "o"),
            "--params",
            str(tmp_path / "absent.yaml"),
            "--preset",
            "smoke",
        ]
    )
    assert code == 2 and "source_len" in capsys.readouterr().err
