"""The vocabulary pass (stage 1 of ``csrc/ops.cpp``): one read of the logits gives the logsumexp of
every frame and the band emission table the lattice reads.

Maths, for row b and frame t < T_b = input_lengths[b] (0-based; the lattice's frame is t + 1):

    lse[b, t]      = log sum_v exp(x_v)                       (x = logits[b, t, :]; 0 if not normalize)
    e(tok)         = x_tok - lse   (-inf if lse = -inf; x_tok itself if not normalize;
                                    0 / -inf at an observed frame: tok == observed[b, t] or not)
    table[b, t, j] = e(y_u)  for u = column_lo(t + 1) + j <= column_hi(t + 1)   (lattice.h), 0 after
    special[b, t]  = e(k), or NaN when the frame has a NaN (lse or a gathered emission), so that the
                     lattice marks the row NaN.
Frames t >= T_b are all 0. Ids are clamped to [0, V) before any load, lengths to the padded sizes.

Layouts: logits [B, T, V] float32/bfloat16/float16, any strides on B and T, V contiguous;
targets [B, U] int32/int64; input_lengths, target_lengths [B] int64 on the device; observed [B, T]
or None. Outputs lse [B, T], table [B, T, W], special [B, T], all float32, contiguous. float64 logits
are handed to ``mdlm_ctc.reference.emissions_reference`` (float64 accumulation; Triton would only
emulate it): the fast path is for the LLM dtypes.

Windows (``emissions_window``, the fused LM head's chunks): the flat frames i = b*T + t with
frame_offset <= i < frame_offset + n, logits [n, V] (rows at any stride), outputs lse [n], table [n, W],
special [n]. One kernel serves both (as the gradient's kernels in grad.py): with the constexpr WINDOW,
program r reads row r of the window's logits (row stride in stride_t) and handles the flat frame
frame_offset + r = b*T + t of the batch rows it is given (the window launchers pass only the rows the
window touches, as views, so frame_offset < T). Without WINDOW the code is the whole-tensor pass's,
unchanged (program b*T + t, any strides on B and T). The per-frame arithmetic is the same, so a frame
gets the same bits in a window as in the whole-tensor pass. float64 windows go to
``mdlm_ctc.reference.emissions_window_reference``.

Parallelisation: one program per (b, t) row, grid B*T (n for a window). The logsumexp is online
*per lane*: each lane keeps its own running max and sum, and a logit costs one exp2 (of the smaller
exponent minus the larger, log2(e) folded in), so the SFU does one op per logit (2.07 G exp2 at G1 is ~0.5 ms of
SFU time, under the ~0.86 ms of HBM time for one read of the bf16 logits; the two overlap). The
lanes are combined once, after the loop: the loop has no reduction and so no CTA barrier, and each
iteration issues two tiles' loads (2 x BLOCK_V) before using either, so a warp keeps two loads in
flight and warps run ahead of each other instead of meeting at a barrier three times per tile (the
old per-tile max). Registers and resident warps per SM are in benchmarks/results/static_triton.md.
The summation order depends on BLOCK_V and num_warps, so they are a function of the shape
(``emissions_config``), never autotuned. No whole-row block and no B*T*V intermediate. The band's W
target ids are gathered from the row after the loop: the row (253 KB in bf16 at V = 126,464) was
just streamed through L2, so the gathers are L2 hits, and W is small next to V (W <= 257 at G1;
~2k at worst).

The two-pass path (``emissions_grad``, ``emissions_grad_window``; constexpr WRITE_GRAD): after the
logsumexp and the band's gathers, the same program sweeps its row once more and writes
``row_scale[b] * exp2(x log2(e) - lse log2(e))`` (the gradient kernel's expression: the same bits) into
the gradient buffer, or over the logits themselves (IN_PLACE: a barrier after the gathers, and before
each tile's store), and keeps the unrounded softmax at the band's slots and at the special token
(``soft_target`` [n, W], ``soft_special`` [n]). The second sweep runs tiles last to first: the end of
the row was streamed last, so it is the likeliest still in L2. Whether it hits L2 depends on how many
rows are in flight (132 SMs x resident programs x 253 KB at G1 is more than L2): the traffic model
(README, "How it is built") counts one HBM read of the logits and one write of the gradient, and the
GPU benchmark (``bench_slack_ctc.py``, providers ``triton-two-pass`` / ``triton-three-pass``) is what
will say how much of the re-read comes from L2. Unmeasured here: no GPU has run it.

Host-side helpers shared by the launchers (autotune switch, interpreter test, device guard, the
windows' checks) live at the end of this file.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .logspace import LN2, LOG2E, NAN, NEG_INF, POS_INF, finite_or_zero, to_output_dtype


@triton.jit
def _lane_logsumexp_step(lane_max, lane_sum, x):
    """One logit per lane into that lane's running (max, sum of exp(x - max)): one exp2 per logit,
    the smaller of the two exponents relative to the larger; -inf-safe (a lane that has seen only
    -inf keeps sum 0). NaN is tracked by the caller (the GPU's max drops it)."""
    hi = tl.maximum(lane_max, x)
    lo = tl.minimum(lane_max, x)
    scale = tl.exp2((lo - finite_or_zero(hi)) * LOG2E)
    return hi, tl.where(x > lane_max, lane_sum * scale + 1.0, lane_sum + scale)


@triton.jit
def frame_of(row, frame_offset, T, base_ptr, stride_b, stride_t, WINDOW: tl.constexpr):
    """``(b, t, pointer to the row)`` of output row ``row``. With WINDOW, row r of a window's [n, ...]
    tensor: the flat frame frame_offset + r of the rows given ("Windows" above); otherwise frame
    (row // T, row % T) of a [B, T, ...] tensor."""
    if WINDOW:
        b = (row + frame_offset) // T
        t = row + frame_offset - b * T
        ptr = base_ptr + row * stride_t
    else:
        b = row // T
        t = row - b * T
        ptr = base_ptr + b * stride_b + t * stride_t
    return b, t, ptr


@triton.jit
def _emissions_kernel(
    # pointers
    logits_ptr, targets_ptr, input_lengths_ptr, target_lengths_ptr, observed_ptr,
    lse_ptr, table_ptr, special_ptr, grad_ptr, row_scale_ptr, soft_target_ptr, soft_special_ptr,
    # sizes
    T, V, U_max, W, special_id, max_shift, frame_offset,
    # strides
    stride_logits_b, stride_logits_t, stride_targets_b, stride_observed_b, stride_observed_t, stride_grad_b,
    stride_grad_t,
    # meta
    HAS_OBSERVED: tl.constexpr, NORMALIZE: tl.constexpr, WINDOW: tl.constexpr, WRITE_GRAD: tl.constexpr,
    IN_PLACE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # the output row
    b, t, x_row = frame_of(row, frame_offset, T, logits_ptr, stride_logits_b, stride_logits_t, WINDOW)
    T_b = tl.minimum(tl.maximum(tl.load(input_lengths_ptr + b).to(tl.int64), 0), T)
    U_b = tl.minimum(tl.maximum(tl.load(target_lengths_ptr + b).to(tl.int64), 0), U_max)
    active = t < T_b

    # ---- online logsumexp over the vocabulary, per lane (base 2 inside, natural log out) -------
    lse = tl.zeros([], dtype=tl.float32)
    if NORMALIZE:
        offs_v = tl.arange(0, BLOCK_V)
        n_v = tl.where(active, V, 0)  # an inactive frame reads nothing
        lane_max = tl.full([BLOCK_V], NEG_INF, dtype=tl.float32)
        lane_sum = tl.zeros([BLOCK_V], dtype=tl.float32)    # relative to lane_max
        lane_nan = tl.zeros([BLOCK_V], dtype=tl.int1)
        for v0 in range(0, n_v, 2 * BLOCK_V):
            v = v0 + offs_v
            # two tiles' loads issued before either is used, and no reduction (no barrier) in the loop
            x_a = tl.load(x_row + v, mask=v < V, other=NEG_INF).to(tl.float32)
            x_b = tl.load(x_row + v + BLOCK_V, mask=v + BLOCK_V < V, other=NEG_INF).to(tl.float32)
            lane_max, lane_sum = _lane_logsumexp_step(lane_max, lane_sum, x_a)
            lane_max, lane_sum = _lane_logsumexp_step(lane_max, lane_sum, x_b)
            lane_nan = lane_nan | (x_a != x_a) | (x_b != x_b)
        run_max = tl.max(lane_max, axis=0)
        total = tl.sum(lane_sum * tl.exp2((lane_max - finite_or_zero(run_max)) * LOG2E), axis=0)
        # all -inf: 0 + log(0) = -inf; a NaN logit gives NaN; a +inf logit gives +inf (as C++)
        lse = finite_or_zero(run_max) + tl.log2(total) * LN2
        lse = tl.where(run_max == POS_INF, POS_INF, lse)
        lse = tl.where(tl.max(lane_nan.to(tl.int32), axis=0) > 0, NAN, lse)
        lse = tl.where(active, lse, 0.0)

    if HAS_OBSERVED:
        seen = tl.load(observed_ptr + b * stride_observed_b + t * stride_observed_t).to(tl.int64)
    else:
        seen = tl.full([], -1, dtype=tl.int64)
    free = seen < 0

    # ---- the band's target emissions: columns u = c_lo .. c_hi of frame t + 1 ------------------
    frame = t + 1
    c_lo = tl.maximum(U_b - T_b + frame, 1)
    c_lo = tl.where(max_shift >= 0, tl.maximum(c_lo, frame - max_shift), c_lo)
    c_hi = tl.minimum(frame, U_b)
    width = tl.minimum(tl.maximum(c_hi - c_lo + 1, 0), W)
    width = tl.where(active, width, 0)
    targets_row = targets_ptr + b * stride_targets_b + (c_lo - 1)
    table_row = table_ptr + row * W
    soft_row = soft_target_ptr + row * W
    scaled_lse = finite_or_zero(lse) * LOG2E  # softmax = exp2(x log2(e) - lse log2(e)), as grad.py computes it
    live = active & free
    offs_w = tl.arange(0, BLOCK_W)
    nan_count = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, W, BLOCK_W):
        j = j0 + offs_w
        in_band = j < width
        token = tl.load(targets_row + j, mask=in_band, other=0).to(tl.int64)
        token = tl.minimum(tl.maximum(token, 0), V - 1)
        x = tl.load(x_row + token, mask=in_band & free, other=0.0).to(tl.float32)
        if NORMALIZE:
            e = tl.where(lse == NEG_INF, NEG_INF, x - lse)
        else:
            e = x
        e = tl.where(free, e, tl.where(seen == token, 0.0, NEG_INF))
        e = tl.where(in_band, e, 0.0)
        nan_count += tl.sum((e != e).to(tl.int32), axis=0)
        tl.store(table_row + j, e, mask=j < W)
        if WRITE_GRAD:  # the unrounded softmax at the band's slots, for the backward's exact values
            soft = tl.where(lse == NEG_INF, 0.0, tl.exp2(x * LOG2E - scaled_lse))
            tl.store(soft_row + j, tl.where(in_band & live, soft, 0.0), mask=j < W)

    # ---- the special token, carrying the frame's NaN mark -------------------------------------
    k = tl.minimum(tl.maximum(special_id, 0), V - 1).to(tl.int64)
    x_k = tl.load(x_row + k, mask=active & free, other=0.0).to(tl.float32)
    if NORMALIZE:
        e_k = tl.where(lse == NEG_INF, NEG_INF, x_k - lse)
    else:
        e_k = x_k
    e_k = tl.where(free, e_k, tl.where(seen == k, 0.0, NEG_INF))
    e_k = tl.where((nan_count > 0) | (lse != lse), NAN, e_k)
    e_k = tl.where(active, e_k, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(special_ptr + row, e_k)

    # ---- the two-pass path: row_scale[b] * softmax written over the row, in the same sweep ------
    if WRITE_GRAD:
        soft_k = tl.where(lse == NEG_INF, 0.0, tl.exp2(x_k * LOG2E - scaled_lse))
        tl.store(soft_special_ptr + row, tl.where(live, soft_k, 0.0))
        w = tl.load(row_scale_ptr + b).to(tl.float32)
        if WINDOW:
            out_row = grad_ptr + row * stride_grad_t
        else:
            out_row = grad_ptr + b * stride_grad_b + t * stride_grad_t
        tl.debug_barrier()  # every gather of the row is done before the row is overwritten (IN_PLACE)
        offs = tl.arange(0, 2 * BLOCK_V)
        n_tiles = tl.cdiv(V, 2 * BLOCK_V)
        for i in range(0, n_tiles):
            # last tile first: the end of the row was read last, so it is the likeliest still in L2
            v = (n_tiles - 1 - i) * (2 * BLOCK_V) + offs
            in_vocab = v < V
            x = tl.load(x_row + v, mask=in_vocab & live, other=NEG_INF).to(tl.float32)
            dense = w * tl.where(lse == NEG_INF, 0.0, tl.exp2(x * LOG2E - scaled_lse))
            dense = tl.where(live, dense, 0.0)
            if IN_PLACE:
                tl.debug_barrier()  # every lane has read its logits before the tile is overwritten
            tl.store(out_row + v, to_output_dtype(dense, grad_ptr.dtype.element_ty), mask=in_vocab)


# ---------------------------------------------------------------------------------------------
# configs: one choice per shape class, never tuned (the logsumexp's summation order depends on
# BLOCK_V and num_warps, so a timing race must not pick them: the bits would differ between
# processes, ranks, and eager and CUDA-graph runs)
# ---------------------------------------------------------------------------------------------

def vocab_block(V: int, element_size: int, *, small: bool = False) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary pass: 8 KB of logits per tile and per load wave
    (4096 bf16/fp16 or 2048 fp32 values, 16 or 8 per thread at 8 warps), less for small V.
    ``small``: the interpreter's tiles (several tiles even at V ~ 10)."""
    if small:
        return min(triton.next_power_of_2(max(V, 1)), 8), 1
    block = 4096 if element_size <= 2 else 2048
    block = min(block, max(triton.next_power_of_2(V), 32))
    return block, max(1, min(8, block // 256))


def emissions_config(V: int, W: int, element_size: int, *, small: bool = False) -> dict:
    """Meta of ``_emissions_kernel``: each loop iteration reads the vocabulary tile of :func:`vocab_block`
    as two loads of BLOCK_V (both in flight at once), and a gather tile."""
    block_v, num_warps = vocab_block(V, element_size, small=small)
    block_w = min(triton.next_power_of_2(max(W, 1)), 4 if small else 512)
    return dict(BLOCK_V=max(block_v // 2, 1), BLOCK_W=block_w, num_warps=num_warps)


def emissions(logits, targets, input_lengths, target_lengths, observed, special_id: int, max_shift: int,
              band_width: int, normalize: bool):
    """Stage 1 of the backend contract (``csrc/ops.cpp``): ``(lse [B, T], table [B, T, W], special [B, T])``."""
    if logits.dtype == torch.float64:
        from mdlm_ctc.reference import emissions_reference

        return emissions_reference(logits, targets, input_lengths, target_lengths, observed, special_id, max_shift,
                                   band_width, normalize)
    B, T, V = logits.shape
    W = int(band_width)
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    lse, table, special = _launch_emissions(logits, logits.stride(0), logits.stride(1), B * T, None, T, V, targets,
                                            input_lengths, target_lengths, observed, special_id, max_shift, W,
                                            normalize)
    return lse.view(B, T), table.view(B, T, W), special.view(B, T)


def emissions_window(logits, frame_offset: int, frames_per_row: int, targets, input_lengths, target_lengths, observed,
                     special_id: int, max_shift: int, band_width: int, normalize: bool):
    """Stage 1 over the flat frames ``frame_offset <= i < frame_offset + n`` (``csrc/ops.cpp``; the fused LM
    head's chunks, which may cut a row): ``(lse [n], table [n, W], special [n])`` from their logits
    ``[n, V]`` (rows at any stride, the vocabulary contiguous), by the kernel of :func:`emissions`, so
    every frame gets the same bits as in the whole-tensor pass. No host synchronisation."""
    if logits.dtype == torch.float64:
        from mdlm_ctc.reference import emissions_window_reference

        return emissions_window_reference(logits, frame_offset, frames_per_row, targets, input_lengths,
                                          target_lengths, observed, special_id, max_shift, band_width, normalize)
    n, V = check_window("emissions_window", logits, frame_offset, frames_per_row, input_lengths)
    W = int(band_width)
    if W < 1:
        raise ValueError(f"emissions_window: `band_width` must be >= 1; got {band_width}")
    if n > 0 and V > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    T = int(frames_per_row)
    first, stop = window_rows(frame_offset, n, T)
    rows = slice(first, stop)
    return _launch_emissions(logits, 0, logits.stride(0), n, int(frame_offset) - first * T, T, V,
                             targets[rows], input_lengths[rows], target_lengths[rows],
                             None if observed is None else observed[rows], special_id, max_shift, W, normalize)


def _launch_emissions(logits, stride_b, stride_t, n, frame_offset, T, V, targets, input_lengths, target_lengths,
                      observed, special_id, max_shift, W, normalize, grad=None, grad_strides=(0, 0), row_scale=None):
    """``_emissions_kernel`` over n output rows: the whole tensor (``frame_offset=None``) or a window of the
    rows given (the module docstring's "Windows"); returns ``(lse [n], table [n, W], special [n])``, and with
    ``grad`` (the two-pass path: ``row_scale * softmax`` written there, in the same sweep) also
    ``(soft_target [n, W], soft_special [n])``."""
    device = logits.device
    lse = torch.empty((n,), dtype=torch.float32, device=device)
    table = torch.empty((n, W), dtype=torch.float32, device=device)
    special = torch.empty((n,), dtype=torch.float32, device=device)
    write_grad = grad is not None
    soft_target = torch.empty((n, W) if write_grad else (0,), dtype=torch.float32, device=device)
    soft_special = torch.empty((n,) if write_grad else (0,), dtype=torch.float32, device=device)
    outputs = (lse, table, special) + ((soft_target, soft_special) if write_grad else ())
    if n == 0 or V == 0:
        return tuple(x.zero_() for x in outputs)
    targets = targets.contiguous()
    input_lengths = input_lengths.to(torch.int64).contiguous()
    target_lengths = target_lengths.to(torch.int64).contiguous()
    has_observed = observed is not None
    observed_arg = observed if has_observed else input_lengths  # a dummy pointer when absent
    stride_ob, stride_ot = (observed_arg.stride(0), observed_arg.stride(1)) if has_observed else (0, 0)
    in_place = write_grad and aliases(grad, logits)
    row_scale = (row_scale.to(torch.float32).contiguous() if write_grad else lse)  # lse: a dummy pointer
    args = (logits, targets, input_lengths, target_lengths, observed_arg, lse, table, special,
            grad if write_grad else lse, row_scale, soft_target, soft_special,
            T, V, targets.shape[1], W, int(special_id), int(max_shift), frame_offset or 0,
            stride_b, stride_t, targets.stride(0), stride_ob, stride_ot, *grad_strides)
    with device_guard(device):
        _emissions_kernel[(n,)](*args, HAS_OBSERVED=has_observed, NORMALIZE=bool(normalize),
                                WINDOW=frame_offset is not None, WRITE_GRAD=write_grad, IN_PLACE=in_place,
                                **emissions_config(V, W, logits.element_size(), small=small_blocks()))
    return outputs


def emissions_grad(logits, targets, input_lengths, target_lengths, observed, special_id: int, max_shift: int,
                   band_width: int, row_scale, grad):
    """Stage 1 of the two-pass path (``csrc/ops.cpp``): :func:`emissions`' outputs, and in the same sweep over
    each row ``round(row_scale[b] * softmax)`` written into ``grad`` ``[B, T, V]`` (which may be ``logits``);
    returns ``(lse, table, special, soft_target [B, T, W], soft_special [B, T])``."""
    if logits.dtype == torch.float64:
        from mdlm_ctc.reference import emissions_grad_reference

        return emissions_grad_reference(logits, targets, input_lengths, target_lengths, observed, special_id,
                                        max_shift, band_width, row_scale, grad)
    B, T, V = logits.shape
    W = int(band_width)
    check_grad_buffer("emissions_grad", grad, logits)
    outputs = _launch_emissions(logits, logits.stride(0), logits.stride(1), B * T, None, T, V, targets, input_lengths,
                                target_lengths, observed, special_id, max_shift, W, True, grad,
                                (grad.stride(0), grad.stride(1)), row_scale)
    lse, table, special, soft_target, soft_special = outputs
    return lse.view(B, T), table.view(B, T, W), special.view(B, T), soft_target.view(B, T, W), soft_special.view(B, T)


def emissions_grad_window(logits, frame_offset: int, frames_per_row: int, targets, input_lengths, target_lengths,
                          observed, special_id: int, max_shift: int, band_width: int, row_scale, grad):
    """:func:`emissions_grad` over a window of frames (:func:`emissions_window`'s layout; the fused LM head's
    gradient in the forward): ``grad`` ``[n, V]`` may be ``logits``."""
    if logits.dtype == torch.float64:
        from mdlm_ctc.reference import emissions_grad_window_reference

        return emissions_grad_window_reference(logits, frame_offset, frames_per_row, targets, input_lengths,
                                               target_lengths, observed, special_id, max_shift, band_width,
                                               row_scale, grad)
    n, V = check_window("emissions_grad_window", logits, frame_offset, frames_per_row, input_lengths)
    W = int(band_width)
    if W < 1:
        raise ValueError(f"emissions_grad_window: `band_width` must be >= 1; got {band_width}")
    check_grad_buffer("emissions_grad_window", grad, logits)
    T = int(frames_per_row)
    first, stop = window_rows(frame_offset, n, T)
    rows = slice(first, stop)
    return _launch_emissions(logits, 0, logits.stride(0), n, int(frame_offset) - first * T, T, V, targets[rows],
                             input_lengths[rows], target_lengths[rows], None if observed is None else observed[rows],
                             special_id, max_shift, W, True, grad, (0, grad.stride(0)), row_scale[rows])


# ---------------------------------------------------------------------------------------------
# host-side helpers shared by the launchers of emissions.py, slack_ctc.py and grad.py
# ---------------------------------------------------------------------------------------------

def window_rows(frame_offset: int, n: int, T: int) -> tuple[int, int]:
    """The batch rows ``[first, stop)`` that the flat frames ``frame_offset .. frame_offset + n - 1`` touch
    (host integers: no device value is read)."""
    first = int(frame_offset) // int(T)
    return first, (int(frame_offset) + max(int(n), 1) - 1) // int(T) + 1


def check_window(op: str, logits, frame_offset, frames_per_row, input_lengths) -> tuple[int, int]:
    """Shape checks of a windowed stage (host-side, no sync); returns ``(n, v)``: frames and vocabulary."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{op}: `logits` must be a 2-D [frames, vocabulary] tensor; got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    n = logits.shape[0]
    T, offset = int(frames_per_row), int(frame_offset)
    if T < 1:
        raise ValueError(f"{op}: `frames_per_row` must be >= 1; got {frames_per_row}")
    B = input_lengths.shape[0]
    if offset < 0 or offset + n > B * T:
        raise ValueError(f"{op}: the window of frames [{offset}, {offset + n}) (`frame_offset`, `logits`) is "
                         f"outside the B*T = {B * T} frames")
    return n, logits.shape[1]


def check_grad_buffer(op: str, grad, logits) -> None:
    """The two-pass gradient buffer: logits' shape and dtype, the vocabulary contiguous; if it is the logits'
    memory, the same strides (the in-place mode)."""
    if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != logits.device:
        raise ValueError(f"{op}: `grad` must be {tuple(logits.shape)} {logits.dtype} on {logits.device}; got "
                         f"{tuple(grad.shape)} {grad.dtype} on {grad.device}")
    if grad.numel() > 0 and grad.shape[-1] > 1 and (grad.stride(-1) != 1 or logits.stride(-1) != 1):
        raise ValueError(f"{op}: `grad` and `logits` must be contiguous in the vocabulary dimension")
    if aliases(grad, logits) and grad.stride() != logits.stride():
        raise ValueError(f"{op}: `grad` aliases the logits with different strides")


def aliases(out, logits) -> bool:
    """``out`` is the logits' buffer (the in-place modes)."""
    return out.numel() > 0 and (out is logits or (out.device.type != "meta" and out.data_ptr() == logits.data_ptr()))


def interpreted() -> bool:
    """Running under the Triton interpreter (CPU tensors, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def small_blocks() -> bool:
    """The launchers' tiny interpreter tiles (several tiles at toy sizes); ``MDLM_CTC_TRITON_GPU_BLOCKS=1``
    makes the interpreter run the block sizes a GPU gets (the GPU-shaped tests)."""
    return interpreted() and os.environ.get("MDLM_CTC_TRITON_GPU_BLOCKS", "0") != "1"


def autotune_enabled(device: torch.device) -> bool:
    """``MDLM_CTC_AUTOTUNE=0`` pins the default configs (tests and CI set it); on by default on a GPU.

    Only the gradient's dense kernel is autotuned: it computes every element on its own, so the
    config changes its speed and never its bits (tests/test_slack_ctc_triton.py runs every config).
    Autotuning times the configs on the first call of each vocabulary size and dtype, running the
    kernel several times, so it is used for the out-of-place gradient only; never under the
    interpreter, and never while a CUDA graph is being captured (the timing synchronises).
    """
    if os.environ.get("MDLM_CTC_AUTOTUNE", "1") == "0" or interpreted() or device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, whatever the current device is."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a GPU (queried once, at call time, never at import)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
