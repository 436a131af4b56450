"""The Triton windowed stages (``emissions_window``, ``gradient_window``: what the fused LM head runs on
the triton and cuda backends) against the reference windowed ops, and against the Triton whole-tensor
passes, whose kernels they are: reassembled from windows that cut rows (and, for the gradient, from odd
vocabulary windows) they must give the same bits. Rows: full, ragged, infeasible, empty target; a dead
frame, a NaN frame, observed frames; both collapses, max_shift, log-prob input, strided logits.

Under ``TRITON_INTERPRET=1`` (no GPU) shapes are tiny; on a GPU the same tests run compiled.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import mdlm_ctc  # noqa: E402
from mdlm_ctc import backends  # noqa: E402
from mdlm_ctc.reference import (  # noqa: E402
    PRESERVE, STANDARD, emissions_reference, emissions_window_reference, gradient_window_reference,
    lattice_band_reference)
from oracles import assert_close_report  # noqa: E402

from mdlm_ctc.triton_kernels import emissions as emissions_module  # noqa: E402
from mdlm_ctc.triton_kernels import grad as grad_module  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
SLACK = 0
B, T, V, U = 4, 7, 11, 4
FRAME_WINDOW, VOCAB_WINDOW = 9, 4  # windows of 9 frames cut rows of 7; vocabulary windows 4, 4, 3


def make_case(dtype, *, strided=False, seed=31):
    """[B*T, V] logits (a dead frame, a NaN frame) and rows: full with repeats, ragged, infeasible, empty."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    logits[0, 2] = float("-inf")
    logits[3, 1, 6] = float("nan")
    targets = torch.randint(1, V, (B, U), generator=g)
    targets[0, :3] = targets[0, 0]
    input_lengths, target_lengths = torch.tensor([7, 5, 3, 6]), torch.tensor([4, 2, 4, 0])  # row 2: U > T_b
    flat = logits.reshape(B * T, V)
    if strided:  # rows at a stride of V + 5 (a slice of a wider buffer)
        wide = torch.zeros(B * T, V + 5, dtype=dtype)
        wide[:, 2:2 + V] = flat
        flat = wide[:, 2:2 + V]
    return (flat.to(DEVICE), targets.to(DEVICE), input_lengths.to(DEVICE), target_lengths.to(DEVICE))


def observed_frames(targets):
    observed = torch.full((B, T), -1, dtype=torch.long)
    observed[0, 5] = SLACK
    observed[1, 0] = int(targets[1, 0])
    observed[3, 2] = 4
    return observed.to(DEVICE)


def assert_bitwise(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} != {b.shape} {b.dtype}"
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(a.nan_to_num(0.0, 1e30, -1e30), b.nan_to_num(0.0, 1e30, -1e30)), f"{what}: values differ"


def frame_windows():
    return [(i, min(i + FRAME_WINDOW, B * T)) for i in range(0, B * T, FRAME_WINDOW)]


def vocab_windows():
    return [(v, min(v + VOCAB_WINDOW, V)) for v in range(0, V, VOCAB_WINDOW)]


# ---------------------------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,max_shift,with_observed,normalize,strided", [
    (torch.float32, -1, False, True, False),
    (torch.float32, 1, True, True, True),
    (torch.bfloat16, -1, True, True, False),
    (torch.float16, 0, False, False, True),
])
def test_emissions_window_matches_reference_and_whole_pass(dtype, max_shift, with_observed, normalize, strided):
    flat, targets, T_b, U_b = make_case(dtype, strided=strided)
    observed = observed_frames(targets) if with_observed else None
    W = 5  # wider than every band: the spare columns are 0
    whole = emissions_module.emissions(flat.reshape(B, T, V), targets, T_b, U_b, observed, SLACK, max_shift, W,
                                       normalize)
    parts = []
    for i, j in frame_windows():
        got = emissions_module.emissions_window(flat[i:j], i, T, targets, T_b, U_b, observed, SLACK, max_shift, W,
                                                normalize)
        want = emissions_window_reference(flat[i:j], i, T, targets, T_b, U_b, observed, SLACK, max_shift, W, normalize)
        for name, a, b in zip(("lse", "table", "special"), got, want):
            assert a.dtype == torch.float32
            assert_close_report(a, b, atol=1e-5, rtol=1e-5, what=f"frames [{i}, {j}) {name}")
        parts.append(got)
    for name, part, full in zip(("lse", "table", "special"), zip(*parts), whole):
        assert_bitwise(torch.cat(part).view(full.shape), full, f"reassembled {name}")
    if normalize:  # the NaN frame is marked (log-prob input reads only the gathered tokens)
        assert torch.isnan(whole[2][3, 1])


def test_emissions_window_vocabulary_strided_logits():
    """Logits whose vocabulary is not contiguous are copied once and give the same values."""
    flat, targets, T_b, U_b = make_case(torch.float32, seed=32)
    strided = flat.t().contiguous().t()
    assert strided.stride(1) != 1
    got = emissions_module.emissions_window(strided[3:12], 3, T, targets, T_b, U_b, None, SLACK, -1, 4, True)
    want = emissions_module.emissions_window(flat[3:12], 3, T, targets, T_b, U_b, None, SLACK, -1, 4, True)
    for name, a, b in zip(("lse", "table", "special"), got, want):
        assert_bitwise(a, b, name)


# ---------------------------------------------------------------------------------------------
# stage 3
# ---------------------------------------------------------------------------------------------

def posteriors(flat, targets, T_b, U_b, observed, mode, max_shift, normalize):
    """lse and posteriors from the reference stages (float32), and the nll they give."""
    lse, table, special = emissions_reference(flat.contiguous().view(B, T, V), targets, T_b, U_b, observed, SLACK,
                                              max_shift, 5, normalize)
    nll = lattice_band_reference(table, special, targets, T_b, U_b, mode, max_shift, True)
    return lse, table, special, nll


@pytest.mark.parametrize("dtype,mode,max_shift,with_observed,normalize,strided", [
    (torch.float32, PRESERVE, -1, False, True, False),
    (torch.float32, PRESERVE, 1, True, True, True),
    (torch.float32, STANDARD, -1, True, True, False),
    (torch.bfloat16, PRESERVE, 0, True, True, True),
    (torch.bfloat16, STANDARD, -1, False, True, False),
    (torch.float16, PRESERVE, -1, False, False, False),
])
def test_gradient_window_matches_reference_and_whole_pass(dtype, mode, max_shift, with_observed, normalize, strided):
    flat, targets, T_b, U_b = make_case(dtype, strided=strided, seed=33)
    observed = observed_frames(targets) if with_observed else None
    lse, table, special, nll = posteriors(flat, targets, T_b, U_b, observed, mode, max_shift, normalize)
    assert torch.isinf(nll[2]) and (torch.isnan(nll[3]) or not normalize)  # infeasible, NaN (softmax input)
    grad_nll = torch.rand(B, generator=torch.Generator().manual_seed(34)).to(DEVICE)
    flat_lse, flat_table, flat_special = lse.reshape(-1), table.reshape(B * T, -1), special.reshape(-1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # both round the same fp32 value to 16 bits
    for zero_infinity in (False, True):
        whole = grad_module.gradient(grad_nll, flat.contiguous().view(B, T, V), lse, targets, T_b, U_b, observed,
                                     table, special, nll, SLACK, max_shift, zero_infinity, normalize).view(B * T, V)
        assembled = torch.empty_like(whole)
        in_place = flat.clone()  # every tile overwritten in place, as the fused backward does
        for i, j in frame_windows():
            for v0, v1 in vocab_windows():
                tile = flat[i:j, v0:v1]
                rest = (flat_lse[i:j], targets, T_b, U_b, observed, flat_table[i:j], flat_special[i:j], nll, SLACK,
                        max_shift, zero_infinity, normalize)
                got = torch.empty_like(tile)
                grad_module.gradient_window(grad_nll, tile, i, T, v0, V, *rest, got)
                want = torch.empty_like(tile)
                gradient_window_reference(grad_nll, tile, i, T, v0, V, *rest, want)
                assert_close_report(got, want, atol=tol, rtol=tol,
                                    what=f"frames [{i}, {j}) x vocabulary [{v0}, {v1}), zero_infinity={zero_infinity}")
                assembled[i:j, v0:v1] = got
                view = in_place[i:j, v0:v1]
                grad_module.gradient_window(grad_nll, view, i, T, v0, V, *rest, view)
        assert_bitwise(assembled, whole, f"reassembled gradient, zero_infinity={zero_infinity}")
        assert_bitwise(in_place, whole, f"in-place gradient, zero_infinity={zero_infinity}")
        rows = whole.view(B, T, V)
        if zero_infinity:
            assert (rows[2] == 0).all()
        else:
            assert rows[2, :3].isnan().all() and (rows[2, 3:] == 0).all()


def test_gradient_window_special_token_and_repeats_outside_the_window():
    """A token repeated in the band with its writer in another vocabulary window, and the special token
    in the last window only: each window writes exactly its own columns."""
    flat, targets, T_b, U_b = make_case(torch.float32, seed=35)
    special_id = V - 1
    targets = targets.clamp(max=V - 2)
    targets[0] = torch.tensor([3, 5, 3, 3], device=DEVICE)
    lse, table, special = emissions_reference(flat.view(B, T, V), targets, T_b, U_b, None, special_id, -1, 5, True)
    nll = lattice_band_reference(table, special, targets, T_b, U_b, PRESERVE, -1, True)
    grad_nll = torch.ones(B, device=DEVICE)
    whole = grad_module.gradient(grad_nll, flat.view(B, T, V), lse, targets, T_b, U_b, None, table, special, nll,
                                 special_id, -1, True, True).view(B * T, V)
    got = torch.full_like(flat, 7.0)
    for v0, v1 in ((0, 4), (4, 5), (5, 10), (10, 11)):  # 3 and 5 in different windows; the special token alone
        out = got[:, v0:v1]
        grad_module.gradient_window(grad_nll, flat[:, v0:v1], 0, T, v0, V, lse.reshape(-1), targets, T_b, U_b, None,
                                    table.reshape(B * T, -1), special.reshape(-1), nll, special_id, -1, True, True, out)
    assert_bitwise(got, whole, "reassembled gradient")


def test_float64_windows_are_the_reference_ones():
    flat, targets, T_b, U_b = make_case(torch.float64, seed=36)
    got = emissions_module.emissions_window(flat[4:13], 4, T, targets, T_b, U_b, None, SLACK, -1, 5, True)
    want = emissions_window_reference(flat[4:13], 4, T, targets, T_b, U_b, None, SLACK, -1, 5, True)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        assert_bitwise(a, b, "float64 emissions window")
    lse, table, special, nll = posteriors(flat, targets, T_b, U_b, None, PRESERVE, -1, True)
    args = (lse.reshape(-1)[4:13], targets, T_b, U_b, None, table.reshape(B * T, -1)[4:13], special.reshape(-1)[4:13],
            nll, SLACK, -1, False, True)
    got, want = torch.empty_like(flat[4:13, 2:9]), torch.empty_like(flat[4:13, 2:9])
    grad_module.gradient_window(torch.ones(B, dtype=torch.float64, device=DEVICE), flat[4:13, 2:9], 4, T, 2, V, *args,
                                got)
    gradient_window_reference(torch.ones(B, dtype=torch.float64, device=DEVICE), flat[4:13, 2:9], 4, T, 2, V, *args,
                              want)
    assert_bitwise(got, want, "float64 gradient window")


def test_bad_windows_are_refused():
    flat, targets, T_b, U_b = make_case(torch.float32, seed=37)
    with pytest.raises(ValueError, match="outside the B\\*T"):
        emissions_module.emissions_window(flat[:5], 26, T, targets, T_b, U_b, None, SLACK, -1, 4, True)
    with pytest.raises(ValueError, match="2-D"):
        emissions_module.emissions_window(flat.view(B, T, V), 0, T, targets, T_b, U_b, None, SLACK, -1, 4, True)
    with pytest.raises(ValueError, match="frames_per_row"):
        emissions_module.emissions_window(flat[:5], 0, 0, targets, T_b, U_b, None, SLACK, -1, 4, True)
    with pytest.raises(ValueError, match="band_width"):
        emissions_module.emissions_window(flat[:5], 0, T, targets, T_b, U_b, None, SLACK, -1, 0, True)
    z = flat[:4, :5].contiguous()
    common = (torch.zeros(4, device=DEVICE), targets, T_b, U_b, None, torch.zeros(4, 4, device=DEVICE),
              torch.zeros(4, device=DEVICE), torch.zeros(B, device=DEVICE), SLACK, -1, False, True)
    ones = torch.ones(B, device=DEVICE)
    with pytest.raises(ValueError, match="vocab_size"):
        grad_module.gradient_window(ones, z, 0, T, 8, V, *common, z)
    with pytest.raises(ValueError, match="post_target"):
        grad_module.gradient_window(ones, z, 0, T, 0, V, *common[:5], torch.zeros(3, 4, device=DEVICE), *common[6:],
                                    z)
    with pytest.raises(ValueError, match="`out`"):
        grad_module.gradient_window(ones, z, 0, T, 0, V, *common, torch.empty(4, 5, dtype=torch.float16,
                                                                              device=DEVICE))


def test_backends_run_the_triton_windows():
    assert backends.window_stages("triton") == (emissions_module.emissions_window, grad_module.gradient_window)
    assert backends.window_stages("cuda") == backends.window_stages("triton")


# ---------------------------------------------------------------------------------------------
# GPU: no host synchronisation on the windowed stages
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_windows_do_not_synchronise():
    """After a warm-up call (Triton compiles each kernel specialisation on its first launch), the windowed
    stages run under ``torch.cuda.set_sync_debug_mode("error")``: no host synchronisation."""
    flat, targets, T_b, U_b = make_case(torch.bfloat16, seed=38)
    lse, table, special, nll = posteriors(flat, targets, T_b, U_b, None, PRESERVE, -1, True)
    grad_nll = torch.ones(B, device=DEVICE)

    def run():
        emissions_module.emissions_window(flat[3:20], 3, T, targets, T_b, U_b, None, SLACK, -1, 5, True)
        tile = flat[3:20, 2:9].clone()
        grad_module.gradient_window(grad_nll, tile, 3, T, 2, V, lse.reshape(-1)[3:20], targets, T_b, U_b, None,
                                    table.reshape(B * T, -1)[3:20], special.reshape(-1)[3:20], nll, SLACK, -1, False,
                                    True, tile)

    run()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert "triton" in mdlm_ctc.available_backends(DEVICE)
