"""The deployable agent: exactly what acting needs, rebuilt from an agent artifact directory.

Artifact layout (written by `save_agent`, read by `Agent.load`):
  agent.pt         state_dict of the acting modules (`agent_layout`): encoder, trunk_net, [fbc, codebook,] actor
                   (the `bc` baseline: policy = encoder + MLP head)
  agent.json       everything needed to rebuild them: algo, env, task, camera, image_size, action_dim,
                   episode_length, action_kind, model sizes, use_latent_action, ...
  config.json, provenance.json   resolved config and upstream hashes of the run that made it
The directory is complete only once agent.json exists: it is written after the weights. Fine-tuning then
records the artifact's content hash in provenance.json (veorl.storage.record_content_hash); a reader that
comes before it computes the same hash from the files (veorl.storage.artifact_hash).

Acting (VeoRL and DreamerV2): filter the Trunk Net on each observation (posterior mean: deterministic),
f = [s, h]; with the latent-action input abar = nearest codebook vector to F_BC(f); the action is the
mode of the actor on [f, abar] (on f alone without it). bc plays its policy's mean (one-hot actions: the argmax).
With `policy="sample"` the action is drawn from the same distribution instead (bc: from its categorical, or its
Gaussian when trained with the Gaussian loss), from the agent's own generator (`reseed`), so a sampled episode is
reproducible. Only torch, numpy and veorl.models are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veorl.acceleration import autocast
from veorl.config import ModelParams
from veorl.models.actor_critic import Actor, OneHotCategorical, PixelPolicy, policy_inputs
from veorl.models.ban import Codebook
from veorl.models.networks import FBC, DenseHead, Encoder
from veorl.models.rssm import RSSMState
from veorl.models.world_models import build_rssm
from veorl.storage import atomic_torch_save, atomic_write_json, read_json

WEIGHTS_FILE = "agent.pt"
REWARD_HEAD_FILE = "reward_head.pt"  # diagnostics only: acting never reads it
META_FILE = "agent.json"
FORMAT_VERSION = 1
ALGOS = ("veorl", "dreamerv2", "bc")
POLICIES = ("mode", "sample")


class AgentError(ValueError):
    """An agent artifact is missing, incomplete or inconsistent; the message names the file."""


def agent_layout(meta: dict[str, Any]) -> tuple[str, ...]:
    """The names of the acting modules an agent described by agent.json holds, in order.

    The one description of the layout: `build_agent_modules` builds it fresh, `assemble_agent` fills it
    with trained modules, `Agent.act` reads it.
    """
    if meta["algo"] == "bc":
        return ("policy",)
    return ("encoder", "trunk_net") + (("fbc", "codebook") if meta["use_latent_action"] else ()) + ("actor",)


def build_agent_modules(meta: dict[str, Any]) -> nn.ModuleDict:
    """The acting modules described by agent.json, freshly initialised (same layout training saves)."""
    model = ModelParams.model_validate(meta["model"])
    action_dim = int(meta["action_dim"])
    if meta["algo"] == "bc":
        bc = meta["bc"]
        return nn.ModuleDict({"policy": PixelPolicy(model.cnn_depth, action_dim, int(bc["units"]), int(bc["layers"]))})
    encoder = Encoder(model.cnn_depth)
    trunk_net = build_rssm(model, action_dim, encoder.output_dim)
    modules: dict[str, nn.Module] = {"encoder": encoder, "trunk_net": trunk_net}
    actor_input = trunk_net.feat_dim
    if "fbc" in agent_layout(meta):
        modules["fbc"] = FBC(trunk_net.feat_dim, model.fbc_hidden, model.latent_action_dim)
        modules["codebook"] = Codebook(model.codebook_size, model.latent_action_dim)
        actor_input += model.latent_action_dim
    modules["actor"] = Actor(
        actor_input,
        action_dim,
        model.actor_units,
        model.actor_layers,
        kind=meta.get("action_kind", "continuous"),
        min_std=model.actor_min_std,
    )
    return nn.ModuleDict({name: modules[name] for name in agent_layout(meta)})


def assemble_agent(meta: dict[str, Any], trained: dict[str, nn.Module | None]) -> nn.ModuleDict:
    """The trained modules acting needs, taken from `trained` by the layout of `meta` (others are ignored).

    Raises AgentError when one is missing or does not have the parameters the description rebuilds
    (names and shapes), so that a written agent always loads.
    """
    layout = agent_layout(meta)
    missing = [name for name in layout if trained.get(name) is None]
    if missing:
        raise AgentError(f"{meta['algo']} acting needs the modules {missing}, which training did not provide")
    modules = nn.ModuleDict({name: trained[name] for name in layout})
    expected = {k: tuple(v.shape) for k, v in build_agent_modules(meta).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in modules.state_dict().items()}
    if expected != actual:
        differ = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        raise AgentError(f"the trained modules do not match the layout agent.json describes: {differ[:8]}")
    return modules


def save_agent(out_dir: str | Path, modules: nn.ModuleDict, meta: dict[str, Any]) -> Path:
    """Write agent.pt then agent.json (the completion marker). config/provenance are written by the caller first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expected = set(agent_layout(meta))
    if set(modules.keys()) != expected:
        raise AgentError(
            f"agent modules {sorted(modules.keys())} do not match what {meta['algo']} acting needs {sorted(expected)}"
        )
    (out / META_FILE).unlink(missing_ok=True)
    state = {k: v.detach().cpu() for k, v in modules.state_dict().items()}
    atomic_torch_save(out / WEIGHTS_FILE, state)
    atomic_write_json(out / META_FILE, {"format": FORMAT_VERSION, **meta})
    return out


class Agent:
    """A loaded policy: `initial_state(batch)` then repeated `act(image, state)`."""

    def __init__(
        self,
        modules: nn.ModuleDict,
        meta: dict[str, Any],
        device: str = "cpu",
        precision: str = "fp32",
        policy: str = "mode",
    ):
        self.meta = dict(meta)
        # Resolved (fp32 | bf16, veorl.acceleration): the networks' forward passes while acting.
        self.precision = precision
        self.algo: str = meta["algo"]
        self.action_dim = int(meta["action_dim"])
        self.image_size = int(meta["image_size"])
        self.use_latent_action = bool(meta.get("use_latent_action", False))
        self.device = torch.device(device)
        self.modules = modules.to(self.device).eval()
        self.modules.requires_grad_(False)
        self.reward_head: nn.Module | None = None
        self.reward_scale = 1.0
        if policy not in POLICIES:
            raise AgentError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.bc_loss = str((meta.get("bc") or {}).get("loss", "mse"))
        if policy == "sample" and self.algo == "bc" and self.bc_loss == "mse":
            raise AgentError(
                "policy 'sample' needs an action distribution, and this bc agent was trained with bc_loss=mse, "
                "which fits the mean action only (its spread is untrained): evaluate it with policy 'mode'"
            )
        self.policy = policy
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0)

    def reseed(self, seed: int) -> None:
        """Restart the stream sampled actions are drawn from (`policy="sample"`; no effect on the mode)."""
        self.generator.manual_seed(int(seed))

    @classmethod
    def load(cls, path: str, device: str = "cpu", precision: str = "fp32", policy: str = "mode") -> Agent:
        root = Path(path)
        meta_path, weights_path = root / META_FILE, root / WEIGHTS_FILE
        if not meta_path.is_file():
            raise AgentError(
                f"{meta_path} not found: {root} is not a complete agent artifact (run components.finetune)"
            )
        if not weights_path.is_file():
            raise AgentError(f"{weights_path} not found although {META_FILE} exists: the agent artifact is corrupt")
        meta = read_json(meta_path)
        missing = [
            k
            for k in ("algo", "action_dim", "image_size", "model", "env", "task", "camera", "episode_length")
            if k not in meta
        ]
        if missing:
            raise AgentError(f"{meta_path}: missing keys {missing}")
        if meta["algo"] not in ALGOS:
            raise AgentError(f"{meta_path}: unknown algo {meta['algo']!r} (known: {', '.join(ALGOS)})")
        if int(meta.get("format", 0)) > FORMAT_VERSION:
            raise AgentError(
                f"{meta_path}: format {meta['format']} is newer than this code understands ({FORMAT_VERSION})"
            )
        modules = build_agent_modules(meta)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        try:
            modules.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AgentError(f"{weights_path}: weights do not match {META_FILE}: {exc}") from None
        agent = cls(modules, meta, device, precision, policy)
        head_path = root / REWARD_HEAD_FILE
        if meta.get("reward_head") and head_path.is_file():
            agent.load_reward_head(head_path)
        return agent

    # -- diagnostics: what the world model expects, next to what the simulator pays ----------------------

    def load_reward_head(self, path: str | Path) -> None:
        """The Trunk Net's reward head (not needed to act): lets evaluation compare predicted and real rewards."""
        spec = self.meta["reward_head"]
        head = DenseHead(self.modules["trunk_net"].feat_dim, 1, int(spec["units"]), int(spec["layers"]))
        head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.reward_head = head.to(self.device).eval().requires_grad_(False)
        self.reward_scale = float(spec.get("reward_scale", 1.0))

    @torch.no_grad()
    def predicted_reward(self, state: dict[str, np.ndarray]) -> np.ndarray:
        """The reward the world model predicts on the state `act` returned (simulator units), (B,)."""
        if self.reward_head is None:
            raise AgentError("this agent has no reward head (bc agents, or artifacts saved without one)")
        feature = torch.cat(
            [torch.as_tensor(state["stoch"], device=self.device), torch.as_tensor(state["deter"], device=self.device)],
            -1,
        )
        return (self.reward_head(feature).reshape(-1) / self.reward_scale).cpu().numpy()

    def initial_state(self, batch: int) -> dict[str, np.ndarray]:
        if self.algo == "bc":
            return {}
        trunk_net = self.modules["trunk_net"]
        return {
            "deter": np.zeros((batch, trunk_net.deter_size), np.float32),
            "stoch": np.zeros((batch, trunk_net.stoch_size), np.float32),
            "prev_action": np.zeros((batch, self.action_dim), np.float32),
        }

    def _check_image(self, image: np.ndarray) -> torch.Tensor:
        image = np.asarray(image)
        if image.ndim != 4 or image.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"act expects images (B, {self.image_size}, {self.image_size}, 3), got {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"act expects uint8 images, got {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).to(self.device)

    @torch.no_grad()
    def act(self, image: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with autocast(self.precision, self.device):
            return self._act(image, state)

    def _act(self, image: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        pixels = self._check_image(image)
        batch = pixels.shape[0]
        if self.algo == "bc":
            return self._bc_action(pixels).float().cpu().numpy().astype(np.float32), {}
        expected = self.initial_state(batch)
        for key, zeros in expected.items():
            if key not in state:
                raise KeyError(f"act: state lacks {key!r} (expected keys {sorted(expected)}; start from initial_state)")
            if np.shape(state[key]) != zeros.shape:
                raise ValueError(f"act: state[{key!r}] has shape {np.shape(state[key])}, expected {zeros.shape}")
        as_tensor = {k: torch.as_tensor(np.asarray(state[k], np.float32), device=self.device) for k in expected}
        trunk_net = self.modules["trunk_net"]
        embed = self.modules["encoder"](pixels)
        prev = RSSMState(deter=as_tensor["deter"], stoch=as_tensor["stoch"])
        posterior, _ = trunk_net.obs_step(prev, as_tensor["prev_action"], embed, sample=False)
        feature = trunk_net.feature(posterior)
        latent_action = None
        if self.use_latent_action:
            latent_action, _ = self.modules["codebook"].nearest(self.modules["fbc"](feature))
        distribution = self.modules["actor"](policy_inputs(feature, latent_action))
        action = distribution.mode() if self.policy == "mode" else distribution.sample(self.generator)
        new_state = {"deter": posterior.deter, "stoch": posterior.stoch, "prev_action": action}
        return action.float().cpu().numpy().astype(np.float32), {
            k: v.float().cpu().numpy().astype(np.float32) for k, v in new_state.items()
        }

    def _bc_action(self, pixels: torch.Tensor) -> torch.Tensor:
        policy = self.modules["policy"]
        if self.policy == "mode":
            return policy(pixels)[0]
        raw_mean, raw_log_std = policy.raw(pixels)
        if self.bc_loss == "categorical":  # the raw means are the logits of the classifier training fitted
            return OneHotCategorical(raw_mean.float()).sample(self.generator)
        mean, log_std = policy.squash(raw_mean, raw_log_std)  # gaussian: the Normal the NLL was taken under
        noise = torch.randn(mean.shape, generator=self.generator, dtype=torch.float32, device=mean.device)
        return (mean.float() + log_std.float().exp() * noise).clamp(-1.0, 1.0)


__all__ = [
    "ALGOS",
    "META_FILE",
    "POLICIES",
    "REWARD_HEAD_FILE",
    "WEIGHTS_FILE",
    "Agent",
    "AgentError",
    "agent_layout",
    "assemble_agent",
    "build_agent_modules",
    "save_agent",
]
