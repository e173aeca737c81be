"""The registered model: an MLflow pyfunc that maps an observation and the recurrent state to an action.

A deployed VeoRL policy is recurrent (it filters the Trunk Net on the observations it has seen), so the
served model is a pure step function, and the caller carries the state between calls:

    model = mlflow.pyfunc.load_model("models:/veorl-agent@champion")
    out = model.predict({"image": frames})           # frames: (B, 64, 64, 3) uint8; no state = a new episode
    action = out["action"]                           # (B, action_dim) float32 in [-1, 1]
    state = {k: v for k, v in out.items() if k != "action"}
    out = model.predict({"image": next_frames, **state})

Input: "image" (B, 64, 64, 3) uint8, plus optionally one float32 array per state key ("deter", "stoch",
"prev_action" for VeoRL agents; none for the bc baseline). A request without state starts an episode: the
model uses the agent's initial state. Within a batch, a row whose state is missing (None) starts afresh too.
Output: a dict with "action" and the new state under the state keys. `initial_state(model)` still builds the
zero state on the client side when wanted. docs/serving.md shows the REST form (`mlflow models serve`).

The input signature is column-based: "image" is required and every state key is an optional column, so a REST
client can send only the image (MLflow's tensor signatures cannot have optional inputs). Column types are
`Any`: MLflow's nested array types would check every pixel in Python; the agent checks shapes itself. The
output signature keeps the exact tensor shapes, which is where `initial_state` reads the state's sizes.
The model's artifacts are the agent directory itself (agent.pt + agent.json + provenance); the whole veorl package
is logged as code so the model loads wherever torch, numpy and mlflow of the pinned versions are installed, and
loading it in a process that already has veorl leaves that process's imports as they were (see CODE_MARKER).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

AGENT_ARTIFACT = "agent"
IMAGE_KEY = "image"
ACTION_KEY = "action"
RESERVED_KEYS = (IMAGE_KEY, ACTION_KEY)

# The packages acting imports (veorl.agent -> veorl.models -> torch/numpy; veorl.config -> pydantic/yaml).
SERVING_PACKAGES = ("mlflow", "torch", "numpy", "pydantic", "pyyaml")


class AgentPolicy(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of veorl.agent.Agent: one deterministic policy step per predict call."""

    # The signature is given explicitly at logging time (model_signature); MLflow's type-hint validation would
    # replace it with a weaker schema and, without hints, warns on every import. Opt out of it.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        # Imported on load, not at module top: the model class must unpickle before torch is needed.
        from veorl.agent import Agent

        self.agent = Agent.load(context.artifacts[AGENT_ARTIFACT], device="cpu")
        self.state_keys = tuple(sorted(self.agent.initial_state(1)))
        _drop_model_code_from_sys_path()

    def predict(self, context, model_input, params=None):
        inputs = _input_arrays(model_input, (IMAGE_KEY, *self.state_keys))
        if inputs.get(IMAGE_KEY) is None:
            raise KeyError(f"input lacks {IMAGE_KEY!r}; expected keys {[IMAGE_KEY, *self.state_keys]}")
        image = np.asarray(_stack(inputs[IMAGE_KEY]), dtype=np.uint8)
        given = [k for k in self.state_keys if inputs.get(k) is not None]
        if given and len(given) != len(self.state_keys):
            raise KeyError(
                f"input carries only part of the state ({given}); send all of {list(self.state_keys)}, "
                "or none to start an episode"
            )
        fresh = self.agent.initial_state(int(image.shape[0]) if image.ndim else 1)
        state = {k: _with_defaults(inputs.get(k), fresh[k], k) for k in self.state_keys}
        action, new_state = self.agent.act(image, state)
        return {
            ACTION_KEY: np.asarray(action, dtype=np.float32),
            **{k: np.asarray(v, dtype=np.float32) for k, v in new_state.items()},
        }


def _input_arrays(model_input: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """{key: array or per-row list of cells} from the two forms MLflow hands a pyfunc.

    Called directly (AgentPolicy.predict) the input is a dict of numpy arrays; through a loaded pyfunc with the
    column-based signature, and over REST, it is a DataFrame with one row per batch element.
    """
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return {k: list(model_input[k]) for k in keys if k in model_input.columns}
    if isinstance(model_input, dict):
        return {k: model_input[k] for k in keys if k in model_input}
    raise TypeError(
        f"input must be a dict of numpy arrays (or a DataFrame) with keys {list(keys)}, "
        f"got {type(model_input).__name__}"
    )


def _missing(cell: Any) -> bool:
    return cell is None or (np.ndim(cell) == 0 and isinstance(cell, float) and np.isnan(cell))


def _stack(value: Any) -> np.ndarray:
    """A batch array from an array or from per-row cells (nested lists or arrays of one element each)."""
    if isinstance(value, list):
        return np.stack([np.asarray(cell) for cell in value]) if value else np.asarray(value)
    return np.asarray(value)


def _with_defaults(value: Any, initial: np.ndarray, key: str) -> np.ndarray:
    """The state under `key`: the initial state where none is given (a whole batch, or single rows)."""
    if value is None:
        return initial
    if not isinstance(value, list):
        return np.asarray(value, dtype=np.float32)
    if len(value) != len(initial):
        raise ValueError(f"state {key!r} has {len(value)} rows for a batch of {len(initial)} images")
    rows = [initial[i] if _missing(cell) else np.asarray(cell, dtype=np.float32) for i, cell in enumerate(value)]
    return np.stack(rows).astype(np.float32)


def initial_state(model: Any, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero recurrent state for a loaded pyfunc model, read from its signature (no agent code needed).

    Optional: a request without state starts from the agent's initial state anyway. The shapes come from the
    output signature (every output but "action" is state); models logged with a tensor input signature (before the
    state became optional) give them in their inputs too.
    """
    specs = list(model.metadata.get_output_schema().inputs)
    if not any(getattr(spec, "shape", None) for spec in specs if spec.name != ACTION_KEY):
        specs = list(model.metadata.get_input_schema().inputs)
    state: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name in RESERVED_KEYS or getattr(spec, "shape", None) is None:
            continue
        shape = tuple(batch if dim == -1 else dim for dim in spec.shape)
        state[spec.name] = np.zeros(shape, dtype=np.float32)
    return state


def model_signature(example_input: dict[str, np.ndarray], example_output: dict[str, np.ndarray]):
    """The logged signature: "image" required, each state key an optional column; outputs as exact tensors."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    columns = [ColSpec(AnyType(), IMAGE_KEY)]
    columns += [ColSpec(AnyType(), key, required=False) for key in example_input if key != IMAGE_KEY]
    return ModelSignature(inputs=Schema(columns), outputs=infer_signature(example_input, example_output).outputs)


def example_io(agent: Any, image_size: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A one-step input example (blank frame, initial state) and the agent's output for it."""
    size = int(image_size or agent.meta.get("image_size", 64))
    state = agent.initial_state(1)
    clash = sorted(set(state) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(
            f"agent state keys {clash} collide with the model's reserved input/output names {RESERVED_KEYS}"
        )
    example_input = {
        IMAGE_KEY: np.zeros((1, size, size, 3), dtype=np.uint8),
        **{k: np.asarray(v, dtype=np.float32) for k, v in state.items()},
    }
    action, new_state = agent.act(example_input[IMAGE_KEY], {k: example_input[k] for k in state})
    example_output = {
        ACTION_KEY: np.asarray(action, dtype=np.float32),
        **{k: np.asarray(v, dtype=np.float32) for k, v in new_state.items()},
    }
    return example_input, example_output


def pinned_requirements() -> list[str]:
    """Exact pins of the serving dependencies as installed here (local labels such as +cpu dropped)."""
    pins = []
    for dist in SERVING_PACKAGES:
        version = importlib.metadata.version(dist).split("+", 1)[0]
        pins.append(f"{dist}=={version}")
    return pins


# The model's code is the whole veorl package, copied when the model is logged, not a hand-picked subset:
# - a model must load where veorl is not installed (a serving image with only the pinned requirements), so the code
#   travels with it (MLflow's code_paths) and matches the weights it was logged with;
# - MLflow puts that directory in front of sys.path when the model loads, and a process spawned afterwards (spawn
#   copies the parent's sys.path) imports veorl from there. A partial copy then broke every later worker with
#   "No module named veorl.video"; a complete copy can always be imported, whatever a child needs.
# AgentPolicy.load_context also takes the directory off sys.path again once acting is imported (see there), so
# loading a model leaves the interpreter importing veorl from where it did before.
CODE_MARKER = "MODEL_CODE"


def _package_code_copy(workdir: Path) -> Path:
    """A copy of the whole veorl package (no caches, plus a marker file), logged as the model's code."""
    import veorl

    source = Path(veorl.__file__).resolve().parent
    target = workdir / "veorl"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", CODE_MARKER))
    (target / CODE_MARKER).write_text("veorl as logged with an MLflow model: see veorl.serving\n")
    return target


def _drop_model_code_from_sys_path() -> None:
    """Remove the sys.path entries MLflow added for models' bundled veorl code (they hold veorl/MODEL_CODE).

    Modules already imported keep working: a package finds its submodules through its own __path__, not
    sys.path. What changes is only what later *fresh* imports of veorl see, above all spawned worker processes,
    which then import veorl from where this interpreter would have without the model.
    """
    sys.path[:] = [entry for entry in sys.path if not (Path(entry or ".") / "veorl" / CODE_MARKER).is_file()]


def log_agent_model(agent_dir: str | Path, name: str = "agent", tags: dict[str, str] | None = None):
    """Log the agent directory as a pyfunc model in the active run; returns mlflow's ModelInfo."""
    from veorl.agent import Agent

    agent_dir = Path(agent_dir)
    agent = Agent.load(str(agent_dir), device="cpu")
    example_input, example_output = example_io(agent)
    signature = model_signature(example_input, example_output)
    with tempfile.TemporaryDirectory(prefix="veorl-model-code-") as tmp:
        code = _package_code_copy(Path(tmp))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=AgentPolicy(),
            artifacts={AGENT_ARTIFACT: str(agent_dir)},
            signature=signature,
            input_example=example_input,
            pip_requirements=pinned_requirements(),
            code_paths=[str(code)],
            tags=tags,
        )
