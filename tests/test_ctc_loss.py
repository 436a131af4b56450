"""The drop-in ctc_loss / CTCLoss and slack_ctc_loss(collapse="standard") against torch.nn.functional.ctc_loss."""

import pytest
import torch
import torch.nn.functional as F

import mdlm_ctc
from oracles import assert_close_report

BACKENDS = [b for b in ("reference", "cpu") if b in mdlm_ctc.available_backends("cpu")]


def make_case(T=30, B=5, C=12, S=10, blank=0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, B, C, generator=g, dtype=dtype)
    targets = torch.randint(0, C, (B, S), generator=g)
    targets[targets == blank] = (blank + 1) % C
    input_lengths = torch.randint(S + 5, T + 1, (B,), generator=g)
    input_lengths[0] = T
    target_lengths = torch.randint(0, S + 1, (B,), generator=g)
    target_lengths[0] = S
    return logits, targets, input_lengths, target_lengths


def grads_through_log_softmax(fn, logits, *args, weights=None, **kwargs):
    x = logits.clone().requires_grad_(True)
    loss = fn(x.log_softmax(-1), *args, **kwargs)
    out = loss if loss.dim() == 0 else (loss * weights).sum()
    (grad,) = torch.autograd.grad(out, x)
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("blank", [0, 7])
def test_parity_with_torch(backend, reduction, blank):
    logits, targets, input_lengths, target_lengths = make_case(blank=blank, seed=blank)
    weights = torch.linspace(0.5, 1.5, logits.shape[1], dtype=torch.float64)
    ours, our_grad = grads_through_log_softmax(mdlm_ctc.ctc_loss, logits, targets, input_lengths, target_lengths,
                                               blank=blank, reduction=reduction, backend=backend, weights=weights)
    theirs, their_grad = grads_through_log_softmax(F.ctc_loss, logits, targets, input_lengths, target_lengths,
                                                   blank=blank, reduction=reduction, weights=weights)
    assert_close_report(ours, theirs, atol=1e-10, rtol=1e-10, what="loss")
    assert_close_report(our_grad, their_grad, atol=1e-10, rtol=1e-8, what="gradient reaching the logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_concatenated_targets_and_list_lengths(backend):
    logits, targets, input_lengths, target_lengths = make_case(seed=3)
    flat = torch.cat([targets[b, : int(target_lengths[b])] for b in range(targets.shape[0])])
    expected = F.ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, reduction="none")
    for tl in (target_lengths, target_lengths.tolist(), tuple(target_lengths.tolist())):
        for il in (input_lengths, input_lengths.tolist()):
            got = mdlm_ctc.ctc_loss(logits.log_softmax(-1), flat, il, tl, reduction="none", backend=backend)
            assert_close_report(got, expected, atol=1e-10, rtol=1e-10, what="loss (1-D targets)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_infinity_and_infeasible(backend):
    T, C = 6, 5
    logits = torch.randn(T, 3, C, dtype=torch.float64)
    targets = torch.tensor([[1, 1, 1, 1], [1, 2, 3, 4], [1, 2, 2, 3]])
    input_lengths = torch.tensor([6, 3, 5])  # row 0 needs 7 frames (repeats), row 1 has U > T
    target_lengths = torch.tensor([4, 4, 4])
    for zero_infinity in (False, True):
        weights = torch.ones(3, dtype=torch.float64)
        ours, our_grad = grads_through_log_softmax(mdlm_ctc.ctc_loss, logits, targets, input_lengths,
                                                   target_lengths, reduction="none", zero_infinity=zero_infinity,
                                                   backend=backend, weights=weights)
        theirs, their_grad = grads_through_log_softmax(F.ctc_loss, logits, targets, input_lengths, target_lengths,
                                                       reduction="none", zero_infinity=zero_infinity,
                                                       weights=weights)
        assert_close_report(ours, theirs, atol=1e-10, rtol=1e-10, what=f"loss zero_infinity={zero_infinity}")
        assert_close_report(our_grad, their_grad, atol=1e-10, rtol=1e-8,
                            what=f"gradient zero_infinity={zero_infinity}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_repeats_and_empty_targets(backend):
    T, B, C = 40, 4, 4
    logits = torch.randn(T, B, C, dtype=torch.float64)
    targets = torch.tensor([[1] * 12, [1, 2] * 6, [3] * 12, [2] * 12])
    target_lengths = torch.tensor([12, 12, 0, 5])
    input_lengths = torch.tensor([40, 30, 7, 11])
    weights = torch.linspace(1, 2, B, dtype=torch.float64)
    ours, our_grad = grads_through_log_softmax(mdlm_ctc.ctc_loss, logits, targets, input_lengths, target_lengths,
                                               reduction="none", backend=backend, weights=weights)
    theirs, their_grad = grads_through_log_softmax(F.ctc_loss, logits, targets, input_lengths, target_lengths,
                                                   reduction="none", weights=weights)
    assert_close_report(ours, theirs, atol=1e-10, rtol=1e-10, what="loss")
    assert_close_report(our_grad, their_grad, atol=1e-10, rtol=1e-8, what="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input(backend):
    logits = torch.randn(9, 5, dtype=torch.float64).log_softmax(-1)
    targets = torch.tensor([1, 2, 2, 3])
    for reduction in ("none", "mean"):
        ours = mdlm_ctc.ctc_loss(logits, targets, 9, 4, reduction=reduction, backend=backend)
        theirs = F.ctc_loss(logits, targets, torch.tensor(9), torch.tensor(4), reduction=reduction)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_true_gradient_with_respect_to_log_probs(backend):
    # d loss / d log_probs is -posterior (SPEC §3.5); PyTorch returns exp(log_probs) - posterior
    logits, targets, input_lengths, target_lengths = make_case(T=12, B=2, C=5, S=4, seed=5)
    log_probs = logits.log_softmax(-1).requires_grad_(True)
    loss = mdlm_ctc.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="sum", backend=backend)
    (ours,) = torch.autograd.grad(loss, log_probs)
    ref = mdlm_ctc.slack_ctc_reference(log_probs.detach().transpose(0, 1).requires_grad_(True), targets,
                                       target_lengths, slack_id=0, input_lengths=input_lengths, collapse="standard",
                                       normalize=False)
    assert torch.autograd.gradcheck(
        lambda lp: mdlm_ctc.ctc_loss(lp, targets, input_lengths, target_lengths, reduction="sum", backend=backend),
        (log_probs.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
    posterior_sum = -ours.sum(-1)  # posteriors sum to 1 at every frame inside the input length
    frames = torch.arange(12)[:, None] < input_lengths[None, :]
    torch.testing.assert_close(posterior_sum[frames], torch.ones_like(posterior_sum[frames]))
    torch.testing.assert_close(loss, ref.sum())


def test_module_and_slack_ctc_standard_agree():
    logits, targets, input_lengths, target_lengths = make_case(seed=6)
    module = mdlm_ctc.CTCLoss(blank=0, reduction="sum")
    a = module(logits.log_softmax(-1), targets, input_lengths, target_lengths)
    b = mdlm_ctc.slack_ctc_loss(logits.transpose(0, 1), targets, target_lengths, slack_id=0,
                                input_lengths=input_lengths, collapse="standard", reduction="sum")
    torch.testing.assert_close(a, b)
    assert "blank=0" in repr(module)


def test_float32_and_low_precision_log_probs():
    logits, targets, input_lengths, target_lengths = make_case(seed=8, dtype=torch.float32)
    theirs = F.ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, reduction="none")
    ours = mdlm_ctc.ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, reduction="none")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    bf16 = mdlm_ctc.ctc_loss(logits.log_softmax(-1).bfloat16(), targets, input_lengths, target_lengths,
                             reduction="none")
    exact = F.ctc_loss(logits.log_softmax(-1).bfloat16().double(), targets, input_lengths, target_lengths,
                       reduction="none")
    torch.testing.assert_close(bf16.double(), exact, rtol=1e-5, atol=1e-3)
