"""The served policy over HTTP: `mlflow models serve` on a model logged from a tiny agent, driven for a few steps
by a plain JSON client that sends the first image without state and then carries the returned state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.builders import make_agent

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory):
    """(model URI, agent dir, tracking URI): a tiny agent logged as the pyfunc in a fresh sqlite store."""
    import mlflow

    from veorl.serving import log_agent_model

    root = tmp_path_factory.mktemp("serving")
    agent_dir = make_agent(root / "agent", seed=7)
    uri = f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment("serving-test")
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        info = log_agent_model(agent_dir)
    return info.model_uri, agent_dir, uri


def test_signature_makes_the_state_optional(logged_model):
    import mlflow

    from veorl.serving import initial_state

    model_uri, agent_dir, uri = logged_model
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    schema = model.metadata.get_input_schema()
    assert schema.required_input_names() == ["image"]
    assert sorted(schema.optional_input_names()) == ["deter", "prev_action", "stoch"]
    state = initial_state(model, batch=2)
    assert state["deter"].shape[0] == 2 and state["prev_action"].shape == (2, 4)

    from veorl.agent import Agent

    agent = Agent.load(str(agent_dir))
    image = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    without = model.predict({"image": image})
    with_zeros = model.predict({"image": image, **state})
    expected, _ = agent.act(image, agent.initial_state(2))
    assert np.allclose(without["action"], expected, atol=1e-6)
    assert all(np.allclose(without[k], with_zeros[k], atol=1e-6) for k in with_zeros)
    with pytest.raises(Exception, match="part of the state"):
        model.predict({"image": image, "deter": state["deter"]})


def test_an_episode_over_http(logged_model, tmp_path):
    """Three steps against `mlflow models serve`: no state at first, then the returned state each time."""
    from veorl.agent import Agent

    model_uri, agent_dir, uri = logged_model
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(REPO))
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "server never answered /ping"
            time.sleep(0.5)

        agent = Agent.load(str(agent_dir))
        frames = np.random.default_rng(5).integers(0, 256, (3, 1, 64, 64, 3), dtype=np.uint8)
        local_state = agent.initial_state(1)
        state: dict[str, list] = {}
        states_seen = []
        for step in range(3):
            reply = _post(base + "/invocations", {"inputs": {"image": frames[step].tolist(), **state}})
            out = reply["predictions"]
            assert set(out) == {"action", "deter", "stoch", "prev_action"}
            action = np.asarray(out["action"], np.float32)
            assert action.shape == (1, 4) and np.all(np.abs(action) <= 1.0)
            expected, local_state = agent.act(frames[step], local_state)
            assert np.allclose(action, expected, atol=1e-5), f"step {step}"
            state = {k: v for k, v in out.items() if k != "action"}
            assert {k: np.shape(v) for k, v in state.items()} == {k: v.shape for k, v in local_state.items()}
            states_seen.append(np.asarray(state["deter"]))
        assert not np.allclose(states_seen[0], states_seen[1]) and not np.allclose(states_seen[1], states_seen[2])
        assert np.abs(states_seen[0]).sum() > 0  # not the zero state handed back
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
