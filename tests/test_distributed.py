"""Multi-process training (veorl.distributed): two CPU processes under torchrun (gloo) on the smoke preset.

The ranks run tests/distributed_worker.py, which pretrains and fine-tunes through the stages' own drivers and
records per rank a hash of each entry of the trainer state, and the loss of its own batch at every update.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import write_clips, write_episodes
from tests.distributed_worker import KILLED_EXIT
from veorl import distributed

REPO = Path(__file__).resolve().parents[1]
KILL_AT = 5  # global step of fine-tuning: after the policy phase's checkpoint at its step 2
# Counted per rank for the figures, which only rank 0 draws (it reads the codes of its own batches).
RANK_LOCAL = {"figure_usage"}
RUNS = ("straight", "single")


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in distributed.ENV_KEYS:  # the test itself may run under a launcher
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH")) if p)
    env.update(
        OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlruns.db'}", MLFLOW_DISABLE_TELEMETRY="true"
    )
    env.pop("VEORL_PARENT_RUN_ID", None)
    return env


def _worker(tmp: Path, *args: str, processes: int | None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes else [sys.executable]), "-m", "tests.distributed_worker"]
    command += ["--data", str(tmp / "data"), "--out", str(tmp / "runs"), *args]
    return subprocess.run(command, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """straight: 2 processes, uninterrupted; killed: 2 processes stopped after fine-tuning step KILL_AT and run
    again by a second torchrun; single: the same command as one process."""
    tmp = tmp_path_factory.mktemp("distributed")
    write_clips(tmp / "data" / "video_clips", clips=6, window=12)
    write_episodes(tmp / "data" / "target_episodes", length=40)
    first = _worker(tmp, "--name", "straight", "--name", "killed", "--kill", str(KILL_AT), processes=2)
    assert first.returncode != 0, first.stderr[-3000:]
    assert f"exitcode  : {KILLED_EXIT}" in first.stderr, first.stderr[-3000:]
    assert not (tmp / "runs" / "killed" / "agent" / "agent.json").exists()
    again = _worker(tmp, "--name", "killed", processes=2)
    assert again.returncode == 0, again.stderr[-3000:]
    single = _worker(tmp, "--name", "single", processes=None)
    assert single.returncode == 0, single.stderr[-3000:]
    return tmp / "runs"


def _report(runs: Path, name: str, rank: int) -> dict:
    return json.loads((runs / name / f"rank-{rank}.json").read_text())


def _shared(state: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in state.items() if k not in RANK_LOCAL}


def test_ranks_hold_identical_weights_and_optimiser_states(runs):
    for name in ("straight", "killed"):
        zero, one = _report(runs, name, 0), _report(runs, name, 1)
        assert (zero["world_size"], zero["rank"], one["rank"]) == (2, 0, 1)
        for stage in ("pretrain", "finetune"):
            assert _shared(zero[stage]["state"]) == _shared(one[stage]["state"]), (name, stage)
            assert "model" in zero["pretrain"]["state"] and "actor" in zero["finetune"]["state"]


def test_each_rank_trains_on_its_own_batches(runs):
    zero, one = _report(runs, "straight", 0), _report(runs, "straight", 1)
    for stage, phase in (("pretrain", "phase1"), ("pretrain", "phase2"), ("finetune", "world_model")):
        assert zero[f"{stage}_losses"][phase] != one[f"{stage}_losses"][phase], phase


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_uninterrupted_result(runs):
    for rank in (0, 1):
        straight, killed = _report(runs, "straight", rank), _report(runs, "killed", rank)
        assert killed["finetune"]["resumed"] and not straight["finetune"]["resumed"]
        assert killed["finetune"]["updates"] == straight["finetune"]["updates"] == {"world_model": 3, "policy": 3}
        # the re-run took only the update after the checkpoint at step KILL_AT
        assert len(killed["finetune_losses"]["policy"]) == 1
        for stage in ("pretrain", "finetune"):
            assert _shared(killed[stage]["state"]) == _shared(straight[stage]["state"]), (rank, stage)
    assert (runs / "killed" / "agent" / "agent.json").is_file()


def test_two_processes_differ_from_one_only_by_the_second_rank_s_batches(runs):
    zero, one, single = (_report(runs, n, r) for n, r in (("straight", 0), ("straight", 1), ("single", 0)))
    assert single["world_size"] == 1
    # Before any update the weights are the same everywhere: rank 0's first batch and noise are a single process's.
    assert zero["pretrain_losses"]["phase1"][0] == single["pretrain_losses"]["phase1"][0]
    assert one["pretrain_losses"]["phase1"][0] != single["pretrain_losses"]["phase1"][0]
    # The curve (written by rank 0) averages the ranks: it describes the global batch of 2 x pretrain.batch.
    with open(runs / "straight" / "pretrain_curve.csv") as fh:
        first = next(csv.DictReader(fh))
    mean = (zero["pretrain_losses"]["phase1"][0] + one["pretrain_losses"]["phase1"][0]) / 2
    assert float(first["loss"]) == pytest.approx(mean, rel=1e-6)
    # Averaged gradients of a larger batch: other weights, trained for the same number of updates.
    assert zero["pretrain"]["state"]["model"] != single["pretrain"]["state"]["model"]
    assert zero["finetune"]["updates"] == single["finetune"]["updates"]
    # A different global batch is a different training configuration: a checkpoint folder of its own.
    folders = {n: sorted(p.name for p in (runs / n / "checkpoints" / "pretrain").glob("run-*")) for n in RUNS}
    assert len(folders["straight"]) == len(folders["single"]) == 1 and folders["straight"] != folders["single"]
    # Only rank 0 wrote: one agent, one metrics file, one MLflow run id per stage.
    summary = json.loads((runs / "straight" / "finetune.json").read_text())
    assert summary["updates"] == {"world_model": 3, "policy": 3}


def test_the_stage_flags_pass_through_torchrun_unchanged():
    """torchrun's own parser must not swallow or reject a component flag (argparse prefix matching)."""
    from torch.distributed.run import get_args_parser

    from components import finetune, pretrain

    launcher = get_args_parser()
    for component in (pretrain, finetune):
        flags = [s for a in component.build_parser()._actions for s in a.option_strings if s not in ("-h", "--help")]
        for flag in flags:
            args = launcher.parse_args(["--nproc_per_node=2", "-m", component.__name__, flag, "x"])
            assert args.training_script_args == [flag, "x"], flag
