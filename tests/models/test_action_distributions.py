"""The actor's action distributions: draws from a private generator (sampled evaluation) follow the distribution,
repeat with the generator's seed and leave torch's global stream alone."""

from __future__ import annotations

import torch

from veorl.models.actor_critic import OneHotCategorical, TruncatedNormal


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def test_one_hot_draws_from_a_generator_follow_the_softmax_and_repeat_with_its_seed():
    probs = torch.tensor([0.7, 0.2, 0.1])
    dist = OneHotCategorical(probs.log().expand(20000, 3))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    draws = dist.sample(_generator(5))
    assert torch.equal(torch.rand(1), before)  # the global stream did not move
    assert draws.shape == (20000, 3) and torch.equal(draws.sum(-1), torch.ones(20000))
    # 20000 draws: the standard error of a frequency is at most 0.0035; 0.015 is over 4 of them
    assert torch.allclose(draws.mean(0), probs, atol=0.015)
    assert torch.equal(dist.sample(_generator(5)), draws)
    assert not torch.equal(dist.sample(_generator(6)), draws)
    # batch axes of any rank keep their shape
    assert OneHotCategorical(torch.zeros(2, 3, 5)).sample(_generator(0)).shape == (2, 3, 5)


def test_truncated_normal_draws_from_a_generator_stay_in_bounds_and_repeat_with_its_seed():
    loc = torch.tensor([0.9, -0.3]).expand(20000, 2)
    dist = TruncatedNormal(loc, torch.full_like(loc, 0.2))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    draws = dist.sample(_generator(1))
    assert torch.equal(torch.rand(1), before)
    assert draws.abs().max() < 1.0
    # the second dimension is hardly truncated: its mean is loc's within sampling error (0.2 / sqrt(20000) = 0.0014)
    assert abs(float(draws[:, 1].mean()) + 0.3) < 0.01
    # the first is cut at 1: its mean lies below loc
    assert float(draws[:, 0].mean()) < 0.9 - 0.05
    assert torch.equal(dist.sample(_generator(1)), draws)
    assert not torch.equal(dist.sample(_generator(2)), draws)
