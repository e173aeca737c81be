"""Convolutional encoder/decoder, MLPs and the small heads of VeoRL.

Sizes and conventions follow the method doc (docs/method.md, "Networks"):
images enter as x/255 - 0.5, the encoder maps a 64x64x3 frame to 32*d features, the decoder
maps a feature vector back to the mean of a unit-variance Gaussian over the (preprocessed) frame.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from veorl.acceleration import LOW_PRECISION, upcast

IMAGE_SIZE = 64
# Activation modules that take inplace=True and whose backward reads their output (MLP uses them in place).
IN_PLACE_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ELU, nn.ReLU)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def preprocess(image: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-0.5, 0.5]. Floating input is taken as already preprocessed.

    Training code preprocesses a batch once and uses the result both as encoder input and as the
    decoder's reconstruction target, so float tensors pass through untouched.
    """
    if image.dtype == torch.uint8:
        return image.to(torch.float32).div_(255.0).sub_(0.5)
    if not image.is_floating_point():
        raise TypeError(f"images must be uint8 pixels or preprocessed floats, got {image.dtype}")
    return image


def postprocess(image: torch.Tensor) -> torch.Tensor:
    """Preprocessed float image -> uint8 pixels (for figures and videos)."""
    return ((image + 0.5).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def unit_gaussian_log_prob(mean: torch.Tensor, target: torch.Tensor, event_dims: int) -> torch.Tensor:
    """log N(target; mean, 1) summed over the last `event_dims` dimensions."""
    squared = (target - mean).square()
    if event_dims:
        squared = squared.flatten(-event_dims).sum(-1)
        count = math.prod(mean.shape[-event_dims:])
    else:
        count = 1
    return -0.5 * squared - count * _HALF_LOG_2PI


class _UnitGaussianFrameLogProb(torch.autograd.Function):
    """`unit_gaussian_log_prob(mean, target, event_dims=1)` on (frames, pixels) in two passes over the pixels.

    The reconstruction term is the largest elementwise work of a world-model update (2500 frames of 64x64x3 at the
    paper's sizes). Written out, autograd runs it as upcast, subtract, square, sum, and backward as pow, two
    multiplies, a negation and the downcast, each a full pass that allocates its own frame-sized tensor. Here the
    forward subtracts once in fp32 (a bf16 mean is promoted exactly) and reduces, and the backward is one multiply
    that writes the gradient in the mean's own dtype. The same mathematics: d/d mean = (target - mean) * grad.
    """

    @staticmethod
    def forward(ctx, mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(torch.promote_types(mean.dtype, target.dtype), torch.float32)
        diff = torch.sub(target.to(wide), mean)  # fp32 at least; a bf16 mean is promoted exactly
        squared = torch.linalg.vector_norm(diff, dim=-1).square()
        ctx.save_for_backward(diff)
        ctx.dtypes = (mean.dtype, target.dtype)
        return -0.5 * squared - diff.shape[-1] * _HALF_LOG_2PI

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (diff,) = ctx.saved_tensors
        scale = grad.unsqueeze(-1)
        grad_mean = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_mean = torch.empty(diff.shape, dtype=ctx.dtypes[0], device=diff.device)
            torch.mul(diff, scale, out=grad_mean)
        if ctx.needs_input_grad[1]:
            grad_target = (diff * scale).neg_().to(ctx.dtypes[1])
        return grad_mean, grad_target


def unit_gaussian_image_log_prob(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log N(target; mean, 1) of (..., H, W, C) frames, summed per frame: `unit_gaussian_log_prob(mean, target, 3)`
    with one subtraction forward and one multiply backward (`_UnitGaussianFrameLogProb`). `mean` may be bf16 (a
    decoder's output under autocast): the difference, the sum and the result are fp32, the gradient to `mean` is in
    its dtype."""
    lead = mean.shape[:-3]
    if mean.shape != target.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and target {tuple(target.shape)} differ in shape")
    pixels = math.prod(mean.shape[-3:])
    flat = _UnitGaussianFrameLogProb.apply(mean.reshape(-1, pixels), target.reshape(-1, pixels))
    return flat.reshape(lead)


class Encoder(nn.Module):
    """4 conv layers (kernel 4, stride 2, channels d,2d,4d,8d, ELU): (..., 64, 64, 3) -> (..., 32*d)."""

    def __init__(self, depth: int = 32):
        super().__init__()
        self.depth = depth
        channels = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            # In-place ELU: conv backward needs the conv's input, not its output, so overwriting the output
            # is safe and halves the activation memory of the stack.
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2), nn.ELU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.output_dim = 32 * depth

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"Encoder expects (..., {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got {tuple(image.shape)}")
        lead = image.shape[:-3]
        x = preprocess(image).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2)
        # channels_last lets oneDNN/cuDNN run the convs without a layout conversion of the NHWC input.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.convs(x)
        # Under bf16 autocast the convolutions run in bf16; what leaves a network is fp32 (veorl.acceleration).
        return upcast(x.reshape(*lead, self.output_dim))


def subpixel_conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv_transpose2d(x, weight, bias, stride=2)` computed as one stride-1 convolution and a pixel shuffle.

    Output pixel (2m+a, 2n+b) of a stride-2 transposed convolution only meets the kernel taps (a+2t, b+2r), so each of
    the four output phases (a, b) is a full stride-1 convolution of `x` with a ceil(k/2)-square sub-kernel (flipped,
    zero-padded where k is odd). The four sub-kernels become the 4 * C_out output channels of one `F.conv2d`, and
    `F.pixel_shuffle` interleaves the phases; an odd k leaves one row and column to crop. The same sums, in another
    order: equal to the transposed convolution up to rounding.
    """
    c_in, c_out, k, k_w = weight.shape
    if k != k_w:
        raise ValueError(f"square kernels only, got {k}x{k_w}")
    half = (k + 1) // 2
    w = F.pad(weight, (0, 2 * half - k, 0, 2 * half - k))  # taps u = 2t + a for t < half, a in {0, 1}
    w = w.reshape(c_in, c_out, half, 2, half, 2).flip(2, 4)  # [ci, co, t, a, r, b], t and r reversed
    w = w.permute(1, 3, 5, 0, 2, 4).reshape(4 * c_out, c_in, half, half)  # channel co*4 + a*2 + b
    b = bias.repeat_interleave(4) if bias is not None else None
    y = F.pixel_shuffle(F.conv2d(x, w, b, padding=half - 1), 2)
    if k % 2:
        height, width = x.shape[-2:]
        y = y[..., : 2 * height - 2 + k, : 2 * width - 2 + k]
    return y


class _ConvTransposeStride2(torch.autograd.Function):
    """A stride-2 transposed convolution on a CPU: forward by oneDNN's deconvolution or by
    `subpixel_conv_transpose2d`, backward by PyTorch's own kernel with the bias gradient taken apart.

    The backward pass of a transposed convolution is a plain strided convolution (input gradient) and a weight
    correlation, which oneDNN runs fast. Asked for the bias gradient in the same call, PyTorch's CPU kernel took
    56-227 ms more per decoder layer at 2500 frames, in fp32 and bf16 (`benchmarks/bench_deconv.py`; not on fp32's
    3-channel layer), for what is a sum of the upstream gradient over frames and pixels. So the input and weight
    gradients come from `aten.convolution_backward` exactly as the native layer computes them, and the bias
    gradient is that sum (`Tensor.sum`, which accumulates bf16 in fp32 and rounds once: the same value up to the
    order of the sum).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, subpixel):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.autocast(device_type=x.device.type, enabled=False):
            if subpixel:
                y = subpixel_conv_transpose2d(x, weight, bias)
            else:
                y = F.conv_transpose2d(x, weight, bias, stride=2)
        # A tensor of its own, never a view (an odd kernel's crop is copied here): the in-place ELU that follows may
        # not modify a view made inside a custom Function.
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [2, 2], [0, 0], [1, 1], True, [0, 0], 1, [need_x, need_w, False]
        )
        grad_b = None
        if ctx.has_bias and need_b:
            grad_b = grad.sum((0, 2, 3))  # sum(dtype=float32) of bf16: several times slower
        return grad_x, grad_w, grad_b, None


_own_kernels = True  # off inside native_transposed_convolutions()


@contextlib.contextmanager
def native_transposed_convolutions() -> Iterator[None]:
    """Inside: every transposed convolution is PyTorch's own layer, forward and backward. Benchmarks compare with
    it, and count FLOPs in it (the method's arithmetic: the sub-pixel form adds the products with the zero taps it
    pads)."""
    global _own_kernels
    previous, _own_kernels = _own_kernels, False
    try:
        yield
    finally:
        _own_kernels = previous


def subpixel_forward_pays(layer: nn.ConvTranspose2d, x: torch.Tensor) -> bool:
    """Whether `layer` runs its forward as a sub-pixel convolution on `x`: CPU only, for the shapes where oneDNN's
    transposed-convolution forward was measured slow (`benchmarks/bench_deconv.py`, at cnn_depth 16, 32 and 96):
    the 3 output channels of the decoder's last layer (in fp32 and bf16) and, in bf16, small inputs (the 5x5
    one). The 13x13 layer stays native: there the sub-pixel form was slower. Figures in
    benchmarks/results_world_model.md.
    """
    if x.device.type != "cpu" or not _own_kernels:
        return False
    low_precision = x.dtype in LOW_PRECISION or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in LOW_PRECISION
    )
    return layer.out_channels <= 3 or (low_precision and max(x.shape[-2:]) <= 8)


def conv_transpose_stride2(layer: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for the decoder's stride-2 transposed convolutions. On a CPU: by the faster forward for the shape,
    and a backward that computes the bias gradient apart (`_ConvTransposeStride2`)."""
    if x.device.type != "cpu" or not _own_kernels:
        return layer(x)
    return cpu_conv_transpose_stride2(layer, x, subpixel=subpixel_forward_pays(layer, x))


def cpu_conv_transpose_stride2(layer: nn.ConvTranspose2d, x: torch.Tensor, subpixel: bool) -> torch.Tensor:
    """`layer(x)` (a stride-2, unpadded transposed convolution) with the native or the sub-pixel forward and the
    backward of `_ConvTransposeStride2`, in the precision autocast would run the layer in."""
    plain = layer.padding == (0, 0) and layer.output_padding == (0, 0) and layer.dilation == (1, 1)
    if layer.stride != (2, 2) or not plain or layer.groups != 1:
        raise ValueError("the CPU path covers unpadded, undilated, ungrouped stride-2 transposed convolutions")
    weight, bias = layer.weight, layer.bias
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = weight.dtype
    cast = None if bias is None else bias.to(dtype)
    return _ConvTransposeStride2.apply(x.to(dtype), weight.to(dtype), cast, subpixel)


class Decoder(nn.Module):
    """Linear to 32*d, 1x1, transposed convs (k 5,5,6,6; s2; ch 4d,2d,d,3): (..., F) -> (..., 64, 64, 3) mean."""

    def __init__(self, feat_dim: int, depth: int = 32):
        super().__init__()
        self.feat_dim = feat_dim
        self.depth = depth
        self.linear = nn.Linear(feat_dim, 32 * depth)
        channels = [32 * depth, 4 * depth, 2 * depth, depth, 3]
        kernels = [5, 5, 6, 6]
        layers: list[nn.Module] = []
        for i, (c_in, c_out, k) in enumerate(zip(channels[:-1], channels[1:], kernels)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=k, stride=2))
            if i < len(kernels) - 1:
                layers.append(nn.ELU(inplace=True))  # safe for the same reason as in the encoder
        self.deconvs = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor, full_precision: bool = True) -> torch.Tensor:
        """The mean frame, in fp32; `full_precision=False` leaves it in the precision autocast computed it in (for
        `log_prob`, which promotes it on the fly)."""
        if feature.shape[-1] != self.feat_dim:
            raise ValueError(f"Decoder expects (..., {self.feat_dim}) features, got {tuple(feature.shape)}")
        lead = feature.shape[:-1]
        x = self.linear(feature.reshape(-1, self.feat_dim))
        # On a 1x1 input the first transposed conv is a plain matrix product (each output pixel is a
        # linear map of the input vector); as one GEMM it is several times faster than the conv kernel.
        first = self.deconvs[0]
        k = first.kernel_size[0]
        x = F.linear(x, first.weight.flatten(1).t(), first.bias.repeat_interleave(k * k))
        x = x.reshape(-1, first.out_channels, k, k).contiguous(memory_format=torch.channels_last)
        # Starts with the ELU that follows the first transposed conv. On a CPU the others run conv_transpose_stride2:
        # the same layer and parameters, faster kernels for their shapes.
        for layer in self.deconvs[1:]:
            x = conv_transpose_stride2(layer, x) if isinstance(layer, nn.ConvTranspose2d) else layer(x)
        mean = x.permute(0, 2, 3, 1).reshape(*lead, IMAGE_SIZE, IMAGE_SIZE, 3)
        return upcast(mean) if full_precision else mean

    def log_prob(self, feature: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log-likelihood of preprocessed target frames under the unit Gaussian, summed per frame (fp32)."""
        # Through self(...), so a compiled decoder (compile: true) stays compiled.
        return unit_gaussian_image_log_prob(self(feature, full_precision=False), target)


class MLP(nn.Module):
    """`layers` hidden layers of `units` with activation `act`, then a linear output of size `out_dim`.

    The one MLP of the package: heads, F_BC, actor, critic and the bc policy all build theirs with it. Activations
    that can work in place do (ELU, ReLU): a linear layer's backward needs its input, not its output, so overwriting
    the output is safe, and it saves writing and keeping one more activation-sized tensor per layer.
    """

    def __init__(self, in_dim: int, out_dim: int, units: int, layers: int, act: type[nn.Module] = nn.ELU):
        super().__init__()
        modules: list[nn.Module] = []
        width = in_dim
        for _ in range(layers):
            modules += [nn.Linear(width, units), act(inplace=True) if act in IN_PLACE_ACTIVATIONS else act()]
            width = units
        modules.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*modules)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On rows of a matrix: a linear layer on (..., in) returns a view of its (rows, out) product, and an in-place
        # activation on a view makes autograd copy the whole base back in the backward.
        out = self.net(x.reshape(-1, x.shape[-1]))
        return upcast(out.reshape(*x.shape[:-1], out.shape[-1]))  # fp32 out, also under bf16 autocast


class DenseHead(nn.Module):
    """MLP whose output is the mean of a unit-variance Gaussian (reward, discount-as-regression, value)."""

    def __init__(self, in_dim: int, out_dim: int = 1, units: int = 400, layers: int = 2, act: type[nn.Module] = nn.ELU):
        super().__init__()
        self.mlp = MLP(in_dim, out_dim, units, layers, act)
        self.out_dim = out_dim

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Mean; a scalar head (out_dim=1) returns shape (...), otherwise (..., out_dim)."""
        mean = self.mlp(feature)
        return mean.squeeze(-1) if self.out_dim == 1 else mean

    def log_prob(self, feature: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return unit_gaussian_log_prob(self(feature), target, event_dims=0 if self.out_dim == 1 else 1)


class BinaryHead(nn.Module):
    """MLP producing Bernoulli logits (the discount head of discrete-action domains)."""

    def __init__(self, in_dim: int, units: int = 400, layers: int = 2, act: type[nn.Module] = nn.ELU):
        super().__init__()
        self.mlp = MLP(in_dim, 1, units, layers, act)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.mlp(feature).squeeze(-1)

    def log_prob(self, feature: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -nn.functional.binary_cross_entropy_with_logits(self(feature), target, reduction="none")


class FBC(nn.Module):
    """F_BC: predicts the next latent action from a model feature (250 -> 125 -> 8 by default)."""

    def __init__(self, feat_dim: int, hidden: int = 125, latent_dim: int = 8):
        super().__init__()
        self.net = MLP(feat_dim, latent_dim, hidden, layers=1)
        self.feat_dim, self.latent_dim = feat_dim, latent_dim

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature)


__all__ = [
    "IMAGE_SIZE",
    "preprocess",
    "postprocess",
    "unit_gaussian_log_prob",
    "Encoder",
    "Decoder",
    "MLP",
    "DenseHead",
    "BinaryHead",
    "FBC",
]
