"""The configuration each Kubeflow step receives, and how KFP's cache follows configuration and data.

The KFP components (pipelines/veorl_pipeline.py) call `components.<step>.run`, the function DVC's stages and
the Docker entry point run; this module only holds what the pipeline adds around it.

One validated document. The `resolve-config` step validates the whole configuration once: params.yaml in the
image, the preset, the pipeline knobs and the overrides, exactly as `load_params` does for DVC. Every step gets
that document restricted to its *stage keys*: the keys the stage reads (STAGE_PARAMS, the `params:` lists of
dvc.yaml, checked against it by the tests) and the keys Params' cross-section checks compare them with
(CROSS_CHECKED). The step rebuilds its Params with `params_for_stage`: the preset's defaults under the
document's keys, then one `Params.model_validate` (through `resolve`). Every field, section and cross-section
check runs again, each comparing the values resolve-config validated; a check that involves none of the stage's
keys compares preset defaults, which agree by construction. Nothing is rebuilt with `model_construct`.

Why not hand every step the whole document: KFP's cache key holds every input of a step (parameters by value,
artifacts by identity), and no input can be marked as payload only. A step given the whole document would
re-run whenever any key changed, ingestion on a `finetune.*` change included. With stage documents the cache
key of a step is its configuration: changing `finetune.*` re-runs finetune, evaluate and register, never
ingestion. The one widening is the price of re-validating: a step also re-runs when a key that its keys are
cross-checked against changes (ingest on `pretrain.source_len`, collect on `source_videos.tasks`).

The domain, like the preset, heads every document: both choose the defaults under the document's keys. Params'
checks between the domain and a section's keys (collect.env, source_videos.env) therefore run on validated
values wherever that section is in a document, and compare the domain's own defaults everywhere else.

Upstream artifacts are followed by content: the component that writes an artifact records its content hash in
its provenance.json once (veorl.storage.record_content_hash), the KFP step returns that recorded hash
(veorl.storage.artifact_hash), and the downstream step takes it as an input parameter, so a changed artifact
invalidates every cached step below it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from veorl.config import ConfigError, Params, load_params, resolve
from veorl.storage import sha256_json

PARAMS_ENV = "VEORL_PARAMS"

# Keys each stage reads: exactly the `params:` lists of dvc.yaml (a section name means the whole section).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "source_videos": ("preset", "domain", "source_videos", "collect.task"),
    "ingest": ("preset", "domain", "ingest"),
    "collect": ("preset", "domain", "collect"),
    "pretrain": ("preset", "domain", "model", "pretrain", "tracking"),
    "finetune": ("preset", "domain", "model", "finetune", "tracking"),
    # evaluation runs on the task, camera and episode length recorded in the agent it is given
    "evaluate": ("preset", "domain", "evaluate", "tracking"),
    "register": ("domain", "register", "tracking"),
}
# Keys every stage document starts with: the preset and the domain pick the defaults under the document's keys.
HEADER_KEYS = ("preset", "domain")

# The keys each cross-section check of Params (veorl.config, `_cross_checks`) compares. A stage document that
# holds one key of a group holds the whole group, so the check runs on validated values, not on defaults.
CROSS_CHECKED: tuple[tuple[str, ...], ...] = (
    ("pretrain.source_len", "ingest.window"),
    ("collect.task", "source_videos.tasks"),
    ("ingest.size", "model.image_size"),
    ("collect.size", "model.image_size"),
)

# Pipeline knobs -> the parameter each one sets (empty knob = keep params.yaml / preset).
KNOBS: dict[str, str] = {
    "domain": "domain",
    "task": "collect.task",
    "algo": "finetune.algo",
    "model_name": "register.model_name",
}


def params_file() -> str:
    """params.yaml the steps start from: $VEORL_PARAMS, else ./params.yaml (the image's WORKDIR holds one)."""
    return os.environ.get(PARAMS_ENV, "params.yaml")


def knob_overrides(knobs: dict[str, Any]) -> list[str]:
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown pipeline knobs {unknown}; known: {sorted(KNOBS)}")
    return [f"{KNOBS[name]}={value}" for name, value in sorted(knobs.items()) if value not in ("", None)]


def _covers(key: str, dotted: str) -> bool:
    """Whether `key` (a section or a dotted key) includes `dotted`."""
    return dotted == key or dotted.startswith(key + ".")


def stage_keys(stage: str) -> tuple[str, ...]:
    """The keys of `stage`'s document: the ones it reads plus every key cross-checked against one of them."""
    keys = [key for key in STAGE_PARAMS[stage] if key not in HEADER_KEYS]
    read = tuple(keys)
    for group in CROSS_CHECKED:
        if any(_covers(key, member) for key in read for member in group):
            keys.extend(member for member in group if not any(_covers(key, member) for key in keys))
    return (*HEADER_KEYS, *keys)


def _select(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def stage_document(params: Params, stage: str) -> str:
    """JSON text of the validated configuration restricted to `stage_keys(stage)` (sorted: equal configurations
    give equal documents, hence equal KFP cache keys)."""
    full = params.model_dump(by_alias=True, mode="json")
    picked: dict[str, Any] = {name: full[name] for name in HEADER_KEYS}
    for key in stage_keys(stage)[len(HEADER_KEYS) :]:
        node = picked
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _select(full, key)
    return json.dumps(picked, sort_keys=True, separators=(",", ":"))


def resolve_stage_documents(preset: str, overrides: list[str], knobs: dict[str, Any]) -> dict[str, str]:
    """Validate the whole configuration once; return each stage's document (see the module docstring)."""
    params = load_params(params_file(), preset=preset or None, overrides=[*knob_overrides(knobs), *overrides])
    return {stage: stage_document(params, stage) for stage in STAGE_PARAMS}


def params_for_stage(document: str) -> Params:
    """A step's Params: the preset's defaults under the document's keys, validated in full (ConfigError if not)."""
    try:
        data = json.loads(document)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"stage configuration is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("preset"), str):
        raise ConfigError("stage configuration must be a JSON object naming its preset")
    return resolve(data, origin="stage configuration")


def checkpoint_dir(checkpoint_root: str, stage: str, *identity: str) -> str | None:
    """A stable checkpoint folder per (stage, config, inputs): a retried or re-submitted step resumes from it."""
    if not checkpoint_root:
        return None
    return str(Path(checkpoint_root) / f"{stage}-{sha256_json(list(identity))[:16]}")
