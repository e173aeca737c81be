"""Promotion of evaluated agents in the MLflow model registry.

One registration = one model version per (agent content, evaluation) pair. The version carries the evaluation's
metrics and protocol and the agent's provenance as tags, and it gets an alias:

* `champion` when its evaluation beats the current champion's on `register.metric` by more than `register.margin`
  under the same evaluation protocol (metrics.json "protocol" dicts equal), or when there is no champion yet;
* `challenger` when it is eligible but does not win, or when the protocols differ (the reason is tagged);
* no alias at all when it is not eligible: evaluation missing or unreadable, status != "ok", a non-finite metric,
  or an evaluation of a different task/agent than the one registered. Such a version is still recorded, with the
  reason, so that the registry shows every attempt.

Evidence check. An evaluation may promote only what its own records support (`check_evidence`): the summary in
metrics.json must agree with the per-episode records in episodes.csv (every summary number is recomputed), the
folder's files must still hash to the content hash components.evaluate recorded in its provenance.json, and that
provenance must name the agent being registered. A registration that fails the check is *refused*: its version
(still recorded) gets no alias and a `veorl.refused` tag with the reason, and components.register exits non-zero.

Re-running with the same agent content and the same evaluation finds the existing version (tagged with both
content hashes) and changes nothing.

Concurrency guarantee. Aliases are single-valued in MLflow, so there is never more than one champion. What a lock
adds is that the champion is the right one:
* local stores (a sqlite file, or `register.lock_file` on a shared file system): the whole registration holds an
  exclusive file lock, so concurrent registrations are serialised; the result equals some serial order.
* remote stores without a shared lock file: optimistic check-then-set. A registration reads the champion, decides,
  sets the alias, waits `register.verify_delay` seconds and re-reads it; if another registration moved the alias
  meanwhile it decides again against the new champion. The final champion is correct unless one registration
  stalls between reading and setting the alias for longer than `verify_delay`. Two registrations of the same
  agent and evaluation racing on a remote store may both create a version; the later one is tagged as a duplicate
  and never gets an alias.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veorl import tracking
from veorl.config import Params
from veorl.storage import artifact_hash, code_version, content_hash_problem, read_json, sha256_file

log = logging.getLogger("veorl.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
NO_ALIAS = "none"

TAG_AGENT_HASH = "veorl.agent_hash"
TAG_EVALUATION_HASH = "veorl.evaluation_hash"
TAG_PROTOCOL = "veorl.protocol"
TAG_METRIC_PREFIX = "veorl.metric."
TAG_DECISION = "veorl.decision"
TAG_REASON = "veorl.decision_reason"
TAG_PROBLEM = "veorl.evaluation_problem"
TAG_DUPLICATE_OF = "veorl.duplicate_of"
TAG_REFUSED = "veorl.refused"

EPISODES_FILE = "episodes.csv"
# episodes.csv keeps returns to 6 decimals, so recomputed means may differ from metrics.json by rounding only.
EVIDENCE_ABS_TOLERANCE = 1e-4
EVIDENCE_REL_TOLERANCE = 1e-6

# Numbers of metrics.json that are worth a tag (and a run metric) on the version.
EVALUATION_NUMBERS = ("mean_return", "std_return", "success_rate", "success_std", "mean_length", "episodes")
LOCK_TIMEOUT_S = 900.0
MAX_DECISION_ROUNDS = 5


class RegistryError(ValueError):
    """Bad input to a registration (missing or incomplete agent, unusable store); the message names the file."""


# ----------------------------------------------------------------------------------------------
# Reading the agent and its evaluation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentInfo:
    path: str
    content_hash: str
    meta: dict[str, Any]
    provenance: dict[str, Any]


@dataclass(frozen=True)
class EvaluationInfo:
    path: str
    content_hash: str
    metrics: dict[str, Any]
    problem: str | None  # why this evaluation may not promote anything; None = eligible
    refused: str | None = None  # set when the evidence contradicts the evaluation (see check_evidence)

    @property
    def protocol(self) -> dict[str, Any] | None:
        protocol = self.metrics.get("protocol")
        return protocol if isinstance(protocol, dict) else None


def read_agent(agent_dir: str | Path) -> AgentInfo:
    root = Path(agent_dir)
    if not root.is_dir():
        raise RegistryError(f"{root}: agent directory does not exist")
    meta_path = root / "agent.json"
    if not meta_path.is_file():
        raise RegistryError(
            f"{meta_path}: missing, so {root} is not a complete agent artifact (agent.json is written last)"
        )
    try:
        meta = read_json(meta_path)
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{meta_path}: not readable JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise RegistryError(f"{meta_path}: must hold a JSON object, got {type(meta).__name__}")
    for key in ("task", "algo"):
        if key not in meta:
            raise RegistryError(f"{meta_path}: key {key!r} missing")
    provenance: dict[str, Any] = {}
    if (root / "provenance.json").is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            provenance = read_json(root / "provenance.json")
    return AgentInfo(str(root), artifact_hash(root), meta, provenance if isinstance(provenance, dict) else {})


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def read_evaluation(eval_dir: str | Path, agent: AgentInfo, metric: str) -> EvaluationInfo:
    """Read eval/metrics.json and decide whether it may promote the agent (problem=None) or why not."""
    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        return EvaluationInfo(str(path), "missing", {}, f"evaluation missing: {path} does not exist")
    content_hash = sha256_file(path)
    try:
        metrics = read_json(path)
    except (OSError, json.JSONDecodeError) as exc:
        return EvaluationInfo(str(path), content_hash, {}, f"evaluation unreadable: {path}: {exc}")
    if not isinstance(metrics, dict):
        return EvaluationInfo(str(path), content_hash, {}, f"evaluation unreadable: {path} does not hold a JSON object")

    def problem(reason: str) -> EvaluationInfo:
        return EvaluationInfo(str(path), content_hash, metrics, reason)

    status = metrics.get("status")
    if status != "ok":
        return problem(f"evaluation failed: {path} has status {status!r}, not 'ok'")
    if not _finite_number(metrics.get(metric)):
        return problem(f"evaluation failed: {path}: {metric} is {metrics.get(metric)!r}, not a finite number")
    protocol = metrics.get("protocol")
    if not isinstance(protocol, dict):
        return problem(f"evaluation unusable: {path} has no 'protocol' object")
    agent_task = agent.meta.get("task")
    for where, task in (("task", metrics.get("task")), ("protocol.task", protocol.get("task"))):
        if task != agent_task:
            return problem(
                f"evaluation of a different task: {path} {where} is {task!r}, the agent was trained on {agent_task!r}"
            )
    agent_env = agent.meta.get("env")
    if agent_env is not None and protocol.get("env") not in (None, agent_env):
        return problem(
            f"evaluation of a different task: {path} protocol.env is {protocol.get('env')!r}, "
            f"the agent's env is {agent_env!r}"
        )
    algo = metrics.get("algo")
    if algo is not None and algo != agent.meta.get("algo"):
        return problem(
            f"evaluation of a different agent: {path} algo is {algo!r}, the agent's is {agent.meta.get('algo')!r}"
        )
    refusal = check_evidence(Path(eval_dir), agent, metrics)
    if refusal is not None:
        return EvaluationInfo(str(path), content_hash, metrics, f"evaluation refused: {refusal}", refusal)
    return EvaluationInfo(str(path), content_hash, metrics, None)


def check_evidence(eval_dir: Path, agent: AgentInfo, metrics: dict[str, Any]) -> str | None:
    """Why the evaluation in `eval_dir` cannot be trusted for `agent`, or None. Every failed check is named."""
    reasons = []
    evaluated = _evaluated_agent_hash(eval_dir)
    if evaluated is None:
        reasons.append(f"{eval_dir / 'provenance.json'} names no evaluated agent")
    elif evaluated != agent.content_hash:
        reasons.append(
            f"evaluation of a different agent: {eval_dir / 'provenance.json'} names agent {evaluated[:12]}..., "
            f"the agent registered is {agent.content_hash[:12]}..."
        )
    reasons.extend(summary_disagreements(eval_dir / EPISODES_FILE, metrics))
    hash_problem = content_hash_problem(eval_dir)
    if hash_problem is not None:
        reasons.append(hash_problem)
    return "; ".join(reasons) or None


def recompute_summary(episodes_csv: Path) -> dict[str, float]:
    """The summary numbers components.evaluate reports, recomputed from its per-episode records."""
    import csv

    import numpy as np

    with open(episodes_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError("no episode records")
    returns = np.array([float(r["return"]) for r in rows], np.float64)
    successes = np.array([float(int(r["success"])) for r in rows], np.float64)
    lengths = np.array([float(int(r["length"])) for r in rows], np.float64)
    if not (np.all(np.isfinite(returns)) and set(successes.tolist()) <= {0.0, 1.0}):
        raise ValueError("non-finite returns or success flags other than 0/1")
    return {
        "episodes": float(len(rows)),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "success_rate": float(successes.mean()),
        "success_std": float(successes.std()),
        "mean_length": float(lengths.mean()),
    }


def summary_disagreements(episodes_csv: Path, metrics: dict[str, Any]) -> list[str]:
    """Each summary number of metrics.json that its per-episode records do not give (all required)."""
    if not episodes_csv.is_file():
        return [f"{episodes_csv} is missing, so the summary cannot be checked against the episodes"]
    try:
        recomputed = recompute_summary(episodes_csv)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{episodes_csv} is not readable as episode records: {exc}"]
    found = []
    for key, value in recomputed.items():
        claimed = metrics.get(key)
        if not _finite_number(claimed):
            found.append(f"metrics.json {key} is {claimed!r}, the episodes give {value:.6g}")
        elif not math.isclose(float(claimed), value, rel_tol=EVIDENCE_REL_TOLERANCE, abs_tol=EVIDENCE_ABS_TOLERANCE):
            found.append(
                f"metrics.json says {key}={float(claimed):.6g} but its {int(recomputed['episodes'])} "
                f"episode records in {episodes_csv.name} give {value:.6g}"
            )
    return found


def _evaluated_agent_hash(eval_dir: Path) -> str | None:
    """The agent content hash the evaluation recorded as its upstream (components.evaluate writes it), if any."""
    try:
        upstream = read_json(eval_dir / "provenance.json").get("upstream") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    value = upstream.get("agent") if isinstance(upstream, dict) else None
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------------------------
# The promotion rule (pure)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """What the registry records about a version's evaluation."""

    version: str
    metrics: dict[str, float]
    protocol: dict[str, Any] | None


@dataclass(frozen=True)
class Decision:
    alias: str | None
    reason: str

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def protocol_differences(candidate: dict[str, Any], champion: dict[str, Any]) -> list[str]:
    return [
        f"{key}: {candidate.get(key)!r} vs champion's {champion.get(key)!r}"
        for key in sorted(set(candidate) | set(champion))
        if candidate.get(key) != champion.get(key)
    ]


def decide(evaluation: EvaluationInfo, champion: Standing | None, metric: str, margin: float) -> Decision:
    if evaluation.problem is not None:
        return Decision(None, f"not eligible for promotion: {evaluation.problem}")
    value = float(evaluation.metrics[metric])
    if champion is None:
        return Decision(CHAMPION, f"first eligible version: no @{CHAMPION} yet ({metric}={value:.4g})")
    if champion.protocol is None:
        return Decision(
            CHALLENGER, f"@{CHAMPION} v{champion.version} records no evaluation protocol, so it cannot be compared"
        )
    differences = protocol_differences(evaluation.protocol or {}, champion.protocol)
    if differences:
        return Decision(
            CHALLENGER,
            f"evaluation protocol differs from @{CHAMPION} v{champion.version} "
            f"({'; '.join(differences)}), so the scores are not comparable",
        )
    best = champion.metrics.get(metric)
    if best is None or not math.isfinite(best):
        return Decision(
            CHALLENGER, f"@{CHAMPION} v{champion.version} records no finite {metric}, so it cannot be compared"
        )
    if value > best + margin:
        return Decision(
            CHAMPION, f"{metric} {value:.4g} beats @{CHAMPION} v{champion.version} ({best:.4g}) by more than {margin:g}"
        )
    return Decision(
        CHALLENGER,
        f"{metric} {value:.4g} does not beat @{CHAMPION} v{champion.version} ({best:.4g}) by more than {margin:g}",
    )


def standing_from_tags(version: str, tags: dict[str, str]) -> Standing:
    metrics: dict[str, float] = {}
    for key, text in tags.items():
        if key.startswith(TAG_METRIC_PREFIX):
            with contextlib.suppress(ValueError):
                metrics[key[len(TAG_METRIC_PREFIX) :]] = float(text)
    protocol = None
    if TAG_PROTOCOL in tags:
        with contextlib.suppress(json.JSONDecodeError):
            loaded = json.loads(tags[TAG_PROTOCOL])
            protocol = loaded if isinstance(loaded, dict) else None
    return Standing(version, metrics, protocol)


# ----------------------------------------------------------------------------------------------
# Store location and locking
# ----------------------------------------------------------------------------------------------


def local_store_path(uri: str) -> Path | None:
    """The file behind a local store URI (sqlite file or file-store directory); None for remote stores."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" not in uri:
        return Path(uri)
    return None


def lock_path(params: Params, uri: str) -> Path | None:
    if params.register.lock_file:
        return Path(params.register.lock_file)
    store = local_store_path(uri)
    if store is None:
        return None
    return store.with_name(store.name + ".register.lock")


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive advisory lock (flock) on `path`; released when the process dies, so a crash never wedges it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{path}: registry lock still held by another registration after {timeout_s:.0f} s"
                    ) from None
                if not announced:
                    log.info("waiting for the registry lock %s (another registration is running)", path)
                    announced = True
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="VeoRL agents; @champion is the best evaluated agent.")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently: fine if it exists now


def all_versions(client, name: str) -> list[Any]:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        versions.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return versions


def find_versions(client, name: str, agent_hash: str, evaluation_hash: str) -> list[Any]:
    """Versions registered for exactly this agent content and evaluation, oldest first."""
    matches = [
        v
        for v in all_versions(client, name)
        if v.tags.get(TAG_AGENT_HASH) == agent_hash
        and v.tags.get(TAG_EVALUATION_HASH) == evaluation_hash
        and TAG_DUPLICATE_OF not in v.tags
    ]
    return sorted(matches, key=lambda v: int(v.version))


def current_champion(client, name: str) -> Standing | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return standing_from_tags(str(version.version), dict(version.tags))


def _alias_holder(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_tags(agent: AgentInfo, evaluation: EvaluationInfo) -> dict[str, str]:
    tags = {
        TAG_AGENT_HASH: agent.content_hash,
        TAG_EVALUATION_HASH: evaluation.content_hash,
        "veorl.task": str(agent.meta.get("task")),
        "veorl.algo": str(agent.meta.get("algo")),
        "veorl.env": str(agent.meta.get("env")),
        "veorl.code_version": str(agent.provenance.get("code_version", "unknown")),
        "veorl.registered_by": code_version(),
        "veorl.evaluation_status": str(evaluation.metrics.get("status", "missing")),
    }
    for key, value in sorted((agent.provenance.get("upstream") or {}).items()):
        tags[f"veorl.upstream.{key}"] = str(value)
    for key in EVALUATION_NUMBERS:
        if key in evaluation.metrics:
            tags[TAG_METRIC_PREFIX + key] = str(evaluation.metrics[key])
    if evaluation.protocol is not None:
        tags[TAG_PROTOCOL] = json.dumps(evaluation.protocol, sort_keys=True)
    if evaluation.problem is not None:
        tags[TAG_PROBLEM] = evaluation.problem
    if evaluation.refused is not None:
        tags[TAG_REFUSED] = evaluation.refused
    return tags


def _log_and_register(
    agent: AgentInfo, evaluation: EvaluationInfo, params: Params, parent_run_id: str | None
) -> tuple[Any, str]:
    """Log the agent as a pyfunc model in a `register` run and create a registry version from it."""
    import mlflow

    from veorl.serving import log_agent_model

    upstream = {"agent": agent.content_hash, "evaluation": evaluation.content_hash}
    with tracking.stage_run(
        "register", params, parent_run_id, sections=("register", "tracking"), upstream=upstream
    ) as run:
        numbers = {
            k: float(evaluation.metrics[k]) for k in EVALUATION_NUMBERS if _finite_number(evaluation.metrics.get(k))
        }
        tracking.log_metrics({f"eval_{k}": v for k, v in numbers.items()})
        info = log_agent_model(agent.path, name="agent", tags={TAG_AGENT_HASH: agent.content_hash})
        version = mlflow.register_model(
            info.model_uri, params.register.model_name, tags=version_tags(agent, evaluation)
        )
        return version, run.run_id


def _settle_aliases(
    client, name: str, version: str, evaluation: EvaluationInfo, params: Params, serialised: bool
) -> Decision:
    """Decide and set the alias; without a lock, re-verify and re-decide if another registration moved @champion."""
    reg = params.register
    decision = decide(evaluation, None, reg.metric, reg.margin)
    if decision.alias is None:
        return decision
    for _ in range(MAX_DECISION_ROUNDS):
        champion = current_champion(client, name)
        if champion is not None and champion.version == version:
            return decision if decision.promoted else Decision(CHAMPION, f"already @{CHAMPION}")
        decision = decide(evaluation, champion, reg.metric, reg.margin)
        if not decision.promoted:
            client.set_registered_model_alias(name, CHALLENGER, version)
            return decision
        client.set_registered_model_alias(name, CHAMPION, version)
        if _alias_holder(client, name, CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        if serialised:
            return decision
        time.sleep(reg.verify_delay)
        if _alias_holder(client, name, CHAMPION) == version:
            return decision
        log.info("@%s moved while registering v%s; comparing again", CHAMPION, version)
    return Decision(
        decision.alias, decision.reason + f" (@{CHAMPION} kept moving; stopped after {MAX_DECISION_ROUNDS} rounds)"
    )


def _aliases_of(client, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases or [])


def register_agent(
    agent_dir: str | Path, eval_dir: str | Path, params: Params, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Register (or find) the version for this agent and evaluation, and settle its alias. Returns the outcome."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow import MlflowClient

    reg = params.register
    agent = read_agent(agent_dir)
    evaluation = read_evaluation(eval_dir, agent, reg.metric)
    uri = tracking.tracking_uri(params)
    lock = lock_path(params, uri)
    guard = file_lock(lock) if lock is not None else contextlib.nullcontext()
    with guard:
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        ensure_registered_model(client, reg.model_name)
        existing = find_versions(client, reg.model_name, agent.content_hash, evaluation.content_hash)
        run_id = None
        if existing and TAG_DECISION in existing[0].tags:
            version = existing[0]
            decision = Decision(
                None if version.tags[TAG_DECISION] == NO_ALIAS else version.tags[TAG_DECISION],
                version.tags.get(TAG_REASON, ""),
            )
            new_version = False
            run_id = version.run_id
        else:
            new_version = not existing
            if existing:  # registered earlier, but that registration stopped before deciding
                version = existing[0]
                run_id = version.run_id
            else:
                version, run_id = _log_and_register(agent, evaluation, params, parent_run_id)
                if lock is None:
                    version = _first_of_duplicates(client, reg.model_name, agent, evaluation, version)
            number = str(version.version)
            decision = _settle_aliases(client, reg.model_name, number, evaluation, params, serialised=lock is not None)
            client.set_model_version_tag(reg.model_name, number, TAG_REASON, decision.reason)
            client.set_model_version_tag(reg.model_name, number, TAG_DECISION, decision.alias or NO_ALIAS)
        number = str(version.version)
        champion = current_champion(client, reg.model_name)
        outcome = {
            "model_name": reg.model_name,
            "version": number,
            "model_uri": f"models:/{reg.model_name}/{number}",
            "alias": decision.alias,
            "promoted": decision.promoted,
            "reason": decision.reason,
            "new_version": new_version,
            "aliases_now": _aliases_of(client, reg.model_name, number),
            "champion_version": champion.version if champion else None,
            "metric": reg.metric,
            "value": evaluation.metrics.get(reg.metric),
            "protocol": evaluation.protocol,
            "agent_hash": agent.content_hash,
            "evaluation_hash": evaluation.content_hash,
            "run_id": run_id,
            "refused": evaluation.refused,
        }
        if evaluation.refused is not None and version.tags.get(TAG_REFUSED) != evaluation.refused:
            client.set_model_version_tag(reg.model_name, number, TAG_REFUSED, evaluation.refused)
    log.info("registered %s v%s: %s (%s)", reg.model_name, number, decision.alias or "no alias", decision.reason)
    return outcome


def _first_of_duplicates(client, name: str, agent: AgentInfo, evaluation: EvaluationInfo, ours: Any) -> Any:
    """Without a lock two identical registrations may race; the oldest version wins and ours is marked a duplicate."""
    same = find_versions(client, name, agent.content_hash, evaluation.content_hash)
    if same and str(same[0].version) != str(ours.version):
        client.set_model_version_tag(name, str(ours.version), TAG_DUPLICATE_OF, str(same[0].version))
        return same[0]
    return ours
