"""Behaviour segmentation (vectorised) against a plain per-sequence reference loop."""

from __future__ import annotations

import pytest
import torch

from veorl.algo.segmentation import gather_steps, keyframe_sequence, pad_segments, segment_behaviours


def reference_segments(codes: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per sequence: (end frame, code) of each run of equal consecutive transition codes."""
    out = []
    for row in codes.tolist():
        behaviours = []
        for t, code in enumerate(row):
            last = t == len(row) - 1
            if last or row[t + 1] != code:
                behaviours.append((t + 1, code))
        out.append(behaviours)
    return out


def assert_matches_reference(codes: torch.Tensor) -> None:
    seg = segment_behaviours(codes)
    expected = reference_segments(codes)
    assert seg.slots == max(len(e) for e in expected)
    for b, behaviours in enumerate(expected):
        n = len(behaviours)
        assert int(seg.count[b]) == n
        assert seg.mask[b, :n].all() and not seg.mask[b, n:].any()
        assert seg.end_index[b, :n].tolist() == [e for e, _ in behaviours]
        assert seg.code[b, :n].tolist() == [c for _, c in behaviours]


@pytest.mark.parametrize("seed,classes", [(0, 2), (1, 3), (2, 5), (3, 50)])
def test_random_codes_match_reference(seed, classes):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, classes, (16, 23), generator=g)
    assert_matches_reference(codes)


def test_long_runs_match_reference():
    g = torch.Generator().manual_seed(7)
    # Sticky codes: long behaviours, as a trained BAN produces.
    steps = torch.rand(12, 40, generator=g) < 0.1
    codes = steps.long().cumsum(1) % 4
    assert_matches_reference(codes)


def test_all_same_code_is_one_behaviour_ending_at_last_frame():
    codes = torch.full((3, 9), 4)
    seg = segment_behaviours(codes)
    assert seg.slots == 1
    assert seg.end_index.tolist() == [[9]] * 3
    assert seg.code.tolist() == [[4]] * 3
    assert seg.count.tolist() == [1, 1, 1]


def test_all_different_codes_give_one_behaviour_per_transition():
    codes = torch.arange(8).repeat(2, 1)
    seg = segment_behaviours(codes)
    assert seg.slots == 8
    assert seg.end_index[0].tolist() == list(range(1, 9))
    assert seg.code[1].tolist() == list(range(8))
    assert seg.mask.all()


def test_mixed_batch_pads_the_shorter_rows():
    codes = torch.tensor([[1, 1, 1, 1], [1, 2, 3, 4], [5, 5, 6, 6]])
    seg = segment_behaviours(codes)
    assert seg.slots == 4
    assert seg.mask.tolist() == [[True, False, False, False], [True] * 4, [True, True, False, False]]
    assert seg.end_index[0].tolist() == [4, 4, 4, 4]  # padding repeats the last frame (in range for gathers)
    assert seg.end_index[2, :2].tolist() == [2, 4]


def test_single_transition_and_bad_shapes():
    seg = segment_behaviours(torch.tensor([[3], [0]]))
    assert seg.end_index.tolist() == [[1], [1]] and seg.code.tolist() == [[3], [0]]
    with pytest.raises(ValueError, match="codes must be"):
        segment_behaviours(torch.zeros(5, dtype=torch.long))


def test_max_segments_fixes_width_and_refuses_overflow():
    codes = torch.tensor([[0, 0, 1, 1, 2]])
    seg = segment_behaviours(codes, max_segments=5)
    assert seg.slots == 5 and seg.mask.sum() == 3
    with pytest.raises(ValueError, match="more than max_segments"):
        segment_behaviours(codes, max_segments=2)


def test_pad_segments_extends_with_masked_slots():
    seg = segment_behaviours(torch.tensor([[0, 1, 1]]))
    padded = pad_segments(seg, 4)
    assert padded.slots == 4
    assert padded.mask.tolist() == [[True, True, False, False]]
    assert padded.end_index.tolist() == [[1, 3, 3, 3]]


def test_keyframe_sequence_layout():
    codes = torch.tensor([[2, 2, 7, 7, 7], [1, 3, 3, 3, 3]])
    seg = segment_behaviours(codes)
    vectors = torch.randn(10, 4)
    latent = vectors[seg.code]
    kf = keyframe_sequence(seg, latent)
    assert kf.frame_index.tolist() == [[0, 2, 5], [0, 1, 5]]
    assert kf.mask.all()
    assert torch.equal(kf.prev_action[:, 0], torch.zeros(2, 4))
    assert torch.equal(kf.prev_action[0, 1], vectors[2]) and torch.equal(kf.prev_action[0, 2], vectors[7])
    # F_BC target at slot k is the latent action of the behaviour starting there; none after the last.
    assert torch.equal(kf.next_action[1, 0], vectors[1]) and torch.equal(kf.next_action[1, 1], vectors[3])
    assert kf.next_mask.tolist() == [[True, True, False], [True, True, False]]


def test_keyframe_sequence_zeroes_padded_actions():
    seg = segment_behaviours(torch.tensor([[0, 0, 0], [0, 1, 2]]))
    kf = keyframe_sequence(seg, torch.ones(2, seg.slots, 3))
    assert kf.mask[0].tolist() == [True, True, False, False]
    assert kf.prev_action[0, 2:].abs().sum() == 0
    assert kf.next_mask[0].tolist() == [True, False, False, False]


def test_gather_steps_picks_frames():
    values = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    index = torch.tensor([[0, 5], [2, 2]])
    got = gather_steps(values, index)
    assert torch.equal(got[0, 1], values[0, 5]) and torch.equal(got[1, 0], values[1, 2])
