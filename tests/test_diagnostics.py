"""End-of-stage diagnostics: the figures mean what they say, thresholds warn, the CLI prints them."""

import json
import logging

import numpy as np
import pytest

from veorl.diagnostics import DIAGNOSTICS_FILE, action_probe_r2, check


def test_action_probe_sees_a_code_that_names_the_action_and_not_a_random_one():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(40, 9))
    centres = rng.normal(size=(4, 3))
    actions = centres[codes] + 0.01 * rng.normal(size=(40, 9, 3))
    assert action_probe_r2(codes, actions, train_rows=20) > 0.99
    shuffled = rng.integers(0, 4, size=(40, 9))
    assert action_probe_r2(shuffled, actions, train_rows=20) < 0.1


def test_discrete_action_usage_counts_what_is_played():
    import torch

    from veorl.diagnostics import action_usage

    played = torch.tensor([0, 0, 0, 2]).repeat(5)
    one_hot = torch.nn.functional.one_hot(played, 5).float()
    usage = action_usage(one_hot, discrete=True)
    assert usage["top_action_share"] == pytest.approx(0.75) and usage["distinct_actions"] == 2
    assert usage["action_entropy"] == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert usage["action_mean"] == pytest.approx([0.75, 0, 0.25, 0, 0])
    assert "share_at_bounds" not in usage  # a one-hot vector always sits at the bounds: not a finding
    # a bc mean in [-1, 1] counts by its argmax, as the environment plays it
    assert action_usage(one_hot * 1.8 - 0.9, discrete=True)["top_action_share"] == pytest.approx(0.75)
    collapsed = action_usage(torch.nn.functional.one_hot(torch.full((8,), 3), 5).float(), discrete=True)
    assert collapsed["top_action_share"] == 1.0 and collapsed["action_entropy"] == 0.0
    assert any("top_action_share" in w for w in check({"policy": collapsed}, "agent"))
    assert check({"policy": usage}, "agent") == []
    continuous = action_usage(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), discrete=False)
    assert continuous["action_spread"] == pytest.approx(0.625) and continuous["share_at_bounds"] == 0.5


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


class _Store:
    """Episodes of the given lengths; each step's reward is its episode's index, so picks can be read back."""

    def __init__(self, lengths: list[int], absorbing: bool = False):
        self.lengths = np.array(lengths)
        self.absorbing = absorbing

    def __len__(self) -> int:
        return len(self.lengths)

    def episode(self, i: int) -> dict[str, np.ndarray]:
        n = int(self.lengths[i])
        return {
            "image": np.full((n, 4, 4, 3), i, np.uint8),
            "action": np.ones((n, 2), np.float32),
            "reward": np.full(n, float(i), np.float32),
            "discount": np.ones(n, np.float32),
        }


def test_target_windows_leave_out_episodes_shorter_than_a_window():
    from veorl.diagnostics import target_windows

    windows = target_windows(_Store([20, 40, 5, 32]), count=6, length=32, seed=0)
    assert windows["image"].shape == (6, 32, 4, 4, 3)
    assert set(np.unique(windows["reward"])) == {1.0, 3.0}  # the 20- and 5-step episodes are never read
    with pytest.raises(ValueError, match="at least 32 steps; the longest has 20"):
        target_windows(_Store([20, 5]), count=2, length=32, seed=0)
    # a store that samples absorbing steps (the game's) pads when no episode is long enough, as training does
    padded = target_windows(_Store([20, 5], absorbing=True), count=2, length=32, seed=0)
    assert padded["action"].shape == (2, 32, 2) and not padded["action"][:, 20:].any()
