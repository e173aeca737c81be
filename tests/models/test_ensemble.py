"""The Trunk Net prior ensemble: heads fitted to data agree there and disagree away from it."""

import pytest
import torch

from veorl.models.ensemble import PriorEnsemble, spread
from veorl.models.rssm import RSSM, RSSMState


def _rssm(kind: str) -> RSSM:
    return RSSM(action_dim=2, embed_dim=8, deter=16, stoch=4, hidden=16, kind=kind, classes=3)


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_identical_heads_do_not_disagree_and_distinct_heads_do(kind):
    torch.manual_seed(0)
    ensemble = PriorEnsemble(_rssm(kind), size=3)
    deter = torch.randn(5, 16)
    assert ensemble.predictions(deter).shape[:2] == (3, 5)
    assert (ensemble.disagreement(deter) > 0).all()
    for head in ensemble.heads[1:]:
        head.load_state_dict(ensemble.heads[0].state_dict())
    assert torch.allclose(ensemble.disagreement(deter), torch.zeros(5), atol=1e-6)


def test_spread_is_the_population_std_over_heads_with_its_gradient():
    """The two-pass spread equals torch's std(0, unbiased=False), values and gradients (fp64: agreement to 1e-12)."""
    torch.manual_seed(0)
    predictions = (torch.randn(5, 3, 7, 4, dtype=torch.float64) * torch.rand(1, 3, 7, 4) + 10.0).requires_grad_()
    weights = torch.randn(3, 7, 4, dtype=torch.float64)
    ours = spread(predictions)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), predictions)
    theirs = predictions.std(0, unbiased=False)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), predictions)
    assert ours.shape == (3, 7, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_predictions_are_the_heads_statistics_and_their_gradients(kind):
    """Gaussian heads compute only the means' rows: the same values and input gradients as the whole statistics
    (fp64, so the two orders of summation agree to 1e-12)."""
    torch.manual_seed(0)
    ensemble = PriorEnsemble(_rssm(kind), size=3).double()
    deter = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    ours = ensemble.predictions(deter)
    stats = torch.stack([head(deter) for head in ensemble.heads], 0)
    if kind == "gaussian":
        theirs = stats.chunk(2, -1)[0]
    else:
        theirs = torch.softmax(stats.reshape(3, 2, 5, 4, 3), -1).flatten(-2)
    weights = torch.randn_like(theirs)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), deter)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), deter)
    assert ours.shape == (3, 2, 5, 4 if kind == "gaussian" else 12)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-12)


def test_spread_has_torch_std_gradient_where_the_heads_agree_exactly():
    """Heads that agree exactly on an element (bf16 predictions can) give it a zero gradient, as torch.std does, not
    the NaN of sqrt's infinite slope at 0 (which once stopped a fine-tuning run)."""
    torch.manual_seed(0)
    predictions = torch.randn(5, 4, 3, dtype=torch.float64)
    predictions[:, 1, 2] = 0.75  # all heads equal here
    predictions.requires_grad_()
    weights = torch.randn(4, 3, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad((spread(predictions) * weights).sum(), predictions)
    (grad_theirs,) = torch.autograd.grad((predictions.std(0, unbiased=False) * weights).sum(), predictions)
    assert torch.isfinite(grad_ours).all()
    assert torch.equal(grad_ours[:, 1, 2], torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-12)


def test_one_head_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        PriorEnsemble(_rssm("gaussian"), size=1)


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_fitted_heads_agree_on_the_data_and_not_far_from_it(kind):
    torch.manual_seed(0)
    rssm = _rssm(kind)
    ensemble = PriorEnsemble(rssm, size=5)
    # "Data": deterministic states near one point, each with a posterior that depends on it.
    data_deter = 0.1 * torch.randn(256, 16)
    with torch.no_grad():
        stats = rssm.obs_stats(torch.tanh(data_deter))  # hidden size == deter size in this small RSSM
    posterior = rssm._stats_to_state(stats, data_deter, sample=False)
    far_deter = 3.0 + torch.randn(256, 16)
    before = ensemble.loss(posterior).item()
    optimiser = torch.optim.Adam(ensemble.parameters(), lr=3e-3)
    for _ in range(300):
        optimiser.zero_grad()
        ensemble.loss(posterior).backward()
        optimiser.step()
    assert ensemble.loss(posterior).item() < 0.5 * before
    on_data = ensemble.disagreement(data_deter).mean()
    off_data = ensemble.disagreement(far_deter).mean()
    assert off_data > 2.0 * on_data, (on_data, off_data)


def test_the_loss_does_not_reach_the_trunk_state():
    rssm = _rssm("gaussian")
    ensemble = PriorEnsemble(rssm, size=2)
    deter = torch.randn(4, 16, requires_grad=True)
    mean = torch.randn(4, 4, requires_grad=True)
    posterior = RSSMState(deter=deter, stoch=mean, mean=mean, std=torch.ones(4, 4))
    ensemble.loss(posterior).backward()
    assert deter.grad is None and mean.grad is None
    assert all(p.grad is not None for p in ensemble.parameters())
