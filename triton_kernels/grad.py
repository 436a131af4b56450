"""The gradient pass (stage 3 of ``csrc/ops.cpp``): g * (softmax - posterior), in the logits' dtype.

Maths, for row b and frame t (0-based) with t < T_b and no observed token there:

    grad[b, t, v] = g_b * (exp(x_v - lse[b, t]) - gamma_t(v))          (normalize)
                  = -g_b * gamma_t(v)                                   (log-prob input, ctc_loss)
    gamma_t(v)    = [v == k] post_special[b, t] + sum_{j : y_{column_lo(t+1)+j} = v} post_target[b, t, j]

0 at frames t >= T_b and at observed frames; on an infeasible row (nll = +inf) 0 with
zero_infinity and NaN without (PyTorch's convention). Accumulation is fp32; the output is cast once.

Layouts: logits [B, T, V] float32/bfloat16/float16, any strides on B and T, V contiguous; lse, post
[B, T] / [B, T, W] float32 (lattice.h's posterior layout); out [B, T, V] in the logits' dtype (a new
contiguous tensor, or ``out=``: any buffer with V contiguous, the logits themselves for the in-place
mode). float64 logits are handed to ``mdlm_ctc.reference.gradient_reference``.

Windows (``gradient_window``, the fused LM head's tiles): the flat frames frame_offset <= i <
frame_offset + n and the vocabulary columns [vocab_offset, vocab_offset + v), logits and out [n, v]
(rows at any stride, the vocabulary contiguous; out may be the logits), per-frame inputs [n], [n, W].
The same two kernels with the constexpr WINDOW (frame layout: emissions.py, "Windows"): the dense loop
runs over the window's v columns, and the exact values of the special token and of the band's writers
are read and written only where their token falls in the window; without WINDOW the code is the
whole-tensor pass's. Every element gets the same bits as in the whole-tensor pass. The window launcher
is never autotuned; float64 windows go to ``mdlm_ctc.reference.gradient_window_reference``.

Two kernels, one program per (b, t) row each (grid B*T, n for a window), no atomics anywhere:

  1. ``_band_values_kernel`` (small, O(band width) per frame): the exact fp32 values at the band's
     tokens, g * (softmax - gamma), parked in a [B, T, W] fp32 scratch, and the special token's
     value in a [B, T] one. It reads the logits at those tokens, and it runs before the dense
     kernel, so ``out`` may alias the logits. Repeated tokens in the band must be summed in fp32
     before the cast: every band slot links to the previous slot holding the same token (the
     launcher computes ``prev_same`` once per row), and pointer jumping over those links, log2(BLOCK)
     rounds of ``tl.gather`` per tile of BLOCK slots, gives every slot the sum of its token's
     posteriors up to itself; a chain that enters from an earlier tile adds that tile's parked
     total. The last slot of each token in the band, the "writer", holds the token's total. The
     special token joins its run's total if it occurs in the band (invalid input only). The order
     of every sum is fixed by the targets and the launcher's BLOCK_B (chosen from W, never tuned):
     results are bitwise reproducible.
  2. ``_dense_kernel`` (the bandwidth-bound part): g * softmax over vocabulary tiles (one exp2 per
     logit, log2(e) folded into an FMA), written in the output dtype; then the special token's value
     and the writers' parked values over the dense ones (each token has exactly one writer). It
     keeps no band state alive across the vocabulary loop, so its registers are those of one
     vocabulary tile (see benchmarks/results/static_triton.md for the counts and blocks per SM).
     Every element is computed on its own (no reduction), so the result does not depend on
     BLOCK_V or num_warps: autotuning this kernel cannot change a bit (tested, every config).
Cost: kernel 2 is the roofline part (one read of the logits, one write of the gradient); kernel 1
touches W band slots per frame (and W log2 W gather lanes), small next to V.

The two-pass path's backward (``gradient_finish``, in place on the buffer where the vocabulary pass
wrote ``row_scale * softmax``; csrc/ops.cpp): kernel 1 with TWO_PASS reads the softmax of the band's
slots and of the special token from the vocabulary pass's tables (the logits may be gone) and scales by
``g * row_scale``; then ``_finish_kernel`` (one program per frame) runs its dense loop only where the
row's upstream gradient g is not exactly 1 or the row is infeasible (a frame with nothing to rescale
costs its exact values only: W + 1 stores), then writes the exact values over the row as kernel 2 does
(``_write_exact``). ``band_values_window`` is kernel 1 alone over a window (the fused LM head's sparse
correction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mdlm_ctc.reference import band_links

from .emissions import (aliases, autotune_enabled, check_window, device_guard, frame_of, small_blocks, vocab_block,
                        window_rows)
from .logspace import LOG2E, NAN, NEG_INF, POS_INF, to_output_dtype


@triton.jit
def _row_state(b, t, T, U_max, max_shift, input_lengths_ptr, target_lengths_ptr, observed_ptr, nll_ptr,
               stride_observed_b, stride_observed_t, W, HAS_OBSERVED: tl.constexpr):
    """(active, live, infeasible, c_lo, c_hi, width) of frame t: the band of target columns of the
    lattice's frame t + 1 (lattice.h column_lo / column_hi) and how many of them are stored."""
    T_b = tl.minimum(tl.maximum(tl.load(input_lengths_ptr + b).to(tl.int64), 0), T)
    U_b = tl.minimum(tl.maximum(tl.load(target_lengths_ptr + b).to(tl.int64), 0), U_max)
    active = t < T_b
    if HAS_OBSERVED:
        active = active & (tl.load(observed_ptr + b * stride_observed_b + t * stride_observed_t) < 0)
    nll = tl.load(nll_ptr + b)
    infeasible = nll == POS_INF
    live = active & (nll != POS_INF)
    frame = t + 1
    c_lo = tl.maximum(U_b - T_b + frame, 1)
    c_lo = tl.where(max_shift >= 0, tl.maximum(c_lo, frame - max_shift), c_lo)
    c_hi = tl.minimum(tl.minimum(frame, U_b), c_lo + W - 1)
    width = tl.where(live, tl.minimum(tl.maximum(c_hi - c_lo + 1, 0), W), 0)
    return active, live, infeasible, c_lo, c_hi, width


@triton.jit
def _softmax_at(x_row, token, mask, lse, scaled_lse, V, NORMALIZE: tl.constexpr):
    """softmax(x)[token] in fp32 (0 for log-prob input, where the gradient is -g * gamma)."""
    if NORMALIZE:
        x = tl.load(x_row + tl.minimum(tl.maximum(token, 0), V - 1), mask=mask, other=0.0).to(tl.float32)
        return tl.where(lse == NEG_INF, 0.0, tl.exp2(x * LOG2E - scaled_lse))
    else:
        return tl.zeros_like(token).to(tl.float32)


@triton.jit
def _band_values_kernel(
    # pointers
    logits_ptr, lse_ptr, grad_nll_ptr, nll_ptr, input_lengths_ptr, target_lengths_ptr, observed_ptr,
    post_target_ptr, post_special_ptr, tokens_ptr, prev_same_ptr, next_same_ptr, parked_ptr, parked_special_ptr,
    soft_target_ptr, soft_special_ptr,
    # sizes
    T, V, U_max, W, special_id, max_shift, frame_offset, vocab_offset, V_window,
    # strides
    stride_logits_b, stride_logits_t, stride_observed_b, stride_observed_t,
    # meta
    HAS_OBSERVED: tl.constexpr, NORMALIZE: tl.constexpr, WINDOW: tl.constexpr, TWO_PASS: tl.constexpr,
    BLOCK_B: tl.constexpr, JUMPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # the output row
    b, t, x_row = frame_of(row, frame_offset, T, logits_ptr, stride_logits_b, stride_logits_t, WINDOW)
    active, live, infeasible, c_lo, c_hi, width = _row_state(
        b, t, T, U_max, max_shift, input_lengths_ptr, target_lengths_ptr, observed_ptr, nll_ptr,
        stride_observed_b, stride_observed_t, W, HAS_OBSERVED)
    g = tl.load(grad_nll_ptr + b).to(tl.float32)
    if TWO_PASS:  # the softmax comes from the vocabulary pass's band tables: the logits may be gone
        lse = tl.zeros([], dtype=tl.float32)
    else:
        lse = tl.load(lse_ptr + row)
    scaled_lse = tl.where(lse == NEG_INF, 0.0, lse) * LOG2E
    k = tl.minimum(tl.maximum(special_id, 0), V - 1).to(tl.int64)
    post_k = tl.load(post_special_ptr + row)
    post_row = post_target_ptr + row * W
    parked_row = parked_ptr + row * W
    tokens_row = tokens_ptr + b * U_max
    prev_row = prev_same_ptr + b * U_max
    next_row = next_same_ptr + b * U_max

    lanes = tl.arange(0, BLOCK_B)
    for j0 in range(0, width, BLOCK_B):
        j = j0 + lanes                  # band slot; target position p = c_lo + j - 1 (0-based)
        in_band = j < width
        p = c_lo - 1 + j
        token = tl.load(tokens_row + p, mask=in_band, other=-1)
        total = tl.load(post_row + j, mask=in_band, other=0.0)
        prev_slot = tl.load(prev_row + p, mask=in_band, other=-1) + 1 - c_lo  # < 0: before the band
        has_prev = in_band & (prev_slot >= 0)
        link = tl.where(has_prev & (prev_slot >= j0), prev_slot - j0, -1).to(tl.int32)  # a lane of this tile
        entry = tl.where(has_prev & (prev_slot < j0), prev_slot, -1)                  # a slot of an earlier tile
        # pointer jumping: after round r, total sums 2^r chain members (or the whole in-tile chain) and
        # link points 2^r members back; entry is taken from the chain's first in-tile member
        for _ in tl.static_range(JUMPS):
            follow = link >= 0
            source = tl.where(follow, link, 0)
            total = total + tl.where(follow, tl.gather(total, source, 0), 0.0)
            source_link = tl.gather(link, source, 0)
            entry = tl.where(follow & (source_link < 0), tl.gather(entry, source, 0), entry)
            link = tl.where(follow, source_link, -1)
        # the chain's part before this tile: the total parked at its last member there (never a writer)
        total += tl.load(parked_row + entry, mask=in_band & (entry >= 0), other=0.0)
        writer = in_band & (tl.load(next_row + p, mask=in_band, other=0) + 1 > c_hi)
        if TWO_PASS:
            soft = tl.load(soft_target_ptr + row * W + j, mask=writer, other=0.0)
        elif WINDOW:  # the softmax where the logits are: tokens in the vocabulary window
            column = token - vocab_offset
            soft = _softmax_at(x_row, column, writer & (column >= 0) & (column < V_window), lse, scaled_lse, V_window,
                               NORMALIZE)
        else:
            soft = _softmax_at(x_row, token, writer, lse, scaled_lse, V, NORMALIZE)
        exact = g * (soft - (total + tl.where(token == k, post_k, 0.0)))
        tl.store(parked_row + j, tl.where(writer, exact, total), mask=in_band)
        tl.debug_barrier()  # this tile's totals are visible to the next tile's entry loads
    if TWO_PASS:
        soft_k = tl.load(soft_special_ptr + row)
    elif WINDOW:
        column_k = k - vocab_offset
        soft_k = _softmax_at(x_row, column_k, live & (column_k >= 0) & (column_k < V_window), lse, scaled_lse,
                             V_window, NORMALIZE)
    else:
        soft_k = _softmax_at(x_row, k, live, lse, scaled_lse, V, NORMALIZE)
    tl.store(parked_special_ptr + row, g * (soft_k - post_k))


@triton.jit
def _dense_kernel(
    # pointers
    out_ptr, logits_ptr, lse_ptr, grad_nll_ptr, nll_ptr, input_lengths_ptr, target_lengths_ptr, observed_ptr,
    tokens_ptr, next_same_ptr, parked_ptr, parked_special_ptr,
    # sizes
    T, V, U_max, W, special_id, max_shift, frame_offset, vocab_offset, V_window,
    # strides
    stride_logits_b, stride_logits_t, stride_out_b, stride_out_t, stride_observed_b, stride_observed_t,
    # meta
    HAS_OBSERVED: tl.constexpr, NORMALIZE: tl.constexpr, ZERO_INFINITY: tl.constexpr, IN_PLACE: tl.constexpr,
    WINDOW: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # the output row
    b, t, x_row = frame_of(row, frame_offset, T, logits_ptr, stride_logits_b, stride_logits_t, WINDOW)
    _, _, out_row = frame_of(row, frame_offset, T, out_ptr, stride_out_b, stride_out_t, WINDOW)
    if WINDOW:  # the vocabulary window's columns [vocab_offset, vocab_offset + V_window)
        n_columns = V_window
    else:
        n_columns = V
    active, live, infeasible, c_lo, c_hi, width = _row_state(
        b, t, T, U_max, max_shift, input_lengths_ptr, target_lengths_ptr, observed_ptr, nll_ptr,
        stride_observed_b, stride_observed_t, W, HAS_OBSERVED)
    g = tl.load(grad_nll_ptr + b).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    scaled_lse = tl.where(lse == NEG_INF, 0.0, lse) * LOG2E

    # ---- the dense row: g * softmax (0 / the infeasible fill elsewhere) ----------------------------
    if ZERO_INFINITY:
        fill = 0.0
    else:
        fill = tl.where(active & infeasible, NAN, 0.0)
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, n_columns, BLOCK_V):
        v = v0 + offs_v
        in_vocab = v < n_columns
        if NORMALIZE:
            x = tl.load(x_row + v, mask=in_vocab & live, other=NEG_INF).to(tl.float32)
            dense = g * tl.where(lse == NEG_INF, 0.0, tl.exp2(x * LOG2E - scaled_lse))
        else:
            dense = tl.zeros([BLOCK_V], dtype=tl.float32)
        dense = tl.where(live, dense, fill)
        if IN_PLACE:
            tl.debug_barrier()  # every lane has read its logits before the tile is overwritten
        tl.store(out_row + v, to_output_dtype(dense, out_ptr.dtype.element_ty), mask=in_vocab)
    tl.debug_barrier()  # the dense values land before the exact ones that replace them
    _write_exact(out_row, row, b, live, c_lo, c_hi, width, special_id, V, U_max, W, vocab_offset, V_window,
                 tokens_ptr, next_same_ptr, parked_ptr, parked_special_ptr, WINDOW, BLOCK_J)


@triton.jit
def _write_exact(out_row, row, b, live, c_lo, c_hi, width, special_id, V, U_max, W, vocab_offset, V_window,
                 tokens_ptr, next_same_ptr, parked_ptr, parked_special_ptr, WINDOW: tl.constexpr,
                 BLOCK_J: tl.constexpr):
    """The exact values of ``_band_values_kernel`` over a row's dense ones: the special token, then the
    band's writers (each token has exactly one)."""
    k = tl.minimum(tl.maximum(special_id, 0), V - 1).to(tl.int64)
    value_k = tl.load(parked_special_ptr + row)
    if WINDOW:
        k = k - vocab_offset
        live_k = live & (k >= 0) & (k < V_window)
    else:
        live_k = live
    tl.store(out_row + k, to_output_dtype(value_k, out_row.dtype.element_ty), mask=live_k)
    tl.debug_barrier()  # a writer of the special token (invalid input: k inside the band) comes last
    offs_j = tl.arange(0, BLOCK_J)
    tokens_row = tokens_ptr + b * U_max
    next_row = next_same_ptr + b * U_max
    parked_row = parked_ptr + row * W
    for j0 in range(0, width, BLOCK_J):
        j = j0 + offs_j
        in_band = j < width
        p = c_lo - 1 + j
        writer = in_band & (tl.load(next_row + p, mask=in_band, other=0) + 1 > c_hi)
        token = tl.load(tokens_row + p, mask=writer, other=0)
        if WINDOW:  # writers of tokens in the vocabulary window, at their column
            token = token - vocab_offset
            writer = writer & (token >= 0) & (token < V_window)
        value = tl.load(parked_row + j, mask=writer, other=0.0)
        tl.store(out_row + token, to_output_dtype(value, out_row.dtype.element_ty), mask=writer)


@triton.jit
def _finish_kernel(
    # pointers
    out_ptr, grad_rows_ptr, nll_ptr, input_lengths_ptr, target_lengths_ptr, observed_ptr, tokens_ptr, next_same_ptr,
    parked_ptr, parked_special_ptr,
    # sizes
    T, V, U_max, W, special_id, max_shift,
    # strides
    stride_out_b, stride_out_t, stride_observed_b, stride_observed_t,
    # meta
    HAS_OBSERVED: tl.constexpr, ZERO_INFINITY: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """The two-pass backward of one frame, in place on the gradient buffer (``row_scale * softmax`` from the
    vocabulary pass): the dense pass runs only where the row's upstream gradient g is not exactly 1 or the
    row is infeasible (decided here, on the device: a program with nothing to scale returns after its
    exact values); then the exact values of ``_band_values_kernel`` at the band's writers and at k."""
    row = tl.program_id(0).to(tl.int64)
    b, t, out_row = frame_of(row, 0, T, out_ptr, stride_out_b, stride_out_t, False)
    active, live, infeasible, c_lo, c_hi, width = _row_state(
        b, t, T, U_max, max_shift, input_lengths_ptr, target_lengths_ptr, observed_ptr, nll_ptr,
        stride_observed_b, stride_observed_t, W, HAS_OBSERVED)
    g = tl.load(grad_rows_ptr + b).to(tl.float32)
    if ZERO_INFINITY:
        fill = 0.0
    else:
        fill = tl.where(active & infeasible, NAN, 0.0)
    n_v = tl.where(active & ((g != 1.0) | infeasible), V, 0)  # nothing to do in the dense part otherwise
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, n_v, BLOCK_V):
        v = v0 + offs_v
        in_vocab = v < V
        current = tl.load(out_row + v, mask=in_vocab, other=0.0).to(tl.float32)
        tl.store(out_row + v, to_output_dtype(tl.where(live, g * current, fill), out_ptr.dtype.element_ty),
                 mask=in_vocab)
    tl.debug_barrier()  # the scaled values land before the exact ones that replace them
    _write_exact(out_row, row, b, live, c_lo, c_hi, width, special_id, V, U_max, W, 0, V, tokens_ptr, next_same_ptr,
                 parked_ptr, parked_special_ptr, False, BLOCK_J)


# ---------------------------------------------------------------------------------------------
# configs (one place: the launcher, the tests and benchmarks/static_triton.py all read these)
# ---------------------------------------------------------------------------------------------

# Autotuned configs of the dense kernel: (BLOCK_V, num_warps). Every one is checked for spills and
# occupancy at sm_90 in CI (tests/test_triton_resources.py), and they give identical bits.
DENSE_AUTOTUNE_CONFIGS = ((2048, 4), (4096, 4), (4096, 8), (8192, 8))


def band_values_config(W: int, *, small: bool = False) -> dict:
    """Meta of ``_band_values_kernel``: one tile of BLOCK_B band slots (W <= 1024 fits one tile)."""
    block = min(triton.next_power_of_2(max(W, 1)), 4 if small else 1024)
    return dict(BLOCK_B=block, JUMPS=max(block.bit_length() - 1, 0), num_warps=1 if small else max(1, min(4, block // 128)))


def dense_config(V: int, element_size: int, *, small: bool = False) -> dict:
    """Meta of ``_dense_kernel`` when it is not autotuned (the vocabulary pass's tile)."""
    block_v, num_warps = vocab_block(V, element_size, small=small)
    return dict(BLOCK_V=block_v, BLOCK_J=4 if small else 128, num_warps=num_warps)


def _dense_autotune_configs():
    return [triton.Config({"BLOCK_V": bv, "BLOCK_J": 128}, num_warps=nw) for bv, nw in DENSE_AUTOTUNE_CONFIGS]


# keyed on V and the dtypes: the band width W changes from batch to batch and only sizes the writers' loop
_dense_kernel_tuned = triton.autotune(configs=_dense_autotune_configs(), key=["V"])(_dense_kernel)


def gradient(grad_nll, logits, lse, targets, input_lengths, target_lengths, observed, post_target, post_special, nll,
             special_id: int, max_shift: int, zero_infinity: bool, normalize: bool, *, out=None, dense_block=None):
    """Stage 3 of the backend contract (``csrc/ops.cpp``): ``grad [B, T, V]`` in the logits' dtype.

    ``out`` (keyword): write into this buffer instead of a new tensor; it may be ``logits`` itself
    (the in-place mode: the logits are consumed). Off by default. ``dense_block`` (keyword, for
    tests): ``(BLOCK_V, num_warps)`` of the dense kernel instead of the default or autotuned one.
    """
    B, T, V = logits.shape
    if out is None:
        out = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(f"gradient: `out` must be {tuple(logits.shape)} {logits.dtype} on {logits.device}; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    elif out.numel() > 0 and out.stride(2) != 1:
        raise ValueError(f"gradient: `out` must be contiguous in the vocabulary dimension; got strides {out.stride()}")
    in_place = aliases(out, logits)
    if in_place and out.stride() != logits.stride():
        raise ValueError("gradient: `out` aliases the logits with different strides")
    if logits.dtype == torch.float64:
        from mdlm_ctc.reference import gradient_reference

        return out.copy_(gradient_reference(grad_nll, logits, lse, targets, input_lengths, target_lengths, observed,
                                            post_target, post_special, nll, special_id, max_shift, zero_infinity,
                                            normalize))
    if out.numel() == 0:
        return out
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    _launch_gradient(out, logits, (logits.stride(0), logits.stride(1)), (out.stride(0), out.stride(1)), B * T, None,
                     T, 0, V, V, grad_nll, lse, targets, input_lengths, target_lengths, observed, post_target.shape[2],
                     post_target, post_special, nll, special_id, max_shift, zero_infinity, normalize, in_place,
                     dense_block=dense_block, tune=autotune_enabled(logits.device) and not in_place)
    return out


def gradient_window(grad_nll, logits, frame_offset: int, frames_per_row: int, vocab_offset: int, vocab_size: int,
                    lse, targets, input_lengths, target_lengths, observed, post_target, post_special, nll,
                    special_id: int, max_shift: int, zero_infinity: bool, normalize: bool, out) -> None:
    """Stage 3 over the flat frames ``frame_offset <= i < frame_offset + n`` and the vocabulary window
    ``[vocab_offset, vocab_offset + v)`` (``csrc/ops.cpp``; the fused LM head's tiles): reads the window's
    logits ``[n, v]``, lse ``[n]`` and posteriors ``[n, W]``, ``[n]``, and writes its gradient into ``out``
    ``[n, v]`` (rows at any stride, the vocabulary contiguous), which may be ``logits`` itself. The kernels
    of :func:`gradient`, so every element gets the same bits as in the whole-tensor pass; never autotuned
    (the dense config is a function of v). No host synchronisation."""
    if logits.dtype == torch.float64:
        from mdlm_ctc.reference import gradient_window_reference

        return gradient_window_reference(grad_nll, logits, frame_offset, frames_per_row, vocab_offset, vocab_size,
                                         lse, targets, input_lengths, target_lengths, observed, post_target,
                                         post_special, nll, special_id, max_shift, zero_infinity, normalize, out)
    n, v = check_window("gradient_window", logits, frame_offset, frames_per_row, input_lengths)
    V, v0 = int(vocab_size), int(vocab_offset)
    if v0 < 0 or V < 1 or v0 + v > V:
        raise ValueError(f"gradient_window: the vocabulary window [{v0}, {v0 + v}) (`vocab_offset`, `logits`) is "
                         f"outside the vocabulary of `vocab_size`={V}")
    if post_target.dim() != 2 or post_target.shape[0] != n or post_special.numel() != n or lse.numel() != n:
        raise ValueError("gradient_window: `lse` [n], `post_target` [n, W] and `post_special` [n] must cover the "
                         f"window's n = {n} frames; got {tuple(lse.shape)}, {tuple(post_target.shape)} and "
                         f"{tuple(post_special.shape)}")
    if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device or (
            out.numel() > 0 and v > 1 and out.stride(1) != 1):
        raise ValueError(f"gradient_window: `out` must be {tuple(logits.shape)} {logits.dtype} on {logits.device} "
                         f"with the vocabulary contiguous; got {tuple(out.shape)} {out.dtype} on {out.device}, "
                         f"strides {out.stride()}")
    in_place = aliases(out, logits)
    if in_place and out.stride() != logits.stride():
        raise ValueError("gradient_window: `out` aliases the logits with different strides")
    if out.numel() == 0:
        return None
    if v > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    T = int(frames_per_row)
    first, stop = window_rows(frame_offset, n, T)
    rows = slice(first, stop)
    _launch_gradient(out, logits, (0, logits.stride(0)), (0, out.stride(0)), n,
                     int(frame_offset) - first * T, T, v0, v, V, grad_nll.reshape(-1)[rows], lse, targets[rows],
                     input_lengths[rows], target_lengths[rows], None if observed is None else observed[rows],
                     post_target.shape[1], post_target, post_special, nll.reshape(-1)[rows], special_id, max_shift,
                     zero_infinity, normalize, in_place)
    return None


def gradient_finish(grad_rows, row_scale, nll, targets, input_lengths, target_lengths, observed, soft_target,
                    soft_special, post_target, post_special, special_id: int, max_shift: int, zero_infinity: bool,
                    grad) -> None:
    """The two-pass path's backward (``csrc/ops.cpp``), in place on ``grad`` ``[B, T, V]`` (``row_scale *
    softmax`` from :func:`emissions.emissions_grad`): ``_band_values_kernel`` with the softmax from the band
    tables (``TWO_PASS``) and ``gw = grad_rows * row_scale``, then ``_finish_kernel``, whose dense loop runs
    only for rows whose upstream gradient is not exactly 1 or that are infeasible. No host sync."""
    if grad.dtype == torch.float64:
        from mdlm_ctc.reference import gradient_finish_reference

        return gradient_finish_reference(grad_rows, row_scale, nll, targets, input_lengths, target_lengths, observed,
                                         soft_target, soft_special, post_target, post_special, special_id, max_shift,
                                         zero_infinity, grad)
    B, T, V = grad.shape
    if grad.numel() == 0:
        return None
    if grad.stride(2) != 1 and V > 1:
        raise ValueError(f"gradient_finish: `grad` must be contiguous in the vocabulary dimension; got strides "
                         f"{grad.stride()}")
    n, W = B * T, post_target.shape[-1]
    g = grad_rows.to(torch.float32).reshape(B).contiguous()
    gw = g * row_scale.to(torch.float32).reshape(B)
    band = _launch_band_values(grad, (0, 0), n, None, T, 0, V, V, gw, None, targets, input_lengths, target_lengths,
                               observed, W, post_target.reshape(n, W), post_special.reshape(n), nll, special_id,
                               max_shift, True, soft=(soft_target.reshape(n, W), soft_special.reshape(n)))
    small = small_blocks()
    with device_guard(grad.device):
        _finish_kernel[(n,)](grad, g, band.nll, band.input_lengths, band.target_lengths, band.observed, band.tokens,
                             band.next_same, band.parked, band.parked_special, T, V, band.U_max, W, int(special_id),
                             int(max_shift), grad.stride(0), grad.stride(1), *band.observed_strides,
                             HAS_OBSERVED=observed is not None, ZERO_INFINITY=bool(zero_infinity),
                             **dense_config(V, grad.element_size(), small=small))
    return None


def band_values_window(grad_rows, row_scale, nll, frame_offset: int, frames_per_row: int, vocab_size: int, targets,
                       input_lengths, target_lengths, observed, soft_target, soft_special, post_target, post_special,
                       special_id: int, max_shift: int):
    """The exact gradient at the band's tokens of a window of frames (``csrc/ops.cpp``; the fused LM head's
    sparse correction): ``(values [n, W], special [n])``, fp32, exact at each token's last slot in the band
    (its writer) of live frames; ``_band_values_kernel`` with the softmax from the band tables."""
    if soft_target.dtype == torch.float64:
        from mdlm_ctc.reference import band_values_window_reference

        return band_values_window_reference(grad_rows, row_scale, nll, frame_offset, frames_per_row, vocab_size,
                                            targets, input_lengths, target_lengths, observed, soft_target,
                                            soft_special, post_target, post_special, special_id, max_shift)
    n, W = soft_target.shape
    T = int(frames_per_row)
    B = input_lengths.shape[0]
    if int(frame_offset) < 0 or int(frame_offset) + n > B * T:
        raise ValueError(f"band_values_window: the window of frames [{frame_offset}, {int(frame_offset) + n}) is "
                         f"outside the B*T = {B * T} frames")
    if n == 0:
        return soft_target.new_zeros((0, W)), soft_special.new_zeros((0,))
    first, stop = window_rows(frame_offset, n, T)
    rows = slice(first, stop)
    gw = grad_rows.to(torch.float32).reshape(B) * row_scale.to(torch.float32).reshape(B)
    band = _launch_band_values(soft_target, (0, 0), n, int(frame_offset) - first * T, T, 0, int(vocab_size),
                               int(vocab_size), gw[rows], None, targets[rows], input_lengths[rows],
                               target_lengths[rows], None if observed is None else observed[rows], W, post_target,
                               post_special, nll.reshape(-1)[rows], special_id, max_shift, True,
                               soft=(soft_target, soft_special))
    return band.parked, band.parked_special


class _BandValues:
    """What ``_band_values_kernel`` wrote and the prepared inputs the kernels after it read."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _launch_band_values(logits, logits_strides, n, frame_offset, T, vocab_offset, V_window, V, grad_nll, lse, targets,
                        input_lengths, target_lengths, observed, W, post_target, post_special, nll, special_id,
                        max_shift, normalize, *, soft=None):
    """``_band_values_kernel`` over n output rows (the whole tensor, ``frame_offset=None``, or a window of the
    rows given); with ``soft`` (the two-pass band tables) the softmax is read there instead of the logits.
    Per-frame inputs are indexed by output row, per-row ones by the rows given."""
    device = logits.device
    B = input_lengths.shape[0]
    U_max = targets.shape[1]
    input_lengths = input_lengths.to(torch.int64).contiguous()
    target_lengths = target_lengths.to(torch.int64).contiguous()
    tokens, prev_same, next_same = band_links(targets, target_lengths.clamp(0, U_max), V)
    f32 = dict(dtype=torch.float32)
    lse = post_special if lse is None else lse.to(**f32).contiguous()  # a dummy pointer in the two-pass mode
    grad_nll = grad_nll.to(**f32).reshape(B).contiguous()
    nll = nll.to(**f32).contiguous()
    post_target = post_target.to(**f32).contiguous()
    post_special = post_special.to(**f32).contiguous()
    two_pass = soft is not None
    soft_target, soft_special = ((soft[0].to(**f32).contiguous(), soft[1].to(**f32).contiguous()) if two_pass
                                 else (post_target, post_special))  # dummies without
    parked = torch.empty((n, W), device=device, **f32)
    parked_special = torch.empty((n,), device=device, **f32)
    has_observed = observed is not None
    observed_arg = observed if has_observed else input_lengths
    observed_strides = (observed_arg.stride(0), observed_arg.stride(1)) if has_observed else (0, 0)
    sizes = (T, V, U_max, W, int(special_id), int(max_shift), frame_offset or 0, vocab_offset, V_window)
    with device_guard(device):
        _band_values_kernel[(n,)](
            logits, lse, grad_nll, nll, input_lengths, target_lengths, observed_arg, post_target, post_special,
            tokens, prev_same, next_same, parked, parked_special, soft_target, soft_special, *sizes, *logits_strides,
            *observed_strides, HAS_OBSERVED=has_observed, NORMALIZE=bool(normalize),
            WINDOW=frame_offset is not None, TWO_PASS=two_pass, **band_values_config(W, small=small_blocks()))
    return _BandValues(input_lengths=input_lengths, target_lengths=target_lengths, tokens=tokens, next_same=next_same,
                       lse=lse, grad_nll=grad_nll, nll=nll, parked=parked, parked_special=parked_special,
                       observed=observed_arg, observed_strides=observed_strides, sizes=sizes, U_max=U_max)


def _launch_gradient(out, logits, logits_strides, out_strides, n, frame_offset, T, vocab_offset, V_window, V, grad_nll,
                     lse, targets, input_lengths, target_lengths, observed, W, post_target, post_special, nll,
                     special_id, max_shift, zero_infinity, normalize, in_place, *, dense_block=None, tune=False):
    """The two kernels over n output rows: the whole tensor (``frame_offset=None``), or a window of the rows
    given (emissions.py, "Windows") and the vocabulary columns [vocab_offset, vocab_offset + V_window) of V.
    Per-frame inputs are indexed by output row, per-row ones by the rows given."""
    band = _launch_band_values(logits, logits_strides, n, frame_offset, T, vocab_offset, V_window, V, grad_nll, lse,
                               targets, input_lengths, target_lengths, observed, W, post_target, post_special, nll,
                               special_id, max_shift, normalize)
    small = small_blocks()
    dense_args = (out, logits, band.lse, band.grad_nll, band.nll, band.input_lengths, band.target_lengths,
                  band.observed, band.tokens, band.next_same, band.parked, band.parked_special, *band.sizes,
                  *logits_strides, *out_strides, *band.observed_strides)
    flags = dict(HAS_OBSERVED=observed is not None, NORMALIZE=bool(normalize), WINDOW=frame_offset is not None,
                 ZERO_INFINITY=bool(zero_infinity), IN_PLACE=in_place)
    with device_guard(logits.device):
        if dense_block is not None:
            block_v, num_warps = dense_block
            _dense_kernel[(n,)](*dense_args, **flags, BLOCK_V=block_v, BLOCK_J=4 if small else 128,
                                num_warps=num_warps)
        elif tune:  # re-running is harmless only when out != logits
            _dense_kernel_tuned[(n,)](*dense_args, **flags)
        else:
            _dense_kernel[(n,)](*dense_args, **flags, **dense_config(V_window, logits.element_size(), small=small))
