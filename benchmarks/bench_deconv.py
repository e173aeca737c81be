"""The decoder's transposed convolutions: PyTorch's own forward against the sub-pixel forward, per layer and for the
whole decoder, on this machine (a script, not a test).

    .venv/bin/python benchmarks/bench_deconv.py [--depth 32] [--frames 2500] [--threads 2] [--repeats 3]
        [--precisions fp32 bf16] [--json out.json]

The decoder (veorl.models.networks.Decoder) maps a feature to a 64x64 frame with a GEMM and three stride-2
transposed convolutions: 4d -> 2d channels (kernel 5, on 5x5 maps), 2d -> d (kernel 6, 13x13) and d -> 3 (kernel 6,
30x30). For each of them, and each precision, this script times on the same input (`--frames` frames: phase 1 decodes
50 sequences x 50 steps = 2500), side by side:

  native    `nn.ConvTranspose2d` (oneDNN's deconvolution on a CPU)
  subpixel  forward as one stride-1 convolution and a pixel shuffle (`subpixel_conv_transpose2d`), backward the
            native one (what the decoder runs for the layers `subpixel_forward_pays` picks)

forward alone and forward + backward (seconds, best of `--repeats` after a warm-up), and the FLOP/s of each in the
transposed convolution's own arithmetic (2 C_in C_out k^2 H W per frame forward, twice that backward), so both
columns count the same work. Then the whole decoder, feature to frame, forward and backward, with the decoder's
choice against native forwards everywhere (`native_transposed_convolutions`). The last column says which form the
decoder uses for the layer on this device and precision. Run it on the machine you train on: the choice was measured
on one CPU, and oneDNN's kernels differ between CPUs.
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
    native_transposed_convolutions,
    subpixel_forward,
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
    for name, forward in (("native", layer), ("subpixel", None)):

        def fwd(forward=forward):
            with torch.no_grad(), autocast(precision):
                return layer(x) if forward is not None else subpixel_forward(layer, x)

        with autocast(precision):
            grad = torch.randn_like(layer(x))

        def fwd_bwd(forward=forward, grad=grad):
            with autocast(precision):
                y = layer(x) if forward is not None else subpixel_forward(layer, x)
            y.backward(grad)

        t_fwd, t_both = best_of(fwd, repeats), best_of(fwd_bwd, repeats)
        row[name] = {
            "forward_s": t_fwd,
            "forward_backward_s": t_both,
            "forward_gflop_s": flops / t_fwd / 1e9,
            "forward_backward_gflop_s": 3 * flops / t_both / 1e9,
        }
    with autocast(precision):
        row["decoder_uses"] = "subpixel" if subpixel_forward_pays(layer, x.detach()) else "native"
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
    return {"precision": precision, "decoder_choice_s": chosen, "native_s": native, "speedup": native / chosen}


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
        "| precision | layer | native fwd ms | subpixel fwd ms | fwd speed-up | native fwd+bwd ms | "
        "subpixel fwd+bwd ms | fwd+bwd speed-up | native fwd+bwd GFLOP/s | subpixel fwd+bwd GFLOP/s | decoder uses |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    layers, decoders = [], []
    for precision in args.precisions:
        for c_in, c_out, k, side in layer_inputs(args.depth):
            r = time_layer(c_in, c_out, k, side, args.frames, precision, args.repeats)
            layers.append(r)
            n, s = r["native"], r["subpixel"]
            print(
                f"| {precision} | {r['layer']} | {n['forward_s'] * 1e3:.1f} | {s['forward_s'] * 1e3:.1f} | "
                f"{n['forward_s'] / s['forward_s']:.2f}x | {n['forward_backward_s'] * 1e3:.1f} | "
                f"{s['forward_backward_s'] * 1e3:.1f} | {n['forward_backward_s'] / s['forward_backward_s']:.2f}x | "
                f"{n['forward_backward_gflop_s']:.1f} | {s['forward_backward_gflop_s']:.1f} | {r['decoder_uses']} |",
                flush=True,
            )
    print("\nWhole decoder (linear, GEMM layer, three transposed convolutions), forward + backward:\n")
    print("| precision | decoder's choice s | native everywhere s | speed-up |")
    print("|---|---|---|---|")
    for precision in args.precisions:
        d = time_decoder(args.depth, args.frames, precision, args.repeats)
        decoders.append(d)
        print(f"| {precision} | {d['decoder_choice_s']:.3f} | {d['native_s']:.3f} | {d['speedup']:.2f}x |", flush=True)
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
