"""Mixed precision and compiled networks: `precision` and `compile` of pretrain, finetune (and evaluate's precision).

Precision (`auto | fp32 | bf16`): with bf16, the forward passes of the networks (encoder, decoders, RSSM steps,
heads, actor, critic, F_BC, BAN) run under `torch.autocast(dtype=torch.bfloat16)`, so their matrix products and
convolutions take bf16 inputs. Everything else stays fp32: each network casts its outputs back to float
(`Encoder`, `Decoder`, `MLP`, the RSSM's state statistics and GRU gates), so losses, KL terms, returns,
distributions, codebook distances and the recurrent state are computed in fp32, and the weights, gradients and
optimiser states are fp32 as before. `auto` resolves once per stage (`resolve_precision`): bf16 where the hardware
has native bf16 arithmetic (a CPU with AVX512-BF16 or AMX, read from /proc/cpuinfo; a CUDA GPU that supports bf16),
fp32 elsewhere. On a CPU without those instructions PyTorch still runs bf16 autocast (emulated, slower), so an
explicit `bf16` works anywhere.

Compile (`compile: true`): `compile_networks` compiles the forward of every encoder, decoder, MLP (heads, actor,
critic, F_BC, the state map) and BAN in place (`nn.Module.compile`: parameter names and state dicts are unchanged,
so checkpoints and artifacts are the same). The RSSM's time loops stay eager: they switch thread counts and hook
the backward (veorl.models.rssm._SerialRegion), which a compiled graph would break up anyway.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
CPUINFO = Path("/proc/cpuinfo")
# x86 flags (Linux names) of native bf16 arithmetic: AVX512-BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire
# Rapids and later).
BF16_CPU_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")


# ------------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------------


def _cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The value of the first `name : value` line of /proc/cpuinfo (None when absent or unreadable)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


@functools.cache
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`); empty when unavailable."""
    value = _cpuinfo_field("flags", cpuinfo) or _cpuinfo_field("Features", cpuinfo) or ""
    return frozenset(value.split())


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from /proc/cpuinfo (`unknown` when unavailable)."""
    return _cpuinfo_field("model name", cpuinfo) or "unknown"


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_precision(setting: str, device: str | torch.device = "cpu", flags: frozenset[str] | None = None) -> str:
    """`fp32` or `bf16`: an explicit setting as it is; `auto` = bf16 where `device` has native bf16 arithmetic."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    device = _device(device)
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16(flags) else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """The region networks run their forward passes in: bf16 autocast for `bf16`, nothing for `fp32`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"autocast needs a resolved precision (fp32 | bf16), got {precision!r}")


def full_precision(device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """A region inside an autocast one whose matrix products stay fp32 (distances, decisions)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """A network's output in fp32 when autocast computed it in bf16 (fp32 and fp64 tensors pass through as they are)."""
    return x.float() if x.dtype in LOW_PRECISION else x


def module_device(*modules: nn.Module | None) -> torch.device:
    """The device of the first parameter of the first module that has one (cpu when none does)."""
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# Compiled networks
# ------------------------------------------------------------------------------------------------


def compilable_networks(*roots: nn.Module | None) -> list[nn.Module]:
    """Every encoder, decoder, MLP and BAN inside `roots` (each once, outermost first; none inside another)."""
    from veorl.models.ban import BehaviourAbstraction
    from veorl.models.networks import MLP, Decoder, Encoder

    kinds = (Encoder, Decoder, MLP, BehaviourAbstraction)
    found: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, kinds):
            found.append(module)
            return  # its children run inside its compiled forward
        for child in module.children():
            visit(child)

    for root in roots:
        if root is not None:
            visit(root)
    return found


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_networks(*roots: nn.Module | None) -> int:
    """Compile, in place, the forward of every network in `roots` (see the module doc); returns how many.

    Shapes that change between calls (phase 2's keyframe counts) are compiled once more as dynamic shapes; the
    recompile limit is raised so that the many MLPs sharing one forward never fall back to eager mode.
    """
    import torch._dynamo

    networks = compilable_networks(*roots)
    limit = max(int(torch._dynamo.config.recompile_limit), 8 * max(len(networks), 1))
    torch._dynamo.config.recompile_limit = limit
    for network in networks:
        if not is_compiled(network):
            network.compile()
    log.info("%d networks compile their forward on first use (torch.compile)", len(networks))
    return len(networks)


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose compiled networks are compiled for the copy (a plain deep copy would keep
    calling the original's compiled forward)."""
    originals = compilable_networks(module)
    compiled = [is_compiled(n) for n in originals]
    clone = copy.deepcopy(module)
    copies = compilable_networks(clone)
    for network, was_compiled in zip(copies, compiled):
        network._compiled_call_impl = None
        if was_compiled:
            network.compile()
    return clone


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled networks eagerly inside the region (e.g. to count FLOPs with torch.utils.flop_counter)."""
    with torch.compiler.set_stance("force_eager"):
        yield


__all__ = [
    "BF16_CPU_FLAGS",
    "PRECISIONS",
    "Precision",
    "autocast",
    "clone_module",
    "compilable_networks",
    "compile_networks",
    "cpu_flags",
    "cpu_has_bf16",
    "cpu_model_name",
    "eager",
    "full_precision",
    "is_compiled",
    "module_device",
    "resolve_precision",
    "upcast",
]
