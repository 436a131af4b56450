"""Every bad input of SPEC §4 raises a ValueError/TypeError naming the argument and the value."""

import pytest
import torch

import mdlm_ctc

B, T, V, U = 2, 6, 5, 3


def good():
    return dict(logits=torch.randn(B, T, V), targets=torch.randint(1, V, (B, U)),
                target_lengths=torch.tensor([3, 2]), slack_id=0, input_lengths=torch.tensor([6, 4]))


def call(**overrides):
    args = good()
    args.update(overrides)
    logits, targets, target_lengths = args.pop("logits"), args.pop("targets"), args.pop("target_lengths")
    return mdlm_ctc.slack_ctc_loss(logits, targets, target_lengths, **args)


@pytest.mark.parametrize("overrides,error,pattern", [
    (dict(logits=torch.randn(B, T)), ValueError, r"`logits` must be 3-D .*got shape \(2, 6\)"),
    (dict(logits=torch.randn(B, T, V).numpy()), TypeError, r"`logits` must be a torch.Tensor; got ndarray"),
    (dict(logits=torch.randint(0, 3, (B, T, V))), TypeError, r"`logits` must be float32.*got torch.int64"),
    (dict(logits=torch.randn(B, T, 0)), ValueError, r"`logits` must have a non-empty vocabulary"),
    (dict(targets=torch.randint(1, V, (B,))), ValueError, r"`targets` must be 2-D .*got shape \(2,\)"),
    (dict(targets=torch.rand(B, U)), TypeError, r"`targets` must hold integers .*got torch.float32"),
    (dict(targets=torch.randint(1, V, (3, U))), ValueError, r"`targets` has batch size 3 but `logits` has 2"),
    (dict(target_lengths=torch.tensor([3, 2, 1])), ValueError, r"`target_lengths` must have shape \(2,\)"),
    (dict(target_lengths=torch.tensor([3.0, 2.0])), TypeError, r"`target_lengths` must hold integers"),
    (dict(target_lengths=[3, 2.5]), TypeError, r"`target_lengths` must hold integers; got target_lengths\[1\] = 2.5"),
    (dict(input_lengths=torch.tensor([6])), ValueError, r"`input_lengths` must have shape \(2,\)"),
    (dict(input_lengths=torch.tensor([6, -1])), ValueError, r"`input_lengths` must be >= 0; got input_lengths\[1\] = -1"),
    (dict(input_lengths=torch.tensor([7, 4])), ValueError,
     r"`input_lengths\[0\]` = 7 is larger than the padded time dimension of `logits` \(6\)"),
    (dict(target_lengths=torch.tensor([-2, 2])), ValueError, r"`target_lengths` must be >= 0; got target_lengths\[0\] = -2"),
    (dict(target_lengths=torch.tensor([3, 4])), ValueError,
     r"`target_lengths\[1\]` = 4 is larger than the padded target dimension of `targets` \(3\)"),
    (dict(targets=torch.tensor([[1, 2, 3], [1, 9, 1]])), ValueError,
     r"`targets\[1, 1\]` = 9 is outside the vocabulary \[0, 5\)"),
    (dict(targets=torch.tensor([[1, 2, 3], [1, -4, 1]])), ValueError, r"`targets\[1, 1\]` = -4 is outside"),
    (dict(targets=torch.tensor([[1, 0, 3], [1, 2, 1]])), ValueError, r"`targets\[0, 1\]` is the slack id 0"),
    (dict(slack_id=5), ValueError, r"`slack_id` must be < the vocabulary size 5; got 5"),
    (dict(slack_id=-1), ValueError, r"`slack_id` must be >= 0; got -1"),
    (dict(slack_id=1.0), TypeError, r"`slack_id` must be an int; got 1.0"),
    (dict(collapse="merge"), ValueError, r"`collapse` must be one of 'preserve', 'standard'; got 'merge'"),
    (dict(reduction="avg"), ValueError, r"`reduction` must be one of 'none', 'sum', 'mean'; got 'avg'"),
    (dict(backend="jax"), ValueError, r"`backend` must be one of .*got 'jax'"),
    (dict(backend="cuda"), ValueError, r"`backend`='cuda' is not available for tensors on cpu.*available there"),
    (dict(max_shift=-1), ValueError, r"`max_shift` must be >= 0; got -1"),
    (dict(max_shift=2, collapse="standard"), ValueError, r"`max_shift` is only defined for collapse='preserve'"),
    (dict(observed=torch.full((B, T + 1), -1)), ValueError, r"`observed` must have shape \(batch, time\) = \(2, 6\)"),
    (dict(observed=torch.full((B, T), 5)), ValueError, r"`observed\[0, 0\]` = 5 must be -1 \(free\) or a token id"),
    (dict(observed=torch.full((B, T), -2)), ValueError, r"`observed\[0, 0\]` = -2"),
    (dict(observed=torch.full((B, T), -1.0)), TypeError, r"`observed` must hold integers"),
    (dict(zero_infinity=1), TypeError, r"`zero_infinity` must be a bool; got 1"),
])
def test_slack_ctc_bad_input(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**overrides)


def test_padding_beyond_target_length_is_not_checked():
    targets = torch.tensor([[1, 2, -100], [3, -100, -100]])  # common padding values beyond the lengths
    loss = mdlm_ctc.slack_ctc_loss(torch.randn(2, 6, 5), targets, torch.tensor([2, 1]), slack_id=0)
    assert loss.isfinite()


def test_validate_false_never_reads_out_of_bounds():
    # bad values without validation: no crash, no out-of-bounds access (lengths and ids are clamped)
    logits = torch.randn(2, 6, 5)
    targets = torch.tensor([[1, 99, -7], [3, 2, 1]])
    for backend in mdlm_ctc.available_backends("cpu"):
        loss = mdlm_ctc.slack_ctc_loss(logits, targets, torch.tensor([3, 50]), slack_id=0,
                                       input_lengths=torch.tensor([100, -3]), validate=False, backend=backend,
                                       reduction="none")
        assert loss.shape == (2,)


def test_ctc_loss_bad_input():
    lp = torch.randn(6, 2, 5).log_softmax(-1)
    targets = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"`log_probs` must be 3-D \(time, batch, classes\) or 2-D"):
        mdlm_ctc.ctc_loss(torch.randn(6), targets, [6, 6], [2, 2])
    with pytest.raises(ValueError, match=r"`blank` must be < the number of classes 5; got 5"):
        mdlm_ctc.ctc_loss(lp, targets, [6, 6], [2, 2], blank=5)
    with pytest.raises(ValueError, match=r"`input_lengths\[1\]` = 7 is larger than the padded time dimension"):
        mdlm_ctc.ctc_loss(lp, targets, [6, 7], [2, 2])
    with pytest.raises(ValueError, match=r"`targets\[1, 0\]` = 9 is outside the vocabulary"):
        mdlm_ctc.ctc_loss(lp, torch.tensor([[1, 2], [9, 4]]), [6, 6], [2, 2])
    with pytest.raises(ValueError, match=r"`target_lengths` sum to 5 but the concatenated `targets` hold only 4"):
        mdlm_ctc.ctc_loss(lp, torch.tensor([1, 2, 3, 4]), [6, 6], [2, 3])
    with pytest.raises(ValueError, match=r"`target_lengths` sum to 5 by row 1 but the concatenated"):
        mdlm_ctc.ctc_loss(lp, torch.tensor([1, 2, 3, 4]), torch.tensor([6, 6]), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"`targets` must be 2-D .* or 1-D"):
        mdlm_ctc.ctc_loss(lp, torch.zeros(2, 2, 2, dtype=torch.long), [6, 6], [2, 2])


def test_collapse_bad_input():
    with pytest.raises(ValueError, match=r"`tokens` must be 1-D \(time\) or 2-D"):
        mdlm_ctc.collapse(torch.zeros(2, 2, 2, dtype=torch.long), 0)
    with pytest.raises(TypeError, match=r"`tokens` must hold integers"):
        mdlm_ctc.collapse(torch.zeros(3), 0)
    with pytest.raises(ValueError, match=r"`mode` must be one of"):
        mdlm_ctc.collapse(torch.zeros(3, dtype=torch.long), 0, mode="merge")
    with pytest.raises(ValueError, match=r"`lengths\[0\]` = 4 must be in \[0, 3\]"):
        mdlm_ctc.collapse(torch.zeros(1, 3, dtype=torch.long), 0, lengths=torch.tensor([4]))


def test_best_alignment_bad_input():
    with pytest.raises(ValueError, match=r"`targets\[0, 0\]` is the slack id 0"):
        mdlm_ctc.best_alignment(torch.randn(1, 4, 3), torch.tensor([[0, 1]]), slack_id=0)
