"""The two-pass path (the gradient's softmax written in the vocabulary pass, mdlm_ctc/_ops.py) against the
three-pass path and the independent oracles, on every backend this machine runs (Triton under its
interpreter on a CPU: tiny shapes).

* exactness: the two paths' gradients agree to the dtype's rounding for every collapse, max_shift,
  observed, infeasible rows with and without zero_infinity, NaN rows, ``weight=`` and every reduction,
  and bitwise on Triton where the arithmetic is the same (upstream gradient 1);
* the held-out check of issue 22: with ``weight=`` and a non-unit upstream gradient the gradient equals
  the readable reference's autograd (``slack_ctc_reference``), whichever path runs;
* the dense scaling pass runs only where the upstream gradient is not exactly 1 (decided per row, on the
  device), the backward of a retained graph twice, double backward refused, empty inputs.
"""

import os

import pytest
import torch

import mdlm_ctc
from mdlm_ctc import _ops, backends, reference, slack_ctc_reference
from oracles import assert_close_report

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in mdlm_ctc.available_backends("cpu")]
TRITON = "triton" in mdlm_ctc.available_backends("cpu") and os.environ.get("TRITON_INTERPRET") == "1"
ALL_BACKENDS = CPU_BACKENDS + (["triton"] if TRITON else [])
NAN = float("nan")


@pytest.fixture(params=["1", "0"], ids=["two_pass", "three_pass"])
def path(request, monkeypatch):
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", request.param)
    return request.param


def case(dtype=torch.float64, seed=0, nan_row=False):
    """B=4 rows: a repeat, an observed frame, a ragged row, an infeasible row (U > T_b); V=7, T=8."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 4, 8, 7
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    if nan_row:
        logits[2, 3, 4] = NAN
    targets = torch.tensor([[1, 2, 2, 3], [4, 1, 5, 6], [3, 3, 3, 0], [1, 2, 3, 4]])
    target_lengths = torch.tensor([4, 3, 3, 4])
    input_lengths = torch.tensor([8, 6, 8, 3])  # row 3: U = 4 > T_b = 3
    observed = torch.full((B, T), -1)
    observed[0, 2] = 2
    observed[1, 0] = 4
    return logits.to(dtype), targets, target_lengths, input_lengths, observed


def loss_and_grad(logits, targets, target_lengths, backend, upstream, inplace=False, **kwargs):
    base = logits.detach().clone().requires_grad_(True)
    x = base * 1 if inplace else base  # the in-place mode needs a buffer the caller gives up
    loss = mdlm_ctc.slack_ctc_loss(x, targets, target_lengths, slack_id=0, backend=backend, inplace_backward=inplace,
                                   **kwargs)
    (grad,) = torch.autograd.grad(loss, base, upstream(loss))
    return loss.detach(), grad


def assert_one_rounding(actual, expected, scale, dtype, what):
    """Equal up to a rounding or two of ``dtype`` (relative to the element, or to the row's gradient scale)."""
    eps = torch.finfo(dtype).eps
    assert_close_report(actual, expected, atol=4 * eps * scale, rtol=4 * eps, what=what)


OPTIONS = [
    dict(collapse="preserve"),
    dict(collapse="preserve", max_shift=1, with_observed=True),
    dict(collapse="standard", with_observed=True),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS, ids=["preserve", "max_shift_observed", "standard_observed"])
def test_two_pass_equals_three_pass(backend, dtype, options, monkeypatch):
    options = dict(options)
    logits, targets, target_lengths, input_lengths, observed = case(dtype, nan_row=True)
    kwargs = dict(input_lengths=input_lengths, observed=observed if options.pop("with_observed", False) else None,
                  **options)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        for zero_infinity in (False, True):
            for upstream_value in (1.0, 0.75):
                def upstream(loss):
                    if reduction == "none":
                        return torch.tensor([1.0, upstream_value, 1.0, 2.0], dtype=loss.dtype)
                    return torch.full((), upstream_value, dtype=loss.dtype)
                results = {}
                for setting in ("1", "0"):
                    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", setting)
                    results[setting] = loss_and_grad(logits, targets, target_lengths, backend, upstream,
                                                     reduction=reduction, zero_infinity=zero_infinity,
                                                     weight=weight.to(dtype), **kwargs)
                (loss2, grad2), (loss3, grad3) = results["1"], results["0"]
                what = f"{backend} {dtype} {options} {reduction} zero_infinity={zero_infinity} g={upstream_value}"
                assert torch.equal(loss2.isnan(), loss3.isnan()), what
                assert torch.equal(loss2.nan_to_num(), loss3.nan_to_num()), what
                assert torch.equal(grad2.isnan(), grad3.isnan()), f"{what}: NaN positions"
                if not zero_infinity:
                    assert grad2[3, :3].isnan().all(), f"{what}: the infeasible row's gradient is NaN"
                assert grad2[2].isnan().any(), f"{what}: the NaN row's gradient holds NaN"
                assert_one_rounding(grad2, grad3, 6.0, dtype, what)


@pytest.mark.skipif(not TRITON, reason="needs Triton (interpreted on a CPU)")
@pytest.mark.parametrize("dtype,mode,max_shift", [(torch.float32, 0, 1), (torch.bfloat16, 1, -1)],
                         ids=["fp32-preserve-max_shift", "bf16-standard"])
def test_triton_two_pass_stages_are_bitwise_the_three_pass(dtype, mode, max_shift):
    """Same arithmetic on Triton (the vocabulary pass's softmax is the gradient kernel's expression): the
    two-pass stages give the three-pass bits with an upstream gradient of 1, in place or not, NaN and
    infeasible rows included, and agree to the dtype's rounding with another upstream gradient (the dense
    pass rounds a second time). Stage by stage, on one lattice (the reference's, in fp32)."""
    from mdlm_ctc.triton_kernels import emissions as triton_emissions
    from mdlm_ctc.triton_kernels import grad as triton_grad

    logits, targets, target_lengths, input_lengths, observed = case(dtype, nan_row=True)
    W = int(reference.column_band_width(input_lengths, target_lengths, None if max_shift < 0 else max_shift).max())
    scale = torch.tensor([0.5, 2.0, 1.0, 3.0])
    three = triton_emissions.emissions(logits, targets, input_lengths, target_lengths, observed, 0, max_shift, W, True)
    buffer = torch.empty_like(logits)
    two = triton_emissions.emissions_grad(logits, targets, input_lengths, target_lengths, observed, 0, max_shift, W,
                                          scale, buffer)
    in_place = logits.clone()
    two_in_place = triton_emissions.emissions_grad(in_place, targets, input_lengths, target_lengths, observed, 0,
                                                   max_shift, W, scale, in_place)
    for a, b, c, what in zip(three, two, two_in_place, ("lse", "table", "special")):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(b.nan_to_num(), c.nan_to_num()), what
    assert torch.equal(buffer.nan_to_num(), in_place.nan_to_num()), "in-place softmax"
    lse, table, special = three
    nll = reference.lattice_band_reference(table, special, targets, input_lengths, target_lengths, mode, max_shift,
                                           True)
    for upstream, zero_infinity in ((torch.ones(4), False), (torch.tensor([1.0, 0.75, 1.0, -2.0]), True)):
        want = triton_grad.gradient(upstream * scale, logits, lse, targets, input_lengths, target_lengths,
                                    observed, table, special, nll, 0, max_shift, zero_infinity, True)
        got = buffer.clone()
        triton_grad.gradient_finish(upstream, scale, nll, targets, input_lengths, target_lengths, observed,
                                    two[3], two[4], table, special, 0, max_shift, zero_infinity, got)
        what = f"{dtype} g={upstream.tolist()} zero_infinity={zero_infinity}"
        assert torch.equal(got.isnan(), want.isnan()), what
        if (upstream == 1).all():
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), what
        else:
            assert_one_rounding(got, want, 6.0, dtype, what)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_and_upstream_gradient_match_the_reference_oracle(backend, reduction, path):
    if backend == "triton" and (reduction == "sum" or path == "0"):
        pytest.skip("the interpreter is slow: the two-pass path with mean and none covers Triton here")
    """Issue 22's held-out check: ``weight=`` and a non-unit upstream gradient, against the autograd of the
    readable reference (``slack_ctc_reference``, independent of the stages), on both paths."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    logits, targets, target_lengths, input_lengths, observed = case(torch.float64, seed=3)
    input_lengths = torch.tensor([8, 6, 8, 7])  # every row feasible
    weight = torch.tensor([0.25, 1.5, 1.0, 4.0], dtype=torch.float64)
    upstream = (torch.tensor([0.5, -1.25, 2.0, 1.0], dtype=torch.float64) if reduction == "none"
                else torch.tensor(1.75, dtype=torch.float64))
    base = logits.clone().requires_grad_(True)
    nll = slack_ctc_reference(base, targets, target_lengths, slack_id=0, input_lengths=input_lengths,
                              observed=observed)
    weighted = nll * weight
    expected = {"none": weighted, "sum": weighted.sum(),
                "mean": (weighted / target_lengths.clamp(min=1)).mean()}[reduction]
    (expected_grad,) = torch.autograd.grad(expected, base, upstream)
    x = logits.to(dtype).requires_grad_(True)
    w = weight.to(dtype).requires_grad_(True)
    loss = mdlm_ctc.slack_ctc_loss(x, targets, target_lengths, slack_id=0, input_lengths=input_lengths,
                                   observed=observed, reduction=reduction, weight=w, backend=backend)
    grad, grad_weight = torch.autograd.grad(loss, (x, w), upstream.to(loss.dtype))
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-5)
    assert_close_report(loss, expected, **tol, what="loss")
    assert_close_report(grad, expected_grad, **tol, what="gradient")
    # d loss / d weight_b is the row's share of the loss: nll_b (/ (B max(U_b, 1)) for the mean)
    share = nll.detach() * ({"mean": 1 / (4 * target_lengths.clamp(min=1).double())}.get(reduction, 1.0))
    assert_close_report(grad_weight, upstream * share, **tol, what="gradient of weight")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dense_pass_runs_only_where_the_upstream_gradient_is_not_one(backend):
    """gradient_finish scales a frame's row only where its row's upstream gradient is not exactly 1 (decided
    per row by the kernel, no host sync): planted values outside the band survive a gradient of 1."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    logits, targets, target_lengths, input_lengths, _ = case(dtype, seed=5)
    input_lengths = torch.tensor([8, 6, 8, 7])
    B, T, V = logits.shape
    W = int(reference.column_band_width(input_lengths, target_lengths).max())
    scale = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=dtype)
    emissions_grad, finish = backends.two_pass_stages(backend)
    grad = torch.empty_like(logits)
    lse, table, special, soft_target, soft_special = emissions_grad(logits, targets, input_lengths, target_lengths,
                                                                     None, 0, -1, W, scale, grad)
    expected_dense = (scale[:, None, None] * torch.softmax(logits.double(), -1)).to(dtype)
    active = torch.arange(T)[None, :] < input_lengths[:, None]
    assert_close_report(grad[active], expected_dense[active], atol=1e-6, rtol=1e-5, what="row_scale * softmax")
    assert grad[~active].abs().max() == 0
    nll = backends.stages(backend)[1](table, special, targets, input_lengths, target_lengths, 0, -1, True)
    planted = grad.clone()
    planted[active] = 7.0  # a value the vocabulary pass never writes: what is not rewritten keeps it
    upstream = torch.tensor([1.0, 3.0, 1.0, -1.0], dtype=dtype)
    finish(upstream, scale, nll, targets, input_lengths, target_lengths, None, soft_target, soft_special, table,
           special, 0, -1, False, planted)
    touched = torch.zeros(B, T, V, dtype=torch.bool)
    for b in range(B):
        for t in range(int(input_lengths[b])):
            touched[b, t, 0] = True  # the special token
            u = reference.column_lo(torch.tensor(t + 1), input_lengths[b], target_lengths[b])
            for j in range(W):
                if int(u) + j <= min(t + 1, int(target_lengths[b])):
                    touched[b, t, targets[b, int(u) + j - 1]] = True
    unit = (upstream == 1)[:, None, None] & active[:, :, None] & ~touched
    scaled = (upstream != 1)[:, None, None] & active[:, :, None] & ~touched
    assert (planted[unit] == 7.0).all(), "a row with upstream gradient 1 was scaled"
    assert_close_report(planted[scaled], (7.0 * upstream[:, None, None].expand(B, T, V))[scaled], atol=0, rtol=0,
                        what="scaled rows")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_retain_graph_second_backward_and_double_backward(backend, path):
    logits, targets, target_lengths, input_lengths, observed = case(seed=7)
    input_lengths = torch.tensor([8, 6, 8, 7])
    x = logits.clone().requires_grad_(True)
    loss = mdlm_ctc.slack_ctc_loss(x, targets, target_lengths, slack_id=0, input_lengths=input_lengths,
                                   observed=observed, backend=backend)
    (first,) = torch.autograd.grad(loss, x, torch.tensor(2.0, dtype=loss.dtype), retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(0.5, dtype=loss.dtype), retain_graph=True)
    (third,) = torch.autograd.grad(loss, x, torch.tensor(2.0, dtype=loss.dtype))
    assert_close_report(second, first / 4, atol=1e-15, rtol=1e-12, what="second backward (retain_graph)")
    assert torch.equal(third, first), "the backward is reentrant: the same upstream gradient gives the same bits"
    loss = mdlm_ctc.slack_ctc_loss(x, targets, target_lengths, slack_id=0, input_lengths=input_lengths,
                                   backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_in_place_two_pass(backend, monkeypatch):
    """``inplace_backward=True`` on the two-pass path writes the softmax over the logits in the forward: no
    extra buffer, the gradient equals the out-of-place one, the logits' version counter is bumped (an op that
    saved them fails loudly), and a second backward is refused with a reason."""
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", "1")
    logits, targets, target_lengths, input_lengths, _ = case(seed=9)
    input_lengths = torch.tensor([8, 6, 8, 7])
    kwargs = dict(slack_id=0, input_lengths=input_lengths, backend=backend)
    expected = loss_and_grad(logits, targets, target_lengths, backend, lambda loss: torch.ones_like(loss),
                             input_lengths=input_lengths)
    base = logits.clone().requires_grad_(True)
    buffer = base * 1.0
    version = buffer._version
    loss = mdlm_ctc.slack_ctc_loss(buffer, targets, target_lengths, inplace_backward=True, **kwargs)
    assert buffer._version > version
    assert torch.allclose(buffer.detach().sum(-1)[:, :6], torch.full((4, 6), 1.0 / 4, dtype=torch.float64)
                          / target_lengths[:, None]), "the forward left row_scale * softmax in the buffer"
    (grad,) = torch.autograd.grad(loss, base, retain_graph=True)
    assert torch.equal(loss.detach(), expected[0]) and torch.allclose(grad, expected[1], atol=1e-15, rtol=1e-12)
    with pytest.raises(RuntimeError, match="inplace_backward=True wrote the gradient over them"):
        torch.autograd.grad(loss, base)
    saved_by_exp = base.exp()  # exp saves its output for its backward
    loss = mdlm_ctc.slack_ctc_loss(saved_by_exp, targets, target_lengths, inplace_backward=True, **kwargs)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + saved_by_exp.sum()).backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_and_empty_time(backend, path):
    """slack_ctc_loss: an empty batch gives 0 for mean and sum (a rank with no rows), never NaN, and an empty
    gradient; T = 0 gives 0 for empty targets and inf (0 with zero_infinity) otherwise. ctc_loss / CTCLoss
    refuse both, as PyTorch does."""
    x = torch.randn(0, 5, 4, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "sum"):
        loss = mdlm_ctc.slack_ctc_loss(x, torch.zeros(0, 2, dtype=torch.long), slack_id=0, reduction=reduction,
                                       backend=backend)
        assert loss.shape == () and loss.item() == 0.0 and not loss.isnan()
        loss.backward()
        assert x.grad.shape == x.shape
    none = mdlm_ctc.slack_ctc_loss(x, torch.zeros(0, 2, dtype=torch.long), slack_id=0, reduction="none",
                                   backend=backend)
    assert none.shape == (0,)
    empty_time = torch.randn(2, 0, 4, dtype=torch.float64, requires_grad=True)
    targets, lengths = torch.tensor([[1, 2], [1, 2]]), torch.tensor([0, 2])
    per_row = mdlm_ctc.slack_ctc_loss(empty_time, targets, lengths, slack_id=0, reduction="none", backend=backend)
    assert per_row[0].item() == 0.0 and not per_row[0].signbit() and per_row[1].item() == float("inf")
    mean = mdlm_ctc.slack_ctc_loss(empty_time, targets, lengths, slack_id=0, zero_infinity=True, backend=backend)
    assert mean.item() == 0.0
    mean.backward()
    for log_probs in (torch.randn(5, 0, 4).log_softmax(-1), torch.randn(0, 2, 4).log_softmax(-1)):
        B = log_probs.shape[1]
        with pytest.raises(ValueError, match="`log_probs` must not be empty"):
            mdlm_ctc.ctc_loss(log_probs, torch.ones(B, 1, dtype=torch.long), [log_probs.shape[0]] * B, [1] * B)
        with pytest.raises(ValueError, match="`log_probs` must not be empty"):
            mdlm_ctc.CTCLoss()(log_probs, torch.ones(B, 1, dtype=torch.long), [log_probs.shape[0]] * B, [1] * B)


def test_weight_is_checked():
    logits, targets, target_lengths, _, _ = case()
    for weight, error, pattern in [(torch.ones(3, dtype=torch.float64), ValueError, r"`weight` must have shape \(4,\)"),
                                   (torch.ones(4, dtype=torch.long), TypeError, "`weight` must be float32"),
                                   ([1.0] * 4, TypeError, "`weight` must be a torch.Tensor")]:
        with pytest.raises(error, match=pattern):
            mdlm_ctc.slack_ctc_loss(logits, targets, target_lengths, slack_id=0, weight=weight)


def test_cost_model_chooses_by_bytes(monkeypatch):
    """Two passes where the band is narrow next to the vocabulary, three where the band's scattered columns
    touch most of a frame's cache lines; the environment switch overrides."""
    monkeypatch.delenv("MDLM_CTC_GRADIENT_IN_FORWARD", raising=False)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert _ops.gradient_in_forward("triton", gpu, 126464, 257, 2)          # G1
    assert not _ops.gradient_in_forward("triton", gpu, 1024, 1024, 2)       # G2: a full-width band
    assert not _ops.gradient_in_forward("cpu", cpu, 1000, 1024, 4)          # C1
    assert not _ops.gradient_in_forward("cpu", cpu, 1000, 129, 4)           # C2
    assert _ops.gradient_in_forward("cpu", cpu, 32000, 257, 2)              # an MDLM band on the CPU
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", "1")
    assert _ops.gradient_in_forward("cpu", cpu, 1000, 1024, 4)
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", "0")
    assert not _ops.gradient_in_forward("triton", gpu, 126464, 257, 2)
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", "yes")
    with pytest.raises(ValueError, match="MDLM_CTC_GRADIENT_IN_FORWARD must be auto, 1 or 0"):
        _ops.gradient_in_forward("cpu", cpu, 1000, 10, 4)
