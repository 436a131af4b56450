"""The op layer: torch.library registration (opcheck), torch.compile without graph breaks, the backends
and their three stages against the reference stages."""

import pytest
import torch

import mdlm_ctc
from mdlm_ctc import _ops, backends, reference
from oracles import assert_close_report

BACKENDS = [b for b in ("reference", "cpu") if b in mdlm_ctc.available_backends("cpu")]


def op_args(backend, need_grad=True, mode=0, max_shift=-1, dtype=torch.float64, two_pass=False, reduction=2,
            weight=False):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 6, generator=g, dtype=dtype, requires_grad=need_grad)
    targets = torch.tensor([[1, 2, 2], [3, 1, 4], [5, 5, 5]])
    input_lengths = torch.tensor([7, 5, 7])
    target_lengths = torch.tensor([3, 2, 3])
    observed = torch.full((3, 7), -1)
    observed[0, 1] = 1
    row_weight = torch.tensor([0.5, 1.0, 2.0], dtype=dtype, requires_grad=need_grad) if weight else None
    return (logits, targets, input_lengths, target_lengths, observed, row_weight, 0, mode, max_shift, 5, reduction,
            need_grad, True, False, two_pass, False, backend)


def test_available_backends():
    names = mdlm_ctc.available_backends()
    assert names[0] == "reference"
    assert "cpu" in mdlm_ctc.available_backends("cpu"), "the C++ extension should be built by `pip install -e .`"
    assert set(mdlm_ctc.available_backends("cpu")) <= {"reference", "cpu", "triton"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,max_shift,two_pass,reduction,weight", [(0, -1, False, 2, False), (0, 1, True, 2, True),
                                                                      (1, -1, True, 0, True), (1, -1, False, 1, False)])
def test_opcheck_loss_forward(backend, mode, max_shift, two_pass, reduction, weight):
    # Two passes: the backward overwrites the `grad` output in place (gradient_finish, a mutating op). The loss
    # never hands that output to the caller, but opcheck's AOT test returns every output from its traced
    # function, and AOT refuses a backward that mutates a user-visible output; test_compile_fullgraph compiles
    # the real call on both paths instead.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if two_pass else None
    torch.library.opcheck(_ops.loss_forward, op_args(backend, mode=mode, max_shift=max_shift, two_pass=two_pass,
                                                     reduction=reduction, weight=weight),
                          **({} if utils is None else dict(test_utils=utils)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_ops_and_alignment(backend):
    args = op_args(backend, need_grad=False)
    logits = args[0].detach()
    (loss, nll, scale, lse, post_target, post_special, soft_target, soft_special,
     grad) = _ops.loss_forward(logits, *args[1:11], True, True, False, True, False, backend)
    assert grad.shape == logits.shape and soft_target.shape == post_target.shape
    torch.library.opcheck(_ops.loss_backward,
                          (scale, logits, lse, args[1], args[2], args[3], args[4], post_target, post_special, nll, 0, 0,
                           -1, False, True, backend))
    torch.library.opcheck(_ops.gradient_finish,
                          (grad, torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64), scale, nll, args[1], args[2],
                           args[3], args[4], soft_target, soft_special, post_target, post_special, 0, -1, False,
                           backend))
    torch.library.opcheck(_ops.best_alignment_op, (logits, args[1], args[2], args[3], args[4], 0, 0, -1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gradient_in_forward", ["1", "0"])
def test_compile_fullgraph(backend, gradient_in_forward, monkeypatch):
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", gradient_in_forward)
    torch._dynamo.reset()

    def step(logits, targets, target_lengths, input_lengths):
        loss = mdlm_ctc.slack_ctc_loss(logits, targets, target_lengths, slack_id=0, input_lengths=input_lengths,
                                       backend=backend)
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    logits = torch.randn(2, 8, 6, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [4, 4, 0]])
    target_lengths = torch.tensor([3, 2])
    input_lengths = torch.tensor([8, 6])
    out = compiled(logits, targets, target_lengths, input_lengths)
    out.backward()
    eager_logits = logits.detach().clone().requires_grad_(True)
    expected = step(eager_logits, targets, target_lengths, input_lengths)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(logits.grad, eager_logits.grad)


@pytest.mark.parametrize("collapse", ["preserve", "standard"])
def test_compile_inductor_fullgraph(collapse, monkeypatch):
    monkeypatch.setenv("MDLM_CTC_GRADIENT_IN_FORWARD", "1" if collapse == "preserve" else "0")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(logits, targets):
        return mdlm_ctc.slack_ctc_loss(logits.float() * 1.5, targets, slack_id=0, collapse=collapse)

    logits = torch.randn(2, 9, 7, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [4, 5, 6]])
    loss = f(logits, targets)
    loss.backward()
    eager = logits.detach().clone().requires_grad_(True)
    expected = mdlm_ctc.slack_ctc_loss(eager.float() * 1.5, targets, slack_id=0, collapse=collapse)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad, eager.grad)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("mode,max_shift", [(0, -1), (0, 2), (1, -1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_stages_match_reference_stages(mode, max_shift, dtype):
    g = torch.Generator().manual_seed(1)
    B, T, V, U = 4, 13, 9, 6
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    targets = torch.randint(1, V, (B, U), generator=g)
    targets[1, 1] = targets[1, 0]
    input_lengths = torch.tensor([13, 9, 6, 4])
    target_lengths = torch.tensor([6, 4, 0, 6])  # row 3 infeasible
    observed = torch.full((B, T), -1)
    observed[0, 3] = 0
    width = int(reference.column_band_width(input_lengths, target_lengths, None if max_shift < 0 else max_shift)
                .max().clamp(min=1))
    shift = max_shift if mode == 0 else -1
    cpu = backends.stages("cpu")
    ref = backends.stages("reference")
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    out_cpu = cpu[0](logits, targets, input_lengths, target_lengths, observed, 0, shift, width, True)
    out_ref = ref[0](logits, targets, input_lengths, target_lengths, observed, 0, shift, width, True)
    for name, a, b in zip(("lse", "table", "special"), out_cpu, out_ref):
        assert_close_report(a, b, what=f"emissions: {name}", **tol)
    table_cpu, special_cpu = out_cpu[1].clone(), out_cpu[2].clone()
    table_ref, special_ref = out_ref[1].clone(), out_ref[2].clone()
    nll_cpu = cpu[1](table_cpu, special_cpu, targets, input_lengths, target_lengths, mode, shift, True)
    nll_ref = ref[1](table_ref, special_ref, targets, input_lengths, target_lengths, mode, shift, True)
    assert_close_report(nll_cpu, nll_ref, what="lattice: nll", **tol)
    assert_close_report(table_cpu, table_ref, what="lattice: target posteriors", **tol)
    assert_close_report(special_cpu, special_ref, what="lattice: special posteriors", **tol)
    grad_nll = torch.linspace(0.5, 2.0, B, dtype=nll_ref.dtype)
    for zero_infinity in (False, True):
        args = (grad_nll, logits, out_ref[0], targets, input_lengths, target_lengths, observed, table_ref,
                special_ref, nll_ref, 0, shift, zero_infinity, True)
        assert_close_report(cpu[2](*args), ref[2](*args), what="gradient", **tol)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_band_gather_matches_reference_and_flags_nan(normalize, dtype):
    """Bands of 12 and 11 slots: the fp32 vocabulary pass gathers them 8 at a time with AVX2 where it has it
    and the rest one by one, the other types one by one. The table equals the reference's, and a NaN at a
    band token in either part makes that frame's special emission NaN (without normalisation nothing else
    would carry it: the logsumexp is not taken)."""
    g = torch.Generator().manual_seed(7)
    B, T, V, U = 2, 24, 40, 12
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    targets = torch.stack([torch.randperm(V - 1, generator=g)[:U] + 1 for _ in range(B)])
    input_lengths = torch.tensor([24, 23])
    target_lengths = torch.tensor([12, 11])
    # frame 11 of row 0 (t + 1 = 12): band columns 1..12, slot j holds token targets[0, j]
    logits[0, 11, targets[0, 2]] = float("nan")  # in the first 8 slots
    logits[1, 11, targets[1, 9]] = float("nan")  # past them (row 1's band at frame 11: columns 1..11)
    width = int(reference.column_band_width(input_lengths, target_lengths).max())
    assert width == 12
    out_cpu = backends.stages("cpu")[0](logits, targets, input_lengths, target_lengths, None, 0, -1, width, normalize)
    out_ref = backends.stages("reference")[0](logits, targets, input_lengths, target_lengths, None, 0, -1, width,
                                              normalize)
    tol = dict(atol=2e-5, rtol=2e-5) if normalize else dict(atol=0, rtol=0)  # unnormalised: the logits themselves
    for name, a, b in zip(("lse", "table", "special"), out_cpu, out_ref):
        assert_close_report(a, b, what=f"emissions: {name}", **tol)
    special = out_cpu[2]
    assert special[0, 11].isnan() and special[1, 11].isnan()
    assert special.isnan().sum() == 2


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_cpu_standard_blank_posterior_is_the_labels_complement():
    """The float standard lattice does not keep its blank rows: the special token's posterior is 1 minus the
    labels' (lattice_cpu.h). Against the reference lattice in float64 (which sums the blank occupancies
    themselves) on the same emissions, at rows where blanks dominate, where labels dominate, with no blank
    state at all (U = T: exactly 0) and no label (U = 0: exactly 1), with peaked logits; every frame's
    posteriors sum to 1 (to the lattice's rounding) and none is negative."""
    g = torch.Generator().manual_seed(3)
    B, T, V, U = 5, 160, 12, 160
    logits = torch.randn(B, T, V, generator=g) * 4
    logits[0, :, 0] += 12  # blanks dominate
    logits[1, :, 0] -= 12  # labels dominate
    logits[4] *= 5  # peaked
    targets = torch.randint(1, V, (B, U), generator=g)
    targets[2] = torch.arange(U) % (V - 1) + 1  # no repeat: feasible with U = T
    input_lengths = torch.full((B,), T)
    target_lengths = torch.tensor([40, 70, T, 0, 60])  # row 2: U = T; row 3: U = 0
    width = int(reference.column_band_width(input_lengths, target_lengths, None).max())
    cpu = backends.stages("cpu")
    emitted = cpu[0](logits.double(), targets, input_lengths, target_lengths, None, 0, -1, width, True)
    posteriors = {}
    for dtype, lattice in ((torch.float32, cpu[1]), (torch.float64, backends.stages("reference")[1])):
        table, special = emitted[1].to(dtype).clone(), emitted[2].to(dtype).clone()  # overwritten in place
        nll = lattice(table, special, targets, input_lengths, target_lengths, 1, -1, True)
        assert torch.isfinite(nll).all()
        posteriors[dtype] = (table, special)
    table, special = posteriors[torch.float32]
    table64, special64 = posteriors[torch.float64]
    # the fp32 lattice's own accuracy at these sizes (the direct sum of blank posteriors was off by up to
    # 4e-5 here too), and the complement no less accurate than the labels it is formed from
    assert_close_report(table.double(), table64, atol=1e-4, rtol=0, what="target posteriors")
    label_error = (table.double() - table64).abs().amax(dim=(1, 2))
    special_error = (special.double() - special64).abs().amax(dim=1)
    assert (special_error <= 2 * label_error + 1e-7).all(), (special_error, label_error)
    assert (special >= 0).all()
    assert special64[0].mean() > 0.5 and special64[1].mean() < 0.5  # the rows are what they claim
    assert (special[2] == 0).all() and (special[3] == 1).all()
    totals = special.double() + table.double().sum(-1)
    assert_close_report(totals, torch.ones_like(totals), atol=1e-4, rtol=0, what="posteriors per frame")


def test_lattice_band_rejects_a_narrow_table():
    if "cpu" not in BACKENDS:
        pytest.skip("needs the cpu backend")
    table, special = torch.zeros(1, 6, 1), torch.zeros(1, 6)
    with pytest.raises(RuntimeError, match="narrower than row 0's band"):
        torch.ops.mdlm_ctc_C.lattice_band(table, special, torch.tensor([[1, 2, 3]]), torch.tensor([6]),
                                          torch.tensor([3]), 0, -1, False)


def test_without_the_extension_auto_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(backends, "_has_kernel", lambda key: False)
    assert backends.resolve("auto", torch.device("cpu")) == "reference"
    logits = torch.randn(2, 5, 4, dtype=torch.float64)
    targets = torch.tensor([[1, 2], [3, 1]])
    loss = mdlm_ctc.slack_ctc_loss(logits, targets, slack_id=0)  # auto -> reference
    expected = mdlm_ctc.slack_ctc_loss(logits, targets, slack_id=0, backend="reference")
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match=r"`backend`='cpu' is not available for tensors on cpu.*available there: "
                                         r"reference"):
        mdlm_ctc.slack_ctc_loss(logits, targets, slack_id=0, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_the_gradient_over_the_logits(backend):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [4, 4, 0], [5, 1, 2]])
    target_lengths = torch.tensor([3, 2, 3])
    expected = mdlm_ctc.slack_ctc_loss(weight * 2.0, targets, target_lengths, slack_id=0, backend=backend)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    logits = weight * 2.0  # a non-leaf buffer the caller gives up
    loss = mdlm_ctc.slack_ctc_loss(logits, targets, target_lengths, slack_id=0, backend=backend,
                                   inplace_backward=True)
    (grad,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(logits.detach() * 2.0, expected_grad)  # the buffer now holds d loss / d logits
    with pytest.raises(TypeError, match="`inplace_backward` must be a bool"):
        mdlm_ctc.slack_ctc_loss(logits, targets, target_lengths, slack_id=0, inplace_backward="yes")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_pooled_work_buffers_are_reused_and_seen_by_the_profiler():
    """The fused head's chunk buffer (backends.work_buffer) comes from the C++ output pool: a freed
    buffer is handed out again (no fresh mmap), and the profiler's memory events count a pooled buffer
    as live exactly while a tensor holds it (as benchmarks/common.py's allocator peak reads them)."""
    from torch.profiler import ProfilerActivity, profile

    like = torch.empty(0, dtype=torch.bfloat16)
    numel = 3 << 20  # 6 MiB: above the pool's 4 MiB floor
    first = backends.work_buffer(like, numel)
    assert first.dtype == torch.bfloat16 and first.shape == (numel,) and first.is_contiguous()
    address = first.data_ptr()
    del first
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        again = backends.work_buffer(like, numel)
        assert again.data_ptr() == address
        del again
    events = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    big = [n for n in events if abs(n) >= numel * 2]
    assert len(big) == 2 and big[0] >= numel * 2 and big[0] + big[1] == 0
