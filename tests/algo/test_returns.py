"""Lambda-returns and discount weights against numbers worked out by hand from the recursion."""

import pytest
import torch

from veorl.algo.returns import discount_weights, lambda_return


def test_lambda_return_matches_hand_computed_recursion():
    # Three transitions, one trajectory. R_{H-1} = r + g V(s_H); R_t = r_t + g ((1 - lam) V(s_{t+1}) + lam R_{t+1}).
    reward = torch.tensor([[1.0], [2.0], [3.0]])
    next_value = torch.tensor([[10.0], [20.0], [30.0]])
    discount = torch.full((3, 1), 0.9)
    lam = 0.5
    r2 = 3.0 + 0.9 * 30.0  # 30.0
    r1 = 2.0 + 0.9 * ((1 - lam) * 20.0 + lam * r2)  # 2 + 0.9 * (10 + 15) = 24.5
    r0 = 1.0 + 0.9 * ((1 - lam) * 10.0 + lam * r1)  # 1 + 0.9 * (5 + 12.25) = 16.525
    assert (r2, r1, r0) == pytest.approx((30.0, 24.5, 16.525))
    got = lambda_return(reward, next_value, discount, lam)
    assert got.shape == (3, 1)
    assert got[:, 0].tolist() == pytest.approx([r0, r1, r2], rel=1e-6)


def test_lambda_zero_is_one_step_td_and_lambda_one_is_bootstrapped_monte_carlo():
    reward = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    next_value = torch.tensor([[5.0, 1.0], [7.0, 3.0]])
    discount = torch.tensor([[0.5, 1.0], [0.5, 0.8]])
    td = lambda_return(reward, next_value, discount, 0.0)
    assert td[0].tolist() == pytest.approx([1.0 + 0.5 * 5.0, 0.0 + 1.0 * 1.0])
    assert td[1].tolist() == pytest.approx([0.0 + 0.5 * 7.0, 2.0 + 0.8 * 3.0])
    mc = lambda_return(reward, next_value, discount, 1.0)
    # lambda = 1: discounted rewards to the end, then the value of the last state.
    assert mc[0].tolist() == pytest.approx([1.0 + 0.5 * (0.0 + 0.5 * 7.0), 0.0 + 1.0 * (2.0 + 0.8 * 3.0)])


def test_lambda_return_is_differentiable_in_values_and_rewards():
    reward = torch.tensor([[1.0], [1.0]], requires_grad=True)
    next_value = torch.tensor([[2.0], [3.0]], requires_grad=True)
    lambda_return(reward, next_value, torch.full((2, 1), 0.9), 0.95)[0].sum().backward()
    # dR0/dr1 = g * lam; dR0/dV(s2) = g * lam * g
    assert reward.grad[:, 0].tolist() == pytest.approx([1.0, 0.9 * 0.95])
    assert next_value.grad[1, 0].item() == pytest.approx(0.9 * 0.95 * 0.9)
    assert next_value.grad[0, 0].item() == pytest.approx(0.9 * 0.05)


def test_discount_weights_are_survival_products():
    discount = torch.tensor([[0.9], [0.5], [0.2]])
    assert discount_weights(discount)[:, 0].tolist() == pytest.approx([1.0, 0.9, 0.9 * 0.5])


def test_lambda_return_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        lambda_return(torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 2), 0.9)


def test_return_normaliser_tracks_the_percentile_range_with_an_ema():
    from veorl.algo.returns import ReturnNormaliser

    norm = ReturnNormaliser(decay=0.5)
    assert norm.scale == 1.0  # nothing seen yet: returns pass unscaled
    first = norm.update(torch.linspace(0.0, 100.0, 1001))
    assert first == pytest.approx(90.0, rel=1e-4)  # P95 - P5 of a uniform ramp over [0, 100]
    second = norm.update(torch.zeros(100))  # a batch of equal returns halves the EMA range
    assert second == pytest.approx(45.0, rel=1e-4)
    restored = ReturnNormaliser(decay=0.5)
    restored.load_state_dict(norm.state_dict())
    assert restored.scale == norm.scale


def test_return_normaliser_never_amplifies_small_returns():
    from veorl.algo.returns import ReturnNormaliser

    norm = ReturnNormaliser()
    assert norm.update(torch.tensor([0.1, 0.2, 0.3])) == 1.0
    with pytest.raises(ValueError, match="decay"):
        ReturnNormaliser(decay=1.0)
