"""Behaviour segmentation: cut frame sequences into behaviours where the latent-action code changes.

See docs/method.md (phase 2): consecutive transitions with the same code form one
behaviour; each behaviour keeps its latent action and the frame where it ends; behaviours are
left-aligned and padded, and every loss on them is masked on padded slots.

Vectorised over the batch: a behaviour's slot is the running count of "behaviour ends here" flags,
and results are scattered into the padded layout in one op (the release loops over sequences in Python).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Behaviours of a batch of sequences, left-aligned and padded to K slots.

    end_index (B, K) long: frame index (0..N, N = number of transitions) where each behaviour ends;
        padded slots repeat the last frame so gathers stay in range.
    code (B, K) long: latent-action code of each behaviour (padded slots: the last behaviour's code).
    mask (B, K) bool: True for real behaviours.
    count (B,) long: number of behaviours per sequence (>= 1).
    """

    end_index: torch.Tensor
    code: torch.Tensor
    mask: torch.Tensor
    count: torch.Tensor

    @property
    def slots(self) -> int:
        return int(self.end_index.shape[1])


def segment_behaviours(codes: torch.Tensor, max_segments: int | None = None) -> Segments:
    """Segment (B, N) transition codes (code t labels frame t -> t+1) into behaviours.

    max_segments fixes K (static shapes, no device sync); None uses the batch's largest count.
    A sequence with more behaviours than max_segments raises, rather than silently dropping them.
    """
    if codes.dim() != 2 or codes.shape[1] < 1:
        raise ValueError(f"codes must be (B, N>=1) transition codes, got shape {tuple(codes.shape)}")
    batch, transitions = codes.shape
    device = codes.device
    ends_here = torch.ones_like(codes, dtype=torch.bool)
    ends_here[:, :-1] = codes[:, 1:] != codes[:, :-1]
    slot = ends_here.long().cumsum(1) - 1
    count = ends_here.sum(1)
    if max_segments is None:
        slots = int(count.max())
    else:
        slots = int(max_segments)
        if bool((count > slots).any()):
            raise ValueError(f"a sequence has {int(count.max())} behaviours, more than max_segments={slots}")
    # Non-ending steps write into a spare column that is dropped afterwards.
    target_slot = torch.where(ends_here, slot, torch.full_like(slot, slots))
    step = torch.arange(transitions, device=device).expand(batch, transitions)
    end_index = torch.full((batch, slots + 1), transitions, dtype=torch.long, device=device)
    end_index.scatter_(1, target_slot, step + 1)
    code = torch.empty((batch, slots + 1), dtype=codes.dtype, device=device)
    code[:, :] = codes[:, -1:]
    code.scatter_(1, target_slot, codes)
    mask = torch.arange(slots, device=device)[None, :] < count[:, None]
    return Segments(end_index=end_index[:, :slots], code=code[:, :slots], mask=mask, count=count)


def pad_segments(segments: Segments, slots: int) -> Segments:
    """Extend the padding of `segments` to `slots` slots (so batches of different sequence sets can be joined)."""
    have = segments.slots
    if slots < have:
        raise ValueError(f"cannot pad {have} behaviour slots down to {slots}")
    if slots == have:
        return segments
    extra = slots - have
    return Segments(
        end_index=torch.cat([segments.end_index, segments.end_index[:, -1:].expand(-1, extra)], 1),
        code=torch.cat([segments.code, segments.code[:, -1:].expand(-1, extra)], 1),
        mask=torch.cat([segments.mask, segments.mask.new_zeros(segments.mask.shape[0], extra)], 1),
        count=segments.count,
    )


def gather_steps(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, T, ...) gathered along time at index (B, K) -> (B, K, ...)."""
    if values.shape[0] != index.shape[0]:
        raise ValueError(f"batch sizes differ: values {tuple(values.shape)} vs index {tuple(index.shape)}")
    trailing = values.shape[2:]
    expanded = index.reshape(*index.shape, *([1] * len(trailing))).expand(*index.shape, *trailing)
    return values.gather(1, expanded)


@dataclass(frozen=True)
class KeyframeSequence:
    """Behaviour-level sequence for the keyframe Plan Net: the first frame, then each behaviour's end frame.

    frame_index (B, K+1): frames observed; prev_action (B, K+1, Z): the latent action leading to each
    (zeros before the first); mask (B, K+1): valid slots; next_action / next_mask: F_BC targets, the
    latent action of the behaviour that starts at each slot (absent for the last valid slot).
    """

    frame_index: torch.Tensor
    prev_action: torch.Tensor
    mask: torch.Tensor
    next_action: torch.Tensor
    next_mask: torch.Tensor


def keyframe_sequence(segments: Segments, latent_action: torch.Tensor) -> KeyframeSequence:
    """Build the keyframe Plan Net's inputs; latent_action (B, K, Z) holds each behaviour's latent action."""
    batch, slots = segments.end_index.shape
    if latent_action.shape[:2] != (batch, slots):
        raise ValueError(f"latent_action must be (B={batch}, K={slots}, Z), got {tuple(latent_action.shape)}")
    device = segments.end_index.device
    first = torch.zeros(batch, 1, dtype=torch.long, device=device)
    frame_index = torch.cat([first, segments.end_index], 1)
    zeros = latent_action.new_zeros(batch, 1, latent_action.shape[-1])
    latent_action = latent_action * segments.mask[..., None].to(latent_action.dtype)
    prev_action = torch.cat([zeros, latent_action], 1)
    valid_first = torch.ones(batch, 1, dtype=torch.bool, device=device)
    mask = torch.cat([valid_first, segments.mask], 1)
    next_action = torch.cat([latent_action, zeros], 1)
    next_mask = torch.cat([segments.mask, torch.zeros_like(valid_first)], 1)
    return KeyframeSequence(
        frame_index=frame_index, prev_action=prev_action, mask=mask, next_action=next_action, next_mask=next_mask
    )


__all__ = ["Segments", "segment_behaviours", "pad_segments", "gather_steps", "KeyframeSequence", "keyframe_sequence"]
