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

Parallelisation and determinism: one program per (b, t) row, grid B*T, three phases separated by
CTA barriers, no atomics anywhere:
  1. exact values at the band's tokens, read before anything is written (so ``out`` may alias the
     logits). Repeated tokens in the band must be summed in fp32 before the cast. The launcher sorts
     each row's target once (token, then position; stable) and records, for every position, the next
     position holding the same token. Per frame the kernel walks that sorted order once: the band's
     posteriors (0 outside the band) go through a segmented inclusive scan (tl.associative_scan,
     segments = equal tokens), and the last in-band member of each run, the "writer", gets the
     run's total and computes g * (softmax - total) in fp32, parked in a [B, T, W] fp32 scratch at
     its band slot. The special token joins its run's total if it occurs in the band (invalid input
     only), else it is written by itself. Every sum has a fixed order: results are bitwise
     reproducible.
  2. the dense row g * softmax over vocabulary tiles (one exp2 per logit, log2(e) folded into an FMA),
     written in the output dtype; the memory-bound part (read x, write grad).
  3. the writers store their parked values over the dense ones (each token has exactly one writer).
Cost: phase 2 is the roofline part (one read of the logits, one write of the gradient); phase 1
touches the row's U sorted entries once per frame (L2-resident [B, U] arrays) and W scratch
values, small next to V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .emissions import _vocab_autotune_configs, _vocab_block, autotune_enabled, device_guard, interpreted
from .logspace import LOG2E, NAN, NEG_INF, POS_INF


@triton.jit
def _to_output_dtype(value, DTYPE: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even. bfloat16 is rounded here with integer ops:
    the GPU's cast rounds to nearest too, but the interpreter's truncates, and the tests compare
    bf16 gradients to within one rounding of the float64 reference."""
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)  # a NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(DTYPE)


@triton.jit
def _segmented_sum(value_a, start_a, value_b, start_b):
    """Combine of a segmented inclusive sum: a segment restarts where ``start`` is set."""
    return tl.where(start_b != 0, value_b, value_a + value_b), start_a | start_b


@triton.jit
def _gradient_kernel(
    # pointers
    out_ptr, logits_ptr, lse_ptr, grad_nll_ptr, nll_ptr, input_lengths_ptr, target_lengths_ptr, observed_ptr,
    post_target_ptr, post_special_ptr, tokens_ptr, sorted_tokens_ptr, sorted_positions_ptr, next_same_ptr, parked_ptr,
    # sizes
    T, V, U_max, W, special_id, max_shift,
    # strides
    stride_logits_b, stride_logits_t, stride_out_b, stride_out_t, stride_observed_b, stride_observed_t,
    # meta
    HAS_OBSERVED: tl.constexpr, NORMALIZE: tl.constexpr, ZERO_INFINITY: tl.constexpr, IN_PLACE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    T_b = tl.minimum(tl.maximum(tl.load(input_lengths_ptr + b).to(tl.int64), 0), T)
    U_b = tl.minimum(tl.maximum(tl.load(target_lengths_ptr + b).to(tl.int64), 0), U_max)
    active = t < T_b
    if HAS_OBSERVED:
        active = active & (tl.load(observed_ptr + b * stride_observed_b + t * stride_observed_t) < 0)
    nll = tl.load(nll_ptr + b)
    infeasible = nll == POS_INF
    live = active & (nll != POS_INF)
    g = tl.load(grad_nll_ptr + b).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    scaled_lse = tl.where(lse == NEG_INF, 0.0, lse) * LOG2E
    x_row = logits_ptr + b * stride_logits_b + t * stride_logits_t
    out_row = out_ptr + b * stride_out_b + t * stride_out_t
    k = tl.minimum(tl.maximum(special_id, 0), V - 1).to(tl.int64)
    post_k = tl.load(post_special_ptr + row)

    # the band of target columns of frame t + 1 (lattice.h column_lo / column_hi)
    frame = t + 1
    c_lo = tl.maximum(U_b - T_b + frame, 1)
    c_lo = tl.where(max_shift >= 0, tl.maximum(c_lo, frame - max_shift), c_lo)
    c_hi = tl.minimum(tl.minimum(frame, U_b), c_lo + W - 1)
    post_row = post_target_ptr + row * W
    parked_row = parked_ptr + row * W

    # ---- 1. exact fp32 values at the band's tokens (logits read before any write) -------------
    sorted_tokens = sorted_tokens_ptr + b * U_max
    sorted_positions = sorted_positions_ptr + b * U_max
    offs_r = tl.arange(0, BLOCK_R)
    carry_sum = tl.zeros([], dtype=tl.float32)       # running sum of the run that crosses a tile edge
    carry_token = tl.full([], -1, dtype=tl.int64)
    special_in_band = tl.zeros([], dtype=tl.int32)
    n_sorted = tl.where(live, U_b, 0)
    for r0 in range(0, n_sorted, BLOCK_R):
        r = r0 + offs_r
        valid = r < U_b
        token = tl.load(sorted_tokens + r, mask=valid, other=-1)
        u = tl.load(sorted_positions + r, mask=valid, other=0) + 1  # the target column
        in_band = valid & (u >= c_lo) & (u <= c_hi)
        post = tl.load(post_row + (u - c_lo), mask=in_band, other=0.0)
        post = tl.where((r == r0) & (token == carry_token), post + carry_sum, post)
        previous = tl.load(sorted_tokens + (r - 1), mask=valid & (r >= 1), other=-1)
        run_start = (token != previous).to(tl.int32)
        run_sum, _ = tl.associative_scan((post, run_start), 0, _segmented_sum)
        following = tl.load(sorted_tokens + (r + 1), mask=r + 1 < U_b, other=-1)
        following_u = tl.load(sorted_positions + (r + 1), mask=r + 1 < U_b, other=0) + 1
        writer = in_band & ((following != token) | (following_u > c_hi))
        is_special = token == k
        special_in_band += tl.sum((in_band & is_special).to(tl.int32), axis=0)
        total = run_sum + tl.where(is_special, post_k, 0.0)
        if NORMALIZE:
            x = tl.load(x_row + tl.minimum(tl.maximum(token, 0), V - 1), mask=writer, other=0.0).to(tl.float32)
            soft = tl.where(lse == NEG_INF, 0.0, tl.exp2(x * LOG2E - scaled_lse))
        else:
            soft = 0.0
        tl.store(parked_row + (u - c_lo), g * (soft - total), mask=writer)
        last = r == r0 + BLOCK_R - 1
        carry_sum = tl.sum(tl.where(last, run_sum, 0.0), axis=0)
        carry_token = tl.sum(tl.where(last, token, 0), axis=0)
    if NORMALIZE:
        x_k = tl.load(x_row + k, mask=live, other=0.0).to(tl.float32)
        soft_k = tl.where(lse == NEG_INF, 0.0, tl.exp2(x_k * LOG2E - scaled_lse))
    else:
        soft_k = 0.0
    value_k = g * (soft_k - post_k)
    tl.debug_barrier()  # parked values visible to phase 3's lanes; logits read before phase 2 writes

    # ---- 2. the dense row: g * softmax (0 / the infeasible fill elsewhere) ----------------------
    if ZERO_INFINITY:
        fill = 0.0
    else:
        fill = tl.where(active & infeasible, NAN, 0.0)
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs_v
        in_vocab = v < V
        if NORMALIZE:
            x = tl.load(x_row + v, mask=in_vocab & live, other=NEG_INF).to(tl.float32)
            dense = g * tl.where(lse == NEG_INF, 0.0, tl.exp2(x * LOG2E - scaled_lse))
        else:
            dense = tl.zeros([BLOCK_V], dtype=tl.float32)
        dense = tl.where(live, dense, fill)
        if IN_PLACE:
            tl.debug_barrier()  # every lane has read its logits before the tile is overwritten
        tl.store(out_row + v, _to_output_dtype(dense, out_ptr.dtype.element_ty), mask=in_vocab)
    tl.debug_barrier()  # the dense values land before the exact ones that replace them

    # ---- 3. the writers store the exact values over the dense ones -----------------------------
    width = tl.where(live, tl.minimum(tl.maximum(c_hi - c_lo + 1, 0), W), 0)
    offs_w = tl.arange(0, BLOCK_W)
    tokens_row = tokens_ptr + b * U_max
    next_same_row = next_same_ptr + b * U_max
    for j0 in range(0, width, BLOCK_W):
        j = j0 + offs_w
        in_band = j < width
        u = c_lo + j
        next_u = tl.load(next_same_row + (u - 1), mask=in_band, other=0) + 1
        writer = in_band & (next_u > c_hi)
        token = tl.load(tokens_row + (u - 1), mask=writer, other=0)
        value = tl.load(parked_row + j, mask=writer, other=0.0)
        tl.store(out_row + token, _to_output_dtype(value, out_ptr.dtype.element_ty), mask=writer)
    tl.store(out_row + k, _to_output_dtype(value_k, out_ptr.dtype.element_ty), mask=live & (special_in_band == 0))


def _band_order(targets, target_lengths, V):
    """Per row: the target sorted by (token, position) and, per position, the next one with its token.

    ``tokens`` [B, U] (clamped ids), ``sorted_tokens`` / ``sorted_positions`` [B, U] (padding sorts
    last as token V), ``next_same`` [B, U] (U + 1 when there is none). Device ops only, no sync.
    """
    B, U = targets.shape
    tokens = targets.to(torch.int64).clamp(0, max(V - 1, 0)).contiguous()
    position = torch.arange(U, device=targets.device)
    key = torch.where(position[None, :] < target_lengths[:, None], tokens, V)
    sorted_tokens, sorted_positions = torch.sort(key, dim=1, stable=True)
    none = U + 1
    next_sorted = torch.full_like(sorted_positions, none)
    if U > 1:
        same = sorted_tokens[:, 1:] == sorted_tokens[:, :-1]
        next_sorted[:, :-1] = torch.where(same, sorted_positions[:, 1:], none)
    next_same = torch.empty_like(sorted_positions).scatter_(1, sorted_positions, next_sorted)
    return tokens, sorted_tokens.contiguous(), sorted_positions.contiguous(), next_same


_gradient_kernel_tuned = triton.autotune(configs=_vocab_autotune_configs(), key=["V"])(_gradient_kernel)


def gradient(grad_nll, logits, lse, targets, input_lengths, target_lengths, observed, post_target, post_special, nll,
             special_id: int, max_shift: int, zero_infinity: bool, normalize: bool, *, out=None):
    """Stage 3 of the backend contract (``csrc/ops.cpp``): ``grad [B, T, V]`` in the logits' dtype.

    ``out`` (keyword): write into this buffer instead of a new tensor; it may be ``logits`` itself
    (the in-place mode: the logits are consumed). Off by default.
    """
    B, T, V = logits.shape
    if out is None:
        out = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(f"gradient: `out` must be {tuple(logits.shape)} {logits.dtype} on {logits.device}; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    elif out.numel() > 0 and out.stride(2) != 1:
        raise ValueError(f"gradient: `out` must be contiguous in the vocabulary dimension; got strides {out.stride()}")
    in_place = out.numel() > 0 and out.data_ptr() == logits.data_ptr()
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
    device = logits.device
    W = post_target.shape[2]
    U_max = targets.shape[1]
    input_lengths = input_lengths.to(torch.int64).contiguous()
    target_lengths = target_lengths.to(torch.int64).contiguous()
    tokens, sorted_tokens, sorted_positions, next_same = _band_order(targets, target_lengths.clamp(0, U_max), V)
    f32 = dict(dtype=torch.float32)
    lse = lse.to(**f32).contiguous()
    grad_nll = grad_nll.to(**f32).reshape(B).contiguous()
    nll = nll.to(**f32).contiguous()
    post_target = post_target.to(**f32).contiguous()
    post_special = post_special.to(**f32).contiguous()
    parked = torch.empty((B, T, W), device=device, **f32)
    has_observed = observed is not None
    observed_arg = observed.contiguous() if has_observed else input_lengths
    stride_ob, stride_ot = (observed_arg.stride(0), observed_arg.stride(1)) if has_observed else (0, 0)
    small = interpreted()
    args = (out, logits, lse, grad_nll, nll, input_lengths, target_lengths, observed_arg, post_target, post_special,
            tokens, sorted_tokens, sorted_positions, next_same, parked,
            T, V, U_max, W, int(special_id), int(max_shift),
            logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), stride_ob, stride_ot)
    meta = dict(HAS_OBSERVED=has_observed, NORMALIZE=bool(normalize), ZERO_INFINITY=bool(zero_infinity),
                IN_PLACE=in_place, BLOCK_R=min(triton.next_power_of_2(max(U_max, 1)), 4 if small else 2048),
                BLOCK_W=min(triton.next_power_of_2(max(W, 1)), 4 if small else 1024))
    with device_guard(device):
        if autotune_enabled(device) and not in_place:  # re-running is harmless only when out != logits
            _gradient_kernel_tuned[(B * T,)](*args, **meta)
        else:
            block_v, num_warps = _vocab_block(V, logits.element_size())
            _gradient_kernel[(B * T,)](*args, **meta, BLOCK_V=block_v, num_warps=num_warps)
    return out
