"""MLflow run tracking for every stage execution (pretrain, finetune, evaluate, ...).

One MLflow run per stage execution, nested under a pipeline run when a parent run id is given
(argument or VEORL_PARENT_RUN_ID). The tracking store is MLFLOW_TRACKING_URI when set, else
params.tracking.uri (default: sqlite:///mlruns.db in the working directory, with artifacts in
./mlartifacts next to the database). A resumed stage continues its earlier run: the run id is kept in
a small file in the stage's checkpoint directory. Registry promotion lives elsewhere.
mlflow is imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veorl.config import Params
from veorl.storage import atomic_write_text, code_version, redact, split_credentials
from veorl.trees import flatten

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "VEORL_PARENT_RUN_ID"
RUN_ID_FILE = "mlflow_run_id"
_MAX_PARAM_CHARS = 6000


@dataclass
class StageRun:
    run_id: str | None  # None on the ranks of a multi-process stage that do not record (record=False)
    experiment_id: str | None
    tracking_uri: str | None
    resumed: bool


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI when set, else params.tracking.uri; never with credentials in it.

    A relative sqlite path is made absolute (and its folder created), so that every later call and every
    subprocess, whatever its working directory, opens the same store. Credentials written into the URI
    (https://user:password@host) are split off here, where the URI enters: they go to MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD, which MLflow's client uses to authenticate (and subprocesses inherit), and
    MLFLOW_TRACKING_URI is rewritten without them. What this returns, and so what any message, run or file sees,
    holds no credential.
    """
    from_env = os.environ.get(TRACKING_URI_ENV)
    uri, credentials = split_credentials(from_env or params.tracking.uri)
    if credentials is not None:
        os.environ[USERNAME_ENV] = credentials.username
        if credentials.password:
            os.environ[PASSWORD_ENV] = credentials.password
        if from_env:
            os.environ[TRACKING_URI_ENV] = uri
    db = _sqlite_file(uri)
    if db is None:
        return uri
    db.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{db}"
    _create_sqlite_store(uri)
    return uri


_READY_STORES: set[str] = set()


def _create_sqlite_store(uri: str) -> None:
    """Create (or upgrade) the tables of a sqlite store once per process, one process at a time.

    MLflow creates a new store's tables when it first opens it. Two stages starting together on a fresh
    database (a pipeline's parallel steps, the two lanes of a comparison) both see no tables and both create
    them; the second fails with "table experiments already exists". An exclusive lock on a file beside the
    database makes the creation happen once; later openers find the tables and leave them alone.
    """
    if uri in _READY_STORES:
        return
    mlflow = _mlflow()
    db = _sqlite_file(uri)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow.tracking.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(uri)


def public_params(params: Params) -> Params:
    """`params` with any credentials in tracking.uri / tracking.artifact_location split off (kept for the
    connection as tracking_uri does), for recording: MLflow params, provenance files, outcome files."""
    tracking = params.tracking
    uri, credentials = split_credentials(tracking.uri)
    location, _ = split_credentials(tracking.artifact_location) if tracking.artifact_location else (None, None)
    if credentials is None and location == tracking.artifact_location:
        return params
    if credentials is not None and not os.environ.get(TRACKING_URI_ENV):
        tracking_uri(params)  # this URI is the store: its credentials are needed for the connection
    clean = tracking.model_copy(update={"uri": uri, "artifact_location": location})
    return params.model_copy(update={"tracking": clean})


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    # abspath, not resolve(): an absolute path given by the caller comes back unchanged (symlinks kept).
    return Path(os.path.abspath(os.path.expanduser(uri[len("sqlite:///") :])))


def ensure_experiment(name: str, uri: str, artifact_location: str | None = None) -> str:
    """Id of experiment `name`, created when missing.

    New experiments store artifacts at `artifact_location` when given (e.g. s3://bucket/mlflow), else next to a
    sqlite store (./mlartifacts beside the database file), else wherever the tracking server puts them. An
    existing experiment keeps its own location (MLflow cannot move it); a different request is only warned about.
    """
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        db = _sqlite_file(uri)
        location = artifact_location or ((db.parent / "mlartifacts").as_uri() if db is not None else None)
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it in the meantime
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if artifact_location and found.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        log.warning(
            "experiment %r already stores artifacts in %s, not tracking.artifact_location=%s; keeping its own",
            name,
            found.artifact_location,
            artifact_location,
        )
    return found.experiment_id


def _loggable_params(params: Params, sections: tuple[str, ...]) -> dict[str, str]:
    params = public_params(params)
    data = params.section_dict(*sections) if sections else params.model_dump(by_alias=True, mode="json")
    return {k: redact(str(v))[:_MAX_PARAM_CHARS] for k, v in flatten(data).items()}


def _read_run_id(run_dir: Path | None) -> str | None:
    if run_dir is None:
        return None
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return text or None


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    parent_run_id: str | None = None,
    *,
    run_dir: str | Path | None = None,
    sections: tuple[str, ...] = (),
    upstream: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    record: bool = True,
) -> Iterator[StageRun]:
    """Context manager: an active MLflow run for one stage execution.

    run_dir: where the run id is remembered (the stage's checkpoint directory); when it holds the id of
    an existing run in the same experiment, that run is continued instead of starting a second one.
    sections: params sections logged as flattened parameters (default: all).
    The run ends FINISHED on success, KILLED on KeyboardInterrupt, FAILED on any other exception.
    record=False (the ranks other than 0 of a multi-process stage) starts no run: run_id is None and the
    logging helpers below do nothing.
    """
    if not record:
        yield StageRun(run_id=None, experiment_id=None, tracking_uri=None, resumed=False)
        return
    mlflow = _mlflow()
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(params.tracking.experiment, uri, params.tracking.artifact_location)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None

    previous = _read_run_id(Path(run_dir) if run_dir is not None else None)
    resumed = False
    if previous is not None:
        try:
            old = client.get_run(previous)
            resumed = old.info.experiment_id == experiment_id
        except Exception:
            resumed = False
        if not resumed:
            log.info(
                "run id %s from %s is not in experiment %r of %s; starting a new run",
                previous,
                run_dir,
                params.tracking.experiment,
                redact(uri),
            )
    while mlflow.active_run() is not None:  # a caller's leftover run must not swallow ours
        mlflow.end_run()

    run_tags = {"veorl.stage": stage, "veorl.code_version": code_version(), "veorl.preset": params.preset}
    run_tags.update({f"upstream.{k}": v for k, v in (upstream or {}).items()})
    run_tags.update(tags or {})
    if resumed:
        active = mlflow.start_run(run_id=previous)
    else:
        try:
            active = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent)
        except Exception as exc:
            if parent is None:
                raise
            # MLflow only nests under an ACTIVE parent; record the link as the standard tag instead.
            log.info("cannot nest under run %s (%s); linking it by tag", parent, exc)
            active = mlflow.start_run(experiment_id=experiment_id, run_name=stage)
            run_tags["mlflow.parentRunId"] = parent
    run_id = active.info.run_id
    if run_dir is not None:
        atomic_write_text(Path(run_dir) / RUN_ID_FILE, run_id + "\n")
    mlflow.set_tags(run_tags)
    wanted = _loggable_params(params, sections)
    logged = client.get_run(run_id).data.params if resumed else {}
    new = {k: v for k, v in wanted.items() if k not in logged}
    if new:
        mlflow.log_params(new)
    # MLflow params are immutable; settings allowed to change on resume are recorded as tags.
    changed = {f"resumed_with.{k}": v for k, v in wanted.items() if k in logged and logged[k] != v}
    if changed:
        mlflow.set_tags(changed)
    if resumed:
        mlflow.set_tag("veorl.resumed", "true")

    status = "FINISHED"
    try:
        yield StageRun(run_id=run_id, experiment_id=experiment_id, tracking_uri=uri, resumed=resumed)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        mlflow.end_run(status=status)


# ------------------------------------------------------------------------------------------------
# Logging helpers (act on the active run; silently no-ops without one so library code can call them)
# ------------------------------------------------------------------------------------------------


def _active():
    mlflow = _mlflow()
    return mlflow if mlflow.active_run() is not None else None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow = _active()
    if mlflow is None:
        return
    clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_params(params: dict[str, Any]) -> None:
    mlflow = _active()
    if mlflow is not None:
        # Params are stored in clear text and shown to anyone who can read the experiment: no credentials.
        mlflow.log_params({k: redact(str(v))[:_MAX_PARAM_CHARS] for k, v in params.items()})


def log_figure(figure: Any, name: str) -> None:
    """Log a matplotlib figure as an image artifact (name with extension, e.g. 'plots/usage.png') and close it."""
    mlflow = _active()
    try:
        if mlflow is not None:
            mlflow.log_figure(figure, name)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def log_image(array: np.ndarray, name: str) -> None:
    """Log an (H, W, 3) uint8 (or float in [0, 1]) image as a PNG artifact called `name`."""
    mlflow = _active()
    if mlflow is None:
        return
    image = np.asarray(array)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    mlflow.log_image(image, artifact_file=name if name.endswith(".png") else name + ".png")


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow = _active()
    if mlflow is None:
        return
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(data: dict[str, Any], name: str) -> None:
    mlflow = _active()
    if mlflow is not None:
        mlflow.log_dict(data, name)


def log_text(text: str, name: str) -> None:
    mlflow = _active()
    if mlflow is not None:
        mlflow.log_text(text, name)


def active_run_id() -> str | None:
    mlflow = _mlflow()
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


__all__ = [
    "StageRun",
    "stage_run",
    "tracking_uri",
    "public_params",
    "ensure_experiment",
    "log_metrics",
    "log_params",
    "log_figure",
    "log_image",
    "log_artifact",
    "log_dict",
    "log_text",
    "active_run_id",
    "PARENT_RUN_ENV",
    "RUN_ID_FILE",
]
