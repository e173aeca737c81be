"""What each Kubeflow step does, as plain functions (importable and testable without KFP).

The KFP components in pipelines/veorl_pipeline.py are one-line lightweight wrappers around these, so the
compiled YAML stays small and stable, and the logic ships in the image with the rest of the project.

Parameters reach the steps the way DVC gives them: the pipeline's `resolve-config` step validates the whole
configuration once (params.yaml in the image + preset + knobs + overrides), then hands every step a JSON
string holding only the keys that stage reads, mirroring the `params:` lists of dvc.yaml (STAGE_PARAMS, checked
against dvc.yaml by the tests). The string is a step input, so it is part of the step's cache key: changing
`finetune.*` re-runs finetune, evaluate and register, never ingestion. Upstream artifacts are followed by
content: each step returns the content hash of what it wrote, and the downstream step takes that hash as an
input parameter, so a changed artifact invalidates every cached step below it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from veorl.config import Params, deep_merge, load_params, resolve
from veorl.storage import atomic_write_json, is_s3, read_json, s3_list, sha256_file, sha256_json, tree_hash
from veorl.trees import numeric_leaves

PARAMS_ENV = "VEORL_PARAMS"
EXTERNAL_SOURCES_FILE = "external_sources.json"

# Keys each stage reads: exactly the `params:` lists of dvc.yaml (a section name means the whole section).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "source_videos": ("preset", "source_videos", "collect.task"),
    "ingest": ("preset", "ingest"),
    "collect": ("preset", "collect"),
    "pretrain": ("preset", "model", "pretrain", "tracking"),
    "finetune": ("preset", "model", "finetune", "tracking"),
    # evaluation runs on the task, camera and episode length recorded in the agent it is given
    "evaluate": ("preset", "evaluate", "tracking"),
    "register": ("register", "tracking"),
}

# Pipeline knobs -> the parameter each one sets (empty knob = keep params.yaml / preset).
KNOBS: dict[str, str] = {
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


def _select(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def stage_config(params: Params, stage: str) -> str:
    """JSON text of the keys `stage` reads (sorted, so equal configurations give equal cache keys)."""
    full = params.model_dump(by_alias=True, mode="json")
    picked: dict[str, Any] = {"preset": params.preset}
    for key in STAGE_PARAMS[stage]:
        if key == "preset":
            continue
        value = _select(full, key)
        node = picked
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return json.dumps(picked, sort_keys=True, separators=(",", ":"))


def resolve_stage_configs(preset: str, overrides: list[str], knobs: dict[str, Any]) -> dict[str, str]:
    """Validate the whole configuration once and split it into one JSON string per stage."""
    params = load_params(params_file(), preset=preset or None, overrides=[*knob_overrides(knobs), *overrides])
    return {stage: stage_config(params, stage) for stage in STAGE_PARAMS}


def params_for_stage(config_json: str) -> Params:
    """Params for one step: the stage's resolved keys over the preset's defaults.

    Each section is validated on its own; the cross-section checks already passed in resolve-config on the
    complete configuration, and are skipped here because the other sections hold defaults, not the user's values.
    """
    data = json.loads(config_json)
    base = resolve({}, preset=data["preset"])
    sections: dict[str, Any] = {}
    for name in Params.model_fields:
        if name == "preset":
            continue
        current = getattr(base, name)
        given = data.get(name)
        sections[name] = type(current).model_validate(deep_merge(current.model_dump(by_alias=True), given)) if given else current
    return Params.model_construct(preset=data["preset"], **sections)


# ----------------------------------------------------------------------------------------------
# Steps (each returns the content hash of the artifact it wrote)
# ----------------------------------------------------------------------------------------------


def _fingerprint_source(uri: str) -> list[Any]:
    """Content identity of an external source: S3 keys with size and ETag, or local file hashes."""
    if is_s3(uri):
        listing = s3_list(uri)
        if not listing:
            raise FileNotFoundError(f"{uri}: no objects under this S3 prefix")
        return [list(item) for item in listing]
    path = Path(uri)
    if path.is_dir():
        return [str(path), tree_hash(path)]
    if path.is_file():
        return [str(path), sha256_file(path)]
    raise FileNotFoundError(f"{uri}: video source does not exist")


def source_videos(config: str, video_sources: list[str], out: str) -> str:
    """Render the unlabeled source videos, or, when `video_sources` is given, record those instead of rendering.

    External sources (s3:// prefixes, files, folders) are not copied: the step writes their list and a
    fingerprint (S3 ETags and sizes) to OUT/external_sources.json, so ingestion reads them directly and the cache
    follows the bucket's content.
    """
    out_dir = Path(out)
    if video_sources:
        fingerprint = {uri: _fingerprint_source(uri) for uri in video_sources}
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / EXTERNAL_SOURCES_FILE, {"sources": list(video_sources), "fingerprint": fingerprint})
        return sha256_json(fingerprint)
    from components.source_videos import run

    run(out, params_for_stage(config), progress=True)
    return tree_hash(out_dir)


def ingest(config: str, source_videos_dir: str, out: str) -> str:
    from components.ingest import run
    from veorl.video.ingest import exit_reason

    external = Path(source_videos_dir) / EXTERNAL_SOURCES_FILE
    sources = read_json(external)["sources"] if external.is_file() else [source_videos_dir]
    manifest = run(sources, out, params_for_stage(config), progress=True)
    reason = exit_reason(manifest)
    if reason:
        raise RuntimeError(f"ingestion failed: {reason}; see {out}/manifest.json")
    return tree_hash(out)


def collect(config: str, out: str) -> str:
    from components.collect import run

    run(out, params_for_stage(config), progress=True)
    return tree_hash(out)


def checkpoint_dir(checkpoint_root: str, stage: str, *identity: str) -> str | None:
    """A stable checkpoint folder per (stage, config, inputs): a retried or re-submitted step resumes from it."""
    if not checkpoint_root:
        return None
    return str(Path(checkpoint_root) / f"{stage}-{sha256_json(list(identity))[:16]}")




def pretrain(config: str, clips: str, episodes: str, out: str, metrics_file: str, curve_file: str,
             checkpoint_root: str = "", parent_run_id: str = "", inputs_hash: str = "") -> tuple[str, dict[str, float]]:
    from components.pretrain import run

    checkpoints = checkpoint_dir(checkpoint_root, "pretrain", config, inputs_hash)
    metrics = run(clips, episodes, out, params_for_stage(config), checkpoints=checkpoints,
                  parent_run_id=parent_run_id or None, metrics=metrics_file, curve=curve_file)
    return tree_hash(out), numeric_leaves(metrics)


def finetune(config: str, world_model: str, episodes: str, clips: str, out: str, metrics_file: str, curve_file: str,
             checkpoint_root: str = "", parent_run_id: str = "", inputs_hash: str = "") -> tuple[str, dict[str, float]]:
    from components.finetune import run

    checkpoints = checkpoint_dir(checkpoint_root, "finetune", config, inputs_hash)
    metrics = run(world_model, episodes, out, params_for_stage(config), clips=clips, checkpoints=checkpoints,
                  parent_run_id=parent_run_id or None, metrics=metrics_file, curve=curve_file)
    return tree_hash(out), numeric_leaves(metrics)


def evaluate(config: str, agent: str, out: str, parent_run_id: str = "") -> tuple[str, dict[str, float]]:
    from components.evaluate import run

    run(agent, out, params_for_stage(config), parent_run_id=parent_run_id or None)
    metrics = read_json(Path(out) / "metrics.json")
    if metrics.get("status") != "ok":
        raise RuntimeError(f"{out}/metrics.json: evaluation status is {metrics.get('status')!r}, not 'ok'")
    wanted = ("mean_return", "std_return", "success_rate", "success_std", "mean_length")
    return tree_hash(out), {k: float(metrics[k]) for k in wanted if isinstance(metrics.get(k), (int, float))}


def register(config: str, agent: str, evaluation: str, out: str, parent_run_id: str = "") -> dict[str, Any]:
    from components.register import run

    Path(out).mkdir(parents=True, exist_ok=True)
    return run(agent, evaluation, str(Path(out) / "registration.json"), params_for_stage(config),
               parent_run_id=parent_run_id or None)
