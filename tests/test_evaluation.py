"""Evaluation: the CLI's outputs on a live simulator, and loud failures for broken policies."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.builders import smoke_params
from veorl.agent import Agent, build_agent_modules, save_agent
from veorl.evaluation import EpisodeResult, EvaluationError, evaluate_agent, play_episode, summarise, upscale

REPO = Path(__file__).resolve().parents[1]
EPISODE_LENGTH = 5


def tiny_agent(root: Path, poison: bool = False) -> Path:
    """An untrained agent at smoke sizes; `poison` fills the actor's output layer with NaN."""
    model = smoke_params().model
    meta = {
        "algo": "veorl",
        "env": "metaworld",
        "task": "drawer-open",
        "camera": "corner",
        "image_size": 64,
        "action_dim": 4,
        "episode_length": EPISODE_LENGTH,
        "action_kind": "continuous",
        "model": model.model_dump(mode="json"),
        "use_latent_action": True,
        "bc": None,
    }
    torch.manual_seed(0)
    modules = build_agent_modules(meta)
    if poison:
        with torch.no_grad():
            modules["actor"].net.net[-1].weight.fill_(float("nan"))  # the MLP's output layer
    return save_agent(root, modules, meta)


def test_evaluate_cli_writes_metrics_episodes_videos_and_plot(tmp_path, mlflow_store):
    agent = tiny_agent(tmp_path / "agent")
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        "-m",
        "components.evaluate",
        "--preset",
        "smoke",
        "--agent",
        str(agent),
        "--out",
        str(out),
        "--set",
        "evaluate.video_size=128",
        "--no-progress",
    ]
    # the subprocess inherits MLFLOW_TRACKING_URI (the test's store) from mlflow_store
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["algo"] == "veorl" and metrics["task"] == "drawer-open"
    assert metrics["protocol"] == {
        "env": "metaworld",
        "task": "drawer-open",
        "camera": "corner",
        "episode_length": EPISODE_LENGTH,
        "episodes": 2,
        "seed": 1000,
    }
    with open(out / "episodes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["episode"]) for r in rows] == [0, 1] and all(int(r["length"]) == EPISODE_LENGTH for r in rows)
    returns = [float(r["return"]) for r in rows]
    assert metrics["episodes"] == 2 and metrics["mean_return"] == pytest.approx(np.mean(returns), rel=1e-5)
    assert metrics["std_return"] == pytest.approx(np.std(returns), rel=1e-4, abs=1e-6)
    assert metrics["success_rate"] == pytest.approx(np.mean([int(r["success"]) for r in rows]))
    assert metrics["mean_length"] == EPISODE_LENGTH
    import av

    videos = sorted((out / "rollouts").glob("*.mp4"))
    assert [v.name for v in videos] == ["episode_000.mp4"]
    with av.open(str(videos[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == EPISODE_LENGTH + 1 and frames[0].shape == (128, 128, 3)  # first obs + one per step, upscaled
    assert (out / "returns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = json.loads((out / "provenance.json").read_text())
    assert set(provenance["upstream"]) == {"agent"}


def test_nan_policy_fails_with_episode_and_step(tmp_path):
    agent = tiny_agent(tmp_path / "agent", poison=True)
    with pytest.raises(EvaluationError, match=r"episode 0 \(seed 7\), step 0: the policy produced a non-finite action"):
        evaluate_agent(agent, episodes=2, seed=7, workers=1, progress=False)


def test_failed_evaluation_exits_nonzero_and_leaves_no_score(tmp_path, mlflow_store, capsys):
    from components.evaluate import main

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"status": "ok", "success_rate": 1.0}))  # stale, from an earlier run
    agent = tiny_agent(tmp_path / "agent", poison=True)
    assert main(["--preset", "smoke", "--agent", str(agent), "--out", str(out), "--no-progress"]) == 1
    assert "no score reported" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_a_crashing_policy_is_reported_with_its_step(tmp_path):
    from veorl.envs import make_env

    class CrashesAtStepTwo:
        action_dim = 4

        def __init__(self):
            self.calls = 0

        def initial_state(self, batch):
            return {}

        def act(self, image, state):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return np.zeros((1, 4), np.float32), state

    env = make_env("metaworld", "drawer-open", camera="corner", size=64, episode_length=EPISODE_LENGTH, seed=0)
    try:
        with pytest.raises(
            EvaluationError, match=r"episode 4 \(seed 9\), step 2: the policy crashed: RuntimeError: boom"
        ):
            play_episode(CrashesAtStepTwo(), env, episode=4, seed=9, max_steps=EPISODE_LENGTH)
    finally:
        env.close()


def test_missing_agent_is_a_clear_error(tmp_path, mlflow_store, capsys):
    from components.evaluate import main

    assert main(["--preset", "smoke", "--agent", str(tmp_path / "nothing"), "--out", str(tmp_path / "eval")]) == 2
    assert "agent.json not found" in capsys.readouterr().err


def test_summary_statistics_and_upscaling():
    results = [EpisodeResult(0, 0, 10.0, True, 5), EpisodeResult(1, 1, 20.0, False, 7)]
    assert summarise(results) == {
        "episodes": 2,
        "mean_return": 15.0,
        "std_return": 5.0,
        "success_rate": 0.5,
        "success_std": 0.5,
        "mean_length": 6.0,
    }
    with pytest.raises(EvaluationError):
        summarise([])
    frame = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    big = upscale(frame, 4)
    assert big.shape == (4, 4, 3) and np.array_equal(big[:2, :2], np.broadcast_to(frame[0, 0], (2, 2, 3)))


def test_a_sampled_evaluation_repeats_itself_and_differs_from_the_deterministic_one(tmp_path):
    agent = tiny_agent(tmp_path / "agent")
    first = evaluate_agent(agent, episodes=2, seed=3, workers=1, progress=False, policy="sample")
    again = evaluate_agent(agent, episodes=2, seed=3, workers=1, progress=False, policy="sample")
    mode = evaluate_agent(agent, episodes=2, seed=3, workers=1, progress=False)
    assert [r.ret for r in first] == [r.ret for r in again]  # each episode restarts its stream at its seed
    assert [r.ret for r in first] != pytest.approx([r.ret for r in mode], rel=1e-6)


@pytest.mark.slow
def test_parallel_workers_give_the_same_episodes_as_one_process(tmp_path):
    agent = tiny_agent(tmp_path / "agent")
    serial = evaluate_agent(agent, episodes=3, seed=11, workers=1, progress=False)
    parallel = evaluate_agent(agent, episodes=3, seed=11, workers=2, progress=False)
    assert [(r.episode, r.seed, r.length, r.success) for r in serial] == [
        (r.episode, r.seed, r.length, r.success) for r in parallel
    ]
    assert [r.ret for r in serial] == pytest.approx([r.ret for r in parallel], rel=1e-5)
    assert Agent.load(str(agent)).meta["episode_length"] == EPISODE_LENGTH


# ------------------------------------------------------------------------------------------------
# scripts/compare.py: statistics over seeds, skipping finished runs, the results document
# ------------------------------------------------------------------------------------------------


def _compare_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_script", REPO / "scripts" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_statistics_by_hand():
    compare = _compare_module()
    stats = compare.seed_statistics([0.2, 0.4, 0.6])
    # mean 0.4; sample variance ((0.2)^2 + 0 + (0.2)^2) / 2 = 0.04 -> std 0.2; t_{0.975,2} = 4.303
    half = 4.303 * 0.2 / 3**0.5
    assert stats["mean"] == pytest.approx(0.4) and stats["std"] == pytest.approx(0.2)
    assert (stats["ci_low"], stats["ci_high"]) == pytest.approx((0.4 - half, 0.4 + half))
    assert compare.seed_statistics([0.5])["std"] is None


def test_collision_rate_is_tabled_only_when_every_run_reports_it():
    compare = _compare_module()
    ok = {"success_rate": 0.5, "mean_return": 10.0}
    driving = {"veorl": {0: {**ok, "collision_rate": 0.2}, 1: {**ok, "collision_rate": 0.4}}}
    table = compare.aggregate(driving)
    assert table["veorl"]["collision_rate"]["mean"] == pytest.approx(0.3)
    header, rule, row = compare.markdown_table(table).splitlines()
    assert header.endswith("| collision rate: mean | std | 95% CI |") and rule.count("|") == header.count("|")
    assert row.count("|") == header.count("|") and "| 0.300 |" in row
    mixed = compare.aggregate({**driving, "bc": {0: ok}})  # bc's run says nothing about collisions: no column
    assert "collision rate" not in compare.markdown_table(mixed)


def _fake_finished_run(compare, results: Path, algo: str, seed: int, success: float, ret: float, **kw) -> Path:
    """What a finished (algo, seed) run leaves: eval/metrics.json (status ok) and, unless `inputs` is None, the
    agent's provenance (the settings it was trained with at the smoke preset, the hashes of the inputs it read)."""
    from veorl.algo.baselines import switches
    from veorl.algo.finetune import upstream_hashes
    from veorl.config import load_params

    task, inputs = kw.get("task", "drawer-open"), kw.get("inputs")
    path = compare.run_dir(results, algo, seed)
    (path / "eval").mkdir(parents=True, exist_ok=True)
    protocol = {"env": "metaworld", "task": task, "camera": "corner", "episode_length": 200, "episodes": 4}
    metrics = {"status": "ok", "success_rate": success, "mean_return": ret, "task": task, "algo": algo}
    (path / "eval" / "metrics.json").write_text(json.dumps({**metrics, "protocol": {**protocol, "seed": 1000}}))
    if inputs is not None:
        overrides = [f"finetune.algo={algo}", f"finetune.seed={seed}", *kw.get("overrides", [])]
        params = load_params("params.yaml", preset="smoke", overrides=overrides)
        (path / "agent").mkdir(exist_ok=True)
        upstream = upstream_hashes(str(inputs), str(inputs), None, switches(params.finetune))
        (path / "agent" / "provenance.json").write_text(
            json.dumps({"config": params.section_dict("model", "finetune"), "upstream": upstream})
        )
    return path


def _fake_snapshots(run: Path, points: dict[int, tuple[float, float]], final_updates: int) -> None:
    """What a run with --snapshot-every leaves besides its final evaluation: an evaluation per snapshot
    (curve/updates-N/metrics.json) and the agent's record of its updates (json keys sorted, as agents write them)."""
    for updates, (success, ret) in points.items():
        out = run / "curve" / f"updates-{updates:06d}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"status": "ok", "success_rate": success, "mean_return": ret}))
    (run / "agent").mkdir(exist_ok=True)
    trained = {"policy": final_updates, "world_model": 2 * final_updates}  # the phase counted is not the last key
    (run / "agent" / "agent.json").write_text(json.dumps({"trained_updates": trained}, sort_keys=True))


def _compare_argv(inputs: Path, results: Path, doc: Path, figure: Path, *extra: str) -> list[str]:
    return [
        *("--world-model", str(inputs), "--episodes", str(inputs), "--results", str(results)),
        *("--doc", str(doc), "--figure", str(figure), "--preset", "smoke", "--in-process", *extra),
    ]


def test_compare_skips_finished_runs_and_writes_the_document(tmp_path):
    compare = _compare_module()
    results = tmp_path / "results"
    # The inputs are empty folders: their content hash exists, but training from them would fail the run.
    (tmp_path / "none").mkdir()
    for (algo, seed), (success, ret) in {
        ("veorl", 0): (0.5, 100.0),
        ("veorl", 1): (1.0, 300.0),
        ("dreamerv2", 0): (0.0, 50.0),
        ("dreamerv2", 1): (0.5, 70.0),
    }.items():
        _fake_finished_run(compare, results, algo, seed, success, ret, inputs=tmp_path / "none")
    doc, figure = tmp_path / "docs" / "results.md", tmp_path / "docs" / "results.png"
    # Any attempt to train instead of skipping would fail the run (no episodes, no world model).
    argv = _compare_argv(tmp_path / "none", results, doc, figure, "--algos", "veorl", "dreamerv2", "--seeds", "0", "1")
    # Finished runs made with other settings are not passed off as results of this comparison.
    assert compare.main(argv + ["--set", "finetune.discount=0.5"]) == 1
    assert not doc.exists()
    code = compare.main(argv)
    assert code == 0
    text = doc.read_text()
    # veorl: success mean 0.75, std sqrt(0.125) = 0.354, t_{0.975,1} = 12.706
    # -> half width 12.706 * 0.354 / sqrt(2) = 3.176
    assert "| veorl | 2 | 0.750 | 0.354 | [-2.426, 3.926] | 200.0 | 141.4 |" in text
    assert "| dreamerv2 | 2 | 0.250 | 0.354 |" in text
    assert "![" in text and "(results.png)" in text
    # a new document: the title, the intro, then the task's section with its heading one level down
    assert text.startswith(compare.DOC_TITLE + "\n\n" + compare.DOC_INTRO + "\n\n<!-- compare:drawer-open -->\n")
    assert "## drawer-open (smoke preset)" in text and "### Protocol" in text and "### Per seed" in text
    assert text.endswith("<!-- /compare:drawer-open -->\n") and text.count("are not comparable to the paper") == 1
    assert figure.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["table"]["veorl"]["per_seed"]["1"] == {"success_rate": 1.0, "mean_return": 300.0}
    # --report-only tabulates what has finished and starts nothing: training seed 2 here would fail the run.
    assert compare.main([*argv, "--seeds", "0", "1", "2", "--report-only"]) == 0
    assert "| veorl | 2 | 0.750 |" in doc.read_text()


def test_another_evaluation_of_finished_agents_goes_to_its_own_folders_without_training(tmp_path, monkeypatch):
    compare = _compare_module()
    inputs, results = tmp_path / "none", tmp_path / "results"
    inputs.mkdir()
    snapshots = ["finetune.snapshot_every=5"]
    run = _fake_finished_run(compare, results, "veorl", 0, 0.5, 100.0, inputs=inputs, overrides=snapshots)
    _fake_snapshots(run, {5: (0.0, 10.0)}, final_updates=10)
    (run / "finetune.json").write_text("{}")
    (run / "snapshots" / "updates-000005").mkdir(parents=True)
    (run / "snapshots" / "updates-000005" / "agent.json").write_text("{}")
    calls = []

    def fake_stage(args, module, argv, log_path, label):  # an evaluation that scores 0.9 wherever it is pointed
        calls.append((module, argv[argv.index("--out") + 1] if "--out" in argv else None, log_path.name))
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"status": "ok", "success_rate": 0.9, "mean_return": 5.0}))

    monkeypatch.setattr(compare, "run_stage", fake_stage)
    doc, figure = tmp_path / "results.md", tmp_path / "results.png"
    argv = _compare_argv(inputs, results, doc, figure, "--algos", "veorl", "--seeds", "0", "--snapshot-every", "5")
    assert compare.main([*argv, "--evaluation", "sampled", "--set", "evaluate.policy=sample"]) == 0
    # the agent was complete: only evaluations ran, into eval-sampled/ and curve-sampled/
    assert [c[0] for c in calls] == ["evaluate", "evaluate"]
    assert calls[0][1:] == (str(run / "eval-sampled"), "evaluate-sampled.log")
    assert calls[1][1] == str(run / "curve-sampled" / "updates-000005")
    assert (run / "learning_curve-sampled.csv").read_text().splitlines()[1:] == ["5,0.9,5.0", "10,0.9,5.0"]
    assert json.loads((run / "eval" / "metrics.json").read_text())["success_rate"] == 0.5  # the original stays
    assert "| veorl | 1 | 0.900 |" in doc.read_text()
    assert json.loads((results / "summary-sampled.json").read_text())["table"]["veorl"]["seeds"] == [0]
    assert not (results / "summary.json").exists()  # the default evaluation's summary is not overwritten
    # a second call reuses both; the default evaluation is read as before
    calls.clear()
    assert compare.main([*argv, "--evaluation", "sampled", "--set", "evaluate.policy=sample"]) == 0
    assert calls == []
    assert compare.main([*argv, "--report-only"]) == 0 and "| veorl | 1 | 0.500 |" in doc.read_text()
    # an agent trained with other settings is not evaluated as if it belonged to this comparison
    shutil.rmtree(run / "eval-sampled")
    other = [*argv, "--evaluation", "sampled", "--set", "finetune.discount=0.5"]
    assert compare.main(other) == 1 and calls == []
    assert compare.main([*argv, "--evaluation", "../up"]) == 2


def test_runs_recorded_before_a_setting_existed_count_as_its_legacy_value(tmp_path):
    """A finished run whose provenance predates a setting (no precision, compile or domain recorded) matches an
    invocation that sets the value the code had before (fp32, not compiled) and not one that changes it."""
    compare = _compare_module()
    inputs, results = tmp_path / "none", tmp_path / "results"
    inputs.mkdir()
    run = _fake_finished_run(compare, results, "bc", 0, 0.5, 10.0, inputs=inputs, overrides=["finetune.precision=fp32"])
    provenance = json.loads((run / "agent" / "provenance.json").read_text())
    for key in ("precision", "compile"):
        del provenance["config"]["finetune"][key]
    del provenance["config"]["domain"]
    (run / "agent" / "provenance.json").write_text(json.dumps(provenance))
    args = compare.build_parser().parse_args(_compare_argv(inputs, results, tmp_path / "d.md", tmp_path / "f.png"))
    args.overrides = ["finetune.precision=fp32"]
    assert compare.stale_reason(run, args, "bc", 0) is None
    args.overrides = ["finetune.precision=bf16"]
    assert "finetune.precision" in compare.stale_reason(run, args, "bc", 0)
    args.overrides = ["finetune.precision=fp32", "finetune.discount=0.5"]
    assert "finetune.discount" in compare.stale_reason(run, args, "bc", 0)
    args.overrides = ["finetune.precision=fp32", "finetune.snapshot_every=7"]  # snapshots do not change the agent
    assert compare.stale_reason(run, args, "bc", 0) is None


def test_a_setting_the_algorithm_never_reads_does_not_make_its_run_another_agent(tmp_path):
    """bc never reads the model-based actor's behaviour term: a bc run recorded with another actor_bc_loss is still
    today's bc run, and its row lists no difference for it; a veorl run with another value is stale."""
    from veorl.config import load_params
    from veorl.trees import flatten

    compare = _compare_module()
    inputs, results = tmp_path / "none", tmp_path / "results"
    inputs.mkdir()
    nll = ["finetune.actor_bc_loss=nll", "finetune.actor_bc_weight=2"]
    bc = _fake_finished_run(compare, results, "bc", 0, 0.5, 10.0, inputs=inputs, overrides=nll)
    veorl = _fake_finished_run(compare, results, "veorl", 0, 0.5, 10.0, inputs=inputs, overrides=nll)
    args = compare.build_parser().parse_args(_compare_argv(inputs, results, tmp_path / "d.md", tmp_path / "f.png"))
    args.overrides = ["finetune.actor_bc_loss=mse"]
    assert compare.stale_reason(bc, args, "bc", 0) is None
    assert "finetune.actor_bc_loss" in compare.stale_reason(veorl, args, "veorl", 0)
    assert "finetune.actor_bc_weight" in compare.stale_reason(veorl, args, "veorl", 0)
    args.overrides = ["finetune.actor_bc_loss=mse", "finetune.bc_steps=7"]  # one bc reads
    assert "finetune.bc_steps" in compare.stale_reason(bc, args, "bc", 0)

    def config(*overrides: str) -> dict:
        return flatten(load_params("params.yaml", preset="smoke", overrides=list(overrides)).section_dict("finetune"))

    sources = [
        {"label": "veorl", "algo": "veorl", "config": config("finetune.actor_bc_loss=mse")},
        {"label": "bc", "algo": "bc", "config": config("finetune.algo=bc", *nll)},
        {"label": "veorl, nll", "algo": "veorl", "config": config(*nll)},
    ]
    compare.settings_differences(sources)
    assert sources[1]["differs"] == ['finetune.algo="bc"']
    assert sources[2]["differs"] == ['finetune.actor_bc_loss="nll"', "finetune.actor_bc_weight=2.0"]


def test_compare_sections_of_two_tasks_share_one_document(tmp_path):
    compare = _compare_module()
    inputs, doc = tmp_path / "none", tmp_path / "docs" / "results.md"
    inputs.mkdir()
    drawer, handle = tmp_path / "drawer", tmp_path / "handle"
    for seed, success in ((0, 0.5), (1, 1.0)):
        run = _fake_finished_run(compare, drawer, "veorl", seed, success, 100.0, inputs=inputs)
        _fake_snapshots(run, {5: (0.0, 10.0)}, final_updates=10)
    _fake_finished_run(compare, handle, "bc", 0, 0.25, 40.0, inputs=inputs, task="handle-press")
    drawer_argv = _compare_argv(inputs, drawer, doc, tmp_path / "docs" / "results_drawer-open.png", "--report-only")
    handle_argv = _compare_argv(inputs, handle, doc, tmp_path / "docs" / "results_handle-press.png", "--report-only")
    assert compare.main([*drawer_argv, "--algos", "veorl", "--seeds", "0", "1"]) == 0
    # text written by hand outside the sections, before and after them
    doc.write_text(doc.read_text().replace("<!-- compare:", "A hand-written paragraph.\n\n<!-- compare:", 1) + "\nEnd.")
    notes = tmp_path / "notes.md"
    notes.write_text("- bc presses the handle.\n")
    assert compare.main([*handle_argv, "--algos", "bc", "--seeds", "0", "--notes", str(notes)]) == 0
    both = doc.read_text()
    assert both.count("<!-- compare:drawer-open -->") == 1 and both.count("<!-- /compare:handle-press -->") == 1
    assert "| veorl | 2 | 0.750 |" in both and "| bc | 1 | 0.250 | n/a | n/a | 40.0 | n/a | n/a |" in both
    assert "\nEnd.\n\n<!-- compare:handle-press -->\n## handle-press (smoke preset)" in both  # appended at the end
    assert "### Observations\n\n- bc presses the handle." in both and "(results_handle-press.png)" in both
    assert "### Learning curves" in both.split("<!-- compare:handle-press -->")[0]  # drawer-open's only
    assert "(results_drawer-open_curves.png)" in both and "results_handle-press_curves" not in both
    assert both.startswith(compare.DOC_TITLE + "\n\n" + compare.DOC_INTRO + "\n\nA hand-written paragraph.\n")
    # Re-running one task replaces its own section only: everything else stays byte for byte.
    _fake_finished_run(compare, drawer, "veorl", 1, 0.0, 100.0, inputs=inputs)
    assert compare.main([*drawer_argv, "--algos", "veorl", "--seeds", "0", "1"]) == 0
    again = doc.read_text()
    start, end = "<!-- compare:drawer-open -->", "<!-- /compare:drawer-open -->"
    assert again.split(start)[0] == both.split(start)[0] and again.split(end)[1] == both.split(end)[1]
    assert "| veorl | 2 | 0.250 |" in again and "| veorl | 2 | 0.750 |" not in again
    # an explicit key and title; a document with a broken section is left alone
    assert compare.main([*handle_argv, "--algos", "bc", "--seeds", "0", "--section", "hp", "--title", "Other"]) == 0
    assert "<!-- compare:hp -->\n## Other\n" in doc.read_text()
    doc.write_text(doc.read_text().replace("<!-- /compare:hp -->", ""))
    broken = doc.read_text()
    assert compare.main([*handle_argv, "--algos", "bc", "--seeds", "0", "--section", "hp"]) == 2
    assert doc.read_text() == broken
    assert compare.main([*handle_argv, "--algos", "bc", "--section", "no spaces"]) == 2
    assert compare.replace_section("", "k", "body") == "<!-- compare:k -->\nbody\n<!-- /compare:k -->\n"


def test_compare_tabulates_ablation_rows_from_their_own_folders(tmp_path, capsys):
    compare = _compare_module()
    full, no_intrinsic = tmp_path / "compare", tmp_path / "ablations" / "no_intrinsic"
    (tmp_path / "none").mkdir()
    for seed, success in ((0, 0.5), (1, 1.0)):  # seed 1: no provenance, seed 0's settings stand for the row
        inputs = tmp_path / "none" if seed == 0 else None
        snapshots = ["finetune.snapshot_every=500"]  # bookkeeping, not a difference between rows
        _fake_finished_run(compare, full, "veorl", seed, success, 200.0, inputs=inputs, overrides=snapshots)
    _fake_finished_run(compare, full, "dreamerv2", 0, 0.3, 90.0)  # no provenance at all
    # the full agent was recorded before finetune.discount_head existed: its legacy value is no difference
    provenance = compare.run_dir(full, "veorl", 0) / "agent" / "provenance.json"
    recorded = json.loads(provenance.read_text())
    del recorded["config"]["finetune"]["discount_head"]
    provenance.write_text(json.dumps(recorded))
    off = ["finetune.use_intrinsic=false"]  # each row has its own overrides: no staleness check against this command
    _fake_finished_run(compare, no_intrinsic, "veorl", 0, 0.0, 50.0, inputs=tmp_path / "none", overrides=off)
    (compare.run_dir(no_intrinsic, "veorl", 1) / "checkpoints").mkdir(parents=True)  # still training: left out
    doc, figure = tmp_path / "results.md", tmp_path / "results_ablations.png"
    ablations = [
        *("--ablation", f"veorl (full)={full}", "--ablation", f"no intrinsic reward={no_intrinsic}"),
        *("--ablation", f"no video (= dreamerv2)={full}@dreamerv2", "--ablation", f"later={tmp_path / 'later'}"),
    ]
    argv = ["--algos", "veorl", "--doc", str(doc), "--figure", str(figure), "--results", str(tmp_path / "s")]
    argv += ["--preset", "smoke", *ablations, "--intro", "One component off per row."]
    assert compare.main(argv) == 2  # ablation rows are read, never trained
    assert not doc.exists()
    assert compare.main([*argv, "--report-only"]) == 0
    text = doc.read_text()
    assert "<!-- compare:drawer-open-ablations -->\n## drawer-open: ablations (smoke preset)\n\nOne component" in text
    assert "| veorl (full) | 2 | 0.750 | 0.354 |" in text
    assert "| no intrinsic reward | 1 | 0.000 | n/a | n/a | 50.0 | n/a | n/a |" in text
    assert "| no video (= dreamerv2) | 1 | 0.300 |" in text
    assert "agent/provenance.json" in text and "(results_ablations.png)" in text
    assert f"- veorl (full): `veorl` runs in `{full}` (seeds 0, 1)\n" in text
    assert (
        f"- no intrinsic reward: `veorl` runs in `{no_intrinsic}` (seeds 0); settings other than veorl (full)'s: "
        "`finetune.use_intrinsic=false`\n" in text
    )
    assert "(seeds 0); no provenance.json to read its settings from" in text
    assert f"- later: `veorl` runs in `{tmp_path / 'later'}`: none finished yet (not in the table)" in text
    assert "| later |" not in text
    assert figure.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "s" / "summary-drawer-open-ablations.json").read_text())
    assert summary["table"]["no intrinsic reward"]["seeds"] == [0]
    err = capsys.readouterr().err
    assert "ablation 'no intrinsic reward': read" in err and "seed-0" in err and "left out: seed-1" in err
    # several algorithms without @ALGO: one row per (name, algorithm)
    assert compare.main([*argv[2:], "--report-only", "--algos", "veorl", "dreamerv2", "--section", "x"]) == 0
    assert "| veorl (full): dreamerv2 | 1 | 0.300 |" in doc.read_text()


def test_learning_curves_are_aggregated_per_update_count_and_plotted(tmp_path):
    compare = _compare_module()
    curves = {
        "veorl": {
            0: [
                {"updates": 50, "success_rate": 0.0, "mean_return": 100.0},
                {"updates": 100, "success_rate": 0.5, "mean_return": 300.0},
            ],
            1: [
                {"updates": 50, "success_rate": 0.2, "mean_return": 140.0},
                {"updates": 100, "success_rate": 0.3, "mean_return": 200.0},
            ],
        },
        "bc": {0: [{"updates": 100, "success_rate": 0.1, "mean_return": 120.0}]},
    }
    out = compare.aggregate_curves(curves)
    first, last = out["veorl"]
    assert (first["updates"], first["seeds"], last["updates"]) == (50, 2, 100)
    assert first["success_rate"]["mean"] == pytest.approx(0.1) and last["mean_return"]["mean"] == pytest.approx(250.0)
    assert last["mean_return"]["std"] == pytest.approx((2 * 50.0**2) ** 0.5)  # sample std of 300, 200
    assert out["bc"][0]["success_rate"]["std"] is None  # one seed: no spread
    compare.curve_chart(tmp_path / "curves.png", out, "drawer-open")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # a run's curve: its snapshots' evaluations, then the final agent's at the policy phase's update count
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({"status": "ok", "success_rate": 0.5, "mean_return": 300.0}))
    assert compare.read_learning_curve(run) is None  # no snapshots
    _fake_snapshots(run, {50: (0.0, 100.0)}, final_updates=100)
    assert compare.read_learning_curve(run) == curves["veorl"][0]
    assert compare.final_updates({"bc": 7}) == 7


def test_compare_reports_a_failed_run_and_exits_nonzero(tmp_path, mlflow_store):
    compare = _compare_module()
    code = compare.main(
        [
            "--world-model",
            str(tmp_path / "none"),
            "--episodes",
            str(tmp_path / "none"),
            "--algos",
            "bc",
            "--seeds",
            "0",
            "--results",
            str(tmp_path / "r"),
            "--doc",
            str(tmp_path / "d.md"),
            "--figure",
            str(tmp_path / "f.png"),
            "--preset",
            "smoke",
            "--in-process",
        ]
    )
    assert code == 1  # nothing finished: no table, no document claiming a score
    assert not (tmp_path / "d.md").exists()


@pytest.mark.slow
def test_compare_runs_finetune_and_evaluate_per_seed(tmp_path, mlflow_store, episode_builder):
    compare = _compare_module()
    episodes = episode_builder("episodes")
    args = [
        "--world-model",
        str(tmp_path / "unused"),
        "--episodes",
        str(episodes),
        "--algos",
        "bc",
        "dreamerv2",
        "--seeds",
        "0",
        "1",
        "--results",
        str(tmp_path / "r"),
        "--doc",
        str(tmp_path / "results.md"),
        "--figure",
        str(tmp_path / "results.png"),
        "--preset",
        "smoke",
        "--set",
        "evaluate.videos=0",
        "--in-process",
    ]
    assert compare.main(args) == 0
    for algo in ("bc", "dreamerv2"):
        for seed in (0, 1):
            assert (
                json.loads((tmp_path / "r" / algo / f"seed-{seed}" / "eval" / "metrics.json").read_text())["status"]
                == "ok"
            )
    assert "| bc | 2 |" in (tmp_path / "results.md").read_text()


def test_diagnostics_vs_success_ranks_with_ties_and_reads_finished_runs(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dvs", REPO / "scripts" / "diagnostics_vs_success.py")
    dvs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dvs)
    assert dvs.mean_ranks([3.0, 1.0, 3.0, 2.0]) == [2.5, 0.0, 2.5, 1.0]
    assert dvs.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert dvs.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # by hand: ranks x (0, 1, 2), y (0.5, 0.5, 2) -> centred (-1, 0, 1), (-0.5, -0.5, 1) -> 1.5 / sqrt(2 * 1.5)
    assert dvs.spearman([1, 2, 3], [0.1, 0.1, 0.9]) == pytest.approx(1.5 / 3**0.5)
    for seed, (success, ratio) in enumerate([(0.9, 1.1), (0.5, 1.8), (0.1, 2.9)]):
        run = tmp_path / f"seed-{seed}"
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "metrics.json").write_text(json.dumps({"status": "ok", "success_rate": success}))
        reward = {"predicted_over_simulator": ratio, "correlation": 0.0}
        (run / "eval" / "diagnostics.json").write_text(json.dumps({"reward": reward}))
    (tmp_path / "seed-3" / "eval").mkdir(parents=True)  # still evaluating: left out
    assert dvs.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "over 3 runs" in out and "predicted/simulator reward: -1.00 (3 runs)" in out
    assert "action spread" in out.splitlines()[0] and "share at bounds: " not in out.split("Spearman")[1]
    # the correlation is 0.0 in every run: no ranking to correlate, said in words rather than as nan
    assert "reward correlation: undefined, the diagnostic is constant over these runs (3 runs)" in out
    assert "nan" not in out
    # another evaluation's success, and the held-out reward check of scripts/heldout_reward.py
    for seed, (success, ratio) in enumerate([(0.2, 1.3), (0.6, 1.1), (0.8, 0.9)]):
        run = tmp_path / f"seed-{seed}"
        (run / "eval-v").mkdir()
        (run / "eval-v" / "metrics.json").write_text(json.dumps({"status": "ok", "success_rate": success}))
        (run / "heldout").mkdir()
        (run / "heldout" / "diagnostics.json").write_text(json.dumps({"reward": {"predicted_over_data": ratio}}))
    assert dvs.main(["--evaluation", "eval-v", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out predicted/recorded reward: -1.00 (3 runs)" in out
    assert "| 0.20 |" in out.splitlines()[2]  # seed-0's success read from eval-v
    assert "predicted/simulator reward" in out and "predicted/simulator reward: " not in out.split("Spearman")[1]


def test_random_policy_script_holds_a_constant_action_and_reports_collisions(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("random_policy", REPO / "scripts" / "random_policy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = [
        "--env",
        "highway",
        "--task",
        "highway",
        "--camera",
        "topdown",
        "--episodes",
        "2",
        "--episode-length",
        "5",
    ]
    assert script.main([*common, "--constant", "0", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("constant action [0.0, 0.0] on highway, 2 episodes") and "collision rate" in out
    with pytest.raises(SystemExit):
        script.main([*common, "--constant", "0"])
    assert "--constant needs 2 values" in capsys.readouterr().err


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_latent_probe_scores_held_out_scenes():
    probe = _script("probe_latent_state")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12))
    groups = np.repeat(np.arange(20), 20)
    # one column a linear function of x, one pure noise: R^2 near 1 and at most about 0 on held-out groups
    y = np.stack([x @ rng.normal(size=12) + 0.01 * rng.normal(size=400), rng.normal(size=400)], -1)
    r2 = probe.grouped_ridge_r2(x, y, groups, penalty=1.0)
    assert r2[0] > 0.99 and r2[1] < 0.05


def test_the_probe_and_the_replay_run_on_an_agent(tmp_path, capsys):
    agent = tiny_agent(tmp_path / "agent")
    assert _script("probe_latent_state").main([str(agent), "--variations", "5", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("10 states from 5 variations") and out.count("| latent state |") == 3
    assert _script("replay_episode").main([str(agent), "--episodes", "1", "--every", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("episode 1 (seed 1001): hand [") and len(out) == 1 + 3  # steps 0, 2, 4 (the last)


def test_snapshot_selection_picks_by_the_logged_criterion_and_compares_with_the_last_agent(tmp_path, capsys):
    script = _script("snapshot_selection")
    folder = tmp_path / "veorl"
    for seed, curve in enumerate([{500: 0.2, 1000: 0.8, 1500: 0.5}, {500: 0.2, 1000: 0.4, 1500: 0.6}]):
        run = folder / f"seed-{seed}"
        run.mkdir(parents=True)
        lines = ["updates,success_rate,mean_return"] + [f"{u},{s},0.0" for u, s in curve.items()]
        (run / "learning_curve.csv").write_text("\n".join(lines) + "\n")
        rows = ["step,phase,phase_step,imagined_return,uncertainty,loss", "25,world_model,25,,,3.0"]
        for step in range(25, 1501, 25):
            # uncertainty lowest around 1000 updates (seed 0) or 500 (seed 1); imagined return rising throughout
            low = 1000 if seed == 0 else 500
            rows.append(f"{1000 + step},policy,{step},{step / 100},{abs(step - low) / 100 + 1},")
        (run / "finetune_curve.csv").write_text("\n".join(rows) + "\n")
    bc = tmp_path / "bc" / "seed-0"
    bc.mkdir(parents=True)
    (bc / "learning_curve.csv").write_text("updates,success_rate,mean_return\n500,0.1,0\n1000,0.2,0\n")
    (bc / "finetune_curve.csv").write_text("step,phase,phase_step,bc_loss\n25,bc,25,1.0\n")

    run0 = script.score_run(folder / "seed-0", window=100)
    assert run0["last"] == 0.5 and run0["best"] == 0.8
    assert run0["uncertainty"] == 0.8  # lowest uncertainty: the 1000-update snapshot
    assert run0["imagined_return"] == 0.5  # highest imagined return: the last one
    assert "value" not in run0  # not logged: no pick
    assert script.score_run(bc, window=100) is None  # no policy phase

    assert script.main([str(folder), str(tmp_path / "bc")]) == 0
    out = capsys.readouterr().out
    assert "lowest uncertainty: 0.500 (last 0.550; better than last in 1, worse in 1 of 2 runs)" in out
    assert "highest imagined_return: 0.550 (last 0.550; better than last in 0, worse in 0 of 2 runs)" in out
    assert "bc: no run with a learning curve and a policy phase" in out


def test_heldout_reward_compares_the_reward_head_with_the_recorded_rewards_and_picks_the_least_optimistic(
    tmp_path, capsys
):
    from tests.builders import make_agent, write_episodes
    from veorl.agent import REWARD_HEAD_FILE, Agent
    from veorl.data.episodes import episode_files, load_episode
    from veorl.models.networks import DenseHead

    script = _script("heldout_reward")
    heldout = write_episodes(tmp_path / "heldout", episodes=2, length=7)
    recorded = np.concatenate([load_episode(p)["reward"][1:] for p in episode_files(heldout)])
    folder = tmp_path / "veorl"
    # seed-0's head predicts 0.5 per step, seed-1's 1.5 (stored in scaled units: reward_scale 2)
    for seed, (value, scale, success) in enumerate([(0.5, 1.0, 0.3), (1.5, 2.0, 0.9)]):
        agent_dir = make_agent(folder / f"seed-{seed}" / "agent", seed=seed, episode_length=6)
        meta = json.loads((agent_dir / "agent.json").read_text())
        model = meta["model"]
        meta["reward_head"] = {"units": model["head_units"], "layers": model["head_layers"], "reward_scale": scale}
        (agent_dir / "agent.json").write_text(json.dumps(meta))
        feat_dim = Agent.load(str(agent_dir)).modules["trunk_net"].feat_dim
        head = DenseHead(feat_dim, 1, model["head_units"], model["head_layers"])
        with torch.no_grad():
            last = head.mlp.net[-1]
            last.weight.zero_()
            last.bias.fill_(value * scale)
        torch.save(head.state_dict(), agent_dir / REWARD_HEAD_FILE)
        (folder / f"seed-{seed}" / "eval-x").mkdir()
        metrics = {"status": "ok", "success_rate": success}
        (folder / f"seed-{seed}" / "eval-x" / "metrics.json").write_text(json.dumps(metrics))

    assert script.main(["--episodes", str(heldout), "--evaluation", "eval-x", str(folder)]) == 0
    out = capsys.readouterr().out
    for seed, value in enumerate([0.5, 1.5]):
        written = json.loads((folder / f"seed-{seed}" / "heldout" / "diagnostics.json").read_text())["reward"]
        assert written["steps"] == len(recorded) == 12 and written["episodes"] == 2
        assert written["predicted_over_data"] == pytest.approx(value * len(recorded) / recorded.sum(), rel=1e-5)
        assert written["abs_error"] == pytest.approx(np.abs(value - recorded).mean(), rel=1e-5)
        assert math.isnan(written["correlation"])  # a constant prediction correlates with nothing
    # the least optimistic head (seed-0) is chosen: its success against the mean and the best seed
    assert "veorl: chosen 0.30" in out and "mean over 2 runs 0.60, best 0.90" in out
    # a second folder of the same runs: nothing replayed again, and the summary over folders
    shutil.copytree(folder, tmp_path / "again")
    (folder / "seed-1" / "agent" / REWARD_HEAD_FILE).unlink()  # a replay would now lose seed-1's head
    argv = ["--episodes", str(heldout), "--evaluation", "eval-x", str(folder), str(tmp_path / "again")]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("(reused)") == 4
    assert "Over 2 folders: chosen 0.300 against the mean over seeds 0.600; above the mean in 0, below in 2" in out
