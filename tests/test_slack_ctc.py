"""slack_ctc_loss on the CPU backends (C++ "cpu" and pure-PyTorch "reference") against independent oracles:
exhaustive enumeration of canvases, the autograd of the readable reference, position-wise CE for
max_shift=0, float64 gradcheck and property-based fuzzing."""

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mdlm_ctc
from mdlm_ctc import slack_ctc_loss, slack_ctc_reference
from oracles import assert_close_report, assert_low_precision_close, brute_force_nll

BACKENDS = [b for b in ("reference", "cpu") if b in mdlm_ctc.available_backends("cpu")]


@pytest.fixture(params=["1", "0"], ids=["two_pass", "three_pass"])
def path(request, monkeypatch):
    """Both gradient paths (mdlm_ctc/_ops.py): the tiny vocabularies here would otherwise take three passes."""
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", request.param)
    return request.param


def loss_and_grad(logits, targets, backend, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = slack_ctc_loss(x, targets, backend=backend, reduction="none", **kwargs)
    weights = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)  # distinct per-row upstream gradients
    (grad,) = torch.autograd.grad((loss.masked_fill(~loss.isfinite(), 0) * weights).sum(), x)
    return loss.detach(), grad


def reference_loss_and_grad(logits, targets, **kwargs):
    x = logits.detach().double().clone().requires_grad_(True)
    loss = slack_ctc_reference(x, targets, **kwargs)
    weights = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)
    (grad,) = torch.autograd.grad((loss.masked_fill(~loss.isfinite(), 0) * weights).sum(), x)
    return loss.detach(), grad


def random_case(B, T, V, U, *, slack_id=0, seed=0, repeats=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    low = 1 if slack_id == 0 else 0
    targets = torch.randint(low, V, (B, U), generator=g)
    if slack_id != 0:
        targets[targets == slack_id] = (slack_id + 1) % V
    if repeats and U >= 3:
        targets[:, 1] = targets[:, 0]
        targets[:, 2] = targets[:, 0]
    return logits, targets


# ---------------------------------------------------------------------------------------------
# exhaustive enumeration
# ---------------------------------------------------------------------------------------------

BRUTE_CASES = [
    # (collapse, max_shift, with_observed)
    ("preserve", None, False),
    ("preserve", 0, False),
    ("preserve", 1, False),
    ("preserve", None, True),
    ("preserve", 1, True),
    ("standard", None, False),
    ("standard", None, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("collapse,max_shift,with_observed", BRUTE_CASES)
def test_matches_brute_force(backend, collapse, max_shift, with_observed, path):
    B, T, V, U = 4, 5, 3, 3
    logits, targets = random_case(B, T, V, U, slack_id=0, seed=1)
    targets[1, :3] = torch.tensor([2, 2, 1])  # repeats
    input_lengths = torch.tensor([5, 4, 3, 2])
    target_lengths = torch.tensor([3, 2, 0, 3])  # row 3 is infeasible (U > T)
    observed = None
    if with_observed:
        observed = torch.full((B, T), -1)
        observed[0, 1] = 0
        observed[1, 0] = int(targets[1, 0])
        observed[2, 2] = 0
        observed[3, 0] = 1
    kwargs = dict(slack_id=0, input_lengths=input_lengths, collapse=collapse, max_shift=max_shift, observed=observed)
    expected = brute_force_nll(logits, targets, target_lengths, input_lengths, 0, collapse, max_shift, observed)
    loss, grad = loss_and_grad(logits, targets, backend, target_lengths=target_lengths, **kwargs)
    assert_close_report(loss, expected, atol=1e-9, rtol=1e-9, what="loss")

    x = logits.clone().requires_grad_(True)
    bf = brute_force_nll(x, targets, target_lengths, input_lengths, 0, collapse, max_shift, observed)
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((bf.masked_fill(~bf.isfinite(), 0) * weights).sum(), x)
    feasible = expected.isfinite()
    assert_close_report(grad[feasible], expected_grad[feasible], atol=1e-9, rtol=1e-7, what="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_slack_id_not_zero_and_standard_blank_not_zero(backend):
    B, T, V, U = 3, 5, 4, 2
    logits, targets = random_case(B, T, V, U, slack_id=2, seed=3)
    for collapse in ("preserve", "standard"):
        expected = brute_force_nll(logits, targets, torch.full((B,), U), torch.full((B,), T), 2, collapse)
        loss, _ = loss_and_grad(logits, targets, backend, slack_id=2, collapse=collapse)
        assert_close_report(loss, expected, atol=1e-9, rtol=1e-9, what=f"{collapse} loss")


def test_preserve_keeps_repeats_standard_needs_separator():
    # "1 0 0 0" on a canvas of exactly 4 positions: preserve is feasible (the identity alignment),
    # standard CTC cannot emit three 0s in a row without blanks in between.
    logits = torch.randn(1, 4, 5, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 2, 2]])
    preserve = slack_ctc_loss(logits, targets, slack_id=0, reduction="none")
    standard = slack_ctc_loss(logits, targets, slack_id=0, collapse="standard", reduction="none")
    assert preserve.isfinite().all()
    assert standard.isinf().all()
    # the identity alignment is the only one: the loss is the position-wise cross-entropy
    ce = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum")
    torch.testing.assert_close(preserve[0], ce)


# ---------------------------------------------------------------------------------------------
# backends against the readable reference (autograd)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("collapse", ["preserve", "standard"])
@pytest.mark.parametrize("max_shift", [None, 0, 2])
def test_cpu_matches_reference_autograd_float64(collapse, max_shift):
    if "cpu" not in BACKENDS or (collapse == "standard" and max_shift is not None):
        pytest.skip("needs the cpu backend; max_shift is preserve-only")
    B, T, V, U = 5, 24, 11, 9
    logits, targets = random_case(B, T, V, U, seed=7, repeats=True)
    input_lengths = torch.tensor([24, 20, 13, 9, 1])
    target_lengths = torch.tensor([9, 7, 0, 9, 1])
    kwargs = dict(slack_id=0, input_lengths=input_lengths, target_lengths=target_lengths, collapse=collapse,
                  max_shift=max_shift)
    loss, grad = loss_and_grad(logits, targets, "cpu", **kwargs)
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, **kwargs)
    assert_close_report(loss, ref_loss, atol=1e-10, rtol=1e-10, what="loss")
    feasible = ref_loss.isfinite()  # infeasible rows: NaN gradient (PyTorch's convention), checked elsewhere
    assert feasible.sum() >= 3
    assert_close_report(grad[feasible], ref_grad[feasible], atol=1e-10, rtol=1e-8, what="gradient")


@pytest.mark.parametrize("collapse", ["preserve", "standard"])
def test_cpu_float32_close_to_float64_reference(collapse):
    if "cpu" not in BACKENDS:
        pytest.skip("needs the cpu backend")
    B, T, V, U = 3, 200, 50, 120
    logits, targets = random_case(B, T, V, U, seed=11)
    kwargs = dict(slack_id=0, collapse=collapse, input_lengths=torch.tensor([200, 190, 150]),
                  target_lengths=torch.tensor([120, 100, 60]))
    loss, grad = loss_and_grad(logits.float(), targets, "cpu", **kwargs)
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close_report(loss, ref_loss, atol=0, rtol=2e-6, what="loss")
    # a posterior is exp(alpha + beta - loglik) with terms of the loss's size (~700 here), so fp32
    # gives it an absolute error of a few ulp(loss): the same budget torch's fp32 ctc_loss has
    scale = float(ref_loss.abs().max())
    assert_close_report(grad, ref_grad, atol=2e-6 * scale, rtol=0, what="gradient")
    if collapse == "standard":
        x = logits.float().clone().requires_grad_(True)
        theirs = torch.nn.functional.ctc_loss(x.log_softmax(-1).transpose(0, 1), targets, kwargs["input_lengths"],
                                              kwargs["target_lengths"], reduction="none")
        (their_grad,) = torch.autograd.grad((theirs * torch.linspace(0.5, 1.5, B)).sum(), x)
        assert (grad.double() - ref_grad).abs().max() <= 1.5 * (their_grad.double() - ref_grad).abs().max()


def test_observed_positions_get_zero_gradient_and_ignore_logits():
    B, T, V, U = 2, 8, 6, 4
    logits, targets = random_case(B, T, V, U, seed=5)
    observed = torch.full((B, T), -1)
    observed[0, 2] = int(targets[0, 1])
    observed[1, 5] = 0
    for backend in BACKENDS:
        loss, grad = loss_and_grad(logits, targets, backend, slack_id=0, observed=observed)
        assert grad[0, 2].abs().max() == 0 and grad[1, 5].abs().max() == 0
        perturbed = logits.clone()
        perturbed[0, 2] += torch.randn(V, dtype=torch.float64) * 5  # observed logits are not used
        loss2, _ = loss_and_grad(perturbed, targets, backend, slack_id=0, observed=observed)
        torch.testing.assert_close(loss, loss2)


def test_observed_token_outside_every_canvas_is_infeasible():
    logits, targets = random_case(1, 5, 6, 2, seed=2)
    observed = torch.full((1, 5), -1)
    observed[0, 0] = 5 if int(targets[0, 0]) != 5 and int(targets[0, 1]) != 5 else 4
    for backend in BACKENDS:
        loss = slack_ctc_loss(logits, targets, slack_id=0, observed=observed, reduction="none", backend=backend)
        assert loss.isinf().all()
        zero = slack_ctc_loss(logits.requires_grad_(), targets, slack_id=0, observed=observed, reduction="sum",
                              zero_infinity=True, backend=backend)
        zero.backward()
        assert zero.item() == 0 and logits.grad.abs().max() == 0
        logits.grad = None


# ---------------------------------------------------------------------------------------------
# max_shift = 0 is position-wise cross-entropy (SPEC §3.3)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_max_shift_zero_is_positionwise_cross_entropy(backend):
    B, T, V, U = 3, 9, 7, 5
    logits, targets = random_case(B, T, V, U, seed=9)
    input_lengths = torch.tensor([9, 7, 5])
    target_lengths = torch.tensor([5, 3, 5])
    loss, grad = loss_and_grad(logits, targets, backend, slack_id=0, max_shift=0, input_lengths=input_lengths,
                               target_lengths=target_lengths)
    x = logits.clone().requires_grad_(True)
    rows = []
    for b in range(B):
        T_b, U_b = int(input_lengths[b]), int(target_lengths[b])
        canvas = torch.cat([targets[b, :U_b], torch.zeros(T_b - U_b, dtype=torch.long)])
        rows.append(torch.nn.functional.cross_entropy(x[b, :T_b], canvas, reduction="sum"))
    ce = torch.stack(rows)
    (ce_grad,) = torch.autograd.grad((ce * torch.linspace(0.5, 1.5, B, dtype=torch.float64)).sum(), x)
    assert_close_report(loss, ce.detach(), atol=1e-10, rtol=1e-10, what="loss")
    assert_close_report(grad, ce_grad, atol=1e-10, rtol=1e-8, what="gradient")


def test_max_shift_interpolates_between_ce_and_full_ctc():
    logits, targets = random_case(2, 12, 6, 8, seed=4)
    losses = [slack_ctc_loss(logits, targets, slack_id=0, max_shift=m, reduction="none") for m in range(0, 6)]
    full = slack_ctc_loss(logits, targets, slack_id=0, reduction="none")
    for smaller, larger in zip(losses, losses[1:]):
        assert (larger <= smaller + 1e-12).all()  # more canvases, never a larger loss
    torch.testing.assert_close(losses[-1], full)  # m >= T - U admits every canvas


# ---------------------------------------------------------------------------------------------
# reductions, lengths, edge shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend):
    logits, targets = random_case(4, 10, 6, 5, seed=12)
    target_lengths = torch.tensor([5, 0, 3, 2])
    none = slack_ctc_loss(logits, targets, target_lengths, slack_id=0, reduction="none", backend=backend)
    assert none.shape == (4,)
    total = slack_ctc_loss(logits, targets, target_lengths, slack_id=0, reduction="sum", backend=backend)
    mean = slack_ctc_loss(logits, targets, target_lengths, slack_id=0, reduction="mean", backend=backend)
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, (none / target_lengths.clamp(min=1)).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    # T = 1, B = 1, empty targets, a zero-length input
    x = torch.randn(1, 1, 3, dtype=torch.float64)
    one = slack_ctc_loss(x, torch.tensor([[2]]), slack_id=0, reduction="none", backend=backend)
    torch.testing.assert_close(one, -x.log_softmax(-1)[0, 0, 2:3])
    empty = slack_ctc_loss(x, torch.zeros(1, 0, dtype=torch.long), slack_id=0, reduction="none", backend=backend)
    torch.testing.assert_close(empty, -x.log_softmax(-1)[0, 0, 0:1])
    for collapse in ("preserve", "standard"):
        zero_frames = slack_ctc_loss(torch.randn(2, 3, 4), torch.tensor([[1], [1]]), torch.tensor([0, 1]),
                                     slack_id=0, input_lengths=torch.tensor([0, 0]), collapse=collapse,
                                     reduction="none", backend=backend)
        assert zero_frames[0] == 0 and zero_frames[1] == math.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_vocabulary_and_empty_time_with_odd_strides(backend):
    # size-1 and size-0 dimensions get arbitrary strides from some ops; they must still be accepted
    x = torch.randn(2, 4, 1).expand(2, 4, 1) * 1.0
    assert slack_ctc_loss(x, torch.zeros(2, 0, dtype=torch.long), slack_id=0, reduction="sum",
                          backend=backend).item() == 0.0  # the only canvas is all slack, probability 1
    empty = torch.randn(2, 0, 1).bfloat16() * 3
    out = slack_ctc_loss(empty, torch.zeros(2, 1, dtype=torch.long) + 0, torch.tensor([0, 0]), slack_id=0,
                         reduction="none", backend=backend)
    assert out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("collapse", ["preserve", "standard"])
def test_infeasible_rows_inf_and_zero_infinity(backend, collapse, path):
    logits, targets = random_case(3, 4, 5, 4, seed=13)
    targets[2] = torch.tensor([1, 1, 2, 3])  # standard needs T >= U + repeats
    input_lengths = torch.tensor([4, 3, 4])  # row 1: U > T
    loss = slack_ctc_loss(logits, targets, slack_id=0, input_lengths=input_lengths, collapse=collapse,
                          reduction="none", backend=backend)
    assert loss[1] == math.inf
    assert (loss[2] == math.inf) == (collapse == "standard")
    x = logits.clone().requires_grad_(True)
    zeroed = slack_ctc_loss(x, targets, slack_id=0, input_lengths=input_lengths, collapse=collapse,
                            reduction="none", zero_infinity=True, backend=backend)
    assert zeroed[1] == 0
    zeroed.sum().backward()
    assert x.grad[1].abs().max() == 0 and torch.isfinite(x.grad).all()
    # without zero_infinity the infeasible row's gradient is NaN (as in PyTorch), the others are finite
    y = logits.clone().requires_grad_(True)
    slack_ctc_loss(y, targets, slack_id=0, input_lengths=input_lengths, collapse=collapse, reduction="none",
                   backend=backend).sum().backward()
    assert y.grad[1, :3].isnan().all() and torch.isfinite(y.grad[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_frames_get_zero_gradient(backend):
    logits, targets = random_case(2, 10, 5, 3, seed=14)
    x = logits.clone().requires_grad_(True)
    slack_ctc_loss(x, targets, slack_id=0, input_lengths=torch.tensor([6, 10]), backend=backend).backward()
    assert x.grad[0, 6:].abs().max() == 0
    assert x.grad[0, :6].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("collapse", ["preserve", "standard"])
def test_extreme_logits_are_nan_free(backend, collapse):
    g = torch.Generator().manual_seed(0)
    logits = torch.where(torch.rand(2, 12, 7, generator=g) > 0.5, 1e4, -1e4)
    logits[0, 3, 2:5] = -math.inf
    logits[1, :, 4] = -math.inf  # a token that is impossible everywhere
    targets = torch.tensor([[1, 2, 3, 1], [1, 2, 3, 3]])
    x = logits.requires_grad_(True)
    loss = slack_ctc_loss(x, targets, slack_id=0, collapse=collapse, reduction="none", backend=backend)
    assert not loss.isnan().any()
    loss.masked_fill(~loss.isfinite(), 0).sum().backward()
    assert not x.grad.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logit_gives_nan_loss(backend):
    logits, targets = random_case(2, 6, 5, 3, seed=15)
    logits[1, 2, 4] = math.nan
    loss = slack_ctc_loss(logits, targets, slack_id=0, reduction="none", backend=backend)
    assert loss[0].isfinite() and loss[1].isnan()


# ---------------------------------------------------------------------------------------------
# low precision, determinism, gradcheck
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("collapse", ["preserve", "standard"])
def test_low_precision_inputs(dtype, collapse, path):
    if "cpu" not in BACKENDS:
        pytest.skip("needs the cpu backend")
    logits, targets = random_case(3, 40, 30, 25, seed=16)
    low = logits.to(dtype)
    kwargs = dict(slack_id=0, collapse=collapse, target_lengths=torch.tensor([25, 20, 13]))
    loss, grad = loss_and_grad(low, targets, "cpu", **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    exact_loss, exact_grad = reference_loss_and_grad(low.double(), targets, **kwargs)  # same rounded input
    same_dtype_loss, same_dtype_grad = loss_and_grad(low, targets, "reference", **kwargs)
    assert_low_precision_close(loss, same_dtype_loss, exact_loss, what="loss", tiny=1e-3)
    assert_low_precision_close(grad, same_dtype_grad, exact_grad, what="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend, path):
    logits, targets = random_case(4, 60, 20, 30, seed=17)
    logits = logits.float()
    grads = [loss_and_grad(logits, targets, backend, slack_id=0, collapse=c)[1] for c in ("preserve", "standard")
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[2], grads[3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("collapse,max_shift", [("preserve", None), ("preserve", 1), ("standard", None)])
def test_gradcheck_float64(backend, collapse, max_shift, path):
    logits, targets = random_case(2, 6, 4, 3, seed=18)
    x = logits.requires_grad_(True)
    input_lengths = torch.tensor([6, 5])
    target_lengths = torch.tensor([3, 2])
    observed = torch.full((2, 6), -1)
    observed[1, 0] = int(targets[1, 0])

    def f(z):
        return slack_ctc_loss(z, targets, target_lengths, slack_id=0, input_lengths=input_lengths, collapse=collapse,
                              max_shift=max_shift, observed=observed, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_module_form():
    logits, targets = random_case(2, 7, 5, 3, seed=19)
    module = mdlm_ctc.SlackCTCLoss(slack_id=0, max_shift=2, reduction="sum")
    assert "max_shift=2" in repr(module)
    torch.testing.assert_close(module(logits, targets), slack_ctc_loss(logits, targets, slack_id=0, max_shift=2,
                                                                       reduction="sum"))


def test_strided_logits_and_int32_targets():
    logits, targets = random_case(3, 8, 6, 4, seed=20)
    time_major = logits.transpose(0, 1).contiguous().transpose(0, 1)  # strides (V, B*V, 1)
    padded_vocab = torch.randn(3, 8, 9, dtype=torch.float64)
    padded_vocab[:, :, :6] = logits
    expected = slack_ctc_loss(logits, targets, slack_id=0, reduction="none")
    for x in (time_major, logits.transpose(1, 2).contiguous().transpose(1, 2)):  # last dim not contiguous too
        torch.testing.assert_close(slack_ctc_loss(x, targets.int(), slack_id=0, reduction="none"), expected)


# ---------------------------------------------------------------------------------------------
# property-based fuzzing of shapes and lengths against the reference
# ---------------------------------------------------------------------------------------------

@st.composite
def lattice_cases(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 9))
    V = draw(st.integers(2, 6))
    U = draw(st.integers(0, 6))
    collapse = draw(st.sampled_from(["preserve", "standard"]))
    max_shift = draw(st.one_of(st.none(), st.integers(0, 4))) if collapse == "preserve" else None
    slack_id = draw(st.integers(0, V - 1))
    input_lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    target_lengths = draw(st.lists(st.integers(0, U), min_size=B, max_size=B))
    tokens = [t for t in range(V) if t != slack_id or collapse == "standard"]
    targets = draw(st.lists(st.lists(st.sampled_from(tokens), min_size=U, max_size=U), min_size=B, max_size=B))
    use_observed = draw(st.booleans())
    observed = draw(st.lists(st.lists(st.integers(-1, V - 1), min_size=T, max_size=T), min_size=B, max_size=B))
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    seed = draw(st.integers(0, 2**16))
    return dict(B=B, T=T, V=V, targets=targets, collapse=collapse, max_shift=max_shift, slack_id=slack_id,
                input_lengths=input_lengths, target_lengths=target_lengths,
                observed=observed if use_observed else None, scale=scale, seed=seed)


@given(lattice_cases())
def test_fuzz_cpu_against_reference(case):
    if "cpu" not in BACKENDS:
        pytest.skip("needs the cpu backend")
    g = torch.Generator().manual_seed(case["seed"])
    logits = torch.randn(case["B"], case["T"], case["V"], generator=g, dtype=torch.float64) * case["scale"]
    U = len(case["targets"][0])
    targets = torch.tensor(case["targets"], dtype=torch.long).reshape(case["B"], U)
    observed = torch.tensor(case["observed"]) if case["observed"] is not None else None
    kwargs = dict(slack_id=case["slack_id"], input_lengths=torch.tensor(case["input_lengths"]),
                  target_lengths=torch.tensor(case["target_lengths"]), collapse=case["collapse"],
                  max_shift=case["max_shift"], observed=observed)
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, **kwargs)
    feasible = ref_loss.isfinite()
    for setting in ("1", "0"):  # both gradient paths
        os.environ["MDLM_CTC_GRADIENT_IN_FORWARD"] = setting
        try:
            loss, grad = loss_and_grad(logits, targets, "cpu", **kwargs)
        finally:
            os.environ.pop("MDLM_CTC_GRADIENT_IN_FORWARD")
        assert_close_report(loss, ref_loss, atol=1e-9, rtol=1e-9, what="loss")
        assert_close_report(grad[feasible], ref_grad[feasible], atol=1e-9, rtol=1e-7, what=f"gradient, path {setting}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nan_frame_gives_nan_not_inf(backend):
    logits, targets = random_case(2, 5, 4, 2, seed=21)
    logits[0, 1, :] = math.nan
    loss = slack_ctc_loss(logits, targets, slack_id=0, reduction="none", backend=backend)
    assert loss[0].isnan() and loss[1].isfinite()
