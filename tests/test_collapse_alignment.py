"""collapse (hand-made cases and a per-row Python oracle) and best_alignment (Viterbi) against brute force."""

import pytest
import torch

import mdlm_ctc
from oracles import brute_force_best, canvas_score, collapse_canvas


@pytest.mark.parametrize("mode,canvas,expected", [
    ("preserve", [1, 0, 0, 0], [1, 0, 0, 0]),
    ("standard", [1, 0, 0, 0], [1, 0]),
    ("preserve", [5, 1, 0, 0, 0, 5], [1, 0, 0, 0]),  # slack = 5: repeats kept
    ("standard", [5, 1, 0, 0, 0, 5], [1, 0]),  # runs merged, then the blank deleted
    ("standard", [1, 5, 1, 1, 5, 5, 2], [1, 1, 2]),
    ("preserve", [5, 5, 5], []),
    ("standard", [], []),
])
def test_collapse_hand_cases(mode, canvas, expected):
    ids, length = mdlm_ctc.collapse(torch.tensor(canvas, dtype=torch.long), 5, mode=mode)
    assert ids.shape == (len(canvas),)
    assert int(length) == len(expected)
    assert ids[: len(expected)].tolist() == expected
    assert (ids[len(expected):] == -1).all()


@pytest.mark.parametrize("mode", ["preserve", "standard"])
def test_collapse_batched_with_lengths_matches_python(mode):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (6, 11), generator=g)
    lengths = torch.tensor([11, 0, 5, 7, 1, 11])
    ids, out_lengths = mdlm_ctc.collapse(tokens, 0, mode=mode, lengths=lengths)
    for b in range(6):
        expected = collapse_canvas(tokens[b, : int(lengths[b])].tolist(), 0, mode)
        assert int(out_lengths[b]) == len(expected)
        assert ids[b, : len(expected)].tolist() == expected
        assert (ids[b, len(expected):] == -1).all()


def test_collapse_drops_negative_padding():
    ids, lengths = mdlm_ctc.collapse(torch.tensor([[3, 0, 3, -1, -1]]), 0)
    assert ids.tolist() == [[3, 3, -1, -1, -1]] and lengths.tolist() == [2]


@pytest.mark.parametrize("collapse,max_shift,with_observed", [
    ("preserve", None, False), ("preserve", 1, False), ("preserve", None, True), ("standard", None, False),
    ("standard", None, True),
])
def test_best_alignment_is_optimal_and_admissible(collapse, max_shift, with_observed):
    B, T, V = 4, 6, 3
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    targets = torch.tensor([[1, 2, 2], [2, 1, 0], [1, 1, 1], [2, 2, 2]])
    target_lengths = torch.tensor([3, 2, 3, 3])
    input_lengths = torch.tensor([6, 5, 2, 6])  # row 2 is infeasible
    observed = None
    if with_observed:
        observed = torch.full((B, T), -1)
        observed[0, 0] = 0
        observed[1, 2] = 1
    path = mdlm_ctc.best_alignment(logits, targets, target_lengths, slack_id=0, input_lengths=input_lengths,
                                   collapse=collapse, max_shift=max_shift, observed=observed)
    assert path.shape == (B, T) and path.dtype == torch.long
    best = brute_force_best(logits, targets, target_lengths, input_lengths, 0, collapse, max_shift, observed)
    scores = canvas_score(logits, path.clamp(min=0), input_lengths, observed)
    for b in range(B):
        T_b = int(input_lengths[b])
        if best[b] == float("-inf"):
            assert (path[b] == -1).all()
            continue
        assert (path[b, T_b:] == -1).all()
        assert collapse_canvas(path[b, :T_b].tolist(), 0, collapse) == targets[b, : int(target_lengths[b])].tolist()
        if observed is not None:
            seen = observed[b, :T_b]
            assert (path[b, :T_b][seen >= 0] == seen[seen >= 0]).all()
        assert abs(float(scores[b]) - float(best[b])) < 1e-9
    ids, lengths = mdlm_ctc.collapse(path, 0, mode=collapse)
    feasible = best > float("-inf")
    assert (lengths[feasible] == target_lengths[feasible]).all()


def test_best_alignment_ties_prefer_early_tokens():
    logits = torch.zeros(1, 5, 4)  # every admissible canvas has the same score
    path = mdlm_ctc.best_alignment(logits, torch.tensor([[2, 3]]), slack_id=0)
    assert path.tolist() == [[2, 3, 0, 0, 0]]
