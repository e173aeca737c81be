"""Atomic training checkpoints, the resume guard and the checkpoint folder of a training configuration.

A checkpoint is a dict saved with torch.save; what it holds is decided by the training loop
(veorl.algo.loop: config, upstream hashes, progress, the trainer state of the phase in progress, curve).
No global RNG state is saved: the loop reseeds torch before every update from (seed, phase, step) and
batches are a pure function of (seed, stream, step), which is what makes a resume exact.
Files are written to a temporary name and renamed; the `latest` pointer is replaced only after the
file it names is complete, so a kill at any moment leaves a loadable checkpoint behind.
Resuming is refused when the saved config differs in anything that changes the mathematics
(`assert_resumable`); longer training (step counts) and bookkeeping settings may change.
(Method doc: docs/method.md, "Known defects of the release": no resume there.)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from veorl.storage import atomic_torch_save, atomic_write_text
from veorl.trees import flatten

log = logging.getLogger(__name__)

LATEST = "latest"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")

# Settings that may change between an interrupted run and its resumption: how long to train, how
# often to log or checkpoint, where and with how many threads to run, how far to prefetch, whether the networks
# are compiled or phase 3 caches its embeddings (the same maths). Not the precision: the stages record the resolved
# one (fp32 | bf16) in the config they checkpoint, so a bf16 run is never continued in fp32 (or the other way round)
# and each trains in its own folder.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "preset",
    "*.phase1_steps",
    "*.phase2_steps",
    "*.world_model_steps",
    "*.policy_steps",
    "*.bc_steps",
    "*.checkpoint_every",
    "*.log_every",
    "*.snapshot_every",
    "*.image_log_every",
    "*.prefetch",
    "*.device",
    "*.threads",
    "*.compile",
    "*.retain_memory",
    "*.embedding_cache_gb",
)


# Settings added after checkpoints and runs already existed, at the value that reproduces what the code did before
# them. Such a setting at that value is left out of a configuration's identity, so a checkpoint or run recorded
# before it existed is still found and resumed; any other value is a change like any other.
LEGACY_SETTINGS: dict[str, Any] = {
    "domain": "manipulation",
    "*.precision": "fp32",
    "*.compile": False,
    "finetune.pretrained_encoder": True,
    "finetune.snapshot_every": 0,
    "model.ban_horizon": 1,
    "finetune.discount_head": False,
    "evaluate.policy": "mode",
    "finetune.actor_bc_loss": "nll",
    "collect.starts": "seed",
}


def without_legacy(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened configuration without the settings that sit at their pre-existing behaviour."""
    return {
        key: value
        for key, value in flat.items()
        if not any(fnmatch.fnmatchcase(key, pattern) and value == old for pattern, old in LEGACY_SETTINGS.items())
    }


def legacy_value(key: str) -> Any:
    """The value that reproduces what the code did before the setting `key` (flattened) existed; None if none."""
    return next((old for pattern, old in LEGACY_SETTINGS.items() if fnmatch.fnmatchcase(key, pattern)), None)


class CheckpointMismatch(ValueError):
    """The checkpoint was made with a configuration that changes the mathematics of training."""


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], allowed: Iterable[str] = RESUMABLE_CHANGES
) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that differs and is not allowed to change."""
    allowed = tuple(allowed)
    flat_saved, flat_current = without_legacy(flatten(saved)), without_legacy(flatten(current))
    diffs = []
    for key in sorted(set(flat_saved) | set(flat_current)):
        a, b = flat_saved.get(key, "<absent>"), flat_current.get(key, "<absent>")
        if a != b and not any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed):
            diffs.append((key, a, b))
    return diffs


def assert_resumable(
    saved: dict[str, Any],
    current: dict[str, Any],
    where: str = "checkpoint",
    allowed: Iterable[str] = RESUMABLE_CHANGES,
) -> None:
    diffs = config_differences(saved, current, allowed)
    if diffs:
        lines = "\n".join(f"  {key}: checkpoint has {a!r}, now {b!r}" for key, a, b in diffs)
        raise CheckpointMismatch(
            f"refusing to resume from {where}: the configuration differs in settings that change the training maths\n"
            f"{lines}\nRestore those settings to continue, or delete the checkpoint directory to train from scratch."
        )


def run_directory(
    root: str | Path, config: dict[str, Any], upstream: dict[str, str], allowed: Iterable[str] = RESUMABLE_CHANGES
) -> Path:
    """The checkpoint folder of one training configuration and its inputs: `root/run-<hash>`.

    The hash covers every setting that changes the training maths and the content hashes of the inputs
    (`upstream`), but not the resumable settings (step counts, logging, device...). So re-running the same
    command resumes, extending the step counts continues the same run, and a `dvc exp run -S` that changes
    e.g. a learning rate, or a new upstream artifact, trains from scratch in its own folder instead of
    colliding with the old one; switching back to the earlier setting finds its finished checkpoint again.
    """
    allowed = tuple(allowed)
    relevant = {
        k: v for k, v in without_legacy(flatten(config)).items() if not any(fnmatch.fnmatchcase(k, p) for p in allowed)
    }
    identity = {"config": relevant, "upstream": dict(sorted(upstream.items()))}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(root) / f"run-{digest}"


class CheckpointManager:
    """Numbered checkpoint files in `directory`, the newest `keep` retained, and a `latest` pointer."""

    def __init__(self, directory: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:09d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            m = _NAME.match(path.name)
            if m:
                found.append((int(m.group(1)), path))
        return sorted(found)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        atomic_torch_save(final, state)
        atomic_write_text(self.directory / LATEST, final.name + "\n")
        for _, old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def _load(self, path: Path) -> dict[str, Any]:
        # Checkpoints hold only tensors and plain containers (no RNG or numpy objects), so the safe loader
        # suffices: a tampered file cannot run code.
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_latest(self) -> dict[str, Any] | None:
        """The newest readable checkpoint, or None when there is none.

        The `latest` pointer is trusted first; if it is missing or its file is unreadable, the newest
        numbered file that loads is used (and the skip is logged).
        """
        candidates: list[Path] = []
        pointer = self.directory / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            if name:
                candidates.append(self.directory / name)
        candidates += [p for _, p in reversed(self.checkpoints()) if p not in candidates]
        for path in candidates:
            if not path.is_file():
                continue
            try:
                return self._load(path)
            except Exception as exc:  # a corrupt or truncated file: fall back to an older one
                log.warning("skipping unreadable checkpoint %s: %s", path, exc)
        return None


__all__ = [
    "RESUMABLE_CHANGES",
    "CheckpointManager",
    "CheckpointMismatch",
    "assert_resumable",
    "config_differences",
    "run_directory",
]
