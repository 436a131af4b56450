"""The Triton backend at realistic shapes on a GPU (marked ``gpu``; skipped without CUDA).

Shapes follow SPEC §6: LLaDA's vocabulary V = 126,464, bf16 logits, T = 2048 (and 8192 for the
long-sequence case). Oracles: the float64 reference stages (``mdlm_ctc.reference``), autograd on the
float64 reference for a whole row, and ``torch.nn.functional.ctc_loss`` in standard mode. Each test
needs at most ~25 GB of GPU memory. These tests check values, never speed (benchmarks/ does that).
"""

import pytest
import torch

pytest.importorskip("triton")

import mdlm_ctc  # noqa: E402
from mdlm_ctc.reference import (  # noqa: E402
    PRESERVE, STANDARD, column_band_width, emissions_reference, gradient_reference, lattice_band_reference,
    slack_ctc_reference)
from oracles import assert_close_report, assert_low_precision_close  # noqa: E402

pytestmark = pytest.mark.gpu

V_LLADA = 126_464
SLACK = 126_080  # an id inside the vocabulary, away from 0 (LLaDA's mask id region)


def case(B, T, U, *, dtype=torch.bfloat16, V=V_LLADA, ragged=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, device="cuda", dtype=torch.float32) * 3).to(dtype)
    targets = torch.randint(0, SLACK, (B, U), generator=g, device="cuda")
    targets[:, 10:14] = targets[:, 9:10]  # a run of repeats
    T_b = torch.full((B,), T, device="cuda")
    U_b = torch.full((B,), U, device="cuda")
    if ragged and B > 1:
        T_b[1] = T - 64
        U_b[1] = U - 96
    return logits, targets, T_b, U_b


def assert_posteriors_sum_to_one(table, special, T_b, atol=1e-3):
    frames = torch.arange(table.shape[1], device=table.device)
    total = (table.sum(-1) + special)[frames[None, :] < T_b[:, None]]
    assert_close_report(total, torch.ones_like(total), atol=atol, rtol=0, what="sum of a frame's posteriors")


def stages():
    from mdlm_ctc.triton_kernels import emissions, grad, slack_ctc

    return emissions.emissions, slack_ctc.lattice_band, grad.gradient


def width(T_b, U_b, max_shift=None):
    return max(int(column_band_width(T_b, U_b, max_shift).max()), 1)


@pytest.mark.parametrize("mode,T,U", [(PRESERVE, 2048, 1792), (STANDARD, 2048, 1024), (PRESERVE, 8192, 7680)])
def test_stages_against_float64_reference(mode, T, U):
    emissions, lattice_band, gradient = stages()
    logits, targets, T_b, U_b = case(2, T, U)
    W = width(T_b, U_b)
    lse, table, special = emissions(logits, targets, T_b, U_b, None, SLACK, -1, W, True)
    want = emissions_reference(logits, targets, T_b, U_b, None, SLACK, -1, W, True)  # fp32 from the bf16 values
    for name, a, b in zip(("lse", "table", "special"), (lse, table, special), want):
        assert_close_report(a, b, atol=2e-5, rtol=1e-5, what=name)

    table64, special64 = table.double(), special.double()
    nll = lattice_band(table, special, targets, T_b, U_b, mode, -1, True)
    nll64 = lattice_band_reference(table64, special64, targets, T_b, U_b, mode, -1, True)
    assert_close_report(nll, nll64, atol=1e-2, rtol=2e-5, what="nll vs float64 lattice")
    # fp32 log space: a posterior is exp(alpha + beta - loglik) with |loglik| ~ 3e4 here, so its exponent
    # carries ~ulp(3e4) = 2e-3 of cancellation error; the identity below is the sharper check
    assert_close_report(table, table64, atol=1e-2, rtol=0, what="target posteriors vs float64")
    assert_close_report(special, special64, atol=1e-2, rtol=0, what="special posteriors vs float64")
    assert_posteriors_sum_to_one(table, special, T_b)

    g = torch.rand(2, device="cuda")
    got = gradient(g, logits, lse, targets, T_b, U_b, None, table, special, nll, SLACK, -1, False, True)
    ref = gradient_reference(g, logits, lse, targets, T_b, U_b, None, table, special, nll, SLACK, -1, False, True)
    assert got.dtype == torch.bfloat16
    # the same fp32 value up to rounding, cast once: equal, or one bf16 rounding apart
    assert_close_report(got, ref, atol=1e-6, rtol=2 ** -7, what="gradient vs reference stage")


def test_end_to_end_row_against_float64_autograd():
    """One whole row, loss and gradient, against autograd on the float64 reference (bf16 rule)."""
    logits, targets, T_b, U_b = case(1, 2048, 1792, ragged=False, seed=1)
    x = logits.clone().requires_grad_()
    nll = mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, reduction="none",
                                  backend="triton")
    nll.sum().backward()
    results = {}
    for name, dtype in (("same", torch.bfloat16), ("exact", torch.float64)):
        y = logits.detach().to(dtype).clone().requires_grad_()
        ref = slack_ctc_reference(y, targets, U_b, slack_id=SLACK, input_lengths=T_b)
        ref.sum().backward()
        results[name] = (ref.detach(), y.grad)
        del y, ref
    # both sides accumulate in fp32 over 2048 frames (in a different order): tiny ~ a few ulps of the loss
    loss_tiny = 4e-7 * float(results["exact"][0].abs().max())
    assert_low_precision_close(nll, results["same"][0], results["exact"][0], what="loss", tiny=loss_tiny)
    assert_low_precision_close(x.grad, results["same"][1], results["exact"][1], what="gradient", tiny=1e-3)


def test_standard_matches_torch_ctc_loss():
    B, T, U = 4, 2048, 1024
    logits, targets, T_b, U_b = case(B, T, U, dtype=torch.float32, seed=2)
    grads, losses = [], []
    for fn in (lambda lp: mdlm_ctc.ctc_loss(lp, targets, T_b, U_b, blank=SLACK, reduction="none", backend="triton"),
               lambda lp: torch.nn.functional.ctc_loss(lp, targets, T_b, U_b, blank=SLACK, reduction="none")):
        x = logits.clone().requires_grad_()
        loss = fn(x.log_softmax(-1).transpose(0, 1))
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(x.grad)
        del x
    assert_close_report(losses[0], losses[1], atol=1e-2, rtol=2e-5, what="ctc_loss vs torch")
    # both are fp32 log-space lattices (different summation orders): posteriors agree to ~1e-2 at this T
    assert_close_report(grads[0], grads[1], atol=1e-2, rtol=0, what="gradient vs torch")


@pytest.mark.parametrize("mode,U", [(PRESERVE, 1024), (STANDARD, 1024), (PRESERVE, 1792)])
def test_chunk_lengths_agree(mode, U):
    emissions, lattice_band, _ = stages()
    logits, targets, T_b, U_b = case(4, 2048, U, seed=3)
    lse, table, special = emissions(logits, targets, T_b, U_b, None, SLACK, -1, width(T_b, U_b), True)
    runs = []
    for chunk_len in (0, 7, 15, 31, 63):
        t, s = table.clone(), special.clone()
        runs.append((chunk_len, lattice_band(t, s, targets, T_b, U_b, mode, -1, True, chunk_len=chunk_len), t, s))
    _, nll0, t0, s0 = runs[0]
    for chunk_len, nll, t, s in runs[1:]:
        assert_close_report(nll, nll0, atol=1e-2, rtol=2e-5, what=f"nll, chunk_len={chunk_len}")
        assert_close_report(t, t0, atol=1e-2, rtol=0, what=f"target posteriors, chunk_len={chunk_len}")
        assert_close_report(s, s0, atol=1e-2, rtol=0, what=f"special posteriors, chunk_len={chunk_len}")
        assert_posteriors_sum_to_one(t, s, T_b)


def test_deterministic_and_in_place_at_scale():
    emissions, lattice_band, gradient = stages()
    logits, targets, T_b, U_b = case(2, 2048, 1792, seed=4)
    g = torch.rand(2, device="cuda")
    outputs = []
    for _ in range(2):
        lse, table, special = emissions(logits, targets, T_b, U_b, None, SLACK, -1, width(T_b, U_b), True)
        nll = lattice_band(table, special, targets, T_b, U_b, PRESERVE, -1, True)
        grad = gradient(g, logits, lse, targets, T_b, U_b, None, table, special, nll, SLACK, -1, False, True)
        outputs.append((nll, table, special, grad))
    for name, a, b in zip(("nll", "table", "special", "grad"), *outputs):
        assert torch.equal(a, b), f"{name} differs between two runs"
    buffer = logits.clone()
    in_place = gradient(g, buffer, lse, targets, T_b, U_b, None, table, special, nll, SLACK, -1, False, True,
                        out=buffer)
    assert in_place.data_ptr() == buffer.data_ptr() and torch.equal(in_place, outputs[0][3])


def test_autotuned_gradient_has_the_default_bits(monkeypatch):
    """What the autotuner picks (it times every config of the dense kernel) gives the default config's bits."""
    from mdlm_ctc.triton_kernels import grad as grad_module

    emissions, lattice_band, gradient = stages()
    logits, targets, T_b, U_b = case(2, 2048, 1792, seed=5)
    lse, table, special = emissions(logits, targets, T_b, U_b, None, SLACK, -1, width(T_b, U_b), True)
    nll = lattice_band(table, special, targets, T_b, U_b, PRESERVE, -1, True)
    g = torch.rand(2, device="cuda")
    args = (g, logits, lse, targets, T_b, U_b, None, table, special, nll, SLACK, -1, False, True)
    monkeypatch.setenv("MDLM_CTC_AUTOTUNE", "0")
    default = gradient(*args)
    monkeypatch.setenv("MDLM_CTC_AUTOTUNE", "1")
    tuned = gradient(*args)
    assert torch.equal(tuned, default), "the autotuned gradient differs from the default config's"
    for block in grad_module.DENSE_AUTOTUNE_CONFIGS:
        assert torch.equal(gradient(*args, dense_block=block), default), f"dense config {block} changes the bits"


def test_band_bound_without_validation_at_g1_shape():
    """validate=False with band_bound: the validated loss and gradient, bit for bit, at a G1-like row."""
    logits, targets, T_b, U_b = case(2, 2048, 1792, seed=6)
    results = []
    for kw in (dict(), dict(validate=False, band_bound=289)):  # row 1: 1984 - 1696 + 1 = 289
        x = logits.clone().requires_grad_()
        nll = mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, reduction="none",
                                      backend="triton", **kw)
        nll.sum().backward()
        results.append((nll.detach(), x.grad))
        del x
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
