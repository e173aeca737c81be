"""End-of-stage diagnostics: the figures mean what they say, thresholds warn, the CLI prints them."""

import json
import logging

import numpy as np

from veorl.diagnostics import DIAGNOSTICS_FILE, action_probe_r2, check


def test_action_probe_sees_a_code_that_names_the_action_and_not_a_random_one():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(40, 9))
    centres = rng.normal(size=(4, 3))
    actions = centres[codes] + 0.01 * rng.normal(size=(40, 9, 3))
    assert action_probe_r2(codes, actions, train_rows=20) > 0.99
    shuffled = rng.integers(0, 4, size=(40, 9))
    assert action_probe_r2(shuffled, actions, train_rows=20) < 0.1


def test_check_warns_only_past_thresholds(caplog):
    healthy = {
        "codebook": {"target_perplexity": 12.0, "reversed_distinct": 0.9},
        "policy": {"action_spread": 0.4, "share_at_bounds": 0.1},
    }
    collapsed = {
        "codebook": {"target_perplexity": 1.1, "reversed_distinct": 0.0},
        "policy": {"action_spread": 0.0, "share_at_bounds": 1.0},
    }
    with caplog.at_level(logging.WARNING, logger="veorl.diagnostics"):
        assert check(healthy, "agent") == []
        warnings = check(collapsed, "agent")
    assert len(warnings) == 4
    assert any("policy.action_spread" in w and "collapse" in w for w in warnings)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 4


def test_diagnose_cli_prints_figures_and_flags_crossed_ones(tmp_path, capsys):
    from veorl.diagnose import main

    artifact = tmp_path / "agent"
    artifact.mkdir()
    (artifact / DIAGNOSTICS_FILE).write_text(json.dumps({"policy": {"action_spread": 0.001, "share_at_bounds": 0.2}}))
    assert main([str(artifact)]) == 1
    out = capsys.readouterr().out
    assert "policy.action_spread" in out and "<--" in out and "policy.share_at_bounds" in out
    assert main([str(tmp_path / "missing")]) == 2
