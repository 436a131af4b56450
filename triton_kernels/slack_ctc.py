"""The banded log-space lattice (stage 2 of ``csrc/ops.cpp``) for both collapses, in Triton.

Input: the band emission table of the vocabulary pass, table [B, T, W] (e_t(y_u) at
[t-1, u - column_lo(t)]) and special [B, T] (e_t(k), NaN on a NaN frame), float32, contiguous.
Output: nll [B] (+inf for an infeasible row, NaN for a row with a NaN frame); with need_grad the
posteriors overwrite table (target columns, same layout) and special (the special token), 0 past the
input length and on infeasible rows, NaN on NaN rows. Lengths stay on the device: no host sync.

Maths (lattice.h, SPEC §3). Both lattices are written over one state index x with at most three
predecessors x, x-1, x-2 and a transition weight w_t(x, d) for the move x-d -> x at frame t:

    preserve  x = u (target tokens emitted)  w(x,0) = e_t(k), w(x,1) = e_t(y_x), no skip
    standard  x = s (extended label k y1 k y2 .. yU k)  w(x,0) = w(x,1) = e_t(l'_x),
              w(x,2) = e_t(l'_x) if x is a label and y_{(x+1)/2} != y_{(x-1)/2} (skip), else -inf
    alpha_t(x)     = logsumexp_d alpha_{t-1}(x-d) + w_t(x, d),   alpha_0 = [0 at x = 0]
    beta_{t-1}(x)  = logsumexp_d beta_t(x+d) + w_t(x+d, d),     beta_T = 0 at the final states
restricted to the band of states that lie on a complete path (preserve: max(0, U-(T-t),
min(t-m, U)) <= u <= min(t, U); standard: max(0, 2(U-T+t)-1) <= s <= min(2U, max(0, 2t-1))),
log space, fp32 (logspace.py). Posteriors of frame t:
    preserve  target u: exp(alpha_{t-1}(u-1) + e_t(y_u) + beta_t(u) - loglik);
              k: sum_u exp(alpha_{t-1}(u) + e_t(k) + beta_t(u) - loglik)
    standard  occupancy exp(alpha_t(s) + beta_t(s) - loglik): label s = 2u-1 -> target u, the
              blank states (even s) summed -> k.

Layouts of the work buffers (all float32, band-relative: state x of frame t at [x - lo(t)]):
    alpha, beta  [B, T+1, S]      S = W + 1 (preserve) or 2W + 1 (standard): the widest state band
                                   a table of width W can hold, so no row's lengths are read on the host
    transfer     [B, NC, S, D]    chunked mode only: for chunk c and each state x of frame c*L,
                                   the log weight of reaching x + d at the chunk's last frame

Parallelisation plan (why, and what to measure). One step of a lattice is cheap (a band of S
states, 2-3 SFU ops per state) but there are T dependent steps, and in Triton every step is a
round trip through memory plus a CTA barrier (the band does not fit one warp, and Triton has no
register shuffle across warps). One program per row would leave a long sequence on one SM for T
latency-bound steps: at B = 2, T = 8192 that is ~2.5-3.5 ms per pass [est. at 0.3-0.4 us per
step], the cliff G3 forbids. So the time axis is split into chunks of L frames and the chunks are
combined by a log-semiring scan, in kernels that never wait on each other (no inter-CTA flags or
spin loops, nothing that can deadlock, nothing order-dependent: deterministic):

    A  _transfer_kernel  grid (B, NC, S/TILE_I), fully parallel: each chunk's transfer matrix
                         (a band of D = L+1 or 2L+1 offsets per input state), L steps of a
                         [TILE_I, D] tile.
    B  _boundary_kernel  grid (B, 2): alpha at every chunk boundary forward (program 0) and beta
                         backward (program 1), NC steps of a banded log-semiring mat-vec each.
    C  _sweep_kernel     grid (B, NC, 2): alpha forward and beta backward inside every chunk,
                         from its boundary rows, all chunks and both directions at once.
    _loss_kernel         grid (B): NaN scan of the row, loglik from alpha at T_b, nll.
    _posterior_kernel    grid (B*T): posteriors of every frame from the stored alpha and beta,
                         overwriting the table in place (fully parallel, no sequential work).
The critical path becomes ~2L + NC dependent steps instead of T (T = 2048, L = 31: ~130 instead
of 2048) at the price of D times the SFU work of one pass in phase A (every input state carries D
offsets), spread over the whole GPU: B * NC * S/TILE_I programs (G1: ~8,000). When the band is so
wide that this extra work exceeds the latency it saves, or T is short, a single chunk (NC = 1,
phases A and B skipped) runs alpha and beta as two concurrent programs per row.
Tiles. A step over a band of n states runs ``_n_tiles`` dependent tiles of BLOCK states, and the
last tile also takes up to TAIL = 8 states past its end (a [TAIL] or [TAIL, BLOCK_D] tile in the
same loop iteration; TAIL is a constexpr, 0 where the plan needs no tail: then the kernels are the
plain tile loop), so a band of 2^k + r states, r <= 8, costs the tiles of 2^k: no tile holds one
state. That is the common case: preserve tables have S = W + 1 states, standard S = 2W + 1, and W is
often a power of two (G2: S = 2,049 is one sweep tile of 2,048 + 8 instead of 4,096 lanes, and
2 boundary tiles of 1,024 + 8 per chunk instead of 3, the third holding one state). ``tile_plan``
picks the smallest power-of-two BLOCK with the fewest tiles under each kernel's cap (sweep: 4,096
states preserve, 2,048 standard; boundary: [BLOCK_X, BLOCK_D] within 16,384 lanes, 4,096 from
BLOCK_D = 128; posterior sums: 1,024). The tiles of one step are independent (they read frame t-1, write frame t), so where the
extra states go does not change any result.

`choose_chunk_len` makes the chunking call with the cost model below (instruction counts read from the
kernels' cubins; rates [est.]), which prices every dependent step as the kernels run it, for a row whose
band fills the table at every frame: a sweep step is ``n_tiles`` tiles of BLOCK_S, and the boundary
kernel (grid (B, 2)) runs ``n_tiles`` dependent tiles of BLOCK_X per chunk, each waiting on its global
loads, so its depth is n_chunks x tiles. ``row_depth`` counts the same tiles from a row's own band at
every frame. benchmarks/results/static_triton.md lists the plan, its tiles, its sequential depth, the
calibration and the predictions per SPEC §6 shape.
MDLM_CTC_LATTICE_CHUNK=<L> (0 = one chunk) overrides it.

Rejected alternative: splitting one row's band across CTAs that exchange edge states every step
through global flags. It needs spin-waits on other CTAs (forward progress only with co-residency or
ticket ordering, a memory-model argument the interpreter cannot check), and a flag round trip per
step costs more than the step itself unless the pipeline runs many steps ahead.

Extra memory: alpha and beta 2 * B * (T+1) * S * 4 bytes, transfer ~B * T * S * 4 * D/L bytes
(G1: ~50 MB in all, 1.2% of the bf16 logits; G2 standard: ~0.55 GB, 13%).

Measurements: none on a GPU yet. Everything here was verified under TRITON_INTERPRET=1 against the
reference (tests/test_slack_ctc_triton.py, with chunking forced to L = 2, 3 at tiny T) and compiled for
sm_90 to check that it lowers. The cost model prices the instructions the compiler emitted: SASS counts
per tile and per step read from the sm_90 cubins of every config (SASS_TILE, SASS_STEP, fitted by
benchmarks/static_triton.py --calibrate; 61 and 100 instructions per element of a transfer tile, preserve
and standard). An earlier model priced only the special-function work and put G2 standard at 0.85 ms;
from the instruction counts it predicts ~4.3 ms (transfer ~1.7 ms, boundary ~2.1 ms), which is why
``backend="auto"`` runs the CUDA lattice there (``mdlm_ctc/lattice_cost.py``). The issue rate and
STEP_US are estimates; the GPU check (benchmarks/gpu_run.py) records every measured lattice row beside
its prediction, and its sweep of L over {0, 7, 15, 31, 63} at the G1/G2/G3 shapes is what fixes them.

Numerics: the chunked and single-chunk paths agree to fp32 rounding (the scan only reassociates
log-sum-exps); both are deterministic run to run. float64 tables are handed to
``mdlm_ctc.reference.lattice_band_reference`` (float64 stays the oracle's business).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .emissions import device_guard, interpreted, sm_count, small_blocks
from .logspace import NAN, NEG_INF, POS_INF, logaddexp, logaddexp3, logsumexp_axis1

PRESERVE, STANDARD = 0, 1


# ---------------------------------------------------------------------------------------------
# bands and transition weights (lattice.h)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _state_band(t, T_b, U_b, max_shift, S, MODE: tl.constexpr):
    """Inclusive [lo, hi] of the states after frame t that lie on a complete path (empty: lo > hi)."""
    if MODE == 0:
        lo = tl.maximum(U_b - (T_b - t), 0)
        lo = tl.where(max_shift >= 0, tl.maximum(lo, tl.minimum(t - max_shift, U_b)), lo)
        hi = tl.minimum(t, U_b)
    else:
        lo = tl.maximum(2 * (U_b - T_b + t) - 1, 0)
        hi = tl.minimum(2 * U_b, tl.maximum(2 * t - 1, 0))
    hi = tl.minimum(hi, lo + S - 1)  # a too-narrow table (unvalidated input) stays in bounds
    return lo, hi


@triton.jit
def _column_band(t, T_b, U_b, max_shift, W):
    """Inclusive [c_lo, c_hi] of the target columns stored for frame t (column_lo / column_hi)."""
    c_lo = tl.maximum(U_b - T_b + t, 1)
    c_lo = tl.where(max_shift >= 0, tl.maximum(c_lo, t - max_shift), c_lo)
    c_hi = tl.minimum(tl.minimum(t, U_b), c_lo + W - 1)
    return c_lo, c_hi


@triton.jit
def _target_emission(table_row, u, c_lo, c_hi, mask):
    """e_t(y_u) from frame t's table row; -inf where the column is not stored (never on a path)."""
    ok = mask & (u >= c_lo) & (u <= c_hi)
    return tl.load(table_row + (u - c_lo), mask=ok, other=NEG_INF)


@triton.jit
def _standard_weights(x, mask, table_row, c_lo, c_hi, e_k, targets_row, U_b):
    """Standard lattice at states x: (emission e_t(l'_x), whether the skip x-2 -> x is allowed)."""
    is_label = (x % 2) == 1
    u = (x + 1) // 2
    em = tl.where(is_label, _target_emission(table_row, u, c_lo, c_hi, mask & is_label), e_k)
    has_prev = mask & is_label & (u >= 2) & (u <= U_b)
    y_u = tl.load(targets_row + (u - 1), mask=has_prev, other=0)
    y_prev = tl.load(targets_row + (u - 2), mask=has_prev, other=0)
    return em, has_prev & (y_u != y_prev)


@triton.jit
def _load_band(row_ptr, x, lo, hi, mask):
    """A stored lattice row at states x (band-relative storage); -inf outside its band."""
    return tl.load(row_ptr + (x - lo), mask=mask & (x >= lo) & (x <= hi), other=NEG_INF)


@triton.jit
def _store_initial_alpha(alpha_row, lo, hi, feasible):
    """alpha_0: 0 at state 0 (when it is in the band), the only state of frame 0."""
    tl.store(alpha_row, 0.0, mask=feasible & (lo == 0) & (hi >= 0))


@triton.jit
def _store_final_beta(beta_row, lo, hi, U_b, feasible, MODE: tl.constexpr):
    """beta_{T_b}: 0 at the final states (preserve U; standard 2U and 2U-1), over a band <= 2 wide."""
    x = lo + tl.arange(0, 2)
    if MODE == 0:
        final = x == U_b
    else:
        final = (x == 2 * U_b) | ((x == 2 * U_b - 1) & (U_b > 0))
    tl.store(beta_row + (x - lo), tl.where(final, 0.0, NEG_INF), mask=feasible & (x <= hi))


@triton.jit
def _n_tiles(lo, hi, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """Tiles of BLOCK states over the band [lo, hi] when the last tile also takes up to TAIL states past
    its end (a band of 2^k + 1 states is one tile of 2^k and a tail, not two tiles): 0 for an empty band."""
    extra = tl.maximum(hi - lo + 1 - TAIL, 0)
    return tl.where(hi >= lo, tl.maximum((extra + BLOCK - 1) // BLOCK, 1), 0)


@triton.jit
def _alpha_tile(prev_row, lo_p, hi_p, cur_row, lo_t, x, mask, table_row, c_lo, c_hi, e_k, targets_row, U_b,
                MODE: tl.constexpr):
    """alpha_t at states x (stored where mask) from alpha_{t-1} (stored)."""
    a0 = _load_band(prev_row, x, lo_p, hi_p, mask)
    a1 = _load_band(prev_row, x - 1, lo_p, hi_p, mask)
    if MODE == 0:
        w_advance = _target_emission(table_row, x, c_lo, c_hi, mask & (x >= 1))
        new = logaddexp(a0 + e_k, a1 + w_advance)
    else:
        a2 = _load_band(prev_row, x - 2, lo_p, hi_p, mask)
        em, skip = _standard_weights(x, mask, table_row, c_lo, c_hi, e_k, targets_row, U_b)
        new = logaddexp3(a0, a1, tl.where(skip, a2, NEG_INF)) + em
    tl.store(cur_row + (x - lo_t), new, mask=mask)


@triton.jit
def _alpha_step(prev_row, lo_p, hi_p, cur_row, lo_t, hi_t, table_row, c_lo, c_hi, e_k, targets_row, U_b,
                MODE: tl.constexpr, BLOCK_S: tl.constexpr, TAIL: tl.constexpr):
    """alpha_t over its band from alpha_{t-1} (stored), in tiles of BLOCK_S states, the last with a tail."""
    offs = tl.arange(0, BLOCK_S)
    if TAIL == 0:
        for x0 in range(lo_t, hi_t + 1, BLOCK_S):
            x = x0 + offs
            _alpha_tile(prev_row, lo_p, hi_p, cur_row, lo_t, x, x <= hi_t, table_row, c_lo, c_hi, e_k, targets_row,
                        U_b, MODE)
    else:
        n_tiles = _n_tiles(lo_t, hi_t, BLOCK_S, TAIL)
        x_tail = lo_t + n_tiles * BLOCK_S + tl.arange(0, TAIL)
        for k in range(0, n_tiles):
            x = lo_t + k * BLOCK_S + offs
            _alpha_tile(prev_row, lo_p, hi_p, cur_row, lo_t, x, x <= hi_t, table_row, c_lo, c_hi, e_k, targets_row,
                        U_b, MODE)
            _alpha_tile(prev_row, lo_p, hi_p, cur_row, lo_t, x_tail, (x_tail <= hi_t) & (k == n_tiles - 1),
                        table_row, c_lo, c_hi, e_k, targets_row, U_b, MODE)


@triton.jit
def _beta_tile(next_row, lo_t, hi_t, cur_row, lo_p, x, mask, table_row, c_lo, c_hi, e_k, targets_row, U_b,
               MODE: tl.constexpr):
    """beta_{t-1} at states x (stored where mask) from beta_t (stored) and frame t's weights."""
    n0 = _load_band(next_row, x, lo_t, hi_t, mask)
    n1 = _load_band(next_row, x + 1, lo_t, hi_t, mask)
    if MODE == 0:
        w_advance = _target_emission(table_row, x + 1, c_lo, c_hi, mask)
        new = logaddexp(n0 + e_k, n1 + w_advance)
    else:
        n2 = _load_band(next_row, x + 2, lo_t, hi_t, mask)
        em0, skip0 = _standard_weights(x, mask, table_row, c_lo, c_hi, e_k, targets_row, U_b)
        em1, skip1 = _standard_weights(x + 1, mask, table_row, c_lo, c_hi, e_k, targets_row, U_b)
        em2, skip2 = _standard_weights(x + 2, mask, table_row, c_lo, c_hi, e_k, targets_row, U_b)
        new = logaddexp3(n0 + em0, n1 + em1, tl.where(skip2, n2 + em2, NEG_INF))
    tl.store(cur_row + (x - lo_p), new, mask=mask)


@triton.jit
def _beta_step(next_row, lo_t, hi_t, cur_row, lo_p, hi_p, table_row, c_lo, c_hi, e_k, targets_row, U_b,
               MODE: tl.constexpr, BLOCK_S: tl.constexpr, TAIL: tl.constexpr):
    """beta_{t-1} over its band from beta_t (stored) and frame t's weights, tiled as ``_alpha_step``."""
    offs = tl.arange(0, BLOCK_S)
    if TAIL == 0:
        for x0 in range(lo_p, hi_p + 1, BLOCK_S):
            x = x0 + offs
            _beta_tile(next_row, lo_t, hi_t, cur_row, lo_p, x, x <= hi_p, table_row, c_lo, c_hi, e_k, targets_row,
                       U_b, MODE)
    else:
        n_tiles = _n_tiles(lo_p, hi_p, BLOCK_S, TAIL)
        x_tail = lo_p + n_tiles * BLOCK_S + tl.arange(0, TAIL)
        for k in range(0, n_tiles):
            x = lo_p + k * BLOCK_S + offs
            _beta_tile(next_row, lo_t, hi_t, cur_row, lo_p, x, x <= hi_p, table_row, c_lo, c_hi, e_k, targets_row,
                       U_b, MODE)
            _beta_tile(next_row, lo_t, hi_t, cur_row, lo_p, x_tail, (x_tail <= hi_p) & (k == n_tiles - 1),
                       table_row, c_lo, c_hi, e_k, targets_row, U_b, MODE)


@triton.jit
def _row_lengths(input_lengths_ptr, target_lengths_ptr, b, T, U_max):
    T_b = tl.minimum(tl.maximum(tl.load(input_lengths_ptr + b).to(tl.int64), 0), T)
    U_b = tl.minimum(tl.maximum(tl.load(target_lengths_ptr + b).to(tl.int64), 0), U_max)
    return T_b, U_b


# ---------------------------------------------------------------------------------------------
# phase A: the transfer matrix of every chunk (fully parallel)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _transfer_kernel(
    # pointers
    table_ptr, special_ptr, targets_ptr, input_lengths_ptr, target_lengths_ptr, transfer_ptr,
    # sizes
    T, W, U_max, S, n_chunks, chunk_len, max_shift,
    # strides
    stride_targets_b,
    # meta
    MODE: tl.constexpr, D: tl.constexpr, TILE_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2).to(tl.int64)
    T_b, U_b = _row_lengths(input_lengths_ptr, target_lengths_ptr, b, T, U_max)
    t_c = c * chunk_len
    t_e = tl.minimum(t_c + chunk_len, T_b)
    active = (t_c < T_b) & (U_b <= T_b)
    lo_c, hi_c = _state_band(t_c, T_b, U_b, max_shift, S, MODE)
    i = tile * TILE_I + tl.arange(0, TILE_I)
    x_in = lo_c + i
    d = tl.arange(0, BLOCK_D)
    tile_ok = (active & (x_in <= hi_c))[:, None] & (d < D)[None, :]
    ptrs = transfer_ptr + ((b * n_chunks + c) * S) * D + i[:, None] * D + d[None, :]
    cur = tl.where(tile_ok & (d == 0)[None, :], 0.0, NEG_INF)  # the identity: each state stays put
    tl.store(ptrs, cur, mask=tile_ok)
    tl.debug_barrier()

    table_b = table_ptr + b * T * W
    targets_row = targets_ptr + b * stride_targets_b
    x = x_in[:, None] + d[None, :]  # the state reached from x_in after an advance of d
    n_steps = tl.where(active, t_e - t_c, 0)
    for step in range(0, n_steps):
        t = t_c + 1 + step
        lo_t, hi_t = _state_band(t, T_b, U_b, max_shift, S, MODE)
        c_lo, c_hi = _column_band(t, T_b, U_b, max_shift, W)
        table_row = table_b + (t - 1) * W
        e_k = tl.load(special_ptr + b * T + (t - 1))
        in_band = tile_ok & (x >= lo_t) & (x <= hi_t)
        p1 = tl.load(ptrs - 1, mask=tile_ok & (d >= 1)[None, :], other=NEG_INF)
        if MODE == 0:
            w_advance = _target_emission(table_row, x, c_lo, c_hi, in_band & (x >= 1))
            new = logaddexp(cur + e_k, p1 + w_advance)
        else:
            p2 = tl.load(ptrs - 2, mask=tile_ok & (d >= 2)[None, :], other=NEG_INF)
            em, skip = _standard_weights(x, in_band, table_row, c_lo, c_hi, e_k, targets_row, U_b)
            new = logaddexp3(cur, p1, tl.where(skip, p2, NEG_INF)) + em
        new = tl.where(in_band, new, NEG_INF)
        tl.debug_barrier()  # every lane has read this step's neighbours before any is overwritten
        tl.store(ptrs, new, mask=tile_ok)
        tl.debug_barrier()  # and the new values are visible to the next step's neighbour loads
        cur = new


# ---------------------------------------------------------------------------------------------
# phase B: alpha and beta at the chunk boundaries (a log-semiring scan over the transfers)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _boundary_alpha_tile(x, mask, d, d_ok, transfer_c, alpha_c, lo_c, hi_c, alpha_e, lo_e, D: tl.constexpr):
    """alpha_{t_e}(x) = logsumexp_d transfer_c[x - d][d] + alpha_{t_c}(x - d) at states x (stored where mask)."""
    i = x[:, None] - d[None, :] - lo_c
    ok = mask[:, None] & d_ok & (i >= 0) & (i <= hi_c - lo_c)
    weight = tl.load(transfer_c + i * D + d[None, :], mask=ok, other=NEG_INF)
    start = tl.load(alpha_c + i, mask=ok, other=NEG_INF)
    tl.store(alpha_e + (x - lo_e), logsumexp_axis1(weight + start), mask=mask)


@triton.jit
def _boundary_beta_tile(x, mask, d, d_ok, transfer_c, beta_c, lo_c, beta_e, lo_e, hi_e, D: tl.constexpr):
    """beta_{t_c}(x) = logsumexp_d transfer_c[x][d] + beta_{t_e}(x + d) at states x (stored where mask)."""
    y = x[:, None] + d[None, :]
    ok = mask[:, None] & d_ok & (y >= lo_e) & (y <= hi_e)
    weight = tl.load(transfer_c + (x - lo_c)[:, None] * D + d[None, :], mask=ok, other=NEG_INF)
    end = tl.load(beta_e + (y - lo_e), mask=ok, other=NEG_INF)
    tl.store(beta_c + (x - lo_c), logsumexp_axis1(weight + end), mask=mask)


@triton.jit
def _boundary_kernel(
    # pointers
    input_lengths_ptr, target_lengths_ptr, transfer_ptr, alpha_ptr, beta_ptr,
    # sizes
    T, U_max, S, n_chunks, chunk_len, max_shift,
    # meta
    MODE: tl.constexpr, D: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    direction = tl.program_id(1)
    T_b, U_b = _row_lengths(input_lengths_ptr, target_lengths_ptr, b, T, U_max)
    feasible = U_b <= T_b
    n_active = tl.where(feasible, (T_b + chunk_len - 1) // chunk_len, 0)
    offs = tl.arange(0, BLOCK_X)
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < D)[None, :]
    transfer_b = transfer_ptr + (b * n_chunks) * S * D
    # Each chunk is n_tiles dependent tiles of BLOCK_X states; the last also takes the band's last
    # <= TAIL states (a band of 2^k + 1 states costs the tiles of 2^k, see _n_tiles).
    if direction == 0:
        alpha_b = alpha_ptr + b * (T + 1) * S
        lo_0, hi_0 = _state_band(0, T_b, U_b, max_shift, S, MODE)
        _store_initial_alpha(alpha_b, lo_0, hi_0, feasible)
        tl.debug_barrier()
        for c in range(0, n_active):
            t_c = c * chunk_len
            t_e = tl.minimum(t_c + chunk_len, T_b)
            lo_c, hi_c = _state_band(t_c, T_b, U_b, max_shift, S, MODE)
            lo_e, hi_e = _state_band(t_e, T_b, U_b, max_shift, S, MODE)
            transfer_c = transfer_b + c * S * D
            if TAIL == 0:
                for x0 in range(lo_e, hi_e + 1, BLOCK_X):
                    x = x0 + offs
                    _boundary_alpha_tile(x, x <= hi_e, d, d_ok, transfer_c, alpha_b + t_c * S, lo_c, hi_c,
                                         alpha_b + t_e * S, lo_e, D)
            else:
                n_tiles = _n_tiles(lo_e, hi_e, BLOCK_X, TAIL)
                x_tail = lo_e + n_tiles * BLOCK_X + tl.arange(0, TAIL)
                for k in range(0, n_tiles):
                    x = lo_e + k * BLOCK_X + offs
                    _boundary_alpha_tile(x, x <= hi_e, d, d_ok, transfer_c, alpha_b + t_c * S, lo_c, hi_c,
                                         alpha_b + t_e * S, lo_e, D)
                    _boundary_alpha_tile(x_tail, (x_tail <= hi_e) & (k == n_tiles - 1), d, d_ok, transfer_c,
                                         alpha_b + t_c * S, lo_c, hi_c, alpha_b + t_e * S, lo_e, D)
            tl.debug_barrier()
    else:
        beta_b = beta_ptr + b * (T + 1) * S
        lo_T, hi_T = _state_band(T_b, T_b, U_b, max_shift, S, MODE)
        _store_final_beta(beta_b + T_b * S, lo_T, hi_T, U_b, feasible, MODE)
        tl.debug_barrier()
        for j in range(0, n_active - 1):  # chunks n_active-1 .. 1 (beta_0 is never needed)
            c = n_active - 1 - j
            t_c = c * chunk_len
            t_e = tl.minimum(t_c + chunk_len, T_b)
            lo_c, hi_c = _state_band(t_c, T_b, U_b, max_shift, S, MODE)
            lo_e, hi_e = _state_band(t_e, T_b, U_b, max_shift, S, MODE)
            transfer_c = transfer_b + c * S * D
            if TAIL == 0:
                for x0 in range(lo_c, hi_c + 1, BLOCK_X):
                    x = x0 + offs
                    _boundary_beta_tile(x, x <= hi_c, d, d_ok, transfer_c, beta_b + t_c * S, lo_c,
                                        beta_b + t_e * S, lo_e, hi_e, D)
            else:
                n_tiles = _n_tiles(lo_c, hi_c, BLOCK_X, TAIL)
                x_tail = lo_c + n_tiles * BLOCK_X + tl.arange(0, TAIL)
                for k in range(0, n_tiles):
                    x = lo_c + k * BLOCK_X + offs
                    _boundary_beta_tile(x, x <= hi_c, d, d_ok, transfer_c, beta_b + t_c * S, lo_c,
                                        beta_b + t_e * S, lo_e, hi_e, D)
                    _boundary_beta_tile(x_tail, (x_tail <= hi_c) & (k == n_tiles - 1), d, d_ok, transfer_c,
                                        beta_b + t_c * S, lo_c, beta_b + t_e * S, lo_e, hi_e, D)
            tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# phase C: alpha and beta inside every chunk (one chunk = the whole row when not chunked)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _sweep_kernel(
    # pointers
    table_ptr, special_ptr, targets_ptr, input_lengths_ptr, target_lengths_ptr, alpha_ptr, beta_ptr,
    # sizes
    T, W, U_max, S, chunk_len, max_shift,
    # strides
    stride_targets_b,
    # meta
    MODE: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_S: tl.constexpr, TAIL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    direction = tl.program_id(2)
    T_b, U_b = _row_lengths(input_lengths_ptr, target_lengths_ptr, b, T, U_max)
    feasible = U_b <= T_b
    t_c = c * chunk_len
    t_e = tl.minimum(t_c + chunk_len, T_b)
    table_b = table_ptr + b * T * W
    special_b = special_ptr + b * T
    targets_row = targets_ptr + b * stride_targets_b
    # Rows computed here: the chunk's interior t_c < t < t_e. The boundary rows t_c and t_e come
    # from phase B (chunked; rewriting them here would race with the neighbouring chunk's reads) or
    # are the initial rows, written here (one chunk: alpha_0 .. alpha_{T_b} and beta_{T_b} .. beta_1).
    n_interior = tl.where(feasible & (t_c < T_b), t_e - t_c - 1, 0)
    if direction == 0:
        alpha_b = alpha_ptr + b * (T + 1) * S
        n_steps = n_interior
        if not CHUNKED:
            lo_0, hi_0 = _state_band(0, T_b, U_b, max_shift, S, MODE)
            _store_initial_alpha(alpha_b, lo_0, hi_0, feasible)
            tl.debug_barrier()
            n_steps = tl.where(feasible, T_b, 0)
        for step in range(0, n_steps):
            t = t_c + 1 + step
            lo_p, hi_p = _state_band(t - 1, T_b, U_b, max_shift, S, MODE)
            lo_t, hi_t = _state_band(t, T_b, U_b, max_shift, S, MODE)
            c_lo, c_hi = _column_band(t, T_b, U_b, max_shift, W)
            e_k = tl.load(special_b + (t - 1))
            _alpha_step(alpha_b + (t - 1) * S, lo_p, hi_p, alpha_b + t * S, lo_t, hi_t, table_b + (t - 1) * W,
                        c_lo, c_hi, e_k, targets_row, U_b, MODE, BLOCK_S, TAIL)
            tl.debug_barrier()
    else:
        beta_b = beta_ptr + b * (T + 1) * S
        if not CHUNKED:
            lo_T, hi_T = _state_band(T_b, T_b, U_b, max_shift, S, MODE)
            _store_final_beta(beta_b + T_b * S, lo_T, hi_T, U_b, feasible, MODE)
            tl.debug_barrier()
        for step in range(0, n_interior):
            t = t_e - step  # beta_{t-1} from beta_t
            lo_t, hi_t = _state_band(t, T_b, U_b, max_shift, S, MODE)
            lo_p, hi_p = _state_band(t - 1, T_b, U_b, max_shift, S, MODE)
            c_lo, c_hi = _column_band(t, T_b, U_b, max_shift, W)
            e_k = tl.load(special_b + (t - 1))
            _beta_step(beta_b + t * S, lo_t, hi_t, beta_b + (t - 1) * S, lo_p, hi_p, table_b + (t - 1) * W,
                       c_lo, c_hi, e_k, targets_row, U_b, MODE, BLOCK_S, TAIL)
            tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# the loss, and the posteriors (in place over the table)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _loss_kernel(
    # pointers
    special_ptr, input_lengths_ptr, target_lengths_ptr, alpha_ptr, nll_ptr,
    # sizes
    T, U_max, S, max_shift,
    # meta
    MODE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    T_b, U_b = _row_lengths(input_lengths_ptr, target_lengths_ptr, b, T, U_max)
    feasible = U_b <= T_b
    offs = tl.arange(0, BLOCK_T)
    nan_count = tl.zeros([], dtype=tl.int32)
    for t0 in range(0, T_b, BLOCK_T):
        e_k = tl.load(special_ptr + b * T + t0 + offs, mask=t0 + offs < T_b, other=0.0)
        nan_count += tl.sum((e_k != e_k).to(tl.int32), axis=0)
    lo, hi = _state_band(T_b, T_b, U_b, max_shift, S, MODE)
    final_row = alpha_ptr + b * (T + 1) * S + T_b * S
    if MODE == 0:
        loglik = tl.load(final_row + (U_b - lo), mask=feasible & (U_b >= lo) & (U_b <= hi), other=NEG_INF)
    else:
        end_blank = tl.load(final_row + (2 * U_b - lo), mask=feasible & (2 * U_b >= lo) & (2 * U_b <= hi),
                            other=NEG_INF)
        end_label = tl.load(final_row + (2 * U_b - 1 - lo),
                            mask=feasible & (U_b > 0) & (2 * U_b - 1 >= lo) & (2 * U_b - 1 <= hi), other=NEG_INF)
        loglik = logaddexp(end_blank, end_label)
    nll = tl.where(loglik == NEG_INF, POS_INF, -loglik)
    nll = tl.where(nan_count > 0, NAN, nll)
    tl.store(nll_ptr + b, nll)


@triton.jit
def _stay_terms(x, mask, alpha_prev, lo_p, hi_p, beta_cur, lo_t, hi_t, e_k, loglik):
    """Preserve: exp(alpha_{t-1}(x) + e_t(k) + beta_t(x) - loglik) at states x, 0 where not mask."""
    a = _load_band(alpha_prev, x, lo_p, hi_p, mask)
    n = _load_band(beta_cur, x, lo_t, hi_t, mask)
    return tl.exp(a + e_k + n - loglik)


@triton.jit
def _blank_terms(x, mask, alpha_cur, beta_cur, lo_t, hi_t, loglik):
    """Standard: exp(alpha_t(x) + beta_t(x) - loglik) at (blank) states x, 0 where not mask."""
    a = _load_band(alpha_cur, x, lo_t, hi_t, mask)
    n = _load_band(beta_cur, x, lo_t, hi_t, mask)
    return tl.exp(a + n - loglik)


@triton.jit
def _posterior_kernel(
    # pointers
    table_ptr, special_ptr, input_lengths_ptr, target_lengths_ptr, alpha_ptr, beta_ptr, nll_ptr,
    # sizes
    T, W, U_max, S, max_shift,
    # meta
    MODE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr, TAIL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T + 1  # the lattice's frame (1-based)
    T_b, U_b = _row_lengths(input_lengths_ptr, target_lengths_ptr, b, T, U_max)
    nll = tl.load(nll_ptr + b)
    nan_row = nll != nll
    live = (t <= T_b) & (nll < POS_INF) & (nll == nll)
    loglik = tl.where(live, -nll, 0.0)
    table_row = table_ptr + row * W
    e_k = tl.load(special_ptr + row)
    alpha_b = alpha_ptr + b * (T + 1) * S
    beta_b = beta_ptr + b * (T + 1) * S
    lo_p, hi_p = _state_band(t - 1, T_b, U_b, max_shift, S, MODE)
    lo_t, hi_t = _state_band(t, T_b, U_b, max_shift, S, MODE)
    offs_s = tl.arange(0, BLOCK_S)

    # the special token: a sum over states, in tiles of BLOCK_S whose last also takes <= TAIL states
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_tail = tl.zeros([], dtype=tl.float32)
    if MODE == 0:  # stay moves u -> u at frame t: alpha_{t-1}(u) + e_t(k) + beta_t(u)
        x_lo = tl.maximum(lo_p, lo_t)
        x_hi = tl.where(live, tl.minimum(hi_p, hi_t), x_lo - 1)
        if TAIL == 0:
            for x0 in range(x_lo, x_hi + 1, BLOCK_S):
                x = x0 + offs_s
                acc += _stay_terms(x, x <= x_hi, alpha_b + (t - 1) * S, lo_p, hi_p, beta_b + t * S, lo_t, hi_t, e_k,
                                   loglik)
        else:
            n_tiles = _n_tiles(x_lo, x_hi, BLOCK_S, TAIL)
            x_tail = x_lo + n_tiles * BLOCK_S + tl.arange(0, TAIL)
            for k in range(0, n_tiles):
                x = x_lo + k * BLOCK_S + offs_s
                acc += _stay_terms(x, x <= x_hi, alpha_b + (t - 1) * S, lo_p, hi_p, beta_b + t * S, lo_t, hi_t, e_k,
                                   loglik)
                acc_tail += tl.sum(_stay_terms(x_tail, (x_tail <= x_hi) & (k == n_tiles - 1), alpha_b + (t - 1) * S,
                                               lo_p, hi_p, beta_b + t * S, lo_t, hi_t, e_k, loglik), axis=0)
    else:  # blank states (even s) at frame t: alpha_t(s) + beta_t(s)
        x_first = lo_t + (lo_t % 2)
        n_blank = tl.where(live & (hi_t >= x_first), (hi_t - x_first) // 2 + 1, 0)
        if TAIL == 0:
            for k0 in range(0, n_blank, BLOCK_S):
                j = k0 + offs_s
                acc += _blank_terms(x_first + 2 * j, j < n_blank, alpha_b + t * S, beta_b + t * S, lo_t, hi_t,
                                    loglik)
        else:
            n_tiles = _n_tiles(0, n_blank - 1, BLOCK_S, TAIL)
            j_tail = n_tiles * BLOCK_S + tl.arange(0, TAIL)
            for k in range(0, n_tiles):
                j = k * BLOCK_S + offs_s
                acc += _blank_terms(x_first + 2 * j, j < n_blank, alpha_b + t * S, beta_b + t * S, lo_t, hi_t,
                                    loglik)
                acc_tail += tl.sum(_blank_terms(x_first + 2 * j_tail, (j_tail < n_blank) & (k == n_tiles - 1),
                                                alpha_b + t * S, beta_b + t * S, lo_t, hi_t, loglik), axis=0)
    acc_sum = tl.sum(acc, axis=0) + acc_tail
    post_special = tl.where(live, acc_sum, tl.where(nan_row, NAN, 0.0))

    # the target columns, in the table's layout
    c_lo, c_hi = _column_band(t, T_b, U_b, max_shift, W)
    width = tl.where(live, tl.minimum(tl.maximum(c_hi - c_lo + 1, 0), W), 0)
    offs_w = tl.arange(0, BLOCK_W)
    for j0 in range(0, W, BLOCK_W):
        j = j0 + offs_w
        ok = j < width
        u = c_lo + j
        if MODE == 0:  # advance u-1 -> u at frame t
            e = tl.load(table_row + j, mask=ok, other=NEG_INF)
            a = _load_band(alpha_b + (t - 1) * S, u - 1, lo_p, hi_p, ok)
            n = _load_band(beta_b + t * S, u, lo_t, hi_t, ok)
            post = tl.exp(a + e + n - loglik)
        else:  # label state s = 2u - 1
            a = _load_band(alpha_b + t * S, 2 * u - 1, lo_t, hi_t, ok)
            n = _load_band(beta_b + t * S, 2 * u - 1, lo_t, hi_t, ok)
            post = tl.exp(a + n - loglik)
        post = tl.where(ok, post, tl.where(nan_row, NAN, 0.0))
        tl.debug_barrier()  # the tile's emissions are read before any lane overwrites them
        tl.store(table_row + j, post, mask=j < W)
    tl.debug_barrier()
    tl.store(special_ptr + row, post_special)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------

# Cost model of the lattice (chunk length, predictions), calibrated on the kernels' sm_90 instruction counts
# [est. until the H200 sweep: the SASS counts are read from the cubins, the issue rate and latencies are not
# measured]. SASS_TILE: instructions one warp issues per tile of a step, a + b * (elements per thread, at
# least 1) + c where the tile takes a tail; SASS_STEP: instructions per dependent step beyond its tiles
# (boundary: per chunk; sweep: per frame); SASS_POSTERIOR: per posterior program, a + b * elements per
# thread. Least-squares fits over every config ``lattice_configs`` can give (benchmarks/static_triton.py
# --calibrate; the report's calibration table compares them with the counts at the SPEC §6 shapes).
SASS_TILE = {("transfer", 0): (53, 61, 0), ("transfer", 1): (40, 100, 0),
             ("boundary", 0): (74, 35, 70), ("boundary", 1): (93, 49, 1),
             ("sweep", 0): (6, 78, 63), ("sweep", 1): (-15, 170, 141)}
SASS_STEP = {("boundary", 0): 169, ("boundary", 1): 209, ("sweep", 0): 131, ("sweep", 1): 199}
SASS_WIDE_D = {("boundary", 1): 2.0}  # the per-element term from BLOCK_D = 128 (chunk lengths only the sweep or
# MDLM_CTC_LATTICE_CHUNK reach): the standard boundary tile counted 1,333-1,844 at 16 elements per thread
SASS_POSTERIOR = (500, 60)
CLOCK_GHZ = 1.98          # sm_90 boost clock (H100 SXM, H200)
SCHEDULERS = 4            # warp schedulers per SM, one instruction issued per clock each
STEP_US = 0.3             # [est.] a dependent step's store, bar.sync and L2 load of the row it wrote
LAUNCH_US = 4.0           # [est.] one extra kernel launch
BANDWIDTH_TBS = 4.8       # H200: the posterior pass reads alpha and beta
PRESERVE_CHUNKS = (15, 31, 63)  # transfer widths D = L + 1 = 16, 32, 64
STANDARD_CHUNKS = (7, 15, 31)   # D = 2L + 1 = 15, 31, 63


TAIL, SMALL_TAIL = 8, 2  # states the last tile of a sweep or boundary step takes past its BLOCK (``_n_tiles``)
# caps: sweep tile states (preserve, standard: its unchunked sweep spills at 4,096 + tail), boundary
# [BLOCK_X, BLOCK_D] lanes
SWEEP_STATES, BOUNDARY_LANES = (4096, 2048), 16384


def _transfer_width(mode: int, chunk_len: int) -> int:
    return chunk_len + 1 if mode == PRESERVE else 2 * chunk_len + 1


def n_tiles(states: int, block: int, tail: int) -> int:
    """Host mirror of ``_n_tiles``: dependent tiles one lattice step runs over a band of ``states``."""
    if states <= 0:
        return 0
    return max(1, -(-max(states - tail, 0) // block))


def tile_plan(S: int, cap: int, tail: int) -> tuple[int, int]:
    """(BLOCK, TAIL) of a lattice step over bands of up to S states: the fewest tiles any power of two
    <= cap gives when the last tile may take up to ``tail`` more states, at the smallest such BLOCK (not
    under 4 x ``tail`` unless the band is); TAIL = ``tail`` where that saves a tile, else 0 (no tail code
    is compiled). A band of 2^k + r states, r <= tail, is the tiles of 2^k (G1: 257 states in 256 + 8,
    not 512 or 256 + 256; G2 standard: 2,049 in 2,048 + 8 for the sweep, 2 x 1,024 + 8 for the boundary
    kernel)."""
    block = max(1, min(triton.next_power_of_2(S), cap))
    fewest = n_tiles(S, block, tail)
    while block > 4 * tail and n_tiles(S, block // 2, tail) == fewest:  # a tail well under its tile
        block //= 2
    return block, (tail if n_tiles(S, block, 0) > fewest else 0)


def _sweep_plan(S: int, mode: int, *, small: bool = False) -> tuple[int, int]:
    return tile_plan(S, 4 if small else SWEEP_STATES[mode], SMALL_TAIL if small else TAIL)


def _boundary_plan(S: int, block_d: int, *, small: bool = False) -> tuple[int, int]:
    """(BLOCK_X, TAIL) of the boundary kernel: the [BLOCK_X, BLOCK_D] tile within 16,384 lanes, 4,096 where
    BLOCK_D >= 128 (chunk lengths the cost model never picks, but the benchmark's sweep and
    MDLM_CTC_LATTICE_CHUNK can: standard at L = 63 is D = 127, which spilled 1,504 B at 16,384 lanes and
    takes 252 registers at 8,192; 202 at 4,096), planned by ``tile_plan``; no spill at any chunk length the
    launcher or the sweep can use (benchmarks/results/static_triton.md)."""
    lanes = 4 if small else (BOUNDARY_LANES if block_d <= 64 else BOUNDARY_LANES // 4)
    return tile_plan(S, max(1, lanes // block_d), SMALL_TAIL if small else TAIL)


def _step_tiles(S: int, mode: int, chunk_len: int) -> tuple[int, int]:
    """(sweep tiles per step, boundary tiles per chunk) at the GPU's blocks for a band of S states."""
    sweep = n_tiles(S, *_sweep_plan(S, mode))
    if chunk_len == 0:
        return sweep, 0
    block_d = triton.next_power_of_2(_transfer_width(mode, chunk_len))
    return sweep, n_tiles(S, *_boundary_plan(S, block_d))


def sass_per_tile(kernel: str, mode: int, elements: float, tail: bool, block_d: int = 0) -> float:
    """The cost model's SASS instructions one warp issues per tile of ``kernel`` (``transfer``, ``boundary``,
    ``sweep``) with ``elements`` lanes per thread (fitted, see SASS_TILE; ``block_d``: the boundary tile's)."""
    a, b, c = SASS_TILE[kernel, mode]
    if block_d >= 128:
        b *= SASS_WIDE_D.get((kernel, mode), 1.0)
    return a + b * max(elements, 1.0) + (c if tail else 0)


def _warp_cycles(instructions: float, warps: int) -> float:
    """Cycles one SM takes to issue ``instructions`` in each of ``warps`` warps of one CTA."""
    return -(-warps // SCHEDULERS) * instructions


def _estimate_us(B: int, T: int, S: int, mode: int, chunk_len: int, n_sm: int, clock_ghz: float = CLOCK_GHZ) -> float:
    """Estimated time of alpha and beta (microseconds) for a row whose band fills the table (S states) at
    every frame, as the kernels run it (the posterior pass, the same either way, is :func:`posterior_us`).

    A dependent step costs the issue of its tiles' instructions by the CTA's warps on the SM's schedulers
    plus STEP_US; a fully parallel phase costs its instructions at the whole GPU's issue rate (at least its
    own critical path). One chunk: T sweep steps, alpha and beta side by side. Chunked: the transfer kernel
    (B x n_chunks x S/TILE_I programs of L steps, two barriers each), the boundary kernel (one CTA per row and
    direction: n_chunks chunks of ``n_tiles`` dependent tiles) and the sweep (L - 1 interior steps of every
    chunk, all chunks at once)."""
    cycles_us = clock_ghz * 1e3
    issue_rate = n_sm * SCHEDULERS * cycles_us  # warp-instructions per microsecond, whole GPU
    W = S - 1 if mode == PRESERVE else (S - 1) // 2
    configs = lattice_configs(T, max(W, 1), mode, chunk_len)
    sweep = configs["_sweep_kernel"]
    sweep_tiles = n_tiles(S, sweep["BLOCK_S"], sweep["TAIL"])
    sweep_instr = (sweep_tiles * sass_per_tile("sweep", mode, sweep["BLOCK_S"] / (32 * sweep["num_warps"]),
                                               sweep["TAIL"] > 0) + SASS_STEP["sweep", mode])
    sweep_step = _warp_cycles(sweep_instr, sweep["num_warps"]) / cycles_us + STEP_US
    waves = -(-2 * B // n_sm)  # one CTA per row and direction
    if chunk_len == 0:
        return waves * T * sweep_step
    L = chunk_len
    n_chunks = -(-T // L)
    transfer = configs["_transfer_kernel"]
    t_instr = sass_per_tile("transfer", mode, transfer["TILE_I"] * transfer["BLOCK_D"] / (32 * transfer["num_warps"]),
                            False)
    programs = B * n_chunks * -(-S // transfer["TILE_I"])
    transfer_us = max(programs * L * transfer["num_warps"] * t_instr / issue_rate,
                      L * (_warp_cycles(t_instr, transfer["num_warps"]) / cycles_us + 2 * STEP_US))
    boundary = configs["_boundary_kernel"]
    b_tiles = n_tiles(S, boundary["BLOCK_X"], boundary["TAIL"])
    b_instr = b_tiles * sass_per_tile("boundary", mode, boundary["BLOCK_X"] * boundary["BLOCK_D"] /
                                      (32 * boundary["num_warps"]), boundary["TAIL"] > 0, boundary["BLOCK_D"]) + \
        SASS_STEP["boundary", mode]
    boundary_us = waves * n_chunks * (_warp_cycles(b_instr, boundary["num_warps"]) / cycles_us + b_tiles * STEP_US)
    sweep_us = max((L - 1) * sweep_step, B * n_chunks * 2 * (L - 1) * sweep["num_warps"] * sweep_instr / issue_rate)
    return transfer_us + boundary_us + sweep_us + 2 * LAUNCH_US


def posterior_us(B: int, T: int, W: int, mode: int, n_sm: int, clock_ghz: float = CLOCK_GHZ,
                 bandwidth_tbs: float = BANDWIDTH_TBS) -> float:
    """Estimated time of the posterior pass (B x T programs, fully parallel): its instructions at the GPU's
    issue rate or its reads of alpha and beta at the bandwidth, whichever is longer."""
    S = W + 1 if mode == PRESERVE else 2 * W + 1
    posterior = lattice_configs(T, W, mode, 0)["_posterior_kernel"]
    a, b = SASS_POSTERIOR
    instructions = a + b * max(posterior["BLOCK_S"] / (32 * posterior["num_warps"]), 1.0)
    issue = B * T * posterior["num_warps"] * instructions / (n_sm * SCHEDULERS * clock_ghz * 1e3)
    return max(issue, 2 * B * T * S * 4 / (bandwidth_tbs * 1e6))


def sequential_depth(T: int, S: int, mode: int, chunk_len: int) -> int:
    """Dependent, barrier-separated tile steps on the lattice's critical path, for a row of T frames whose
    band fills the table (S states) at every frame: the bound the cost model prices. One chunk: T alpha
    steps (beta runs T - 1 beside it). Chunked: the transfer kernel's L steps of two barriers, the
    boundary kernel's n_chunks chunks of ``n_tiles`` tiles, the sweep's L - 1 interior steps."""
    sweep_tiles, boundary_tiles = _step_tiles(S, mode, chunk_len)
    if chunk_len == 0:
        return T * sweep_tiles
    n_chunks = -(-T // chunk_len)
    return 2 * chunk_len + n_chunks * boundary_tiles + (chunk_len - 1) * sweep_tiles


def state_band(t: int, T_b: int, U_b: int, max_shift: int, S: int, mode: int) -> tuple[int, int]:
    """Host mirror of ``_state_band`` (inclusive [lo, hi] of frame t's states)."""
    if mode == PRESERVE:
        lo = max(U_b - (T_b - t), 0)
        if max_shift >= 0:
            lo = max(lo, min(t - max_shift, U_b))
        hi = min(t, U_b)
    else:
        lo = max(2 * (U_b - T_b + t) - 1, 0)
        hi = min(2 * U_b, max(2 * t - 1, 0))
    return lo, min(hi, lo + S - 1)


def row_depth(T_b: int, U_b: int, S: int, mode: int, chunk_len: int, max_shift: int = -1) -> dict:
    """The tiles each lattice kernel's loops run one after another for one row (lengths T_b, U_b), counted
    from the row's band at every frame as the kernels count them (``_n_tiles``; GPU blocks): per kernel
    the dependent tile steps of its longest program, and ``total``, the critical path (the report's
    sequential depth). ``widest``: the widest band of any frame."""
    def tiles(t, plan):
        lo, hi = state_band(t, T_b, U_b, max_shift, S, mode)
        return n_tiles(hi - lo + 1, *plan)

    widest = max((lambda lo_hi: lo_hi[1] - lo_hi[0] + 1)(state_band(t, T_b, U_b, max_shift, S, mode))
                 for t in range(T_b + 1))
    block_s = _sweep_plan(S, mode)
    if U_b > T_b:
        return dict(transfer=0, boundary=0, sweep=0, total=0, widest=widest)
    if chunk_len == 0:
        alpha = sum(tiles(t, block_s) for t in range(1, T_b + 1))
        beta = sum(tiles(t - 1, block_s) for t in range(2, T_b + 1))
        return dict(transfer=0, boundary=0, sweep=max(alpha, beta), total=max(alpha, beta), widest=widest)
    block_x = _boundary_plan(S, triton.next_power_of_2(_transfer_width(mode, chunk_len)))
    starts = range(0, T_b, chunk_len)
    ends = [min(t_c + chunk_len, T_b) for t_c in starts]
    forward = sum(tiles(t_e, block_x) for t_e in ends)
    backward = sum(tiles(t_c, block_x) for t_c in starts if t_c > 0)
    sweep = max(max(sum(tiles(t, block_s) for t in range(t_c + 1, t_e)),
                    sum(tiles(t - 1, block_s) for t in range(t_c + 2, t_e + 1))) for t_c, t_e in zip(starts, ends))
    transfer = 2 * max(t_e - t_c for t_c, t_e in zip(starts, ends))
    boundary = max(forward, backward)
    return dict(transfer=transfer, boundary=boundary, sweep=sweep, total=transfer + boundary + sweep, widest=widest)


def choose_chunk_len(B: int, T: int, S: int, mode: int, n_sm: int) -> int:
    """Frames per chunk from the cost model, 0 for a single chunk (no override, no device)."""
    if T < 256:
        return 0
    candidates = (0,) + (PRESERVE_CHUNKS if mode == PRESERVE else STANDARD_CHUNKS)
    return min(candidates, key=lambda L: _estimate_us(B, T, S, mode, L, n_sm))


def _choose_chunk_len(B: int, T: int, S: int, mode: int, device: torch.device) -> int:
    """Frames per chunk, 0 for a single chunk: MDLM_CTC_LATTICE_CHUNK, else the cost model."""
    override = os.environ.get("MDLM_CTC_LATTICE_CHUNK")
    if override is not None:
        chunk_len = int(override)
        return chunk_len if 0 < chunk_len < T else 0
    if interpreted() or device.type != "cuda":
        return 0
    return choose_chunk_len(B, T, S, mode, sm_count(device.index if device.index is not None
                                                    else torch.cuda.current_device()))


def _sweep_warps(block: int) -> int:
    """At most 4 states per thread up to 16 warps: a sweep step is latency-bound (G2 standard: 2,048 + 8
    states at 16 warps, 110 registers; at 8 warps ~210, half the resident warps)."""
    return max(4, min(16, block // 128))


def lattice_configs(T: int, W: int, mode: int, chunk_len: int, *, small: bool = False) -> dict:
    """Meta (constexprs and num_warps) of every lattice kernel for a table of width W: one place for
    the launcher, the tests and benchmarks/static_triton.py. Chunked kernels only when chunk_len > 0."""
    S = W + 1 if mode == PRESERVE else 2 * W + 1
    block_s, tail_s = _sweep_plan(S, mode, small=small)
    tail = SMALL_TAIL if small else TAIL
    block_p, tail_p = tile_plan(W + 1, 4 if small else 1024, tail)  # posterior sums: <= W + 1 states
    configs = {
        "_sweep_kernel": dict(MODE=mode, CHUNKED=chunk_len > 0, BLOCK_S=block_s, TAIL=tail_s,
                              num_warps=_sweep_warps(block_s)),
        "_loss_kernel": dict(MODE=mode, BLOCK_T=min(triton.next_power_of_2(max(T, 1)), 4 if small else 1024),
                             num_warps=4),
        "_posterior_kernel": dict(MODE=mode, BLOCK_S=block_p, TAIL=tail_p,
                                  BLOCK_W=min(triton.next_power_of_2(max(W, 1)), 4 if small else 1024), num_warps=4),
    }
    if chunk_len > 0:
        D = _transfer_width(mode, chunk_len)
        block_d = triton.next_power_of_2(D)
        configs["_transfer_kernel"] = dict(
            MODE=mode, D=D, TILE_I=max(1, min(triton.next_power_of_2(S), (32 if small else 1024) // block_d)),
            BLOCK_D=block_d, num_warps=4)
        block_x, tail_x = _boundary_plan(S, block_d, small=small)
        configs["_boundary_kernel"] = dict(MODE=mode, D=D, BLOCK_X=block_x, BLOCK_D=block_d, TAIL=tail_x,
                                           num_warps=8)
    return configs


def lattice_band(table, special, targets, input_lengths, target_lengths, mode: int, max_shift: int, need_grad: bool,
                 *, chunk_len: int | None = None):
    """Stage 2 of the backend contract (``csrc/ops.cpp``): ``nll [B]``; with ``need_grad`` the posteriors
    overwrite ``table`` and ``special`` in place.

    ``chunk_len`` (keyword, for tests and benchmarks): frames per chunk of the time-parallel scan,
    0 for a single chunk, ``None`` to let ``_choose_chunk_len`` decide.
    """
    if table.dtype == torch.float64:
        from mdlm_ctc.reference import lattice_band_reference

        return lattice_band_reference(table, special, targets, input_lengths, target_lengths, mode, max_shift,
                                      need_grad)
    if table.dtype != torch.float32 or special.dtype != torch.float32:
        raise TypeError(f"lattice_band: table and special must be float32 (or float64); got {table.dtype} and "
                        f"{special.dtype}")
    B, T, W = table.shape
    device = table.device
    nll = torch.empty((B,), dtype=torch.float32, device=device)
    if B == 0:
        return nll
    shift = int(max_shift) if mode == PRESERVE else -1
    work_table = table if table.is_contiguous() else table.contiguous()
    work_special = special if special.is_contiguous() else special.contiguous()
    targets = targets.contiguous()
    input_lengths = input_lengths.to(torch.int64).contiguous()
    target_lengths = target_lengths.to(torch.int64).contiguous()
    U_max = targets.shape[1]
    S = W + 1 if mode == PRESERVE else 2 * W + 1
    if chunk_len is None:
        chunk_len = _choose_chunk_len(B, T, S, mode, device)
    chunk_len = int(chunk_len) if 0 < int(chunk_len) < T else 0
    chunked = chunk_len > 0
    n_chunks = -(-T // chunk_len) if chunked else 1

    alpha = torch.empty((B, T + 1, S), dtype=torch.float32, device=device)
    beta = torch.empty((B, T + 1, S), dtype=torch.float32, device=device) if need_grad else alpha
    configs = lattice_configs(T, W, mode, chunk_len, small=small_blocks())
    lengths = (input_lengths, target_lengths)
    with device_guard(device):
        if chunked:
            meta = configs["_transfer_kernel"]
            transfer = torch.empty((B, n_chunks, S, meta["D"]), dtype=torch.float32, device=device)
            _transfer_kernel[(B, n_chunks, triton.cdiv(S, meta["TILE_I"]))](
                work_table, work_special, targets, *lengths, transfer,
                T, W, U_max, S, n_chunks, chunk_len, shift, targets.stride(0), **meta)
            _boundary_kernel[(B, 2 if need_grad else 1)](
                *lengths, transfer, alpha, beta, T, U_max, S, n_chunks, chunk_len, shift,
                **configs["_boundary_kernel"])
        if need_grad or not chunked:
            _sweep_kernel[(B, n_chunks, 2 if need_grad else 1)](
                work_table, work_special, targets, *lengths, alpha, beta,
                T, W, U_max, S, chunk_len if chunked else T, shift, targets.stride(0), **configs["_sweep_kernel"])
        _loss_kernel[(B,)](work_special, *lengths, alpha, nll, T, U_max, S, shift, **configs["_loss_kernel"])
        if need_grad and T > 0:
            _posterior_kernel[(B * T,)](
                work_table, work_special, *lengths, alpha, beta, nll, T, W, U_max, S, shift,
                **configs["_posterior_kernel"])
    if need_grad:
        if work_table is not table:
            table.copy_(work_table)
        if work_special is not special:
            special.copy_(work_special)
    return nll
