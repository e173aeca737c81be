"""Parameters: presets, precedence, and errors that name the key and the reason."""

import subprocess
import sys

import pytest
import yaml

from veorl.config import PRESETS, ConfigError, load_params, parameters_markdown, resolve


def test_defaults_are_the_release_numbers():
    p = resolve({}, preset="paper")
    assert (p.pretrain.batch, p.pretrain.seq_len, p.pretrain.source_len) == (50, 50, 25)
    assert (p.model.deter, p.model.stoch, p.model.hidden, p.model.codebook_size, p.model.latent_action_dim) == (
        200,
        50,
        200,
        50,
        8,
    )
    assert (p.pretrain.phase1_steps, p.pretrain.phase2_steps, p.finetune.policy_steps) == (40_000, 40_000, 50_000)
    assert p.finetune.lambda_ == 0.95 and p.finetune.critic_optim.lr == 8e-5 and p.pretrain.optim.lr == 3e-4
    # A documented deviation (docs/architecture.md): the behaviour-regularised actor learns at TD3+BC's rate.
    assert p.finetune.actor_optim.lr == 3e-4


def test_presets_change_sizes_only_never_algorithm_switches():
    algorithm_keys = {
        "algo",
        "guidance",
        "use_intrinsic",
        "use_latent_action",
        "use_mmd",
        "pretrained_encoder",
        "ban_on_source",
        "rssm_kind",
        "mmd_weight",
        "kl_balance",
        "free_nats",
        "phase2_free_nats",
        "vq_beta",
        "discount",
        "lambda",
        "quality",
        "starts",
        "task",
        "forward_weight",
        "return_norm",
        "actor_bc_weight",
        "actor_bc_loss",
        "ensemble_size",
        "uncertainty_weight",
    }

    def keys(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")
            else:
                yield prefix + k

    for name, overlay in PRESETS.items():
        touched = {k.rsplit(".", 1)[-1] for k in keys(overlay)}
        assert not touched & algorithm_keys, f"preset {name} changes algorithm keys {touched & algorithm_keys}"


def test_precedence_preset_then_file_then_override(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"preset": "smoke", "pretrain": {"batch": 7}}))
    p = load_params(f)
    assert (
        p.preset == "smoke" and p.pretrain.batch == 7 and p.pretrain.seq_len == PRESETS["smoke"]["pretrain"]["seq_len"]
    )
    p = load_params(f, preset="cpu", overrides=["pretrain.batch=3", "finetune.lambda=0.5", "collect.quality=expert"])
    assert p.preset == "cpu" and p.pretrain.batch == 3 and p.finetune.lambda_ == 0.5 and p.collect.quality == "expert"
    assert p.model.deter == PRESETS["cpu"]["model"]["deter"]


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"ingest": {"windw": 5}}, "ingest.windw: unknown key"),
        ({"pretrain": {"optim": {"lr": -1}}}, "pretrain.optim.lr: Input should be greater than 0"),
        ({"collect": {"quality": "great"}}, "collect.quality: Input should be 'expert', 'medium' or 'mixed'"),
        ({"finetune": {"algo": "ppo"}}, "finetune.algo"),
        ({"bogus_stage": {}}, "bogus_stage: unknown key"),
        ({"model": {"image_size": 96}}, "model.image_size"),
        ({"collect": {"task": "door-open"}}, "must not contain the target task"),
        ({"pretrain": {"source_len": 40}}, "pretrain.source_len (40) exceeds ingest.window"),
        ({"domain": "driving", "collect": {"starts": "cycle"}}, "collect: starts='cycle' needs a"),
    ],
)
def test_invalid_params_name_key_and_reason(raw, fragment):
    with pytest.raises(ConfigError) as info:
        resolve(raw)
    assert fragment in str(info.value)


def test_bad_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="preset: must be one of"):
        resolve({"preset": "huge"})
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        resolve({}, overrides=["pretrain.batch"])
    with pytest.raises(ConfigError, match="is not a section"):
        resolve({}, overrides=["preset=cpu", "preset.x=1"])
    with pytest.raises(ConfigError, match="preset: must be one of"):
        resolve({}, overrides=["preset.x=1"])


def test_invalid_yaml_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)


def test_repo_params_file_is_valid_and_cli_reports_errors():
    p = load_params("params.yaml")
    assert p.preset == "cpu"
    out = subprocess.run(
        [sys.executable, "-m", "veorl.config", "--set", "evaluate.episodes=0"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "evaluate.episodes" in out.stdout


def test_markdown_reference_lists_every_leaf():
    table = parameters_markdown()
    for key in ("`ingest.window`", "`finetune.lambda`", "`pretrain.optim.lr`", "`register.margin`"):
        assert key in table


def test_parameter_reference_doc_is_in_sync():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "parameters.md").read_text()
    assert parameters_markdown() in doc, "regenerate: python -m veorl.config --markdown (see docs/parameters.md)"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_resolved_configuration_is_one_document_that_validates_again(preset):
    """What a pipeline step receives: the validated configuration as JSON, validated in full once more."""
    import json

    overrides = ["ingest.window=30", "pretrain.source_len=28"]
    params = resolve({"finetune": {"lambda": 0.9}}, preset=preset, overrides=overrides)
    document = json.loads(json.dumps(params.model_dump(by_alias=True, mode="json")))
    again = resolve(document)
    assert again == params and again.finetune.lambda_ == 0.9 and again.pretrain.source_len == 28
    document["ingest"]["window"] = 20  # the document is checked again, cross-section checks included
    with pytest.raises(ConfigError, match="pretrain.source_len"):
        resolve(document)
