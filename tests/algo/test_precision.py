"""Mixed precision and compiled updates of every trainer: bf16 losses agree with fp32 on a fixed batch, a short bf16
run still learns, and a compiled update gives the loss of an eager one. (Resume exactness is checked in fp32 by the
pretrain and finetune tests.)

bf16 autocast runs on any CPU: where the CPU lacks AVX512-BF16/AMX, PyTorch emulates it (slower), so these tests do
not depend on the machine. With ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN without bf16 instructions) they pass too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.algo.test_finetune import build_veorl, target_batch, with_source
from tests.algo.test_pretrain import CONSTANT_NLL, TINY, fixed_batch
from tests.builders import ACTION_DIM, smoke_params
from veorl.acceleration import compile_networks
from veorl.algo.baselines import BehaviourCloning, switches
from veorl.algo.finetune import PolicyPhase, WorldModelPhase
from veorl.algo.pretrain import Phase1Trainer, Phase2Trainer
from veorl.models.actor_critic import PixelPolicy
from veorl.models.world_models import VideoWorldModel

# bf16 keeps 8 significant bits (a relative rounding of 2^-8 = 0.4% per product). Every loss term sums many
# products whose rounding errors partly cancel: each term agrees with fp32 within 2% relative (+ 2e-3 absolute for
# terms near 0). Measured on these batches: at most 0.6% (the value of a nearly untrained critic, about -0.03).
BF16_TOLERANCE = {"rtol": 2e-2, "atol": 2e-3}


def terms(losses) -> dict[str, torch.Tensor]:
    return {
        f.name: getattr(losses, f.name).detach()
        for f in dataclasses.fields(losses)
        if isinstance(getattr(losses, f.name), torch.Tensor)
    }


def assert_bf16_agrees(losses_of) -> None:
    """`losses_of(precision)` -> a losses dataclass; bf16 and fp32 agree term by term, and bf16 differs at all."""
    torch.manual_seed(1)
    fp32 = terms(losses_of("fp32"))
    torch.manual_seed(1)
    bf16 = terms(losses_of("bf16"))
    assert fp32.keys() == bf16.keys()
    for name in fp32:
        assert bf16[name].dtype == torch.float32, f"{name} must stay fp32"
        torch.testing.assert_close(bf16[name], fp32[name], **BF16_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.equal(bf16[k], fp32[k]) for k in fp32), "bf16 computed exactly the fp32 numbers"


# ------------------------------------------------------------------------------------------------
# bf16 and fp32 agree on a fixed batch
# ------------------------------------------------------------------------------------------------


def test_pretraining_losses_agree_in_bf16_and_fp32():
    params = smoke_params("pretrain.free_nats=0")
    torch.manual_seed(0)
    model = VideoWorldModel(params.model)
    batch = fixed_batch(params)
    assert_bf16_agrees(lambda precision: Phase1Trainer(model, params.pretrain, precision).losses(batch))
    model.freeze_behaviours()
    assert_bf16_agrees(lambda precision: Phase2Trainer(model, params.pretrain, precision).losses(batch))


def test_world_model_phase_losses_agree_in_bf16_and_fp32():
    params = smoke_params("finetune.use_mmd=true")
    video_wm, trunk, guidance, _, _ = build_veorl(params)
    sw = switches(params.finetune)
    batch = with_source(target_batch())
    assert_bf16_agrees(
        lambda precision: WorldModelPhase(trunk, params, sw, video_wm, guidance, precision).losses(batch)
    )


def test_policy_phase_losses_agree_in_bf16_and_fp32():
    params = smoke_params()
    _, trunk, guidance, actor, critic = build_veorl(params)
    sw = switches(params.finetune)

    def losses(precision):
        phase = PolicyPhase(trunk, actor, critic, params, sw, guidance, precision)
        phase.freeze_world_model()
        return phase.losses(target_batch())

    assert_bf16_agrees(losses)


def test_behaviour_cloning_losses_agree_in_bf16_and_fp32():
    params = smoke_params()
    torch.manual_seed(0)
    policy = PixelPolicy(params.model.cnn_depth, ACTION_DIM, params.model.actor_units, params.model.actor_layers)
    assert_bf16_agrees(lambda precision: BehaviourCloning(policy, params.finetune, precision).losses(target_batch()))


# ------------------------------------------------------------------------------------------------
# A short bf16 run learns; weights and optimiser state stay fp32
# ------------------------------------------------------------------------------------------------


def test_a_short_bf16_pretraining_run_lowers_the_loss():
    torch.manual_seed(0)
    params = smoke_params("pretrain.optim.lr=0.001", *TINY)
    model = VideoWorldModel(params.model)
    batch = fixed_batch(params)
    phase1 = Phase1Trainer(model, params.pretrain, "bf16")
    history = [phase1.update(batch) for _ in range(30)]
    first, last = (float(history[i].image_nll) - CONSTANT_NLL for i in (0, -1))
    assert last < 0.6 * first, f"bf16 phase-1 reconstruction error did not fall: {first:.1f} -> {last:.1f}"
    assert float(history[-1].loss) < float(history[0].loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = phase1.optimizer.state_dict()["state"]
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    model.freeze_behaviours()
    phase2 = Phase2Trainer(model, params.pretrain, "bf16")
    history = [phase2.update(batch) for _ in range(20)]
    assert float(history[-1].loss) < float(history[0].loss)


def test_a_short_bf16_world_model_run_lowers_the_loss():
    params = smoke_params("finetune.world_model_optim.lr=0.001")
    video_wm, trunk, guidance, _, _ = build_veorl(params)
    phase = WorldModelPhase(trunk, params, switches(params.finetune), video_wm, guidance, "bf16")
    batch = target_batch()
    history = [phase.update(batch) for _ in range(15)]
    assert float(history[-1].loss) < float(history[0].loss)
    assert float(history[-1].map_loss) < float(history[0].map_loss)


# ------------------------------------------------------------------------------------------------
# Compiled updates
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # compiling the encoder, decoders, MLPs and BAN: 56 s on one thread with a cold inductor cache
def test_a_compiled_update_gives_the_loss_of_an_eager_one():
    params = smoke_params("pretrain.optim.lr=0.001", *TINY)
    batch = fixed_batch(params)
    curves = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = VideoWorldModel(params.model)
        if compiled:
            assert compile_networks(model) > 0
        trainer = Phase1Trainer(model, params.pretrain, "fp32")
        curves[compiled] = []
        for step in range(3):  # the later losses also check the compiled backward (the weights it moved)
            torch.manual_seed(step)
            curves[compiled].append(terms(trainer.update(batch)))
    for eager, compiled in zip(curves[False], curves[True]):
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-4)
