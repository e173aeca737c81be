"""Checks every trainer of the training loop must pass (imported by the trainers' tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from veorl.algo.loop import Trainer, scalar_fields


def assert_update_trains_exactly(
    trainer: Trainer,
    batch: Any,
    trained: Iterable[nn.Module],
    stage: nn.Module,
    may_stay: Callable[[str], bool] = lambda name: False,
) -> Any:
    """One update (with a large learning rate, set by the caller) must change every parameter of `trained`
    and no other parameter of `stage` (every module of the stage, trained or not).

    `may_stay(name)` exempts a trained parameter that legitimately gets no gradient from this batch.
    Returns the update's losses, after checking they are a frozen dataclass of finite, detached scalars.
    """
    trained_ids = {id(p) for module in trained for p in module.parameters()}
    named = dict(stage.named_parameters(remove_duplicate=True))
    missing = trained_ids - {id(p) for p in named.values()}
    assert not missing, "`stage` must contain every trained module"
    before = {name: p.detach().clone() for name, p in named.items()}
    losses = trainer.update(batch)

    assert dataclasses.is_dataclass(losses) and type(losses).__dataclass_params__.frozen, type(losses)
    for name, value in scalar_fields(losses).items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad, f"{name} must be a detached tensor"
        assert torch.isfinite(value), f"{name} = {value}"

    still = [n for n, p in named.items() if id(p) in trained_ids and torch.equal(before[n], p) and not may_stay(n)]
    assert not still, f"{trainer.name}: one large-lr update left these trainable parameters untouched: {still}"
    moved = [n for n, p in named.items() if id(p) not in trained_ids and not torch.equal(before[n], p)]
    assert not moved, f"{trainer.name}: parameters outside the phase changed: {moved}"
    return losses
