"""linear_slack_ctc_loss (hidden states + LM head, no logits materialised) against the materialised loss
``slack_ctc_loss(F.linear(hidden, weight, bias), ...)`` (= ``hidden @ weight.T + bias``): float64 exactness
of the loss and of the gradients for hidden, weight and bias across every option, chunk sizes that do and
do not divide B*T, both loop orders of the backward, bf16/fp16 under the precision-relative rule, the
memory bound on the CPU, the op layer (opcheck, torch.compile), the Triton vocabulary passes under the
interpreter, and a bf16 check on a GPU."""

import os
import sys

import pytest
import torch

import mdlm_ctc
from mdlm_ctc import linear
from mdlm_ctc.linear import LinearSlackCTCLoss, linear_slack_ctc_loss
from oracles import assert_close_report, assert_low_precision_close

SLACK = 0
F64 = dict(atol=1e-10, rtol=1e-10)


def make_case(B=3, T=7, D=5, V=13, U=4, *, seed=0, dtype=torch.float64, bias=True, repeats=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    bias_t = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    targets = torch.randint(1, V, (B, U), generator=g)
    if repeats and U >= 3:  # a run of equal tokens: several band slots of one frame share a column
        targets[0, :3] = targets[0, 0]
    return hidden, weight, bias_t, targets


def _grads(loss, inputs, reduction):
    if reduction == "none":  # distinct upstream gradients per row, as the fine-tuning loop's 1/p weights
        weights = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype, device=loss.device)
        objective = (loss.masked_fill(loss == float("inf"), 0.0) * weights).sum()
    else:
        objective = loss
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    grads = iter(torch.autograd.grad(objective, wanted, allow_unused=True))
    return [next(grads) if (x is not None and x.requires_grad) else None for x in inputs]


def run_fused(hidden, weight, bias, targets, *, grad=(True, True, True), **kwargs):
    inputs = [x.detach().clone().requires_grad_(g) if x is not None else None
              for x, g in zip((hidden, weight, bias), grad)]
    loss = linear_slack_ctc_loss(inputs[0], inputs[1], targets, bias=inputs[2], slack_id=SLACK, **kwargs)
    return loss.detach(), _grads(loss, inputs, kwargs.get("reduction", "mean"))


def run_materialised(hidden, weight, bias, targets, *, grad=(True, True, True), chunk_size=None, **kwargs):
    inputs = [x.detach().clone().requires_grad_(g) if x is not None else None
              for x, g in zip((hidden, weight, bias), grad)]
    # what an nn.Linear LM head computes (one rounding of h W^T + b in the input dtype; in float64 the
    # same as hidden @ weight.T + bias)
    logits = torch.nn.functional.linear(inputs[0], inputs[1], inputs[2])
    loss = mdlm_ctc.slack_ctc_loss(logits, targets, slack_id=SLACK, **kwargs)
    return loss.detach(), _grads(loss, inputs, kwargs.get("reduction", "mean"))


def assert_matches(fused, expected, what, tol=F64):
    (loss, grads), (loss_ref, grads_ref) = fused, expected
    assert_close_report(loss, loss_ref, what=f"{what}: loss", **tol)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, grads_ref):
        assert (a is None) == (b is None), f"{what}: d{name} presence"
        if a is not None:
            assert a.dtype == b.dtype, f"{what}: d{name} dtype {a.dtype} != {b.dtype}"
            assert_close_report(a, b, what=f"{what}: d{name}", **tol)


# ---------------------------------------------------------------------------------------------
# float64 exactness against the materialised loss
# ---------------------------------------------------------------------------------------------

OPTIONS = [  # (collapse, max_shift, with_observed)
    ("preserve", None, False),
    ("preserve", 1, False),
    ("preserve", 0, True),
    ("preserve", None, True),
    ("standard", None, False),
    ("standard", None, True),
]


def ragged_kwargs(with_observed, targets, B=3, T=7):
    input_lengths = torch.tensor([7, 5, 3])[:B]
    target_lengths = torch.tensor([4, 2, 4])[:B]  # row 2: U > T_b, infeasible
    observed = None
    if with_observed:  # row 1 shown its first target token at frame 0, row 0 a slack at frame 4
        observed = torch.full((B, T), -1)
        observed[1, 0] = int(targets[1, 0])
        observed[0, 4] = SLACK
    return dict(target_lengths=target_lengths, input_lengths=input_lengths, observed=observed)


@pytest.mark.parametrize("collapse,max_shift,with_observed", OPTIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, 21, 64])  # B*T = 21: 4 does not divide it, 64 exceeds it
def test_matches_materialised_float64(collapse, max_shift, with_observed, chunk_size):
    hidden, weight, bias, targets = make_case()
    kwargs = dict(ragged_kwargs(with_observed, targets), collapse=collapse, max_shift=max_shift, reduction="none",
                  zero_infinity=True)
    fused = run_fused(hidden, weight, bias, targets, chunk_size=chunk_size, **kwargs)
    assert_matches(fused, run_materialised(hidden, weight, bias, targets, **kwargs),
                   f"{collapse}, max_shift={max_shift}, observed={with_observed}, chunk={chunk_size}")


@pytest.mark.parametrize("collapse,max_shift,with_observed", OPTIONS[::2] + OPTIONS[3:4])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_gradient_in_forward_matches_materialised_float64(collapse, max_shift, with_observed, chunk_size,
                                                          monkeypatch):
    """The gradient accumulated in the forward (3 GEMMs, sparse posterior correction in the backward) equals
    the materialised gradient: scalar reductions with ``row_weight``, an upstream gradient that is not 1, an
    infeasible row (NaN gradients, PyTorch's convention: its dH rows, all of dW and db), repeats, observed
    frames; and ``reduction="none"`` / ``zero_infinity`` (which take the recompute path)."""
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", "1")
    hidden, weight, bias, targets = make_case()
    row_weight = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    base = dict(ragged_kwargs(with_observed, targets), collapse=collapse, max_shift=max_shift)
    for reduction, zero_infinity, upstream in (("mean", False, 1.0), ("sum", False, 1.7), ("mean", True, 1.0),
                                               ("none", False, None)):
        kwargs = dict(base, reduction=reduction, zero_infinity=zero_infinity)
        inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        loss = linear_slack_ctc_loss(inputs[0], inputs[1], targets, bias=inputs[2], slack_id=SLACK,
                                     chunk_size=chunk_size, row_weight=row_weight, **kwargs)
        expected_inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        expected = mdlm_ctc.slack_ctc_loss(torch.nn.functional.linear(*expected_inputs), targets, slack_id=SLACK,
                                           weight=row_weight, **kwargs)
        up = torch.linspace(0.5, 1.5, 3, dtype=torch.float64) if upstream is None else torch.tensor(upstream,
                                                                                                 dtype=torch.float64)
        grads = torch.autograd.grad(loss, inputs, up)
        expected_grads = torch.autograd.grad(expected, expected_inputs, up)
        what = f"{collapse} {max_shift} {with_observed} chunk={chunk_size} {reduction} zero_infinity={zero_infinity}"
        assert_close_report(loss, expected, what=f"{what}: loss", **F64)
        for name, a, b in zip(("hidden", "weight", "bias"), grads, expected_grads):
            assert_close_report(a, b, what=f"{what}: d{name}", **F64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradient_in_forward_low_precision_and_second_backward(dtype, monkeypatch):
    """bf16 under the precision-relative rule, partial gradients, and a second backward through a retained
    graph (which recomputes: the accumulators were consumed by the first)."""
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", "1")
    hidden, weight, bias, targets = make_case(B=2, T=20, D=16, V=40, U=12, seed=8)
    kwargs = dict(target_lengths=torch.tensor([12, 9]), input_lengths=torch.tensor([20, 17]))
    exact = run_materialised(hidden, weight, bias, targets, **kwargs)
    low = [x.to(dtype) for x in (hidden, weight, bias)]
    same_dtype = run_materialised(*low, targets, **kwargs)
    fused = run_fused(*low, targets, chunk_size=7, **kwargs)
    for name, a, b, c in zip(("hidden", "weight", "bias"), fused[1], same_dtype[1], exact[1]):
        assert a.dtype == dtype
        assert_low_precision_close(a, b, c, what=f"{dtype} d{name}")
    frozen_head = run_fused(*low, targets, grad=(True, False, False), chunk_size=7, **kwargs)
    assert frozen_head[1][1] is None and torch.equal(frozen_head[1][0], fused[1][0])
    inputs = [x.clone().requires_grad_(True) for x in low]
    loss = linear_slack_ctc_loss(inputs[0], inputs[1], targets, bias=inputs[2], slack_id=SLACK, chunk_size=7,
                                 **kwargs)
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs)
    for a, b, c in zip(second, first, exact[1]):
        assert_low_precision_close(a, b, c, what="second backward", tiny=1e-4)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(linear_slack_ctc_loss(inputs[0], inputs[1], targets, bias=inputs[2], slack_id=SLACK,
                                                  chunk_size=7, **kwargs), inputs, create_graph=True)


def test_gradient_in_forward_choice():
    """Taken for MDLM bands at LLM vocabularies, when it saves a GEMM at acceptable memory; never for
    reduction="none" or zero_infinity; the environment switch overrides the cost."""
    choice = linear.gradient_in_forward_choice
    os.environ.pop("MDLM_CTC_GRADIENT_IN_FORWARD", None)
    assert choice(4096, 32000, 256, 257, 1024, 2, 2, False)          # cpu-bf16 at chunk 1,024
    assert not choice(4096, 32000, 256, 257, 1024, 2, 0, False)      # reduction="none"
    assert not choice(4096, 32000, 256, 257, 1024, 2, 2, True)       # zero_infinity
    assert not choice(16384, 126464, 4096, 257, 1024, 2, 2, False)   # G4: a [V, D] fp32 accumulator > a chunk
    assert choice(16384, 126464, 4096, 257, 8192, 2, 2, False)       # ... unless the chunk is as large
    assert not choice(4096, 1000, 256, 257, 1024, 4, 2, False)       # a band as wide as the vocabulary


@pytest.mark.parametrize("chunk_size", [1, 3, 40])
@pytest.mark.parametrize("collapse", ["preserve", "standard"])
def test_vocabulary_outer_backward(monkeypatch, collapse, chunk_size):
    """N <= V: the backward runs vocabulary tiles outside (several tiles, several frame blocks, the sparse
    posterior write in several row blocks)."""
    monkeypatch.setattr(linear, "_MIN_VOCAB_TILE", 4)
    hidden, weight, bias, targets = make_case(B=2, T=6, V=40, U=3, seed=3)
    assert linear._tiling(12, 40, chunk_size)[0]
    kwargs = dict(target_lengths=torch.tensor([3, 2]), input_lengths=torch.tensor([6, 4]), collapse=collapse,
                  reduction="none")
    fused = run_fused(hidden, weight, bias, targets, chunk_size=chunk_size, **kwargs)
    assert_matches(fused, run_materialised(hidden, weight, bias, targets, **kwargs), f"vocab-outer {chunk_size}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_reductions_and_infeasible_rows(reduction, zero_infinity):
    """mean = per-row loss / clamped target length, then the batch mean; an infeasible row gives inf and NaN
    gradients (PyTorch's convention) or, with zero_infinity, 0 and zero gradients."""
    hidden, weight, bias, targets = make_case(seed=1)
    kwargs = dict(ragged_kwargs(False, targets), reduction=reduction, zero_infinity=zero_infinity)
    fused = run_fused(hidden, weight, bias, targets, chunk_size=5, **kwargs)
    expected = run_materialised(hidden, weight, bias, targets, **kwargs)
    assert_matches(fused, expected, f"{reduction}, zero_infinity={zero_infinity}")
    if zero_infinity:
        assert all(torch.isfinite(g).all() for g in fused[1])


def test_empty_targets_and_no_bias():
    hidden, weight, _, targets = make_case(seed=2)
    kwargs = dict(target_lengths=torch.tensor([0, 3, 0]), input_lengths=torch.tensor([7, 7, 2]))
    fused = run_fused(hidden, weight, None, targets, chunk_size=4, **kwargs)
    assert_matches(fused, run_materialised(hidden, weight, None, targets, **kwargs), "empty targets, no bias")
    empty = targets[:, :0]  # padded target width 0: every row is all slack
    fused = run_fused(hidden, weight, None, empty, chunk_size=4, reduction="sum")
    assert_matches(fused, run_materialised(hidden, weight, None, empty, reduction="sum"), "U_max = 0")


@pytest.mark.parametrize("B,T,U", [(1, 1, 1), (1, 1, 0), (0, 3, 2)])
def test_tiny_shapes(B, T, U):
    hidden, weight, bias, targets = make_case(B=max(B, 1), T=T, U=U, seed=16)
    hidden, targets = hidden[:B], targets[:B]
    fused = run_fused(hidden, weight, bias, targets, chunk_size=2, reduction="sum")
    assert_matches(fused, run_materialised(hidden, weight, bias, targets, reduction="sum"), f"B={B}, T={T}, U={U}")


def test_large_logits_and_a_masked_column():
    """Logits of +-1e4 and a -inf bias column (a token banned from the vocabulary): finite, as materialised."""
    hidden, weight, bias, targets = make_case(B=2, T=5, U=3, seed=17, dtype=torch.float32)
    hidden, weight = hidden * 100, weight * 30
    bias[5] = float("-inf")
    targets[targets == 5] = 1
    kwargs = dict(reduction="none")
    fused = run_fused(hidden, weight, bias, targets, chunk_size=3, **kwargs)
    expected = run_materialised(hidden, weight, bias, targets, **kwargs)
    assert_close_report(fused[0], expected[0], what="loss", atol=1e-2, rtol=1e-5)
    assert all(torch.isfinite(g).all() for g in fused[1][:2]) and fused[1][2][5] == 0


@pytest.mark.parametrize("grad", [(True, False, False), (False, True, True), (False, False, True)])
def test_partial_gradients(grad):
    """Only the requested gradients are computed (a frozen LM head, a frozen trunk)."""
    hidden, weight, bias, targets = make_case(seed=4)
    fused = run_fused(hidden, weight, bias, targets, grad=grad, chunk_size=6)
    assert_matches(fused, run_materialised(hidden, weight, bias, targets, grad=grad), f"grad={grad}")


def test_ignored_and_observed_frames_get_zero_gradient():
    hidden, weight, bias, targets = make_case(seed=5)
    kwargs = ragged_kwargs(True, targets)
    _, (d_hidden, _, _) = run_fused(hidden, weight, bias, targets, chunk_size=4, **kwargs)
    assert (d_hidden[1, 5:] == 0).all() and (d_hidden[2, 3:] == 0).all(), "frames past the input length"
    assert (d_hidden[1, 0] == 0).all() and (d_hidden[0, 4] == 0).all(), "observed frames"


def test_deterministic():
    hidden, weight, bias, targets = make_case(B=2, T=9, V=11, U=5, seed=6)
    targets[1, :5] = 3  # long runs of one token: the merged-posterior path
    first = run_fused(hidden, weight, bias, targets, chunk_size=5, collapse="standard")
    second = run_fused(hidden, weight, bias, targets, chunk_size=5, collapse="standard")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_nan_hidden_state_gives_a_nan_row():
    """A NaN hidden state makes its whole logits row NaN; the row's loss is NaN, as the materialised loss
    gives it."""
    hidden, weight, bias, targets = make_case(seed=7)
    hidden[1, 2, 0] = float("nan")
    kwargs = dict(reduction="none")
    fused = run_fused(hidden, weight, bias, targets, chunk_size=4, **kwargs)
    expected = run_materialised(hidden, weight, bias, targets, backend="reference", **kwargs)
    assert_close_report(fused[0], expected[0], what="loss with a NaN hidden state", **F64)
    assert fused[0][1].isnan() and fused[0][[0, 2]].isfinite().all()


def test_non_contiguous_inputs():
    """A slice of the model's hidden states (the answer part) and a transposed (tied) weight, used as views."""
    g = torch.Generator().manual_seed(18)
    trunk = torch.randn(3, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    embedding = torch.randn(5, 13, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 13, (3, 4), generator=g)
    hidden, weight = trunk[:, 2:, 1:6], embedding.t()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    loss = linear_slack_ctc_loss(hidden, weight, targets, slack_id=SLACK, chunk_size=4)
    grads = torch.autograd.grad(loss, (trunk, embedding))
    expected = mdlm_ctc.slack_ctc_loss(hidden @ weight.T, targets, slack_id=SLACK)
    expected_grads = torch.autograd.grad(expected, (trunk, embedding))
    assert_close_report(loss, expected, what="loss", **F64)
    for name, a, b in zip(("trunk", "embedding"), grads, expected_grads):
        assert_close_report(a, b, what=f"d{name}", **F64)


def test_module_and_linear_head():
    hidden, weight, bias, targets = make_case(seed=8)
    head = torch.nn.Linear(5, 13, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    loss_fn = LinearSlackCTCLoss(slack_id=SLACK, reduction="sum", chunk_size=4)
    loss = loss_fn(hidden, head, targets)
    loss.backward()
    expected = run_materialised(hidden, weight, bias, targets, reduction="sum")
    assert_close_report(loss.detach(), expected[0], what="module loss", **F64)
    assert_close_report(head.weight.grad, expected[1][1], what="module dW", **F64)
    assert_close_report(head.bias.grad, expected[1][2], what="module db", **F64)
    assert "chunk_size=4" in repr(loss_fn)


def test_autocast_casts_like_linear():
    """Under autocast a float32 LM head is used in bf16 and gets a float32 gradient."""
    hidden, weight, bias, targets = make_case(seed=9, dtype=torch.float32)
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_slack_ctc_loss(hidden, w, targets, bias=bias, slack_id=SLACK, chunk_size=4)
    loss.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    expected = run_materialised(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), targets)
    assert abs(float(loss.detach()) - float(expected[0])) < 0.05 * abs(float(expected[0]))


# ---------------------------------------------------------------------------------------------
# low precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size,min_tile", [(5, 1024), (64, 1024), (3, 8)])
def test_low_precision_relative_rule(monkeypatch, dtype, chunk_size, min_tile):
    """Error against float64 at most twice the materialised loss's error in the same dtype (one vocabulary
    tile with fp32-accumulated dW over frame blocks; several tiles with fp32-accumulated dH)."""
    monkeypatch.setattr(linear, "_MIN_VOCAB_TILE", min_tile)
    hidden, weight, bias, targets = make_case(B=3, T=12, D=16, V=50, U=6, seed=10)
    kwargs = dict(target_lengths=torch.tensor([6, 4, 5]), input_lengths=torch.tensor([12, 9, 12]),
                  reduction="none")
    low = [x.to(dtype) for x in (hidden, weight, bias)]
    fused = run_fused(*low, targets, chunk_size=chunk_size, **kwargs)
    same_dtype = run_materialised(*low, targets, **kwargs)
    exact = run_materialised(*[x.double() for x in low], targets, **kwargs)
    assert_low_precision_close(fused[0], same_dtype[0], exact[0], what=f"{dtype} loss")
    for name, a, b, c in zip(("hidden", "weight", "bias"), fused[1], same_dtype[1], exact[1]):
        assert a.dtype == dtype, f"d{name} comes back in the input dtype"
        assert_low_precision_close(a, b, c, what=f"{dtype} d{name}", tiny=1e-4)


# ---------------------------------------------------------------------------------------------
# memory: the CPU allocator's live bytes, from the profiler's allocation events
# ---------------------------------------------------------------------------------------------

def cpu_peak_bytes(step):
    """Largest growth of live bytes in torch's CPU allocator while ``step`` runs (benchmarks/common.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import common

    return common.cpu_allocator_peak_bytes(step)


@pytest.mark.parametrize("gradient_in_forward", ["0", "1"])
def test_peak_memory_is_bounded_by_the_chunk(gradient_in_forward, monkeypatch):
    """The CPU allocator's peak during forward + backward is one chunk of logits + the returned gradients
    + the fp32 band tables, within 5% (measured: 1.01x at chunk 8 and 1.005x at chunk 32); the backend
    stages run in place on the one logits buffer, with no fp32 copy and no chunk-sized temporary. With the
    gradient in the forward the band softmax tables are kept too (a second set of tables), and the sparse
    correction's temporaries are bounded by one chunk of logits."""
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", gradient_in_forward)
    B, T, D, V, U = 2, 64, 16, 4096, 40
    hidden, weight, bias, targets = make_case(B=B, T=T, D=D, V=V, U=U, seed=11, dtype=torch.float32)
    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    N, itemsize = B * T, 4
    outputs = (h.numel() + w.numel() + b.numel()) * itemsize  # the gradients themselves
    tables = N * (T - U + 1 + 2) * 4  # lse [N], the band table [N, W], special [N], fp32

    def step(chunk):
        def run():
            h.grad = w.grad = b.grad = None
            linear_slack_ctc_loss(h, w, targets, bias=b, slack_id=SLACK, chunk_size=chunk).backward()
        return run

    materialised_logits = N * V * itemsize
    peaks = {}
    for chunk in (8, 32):
        step(chunk)()  # warm-up
        h.grad = w.grad = b.grad = None  # freed before the measurement, so they cannot offset the new ones
        peaks[chunk] = cpu_peak_bytes(step(chunk))
        chunk_logits = chunk * V * itemsize
        budget = outputs + tables + chunk_logits
        if gradient_in_forward == "1":
            budget += tables + chunk_logits  # the band softmax; the correction's temporaries
        assert peaks[chunk] <= 1.05 * budget, (chunk, peaks[chunk], budget)
    assert peaks[8] < materialised_logits / 4, "the fused loss should never approach the materialised logits"
    assert peaks[8] < peaks[32], "a smaller chunk must lower the peak"


# ---------------------------------------------------------------------------------------------
# validation and the op layer
# ---------------------------------------------------------------------------------------------

def test_argument_errors():
    hidden, weight, bias, targets = make_case()

    def call(**over):
        args = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, slack_id=SLACK)
        args.update(over)
        return linear_slack_ctc_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)

    with pytest.raises(ValueError, match=r"`hidden` must be 3-D"):
        call(hidden=hidden[0])
    with pytest.raises(ValueError, match=r"`weight` must be 2-D"):
        call(weight=weight[None])
    with pytest.raises(ValueError, match=r"`weight` must have shape \(vocab, 5\)"):
        call(weight=weight[:, :4])
    with pytest.raises(TypeError, match=r"`weight` is torch.float32 but `hidden` is torch.float64"):
        call(weight=weight.float())
    with pytest.raises(ValueError, match=r"`bias` must have shape \(13,\)"):
        call(bias=bias[:5])
    with pytest.raises(TypeError, match=r"`bias` is torch.float32"):
        call(bias=bias.float())
    with pytest.raises(TypeError, match=r"`hidden` must be float32"):
        call(hidden=hidden.long())
    with pytest.raises(ValueError, match=r"`chunk_size` must be >= 1; got 0"):
        call(chunk_size=0)
    with pytest.raises(ValueError, match=r"`slack_id` must be < the vocabulary size 13; got 13"):
        call(slack_id=13)
    with pytest.raises(ValueError, match=r"`targets` has batch size 2 but `hidden` has 3"):
        call(targets=targets[:2])
    with pytest.raises(ValueError, match=r"`input_lengths\[0\]` = 9 is larger than the padded time dimension of "
                                         r"`hidden` \(7\)"):
        call(input_lengths=torch.tensor([9, 1, 1]))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 13\)"):
        call(targets=targets + 13)


@pytest.mark.parametrize("chunk_size, keep_logits, in_forward", [(5, False, False), (5, True, False), (64, True, False),
                                                                 (5, False, True), (64, False, True)])
def test_opcheck(chunk_size, keep_logits, in_forward):
    hidden, weight, bias, targets = make_case()
    kwargs = ragged_kwargs(True, targets)
    backend = "cpu" if "cpu" in mdlm_ctc.available_backends("cpu") else "reference"
    row_weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    args = (hidden.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True), targets,
            kwargs["input_lengths"], kwargs["target_lengths"], kwargs["observed"], row_weight, SLACK, 0, -1, 4, 2,
            True, not in_forward, chunk_size, keep_logits, in_forward, True, True, True, backend)
    # Kept logits are the backward's workspace, and the gradient-in-forward accumulators its output: an eager
    # backward overwrites them, so an output comparison after a backward (test_aot_dispatch_*) cannot hold;
    # under torch.compile nothing is kept and the accumulators are saved tensors (test_compile_fullgraph).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if keep_logits or in_forward else None
    torch.library.opcheck(linear.linear_lattice_forward, args, **({} if utils is None else dict(test_utils=utils)))
    (loss, nll, scale, lse, post_target, post_special, kept, soft_target, soft_special, grad_hidden, grad_weight,
     grad_bias) = linear.linear_lattice_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    N, V = hidden.shape[0] * hidden.shape[1], weight.shape[0]
    assert kept.shape == ((N, V) if keep_logits and N <= chunk_size and not in_forward else (0, V))
    assert grad_weight.shape == ((V, hidden.shape[2]) if in_forward else (0,))
    torch.library.opcheck(linear.linear_lattice_backward,
                          (torch.ones(3, dtype=torch.float64), hidden.detach(), weight.detach(), bias.detach(), lse,
                           targets, args[4], args[5], args[6], post_target, post_special, nll, SLACK, 0, -1,
                           True, True, True, True, chunk_size, backend))
    if in_forward:
        torch.library.opcheck(linear.linear_gradient_correction,
                              (grad_hidden, grad_weight, grad_bias, torch.tensor(1.5, dtype=torch.float64),
                               hidden.detach(), weight.detach(), targets, args[4], args[5], args[6], soft_target,
                               soft_special, post_target, post_special, nll, scale, SLACK, -1, chunk_size, backend))


def test_default_chunk_size_is_a_byte_budget():
    """256 MiB of logits, whole multiples of 128 frames, at least 128."""
    assert linear.default_chunk_size(126464, 2) == 1024  # G4: 247 MiB of bf16 logits
    assert linear.default_chunk_size(32000, 2) == 4096
    assert linear.default_chunk_size(32000, 4) == 2048
    assert linear.default_chunk_size(10**7, 4) == 128
    for vocab in (1, 300, 50257, 126464, 151936):
        for itemsize in (2, 4, 8):
            chunk = linear.default_chunk_size(vocab, itemsize)
            assert chunk % 128 == 0 and chunk >= 128
            assert chunk * vocab * itemsize <= linear.DEFAULT_CHUNK_BYTES or chunk == 128


def test_default_chunk_keeps_a_batch_that_fits(monkeypatch):
    """Without ``chunk_size`` a batch whose logits fit the default budget is one chunk: the backward reuses the
    forward's logits (no recompute GEMM), bitwise as an explicit chunk of every frame."""
    hidden, weight, bias, targets = make_case(seed=7, dtype=torch.float32)
    kwargs = ragged_kwargs(False, targets)
    seen = []
    backward = linear._backward
    monkeypatch.setattr(linear, "_backward", lambda *a, **k: seen.append(k.get("kept")) or backward(*a, **k))

    def grads(**chunk):
        inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        linear_slack_ctc_loss(inputs[0], inputs[1], targets, bias=inputs[2], slack_id=SLACK, **chunk,
                              **kwargs).backward()
        return [x.grad for x in inputs]

    default = grads()
    assert seen and seen[-1] is not None  # the kept logits reached the backward
    for a, b in zip(default, grads(chunk_size=hidden.shape[0] * hidden.shape[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kept_logits_equal_recomputed(dtype):
    """One chunk holding every frame keeps the forward's logits for the backward (no recompute GEMM);
    the gradients are bitwise those of the recompute (a second backward with retain_graph recomputes,
    because the first overwrote the kept logits with dz), and a chunk short of one frame recomputes."""
    hidden, weight, bias, targets = make_case(seed=5, dtype=dtype)
    kwargs = ragged_kwargs(True, targets)
    N = hidden.shape[0] * hidden.shape[1]

    def grads(chunk_size, twice=False):
        inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        loss = linear_slack_ctc_loss(inputs[0], inputs[1], targets, bias=inputs[2], slack_id=SLACK,
                                     chunk_size=chunk_size, **kwargs)
        loss.backward(retain_graph=twice)
        first = [x.grad.clone() for x in inputs]
        if not twice:
            return first
        for x in inputs:
            x.grad = None
        loss.backward()
        return first, [x.grad for x in inputs]

    def same_bits(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    kept, recomputed = grads(N, twice=True)
    for a, b, c in zip(kept, recomputed, grads(N * 4)):  # a wider chunk: one tile, kept
        same_bits(a, b)
        same_bits(a, c)
    for a, b in zip(kept, grads(N - 1)):  # two chunks: recomputed, other tiles (other rounding in bf16)
        torch.testing.assert_close(a, b, equal_nan=True, **({} if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)))


@pytest.mark.parametrize("chunk_size", [4, 64])  # 64 >= B*T: eager keeps the logits, compiled recomputes
@pytest.mark.parametrize("in_forward", ["0", "1"])
def test_compile_fullgraph(chunk_size, in_forward, monkeypatch):
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", in_forward)
    torch._dynamo.reset()
    hidden, weight, bias, targets = make_case(seed=12, dtype=torch.float32)

    def step(h, w, b):
        return linear_slack_ctc_loss(h, w, targets, bias=b, slack_id=SLACK, chunk_size=chunk_size) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    out = compiled(*inputs)
    out.backward()
    eager = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    expected = step(*eager)
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(inputs, eager):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# the windowed stages (csrc/ops.cpp) that the fused loss runs, against the whole-tensor reference stages
# ---------------------------------------------------------------------------------------------

def _stage_case(dtype):
    B, T, V, U = 3, 7, 23, 4
    g = torch.Generator().manual_seed(21)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    logits[0, 2] = float("-inf")  # a dead frame
    logits[1, 3, 5] = float("nan")  # a NaN row
    targets = torch.randint(1, V, (B, U), generator=g)
    targets[0, :3] = targets[0, 0]  # repeats: several band slots of one frame on one token
    input_lengths, target_lengths = torch.tensor([7, 6, 3]), torch.tensor([4, 3, 4])  # row 2 infeasible
    observed = torch.full((B, T), -1)
    observed[0, 5] = SLACK
    observed[1, 0] = int(targets[1, 0])
    return logits, targets, input_lengths, target_lengths, observed


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_shift", [-1, 1])
def test_window_stages_match_whole_stages(backend, dtype, max_shift):
    """Windows of 4 frames (crossing rows) and 6 vocabulary entries reassemble the whole-tensor stages
    of the reference backend exactly (float64) or to an ulp of the acc dtype; the gradient in place.
    ``triton``'s windows are its Triton kernels (tests/test_triton_windows.py checks them bit for bit
    against its whole-tensor passes)."""
    if backend == "cpu" and "cpu" not in mdlm_ctc.available_backends("cpu"):
        pytest.skip("cpu not built")
    if backend == "triton" and "triton" not in mdlm_ctc.available_backends("cpu"):
        pytest.skip("needs Triton (interpreted on the CPU)")
    from mdlm_ctc import backends, reference

    logits, targets, T_b, U_b, observed = _stage_case(dtype)
    B, T, V = logits.shape
    W = 4
    emissions_window, gradient_window = backends.window_stages(backend)
    lse, table, special = reference.emissions_reference(logits, targets, T_b, U_b, observed, SLACK, max_shift, W,
                                                        True)
    flat = logits.reshape(B * T, V)
    windows = [emissions_window(flat[i:i + 4], i, T, targets, T_b, U_b, observed, SLACK, max_shift, W, True)
               for i in range(0, B * T, 4)]
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6)
    for name, whole, part in zip(("lse", "table", "special"), (lse, table, special), zip(*windows)):
        assert_close_report(torch.cat(part).view(whole.shape), whole, what=f"{backend} emissions_window {name}",
                            **tol)

    reference.lattice_band_reference(table, special, targets, T_b, U_b, 0, max_shift, True)
    nll = torch.tensor([1.5, 0.5, float("inf")], dtype=table.dtype)
    grad_nll = torch.tensor([0.5, 2.0, 1.0], dtype=table.dtype)
    for zero_infinity in (True, False):
        expected = reference.gradient_reference(grad_nll, logits, lse, targets, T_b, U_b, observed, table, special,
                                                nll, SLACK, max_shift, zero_infinity, True)
        got = flat.clone()
        lse_f, table_f, special_f = lse.reshape(-1), table.reshape(B * T, W), special.reshape(-1)
        for i in range(0, B * T, 4):
            for v0 in range(0, V, 6):
                tile = got[i:i + 4, v0:v0 + 6].contiguous()
                gradient_window(grad_nll, tile, i, T, v0, V, lse_f[i:i + 4], targets, T_b, U_b, observed,
                                table_f[i:i + 4], special_f[i:i + 4], nll, SLACK, max_shift, zero_infinity, True, tile)
                got[i:i + 4, v0:v0 + 6] = tile
        ulp = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-2)
        assert_close_report(got.view(B, T, V).double(), expected.double(),
                            what=f"{backend} gradient_window zero_infinity={zero_infinity}", **ulp)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_two_pass_window_stages_match_the_reference(backend, dtype):
    """The gradient-in-forward stages over windows of 4 frames (crossing rows): ``emissions_grad_window``
    reassembles the reference's whole-tensor ``emissions_grad`` (softmax written in place over the window,
    band softmax tables), and ``band_values_window`` gives the reference's exact values at every writer (each
    token's last slot in a live frame's band) and at the special token."""
    if backend == "cpu" and "cpu" not in mdlm_ctc.available_backends("cpu"):
        pytest.skip("cpu not built")
    if backend == "triton" and ("triton" not in mdlm_ctc.available_backends("cpu") or dtype != torch.float32):
        pytest.skip("Triton: interpreted on the CPU, float32 here (bf16 in test_slack_ctc_two_pass.py)")
    from mdlm_ctc import backends, reference

    logits, targets, T_b, U_b, observed = _stage_case(dtype)
    B, T, V = logits.shape
    W, max_shift = 4, -1
    row_scale = torch.tensor([0.5, 2.0, 1.0], dtype=reference.acc_dtype(dtype))
    emissions_grad_window, band_values_window = backends.window_two_pass_stages(backend)
    whole_grad = torch.empty_like(logits)
    want = reference.emissions_grad_reference(logits, targets, T_b, U_b, observed, SLACK, max_shift, W, row_scale,
                                              whole_grad)
    flat = logits.reshape(B * T, V).clone()
    windows = [emissions_grad_window(flat[i:i + 4], i, T, targets, T_b, U_b, observed, SLACK, max_shift, W, row_scale,
                                     flat[i:i + 4]) for i in range(0, B * T, 4)]
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    for name, whole, part in zip(("lse", "table", "special", "soft_target", "soft_special"), want, zip(*windows)):
        assert_close_report(torch.cat(part).view(whole.shape), whole, what=f"{backend} {name}", **tol)
    one_rounding = tol if dtype != torch.bfloat16 else dict(atol=1e-6, rtol=2 ** -8)
    assert_close_report(flat.view(B, T, V).double(), whole_grad.double(), what=f"{backend} scaled softmax in place",
                        **one_rounding)

    lse, table, special, soft_target, soft_special = want
    nll = reference.lattice_band_reference(table, special, targets, T_b, U_b, 0, max_shift, True)
    grad_rows = torch.tensor([1.0, 0.5, 3.0], dtype=row_scale.dtype)
    n = B * T
    args = (T_b, U_b, observed)
    ref_values, ref_special = reference.band_values_window_reference(
        grad_rows, row_scale, nll, 0, T, V, targets, *args, soft_target.reshape(n, W), soft_special.reshape(n),
        table.reshape(n, W), special.reshape(n), SLACK, max_shift)
    parts = [band_values_window(grad_rows, row_scale, nll, i, T, V, targets, *args,
                                soft_target.reshape(n, W)[i:i + 4], soft_special.reshape(n)[i:i + 4],
                                table.reshape(n, W)[i:i + 4], special.reshape(n)[i:i + 4], SLACK, max_shift)
             for i in range(0, n, 4)]
    values, special_values = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    frames = torch.arange(n)
    row, t = frames // T, frames % T
    live = (t < T_b[row]) & (observed.reshape(-1) < 0) & (nll[row] != float("inf"))
    tokens, _, next_same = reference.band_links(targets, U_b, V)
    c_lo = reference.column_lo(t + 1, T_b[row], U_b[row])
    c_hi = torch.minimum(t + 1, U_b[row])
    position = c_lo[:, None] - 1 + torch.arange(W)
    at = position.clamp(0, targets.shape[1] - 1)
    writer = (position <= c_hi[:, None] - 1) & live[:, None] & (next_same[row[:, None], at] + 1 > c_hi[:, None])
    k_in_band = ((position <= c_hi[:, None] - 1) & (tokens[row[:, None], at] == SLACK)).any(1)
    assert writer.any() and (writer.sum(1) < (position <= c_hi[:, None] - 1).sum(1)).any(), "repeats in a band"
    vtol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    assert_close_report(values[writer], ref_values[writer], what=f"{backend} band values at writers", **vtol)
    assert_close_report(special_values[live & ~k_in_band], ref_special[live & ~k_in_band],
                        what=f"{backend} special values", **vtol)


def test_window_outside_the_frames_is_refused():
    if "cpu" not in mdlm_ctc.available_backends("cpu"):
        pytest.skip("cpu not built")
    logits, targets, T_b, U_b, observed = _stage_case(torch.float32)
    flat = logits.reshape(21, -1)
    with pytest.raises(RuntimeError, match="outside the B\\*T"):
        torch.ops.mdlm_ctc_C.emissions_window(flat[:5], 18, 7, targets, T_b, U_b, None, SLACK, -1, 4, True)
    with pytest.raises(RuntimeError, match="vocabulary window"):
        z = flat[:4].contiguous()
        torch.ops.mdlm_ctc_C.gradient_window(torch.ones(3), z, 0, 7, 20, 23, torch.zeros(4), targets, T_b, U_b, None,
                                             torch.zeros(4, 4), torch.zeros(4), torch.zeros(3), SLACK, -1, False, True,
                                             z)


def test_band_bound_sizes_the_tables_without_a_sync():
    """validate=False: without band_bound the tables are min(U, T) wide, with it band_bound wide; the loss
    and gradients do not change."""
    hidden, weight, bias, targets = make_case(B=2, T=12, U=9, seed=22)
    lengths = dict(target_lengths=torch.tensor([9, 7]), input_lengths=torch.tensor([12, 10]))
    wide = linear.check_linear_args(hidden, weight, bias, targets, lengths["target_lengths"], SLACK,
                                    lengths["input_lengths"], "preserve", None, None, "mean", False, "auto", False,
                                    4)[0]
    narrow = linear.check_linear_args(hidden, weight, bias, targets, lengths["target_lengths"], SLACK,
                                      lengths["input_lengths"], "preserve", None, None, "mean", False, "auto", False,
                                      4, band_bound=4)[0]
    assert (wide.band_width, narrow.band_width) == (9, 4)
    expected = run_fused(hidden, weight, bias, targets, chunk_size=5, **lengths)
    bounded = run_fused(hidden, weight, bias, targets, chunk_size=5, validate=False, band_bound=4, **lengths)
    assert_matches(bounded, expected, "band_bound=4")
    with pytest.raises(ValueError, match="band_bound"):
        run_fused(hidden, weight, bias, targets, band_bound=3, **lengths)


triton_interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in mdlm_ctc.available_backends("cpu"),
    reason="needs Triton (interpreted on the CPU)")


@triton_interpreted
@pytest.mark.parametrize("collapse,max_shift,with_observed,zero_infinity,chunk_size,reduction", [
    ("preserve", None, True, True, 5, "none"),
    ("preserve", 1, False, False, 4, "none"),
    ("preserve", 0, True, True, 9, "none"),
    ("standard", None, True, True, 8, "none"),
    ("preserve", 1, True, False, 4, "sum"),  # the gradient in the forward (forced below)
])
def test_triton_backend_end_to_end(collapse, max_shift, with_observed, zero_infinity, chunk_size, reduction,
                                   monkeypatch):
    """backend="triton" (what CUDA tensors get): the Triton windowed stages (chunks that cut rows) and the
    Triton lattice, against the materialised loss on the cpu backend; with a scalar reduction the gradient is
    accumulated in the forward (the Triton two-pass window stages)."""
    if reduction != "none":
        monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", "1")
    hidden, weight, bias, targets = make_case(seed=14, dtype=torch.float32)
    kwargs = dict(ragged_kwargs(with_observed, targets), collapse=collapse, max_shift=max_shift, reduction=reduction,
                  zero_infinity=zero_infinity)
    fused = run_fused(hidden, weight, bias, targets, chunk_size=chunk_size, backend="triton", **kwargs)
    expected = run_materialised(hidden, weight, bias, targets, **kwargs)
    if not zero_infinity:  # the infeasible row: inf loss, NaN gradients on its frames
        assert torch.isinf(fused[0][2] if reduction == "none" else fused[0]) and fused[1][0][2, :3].isnan().all()
    assert_matches(fused, expected, f"triton backend, {collapse}, max_shift={max_shift}",
                   tol=dict(atol=2e-5, rtol=2e-5))


@triton_interpreted
def test_triton_backend_vocabulary_tiles_and_float64(monkeypatch):
    """The vocabulary-outer backward on the Triton windows (tiles of 10 frames x 4 vocabulary entries), and float64
    (the Triton stages hand it to the reference windows and lattice)."""
    monkeypatch.setattr(linear, "_MIN_VOCAB_TILE", 4)
    hidden, weight, bias, targets = make_case(B=2, T=6, V=40, U=3, seed=18)
    assert linear._tiling(12, 40, 1) == (True, 10, 4)  # frame tiles of 10 (cutting rows of 6), vocabulary of 4
    kwargs = dict(target_lengths=torch.tensor([3, 2]), input_lengths=torch.tensor([6, 4]), reduction="none")
    expected = run_materialised(hidden, weight, bias, targets, **kwargs)
    assert_matches(run_fused(hidden, weight, bias, targets, chunk_size=1, backend="triton", **kwargs), expected,
                   "triton float64, vocabulary tiles")
    low = [x.float() for x in (hidden, weight, bias)]
    fused = run_fused(*low, targets, chunk_size=1, backend="triton", **kwargs)
    assert_matches(fused, run_materialised(*low, targets, **kwargs), "triton fp32, vocabulary tiles",
                   tol=dict(atol=2e-5, rtol=2e-5))


@triton_interpreted
def test_triton_backend_empty_targets_and_tiny_shapes():
    """Empty targets (and a padded target width of 0), T = 1 and B = 0 through the Triton windows."""
    tol = dict(atol=2e-5, rtol=2e-5)
    hidden, weight, _, targets = make_case(seed=2, dtype=torch.float32)
    lengths = dict(target_lengths=torch.tensor([0, 3, 0]), input_lengths=torch.tensor([7, 7, 2]), reduction="none")
    for name, t, kwargs in (("empty targets", targets, lengths), ("U_max = 0", targets[:, :0], dict(reduction="sum"))):
        fused = run_fused(hidden, weight, None, t, chunk_size=4, backend="triton", **kwargs)
        assert_matches(fused, run_materialised(hidden, weight, None, t, **kwargs), f"triton, {name}", tol=tol)
    hidden, weight, bias, targets = make_case(B=1, T=1, U=1, seed=16, dtype=torch.float32)
    for B in (1, 0):
        fused = run_fused(hidden[:B], weight, bias, targets[:B], chunk_size=2, backend="triton", reduction="sum")
        assert_matches(fused, run_materialised(hidden[:B], weight, bias, targets[:B], reduction="sum"),
                       f"triton, B={B}, T=1", tol=tol)


@triton_interpreted
def test_triton_backend_bf16():
    """bf16 through the Triton windows: the precision-relative rule against the float64 materialised loss."""
    hidden, weight, bias, targets = make_case(seed=19)
    kwargs = dict(ragged_kwargs(True, targets), reduction="none", zero_infinity=True)
    low = [x.to(torch.bfloat16) for x in (hidden, weight, bias)]
    fused = run_fused(*low, targets, chunk_size=6, backend="triton", **kwargs)
    same_dtype = run_materialised(*low, targets, **kwargs)
    exact = run_materialised(*[x.double() for x in low], targets, **kwargs)
    assert_low_precision_close(fused[0], same_dtype[0], exact[0], what="bf16 loss (triton)")
    for name, a, b, c in zip(("hidden", "weight", "bias"), fused[1], same_dtype[1], exact[1]):
        assert a.dtype == torch.bfloat16
        assert_low_precision_close(a, b, c, what=f"bf16 d{name} (triton)", tiny=1e-4)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("collapse,max_shift", [("preserve", None), ("preserve", 4), ("standard", None)])
def test_gpu_bf16_matches_materialised(collapse, max_shift):
    B, T, D, V, U = 4, 192, 256, 32000, 150
    hidden, weight, bias, targets = make_case(B=B, T=T, D=D, V=V, U=U, seed=15, dtype=torch.float64)
    weight = weight / D ** 0.5
    kwargs = dict(target_lengths=torch.tensor([150, 120, 100, 150]), input_lengths=torch.tensor([192, 170, 192, 150]),
                  collapse=collapse, max_shift=max_shift, reduction="none")
    low = [x.to("cuda", torch.bfloat16) for x in (hidden, weight, bias)]
    cuda_kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    fused = run_fused(*low, targets.cuda(), chunk_size=100, **cuda_kwargs)
    same_dtype = run_materialised(*low, targets.cuda(), **cuda_kwargs)
    exact = run_materialised(*[x.double().cpu() for x in low], targets, **kwargs)
    assert_low_precision_close(fused[0], same_dtype[0], exact[0], what="bf16 loss (GPU)")
    for name, a, b, c in zip(("hidden", "weight", "bias"), fused[1], same_dtype[1], exact[1]):
        assert a.dtype == torch.bfloat16
        assert_low_precision_close(a, b, c, what=f"bf16 d{name} (GPU)", tiny=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [40, 256])  # 256 >= B*T: the forward's logits are kept for the backward
def test_gpu_cuda_graph_capture(chunk_size):
    """No host synchronisation on the hot path: with validate=False and band_bound, forward + backward
    are captured in a CUDA graph (after one eager warm-up call on a side stream, as CUDA graphs need for
    cuBLAS workspaces and Triton compilation) and the replay equals the eager result."""
    B, T, D, V, U = 2, 64, 32, 1000, 48
    hidden, weight, bias, targets = make_case(B=B, T=T, D=D, V=V, U=U, seed=16, dtype=torch.float32)
    h, w = hidden.cuda().requires_grad_(True), weight.cuda().requires_grad_(True)
    targets = targets.cuda()

    def step():
        h.grad = w.grad = None
        loss = linear_slack_ctc_loss(h, w, targets, slack_id=SLACK, chunk_size=chunk_size, validate=False,
                                     band_bound=T - U + 1)
        loss.backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
        eager_grads = (h.grad.clone(), w.grad.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert_close_report(captured, eager, what="graph loss", atol=1e-6, rtol=1e-6)
    assert_close_report(h.grad, eager_grads[0], what="graph dH", atol=1e-6, rtol=1e-6)
    assert_close_report(w.grad, eager_grads[1], what="graph dW", atol=1e-6, rtol=1e-6)
