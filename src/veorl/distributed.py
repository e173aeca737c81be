"""Multi-process training under torchrun: process group, devices, rank-0 duties, replicated objectives.

    torchrun --nproc_per_node 2 -m components.pretrain --clips ... --episodes ... --out ... --checkpoints ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process; `session` reads them.
With WORLD_SIZE unset or 1 nothing here does anything: there is no process group, every helper returns its input,
and training takes exactly the single-process code path (same maths, same bits).

With WORLD_SIZE > 1 (docs/cluster.md, "Several processes"):
- one process group per stage: gloo on CPU, NCCL on CUDA, each process on `cuda:LOCAL_RANK`;
- every rank builds the same networks from the same seed and samples its own batches (the samplers' streams are
  offset by the rank, rank 0 drawing what a single process draws), so the global batch of an update is the
  per-rank batch times the number of processes, at the same learning rate and number of updates;
- the trained modules of each phase are wrapped in one DistributedDataParallel (`Replicas`), whose forward runs
  the trainer's own loss code: gradients are averaged across ranks during backward, so every rank takes the same
  optimiser steps and the parameters stay identical;
- the few pieces of trainer state computed from a rank's own batch (dead-code restarts, code usage, the return
  normaliser, the ensemble disagreement unit) are combined across ranks or taken from rank 0, see the trainers;
- only rank 0 writes checkpoints, artifacts, metrics files and MLflow runs, and shows progress; every rank reads
  the checkpoint on resume and the ranks check that they resume from the same step.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Environment torchrun (and the Kubeflow Trainer's torch runtime) sets for every process.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, artifacts, metrics and MLflow runs."""
        return self.rank == 0

    def identity(self, config: dict[str, Any]) -> dict[str, Any]:
        """The configuration a stage's checkpoint folder is named after and resumes against. With several processes
        the global batch is per-rank batch x processes, so the count joins it: a run resumes only with as many
        processes, and trains beside the single-process run of the same parameters. One process: `config` as is."""
        return {**config, "distributed": {"processes": self.world_size}} if self.distributed else config

    def params(self, stage: str) -> dict[str, Any]:
        """MLflow parameters describing the processes (none for a single process, whose runs stay as they were)."""
        if not self.distributed:
            return {}
        return {f"{stage}.processes": self.world_size}


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def active() -> bool:
    """A process group of more than one process is running (this process trains as one rank of several)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_main() -> bool:
    return rank() == 0


def device_for(name: str, local_rank: int) -> torch.device:
    """The device of one rank: `cuda:LOCAL_RANK` when training on CUDA, else the named device."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def session(device: str | torch.device) -> Iterator[Context]:
    """The stage's process group (when torchrun started several processes), torn down on exit.

    `device` is the stage's resolved device ("cpu" or "cuda"). A process group the caller already started is
    used as it is and left running. On ranks other than 0 the log shows warnings and errors only.
    """
    wanted = env_world_size()
    if wanted <= 1 and not active():
        yield Context(device=torch.device(device))
        return
    owned = False
    if not torch.distributed.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        target = device_for(str(device), local_rank)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        backend = "nccl" if target.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=TIMEOUT)
        owned = True
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        target = device_for(str(device), local_rank)
    ctx = Context(rank=rank(), world_size=world_size(), local_rank=local_rank, device=target)
    root = logging.getLogger("veorl")
    level = root.level
    if not ctx.is_main:
        root.setLevel(logging.WARNING)
    log.info("%d processes (%s backend); rank 0 on %s", ctx.world_size, torch.distributed.get_backend(), target)
    try:
        yield ctx
    finally:
        root.setLevel(level)
        if owned:
            with contextlib.suppress(Exception):  # a peer that died already makes the barrier fail; exit anyway
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Collectives (each returns its input unchanged in a single process)
# ------------------------------------------------------------------------------------------------


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks, in place."""
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Mean across ranks, in place."""
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


def max_(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum across ranks, in place."""
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor


def mean_float(value: float) -> float:
    """A Python number averaged across ranks."""
    if not active():
        return value
    return float(mean_(torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())))


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s values on every rank, in place."""
    if active():
        torch.distributed.broadcast(tensor, src=src)
    return tensor


def gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's tensor (same shape on all ranks) concatenated along `dim`, in rank order."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable value, in rank order ([value] in a single process)."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _collective_device() -> torch.device:
    if active() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel over the modules a trainer's losses train
# ------------------------------------------------------------------------------------------------


class _Objective(nn.Module):
    """The trained modules under one root (what DDP wraps); forward(fn) runs the trainer's loss code."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        super().__init__()
        self.trained = nn.ModuleDict(dict(modules))
        self.extras: Any = None

    def forward(self, fn: Callable[[], tuple[torch.Tensor, Any]]) -> torch.Tensor:
        loss, self.extras = fn()
        return loss


class Replicas:
    """DistributedDataParallel over modules whose loss is composed by arbitrary trainer code.

    `loss, extras = replicas(fn)` runs `fn() -> (loss, extras)` inside DDP's forward: `loss.backward()` then
    averages the gradients of the wrapped modules across ranks (bucketed, overlapped with the backward).

    The losses of a trainer call many submodules and methods (encoder, BAN, codebook, RSSM filtering...) rather
    than one `forward`, so DDP wraps a root module holding them whose forward is the trainer's loss code. A
    trainer with several optimisers whose losses touch disjoint parameters (actor / critic, Trunk Net / guidance)
    backpropagates their sum once: each parameter gets exactly the gradient of its own loss. `loss` must be the
    one tensor that is backpropagated (extras are returned beside it, outside DDP's view); parameters it does not
    reach (the actor during critic warm-up, a term switched off) are found by `find_unused_parameters`.
    Buffers are not broadcast: every rank builds and updates them identically.
    """

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        self.root = _Objective(modules)
        self.ddp = DistributedDataParallel(
            self.root,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True,
            broadcast_buffers=False,
        )

    def __call__(self, fn: Callable[[], tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
        loss = self.ddp(fn)
        extras, self.root.extras = self.root.extras, None
        return loss, extras


def replicas(modules: Mapping[str, nn.Module | None]) -> Replicas | None:
    """A `Replicas` over the given modules (None entries left out) when training as one of several processes,
    else None: a trainer without replicas takes its single-process path."""
    if not active():
        return None
    present = {name: m for name, m in modules.items() if m is not None}
    device = next((p.device for m in present.values() for p in m.parameters()), torch.device("cpu"))
    return Replicas(present, device)


__all__ = [
    "ENV_KEYS",
    "Context",
    "Replicas",
    "active",
    "barrier",
    "broadcast_",
    "device_for",
    "env_world_size",
    "gather_cat",
    "gather_objects",
    "is_main",
    "max_",
    "mean_",
    "mean_float",
    "rank",
    "replicas",
    "session",
    "sum_",
    "world_size",
]
