"""Network modules: shapes at two sizes, exact equivalences of the fast paths, masks, artifact round trip.

The RSSM has its own file, tests/models/test_rssm.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.builders import smoke_params
from veorl.config import ModelParams
from veorl.models.ban import BehaviourAbstraction, Codebook, codebook_stats
from veorl.models.networks import (
    FBC,
    MLP,
    BinaryHead,
    Decoder,
    DenseHead,
    Encoder,
    conv_transpose_stride2,
    native_transposed_convolutions,
    postprocess,
    preprocess,
    subpixel_conv_transpose2d,
    subpixel_forward_pays,
    unit_gaussian_image_log_prob,
    unit_gaussian_log_prob,
)
from veorl.models.world_models import VideoWorldModel, build_trunk_world_model, load_world_model, save_world_model

SIZES = [
    pytest.param(dict(depth=4, deter=16, stoch=6, hidden=12, embed=128), id="tiny"),
    pytest.param(dict(depth=8, deter=24, stoch=10, hidden=20, embed=256), id="small"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("size", SIZES)
def test_encoder_decoder_shapes(size):
    d = size["depth"]
    enc = Encoder(d)
    images = torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8)
    embed = enc(images)
    assert embed.shape == (2, 3, 32 * d) == (2, 3, size["embed"])
    # uint8 and the equivalent preprocessed floats give the same embedding.
    assert torch.allclose(enc(preprocess(images)), embed)
    dec = Decoder(30, d)
    out = dec(torch.randn(2, 3, 30))
    assert out.shape == (2, 3, 64, 64, 3)
    assert dec.log_prob(torch.randn(5, 30), torch.randn(5, 64, 64, 3)).shape == (5,)
    with pytest.raises(ValueError, match="64, 64, 3"):
        enc(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))


def test_paper_size_encoder_is_1024_dimensional():
    assert Encoder(32)(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).shape == (1, 1024)


def test_decoder_first_layer_gemm_equals_transposed_conv():
    dec = Decoder(20, 4).double()
    feature = torch.randn(3, 20, dtype=torch.double)
    x = dec.linear(feature).reshape(-1, 128, 1, 1)
    reference = dec.deconvs(x).permute(0, 2, 3, 1)
    assert torch.allclose(dec(feature), reference, atol=1e-12)


@pytest.mark.parametrize("kernel,size", [(5, 5), (6, 13), (6, 30), (5, 8), (3, 4)])
def test_subpixel_form_equals_the_transposed_convolution(kernel, size):
    x = torch.randn(2, 6, size, size + 1, dtype=torch.double)
    weight = torch.randn(6, 5, kernel, kernel, dtype=torch.double)
    bias = torch.randn(5, dtype=torch.double)
    expected = F.conv_transpose2d(x, weight, bias, stride=2)
    got = subpixel_conv_transpose2d(x, weight, bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("out_channels,size", [(3, 30), (3, 13), (5, 7)])
def test_cpu_transposed_convolution_keeps_the_native_gradients(out_channels, size):
    layer = torch.nn.ConvTranspose2d(8, out_channels, kernel_size=6, stride=2).double()
    x = torch.randn(3, 8, size, size, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert subpixel_forward_pays(layer, x) == (out_channels <= 3)  # the last case runs the native forward
    fast = conv_transpose_stride2(layer, x)
    assert fast.grad_fn.name().endswith("_ConvTransposeStride2Backward")
    assert fast._base is None  # not a view: the decoder's in-place ELU may follow
    native = layer(x)
    torch.testing.assert_close(fast, native, rtol=0, atol=1e-11)
    upstream = torch.randn_like(native)
    fast_grads = torch.autograd.grad(fast, [x, layer.weight, layer.bias], upstream)
    native_grads = torch.autograd.grad(native, [x, layer.weight, layer.bias], upstream)
    for got, expected in zip(fast_grads[:2], native_grads[:2]):
        assert torch.equal(got, expected)  # the same kernel on the same tensors
    # The bias gradient is the upstream gradient summed apart, in another order (and in fp32: 1e-6 relative).
    torch.testing.assert_close(fast_grads[2], upstream.sum((0, 2, 3)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fast_grads[2], native_grads[2], rtol=1e-6, atol=1e-5)


def test_cpu_transposed_convolution_bias_gradient_in_bf16():
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(16, 8, kernel_size=5, stride=2)
    x = torch.randn(40, 16, 13, 13).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_transpose_stride2(layer, x)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name().endswith("_ConvTransposeStride2Backward")
    upstream = torch.randn_like(y)
    (grad_b,) = torch.autograd.grad(y, [layer.bias], upstream)
    assert grad_b.dtype == torch.float32
    # Summed in fp32 and rounded once to bf16 (the layer's bf16 copy of the bias), then promoted to the fp32 parameter.
    expected = upstream.float().sum((0, 2, 3))
    # (atol: the two fp32 sums of 33,640 terms differ in order by far less than 1e-3.)
    torch.testing.assert_close(grad_b, expected, rtol=2**-8, atol=1e-3)


def test_which_transposed_convolutions_take_the_subpixel_forward():
    dec = Decoder(20, 16)
    layers = [m for m in dec.deconvs if isinstance(m, torch.nn.ConvTranspose2d)]
    shapes = [(1, 512, 1, 1), (1, 64, 5, 5), (1, 32, 13, 13), (1, 16, 30, 30)]
    inputs = [torch.zeros(shape) for shape in shapes]
    fp32 = [subpixel_forward_pays(m, x) for m, x in zip(layers, inputs)]
    bf16 = [subpixel_forward_pays(m, x.bfloat16()) for m, x in zip(layers, inputs)]
    assert fp32 == [False, False, False, True]  # only the 3-channel output layer
    assert bf16 == [True, True, False, True]  # and, in bf16, small inputs (the first layer runs as a GEMM anyway)
    with native_transposed_convolutions():
        assert not any(subpixel_forward_pays(m, x.bfloat16()) for m, x in zip(layers, inputs))
    assert subpixel_forward_pays(layers[3], inputs[3])  # the switch is restored on leaving


def test_bf16_decoder_with_subpixel_forwards_matches_the_native_one():
    dec = Decoder(40, 8)
    feature = torch.randn(6, 40)
    target = torch.randn(6, 64, 64, 3)

    def loss_and_grads():
        dec.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean = dec(feature)  # the in-place ELU after the 5x5 layer modifies the custom Function's output
        loss = (mean - target).square().mean()
        loss.backward()
        return mean.detach(), [p.grad.clone() for p in dec.parameters()]

    fast_mean, fast_grads = loss_and_grads()
    with native_transposed_convolutions():
        native_mean, native_grads = loss_and_grads()
    assert fast_mean.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the two summation orders agree to a few bf16 rounding steps.
    torch.testing.assert_close(fast_mean, native_mean, rtol=0.05, atol=0.02)
    for got, expected in zip(fast_grads, native_grads):
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_fused_image_log_prob_equals_the_written_out_formula_and_its_gradients():
    torch.manual_seed(0)
    mean = torch.randn(2, 3, 64, 64, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 64, 64, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, dtype=torch.float64)  # a different upstream gradient per frame
    fused = unit_gaussian_image_log_prob(mean, target)
    plain = unit_gaussian_log_prob(mean, target, event_dims=3)
    assert fused.shape == (2, 3) and fused.dtype == torch.float64
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-9)
    got = torch.autograd.grad((fused * weights).sum(), (mean, target))
    expected = torch.autograd.grad((plain * weights).sum(), (mean, target))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    small = (
        torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 4, 4, 3, dtype=torch.float64),
    )
    assert torch.autograd.gradcheck(unit_gaussian_image_log_prob, small)
    with pytest.raises(ValueError, match="differ in shape"):
        unit_gaussian_image_log_prob(mean, target[:1])


def test_fused_image_log_prob_of_a_bf16_mean_is_fp32_with_a_bf16_gradient():
    """A decoder's bf16 output under autocast: promoted exactly, so the log-probability is the one of its fp32 copy,
    and the gradient is the fp32 one rounded once to bf16 (what autograd's downcast of the written-out form gives)."""
    torch.manual_seed(1)
    mean = torch.randn(5, 64, 64, 3).to(torch.bfloat16).requires_grad_()
    target = torch.rand(5, 64, 64, 3) - 0.5
    fused = unit_gaussian_image_log_prob(mean, target)
    upcast = mean.detach().float().requires_grad_()
    plain = unit_gaussian_log_prob(upcast, target, event_dims=3)
    assert fused.dtype == torch.float32
    # fp32 sums of 12288 squares in two summation orders
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-3)
    weights = torch.rand(5) + 0.5
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    assert mean.grad.dtype == torch.bfloat16
    assert torch.equal(mean.grad, upcast.grad.to(torch.bfloat16))


def test_decoder_log_prob_under_autocast_matches_its_fp32_mean():
    dec = Decoder(40, 8)
    feature = torch.randn(2, 3, 40)
    target = torch.rand(2, 3, 64, 64, 3) - 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = dec(feature, full_precision=False)
        mean = dec(feature)
        log_prob = dec.log_prob(feature, target)
    assert raw.dtype == torch.bfloat16 and mean.dtype == torch.float32 and log_prob.shape == (2, 3)
    torch.testing.assert_close(log_prob, unit_gaussian_log_prob(mean, target, 3), rtol=1e-5, atol=1e-3)


def test_preprocess_roundtrip_and_type_check():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = preprocess(pixels)
    assert torch.allclose(x, torch.tensor([-0.5, 128 / 255 - 0.5, 0.5]))
    assert torch.equal(postprocess(x), pixels)
    with pytest.raises(TypeError):
        preprocess(torch.tensor([1, 2], dtype=torch.int64))


@pytest.mark.parametrize("size", SIZES)
def test_heads_shapes(size):
    feat = size["deter"] + size["stoch"]
    x = torch.randn(4, 5, feat)
    assert MLP(feat, 7, 11, 3)(x).shape == (4, 5, 7)
    head = DenseHead(feat, 1, 13, 2)
    assert head(x).shape == (4, 5)
    target = torch.randn(4, 5)
    expected = -0.5 * (target - head(x)) ** 2 - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(head.log_prob(x, target), expected)
    assert DenseHead(feat, 3, 13, 2).log_prob(x, torch.randn(4, 5, 3)).shape == (4, 5)
    assert BinaryHead(feat, 9, 1).log_prob(x, torch.ones(4, 5)).shape == (4, 5)
    assert FBC(feat, 9, 8)(x).shape == (4, 5, 8)


def test_every_dense_stack_is_the_one_mlp():
    """Heads, F_BC, actor, critic and the bc policy share networks.MLP: same layers, one state-dict layout."""
    from veorl.models.actor_critic import Actor, Critic, PixelPolicy

    stacks = {
        "dense": DenseHead(10, 1, 7, 2).mlp,
        "binary": BinaryHead(10, 7, 2).mlp,
        "fbc": FBC(10, 7, 8).net,
        "actor": Actor(10, 4, 7, 2).net,
        "discrete_actor": Actor(10, 4, 7, 2, kind="discrete").net,
        "critic": Critic(10, 7, 2).net,
        "bc": PixelPolicy(4, 4, 7, 2).head,
    }
    outputs = {"dense": 1, "binary": 1, "fbc": 8, "actor": 8, "discrete_actor": 4, "critic": 1, "bc": 8}
    for name, stack in stacks.items():
        assert type(stack) is MLP, name
        linears = [m for m in stack.net if isinstance(m, torch.nn.Linear)]
        assert linears[-1].out_features == outputs[name] and all(m.out_features == 7 for m in linears[:-1]), name
        assert all(isinstance(m, torch.nn.ELU) for m in stack.net[1:-1:2]), name
    assert len([m for m in stacks["fbc"].net if isinstance(m, torch.nn.Linear)]) == 2  # 250 -> 125 -> 8 shape
    assert set(Actor(10, 4, 7, 2).state_dict()) == {f"net.net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}


def test_k_step_ban_looks_ahead_and_clamps_at_the_end():
    torch.manual_seed(0)
    one, three = BehaviourAbstraction(12, 10, 4), BehaviourAbstraction(12, 10, 4, horizon=3)
    three.load_state_dict(one.state_dict())  # same weights: only what the BAN reads differs
    embed = torch.randn(2, 6, 12)
    z1, z3 = one(embed), three(embed)
    assert z3.shape == z1.shape == (2, 5, 4)  # one latent action per transition, whatever k
    tol = dict(rtol=1e-5, atol=1e-5)  # see test_ban_formula_and_codebook
    for t in range(5):
        ahead = min(t + 3, 5)  # e_{t+k}, stopping at the last frame
        assert torch.allclose(z3[:, t], three.pair(embed[:, t], embed[:, ahead]), **tol), t
    # the last transition looks one frame ahead under both; the first reads e_3 under k = 3, not e_1
    assert torch.allclose(z3[:, -1], z1[:, -1], **tol)
    assert not torch.allclose(z3[:, 0], z1[:, 0], **tol)
    with pytest.raises(ValueError, match="horizon"):
        BehaviourAbstraction(12, 10, 4, horizon=0)


@pytest.mark.parametrize("embed_dim,latent", [(16, 3), (64, 8)])
def test_ban_formula_and_codebook(embed_dim, latent):
    ban = BehaviourAbstraction(embed_dim, 10, latent)
    embed = torch.randn(2, 5, embed_dim)
    z = ban(embed)
    assert z.shape == (2, 4, latent)
    # float32 products of a batch and of a single row may run through different GEMM kernels (AVX-512/AMX
    # oneDNN paths block the reduction over embed_dim differently), so the sums are taken in another order.
    # Reordering a float32 sum of n terms of size ~1 moves it by up to ~n * 2^-24 * sum|terms|: a few 1e-6 here
    # (n <= 64, unit-scale inputs, weights ~ 1/sqrt(n)). atol 1e-5 covers that on any x86-64 CPU and still
    # fails on a wrong formula, which moves outputs by ~0.1. (allclose's default atol 1e-8 is below a single
    # rounding step of these values.)
    tol = dict(rtol=1e-5, atol=1e-5)
    manual = ban.out(F.relu(ban.next_proj(embed[:, 1:]) + ban.this_proj(embed[:, :-1])))
    assert torch.allclose(z, manual, **tol)
    assert torch.allclose(ban.pair(embed[:, 0], embed[:, 1]), z[:, 0], **tol)

    book = Codebook(K=7, dim=latent)
    z = z.detach().requires_grad_()
    z_q, idx, vq = book.quantise(z, beta=1.0)
    brute = ((z[..., None, :] - book.vectors) ** 2).sum(-1)
    assert idx.shape == (2, 4)
    # The codebook expands ||z - c||^2 into ||z||^2 - 2 z.c + ||c||^2, which rounds differently from the brute
    # force: on a near tie either code is right, so compare distances, not indices.
    chosen = brute.gather(-1, idx[..., None]).squeeze(-1)
    assert torch.all(chosen <= brute.min(-1).values + 1e-5)
    # z + (c - z) is c up to one rounding step of z (~1e-7 for |z| ~ 1).
    assert torch.allclose(z_q, book.vectors[idx], rtol=0.0, atol=1e-6)
    # beta = 1: codebook term + commitment term = twice the mean squared distance to the chosen codes.
    # ||sg(z)-c||^2 + beta ||z-sg(c)||^2 with beta = 1: twice the squared distance, summed over the latent dims
    assert torch.allclose(vq, 2 * (z.detach() - book.vectors[idx].detach()).square().sum(-1).mean(), atol=1e-6)
    (z_q.sum() + vq).backward()
    assert z.grad is not None and book.vectors.grad is not None and book.vectors.grad.abs().sum() > 0
    snapped, nearest_idx = book.nearest(z)
    assert torch.equal(nearest_idx, idx) and not snapped.requires_grad


def test_vq_loss_terms_and_mask():
    book = Codebook(K=3, dim=2)
    with torch.no_grad():
        book.vectors.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    z = torch.tensor([[0.1, 0.0], [0.9, 1.2], [100.0, 100.0]])
    _, idx, vq = book.quantise(z, beta=0.5, mask=torch.tensor([True, True, False]))
    assert idx.tolist() == [0, 1, 2]
    per = torch.tensor([0.01, 0.01 + 0.04])  # squared L2 distances to the chosen codes
    assert torch.allclose(vq, (per * 1.5).mean())


def test_codebook_usage_stats():
    book = Codebook(K=4, dim=2)
    stats = book.usage(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert stats.used == 4 and abs(stats.perplexity - 4.0) < 1e-6
    collapsed = codebook_stats(torch.tensor([10.0, 0, 0, 0], dtype=torch.float64))
    assert collapsed.used == 1 and abs(collapsed.perplexity - 1.0) < 1e-9


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_video_world_model_and_trunk_factory(preset):
    params = smoke_params(preset=preset).model
    model = VideoWorldModel(params)
    assert model.embed_dim == 32 * params.cnn_depth
    assert model.feat_dim == params.deter + params.stoch
    images = torch.randint(0, 256, (2, 5, 64, 64, 3), dtype=torch.uint8)
    latent, codes = model.infer_latent_actions(images)
    assert latent.shape == (2, 4, params.latent_action_dim) and codes.shape == (2, 4)
    state = model.plan_net.initial(2)
    assert model.plan_step(state, latent[:, 0]).deter.shape == (2, params.deter)
    action, code = model.next_latent_action(model.plan_net.feature(state))
    assert torch.allclose(action, model.codebook.vectors[code])
    trunk = build_trunk_world_model(
        params, action_dim=4, video_world_model=model, discount_head=True, init_decoder=True
    )
    assert all(torch.equal(a, b) for a, b in zip(trunk.encoder.parameters(), model.encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(trunk.decoder.parameters(), model.decoder.parameters()))
    assert trunk.trunk_net.action_dim == 4 and trunk.reward_head(torch.randn(3, trunk.feat_dim)).shape == (3,)


def test_freeze_behaviours_copies_and_freezes():
    model = VideoWorldModel(smoke_params().model)
    with torch.no_grad():
        model.encoder.convs[0].weight.add_(1.0)
        model.decoder.linear.weight.add_(1.0)
    model.freeze_behaviours()
    assert torch.equal(model.behaviour_encoder.convs[0].weight, model.encoder.convs[0].weight)
    assert torch.equal(model.keyframe_decoder.linear.weight, model.decoder.linear.weight)
    assert not any(p.requires_grad for m in model.frozen_modules() for p in m.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    with torch.no_grad():
        model.encoder.convs[0].weight.add_(1.0)
    model.freeze_behaviours()  # idempotent: the phase-1 copy is not overwritten
    assert not torch.equal(model.behaviour_encoder.convs[0].weight, model.encoder.convs[0].weight)


def test_save_and_load_world_model(tmp_path):
    params = ModelParams(cnn_depth=4, deter=12, stoch=5, hidden=8, ban_hidden=8, codebook_size=6, fbc_hidden=7)
    model = VideoWorldModel(params)
    model.freeze_behaviours()
    save_world_model(tmp_path / "wm", model, {"model": params.model_dump()}, {"upstream": {"video_clips": "abc"}})
    loaded, meta = load_world_model(tmp_path / "wm", "cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert bool(loaded.behaviour_frozen) and not any(p.requires_grad for p in loaded.ban.parameters())
    assert meta["model_config"]["deter"] == 12 and meta["provenance"]["upstream"]["video_clips"] == "abc"
    assert not list((tmp_path / "wm").glob(".*"))  # no temporary files left behind
    with pytest.raises(FileNotFoundError, match="world_model.pt"):
        load_world_model(tmp_path / "missing")
