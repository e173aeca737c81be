"""Diagnostics of the two things that make or break VeoRL offline: latent behaviours and the imagined policy.

Computed at the end of pretraining (`codebook_diagnostics`, on the video world model) and of fine-tuning
(`policy_diagnostics`, on the Trunk Net world model and the actor), written as `diagnostics.json` beside the
artifact, logged to MLflow, and printed by `python -m veorl.diagnose ARTIFACT_DIR`. Each figure has a threshold;
crossing it logs a warning that says what it means. All figures are computed on target data the stage
trained on, with fixed seeds, in evaluation mode (no gradient, no training RNG consumed).

Latent behaviours (video world model):
- perplexity of the codes of target transitions alone (exp of the code entropy; 1 = one code for everything);
- distinct codes and behaviours (segments of equal codes) per target sequence;
- reversed / static: share of transitions whose code changes when the pair is played backwards (e_{t+1}, e_t)
  or replaced by a still pair (e_t, e_t). A code that names a behaviour must tell motion from its reverse and
  from standing still; a code that names the domain does not;
- action probe: how much of the data action's variance a per-code mean action explains on held-out sequences
  (R^2; 0 = the code says nothing about what the robot did).

Along the agent's own evaluation rollouts (written by evaluation, beside its metrics):
- the reward the Trunk Net's reward head predicts on the states the agent filtered vs what the simulator paid
  (their ratio and per-step correlation).

Imagined policy (Trunk Net world model + actor):
- predicted return over the horizon from the same start states under the data's own next actions, the same
  actions shuffled across sequences, and each constant corner of the action box. A world model that responds to
  actions ranks data above shuffled; a corner far above the data is a reward the actor can exploit;
- ensemble disagreement along those rollouts (when the Trunk Net has a prior ensemble);
- the actor's action spread across start states (std of its mode, mean over dimensions) and share of action
  components at the bounds (|a| > 0.99). A collapsed actor plays one action everywhere, at a corner.

One-hot (discrete) actions, the game: the constant actions are each of the A actions held throughout (every
one-hot vector is a "corner"; the +-1 corners of a box mean nothing there), and the actor's usage is told by the
share of states that get its most played action, the number of distinct actions and the entropy of their
frequencies (nats); spread and bounds are left out, since a one-hot vector always sits at the bounds.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from veorl.data.episodes import pad_absorbing

log = logging.getLogger(__name__)

DIAGNOSTICS_FILE = "diagnostics.json"


@dataclass(frozen=True)
class Threshold:
    key: str
    low: float | None
    high: float | None
    meaning: str

    def crossed(self, value: float) -> bool:
        return (self.low is not None and value < self.low) or (self.high is not None and value > self.high)


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold(
        "codebook.target_perplexity",
        2.0,
        None,
        "nearly one code for every target transition: the latent actions do not name behaviours",
    ),
    Threshold("codebook.codes_per_sequence", 1.5, None, "target sequences use one code throughout"),
    Threshold(
        "codebook.reversed_distinct",
        0.5,
        None,
        "playing a transition backwards mostly keeps its code: codes do not encode the motion",
    ),
    Threshold(
        "codebook.static_distinct",
        0.5,
        None,
        "a still frame pair mostly gets the moving pair's code: codes do not encode the motion",
    ),
    Threshold("codebook.action_probe_r2", 0.05, None, "the code says next to nothing about the data action"),
    Threshold("policy.action_spread", 0.05, None, "the actor plays nearly the same action in every state (collapse)"),
    Threshold("policy.share_at_bounds", None, 0.8, "most action components sit at the bounds of the action box"),
    Threshold(
        "policy.top_action_share",
        None,
        0.95,
        "the actor plays one discrete action in nearly every state (collapse)",
    ),
    Threshold(
        "policy.corner_over_data",
        None,
        2.0,
        "a constant corner action imagines over twice the data's return: a model error the actor can exploit",
    ),
    Threshold(
        "policy.data_over_shuffled",
        1.0,
        None,
        "data actions imagine no more return than shuffled ones: the model barely responds to actions",
    ),
    Threshold(
        "reward.predicted_over_simulator",
        None,
        1.5,
        "along the agent's own rollouts the world model predicts over 1.5x the reward the simulator pays",
    ),
    Threshold(
        "reward.correlation",
        0.3,
        None,
        "predicted and simulator rewards barely move together along the agent's own rollouts",
    ),
)


def check(diagnostics: dict[str, Any], where: str) -> list[str]:
    """Warnings (also logged) for every figure that crosses its threshold."""
    from veorl.trees import flatten

    flat = flatten(diagnostics)
    warnings = []
    for threshold in THRESHOLDS:
        value = flat.get(threshold.key)
        if isinstance(value, (int, float)) and np.isfinite(value) and threshold.crossed(float(value)):
            bound = (
                f"< {threshold.low}" if threshold.low is not None and value < threshold.low else f"> {threshold.high}"
            )
            message = f"{where}: {threshold.key} = {value:.3g} ({bound}): {threshold.meaning}"
            log.warning(message)
            warnings.append(message)
    return warnings


# ------------------------------------------------------------------------------------------------
# Target windows
# ------------------------------------------------------------------------------------------------


def target_windows(store, count: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """`count` windows of `length` steps from distinct episodes where possible (image, action, reward), seeded.

    Episodes shorter than a window (a game's successes end early) are left out: a window of real steps says what
    the model does with real transitions. Only when no episode is long enough does a store that samples absorbing
    steps (the game's) give padded windows, as training sees them; any other store then fails with the lengths.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(store.lengths)
    episodes = [int(i) for i in rng.permutation(len(store)) if lengths[i] >= length]
    padded = not episodes
    if padded:
        if not getattr(store, "absorbing", False):
            raise ValueError(
                f"diagnostics need an episode of at least {length} steps; the longest has {int(lengths.max())}"
            )
        episodes = [int(i) for i in rng.permutation(len(store))]
    picks = [episodes[i % len(episodes)] for i in range(count)]
    out: dict[str, list[np.ndarray]] = {"image": [], "action": [], "reward": []}
    for index in picks:
        episode = pad_absorbing(store.episode(index), length) if padded else store.episode(index)
        steps = len(episode["action"])
        start = int(rng.integers(0, steps - length + 1))
        for key in out:
            out[key].append(np.asarray(episode[key][start : start + length]))
    return {k: np.stack(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Latent behaviours
# ------------------------------------------------------------------------------------------------


def _perplexity(codes: np.ndarray, size: int) -> float:
    counts = np.bincount(codes.reshape(-1), minlength=size).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return float(np.exp(-(nz * np.log(nz)).sum()))


def action_probe_r2(codes: np.ndarray, actions: np.ndarray, train_rows: int) -> float:
    """R^2 on held-out rows of predicting each transition's action by the mean action of its code on training rows.

    codes (B, T-1), actions (B, T-1, A). Codes unseen in training predict the training mean (no information).
    """
    train_codes, test_codes = codes[:train_rows].reshape(-1), codes[train_rows:].reshape(-1)
    train_act = actions[:train_rows].reshape(-1, actions.shape[-1])
    test_act = actions[train_rows:].reshape(-1, actions.shape[-1])
    if len(test_codes) == 0 or len(train_codes) == 0:
        return float("nan")
    overall = train_act.mean(0)
    prediction = np.tile(overall, (len(test_codes), 1))
    for code in np.unique(test_codes):
        seen = train_codes == code
        if seen.any():
            prediction[test_codes == code] = train_act[seen].mean(0)
    residual = ((test_act - prediction) ** 2).sum()
    total = ((test_act - test_act.mean(0)) ** 2).sum()
    return float(1.0 - residual / total) if total > 0 else float("nan")


@torch.no_grad()
def codebook_diagnostics(model, windows: dict[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Latent-behaviour figures of a video world model on target windows (see the module docstring)."""
    from veorl.algo.segmentation import segment_behaviours
    from veorl.models.networks import preprocess

    was_training = model.training
    model.eval()
    try:
        image = torch.as_tensor(windows["image"], device=device)
        embed = model.behaviour_embed(preprocess(image))  # (B, T, E)
        now, following = embed[:, :-1], model.ban.ahead(embed)  # e_t and e_{t+1} (e_{t+k}: k-step BAN)
        codes = model.codebook.indices(model.ban.pair(now, following))  # (B, T-1)
        reversed_codes = model.codebook.indices(model.ban.pair(following, now))
        static_codes = model.codebook.indices(model.ban.pair(now, now))
        segments = segment_behaviours(codes)
        behaviours = segments.mask.sum(1).float().mean().item()
    finally:
        model.train(was_training)
    codes_np = codes.cpu().numpy()
    # Transition t -> t+1 was caused by the action stored at index t+1 (index t holds the action that led to obs t).
    actions = np.asarray(windows["action"], np.float64)[:, 1:]
    size = int(model.codebook.K)
    return {
        "target_perplexity": _perplexity(codes_np, size),
        "codes_used": int(len(np.unique(codes_np))),
        "codebook_size": size,
        "codes_per_sequence": float(np.mean([len(np.unique(row)) for row in codes_np])),
        "behaviours_per_sequence": float(behaviours),
        "reversed_distinct": float((reversed_codes != codes).float().mean()),
        "static_distinct": float((static_codes != codes).float().mean()),
        "action_probe_r2": action_probe_r2(codes_np, actions, train_rows=len(codes_np) // 2),
        "transitions": int(codes_np.size),
    }


# ------------------------------------------------------------------------------------------------
# Imagined policy
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _predicted_return(trunk, start, actions: torch.Tensor, ensemble=None) -> tuple[float, float]:
    """Mean over start states of the summed predicted reward of an open-loop action sequence (N, H, A),
    and the mean ensemble disagreement along it (nan without an ensemble)."""
    priors = trunk.trunk_net.imagine(actions, start, sample=False)
    reward = trunk.reward_head(trunk.trunk_net.feature(priors))
    reward = reward.squeeze(-1) if reward.dim() == 3 else reward
    spread = float(ensemble.disagreement(priors.deter).mean()) if ensemble is not None else float("nan")
    return float(reward.sum(1).mean()), spread


@torch.no_grad()
def policy_diagnostics(
    trunk,
    actor,
    windows: dict[str, np.ndarray],
    horizon: int,
    reward_scale: float = 1.0,
    guidance=None,
    use_latent_action: bool = False,
    ensemble=None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_corners: int = 16,
) -> dict[str, Any]:
    """Imagined returns of data / shuffled / constant-corner actions and the actor's action spread.

    Predicted returns are divided by reward_scale, so they read in the simulator's reward units.
    Start states: the Trunk Net posterior at the first step of each window; the open-loop action sequences
    are the window's next `horizon` actions (data), the same taken from another window (shuffled), or one
    corner of the action box held constant (a discrete actor: each one-hot action).
    """
    from veorl.models.actor_critic import policy_inputs
    from veorl.models.networks import preprocess

    image = torch.as_tensor(windows["image"], device=device)
    actions = torch.as_tensor(windows["action"], device=device, dtype=torch.float32)
    count, length, action_dim = actions.shape
    if length < horizon + 1:
        raise ValueError(f"policy diagnostics need windows of at least horizon+1={horizon + 1} steps, got {length}")
    embed = trunk.encoder(preprocess(image))
    posterior, _ = trunk.trunk_net.observe(embed, actions, sample=False)
    start = posterior[:, 0]
    data_actions = actions[:, 1 : horizon + 1]
    generator = torch.Generator().manual_seed(seed)
    # A derangement-like shuffle: roll by a random non-zero offset so no window keeps its own actions.
    offset = int(torch.randint(1, max(count, 2), (1,), generator=generator)) if count > 1 else 0
    shuffled = data_actions.roll(offset, 0)
    data_return, data_spread = _predicted_return(trunk, start, data_actions, ensemble)
    shuffled_return, shuffled_spread = _predicted_return(trunk, start, shuffled, ensemble)
    discrete = getattr(actor, "kind", "continuous") == "discrete"
    if discrete:  # every action of a one-hot space, each held constant
        corners = [tuple(float(i == j) for j in range(action_dim)) for i in range(action_dim)]
    else:
        corners = list(itertools.product((-1.0, 1.0), repeat=action_dim))
    if not discrete and len(corners) > max_corners:
        chosen = torch.randperm(len(corners), generator=generator)[:max_corners].tolist()
        corners = [corners[i] for i in chosen]
    corner_returns, corner_spreads = [], []
    for corner in corners:
        held = torch.tensor(corner, device=device, dtype=torch.float32).expand(count, horizon, action_dim)
        r, s = _predicted_return(trunk, start, held, ensemble)
        corner_returns.append(r)
        corner_spreads.append(s)
    best = int(np.argmax(corner_returns))

    # The actor on every posterior state of the windows, as it acts: the mode.
    flat = posterior.reshape_batch(-1)
    feature = trunk.trunk_net.feature(flat)
    latent = guidance.latent_action(feature) if (guidance is not None and use_latent_action) else None
    mode = actor(policy_inputs(feature, latent)).mode()

    scale = float(reward_scale)
    data_r, shuffled_r, corner_best = data_return / scale, shuffled_return / scale, corner_returns[best] / scale
    return {
        "horizon": horizon,
        "start_states": count,
        "imagined_return_data": data_r,
        "imagined_return_shuffled": shuffled_r,
        "imagined_return_corner_mean": float(np.mean(corner_returns)) / scale,
        "imagined_return_corner_best": corner_best,
        "best_corner": list(corners[best]),
        "data_over_shuffled": _ratio(data_r, shuffled_r),
        "corner_over_data": _ratio(corner_best, data_r),
        "disagreement_data": data_spread,
        "disagreement_shuffled": shuffled_spread,
        "disagreement_corner_best": corner_spreads[best],
        **action_usage(mode, discrete),
    }


def action_usage(actions: torch.Tensor, discrete: bool) -> dict[str, Any]:
    """How varied the actions a policy plays over many states (N, A) are.

    Continuous: std over states (mean over dimensions), share of components at the bounds, the mean action.
    Discrete (one-hot, or any vector whose argmax is the action): the share of states given the most played
    action, the number of distinct actions, the entropy of their frequencies in nats, and the frequencies.
    """
    if not discrete:
        return {
            "action_spread": float(actions.std(0, unbiased=False).mean()),
            "share_at_bounds": float((actions.abs() > 0.99).float().mean()),
            "action_mean": actions.float().mean(0).cpu().tolist(),
        }
    counts = torch.bincount(actions.argmax(-1), minlength=actions.shape[-1]).double()
    frequency = counts / counts.sum()
    used = frequency[frequency > 0]
    return {
        "top_action_share": float(frequency.max()),
        "distinct_actions": int((counts > 0).sum()),
        "action_entropy": float(-(used * used.log()).sum()),
        "action_mean": frequency.float().cpu().tolist(),
    }


def _ratio(a: float, b: float) -> float:
    """a / b for positive returns; nan when b is not positive (a ratio of signed returns says nothing)."""
    return float(a / b) if b > 1e-8 else float("nan")


__all__ = [
    "DIAGNOSTICS_FILE",
    "THRESHOLDS",
    "Threshold",
    "check",
    "target_windows",
    "codebook_diagnostics",
    "policy_diagnostics",
    "action_probe_r2",
    "action_usage",
]
