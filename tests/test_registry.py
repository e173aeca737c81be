"""Registry promotion: the rule, its inputs, and registrations against a real MLflow sqlite store.

Agents here are real agent artifacts (veorl.agent's acting modules, freshly initialised with a fixed seed) so
the logged pyfunc model loads and acts; evaluations are metrics.json files in the evaluation component's format.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.builders import EVALUATION_PROTOCOL, make_agent, smoke_params, write_evaluation
from veorl.registry import (
    CHALLENGER,
    CHAMPION,
    Decision,
    EvaluationInfo,
    Standing,
    decide,
    protocol_differences,
    read_agent,
    read_evaluation,
)
from veorl.storage import artifact_hash

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory) -> Path:
    return make_agent(tmp_path_factory.mktemp("agent") / "agent", seed=0)


def evaluation(
    metrics_value: float | None = 0.5, problem: str | None = None, protocol: dict | None = None
) -> EvaluationInfo:
    metrics = {"success_rate": metrics_value, "protocol": protocol or EVALUATION_PROTOCOL, "status": "ok"}
    return EvaluationInfo("eval/metrics.json", "h", metrics, problem)


# ----------------------------------------------------------------------------------------------
# The rule (pure)
# ----------------------------------------------------------------------------------------------


def test_first_eligible_version_becomes_champion():
    decision = decide(evaluation(0.1), None, "success_rate", 0.0)
    assert decision == Decision(CHAMPION, decision.reason) and "no @champion" in decision.reason


@pytest.mark.parametrize(
    "value, best, margin, alias",
    [
        (0.6, 0.5, 0.0, CHAMPION),  # better
        (0.4, 0.5, 0.0, CHALLENGER),  # worse
        (0.5, 0.5, 0.0, CHALLENGER),  # a tie does not promote
        (0.55, 0.5, 0.1, CHALLENGER),  # better, but not by more than the margin
        (0.65, 0.5, 0.1, CHAMPION),  # better by more than the margin
    ],
)
def test_champion_only_when_beaten_by_more_than_margin(value, best, margin, alias):
    champion = Standing("3", {"success_rate": best}, dict(EVALUATION_PROTOCOL))
    decision = decide(evaluation(value), champion, "success_rate", margin)
    assert decision.alias == alias
    assert "v3" in decision.reason


def test_different_protocol_is_never_compared():
    champion = Standing("2", {"success_rate": 0.0}, dict(EVALUATION_PROTOCOL, episodes=10))
    decision = decide(evaluation(1.0), champion, "success_rate", 0.0)
    assert decision.alias == CHALLENGER
    assert "protocol differs" in decision.reason and "episodes" in decision.reason
    assert protocol_differences(EVALUATION_PROTOCOL, dict(EVALUATION_PROTOCOL, seed=7)) == [
        "seed: 1000 vs champion's 7"
    ]


def test_champion_without_protocol_is_not_comparable():
    decision = decide(evaluation(1.0), Standing("1", {"success_rate": 0.0}, None), "success_rate", 0.0)
    assert decision.alias == CHALLENGER and "no evaluation protocol" in decision.reason


def test_ineligible_evaluation_gets_no_alias_even_on_an_empty_registry():
    decision = decide(evaluation(1.0, problem="evaluation failed: x"), None, "success_rate", 0.0)
    assert decision.alias is None and "evaluation failed" in decision.reason


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "evaluation missing"),
        ("failed", "status 'failed'"),
        ("nan", "not a finite number"),
        ("other_task", "different task"),
        ("other_agent", "different agent"),
        ("garbage", "unreadable"),
    ],
)
def test_read_evaluation_flags_every_reason_not_to_promote(tmp_path, agent_dir, case, expected):
    eval_dir = tmp_path / "eval"
    if case == "failed":
        write_evaluation(eval_dir, agent_dir, 0.9, status="failed")
    elif case == "nan":
        write_evaluation(eval_dir, agent_dir, math.nan)
    elif case == "other_task":
        write_evaluation(eval_dir, agent_dir, 0.9, task="button-press")
    elif case == "other_agent":
        write_evaluation(eval_dir, make_agent(tmp_path / "other", seed=99), 0.9)
    elif case == "garbage":
        eval_dir.mkdir()
        eval_dir.joinpath("metrics.json").write_text("{not json")
    info = read_evaluation(eval_dir, read_agent(agent_dir), "success_rate")
    assert info.problem is not None and expected in info.problem
    ok = read_evaluation(write_evaluation(tmp_path / "good", agent_dir, 0.9), read_agent(agent_dir), "success_rate")
    assert ok.problem is None


def test_incomplete_agent_is_a_clear_error(tmp_path, mlflow_store, capsys):
    from components.register import main

    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "agent.pt").write_bytes(b"")
    code = main(
        [
            "--agent",
            str(tmp_path / "agent"),
            "--evaluation",
            str(tmp_path / "eval"),
            "--out",
            str(tmp_path / "registration.json"),
            "--preset",
            "smoke",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "agent.json" in err and "not a complete agent artifact" in err
    assert not (tmp_path / "registration.json").exists()


def test_served_model_handles_a_stateless_bc_agent(tmp_path):
    """The bc baseline has no recurrent state: the pyfunc takes only "image" and returns only "action"."""
    import torch
    from mlflow.models import infer_signature
    from mlflow.pyfunc import PythonModelContext

    from veorl.agent import Agent, build_agent_modules, save_agent
    from veorl.serving import AgentPolicy, example_io

    params = smoke_params()
    meta = {
        "algo": "bc",
        "env": "metaworld",
        "task": "drawer-open",
        "camera": "corner",
        "image_size": 64,
        "action_dim": 4,
        "episode_length": 40,
        "model": params.model.model_dump(mode="json"),
        "use_latent_action": False,
        "bc": {"units": 32, "layers": 2},
    }
    torch.manual_seed(0)
    save_agent(tmp_path / "bc", build_agent_modules(meta), meta)
    agent = Agent.load(str(tmp_path / "bc"))
    example_input, example_output = example_io(agent)
    assert set(example_input) == {"image"} and set(example_output) == {"action"}
    signature = infer_signature(example_input, example_output)
    assert [spec.name for spec in signature.inputs.inputs] == ["image"]

    policy = AgentPolicy()
    policy.load_context(PythonModelContext(artifacts={"agent": str(tmp_path / "bc")}, model_config={}))
    image = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    out = policy.predict(None, {"image": image})
    assert set(out) == {"action"} and np.allclose(out["action"], agent.act(image, {})[0])
    with pytest.raises(TypeError, match="dict of numpy arrays"):
        policy.predict(None, image)


# ----------------------------------------------------------------------------------------------
# Against a real MLflow store
# ----------------------------------------------------------------------------------------------


def _import_in_child(module: str) -> str:
    """Runs in a spawned process: import `module` and say which veorl package it came from."""
    import importlib

    importlib.import_module(module)
    import veorl

    return veorl.__file__


def test_model_code_is_the_whole_package(tmp_path):
    """The code logged with the model is every module of veorl, so whatever imports it serves is complete."""
    import veorl
    from veorl.serving import CODE_MARKER, _package_code_copy

    source = Path(veorl.__file__).parent
    copy = _package_code_copy(tmp_path)

    def modules(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*.py") if "__pycache__" not in p.parts}

    assert modules(copy) == modules(source) and len(modules(source)) > 20
    assert (copy / CODE_MARKER).is_file() and not list(copy.rglob("*.pyc"))


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion_version(uri: str, name: str = "veorl-agent") -> str:
    return str(_client(uri).get_model_version_by_alias(name, CHAMPION).version)


def test_promotion_sequence_and_served_model(tmp_path, mlflow_store):
    import mlflow

    from components.register import run
    from veorl.agent import Agent
    from veorl.serving import initial_state

    params = smoke_params()
    out = tmp_path / "registration.json"
    first = make_agent(tmp_path / "a1", seed=1)
    r1 = run(str(first), str(write_evaluation(tmp_path / "e1", first, 0.5)), str(out), params)
    assert (r1["alias"], r1["version"], r1["new_version"]) == (CHAMPION, "1", True)
    written = json.loads(out.read_text())
    assert written["version"] == "1" and written["provenance"]["upstream"]["agent"] == artifact_hash(first)

    # The registered model is a pyfunc: observation + recurrent state -> action + new state, as the agent acts.
    mlflow.set_tracking_uri(mlflow_store)
    model = mlflow.pyfunc.load_model("models:/veorl-agent@champion")
    state = initial_state(model, batch=2)
    image = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    served = model.predict({"image": image, **state})
    agent = Agent.load(str(first))
    action, new_state = agent.act(image, agent.initial_state(2))
    assert served["action"].shape == (2, 4) and np.allclose(served["action"], action, atol=1e-6)
    assert np.allclose(served["deter"], new_state["deter"], atol=1e-6)
    second_step = model.predict({"image": image, **{k: v for k, v in served.items() if k != "action"}})
    assert np.allclose(second_step["action"], agent.act(image, new_state)[0], atol=1e-6)

    # Loading the model in this process leaves it importing veorl from where it did: a process spawned now (as
    # ingestion and evaluation workers are) gets this checkout's veorl, complete, not the model's code copy.
    import veorl

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child_veorl = pool.submit(_import_in_child, "veorl.video.ingest").result(timeout=300)
    assert child_veorl == veorl.__file__

    # In a fresh process the model brings its own code: veorl is imported from the model, not from this checkout,
    # and that copy is the whole package (a module acting does not need imports from it too).
    probe = (
        f"import mlflow, numpy as np\nmlflow.set_tracking_uri({mlflow_store!r})\n"
        "m = mlflow.pyfunc.load_model('models:/veorl-agent@champion')\n"
        "from veorl.serving import initial_state\nimport veorl.agent, veorl.video.ingest\n"
        "out = m.predict({'image': np.zeros((1, 64, 64, 3), np.uint8), **initial_state(m)})\n"
        "print(veorl.agent.__file__, veorl.video.ingest.__file__, out['action'].shape)"
    )
    fresh = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    loaded_from, ingest_from, shape = fresh.stdout.strip().splitlines()[-1].split(" ", 2)
    assert not loaded_from.startswith(str(REPO)) and "/code/veorl/agent.py" in loaded_from and shape == "(1, 4)"
    assert ingest_from == loaded_from.replace("/agent.py", "/video/ingest.py")

    worse = make_agent(tmp_path / "a2", seed=2)
    r2 = run(str(worse), str(write_evaluation(tmp_path / "e2", worse, 0.25)), str(out), params)
    assert r2["alias"] == CHALLENGER and "does not beat" in r2["reason"]
    assert _champion_version(mlflow_store) == "1"

    better = make_agent(tmp_path / "a3", seed=3)
    r3 = run(str(better), str(write_evaluation(tmp_path / "e3", better, 0.75)), str(out), params)
    assert r3["alias"] == CHAMPION and r3["version"] == "3"
    assert _champion_version(mlflow_store) == "3"

    failed = make_agent(tmp_path / "a4", seed=4)
    r4 = run(str(failed), str(write_evaluation(tmp_path / "e4", failed, 1.0, status="failed")), str(out), params)
    assert r4["alias"] is None and r4["aliases_now"] == [] and "status 'failed'" in r4["reason"]
    assert _champion_version(mlflow_store) == "3"

    # Tags carry the evaluation and the provenance; the reason is recorded on the version.
    tags = _client(mlflow_store).get_model_version("veorl-agent", "2").tags
    assert tags["veorl.metric.success_rate"] == "0.25" and tags["veorl.decision"] == CHALLENGER
    assert json.loads(tags["veorl.protocol"]) == EVALUATION_PROTOCOL and tags["veorl.upstream.world_model"] == "wm-2"
    assert tags["veorl.agent_hash"] == artifact_hash(worse)

    # Idempotent: the same agent and evaluation again changes nothing.
    versions_before = len(_client(mlflow_store).search_model_versions("name = 'veorl-agent'"))
    again = run(str(better), str(tmp_path / "e3"), str(out), params)
    assert (again["version"], again["alias"], again["new_version"]) == ("3", CHAMPION, False)
    assert len(_client(mlflow_store).search_model_versions("name = 'veorl-agent'")) == versions_before
    assert _champion_version(mlflow_store) == "3"


def test_concurrent_registrations_leave_exactly_the_best_champion(tmp_path, mlflow_store):
    """Three `components.register` processes at once on one sqlite store: one champion, and it is the best."""
    scores = {"low": 0.2, "best": 0.9, "mid": 0.5}
    jobs = []
    for index, (label, score) in enumerate(scores.items()):
        agent = make_agent(tmp_path / f"agent-{label}", seed=10 + index)
        evaluation_dir = write_evaluation(tmp_path / f"eval-{label}", agent, score)
        jobs.append((label, agent, evaluation_dir))
    # Real, separate processes started together, each running the component's CLI as DVC or a container would.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "components.register",
                "--agent",
                str(agent),
                "--evaluation",
                str(ev),
                "--out",
                str(tmp_path / f"registration-{label}.json"),
                "--preset",
                "smoke",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label, agent, ev in jobs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]

    client = _client(mlflow_store)
    versions = client.search_model_versions("name = 'veorl-agent'")
    assert len(versions) == 3
    holders = [v for v in versions if CHAMPION in (client.get_model_version("veorl-agent", v.version).aliases or [])]
    assert len(holders) == 1
    best = json.loads((tmp_path / "registration-best.json").read_text())
    assert str(holders[0].version) == best["version"] and best["alias"] == CHAMPION
    outcomes = [json.loads((tmp_path / f"registration-{label}.json").read_text()) for label in scores]
    assert sorted(o["version"] for o in outcomes) == ["1", "2", "3"]


def test_optimistic_settle_recovers_a_lost_update(tmp_path, mlflow_store):
    """Without a lock (remote store), a stale registration that overwrites @champion is corrected by re-verification."""
    from veorl.registry import _settle_aliases, ensure_registered_model

    params = smoke_params("register.verify_delay=0.6")
    client = _client(mlflow_store)
    ensure_registered_model(client, "veorl-agent")
    source = str(tmp_path)  # the alias logic never opens the model files

    def add_version(score: float) -> tuple[str, EvaluationInfo]:
        info = evaluation(score)
        tags = {
            "veorl.metric.success_rate": str(score),
            "veorl.protocol": json.dumps(EVALUATION_PROTOCOL, sort_keys=True),
        }
        return str(client.create_model_version("veorl-agent", source, tags=tags).version), info

    first, _ = add_version(0.5)
    client.set_registered_model_alias("veorl-agent", CHAMPION, first)
    strong, strong_eval = add_version(0.9)
    stale, _ = add_version(0.7)

    overwritten = threading.Event()

    def stale_writer():  # a registration that decided against the old champion and sets the alias late
        other = _client(mlflow_store)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if str(other.get_model_version_by_alias("veorl-agent", CHAMPION).version) == strong:
                other.set_registered_model_alias("veorl-agent", CHAMPION, stale)
                overwritten.set()
                return
            time.sleep(0.01)

    writer = threading.Thread(target=stale_writer)
    writer.start()
    decision = _settle_aliases(client, "veorl-agent", strong, strong_eval, params, serialised=False)
    writer.join()
    assert overwritten.is_set(), "the stale write never happened, so re-verification was not exercised"
    assert decision.alias == CHAMPION
    assert _champion_version(mlflow_store) == strong


# ----------------------------------------------------------------------------------------------
# Promotion checks the evidence: per-episode records, the recorded content hash, the provenance
# ----------------------------------------------------------------------------------------------


def _register_cli(agent: Path, evaluation_dir: Path, out: Path) -> int:
    from components.register import main

    return main(["--agent", str(agent), "--evaluation", str(evaluation_dir), "--out", str(out), "--preset", "smoke"])


def _edit_metrics(evaluation_dir: Path, **changes) -> None:
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    (evaluation_dir / "metrics.json").write_text(json.dumps({**metrics, **changes}))


def _assert_refused(uri: str, out: Path, code: int, *reasons: str) -> dict:
    from veorl.registry import TAG_REFUSED

    assert code == 3
    outcome = json.loads(out.read_text())
    assert outcome["alias"] is None and outcome["aliases_now"] == [] and not outcome["promoted"]
    for reason in reasons:
        assert reason in outcome["refused"], outcome["refused"]
    tags = _client(uri).get_model_version("veorl-agent", outcome["version"]).tags
    assert tags[TAG_REFUSED] == outcome["refused"] and tags["veorl.decision"] == "none"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="alias"):
        _client(uri).get_model_version_by_alias("veorl-agent", CHAMPION)
    return outcome


def test_a_summary_the_episodes_do_not_give_is_refused(tmp_path, mlflow_store, capsys):
    """metrics.json edited to success_rate 1.0 while episodes.csv has no success: refused, even with the
    content hash recorded again after the edit (the records decide, not the summary)."""
    from veorl.storage import record_content_hash

    agent = make_agent(tmp_path / "agent", seed=21)
    evaluation_dir = write_evaluation(tmp_path / "eval", agent, 0.0)
    records = (evaluation_dir / "episodes.csv").read_text().splitlines()
    assert records == ["episode,return,success,length", "0,95.000000,0,40", "1,105.000000,0,40"]
    _edit_metrics(evaluation_dir, success_rate=1.0)
    record_content_hash(evaluation_dir)  # a writer that re-hashes after editing: the hash alone cannot catch it
    out = tmp_path / "registration.json"
    outcome = _assert_refused(
        mlflow_store, out, _register_cli(agent, evaluation_dir, out), "success_rate=1 but its 2 episode records"
    )
    assert "changed after they were hashed" not in outcome["refused"]
    assert "refused" in capsys.readouterr().err

    # Edited and not re-hashed: both the records and the hash say so.
    again = write_evaluation(tmp_path / "eval2", agent, 0.0)
    _edit_metrics(again, success_rate=1.0)
    _assert_refused(
        mlflow_store,
        out,
        _register_cli(agent, again, out),
        "give 0",
        "changed after they were hashed",
    )


def test_tampered_episode_records_are_refused_by_the_content_hash(tmp_path, mlflow_store):
    """episodes.csv and metrics.json forged together (they agree): the recorded content hash no longer matches."""
    agent = make_agent(tmp_path / "agent", seed=22)
    evaluation_dir = write_evaluation(tmp_path / "eval", agent, 0.0)
    csv_path = evaluation_dir / "episodes.csv"
    csv_path.write_text(csv_path.read_text().replace(",0,40", ",1,40"))
    _edit_metrics(evaluation_dir, success_rate=1.0)
    out = tmp_path / "registration.json"
    outcome = _assert_refused(
        mlflow_store, out, _register_cli(agent, evaluation_dir, out), "changed after they were hashed"
    )
    assert "episode records" not in outcome["refused"]  # the forged files agree with each other


def test_an_evaluation_naming_another_agent_is_refused(tmp_path, mlflow_store):
    agent = make_agent(tmp_path / "agent", seed=23)
    other = make_agent(tmp_path / "other", seed=24)
    evaluation_dir = write_evaluation(tmp_path / "eval", other, 0.5)
    out = tmp_path / "registration.json"
    _assert_refused(mlflow_store, out, _register_cli(agent, evaluation_dir, out), "different agent")

    unnamed = write_evaluation(tmp_path / "eval-unnamed", agent, 0.5)
    (unnamed / "provenance.json").write_text(json.dumps({"content_hash": artifact_hash(unnamed)}))
    _assert_refused(mlflow_store, out, _register_cli(agent, unnamed, out), "names no evaluated agent")


def test_an_untouched_evaluation_promotes_and_a_registration_file_inside_it_is_not_content(tmp_path, mlflow_store):
    agent = make_agent(tmp_path / "agent", seed=25)
    evaluation_dir = write_evaluation(tmp_path / "eval", agent, 0.5)
    out = evaluation_dir / "registration.json"  # where dvc.yaml puts it
    assert _register_cli(agent, evaluation_dir, out) == 0
    outcome = json.loads(out.read_text())
    assert outcome["alias"] == CHAMPION and outcome["refused"] is None
    assert "veorl.refused" not in _client(mlflow_store).get_model_version("veorl-agent", "1").tags
    assert _register_cli(agent, evaluation_dir, out) == 0  # a re-run still finds the files as hashed
    assert json.loads(out.read_text())["new_version"] is False
