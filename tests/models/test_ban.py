"""Dead-code restart of the latent-behaviour codebook."""

import torch

from tests.builders import smoke_params
from veorl.models.ban import Codebook


def test_restart_moves_only_dead_codes_onto_candidates():
    torch.manual_seed(0)
    book = Codebook(K=4, dim=3)
    before = book.vectors.detach().clone()
    candidates = torch.tensor([[5.0, 5.0, 5.0], [-5.0, -5.0, -5.0]])
    restarted = book.restart_dead(torch.tensor([7.0, 0.0, 2.0, 0.0]), candidates, noise=1e-3)
    assert restarted == 2
    after = book.vectors.detach()
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    for row in (1, 3):
        distance = (after[row][None] - candidates).norm(dim=-1).min()
        assert distance < 1e-2, distance
    assert book.restart_dead(torch.ones(4), candidates) == 0


def test_phase1_restart_revives_codes_that_no_transition_chose():
    from veorl.algo.pretrain import Phase1Trainer
    from veorl.models.world_models import VideoWorldModel

    torch.manual_seed(0)
    params = smoke_params("pretrain.codebook_init=uniform", "pretrain.codebook_restart_every=1")
    model = VideoWorldModel(params.model)
    trainer = Phase1Trainer(model, params.pretrain)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "target": {"image": torch.randint(0, 256, (2, 10, 64, 64, 3), dtype=torch.uint8, generator=generator)},
        "source": {"image": torch.randint(0, 256, (2, 8, 64, 64, 3), dtype=torch.uint8, generator=generator)},
    }
    # With the VQ-VAE initialisation the codes sit near zero, far from the BAN's outputs: few codes win.
    _, codes = trainer.forward(batch)
    used_before = torch.unique(codes[0][0]).numel()
    assert used_before < model.codebook.K
    trainer.update(batch)
    # After the update the dead codes sit on this batch's BAN outputs, so the same batch now spreads over more.
    _, codes = trainer.forward(batch)
    assert torch.unique(codes[0][0]).numel() > used_before
    assert trainer.restart_usage.sum() == 0  # counting starts again after each restart
