"""Recurrent state-space model (DreamerV2-style RSSM) used for the Plan Net and the Trunk Net.

See docs/method.md ("Networks"): deterministic layer-normed GRU state h, a
stochastic state s (Gaussian with std = 2*sigmoid(x/2)+min_std, or categorical), feature f = [s, h].
The Plan Net feeds it 8-d latent actions, the Trunk Net real actions; the module does not care which.

Speed: the action's and the embedding's projections do not depend on the recurrent state, so
`observe`/`imagine` compute them for all steps in one matmul before the time loop, and `observe`
computes the prior's statistics for all steps after it. Inside the loop only the state-dependent
matmuls remain (the GRU's two as one), with the noise drawn up front and no module construction or
distribution objects: fewer, larger kernels, which matters most when the CPU is shared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from veorl.acceleration import upcast


@dataclass
class RSSMState:
    """One (or a stack of) RSSM state(s). Gaussian states carry mean/std, categorical ones logits."""

    deter: torch.Tensor
    stoch: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RSSMState:
        return RSSMState(
            **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name))) for f in fields(self)}
        )

    def detach(self) -> RSSMState:
        return self.map(torch.Tensor.detach)

    def __getitem__(self, index) -> RSSMState:
        return self.map(lambda t: t[index])

    def reshape_batch(self, *shape: int) -> RSSMState:
        """Reshape the leading (batch/time) dimensions; trailing state dimensions are kept."""

        def one(t: torch.Tensor | None, trailing: int) -> torch.Tensor | None:
            return None if t is None else t.reshape(*shape, *t.shape[t.dim() - trailing :])

        return RSSMState(
            one(self.deter, 1), one(self.stoch, 1), one(self.mean, 1), one(self.std, 1), one(self.logits, 2)
        )

    @staticmethod
    def stack(states: list[RSSMState], dim: int = 1) -> RSSMState:
        first = states[0]
        return RSSMState(
            **{
                f.name: (
                    None if getattr(first, f.name) is None else torch.stack([getattr(s, f.name) for s in states], dim)
                )
                for f in fields(first)
            }
        )

    @staticmethod
    def cat(states: list[RSSMState], dim: int = 0) -> RSSMState:
        first = states[0]
        return RSSMState(
            **{
                f.name: (
                    None if getattr(first, f.name) is None else torch.cat([getattr(s, f.name) for s in states], dim)
                )
                for f in fields(first)
            }
        )


class _SerialRegion:
    """Run the recurrent loop's many small kernels on one intra-op thread, forward and backward.

    Each step's matmuls are tiny (batch x a few hundred); with several OpenMP threads every one of
    them pays a fork/join barrier, which on a shared CPU costs up to a scheduler time slice when a
    sibling thread is descheduled (measured here: a 10x200x200 matmul took 16 ms with 2 threads,
    15 us with 1). The forward loop runs inside `with region:`; for the backward, a hook on the loop's
    outputs drops to one thread when their gradients are ready and a hook on the loop's inputs restores
    the previous count when gradients leave the loop, so the big convolutions stay multi-threaded.
    Nested and interleaved regions are reference counted.
    """

    depth = 0
    saved_threads = 1

    @classmethod
    def enter(cls) -> None:
        if cls.depth == 0:
            cls.saved_threads = torch.get_num_threads()
            if cls.saved_threads > 1:
                torch.set_num_threads(1)
        cls.depth += 1

    @classmethod
    def exit(cls) -> None:
        cls.depth = max(0, cls.depth - 1)
        if cls.depth == 0 and cls.saved_threads > 1 and torch.get_num_threads() != cls.saved_threads:
            torch.set_num_threads(cls.saved_threads)

    def __enter__(self) -> _SerialRegion:
        self.enter()
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    @classmethod
    def guard_backward(cls, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
        """Hook the backward of a loop from `inputs` to `outputs` (only when gradients will flow through)."""
        if not torch.is_grad_enabled() or torch.get_num_threads() <= 1:
            return
        outs = [t for t in outputs if t.requires_grad]
        ins = [t for t in inputs if t.requires_grad]
        if not outs or not ins:
            return
        entered = {"done": False, "left": False}

        def on_output_grad(grad: torch.Tensor) -> None:
            if not entered["done"]:
                entered["done"] = True
                cls.enter()

        def on_input_grad(grad: torch.Tensor) -> None:
            if entered["done"] and not entered["left"]:
                entered["left"] = True
                cls.exit()

        for t in outs:
            t.register_hook(on_output_grad)
        for t in ins:
            t.register_hook(on_input_grad)


class LayerNormGRUCell(nn.Module):
    """GRU cell with layer norm on the fused gate pre-activations (DreamerV2 flavour).

    reset = sigmoid(r), candidate = tanh(reset * c), update = sigmoid(u - 1),
    h' = update * candidate + (1 - update) * h. The -1 bias favours keeping the state early in training.
    The input and state projections are separate matrices (a split of one linear over [x, h]) so that
    callers can precompute the input part.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.input_proj = nn.Linear(input_size, 3 * hidden_size, bias=False)
        self.state_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.norm = nn.LayerNorm(3 * hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.from_gates(self.input_proj(x) + self.state_proj(h), h)

    def fused_weight(self) -> torch.Tensor:
        """(input + hidden, 3 * hidden) matrix so a loop can compute the gates as one GEMM on [x, h]."""
        return torch.cat([self.input_proj.weight, self.state_proj.weight], 1).t()

    def from_gates(self, gates: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """New state from the gate pre-activations [x, h] @ fused_weight().

        The recurrent state stays fp32: under bf16 autocast only the matrix products that make the gates are bf16.
        """
        gates = self.norm(upcast(gates))
        reset, cand, update = gates.chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        return torch.lerp(h, cand, update)


def _gaussian_kl(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std_p) || N(mean_q, std_q)) summed over the last dimension (diagonal Gaussians)."""
    var_ratio = (std_p / std_q).square()
    mahal = ((mean_p - mean_q) / std_q).square()
    return 0.5 * (var_ratio + mahal - 1.0 - var_ratio.log()).sum(-1)


def _categorical_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL between independent categoricals (..., vars, classes), summed over variables."""
    logp = F.log_softmax(logits_p, -1)
    logq = F.log_softmax(logits_q, -1)
    return (logp.exp() * (logp - logq)).sum((-2, -1))


class RSSM(nn.Module):
    """RSSM(action_dim, embed_dim, deter, stoch, hidden, kind, classes, min_std).

    For kind="categorical", `stoch` is the number of categorical variables with `classes` classes each
    and the stochastic state is their flattened one-hot sample (straight-through gradients).
    """

    def __init__(
        self,
        action_dim: int,
        embed_dim: int,
        deter: int = 200,
        stoch: int = 50,
        hidden: int = 200,
        kind: Literal["gaussian", "categorical"] = "gaussian",
        classes: int = 32,
        min_std: float = 0.1,
    ):
        super().__init__()
        if kind not in ("gaussian", "categorical"):
            raise ValueError(f"RSSM kind must be 'gaussian' or 'categorical', got {kind!r}")
        self.action_dim, self.embed_dim = action_dim, embed_dim
        self.deter_size, self.stoch_vars, self.hidden = deter, stoch, hidden
        self.kind, self.classes, self.min_std = kind, classes, min_std
        self.stoch_size = stoch * classes if kind == "categorical" else stoch
        stat_size = stoch * classes if kind == "categorical" else 2 * stoch
        # img_in is one linear over [stoch, action], stored as two matrices so the action part is precomputable.
        self.img_in_stoch = nn.Linear(self.stoch_size, hidden)
        self.img_in_action = nn.Linear(action_dim, hidden, bias=False)
        self.cell = LayerNormGRUCell(hidden, deter)
        self.img_out = nn.Linear(deter, hidden)
        self.img_stats = nn.Linear(hidden, stat_size)
        # obs_in is one linear over [deter, embed], split the same way.
        self.obs_in_deter = nn.Linear(deter, hidden)
        self.obs_in_embed = nn.Linear(embed_dim, hidden, bias=False)
        self.obs_stats = nn.Linear(hidden, stat_size)
        # Time loops on one intra-op thread (see _SerialRegion); a plain attribute, not part of the maths.
        self.serial_loop = True

    # -- sizes --------------------------------------------------------------------------------

    @property
    def feat_dim(self) -> int:
        return self.stoch_size + self.deter_size

    # -- states and distributions ---------------------------------------------------------------

    def initial(self, batch: int, device: torch.device | str | None = None) -> RSSMState:
        device = device if device is not None else self.img_stats.weight.device
        dtype = self.img_stats.weight.dtype
        deter = torch.zeros(batch, self.deter_size, device=device, dtype=dtype)
        stoch = torch.zeros(batch, self.stoch_size, device=device, dtype=dtype)
        if self.kind == "gaussian":
            return RSSMState(deter, stoch, mean=torch.zeros_like(stoch), std=torch.zeros_like(stoch))
        return RSSMState(
            deter, stoch, logits=torch.zeros(batch, self.stoch_vars, self.classes, device=device, dtype=dtype)
        )

    def feature(self, state: RSSMState) -> torch.Tensor:
        return torch.cat([state.stoch, state.deter], -1)

    def get_dist(self, state: RSSMState) -> torch.distributions.Distribution:
        if self.kind == "gaussian":
            return torch.distributions.Independent(torch.distributions.Normal(state.mean, state.std), 1)
        return torch.distributions.Independent(
            torch.distributions.OneHotCategoricalStraightThrough(logits=state.logits), 1
        )

    def _stats_to_state(
        self, stats: torch.Tensor, deter: torch.Tensor, sample: bool, noise: torch.Tensor | None = None
    ) -> RSSMState:
        stats = upcast(stats)  # state statistics (and so KL terms and samples) are fp32, also under bf16 autocast
        if self.kind == "gaussian":
            mean, raw_std = stats.chunk(2, -1)
            std = 2.0 * torch.sigmoid(raw_std / 2.0) + self.min_std
            if sample:
                stoch = mean + std * (torch.randn_like(std) if noise is None else noise)
            else:
                stoch = mean
            return RSSMState(deter, stoch, mean=mean, std=std)
        logits = stats.reshape(*stats.shape[:-1], self.stoch_vars, self.classes)
        probs = torch.softmax(logits, -1)
        if sample:
            index = torch.multinomial(probs.reshape(-1, self.classes), 1).reshape(*probs.shape[:-1], 1)
        else:
            index = probs.argmax(-1, keepdim=True)
        one_hot = torch.zeros_like(probs).scatter_(-1, index, 1.0)
        stoch = one_hot + (probs - probs.detach())  # straight-through gradient; the value stays exactly one-hot
        return RSSMState(deter, stoch.flatten(-2), logits=logits)

    # -- one step ---------------------------------------------------------------------------------

    def _img_core(self, prev: RSSMState, action_proj: torch.Tensor, sample: bool) -> RSSMState:
        x = F.elu(torch.addmm(action_proj, prev.stoch, self.img_in_stoch.weight.t()) + self.img_in_stoch.bias)
        deter = self.cell(x, prev.deter)
        stats = self.img_stats(F.elu(self.img_out(deter)))
        return self._stats_to_state(stats, deter, sample)

    def _obs_core(self, prior: RSSMState, embed_proj: torch.Tensor, sample: bool) -> RSSMState:
        x = F.elu(self.obs_in_deter(prior.deter) + embed_proj)
        return self._stats_to_state(self.obs_stats(x), prior.deter, sample)

    def img_step(self, prev_state: RSSMState, prev_action: torch.Tensor, sample: bool = True) -> RSSMState:
        return self._img_core(prev_state, self.img_in_action(prev_action), sample)

    def obs_step(
        self, prev_state: RSSMState, prev_action: torch.Tensor, embed: torch.Tensor, sample: bool = True
    ) -> tuple[RSSMState, RSSMState]:
        prior = self.img_step(prev_state, prev_action, sample)
        post = self._obs_core(prior, self.obs_in_embed(embed), sample)
        return post, prior

    # -- sequences --------------------------------------------------------------------------------

    def _gaussian_noise(self, steps: int, batch: int, sample: bool, like: torch.Tensor) -> list[torch.Tensor | None]:
        """All the loop's Gaussian noise drawn in one call (one allocation instead of one per step)."""
        if self.kind != "gaussian" or not sample:
            return [None] * steps
        return list(torch.randn(steps, batch, self.stoch_vars, device=like.device, dtype=like.dtype).unbind(0))

    def observe(
        self, embed: torch.Tensor, action: torch.Tensor, state: RSSMState | None = None, sample: bool = True
    ) -> tuple[RSSMState, RSSMState]:
        """Filter over a sequence. embed (B,T,E); action (B,T,A) is the action *preceding* each embed.

        Returns posterior and prior states stacked over time, tensors shaped (B, T, ...).

        Only what the recurrence needs runs inside the time loop (input layer, GRU, posterior). The prior's
        statistics depend on h_t alone and feed no later step, so they are computed for all steps at once
        after the loop; the action and embedding projections (biases folded in) before it.
        """
        if embed.dim() != 3 or action.dim() != 3 or embed.shape[:2] != action.shape[:2]:
            raise ValueError(
                f"observe expects embed (B,T,E) and action (B,T,A) with equal B,T; got {tuple(embed.shape)} "
                f"and {tuple(action.shape)}"
            )
        batch, steps = embed.shape[:2]
        if state is None:
            state = self.initial(batch, embed.device)
        action_proj = (self.img_in_action(action) + self.img_in_stoch.bias).transpose(0, 1).contiguous()
        embed_proj = (self.obs_in_embed(embed) + self.obs_in_deter.bias).transpose(0, 1).contiguous()
        stoch_weight = self.img_in_stoch.weight.t()
        gru_weight = self.cell.fused_weight()
        obs_weight = self.obs_in_deter.weight.t()
        noise = self._gaussian_noise(steps, batch, sample, embed)
        stoch, deter = state.stoch, state.deter
        posts: list[RSSMState] = []
        with _SerialRegion() if self.serial_loop else contextlib.nullcontext():
            for t, (action_t, embed_t) in enumerate(zip(action_proj.unbind(0), embed_proj.unbind(0))):
                x = F.elu(torch.addmm(action_t, stoch, stoch_weight))
                deter = self.cell.from_gates(torch.cat([x, deter], -1) @ gru_weight, deter)
                hidden = F.elu(torch.addmm(embed_t, deter, obs_weight))
                post = self._stats_to_state(self.obs_stats(hidden), deter, sample, noise[t])
                stoch = post.stoch
                posts.append(post)
            post = RSSMState.stack(posts, 1)
        if self.serial_loop:
            _SerialRegion.guard_backward(
                [t for t in (post.deter, post.stoch, post.mean, post.std, post.logits) if t is not None],
                [action_proj, embed_proj],
            )
        prior_stats = self.img_stats(F.elu(self.img_out(post.deter)))
        prior = self._stats_to_state(prior_stats, post.deter, sample)
        return post, prior

    def imagine(self, action: torch.Tensor, state: RSSMState, sample: bool = True) -> RSSMState:
        """Roll the prior forward from `state` under actions (B,T,A); returns priors (B,T,...)."""
        if action.dim() != 3:
            raise ValueError(f"imagine expects action (B,T,A), got {tuple(action.shape)}")
        batch, steps = action.shape[:2]
        action_proj = (self.img_in_action(action) + self.img_in_stoch.bias).transpose(0, 1).contiguous()
        stoch_weight = self.img_in_stoch.weight.t()
        gru_weight = self.cell.fused_weight()
        noise = self._gaussian_noise(steps, batch, sample, action)
        start = state
        priors = []
        with _SerialRegion() if self.serial_loop else contextlib.nullcontext():
            for t, action_t in enumerate(action_proj.unbind(0)):
                x = F.elu(torch.addmm(action_t, state.stoch, stoch_weight))
                deter = self.cell.from_gates(torch.cat([x, state.deter], -1) @ gru_weight, state.deter)
                state = self._stats_to_state(self.img_stats(F.elu(self.img_out(deter))), deter, sample, noise[t])
                priors.append(state)
            prior = RSSMState.stack(priors, 1)
        if self.serial_loop:
            _SerialRegion.guard_backward(
                [t for t in (prior.deter, prior.stoch, prior.mean, prior.std, prior.logits) if t is not None],
                [action_proj, start.deter, start.stoch],
            )
        return prior

    # -- losses -----------------------------------------------------------------------------------

    def kl_divergence(self, lhs: RSSMState, rhs: RSSMState) -> torch.Tensor:
        """KL(lhs || rhs) per state, summed over the state's dimensions."""
        if self.kind == "gaussian":
            return _gaussian_kl(lhs.mean, lhs.std, rhs.mean, rhs.std)
        return _categorical_kl(lhs.logits, rhs.logits)

    def kl_loss(
        self,
        post: RSSMState,
        prior: RSSMState,
        balance: float = 0.8,
        free: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced KL with free nats applied to the (masked) average, DreamerV2 style.

        balance weights the term that trains the prior (posterior detached); 1 - balance the term that
        regularises the posterior (prior detached). Returns (loss, mean KL value); padded steps
        (mask == 0) contribute nothing to either.
        """
        kl_prior = self.kl_divergence(post.detach(), prior)
        kl_post = self.kl_divergence(post, prior.detach())
        if mask is None:
            mean_prior, mean_post = kl_prior.mean(), kl_post.mean()
        else:
            weight = mask.to(kl_prior.dtype)
            if weight.shape != kl_prior.shape:
                raise ValueError(
                    f"kl mask shape {tuple(weight.shape)} must match the states' shape {tuple(kl_prior.shape)}"
                )
            denom = weight.sum().clamp_min(1.0)
            mean_prior, mean_post = (kl_prior * weight).sum() / denom, (kl_post * weight).sum() / denom
        free_t = torch.as_tensor(free, dtype=mean_prior.dtype, device=mean_prior.device)
        loss = balance * torch.maximum(mean_prior, free_t) + (1.0 - balance) * torch.maximum(mean_post, free_t)
        return loss, mean_prior.detach()


__all__ = ["RSSMState", "LayerNormGRUCell", "RSSM"]
