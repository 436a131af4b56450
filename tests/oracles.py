"""Independent oracles for the lattice tests: exhaustive enumeration of canvases, written from the
definitions in SPEC §3 with no code shared with the package.

A canvas is one token per frame. Its probability is the product of p_t(a_t) over free frames
(observed frames must hold their observed token and contribute a factor 1). The loss of a target is
-log of the total probability of the canvases that collapse to it (and that satisfy max_shift).
"""

from __future__ import annotations

import itertools

import torch


def collapse_canvas(canvas, special, mode):
    """The collapse map on one canvas (a list of ints)."""
    if mode == "standard":
        merged = [tok for i, tok in enumerate(canvas) if i == 0 or tok != canvas[i - 1]]
        return [tok for tok in merged if tok != special]
    return [tok for tok in canvas if tok != special]


def shift_ok(canvas, special, max_shift):
    """preserve + max_shift: the u-th target token (1-based) sits at a 1-based position <= u + m."""
    if max_shift is None:
        return True
    u = 0
    for position, tok in enumerate(canvas, start=1):
        if tok != special:
            u += 1
            if position - u > max_shift:
                return False
    return True


def brute_force_nll(logits, targets, target_lengths, input_lengths, special, mode="preserve", max_shift=None,
                    observed=None, normalize=True):
    """Per-row negative log-likelihood by enumerating all V^T_b canvases (float64, differentiable).

    ``logits`` is [B, T, V] with tiny T and V. Returns [B]; +inf where no canvas qualifies.
    """
    B, T, V = logits.shape
    logp = logits.double().log_softmax(-1) if normalize else logits.double()
    out = []
    for b in range(B):
        T_b, U_b = int(input_lengths[b]), int(target_lengths[b])
        target = [int(v) for v in targets[b, :U_b]]
        scores = []
        for canvas in itertools.product(range(V), repeat=T_b):
            canvas = list(canvas)
            if observed is not None:
                seen = [int(v) for v in observed[b, :T_b]]
                if any(o >= 0 and o != tok for o, tok in zip(seen, canvas)):
                    continue
            else:
                seen = [-1] * T_b
            if collapse_canvas(canvas, special, mode) != target or not shift_ok(canvas, special, max_shift):
                continue
            terms = [logp[b, t, tok] for t, tok in enumerate(canvas) if seen[t] < 0]
            scores.append(torch.stack(terms).sum() if terms else logp.new_zeros(()))
        if scores:
            out.append(-torch.logsumexp(torch.stack(scores), 0))
        else:
            out.append(logp.new_full((), float("inf")) + 0 * logp[b].sum())
    return torch.stack(out)


def brute_force_best(logits, targets, target_lengths, input_lengths, special, mode="preserve", max_shift=None,
                     observed=None):
    """Per-row best log-score over admissible canvases (-inf if none)."""
    B, T, V = logits.shape
    logp = logits.double().log_softmax(-1)
    best = []
    for b in range(B):
        T_b, U_b = int(input_lengths[b]), int(target_lengths[b])
        target = [int(v) for v in targets[b, :U_b]]
        top = float("-inf")
        for canvas in itertools.product(range(V), repeat=T_b):
            canvas = list(canvas)
            seen = [int(v) for v in observed[b, :T_b]] if observed is not None else [-1] * T_b
            if any(o >= 0 and o != tok for o, tok in zip(seen, canvas)):
                continue
            if collapse_canvas(canvas, special, mode) != target or not shift_ok(canvas, special, max_shift):
                continue
            score = sum(float(logp[b, t, tok]) for t, tok in enumerate(canvas) if seen[t] < 0)
            top = max(top, score)
        best.append(top)
    return torch.tensor(best, dtype=torch.float64)


def canvas_score(logits, canvas, input_lengths, observed=None):
    """Log-score of given canvases [B, T] (ids; ignored past the input length and at observed frames)."""
    logp = logits.double().log_softmax(-1)
    B, T, _ = logits.shape
    scores = []
    for b in range(B):
        total = 0.0
        for t in range(int(input_lengths[b])):
            if observed is not None and int(observed[b, t]) >= 0:
                continue
            total += float(logp[b, t, int(canvas[b, t])])
        scores.append(total)
    return torch.tensor(scores, dtype=torch.float64)


def assert_close_report(actual, expected, *, atol, rtol, what="value"):
    """torch.testing-style closeness with a report of mismatch counts, first indices and NaN/inf."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_nonfinite = (actual.isnan() & expected.isnan()) | (actual == expected)
    diff = (actual - expected).abs()
    bad = ~same_nonfinite & ~(diff <= atol + rtol * expected.abs())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        nan_mismatch = int((actual.isnan() != expected.isnan()).sum())
        inf_mismatch = int((actual.isinf() != expected.isinf()).sum())
        worst = float(diff[bad & diff.isfinite()].max()) if (bad & diff.isfinite()).any() else float("nan")
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"first at {idx}; worst finite |diff| {worst:.3g}; NaN mismatches {nan_mismatch}, inf mismatches "
            f"{inf_mismatch}; e.g. actual {actual[tuple(idx[0])].item():.9g} vs expected "
            f"{expected[tuple(idx[0])].item():.9g}")


def assert_low_precision_close(actual, reference_same_dtype, reference_fp64, *, what="value", tiny=1e-5):
    """bf16/fp16 rule (STYLE): the kernel's largest error against float64 is at most twice the largest
    error of the reference run on the same low-precision input, plus a tiny absolute slack."""
    actual = actual.detach().double().cpu()
    exact = reference_fp64.detach().double().cpu()
    kernel_error = (actual - exact).abs()
    reference_error = (reference_same_dtype.detach().double().cpu() - exact).abs()
    assert not (actual.isnan() & ~exact.isnan()).any(), f"{what}: NaN where the float64 reference is not"
    limit = 2 * float(reference_error.max()) + tiny
    if float(kernel_error.max()) > limit:
        idx = (kernel_error > limit).nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: max error {float(kernel_error.max()):.3g} exceeds 2x the same-dtype reference error "
            f"{float(reference_error.max()):.3g} + {tiny}; first at {idx}")
