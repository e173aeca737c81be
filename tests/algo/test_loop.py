"""The training loop on tiny fake trainers: curve columns and window means, timing, non-finite detection,
checkpoint/resume (exact, also with a row's window open across a checkpoint) and phase bookkeeping."""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from veorl.algo.loop import NonFiniteLoss, Phase, Trainer, TrainingLoop, detached, reseed, scalar_fields, write_curve
from veorl.checkpoint import CheckpointManager, CheckpointMismatch


@dataclass(frozen=True)
class FakeLosses:
    loss: torch.Tensor
    step_value: torch.Tensor  # the batch's step + 1: its window mean is known exactly
    noise: torch.Tensor | None = None  # drawn from torch's RNG: shows the per-update reseeding
    grad_norm: torch.Tensor | None = None


class FakeTrainer(Trainer):
    """A linear regression whose update also depends on torch's RNG (so an inexact resume would show)."""

    def __init__(self, name: str, model: nn.Linear, nan_at: int | None = None, noisy: bool = True):
        self.name, self.model, self.nan_at, self.noisy = name, model, nan_at, noisy
        self.optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        self.updates = 0
        self.first_batch = None

    def before_first_update(self, batch):
        self.first_batch = batch["step"].clone()

    def losses(self, batch) -> FakeLosses:
        x = batch["x"]
        noise = torch.randn(()) if self.noisy else None
        error = self.model(x).squeeze(-1) - x.sum(-1) + (0.1 * noise if noise is not None else 0.0)
        loss = error.square().mean()
        if self.nan_at is not None and int(batch["step"]) + 1 == self.nan_at:
            loss = loss * float("nan")
        return FakeLosses(loss=loss, step_value=batch["step"].float() + 1, noise=noise)

    def update(self, batch) -> FakeLosses:
        losses = self.losses(batch)
        self.optimizer.zero_grad()
        losses.loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.optimizer.step()
        self.updates += 1
        return replace(detached(losses), grad_norm=grad)

    def extra_metrics(self):
        return {"updates_so_far": float(self.updates)}

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]


class SecondTrainer(FakeTrainer):
    """A later phase with other metrics (a column that appears only later in the curve)."""

    def update(self, batch):
        out = super().update(batch)
        return SecondLosses(loss=out.loss, other=out.loss * 2)


@dataclass(frozen=True)
class SecondLosses:
    loss: torch.Tensor
    other: torch.Tensor


def batches(seed: int):
    def make(step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, step])
        return {"x": rng.normal(size=(8, 3)).astype(np.float32), "step": np.array(step)}

    return make


def make_loop(
    tmp_path: Path | None,
    steps=(5, 4),
    log_every=2,
    checkpoint_every=3,
    on_step=None,
    nan_at=None,
    upstream=None,
    config=None,
):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    phases = [
        Phase("first", steps[0], lambda: FakeTrainer("first", model, nan_at), batches(1), samples_per_update=8),
        Phase("second", steps[1], lambda: SecondTrainer("second", model), batches(2), samples_per_update=8),
    ]
    loop = TrainingLoop(
        "unit",
        phases,
        seed=3,
        config=config or {"unit": {"lr": 0.05}},
        upstream=upstream or {"data": "a"},
        checkpoints=tmp_path,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        prefetch=1,
        progress=False,
        on_step=on_step,
    )
    return loop, model


class Killed(KeyboardInterrupt):
    pass


def kill_at(step: int):
    def hook(global_step: int) -> None:
        if global_step == step:
            raise Killed(step)

    return hook


def test_curve_rows_are_window_means_with_one_column_per_metric(tmp_path):
    loop, _ = make_loop(None)
    result = loop.run()
    curve = result.curve
    # first: rows at phase steps 2, 4 and 5 (the end); second: 2 and 4. Global steps continue across phases.
    assert [(r["step"], r["phase"], r["phase_step"]) for r in curve] == [
        (2, "first", 2),
        (4, "first", 4),
        (5, "first", 5),
        (7, "second", 2),
        (9, "second", 4),
    ]
    # step_value is the update's step + 1: each row holds the mean over the updates since the previous row.
    assert [r["step_value"] for r in curve if r["phase"] == "first"] == [1.5, 3.5, 5.0]
    assert all("step_value" not in r and "other" in r for r in curve if r["phase"] == "second")
    assert curve[-1]["updates_so_far"] == 4.0
    path = tmp_path / "curve.csv"
    write_curve(path, curve)
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    header = list(rows[0])
    assert header[:3] == ["step", "phase", "phase_step"]
    # every metric ever logged has its column, including one that only the later phase logs
    assert {"loss", "step_value", "noise", "grad_norm", "updates_so_far", "other"} <= set(header)
    assert rows[0]["other"] == "" and rows[-1]["step_value"] == "" and float(rows[-1]["other"]) > 0
    assert len(header) == len(set(header))


def test_timing_sections_and_throughput_are_reported():
    loop, _ = make_loop(None)
    result = loop.run()
    for row in result.curve:
        for section in ("sample", "update", "log", "checkpoint"):
            assert row[f"time/{section}_s"] >= 0
        assert row["time/update_s"] > 0 and row["throughput/updates_per_s"] > 0
        assert row["throughput/samples_per_s"] == pytest.approx(8 * row["throughput/updates_per_s"])
    summary = result.summary()
    assert summary["updates"] == {"first": 5, "second": 4} and summary["throughput"]["first"]["updates_per_s"] > 0
    assert summary["first"]["step_value"] == 5.0 and "phase" not in summary["first"]


def test_before_first_update_sees_step_zero_only():
    trainers = []
    torch.manual_seed(0)
    model = nn.Linear(3, 1)

    def build():
        trainers.append(FakeTrainer("first", model))
        return trainers[-1]

    TrainingLoop("unit", [Phase("first", 3, build, batches(1))], seed=0, config={}, upstream={}, progress=False).run()
    assert len(trainers) == 1 and int(trainers[0].first_batch) == 0


def test_non_finite_loss_stops_training_before_a_checkpoint_and_names_the_step(tmp_path):
    loop, _ = make_loop(tmp_path, log_every=10, checkpoint_every=1, nan_at=3)
    with pytest.raises(NonFiniteLoss, match=r"unit first step 3: non-finite loss") as info:
        loop.run()
    assert "step_value=3" in str(info.value)
    # the diverged model was never checkpointed: the last checkpoint is the update before
    assert CheckpointManager(tmp_path).load_latest()["progress"] == {"first": 2, "second": 0}


def test_resume_after_kills_equals_the_uninterrupted_run(tmp_path):
    straight_loop, straight_model = make_loop(tmp_path / "straight")
    straight = straight_loop.run()
    # Checkpoints every 3 updates and rows every 2: the checkpoints at global steps 3 and 6 hold half a window.
    for step in (4, 7):
        loop, _ = make_loop(tmp_path / "killed", on_step=kill_at(step))
        with pytest.raises(Killed):
            loop.run()
    loop, model = make_loop(tmp_path / "killed")
    resumed = loop.run()
    assert resumed.resumed and not straight.resumed
    for a, b in zip(straight_model.parameters(), model.parameters()):
        assert torch.equal(a, b)

    def values(curve):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in curve]

    assert values(resumed.curve) == values(straight.curve)
    saved = CheckpointManager(tmp_path / "killed").load_latest()
    # only what is read back
    assert set(saved) == {
        "format",
        "stage",
        "config",
        "upstream",
        "progress",
        "trainers",
        "curve",
        "window",
        "elapsed",
        "mlflow_run_id",
    }
    assert list(saved["trainers"]) == ["second"]


def test_reseeding_makes_each_update_independent_of_what_ran_before():
    reseed(3, "first", 7)
    a = torch.rand(4)
    torch.rand(100)
    reseed(3, "first", 7)
    assert torch.equal(torch.rand(4), a)
    for other in ((4, "first", 7), (3, "second", 7), (3, "first", 8)):
        reseed(*other)
        assert not torch.equal(torch.rand(4), a)


def test_resume_refuses_other_maths_or_inputs(tmp_path):
    loop, _ = make_loop(tmp_path, on_step=kill_at(2), checkpoint_every=1)
    with pytest.raises(Killed):
        loop.run()
    with pytest.raises(CheckpointMismatch, match="unit.lr"):
        make_loop(tmp_path, config={"unit": {"lr": 0.5}})[0].run()
    with pytest.raises(CheckpointMismatch, match="inputs differ"):
        make_loop(tmp_path, upstream={"data": "b"})[0].run()


def test_an_earlier_phase_is_not_extended_once_a_later_one_started(tmp_path):
    loop, _ = make_loop(tmp_path, on_step=kill_at(7), checkpoint_every=1)
    with pytest.raises(Killed):
        loop.run()
    longer, _ = make_loop(tmp_path, steps=(8, 4), checkpoint_every=1)
    result = longer.run()
    assert result.progress == {"first": 5, "second": 4}
    assert [r["step"] for r in result.curve if r["phase"] == "second"] == [7, 9]
    # ... while a phase that is still the last one started may be extended
    more, _ = make_loop(tmp_path, steps=(8, 6), checkpoint_every=1)
    assert more.run().progress == {"first": 5, "second": 6}


def test_scalar_fields_rejects_what_is_not_a_losses_dataclass():
    with pytest.raises(TypeError):
        scalar_fields({"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="scalar"):
        scalar_fields(SecondLosses(loss=torch.ones(2), other=torch.tensor(1.0)))
    fields = scalar_fields(FakeLosses(loss=torch.tensor(1.0), step_value=torch.tensor(2.0)))
    assert set(fields) == {"loss", "step_value"}  # None fields (terms turned off) are left out
