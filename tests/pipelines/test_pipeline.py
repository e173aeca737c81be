"""The Kubeflow pipeline: golden compile, wiring, stage documents, CLI, and a local end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines import steps
from pipelines.veorl_pipeline import (
    DEFAULT_GPU_IMAGE,
    DEFAULT_IMAGE,
    PACKAGE_PATH,
    CompileOptions,
    build_pipeline,
    compile_pipeline,
)
from veorl.config import ConfigError, load_params
from veorl.storage import read_json

REPO = Path(__file__).resolve().parents[2]
STEPS = ("resolve-config", "source-videos", "ingest", "collect", "pretrain", "finetune", "evaluate", "register")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "veorl.yaml", CompileOptions())
    return {"text": path.read_text(), "spec": yaml.safe_load(path.read_text())}


def test_checked_in_yaml_is_what_the_code_compiles(compiled):
    assert PACKAGE_PATH.read_text() == compiled["text"], (
        "pipelines/veorl_pipeline.yaml is stale: run `python -m pipelines.cli compile` (or `make compile`)"
    )


def test_compilation_is_deterministic(tmp_path, compiled):
    again = compile_pipeline(tmp_path / "again.yaml", CompileOptions()).read_text()
    assert again == compiled["text"]


GPUS_PER_NODE = "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"


def _executors(spec: dict) -> dict:
    return spec["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict:
    return spec["root"]["dag"]["tasks"]


def test_dag_order_and_hash_wiring(compiled):
    tasks = _tasks(compiled["spec"])
    assert set(tasks) == set(STEPS)
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert depends["ingest"] == {"resolve-config", "source-videos"}
    assert depends["pretrain"] == {"resolve-config", "ingest", "collect"}
    assert depends["finetune"] == {"resolve-config", "pretrain", "collect", "ingest"}
    assert depends["evaluate"] == {"resolve-config", "finetune"}
    assert depends["register"] == {"resolve-config", "finetune", "evaluate"}

    def producer(task: str, parameter: str) -> str:
        source = tasks[task]["inputs"]["parameters"][parameter]["taskOutputParameter"]
        return f"{source['producerTask']}.{source['outputParameterKey']}"

    # Each step's cache key holds the content hash of every upstream artifact and its own configuration.
    assert producer("ingest", "videos_hash") == "source-videos.Output"
    assert producer("pretrain", "clips_hash") == "ingest.Output"
    assert producer("pretrain", "episodes_hash") == "collect.Output"
    assert producer("finetune", "world_model_hash") == "pretrain.Output"
    assert producer("evaluate", "agent_hash") == "finetune.Output"
    assert producer("register", "evaluation_hash") == "evaluate.Output"
    for task in STEPS[1:]:
        assert producer(task, "config") == f"resolve-config.{task.replace('-', '_')}"
    assert tasks["register"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["pretrain"]["cachingOptions"]["enableCache"] is True


def test_images_resources_and_gpus(compiled):
    executors = _executors(compiled["spec"])
    for step in STEPS:
        container = executors[f"exec-{step}"]["container"]
        gpu = step in ("pretrain", "finetune")
        assert container["image"] == (DEFAULT_GPU_IMAGE if gpu else DEFAULT_IMAGE)
        resources = container["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"]
        if gpu:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            # GPUs per node are a pipeline parameter (default: the compile option, 1)
            assert resources["accelerator"]["resourceCount"] == GPUS_PER_NODE
            assert {"name": "VEORL_TRAINER_IMAGE", "value": DEFAULT_GPU_IMAGE} in container["env"]
        else:
            assert "accelerator" not in resources
        # Lightweight component: the body calls the component's `run`, the function DVC and Docker run too.
        body = container["command"][-1]
        if step != "resolve-config":
            assert f"from components.{step.replace('-', '_')} import run" in body
            assert "tree_hash" not in body  # the step returns the hash its component recorded


def test_compile_options_and_image_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VEORL_IMAGE", "registry.example.org/veorl:abc-cpu")
    monkeypatch.delenv("VEORL_GPU_IMAGE", raising=False)
    options = CompileOptions.from_env(
        gpus=2,
        accelerator="amd.com/gpu",
        env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        resources={"pretrain": ("16", "64G")},
    )
    spec = yaml.safe_load(compile_pipeline(tmp_path / "custom.yaml", options).read_text())
    executors = _executors(spec)
    assert executors["exec-ingest"]["container"]["image"] == "registry.example.org/veorl:abc-cpu"
    assert executors["exec-finetune"]["container"]["image"] == DEFAULT_GPU_IMAGE
    pretrain = executors["exec-pretrain"]["container"]
    accelerator = {"resourceCount": GPUS_PER_NODE, "resourceType": "amd.com/gpu", "type": "amd.com/gpu"}
    assert pretrain["resources"]["accelerator"] == accelerator
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["gpus_per_node"] == 2 and defaults["num_nodes"] == 1
    assert (
        pretrain["resources"]["resourceCpuRequest"] == "16" and pretrain["resources"]["resourceMemoryRequest"] == "64G"
    )
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in executors["exec-register"]["container"][
        "env"
    ]
    no_gpu = yaml.safe_load(compile_pipeline(tmp_path / "cpu.yaml", CompileOptions(gpus=0)).read_text())
    assert "accelerator" not in _executors(no_gpu)["exec-pretrain"]["container"]["resources"]


def test_stage_params_mirror_dvc_yaml():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for stage, spec in dvc["stages"].items():
        assert tuple(spec["params"]) == steps.STAGE_PARAMS[stage], f"dvc.yaml stage {stage} reads other params"
    assert set(dvc["stages"]) == set(steps.STAGE_PARAMS)


def _documents(overrides: list[str], knobs: dict | None = None) -> dict[str, str]:
    knobs = {"task": "", "algo": "", "model_name": "", **(knobs or {})}
    return steps.resolve_stage_documents("smoke", overrides, knobs)


@pytest.fixture
def repo_params(monkeypatch):
    monkeypatch.setenv(steps.PARAMS_ENV, str(REPO / "params.yaml"))


def test_stage_documents_change_only_where_a_stage_reads(repo_params, params):
    base = _documents([])
    changed = _documents(["finetune.policy_steps=7"], {"algo": "bc"})
    assert {stage for stage in base if base[stage] != changed[stage]} == {"finetune"}
    finetune = steps.params_for_stage(changed["finetune"])
    assert finetune.finetune.policy_steps == 7 and finetune.finetune.algo == "bc"
    assert finetune.model.deter == params().model.deter  # the smoke preset's sizes

    task_changed = _documents([], {"task": "button-press"})
    assert {s for s in base if base[s] != task_changed[s]} == {"source_videos", "collect"}
    assert steps.params_for_stage(task_changed["collect"]).collect.task == "button-press"
    # The documented widening: a key cross-checked against a stage's keys is in that stage's document too.
    source_len = _documents(["pretrain.source_len=4"])
    assert {s for s in base if base[s] != source_len[s]} == {"ingest", "pretrain"}


def test_stage_keys_are_the_read_keys_plus_their_cross_checked_partners():
    assert steps.stage_keys("finetune") == (
        "preset",
        "domain",
        "model",
        "finetune",
        "tracking",
        "ingest.size",
        "collect.size",
    )
    assert steps.stage_keys("ingest") == ("preset", "domain", "ingest", "pretrain.source_len", "model.image_size")
    assert steps.stage_keys("source_videos") == ("preset", "domain", "source_videos", "collect.task")
    assert steps.stage_keys("register") == ("preset", "domain", "register", "tracking")
    for stage, read in steps.STAGE_PARAMS.items():
        assert set(read) <= set(steps.stage_keys(stage)) | {"preset"}


@pytest.mark.parametrize(
    "bad, key",
    [
        (["pretrain.source_len=30"], "pretrain.source_len"),  # > the smoke window of 12
        (["collect.task=door-open"], "source_videos.tasks"),  # a source task is the target
        (["ingest.size=32"], "ingest.size"),
        (["collect.size=32"], "collect.size"),
    ],
)
def test_cross_checked_groups_are_the_checks_params_runs(bad, key, params):
    """Each group of CROSS_CHECKED names the keys of a real Params check (so the stage documents carry them)."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        params(*bad)
    assert any(key in group for group in steps.CROSS_CHECKED)


VALID_EDGE_CASES = [
    ["ingest.window=40", "pretrain.source_len=30", "finetune.source_len=30"],
    ["collect.task=door-open", "source_videos.tasks=[handle-press]"],
    ["ingest.window=6", "pretrain.source_len=5", "finetune.source_len=5"],
]


@pytest.mark.parametrize("overrides", VALID_EDGE_CASES)
def test_every_stage_document_validates_in_full_and_keeps_the_users_values(repo_params, overrides):
    """A valid configuration never fails in a step, and each step sees the validated value of every key it reads."""
    full = load_params(REPO / "params.yaml", preset="smoke", overrides=overrides)
    full_dump = full.model_dump(by_alias=True, mode="json")
    for stage, document in _documents(overrides).items():
        params = steps.params_for_stage(document)
        dump = params.model_dump(by_alias=True, mode="json")
        for key in steps.stage_keys(stage):
            assert steps._select(dump, key) == steps._select(full_dump, key), (stage, key)


def test_stage_documents_are_validated_again_in_the_step(repo_params):
    document = json.loads(_documents(["ingest.window=40", "pretrain.source_len=30"])["pretrain"])
    assert document["ingest"] == {"window": 40, "size": 64}
    assert steps.params_for_stage(json.dumps(document)).pretrain.source_len == 30
    document["ingest"]["window"] = 12  # a document no resolve-config produced: the cross-check runs in the step
    with pytest.raises(ConfigError, match="pretrain.source_len"):
        steps.params_for_stage(json.dumps(document))
    document["ingest"] = {"window": 40, "size": 64, "nonexistent": 1}
    with pytest.raises(ConfigError, match="nonexistent"):
        steps.params_for_stage(json.dumps(document))
    with pytest.raises(ConfigError, match="preset"):
        steps.params_for_stage('{"ingest": {}}')
    with pytest.raises(ConfigError, match="not JSON"):
        steps.params_for_stage("{")
    with pytest.raises(ConfigError, match="pretrain.source_len"):
        _documents(["pretrain.source_len=30"])  # 30 > the smoke window of 12: resolve-config refuses it first
    with pytest.raises(ConfigError, match="nonexistent"):
        _documents(["ingest.nonexistent=1"])
    with pytest.raises(ValueError, match="unknown pipeline knobs"):
        steps.knob_overrides({"gpu": "1"})


def test_external_sources_are_recorded_with_a_content_hash_and_ingested_as_listed(tmp_path, params):
    from components.ingest import expand_recorded_sources
    from components.source_videos import EXTERNAL_SOURCES, run_external
    from veorl.storage import artifact_hash

    smoke = params()
    video = tmp_path / "raw" / "a.mp4"
    video.parent.mkdir()
    video.write_bytes(b"first")
    out = tmp_path / "videos"
    run_external([str(video.parent)], str(out), smoke)
    assert read_json(out / EXTERNAL_SOURCES)["sources"] == [str(video.parent)]
    first = artifact_hash(out)
    assert read_json(out / "provenance.json")["content_hash"] == first
    assert [str(s) for s in expand_recorded_sources([str(out), str(video)])] == [str(video.parent), str(video)]
    run_external([str(video.parent)], str(tmp_path / "again"), smoke)
    assert artifact_hash(tmp_path / "again") == first  # the hash follows the videos' content, not the folder
    video.write_bytes(b"second")
    run_external([str(video.parent)], str(tmp_path / "changed"), smoke)
    assert artifact_hash(tmp_path / "changed") != first
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_external([str(tmp_path / "missing")], str(tmp_path / "x"), smoke)


def test_cli_compile_and_submit(tmp_path, monkeypatch, capsys):
    import kfp

    from pipelines import cli

    out = tmp_path / "pipeline.yaml"
    assert cli.main(["compile", "--out", str(out), "--image", "my/cpu:1", "--gpus", "0"]) == 0
    spec = yaml.safe_load(out.read_text())
    assert _executors(spec)["exec-collect"]["container"]["image"] == "my/cpu:1"

    submitted = {}

    class RecordingClient:  # stands in for a KFP endpoint: records what would be sent
        def __init__(self, host, existing_token=None, namespace="kubeflow"):
            submitted.update(host=host, token=existing_token)

        def create_run_from_pipeline_package(
            self,
            package,
            arguments,
            run_name,
            experiment_name,
            namespace,
            pipeline_root,
            enable_caching,
            service_account,
        ):
            submitted.update(
                spec=yaml.safe_load(Path(package).read_text()),
                arguments=arguments,
                root=pipeline_root,
                experiment=experiment_name,
                caching=enable_caching,
            )
            return type("Run", (), {"run_id": "run-123"})()

        def upload_pipeline(self, package, pipeline_name, namespace):
            submitted.update(uploaded=yaml.safe_load(Path(package).read_text()), name=pipeline_name)
            return type("Pipeline", (), {"pipeline_id": "p-1"})()

        def get_pipeline_id(self, name):
            return None

    monkeypatch.setattr(kfp, "Client", RecordingClient)
    monkeypatch.setenv("KFP_TOKEN", "token-from-env")
    code = cli.main(
        [
            "submit",
            "--host",
            "https://kfp.example.org",
            "--preset",
            "paper",
            "--task",
            "button-press",
            "--set",
            "finetune.policy_steps=100",
            "--video-source",
            "s3://videos/raw/",
            "--no-cache",
            "--pipeline-root",
            "s3://kfp-artifacts/veorl",
            "--image",
            "my/cpu:2",
            "--gpu-image",
            "my/cuda:2",
        ]
    )
    assert code == 0
    assert submitted["host"] == "https://kfp.example.org" and submitted["token"] == "token-from-env"
    assert submitted["arguments"] == {
        "preset": "paper",
        "task": "button-press",
        "overrides": ["finetune.policy_steps=100"],
        "video_sources": ["s3://videos/raw/"],
    }
    assert submitted["caching"] is False and submitted["experiment"] == "veorl"
    assert _executors(submitted["spec"])["exec-finetune"]["container"]["image"] == "my/cuda:2"
    assert submitted["root"] == "s3://kfp-artifacts/veorl"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"] == "run-123"

    assert cli.main(["upload", "--host", "https://kfp.example.org", "--package", str(out)]) == 0
    assert (
        submitted["name"] == "veorl"
        and _executors(submitted["uploaded"])["exec-collect"]["container"]["image"] == "my/cpu:1"
    )
    # A new version of a pipeline that does not exist is a clear error, with the token never echoed.
    assert cli.main(["upload", "--host", "https://kfp.example.org", "--version", "v2", "--package", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no pipeline named 'veorl'" in err and "token-from-env" not in err


@pytest.mark.slow
def test_local_pipeline_run_registers_a_champion(tmp_path, monkeypatch, mlflow_store):
    """The whole DAG on the smoke preset with kfp.local (75 s to 3 min on 2 shared cores, hence slow)."""
    import mlflow
    import numpy as np
    from kfp import local

    from veorl.data.clips import clips_hash
    from veorl.data.episodes import dataset_hash
    from veorl.serving import initial_state
    from veorl.storage import artifact_hash, tree_hash

    uri = mlflow_store
    monkeypatch.chdir(REPO)  # the SubprocessRunner imports `components`/`pipelines` from the working directory
    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    outcome = build_pipeline(CompileOptions())(preset="smoke")
    assert outcome.output == "models:/veorl-agent/1"

    run_dir = next(root.glob("veorl-*"))
    registration = read_json(run_dir / "register" / "registration" / "registration.json")
    assert registration["alias"] == "champion" and registration["version"] == "1"
    agent_dir = run_dir / "finetune" / "agent"
    assert registration["agent_hash"] == artifact_hash(agent_dir)
    evaluation_dir = run_dir / "evaluate" / "evaluation"
    evaluation = read_json(evaluation_dir / "metrics.json")
    assert evaluation["status"] == "ok" and evaluation["protocol"]["episodes"] == 2
    assert read_json(evaluation_dir / "provenance.json")["upstream"]["agent"] == artifact_hash(agent_dir)

    # Each producing step recorded its artifact's hash once, and the hash the KFP step passed on is that record.
    recorded = {}
    for task, artifact in (
        ("source-videos", "videos"),
        ("ingest", "clips"),
        ("collect", "episodes"),
        ("evaluate", "evaluation"),
    ):
        recorded[task] = read_json(run_dir / task / artifact / "provenance.json")["content_hash"]
        assert read_json(run_dir / task / "executor_output.json")["parameterValues"]["Output"] == recorded[task]
    assert recorded["ingest"] == clips_hash(run_dir / "ingest" / "clips", recorded=False)
    assert recorded["collect"] == dataset_hash(run_dir / "collect" / "episodes", recorded=False)
    assert recorded["evaluate"] == tree_hash(evaluation_dir, exclude=("provenance.json",))

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/veorl-agent@champion")
    result = model.predict({"image": np.zeros((1, 64, 64, 3), np.uint8), **initial_state(model)})
    assert result["action"].shape == (1, 4) and np.all(np.abs(result["action"]) <= 1.0)
    stages = {
        run.data.tags.get("veorl.stage") for run in mlflow.search_runs(experiment_names=["veorl"], output_format="list")
    }
    assert {"pretrain", "finetune", "evaluate", "register"} <= stages


def test_a_torchrun_step_hands_its_parameters_to_the_component_unchanged(tmp_path):
    """gpus_per_node > 1: the step writes its validated Params for the component's --params (pipelines.training)."""
    from pipelines.training import write_params
    from tests.builders import smoke_params
    from veorl.config import load_params

    for params in (smoke_params("pretrain.batch=3", "finetune.algo=bc"), smoke_params(preset="paper")):
        assert load_params(write_params(params, tmp_path)) == params
