"""The one training loop of pretraining (phases "phase1", "phase2") and fine-tuning ("world_model", "policy",
or "bc" for the behaviour-cloning baseline).

A stage is a list of `Phase`s run one after the other. Each phase builds its `Trainer` when it is reached
and takes `steps` updates on batches from `batches(step)`. The loop owns everything around the updates:

- batches come through `veorl.data.samplers.Prefetcher` (built ahead in a thread, moved to the device);
- timing per section: waiting for the batch (`time/sample_s`), the update (`time/update_s`), logging and
  figures (`time/log_s`), checkpoints (`time/checkpoint_s`), each as seconds per update over the window,
  and throughput (`throughput/updates_per_s`, `throughput/samples_per_s`). Time spent writing a row counts
  in the next row. On a GPU, kernels run asynchronously: their time appears where the host next waits
  for them (usually `time/log_s`, when a row's values are read);
- one curve: a row every `log_every` updates and at the end of a phase, with `step, phase, phase_step`
  and then every metric ever logged (`write_curve`). Every metric column means one thing: the mean
  over the updates since the previous row. Metrics stay detached device tensors until a row is written,
  so an update costs no host-device synchronisation;
- non-finite metrics are caught when a row is written and before every checkpoint (so no checkpoint ever
  holds a diverged model), with the stage, phase, step and metrics of the first bad update;
- exact resume: before each update torch is reseeded from (seed, phase, step) (`reseed`), and every batch
  is a pure function of (seed, stream, step) (the samplers), so a resumed run takes the very updates an
  uninterrupted run takes. Checkpoints (`checkpoint_every` and at the end of each phase) hold only what is
  read back: the config and upstream hashes (a mismatch refuses to resume), the progress of each phase,
  the state of the phase in progress (its trainer's state_dict holds every weight the stage has trained
  so far, see `Trainer.state_dict`), the curve and the open window of the next row, elapsed seconds, and
  the MLflow run id (when the run it names is gone, the curve so far is logged again to the new run);
- a progress bar on stderr (tqdm), and `on_step(global_step)` after each update (tests simulate kills).

Under torchrun with several processes (veorl.distributed) every rank runs this loop: each reseeds with its rank
too, rows average the ranks' metrics, a non-finite update on any rank stops all of them, only rank 0 writes
checkpoints, MLflow metrics and the progress bar, and every rank resumes from the checkpoint (checking that all
found the same one).

Global steps number the updates of all phases in order: phase k's step 0 is global step
sum(steps of phases before k). Once a later phase has started, an earlier one cannot be extended.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import io
import logging
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veorl import acceleration, distributed, tracking
from veorl.checkpoint import CheckpointManager, CheckpointMismatch, assert_resumable
from veorl.data.samplers import Prefetcher
from veorl.runtime import MemoryBound
from veorl.storage import atomic_path

log = logging.getLogger(__name__)

CURVE_KEYS = ("step", "phase", "phase_step")
TIME_SECTIONS = ("sample", "update", "log", "checkpoint")
CHECKPOINT_FORMAT = 2
REPORT_EVERY_S = 30.0  # progress lines in the log when no progress bar is shown


class NonFiniteLoss(FloatingPointError):
    """A loss or metric became NaN or infinite; the message names the stage, phase, step and metrics."""


# ------------------------------------------------------------------------------------------------
# The trainer interface
# ------------------------------------------------------------------------------------------------


class Trainer(abc.ABC):
    """One phase's optimisation: `update(batch)` takes one step and returns its losses.

    `update` returns a frozen dataclass whose fields are scalar tensors (None for a term that is off in
    this configuration; the same fields on every update). The loop turns them into floats, at log time only.

    `state_dict` holds everything needed to continue this phase from where it is: the weights of every
    module the phase reads or trains (also the frozen ones it inherited from earlier phases) and its own
    optimiser states and counters. A checkpoint stores only the state of the phase in progress.

    `precision` (resolved: fp32 | bf16, set by the constructor from the stage's setting) is what the forward
    passes of `update` (and of `losses`, where a trainer has it) run in: `with self.autocast():` around them,
    losses and optimiser steps in fp32 (veorl.acceleration).
    """

    name: str = ""
    precision: str = "fp32"
    autocast_device: torch.device = torch.device("cpu")

    def autocast(self):
        """The region the trainer's forward passes run in: bf16 autocast with precision bf16, nothing with fp32."""
        return acceleration.autocast(self.precision, self.autocast_device)

    @abc.abstractmethod
    def update(self, batch: Any) -> Any:
        """One optimisation step; a frozen dataclass of detached scalar tensors."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def before_first_update(self, batch: Any) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """Called once, with the batch of step 0, right before the phase's first update (after reseeding)."""

    def extra_metrics(self) -> dict[str, float]:
        """Metrics that are not per-update means (e.g. codebook usage since the last row), added to each row."""
        return {}

    def figures(self, batch: Any) -> dict[str, Any]:
        """Images ((H, W, 3) arrays) or matplotlib figures to log, by name; called only with an MLflow run."""
        return {}


def scalar_fields(losses: Any) -> dict[str, torch.Tensor | float]:
    """The named scalar values of a losses dataclass, None fields left out (turned off in this configuration)."""
    if not dataclasses.is_dataclass(losses) or isinstance(losses, type):
        raise TypeError(f"a trainer's update must return a losses dataclass, got {type(losses).__name__}")
    out: dict[str, torch.Tensor | float] = {}
    for f in dataclasses.fields(losses):
        value = getattr(losses, f.name)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{type(losses).__name__}.{f.name} must be a scalar, got shape {tuple(value.shape)}")
        elif not isinstance(value, (int, float)):
            raise TypeError(
                f"{type(losses).__name__}.{f.name} must be a scalar tensor or number, got {type(value).__name__}"
            )
        out[f.name] = value
    return out


def detached(losses: Any) -> Any:
    """A copy of a losses dataclass whose tensors carry no graph (what `update` returns)."""
    return dataclasses.replace(
        losses, **{k: v.detach() for k, v in scalar_fields(losses).items() if isinstance(v, torch.Tensor)}
    )


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def reseed(seed: int, phase: str, step: int, rank: int = 0) -> None:
    """Seed torch (CPU and CUDA) for one update from (seed, phase, step) alone, so a resumed run draws the
    noise an uninterrupted run draws at that step, whatever ran before it in this process. Each rank of a
    multi-process run draws its own noise for its own batch; rank 0 draws what a single process draws."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(phase.encode()), int(step)] + ([int(rank)] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    torch.manual_seed((int(state[0]) << 31) ^ int(state[1]))


# ------------------------------------------------------------------------------------------------
# Windows of metrics and the curve
# ------------------------------------------------------------------------------------------------


class MetricWindow:
    """Sums of one phase's metrics since the last curve row.

    The sums stay a tensor on the device; so do the step and values of the first non-finite update, so
    that `add` never waits for the device. `means` reads everything back at once.
    """

    def __init__(self) -> None:
        self.keys: tuple[str, ...] | None = None
        self.total: torch.Tensor | None = None
        self.updates = 0
        self.seconds: dict[str, float] = dict.fromkeys(TIME_SECTIONS, 0.0)
        self._bad_step: torch.Tensor | None = None
        self._bad_values: torch.Tensor | None = None

    def add(self, metrics: Mapping[str, torch.Tensor | float], step: int) -> None:
        keys = tuple(metrics)
        if self.keys is not None and keys != self.keys:
            raise ValueError(f"the trainer returned other metrics than before: {list(keys)} vs {list(self.keys)}")
        device = next((v.device for v in metrics.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        values = torch.stack(
            [
                v.detach().reshape(()).to(device=device, dtype=torch.float32)
                if isinstance(v, torch.Tensor)
                else torch.full((), float(v), device=device)
                for v in metrics.values()
            ]
        )
        if self.total is None:
            self.keys, self.total = keys, values
            self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
            self._bad_values = torch.zeros_like(values)
        else:
            self.total = self.total + values
        first_bad = ~torch.isfinite(values).all() & (self._bad_step < 0)
        self._bad_step = torch.where(first_bad, torch.full_like(self._bad_step, step), self._bad_step)
        self._bad_values = torch.where(first_bad, values, self._bad_values)
        self.updates += 1

    def add_seconds(self, section: str, seconds: float) -> None:
        self.seconds[section] += seconds

    def average_ranks(self) -> None:
        """Before a row of a multi-process run (no-op in a single process): the sums become the means over
        ranks of each rank's sums, so the row describes the global batch. Times stay this rank's own."""
        if distributed.active() and self.total is not None:
            distributed.mean_(self.total)

    def check_finite(self, where: str) -> None:
        """Raise NonFiniteLoss naming the first update of the window whose metrics were not all finite."""
        if self._bad_step is None:
            return
        step = int(self._bad_step)
        if distributed.active():
            # Gradients are averaged, so one rank's NaN reaches every rank's weights: all ranks stop together.
            anywhere = int(distributed.max_(self._bad_step.clone()))
            if step < 0 and anywhere >= 0:
                raise NonFiniteLoss(f"{where} step {anywhere}: non-finite metrics on another rank")
        if step >= 0:
            values = dict(zip(self.keys, self._bad_values.tolist()))
            bad = [k for k, v in values.items() if not np.isfinite(v)]
            raise NonFiniteLoss(
                f"{where} step {step}: non-finite {', '.join(bad)} "
                f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())})"
            )

    def means(self, samples_per_update: int) -> dict[str, float]:
        """Mean of every metric over the window, seconds per update per section, and throughput."""
        row: dict[str, float] = {}
        if self.total is not None:
            row.update(zip(self.keys, (self.total / self.updates).tolist()))
        n = max(self.updates, 1)
        row.update({f"time/{k}_s": v / n for k, v in self.seconds.items()})
        busy = sum(self.seconds.values())
        if busy > 0 and self.updates:
            row["throughput/updates_per_s"] = self.updates / busy
            row["throughput/samples_per_s"] = self.updates * samples_per_update / busy
        return row

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys or ()),
            "total": self.total.tolist() if self.total is not None else None,
            "updates": self.updates,
            "seconds": dict(self.seconds),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> MetricWindow:
        window = cls()
        window.updates = int(state["updates"])
        window.seconds.update(state["seconds"])
        if state["total"] is not None:
            # float32 -> Python float -> float32 is exact, so a resumed row equals the uninterrupted one.
            window.keys = tuple(state["keys"])
            window.total = torch.tensor(state["total"], dtype=torch.float32, device=device)
            window._bad_step = torch.full((), -1, dtype=torch.long, device=device)
            window._bad_values = torch.zeros_like(window.total)
        return window


def curve_columns(rows: list[dict[str, Any]]) -> list[str]:
    """`step, phase, phase_step`, then every other key in the order it first appears."""
    columns = list(CURVE_KEYS)
    seen = set(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def write_curve(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """The learning curve as CSV: one column per metric ever logged; a metric a phase does not log is empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=curve_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.7g}" if isinstance(v, float) else v) for k, v in row.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One phase of a stage: `build()` makes its trainer when the phase is reached (or restored)."""

    name: str
    steps: int
    build: Callable[[], Trainer]
    batches: Callable[[int], Any]  # step -> batch (numpy arrays or tensors), a pure function of the step
    samples_per_update: int = 1  # for throughput/samples_per_s: sequences, frames or imagined states


@dataclass
class LoopResult:
    progress: dict[str, int]
    elapsed: dict[str, float]
    curve: list[dict[str, Any]]
    resumed: bool
    device: str
    samples_per_update: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Updates and seconds per phase, overall throughput per phase and the last curve row of each phase."""
        out: dict[str, Any] = {
            "updates": dict(self.progress),
            "seconds": {k: round(v, 3) for k, v in self.elapsed.items()},
            "resumed": self.resumed,
            "device": self.device,
            "throughput": {},
        }
        for name, done in self.progress.items():
            rows = [r for r in self.curve if r["phase"] == name]
            if rows:
                out[name] = {k: v for k, v in rows[-1].items() if k not in CURVE_KEYS}
            seconds = self.elapsed.get(name, 0.0)
            if done and seconds > 0:
                samples = done * self.samples_per_update.get(name, 1)
                out["throughput"][name] = {
                    "updates_per_s": round(done / seconds, 4),
                    "samples_per_s": round(samples / seconds, 3),
                }
        return out


class TrainingLoop:
    """Runs a stage's phases with prefetch, timing, curve, MLflow metrics and figures, checkpoints and resume."""

    def __init__(
        self,
        stage: str,
        phases: list[Phase],
        *,
        seed: int,
        config: dict[str, Any],
        upstream: dict[str, str],
        checkpoints: str | Path | None = None,
        log_every: int = 1,
        checkpoint_every: int = 1,
        figure_every: int | None = None,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
    ):
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        self.stage, self.phases, self.seed = stage, phases, seed
        self.config, self.upstream = config, dict(upstream)
        self.manager = CheckpointManager(checkpoints) if checkpoints is not None else None
        self.log_every, self.checkpoint_every, self.figure_every = log_every, checkpoint_every, figure_every
        self.prefetch, self.device, self.progress, self.on_step = prefetch, torch.device(device), progress, on_step

    # -- resume ----------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any] | None:
        if self.manager is None:
            log.info("%s: no checkpoint directory, this run cannot be resumed if interrupted", self.stage)
            return None
        saved = self.manager.load_latest()
        if saved is None:
            return None
        where = f"the checkpoint in {self.manager.directory}"
        if saved.get("format") != CHECKPOINT_FORMAT or saved.get("stage") != self.stage:
            raise CheckpointMismatch(
                f"refusing to resume from {where}: it is not a {self.stage} checkpoint of format "
                f"{CHECKPOINT_FORMAT}; delete the directory to train from scratch"
            )
        assert_resumable(saved["config"], self.config, where=where)
        if saved["upstream"] != self.upstream:
            raise CheckpointMismatch(
                f"refusing to resume from {where}: its inputs differ (checkpoint "
                f"{saved['upstream']}, now {self.upstream}); delete the directory to train from "
                f"scratch"
            )
        return saved

    def _agree(self, saved: dict[str, Any] | None) -> None:
        """Every rank read the checkpoint itself; they must all continue from the same one (no-op in one process)."""
        if not distributed.active():
            return
        mine = dict(saved["progress"]) if saved is not None else None
        everyone = distributed.gather_objects(mine)
        if any(p != everyone[0] for p in everyone):
            where = self.manager.directory if self.manager is not None else "no checkpoint directory"
            raise CheckpointMismatch(
                f"{self.stage}: the ranks found different checkpoints in {where} (progress by rank: {everyone}); "
                f"the checkpoint directory must be one folder that every node reads"
            )

    def _totals(self, progress: dict[str, int]) -> dict[str, int]:
        totals = {}
        for i, phase in enumerate(self.phases):
            done = progress.get(phase.name, 0)
            if any(progress.get(p.name, 0) > 0 for p in self.phases[i + 1 :]):
                if phase.steps != done:
                    log.warning(
                        "%s: %s already ended after %d updates and a later phase has started; "
                        "its configured %d updates are ignored",
                        self.stage,
                        phase.name,
                        done,
                        phase.steps,
                    )
                totals[phase.name] = done
            else:
                totals[phase.name] = max(phase.steps, done)
        return totals

    # -- the run ---------------------------------------------------------------------------------

    def run(self, run_id: str | None = None) -> LoopResult:
        from tqdm import tqdm

        saved = self._load()
        self._agree(saved)
        main = distributed.is_main()
        progress = {p.name: 0 for p in self.phases}
        elapsed = {p.name: 0.0 for p in self.phases}
        curve: list[dict[str, Any]] = []
        trainer: Trainer | None = None
        window_state: dict[str, Any] | None = None
        if saved is not None:
            progress.update(saved["progress"])
            elapsed.update(saved["elapsed"])
            curve = list(saved["curve"])
            ((name, state),) = saved["trainers"].items()
            trainer = self._build(name)
            trainer.load_state_dict(state)
            window_state = saved["window"]
            log.info("%s: resumed from %s at %s", self.stage, self.manager.directory, progress)
            if run_id is not None and saved.get("mlflow_run_id") not in (None, run_id):
                log.warning(
                    "%s: the checkpoint's MLflow run %s is gone; logging its %d curve rows to run %s",
                    self.stage,
                    saved["mlflow_run_id"],
                    len(curve),
                    run_id,
                )
                for row in curve:
                    tracking.log_metrics(self._mlflow_metrics(row), step=row["step"])
        totals = self._totals(progress)

        offset = 0
        for phase in self.phases:
            total, done = totals[phase.name], progress[phase.name]
            phase_offset, offset = offset, offset + total
            if done >= total:
                continue
            if trainer is None or trainer.name != phase.name:
                trainer = self._build(phase.name)
            window = MetricWindow()
            if window_state is not None and window_state["phase"] == phase.name:
                window = MetricWindow.from_state(window_state, self.device)
            window_state = None

            last_report = time.monotonic()
            memory = MemoryBound()  # retained free memory (retain_memory) stays within bounds, phase by phase
            bar = tqdm(
                total=total,
                initial=done,
                desc=f"{self.stage} {phase.name}",
                unit="update",
                file=sys.stderr,
                dynamic_ncols=True,
                disable=not (self.progress and main),
            )
            with Prefetcher(phase.batches, done, total, depth=self.prefetch, device=self.device) as batches:
                iterator = iter(batches)
                while True:
                    t0 = time.perf_counter()
                    try:
                        step, batch = next(iterator)
                    except StopIteration:
                        break
                    t1 = time.perf_counter()
                    reseed(self.seed, phase.name, step, distributed.rank())
                    if step == 0:
                        trainer.before_first_update(batch)
                    window.add(scalar_fields(trainer.update(batch)), step + 1)
                    memory.after_update()
                    t2 = time.perf_counter()
                    window.add_seconds("sample", t1 - t0)
                    window.add_seconds("update", t2 - t1)
                    done = progress[phase.name] = step + 1
                    global_step = phase_offset + done
                    last = done == total
                    if done % self.log_every == 0 or last:
                        window.average_ranks()
                        row = {
                            "step": global_step,
                            "phase": phase.name,
                            "phase_step": done,
                            **window.means(phase.samples_per_update),
                        }
                        window.check_finite(f"{self.stage} {phase.name}")
                        row.update(trainer.extra_metrics())
                        window = MetricWindow()
                        curve.append(row)
                        tracking.log_metrics(self._mlflow_metrics(row), step=global_step)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.endswith("loss")}, refresh=False)
                        if not self.progress and (last or time.monotonic() - last_report >= REPORT_EVERY_S):
                            # Without a bar (logs, CI): a line now and then says how far the phase is.
                            last_report = time.monotonic()
                            losses = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.endswith("loss"))
                            log.info(
                                "%s %s: %d/%d updates, %.2f updates/s; %s",
                                self.stage,
                                phase.name,
                                done,
                                total,
                                row.get("throughput/updates_per_s", float("nan")),
                                losses,
                            )
                    if self.figure_every and (done % self.figure_every == 0 or last) and tracking.active_run_id():
                        self._log_figures(trainer, batch, phase.name, global_step)
                    t3 = time.perf_counter()
                    window.add_seconds("log", t3 - t2)
                    if done % self.checkpoint_every == 0 or last:
                        elapsed[phase.name] += t3 - t0
                        self._save(
                            global_step, trainer, window, progress=progress, curve=curve, elapsed=elapsed, run_id=run_id
                        )
                        t4 = time.perf_counter()
                        window.add_seconds("checkpoint", t4 - t3)
                        elapsed[phase.name] += t4 - t3
                    else:
                        elapsed[phase.name] += t3 - t0
                    bar.update(1)
                    if self.on_step is not None:
                        self.on_step(global_step)
            bar.close()
            log.info(
                "%s %s: %d updates, %.1f s in all%s",
                self.stage,
                phase.name,
                progress[phase.name],
                elapsed[phase.name],
                f"; retained free memory returned to the system {memory.releases} times" if memory.releases else "",
            )
        return LoopResult(
            progress=progress,
            elapsed=elapsed,
            curve=curve,
            resumed=saved is not None,
            device=str(self.device),
            samples_per_update={p.name: p.samples_per_update for p in self.phases},
        )

    def _save(
        self,
        global_step: int,
        trainer: Trainer,
        window: MetricWindow,
        *,
        progress: dict[str, int],
        curve: list[dict[str, Any]],
        elapsed: dict[str, float],
        run_id: str | None,
    ) -> None:
        if self.manager is None:
            return
        window.check_finite(f"{self.stage} {trainer.name}")
        if not distributed.is_main():  # every rank holds the same weights; one writes them
            return
        self.manager.save(
            global_step,
            {
                "format": CHECKPOINT_FORMAT,
                "stage": self.stage,
                "config": self.config,
                "upstream": self.upstream,
                "progress": dict(progress),
                "trainers": {trainer.name: trainer.state_dict()},
                "curve": curve,
                "window": {"phase": trainer.name, **window.state_dict()},
                "elapsed": dict(elapsed),
                "mlflow_run_id": run_id,
            },
        )

    def _build(self, name: str) -> Trainer:
        (phase,) = [p for p in self.phases if p.name == name]
        trainer = phase.build()
        if trainer.name != name:
            raise ValueError(f"phase {name!r} built a trainer named {trainer.name!r}")
        return trainer

    @staticmethod
    def _mlflow_metrics(row: dict[str, Any]) -> dict[str, float]:
        return {f"{row['phase']}/{k}": v for k, v in row.items() if k not in CURVE_KEYS}

    @staticmethod
    def _log_figures(trainer: Trainer, batch: Any, phase: str, global_step: int) -> None:
        for name, figure in trainer.figures(batch).items():
            path = f"figures/{phase}/{name}_step{global_step:07d}.png"
            if isinstance(figure, np.ndarray):
                tracking.log_image(figure, path)
            else:
                tracking.log_figure(figure, path)


__all__ = [
    "CHECKPOINT_FORMAT",
    "LoopResult",
    "MetricWindow",
    "NonFiniteLoss",
    "Phase",
    "Trainer",
    "TrainingLoop",
    "curve_columns",
    "detached",
    "reseed",
    "scalar_fields",
    "write_curve",
]
