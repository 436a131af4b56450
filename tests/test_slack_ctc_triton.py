"""The Triton backend: every kernel against the reference stages and the independent oracles.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py), so
shapes are tiny (T <= 12, V <= 8) and the cases few; the same tests run on CUDA tensors, with the
compiled kernels, on a machine with an NVIDIA GPU. Realistic shapes are in
``test_slack_ctc_triton_gpu.py``. The lattice is exercised both as one chunk and with the
time-parallel scan forced to chunks of 2-5 frames (``chunk_len``), so the transfer / boundary /
sweep kernels are all checked at these sizes. ``test_triton_gpu_shaped.py`` runs the interpreter at
the block sizes a GPU gets; ``test_triton_resources.py`` compiles every kernel for sm_90 at every
config the launchers can choose (the interpreter does not type-check, the compiler does).
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import mdlm_ctc  # noqa: E402
from mdlm_ctc.reference import (  # noqa: E402
    PRESERVE, STANDARD, column_band_width, emissions_reference, gradient_reference, lattice_band_reference,
    slack_ctc_reference)
from oracles import assert_close_report, assert_low_precision_close, brute_force_nll  # noqa: E402

from mdlm_ctc.triton_kernels import emissions as emissions_module  # noqa: E402
from mdlm_ctc.triton_kernels import grad as grad_module  # noqa: E402
from mdlm_ctc.triton_kernels import slack_ctc as lattice_module  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"  # conftest sets TRITON_INTERPRET=1 when there is no NVIDIA GPU
SLACK = 0
NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

def make_case(B, T, V, U, *, input_lengths=None, target_lengths=None, dtype=torch.float32, scale=2.0,
              repeats=True, seed=0):
    """Random logits and targets (never the slack id), ragged lengths; on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(1, V, (B, U), generator=g)
    if repeats and U >= 2:
        targets[0, 1] = targets[0, 0]  # a repeat: kept by preserve, needs a blank in standard
    T_b = torch.full((B,), T) if input_lengths is None else torch.as_tensor(input_lengths)
    U_b = torch.full((B,), U) if target_lengths is None else torch.as_tensor(target_lengths)
    return (logits.to(DEVICE), targets.to(DEVICE), T_b.long().to(DEVICE), U_b.long().to(DEVICE))


def observed_canvas(targets, T_b, U_b, T, rate=0.4, seed=1):
    """Observe a random subset of an admissible canvas (y_u at frame u, slack after)."""
    g = torch.Generator().manual_seed(seed)
    B = targets.shape[0]
    observed = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        canvas = [int(v) for v in targets[b, : int(U_b[b])]] + [SLACK] * (int(T_b[b]) - int(U_b[b]))
        for t, token in enumerate(canvas):
            if torch.rand((), generator=g) < rate:
                observed[b, t] = token
    return observed.to(targets.device)


def band_width(T_b, U_b, max_shift):
    return max(int(column_band_width(T_b, U_b, max_shift).max()), 1)


def reference_tables(logits, targets, T_b, U_b, observed, max_shift, normalize=True):
    shift = -1 if max_shift is None else max_shift
    W = band_width(T_b, U_b, max_shift)
    return emissions_reference(logits, targets, T_b, U_b, observed, SLACK, shift, W, normalize)


def assert_posteriors_sum_to_one(table, special, T_b, nll, atol=1e-5):
    """Every frame of a feasible row emits exactly one token: its posteriors sum to 1 (alpha/beta identity)."""
    frames = torch.arange(table.shape[1], device=table.device)
    live = (frames[None, :] < T_b[:, None]) & torch.isfinite(nll)[:, None]
    total = (table.sum(-1) + special)[live]
    assert_close_report(total, torch.ones_like(total), atol=atol, rtol=0, what="sum of a frame's posteriors")


def assert_bitwise(a, b, what):
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(a.nan_to_num(0.0, 1e30, -1e30), b.nan_to_num(0.0, 1e30, -1e30)), f"{what}: values differ"


# ---------------------------------------------------------------------------------------------
# stage 1: the vocabulary pass
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,normalize,with_observed,max_shift", [
    (torch.float32, True, False, None),
    (torch.float32, True, True, 1),
    (torch.float32, False, False, None),
    (torch.bfloat16, True, False, 0),
    (torch.float16, True, True, None),
])
def test_emissions_match_reference(dtype, normalize, with_observed, max_shift):
    logits, targets, T_b, U_b = make_case(3, 7, 11, 4, input_lengths=[7, 5, 6], target_lengths=[4, 2, 0], dtype=dtype)
    logits[1, 2] = float("-inf")       # an all -inf frame
    logits[2, 4, 3] = NAN              # a NaN frame (row 2 has an empty target: only the special column)
    logits[0, 1, 5] = 1e4
    logits = logits.transpose(0, 1).contiguous().transpose(0, 1)  # strides on B and T that are not [T*V, V]
    observed = observed_canvas(targets, T_b, U_b, 7) if with_observed else None
    shift = -1 if max_shift is None else max_shift
    W = band_width(T_b, U_b, max_shift) + 1  # a table wider than needed: the slack columns are 0
    got = emissions_module.emissions(logits, targets, T_b, U_b, observed, SLACK, shift, W, normalize)
    want = emissions_reference(logits, targets, T_b, U_b, observed, SLACK, shift, W, normalize)
    for name, a, b in zip(("lse", "table", "special"), got, want):
        assert a.dtype == torch.float32
        assert_close_report(a, b, atol=1e-5, rtol=1e-5, what=name)


# ---------------------------------------------------------------------------------------------
# stage 2: the lattice (loss and posteriors), one chunk and the time-parallel scan
# ---------------------------------------------------------------------------------------------

LATTICE_CASES = [  # (mode, max_shift, chunk_len)
    (PRESERVE, None, 0),
    (PRESERVE, None, 3),
    (PRESERVE, 1, 2),
    (PRESERVE, 0, 0),
    (STANDARD, None, 0),
    (STANDARD, None, 2),
]


@pytest.mark.parametrize("mode,max_shift,chunk_len", LATTICE_CASES)
def test_lattice_band_matches_reference(mode, max_shift, chunk_len):
    # rows: full, ragged, empty target, infeasible (U > T_b), NaN frame
    logits, targets, T_b, U_b = make_case(5, 8, 6, 4, input_lengths=[8, 6, 5, 3, 7], target_lengths=[4, 2, 0, 4, 3])
    logits[4, 2, 1] = NAN
    table, special = reference_tables(logits, targets, T_b, U_b, None, max_shift)[1:]
    shift = -1 if max_shift is None else max_shift
    got_table, got_special = table.clone(), special.clone()
    nll = lattice_module.lattice_band(got_table, got_special, targets, T_b, U_b, mode, shift, True, chunk_len=chunk_len)
    want_table, want_special = table.clone(), special.clone()
    want = lattice_band_reference(want_table, want_special, targets, T_b, U_b, mode, shift, True)
    assert_close_report(nll, want, atol=1e-5, rtol=1e-5, what="nll")
    assert_close_report(got_table, want_table, atol=1e-6, rtol=1e-4, what="posterior of the targets")
    assert_close_report(got_special, want_special, atol=1e-6, rtol=1e-4, what="posterior of the special token")
    assert torch.isinf(nll[3]) and torch.isnan(nll[4])
    assert_posteriors_sum_to_one(got_table, got_special, T_b, nll)
    # without need_grad: the same loss, the table untouched
    untouched = table.clone()
    nll_only = lattice_module.lattice_band(untouched, special.clone(), targets, T_b, U_b, mode, shift, False,
                                           chunk_len=chunk_len)
    assert_bitwise(nll_only, nll, "nll without need_grad")
    assert_bitwise(untouched, table, "table without need_grad")


@pytest.mark.parametrize("mode", [PRESERVE, STANDARD])
def test_chunked_scan_agrees_with_one_chunk(mode):
    """The log-semiring scan over chunks only reassociates sums: every chunk length gives the same."""
    logits, targets, T_b, U_b = make_case(2, 12, 5, 5, input_lengths=[12, 10], target_lengths=[5, 3], seed=3)
    table, special = reference_tables(logits, targets, T_b, U_b, None, None)[1:]
    results = []
    for chunk_len in (0, 5, 1) if mode == PRESERVE else (0, 4):
        t, s = table.clone(), special.clone()
        nll = lattice_module.lattice_band(t, s, targets, T_b, U_b, mode, -1, True, chunk_len=chunk_len)
        results.append((chunk_len, nll, t, s))
    _, nll0, t0, s0 = results[0]
    for chunk_len, nll, t, s in results[1:]:
        assert_close_report(nll, nll0, atol=1e-5, rtol=1e-5, what=f"nll, chunk_len={chunk_len}")
        assert_close_report(t, t0, atol=1e-6, rtol=1e-4, what=f"target posteriors, chunk_len={chunk_len}")
        assert_close_report(s, s0, atol=1e-6, rtol=1e-4, what=f"special posteriors, chunk_len={chunk_len}")


def test_tile_plans_leave_no_nearly_empty_tile():
    """``tile_plan`` (host arithmetic, no kernel): for every band of S <= 9,000 states and every cap, the
    fewest tiles any power-of-two BLOCK <= cap allows, at the smallest such BLOCK, covering the band, with
    the tail only where it saves a tile; a band of 2^k + r states (r <= TAIL) takes the tiles of 2^k, its
    last tile holding BLOCK + r states."""
    tail = lattice_module.TAIL
    for cap in (256, 512, 1024, 2048, 4096):
        blocks = [2 ** j for j in range(cap.bit_length())]
        for S in range(1, 9001):
            block, used = lattice_module.tile_plan(S, cap, tail)
            n = lattice_module.n_tiles(S, block, used)
            assert used in (0, tail) and (used == 0 or lattice_module.n_tiles(S, block, 0) > n), (cap, S, used)
            assert block in blocks and (n - 1) * block < S <= n * block + tail, (cap, S, block, n)
            assert n == min(lattice_module.n_tiles(S, b, tail) for b in blocks), (cap, S, block)
            assert block <= 4 * tail or lattice_module.n_tiles(S, block // 2, tail) > n, (cap, S, block)
            assert block >= min(4 * tail, 1 << (S - 1).bit_length(), cap), (cap, S, block)
            if n == 1 and S > tail:
                assert S > block // 2, (cap, S, block)  # one tile: more than half of it used
        for k in range(5, 13):  # 2^k > TAIL
            for r in (1, 2, 3, tail):
                S = 2 ** k + r
                block, used = lattice_module.tile_plan(S, cap, tail)
                n = lattice_module.n_tiles(S, block, used)
                if 2 ** k >= block:
                    assert n == 2 ** k // block and S - (n - 1) * block == block + r, (cap, S, block, n)


@pytest.mark.parametrize("mode", [PRESERVE, STANDARD])
def test_row_depth_is_within_the_cost_models_bound(mode):
    """``row_depth`` (the report's sequential depth) counts a row's own bands; ``sequential_depth`` prices
    a band of S states at every frame, so it bounds every row of the table. Widest preserve band:
    min(U, T - U) + 1 states."""
    for T, U in ((2048, 1792), (2048, 1024), (8192, 7680), (600, 256), (300, 1)):
        W = max(min(U, T - U + 1), 1)
        S = W + 1 if mode == PRESERVE else 2 * W + 1
        chunks = lattice_module.PRESERVE_CHUNKS if mode == PRESERVE else lattice_module.STANDARD_CHUNKS
        for chunk_len in (0,) + chunks:
            for T_b, U_b in ((T, U), (T - 37, U // 2), (T, 0)):
                row = lattice_module.row_depth(T_b, U_b, S, mode, chunk_len)
                assert 0 < row["total"] <= lattice_module.sequential_depth(T, S, mode, chunk_len), (T_b, U_b, row)
                assert row["widest"] <= S
                if mode == PRESERVE:  # (a row too wide for the table is clipped to S states, as in the kernels)
                    assert row["widest"] == min(U_b, T_b - U_b, S - 1) + 1
        assert lattice_module.row_depth(U - 1, U, S, mode, 7)["total"] == 0  # infeasible: nothing runs


# ---------------------------------------------------------------------------------------------
# stage 3: the gradient pass
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,max_shift,normalize,with_observed,zero_infinity,dtype", [
    (PRESERVE, None, True, False, False, torch.float32),
    (PRESERVE, 1, True, True, True, torch.bfloat16),
    (STANDARD, None, True, False, True, torch.float16),
    (STANDARD, None, False, False, False, torch.float32),
])
def test_gradient_matches_reference(mode, max_shift, normalize, with_observed, zero_infinity, dtype):
    # row 0 repeats one token 3 times (the deterministic scatter must sum them); row 2 is infeasible
    logits, targets, T_b, U_b = make_case(3, 8, 7, 5, input_lengths=[8, 6, 3], target_lengths=[5, 2, 4], dtype=dtype)
    targets[0, :3] = 4
    observed = observed_canvas(targets, T_b, U_b, 8) if with_observed else None
    shift = -1 if max_shift is None else max_shift
    lse, table, special = reference_tables(logits, targets, T_b, U_b, observed, max_shift, normalize)
    nll = lattice_band_reference(table, special, targets, T_b, U_b, mode, shift, True)
    grad_nll = torch.rand(3, dtype=torch.float32, device=DEVICE)
    args = (grad_nll, logits, lse, targets, T_b, U_b, observed, table, special, nll, SLACK, shift, zero_infinity,
            normalize)
    got = grad_module.gradient(*args)
    want = gradient_reference(*args)
    assert got.dtype == dtype and got.shape == logits.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # both round the same fp32 value to 16 bits
    assert_close_report(got, want, atol=tol, rtol=tol, what="gradient")
    # in place over (a copy of) the logits: bitwise the same
    buffer = logits.clone()
    in_place = grad_module.gradient(grad_nll, buffer, *args[2:], out=buffer)
    assert in_place.data_ptr() == buffer.data_ptr()
    assert_bitwise(in_place, got, "in-place gradient")


def _gradient_case(dtype=torch.float32, seed=12):
    """Rows whose bands (W = 5, tiles of 4 slots under the interpreter) hold a token several times, with
    runs that cross a tile edge; logits with strides on B and T that are not [T*V, V]."""
    logits, targets, T_b, U_b = make_case(3, 12, 9, 8, input_lengths=[12, 11, 12], target_lengths=[8, 7, 5],
                                          dtype=dtype, seed=seed)
    targets[0] = torch.tensor([3, 5, 3, 3, 5, 3, 7, 3])
    targets[1, :7] = 2  # one token everywhere: one writer sums the whole band
    logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert not logits.is_contiguous()
    lse, table, special = reference_tables(logits, targets, T_b, U_b, None, None)
    nll = lattice_band_reference(table, special, targets, T_b, U_b, PRESERVE, -1, True)
    weights = torch.rand(3, dtype=torch.float32, device=DEVICE)
    return (weights, logits, lse, targets, T_b, U_b, None, table, special, nll, SLACK, -1, False, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_repeats_across_band_tiles_and_strided_logits(dtype):
    args = _gradient_case(dtype)
    assert args[7].shape[2] > 4  # more band slots than one interpreter tile
    got = grad_module.gradient(*args)
    want = gradient_reference(*args)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close_report(got, want, atol=tol, rtol=tol, what="gradient")
    # the gradient at a repeated token is the sum over its band slots: the row sums of g*(softmax-gamma) are 0
    live = torch.isfinite(args[9])
    assert_close_report(got.float().sum(-1)[live], torch.zeros_like(got.float().sum(-1)[live]), atol=1e-5 if
                        dtype == torch.float32 else 2e-2, rtol=0, what="row sums of the gradient")


def test_gradient_bits_do_not_depend_on_the_dense_config():
    """Every config the autotuner may pick gives the same bits (the dense kernel has no reduction)."""
    args = _gradient_case(torch.bfloat16, seed=13)
    default = grad_module.gradient(*args)
    for block in grad_module.DENSE_AUTOTUNE_CONFIGS:
        assert_bitwise(grad_module.gradient(*args, dense_block=block), default, f"gradient with dense config {block}")


def test_vocabulary_pass_is_not_autotuned():
    """The logsumexp's order depends on BLOCK_V and num_warps: they are a function of the shape only."""
    assert not hasattr(emissions_module, "_emissions_kernel_tuned")
    assert emissions_module.emissions_config(126464, 257, 2) == dict(BLOCK_V=2048, BLOCK_W=512, num_warps=8)
    assert emissions_module.emissions_config(126464, 257, 4) == dict(BLOCK_V=1024, BLOCK_W=512, num_warps=8)


# ---------------------------------------------------------------------------------------------
# end to end: slack_ctc_loss(backend="triton") against autograd on the float64 reference and the
# brute-force enumeration of canvases
# ---------------------------------------------------------------------------------------------

def run_triton(logits, targets, U_b, T_b, weights, **kw):
    x = logits.clone().requires_grad_()
    nll = mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, reduction="none",
                                  backend="triton", **kw)
    (nll * weights).sum().backward()
    return nll.detach(), x.grad


def run_reference(logits, targets, U_b, T_b, weights, **kw):
    x = logits.detach().clone().requires_grad_()
    nll = slack_ctc_reference(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, **kw)
    (nll * weights.to(nll.dtype)).sum().backward()
    return nll.detach(), x.grad


E2E_CASES = [  # (collapse, max_shift, with_observed, chunk): small V and T so that V^T canvases enumerate
    ("preserve", None, False, "0"),
    ("preserve", 1, True, "2"),
    ("preserve", 0, False, "0"),
    ("standard", None, False, "2"),
    ("standard", None, True, "0"),
]


@pytest.mark.parametrize("collapse,max_shift,with_observed,chunk", E2E_CASES)
def test_loss_and_gradient_end_to_end(collapse, max_shift, with_observed, chunk, monkeypatch):
    monkeypatch.setenv("MDLM_CTC_LATTICE_CHUNK", chunk)
    logits, targets, T_b, U_b = make_case(3, 5, 3, 3, input_lengths=[5, 4, 5], target_lengths=[2, 1, 0], seed=7)
    if collapse == "standard":
        targets[0, 1] = 3 - targets[0, 0]  # different neighbours (ids 1, 2): feasible with T_b = 5
    observed = observed_canvas(targets, T_b, U_b, 5) if with_observed else None
    weights = torch.rand(3, device=DEVICE)
    kw = dict(collapse=collapse, max_shift=max_shift, observed=observed)
    nll, grad = run_triton(logits, targets, U_b, T_b, weights, **kw)
    nll64, grad64 = run_reference(logits.double(), targets, U_b, T_b, weights, **kw)
    assert_close_report(nll, nll64, atol=1e-5, rtol=1e-5, what="loss vs float64 reference")
    assert_close_report(grad, grad64, atol=1e-6, rtol=1e-4, what="gradient vs float64 reference")
    brute = brute_force_nll(logits.cpu(), targets.cpu(), U_b.cpu(), T_b.cpu(), SLACK, collapse, max_shift,
                            None if observed is None else observed.cpu())
    assert_close_report(nll.cpu(), brute, atol=1e-5, rtol=1e-5, what="loss vs brute force")


@pytest.mark.parametrize("T,U", [(1, 0), (1, 1), (2, 0)])
def test_tiny_and_empty(T, U):
    logits, targets, T_b, U_b = make_case(2, T, 4, max(U, 1), target_lengths=[U, U], repeats=False, seed=11)
    for collapse in ("preserve", "standard"):
        weights = torch.ones(2, device=DEVICE)
        nll, grad = run_triton(logits, targets, U_b, T_b, weights, collapse=collapse)
        nll64, grad64 = run_reference(logits.double(), targets, U_b, T_b, weights, collapse=collapse)
        assert_close_report(nll, nll64, atol=1e-5, rtol=1e-5, what=f"{collapse} loss")
        assert_close_report(grad, grad64, atol=1e-6, rtol=1e-4, what=f"{collapse} gradient")


def test_infeasible_rows_and_zero_infinity():
    # row 0: U > T_b; row 1 (standard): a repeat with no room for the blank; row 2 feasible
    logits, targets, T_b, U_b = make_case(3, 4, 5, 4, input_lengths=[2, 2, 4], target_lengths=[3, 2, 2], seed=5)
    targets[1, :2] = 3
    for zero_infinity in (False, True):
        x = logits.clone().requires_grad_()
        nll = mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, collapse="standard",
                                      reduction="none", zero_infinity=zero_infinity, backend="triton")
        nll.sum().backward()
        grad = x.grad
        if zero_infinity:
            assert torch.equal(nll[:2].cpu(), torch.zeros(2)) and torch.isfinite(nll[2])
            assert torch.equal(grad[:2].cpu(), torch.zeros_like(grad[:2].cpu()))
        else:
            assert torch.isinf(nll[:2]).all() and torch.isfinite(nll[2])
            assert grad[0, :2].isnan().all() and (grad[0, 2:] == 0).all()  # NaN on active frames only
        assert torch.isfinite(grad[2]).all()


def test_extreme_logits_give_no_nan():
    logits, targets, T_b, U_b = make_case(2, 6, 5, 3, target_lengths=[3, 2], scale=1e4, repeats=False, seed=2)
    targets[targets == 4] = 3
    logits[0, 1, 2] = float("-inf")
    logits[1, :, 4] = float("-inf")  # a token that can never be emitted (not a target, not the slack)
    for collapse in ("preserve", "standard"):
        weights = torch.ones(2, device=DEVICE)
        nll, grad = run_triton(logits, targets, U_b, T_b, weights, collapse=collapse)
        nll64, grad64 = run_reference(logits.double(), targets, U_b, T_b, weights, collapse=collapse)
        assert not nll.isnan().any() and not grad.isnan().any()
        assert_close_report(nll, nll64, atol=1e-3, rtol=1e-6, what=f"{collapse} loss at +-1e4")
        assert_close_report(grad, grad64, atol=1e-4, rtol=1e-4, what=f"{collapse} gradient at +-1e4")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    logits, targets, T_b, U_b = make_case(2, 6, 6, 3, input_lengths=[6, 5], target_lengths=[3, 2], dtype=dtype,
                                          seed=4)
    weights = torch.ones(2, device=DEVICE)
    nll, grad = run_triton(logits, targets, U_b, T_b, weights)
    assert nll.dtype == torch.float32 and grad.dtype == dtype
    nll_same, grad_same = run_reference(logits, targets, U_b, T_b, weights)
    nll64, grad64 = run_reference(logits.double(), targets, U_b, T_b, weights)
    assert_low_precision_close(nll, nll_same, nll64, what="low-precision loss")
    assert_low_precision_close(grad, grad_same, grad64, what="low-precision gradient")


def test_ctc_loss_matches_torch():
    g = torch.Generator().manual_seed(9)
    T, B, C = 7, 3, 5
    logits = torch.randn(T, B, C, generator=g).to(DEVICE)
    targets = torch.randint(1, C, (B, 4), generator=g).to(DEVICE)
    targets[0, 1] = targets[0, 0]
    input_lengths = torch.tensor([7, 6, 5], device=DEVICE)
    target_lengths = torch.tensor([4, 2, 0], device=DEVICE)
    grads = []
    losses = []
    for fn in (lambda lp: mdlm_ctc.ctc_loss(lp, targets, input_lengths, target_lengths, reduction="mean",
                                            backend="triton"),
               lambda lp: torch.nn.functional.ctc_loss(lp.cpu(), targets.cpu(), input_lengths.cpu(),
                                                       target_lengths.cpu(), reduction="mean")):
        x = logits.clone().requires_grad_()
        loss = fn(x.log_softmax(-1))
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append(x.grad.cpu())
    assert_close_report(losses[0], losses[1], atol=1e-5, rtol=1e-5, what="ctc_loss")
    assert_close_report(grads[0], grads[1], atol=1e-6, rtol=1e-4, what="ctc_loss gradient through log_softmax")


def test_deterministic():
    logits, targets, T_b, U_b = make_case(2, 8, 5, 4, input_lengths=[8, 7], target_lengths=[4, 3], seed=6)
    targets[0, :] = 2  # every band token the same: the scatter has to combine four posteriors
    weights = torch.rand(2, device=DEVICE)
    for collapse, chunk_len in (("preserve", 3), ("standard", 0)):
        lattice_kw = dict(chunk_len=chunk_len)
        runs = []
        for _ in range(2):
            lse, table, special = emissions_module.emissions(logits, targets, T_b, U_b, None, SLACK, -1,
                                                             band_width(T_b, U_b, None), True)
            mode = PRESERVE if collapse == "preserve" else STANDARD
            nll = lattice_module.lattice_band(table, special, targets, T_b, U_b, mode, -1, True, **lattice_kw)
            grad = grad_module.gradient(weights, logits, lse, targets, T_b, U_b, None, table, special, nll, SLACK, -1,
                                        False, True)
            runs.append((nll, table, special, grad))
        for name, a, b in zip(("nll", "table", "special", "grad"), *runs):
            assert_bitwise(a, b, f"{collapse}: {name} on a second run")


def test_backend_listed_and_compiles_without_graph_breaks():
    assert "triton" in mdlm_ctc.available_backends(DEVICE)
    logits, targets, T_b, U_b = make_case(2, 4, 4, 2, seed=8)

    def loss(x):
        return mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, backend="triton")

    x = logits.clone().requires_grad_()
    compiled = torch.compile(loss, backend="eager", fullgraph=True)(x)
    compiled.backward()
    y = logits.clone().requires_grad_()
    eager = loss(y)
    eager.backward()
    assert_close_report(compiled.detach(), eager.detach(), atol=0, rtol=0, what="compiled loss")
    assert_close_report(x.grad, y.grad, atol=0, rtol=0, what="compiled gradient")
