"""Precision resolution, the autocast region, fp32 outputs of the networks, compiled-network bookkeeping, and acting
in bf16. (The trainers' bf16/fp32 agreement and the compiled update are in tests/algo/test_precision.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.builders import smoke_params
from tests.test_agent import tiny_agent
from veorl.acceleration import (
    autocast,
    clone_module,
    compilable_networks,
    compile_networks,
    cpu_flags,
    cpu_has_bf16,
    cpu_model_name,
    is_compiled,
    resolve_precision,
)
from veorl.agent import Agent
from veorl.checkpoint import CheckpointMismatch, assert_resumable
from veorl.models.actor_critic import Critic
from veorl.models.world_models import VideoWorldModel

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example(R) Xeon(R) CPU @ 2.00GHz
flags\t\t: fpu sse2 avx2 avx512f {extra}

processor\t: 1
model name\t: Example(R) Xeon(R) CPU @ 2.00GHz
"""


def fake_cpuinfo(tmp_path, extra: str):
    path = tmp_path / f"cpuinfo-{extra or 'plain'}"
    path.write_text(CPUINFO.format(extra=extra))
    return path


@pytest.mark.parametrize(
    "extra, native",
    [("", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512_vnni avx512bw", False)],
)
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_instructions(tmp_path, extra, native):
    path = fake_cpuinfo(tmp_path, extra)
    flags = cpu_flags(path)
    assert "avx2" in flags and cpu_has_bf16(flags) == native
    assert cpu_model_name(path) == "Example(R) Xeon(R) CPU @ 2.00GHz"
    assert resolve_precision("auto", "cpu", flags) == ("bf16" if native else "fp32")
    # an explicit setting is taken as it is, whatever the machine
    assert resolve_precision("fp32", "cpu", flags) == "fp32" and resolve_precision("bf16", "cpu", flags) == "bf16"


def test_unreadable_cpuinfo_and_bad_settings(tmp_path):
    missing = tmp_path / "absent"
    assert cpu_flags(missing) == frozenset() and cpu_model_name(missing) == "unknown"
    assert resolve_precision("auto", "cpu", cpu_flags(missing)) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="resolved"):
        autocast("auto")


def test_the_params_sections_default_to_auto_and_compile_off():
    params = smoke_params()
    assert params.pretrain.precision == params.finetune.precision == params.evaluate.precision == "auto"
    assert params.pretrain.compile is False and params.finetune.compile is False


def test_networks_compute_in_bf16_and_hand_out_fp32():
    """Inside the bf16 region the matrix products run in bf16 (outputs differ from fp32 by bf16 rounding), and every
    network's output, the RSSM state and the codebook distances are fp32."""
    torch.manual_seed(0)
    model = VideoWorldModel(smoke_params().model)
    frames = torch.randint(0, 256, (2, 5, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        reference = model.encoder(frames)
        with autocast("bf16"):
            embed = model.encoder(frames)
            z = model.ban(embed)
            codes = model.codebook.indices(z)
            post, prior = model.filter_plan(embed, model.codebook.lookup(codes))
            image = model.decoder(model.plan_net.feature(post))
            fbc = model.fbc(model.plan_net.feature(post))
    for tensor in (embed, z, post.deter, post.stoch, post.mean, post.std, prior.mean, image, fbc):
        assert tensor.dtype == torch.float32
    assert not torch.equal(embed, reference)  # really computed in bf16 ...
    torch.testing.assert_close(embed, reference, rtol=5e-2, atol=5e-2)  # ... and close to fp32
    with autocast("fp32"):  # fp32: no region at all
        assert torch.equal(model.encoder(frames).detach(), reference)


def test_resuming_in_another_precision_is_refused_but_compiling_may_change():
    saved = {"pretrain": {"precision": "bf16", "compile": False, "optim": {"lr": 3e-4}}}
    assert_resumable(saved, {"pretrain": {"precision": "bf16", "compile": True, "optim": {"lr": 3e-4}}})
    with pytest.raises(CheckpointMismatch, match="pretrain.precision"):
        assert_resumable(saved, {"pretrain": {"precision": "fp32", "compile": False, "optim": {"lr": 3e-4}}})


def test_compile_networks_marks_each_network_and_clones_get_their_own():
    torch.manual_seed(0)
    model = VideoWorldModel(smoke_params().model)
    networks = compilable_networks(model)
    names = {type(n).__name__ for n in networks}
    assert names == {"Encoder", "Decoder", "BehaviourAbstraction", "MLP"}
    # encoder and its frozen copy, decoder and keyframe decoder, BAN, the MLPs of F_BC and of the forward predictor
    assert len(networks) == len({id(n) for n in networks}) == 7
    keys = list(model.state_dict())
    assert compile_networks(model) == len(networks) and all(is_compiled(n) for n in networks)
    assert list(model.state_dict()) == keys  # in place: checkpoints and artifacts keep their names
    critic = Critic(8, 16, 2)
    compile_networks(critic)
    clone = clone_module(critic)
    # a plain deep copy would keep calling the original's compiled forward (and so the original's weights)
    assert is_compiled(clone.net) and clone.net._compiled_call_impl is not critic.net._compiled_call_impl
    assert not is_compiled(clone_module(Critic(8, 16, 2)).net)


@pytest.mark.parametrize("algo", ["veorl", "bc"])
def test_the_agent_acts_in_bf16_close_to_fp32(tmp_path, algo):
    path = str(tiny_agent(tmp_path, algo))
    fp32, bf16 = Agent.load(path), Agent.load(path, precision="bf16")
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    state_a, state_b = fp32.initial_state(3), bf16.initial_state(3)
    for _ in range(3):
        action_a, state_a = fp32.act(frames, state_a)
        action_b, state_b = bf16.act(frames, state_b)
        assert action_b.dtype == np.float32 and all(v.dtype == np.float32 for v in state_b.values())
        np.testing.assert_allclose(action_b, action_a, atol=5e-2)
