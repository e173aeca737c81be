"""The decoder's transposed convolutions: PyTorch's own layer against the decoder's CPU forms, per layer and for the
whole decoder, on this machine (a script, not a test).

    .venv/bin/python benchmarks/bench_deconv.py [--depth 32] [--frames 2500] [--threads 2] [--repeats 3]
        [--precisions fp32 bf16] [--json out.json]

The decoder (veorl.models.networks.Decoder) maps a feature to a 64x64 frame with a GEMM and three stride-2
transposed convolutions: 4d -> 2d channels (kernel 5, on 5x5 maps), 2d -> d (kernel 6, 13x13) and d -> 3 (kernel 6,
30x30). For each of them, and each precision, this script times on the same input (`--frames` frames: phase 1 decodes
50 sequences x 50 steps = 2500), side by side:

  pytorch   `nn.ConvTranspose2d`: oneDNN's deconvolution forward, and one `convolution_backward` call for the
            input, weight and bias gradients
  native    the same forward; backward with the bias gradient summed apart (`_ConvTransposeStride2`)
  subpixel  forward as one stride-1 convolution and a pixel shuffle (`subpixel_conv_transpose2d`), backward as in
            native (what the decoder runs for the layers `subpixel_forward_pays` picks)

forward alone (native against subpixel), forward + backward (all three) and the backward alone (PyTorch's one call
for all three gradients against the bias gradient summed apart), in seconds, best of `--repeats` after a warm-up,
and the FLOP/s of the decoder's form in the transposed convolution's own arithmetic (2 C_in C_out k^2 H W
per frame forward, twice that backward). Then the whole decoder, feature to frame, forward and backward, with the
decoder's choice against PyTorch's own layers everywhere (`native_transposed_convolutions`). The last column says
which form the decoder uses for the layer on this device and precision. Run it on the machine you train on: the
choice was measured on one CPU, and oneDNN's kernels differ between CPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from veorl.acceleration import autocast, cpu_has_bf16, cpu_model_name  # noqa: E402
from veorl.models.networks import (  # noqa: E402
    Decoder,
    cpu_conv_transpose_stride2,
    native_transposed_convolutions,
    subpixel_forward_pays,
)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN builds its kernels for the shape on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_inputs(depth: int) -> list[tuple[int, int, int, int]]:
    """(c_in, c_out, kernel, input side) of the decoder's transposed convolutions after the first (a GEMM)."""
    return [(4 * depth, 2 * depth, 5, 5), (2 * depth, depth, 6, 13), (depth, 3, 6, 30)]


def time_layer(c_in: int, c_out: int, k: int, side: int, frames: int, precision: str, repeats: int) -> dict:
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(c_in, c_out, kernel_size=k, stride=2)
    x = torch.randn(frames, c_in, side, side).contiguous(memory_format=torch.channels_last)
    if precision == "bf16":
        x = x.bfloat16()  # what the previous bf16 layer hands on under autocast
    x.requires_grad_()
    out_side = 2 * side - 2 + k
    flops = 2.0 * frames * c_in * c_out * k * k * side * side

    row: dict = {"layer": f"{c_in}->{c_out} k{k} {side}x{side}->{out_side}x{out_side}", "precision": precision}
    forms = {
        "pytorch": layer,
        "native": lambda x: cpu_conv_transpose_stride2(layer, x, subpixel=False),
        "subpixel": lambda x: cpu_conv_transpose_stride2(layer, x, subpixel=True),
    }
    with autocast(precision):
        grad = torch.randn_like(layer(x))
    for name, form in forms.items():

        def fwd(form=form):
            with torch.no_grad(), autocast(precision):
                return form(x)

        def fwd_bwd(form=form):
            with autocast(precision):
                y = form(x)
            y.backward(grad)

        row[name] = {"forward_backward_s": best_of(fwd_bwd, repeats)}
        if name != "pytorch":  # the same forward as native
            row[name]["forward_s"] = best_of(fwd, repeats)
    # The backward alone, on one upstream gradient: PyTorch's single call for the input, weight and bias gradients,
    # against the input and weight gradients in one call and the bias gradient summed apart (_ConvTransposeStride2).
    weight, upstream, inp = layer.weight.detach().to(x.dtype), grad.to(x.dtype), x.detach()

    def backward(bias_apart: bool) -> None:
        mask = [True, True, not bias_apart]
        stride, zero = [2, 2], [0, 0]
        torch.ops.aten.convolution_backward(upstream, inp, weight, [c_out], stride, zero, [1, 1], True, zero, 1, mask)
        if bias_apart:
            upstream.sum((0, 2, 3))

    row["backward_bias_in_call_s"] = best_of(lambda: backward(False), repeats)
    row["backward_bias_apart_s"] = best_of(lambda: backward(True), repeats)
    with autocast(precision):
        row["decoder_uses"] = "subpixel" if subpixel_forward_pays(layer, x.detach()) else "native"
    chosen = row[row["decoder_uses"]]["forward_backward_s"]
    row["decoder_forward_backward_gflop_s"] = 3 * flops / chosen / 1e9
    row["speedup_over_pytorch"] = row["pytorch"]["forward_backward_s"] / chosen
    return row


def time_decoder(depth: int, frames: int, precision: str, repeats: int) -> dict:
    torch.manual_seed(0)
    # A 32 x 32 categorical state and a 200-unit deter; only the decoder's first linear layer depends on this width.
    feat = 1024 + 200
    decoder = Decoder(feat, depth)
    feature = torch.randn(frames, feat)
    target = torch.randn(frames, 64, 64, 3)

    def step():
        with autocast(precision):
            mean = decoder(feature)
        F.mse_loss(mean, target).backward()

    chosen = best_of(step, repeats)
    with native_transposed_convolutions():
        native = best_of(step, repeats)
    return {"precision": precision, "decoder_choice_s": chosen, "pytorch_s": native, "speedup": native / chosen}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32, help="cnn_depth d (32: the paper's Meta-World size)")
    parser.add_argument("--frames", type=int, default=2500, help="frames per batch (phase 1: 50 x 50)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(
        f"Decoder transposed convolutions, d={args.depth}, {args.frames} frames, CPU {cpu_model_name()} "
        f"(bf16 instructions: {'yes' if cpu_has_bf16() else 'no'}), {args.threads} threads, best of {args.repeats}; "
        f"torch {torch.__version__}\n"
    )
    print(
        "| precision | layer | native fwd ms | subpixel fwd ms | fwd speed-up | PyTorch layer fwd+bwd ms | "
        "native fwd+bwd ms | subpixel fwd+bwd ms | bwd, bias in the call ms | bwd, bias apart ms | "
        "decoder's form GFLOP/s | vs PyTorch layer | decoder uses |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    layers, decoders = [], []
    for precision in args.precisions:
        for c_in, c_out, k, side in layer_inputs(args.depth):
            r = time_layer(c_in, c_out, k, side, args.frames, precision, args.repeats)
            layers.append(r)
            p, n, s = r["pytorch"], r["native"], r["subpixel"]
            print(
                f"| {precision} | {r['layer']} | {n['forward_s'] * 1e3:.1f} | {s['forward_s'] * 1e3:.1f} | "
                f"{n['forward_s'] / s['forward_s']:.2f}x | {p['forward_backward_s'] * 1e3:.1f} | "
                f"{n['forward_backward_s'] * 1e3:.1f} | {s['forward_backward_s'] * 1e3:.1f} | "
                f"{r['backward_bias_in_call_s'] * 1e3:.1f} | {r['backward_bias_apart_s'] * 1e3:.1f} | "
                f"{r['decoder_forward_backward_gflop_s']:.1f} | {r['speedup_over_pytorch']:.2f}x | "
                f"{r['decoder_uses']} |",
                flush=True,
            )
    print("\nWhole decoder (linear, GEMM layer, three transposed convolutions), forward + backward:\n")
    print("| precision | decoder's choice s | PyTorch's layers s | speed-up |")
    print("|---|---|---|---|")
    for precision in args.precisions:
        d = time_decoder(args.depth, args.frames, precision, args.repeats)
        decoders.append(d)
        print(f"| {precision} | {d['decoder_choice_s']:.3f} | {d['pytorch_s']:.3f} | {d['speedup']:.2f}x |", flush=True)
    if args.json:
        machine = {"cpu_model": cpu_model_name(), "bf16_instructions": cpu_has_bf16(), "torch": torch.__version__}
        payload = {
            "machine": machine,
            "threads": args.threads,
            "depth": args.depth,
            "frames": args.frames,
            "layers": layers,
            "decoder": decoders,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
