"""One rank of the multi-process training test (tests/test_distributed.py), started by torchrun.

    torchrun --standalone --nproc_per_node 2 -m tests.distributed_worker --data DIR --out DIR --name A [--name B]
        [--kill K]

Pretrains and fine-tunes on the smoke preset (tiny networks) through the stages' own drivers, as one rank of
the process group torchrun describes, once per --name. Each rank records, in OUT/NAME/rank-R.json: a hash of each
entry of the trainer state (weights, optimiser states, counters) after each stage, what the stage returned, and
the loss of its own batch at each step before gradients are averaged (rank 0's step 1 is a single process's step
1). `--kill K` stops the last run after global step K of fine-tuning, as a killed process would stop (no agent,
the last checkpoint kept), and exits with KILLED_EXIT; running that name again resumes it. With WORLD_SIZE unset
it is one process.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch

from tests.builders import smoke_params
from veorl import distributed
from veorl.algo import loop

TINY = (
    "model.cnn_depth=8",
    "model.deter=32",
    "model.stoch=8",
    "model.hidden=32",
    "pretrain.seq_len=6",
    "pretrain.source_len=6",
    "pretrain.image_log_every=100",
    "pretrain.codebook_init=data",
    "pretrain.checkpoint_every=2",
    "pretrain.log_every=1",
    "pretrain.precision=fp32",
    "pretrain.prefetch=0",
    "finetune.checkpoint_every=2",
    "finetune.log_every=1",
    "finetune.precision=fp32",
    "finetune.prefetch=0",
    "finetune.critic_warmup=1",
)
KILLED_EXIT = 3


class Killed(Exception):
    pass


def state_hash(state: Any) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


class Recorder:
    """Keeps the trainers the loop builds and the local loss of every update (before ranks are averaged)."""

    def __init__(self) -> None:
        self.trainers: list[loop.Trainer] = []
        self.losses: dict[str, list[float]] = {}
        self.original = original = loop.TrainingLoop._build

        def build(this: loop.TrainingLoop, name: str) -> loop.Trainer:
            trainer = original(this, name)
            update = trainer.update

            def recorded(batch: Any) -> Any:
                out = update(batch)
                first = next(iter(loop.scalar_fields(out).values()))
                self.losses.setdefault(name, []).append(float(first))
                return out

            trainer.update = recorded
            self.trainers.append(trainer)
            return trainer

        loop.TrainingLoop._build = build

    def last_state(self) -> dict[str, str]:
        """A hash per entry of the last trainer's state (weights, optimiser states, counters)."""
        return {key: state_hash(value) for key, value in self.trainers[-1].state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", action="append", required=True, help="a run (a folder under --out); repeatable")
    parser.add_argument("--kill", type=int, default=None, help="stop the last run after this step of fine-tuning")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # One process group for every stage and run (each stage would otherwise start and end its own).
    with distributed.session("cpu"):
        for i, name in enumerate(args.name):
            kill = args.kill if i == len(args.name) - 1 else None
            if not train(Path(args.data), Path(args.out) / name, kill):
                return KILLED_EXIT
    return 0


def train(data: Path, out: Path, kill: int | None) -> bool:
    """Pretrain and fine-tune into `out` and write this rank's report; False when stopped by `kill`."""
    from veorl.algo.finetune import finetune
    from veorl.algo.pretrain import pretrain

    params = smoke_params(*TINY)
    recorder = Recorder()
    report: dict[str, Any] = {"world_size": distributed.world_size(), "rank": distributed.rank()}

    def on_step(global_step: int) -> None:
        if global_step == kill:
            raise Killed(f"stopped after step {global_step}")

    try:
        summary = pretrain(
            params,
            data / "video_clips",
            data / "target_episodes",
            out / "world_model",
            checkpoints=out / "checkpoints" / "pretrain",
            metrics_path=out / "pretrain.json",
            curve_path=out / "pretrain_curve.csv",
            progress=False,
        )
        report["pretrain"] = {"state": recorder.last_state(), "updates": summary["updates"]}
        report["pretrain_losses"], recorder.losses = recorder.losses, {}
        summary = finetune(
            str(out / "world_model"),
            str(data / "target_episodes"),
            str(out / "agent"),
            params,
            clips=str(data / "video_clips"),
            checkpoints=str(out / "checkpoints" / "finetune"),
            metrics_path=str(out / "finetune.json"),
            curve_path=str(out / "finetune_curve.csv"),
            progress=False,
            on_step=on_step,
        )
    except Killed:
        return False
    finally:
        loop.TrainingLoop._build = recorder.original
    report["finetune"] = {"state": recorder.last_state(), "updates": summary["updates"], "resumed": summary["resumed"]}
    report["finetune_losses"] = recorder.losses
    path = out / f"rank-{report['rank']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return True


if __name__ == "__main__":
    sys.exit(main())
