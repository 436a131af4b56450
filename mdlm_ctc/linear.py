"""Fused linear slack-CTC: the loss from hidden states and the LM head, without materialising logits.

Maths (SPEC §3, background/kernels.md §4.4). With z = h W^T + b the logits of a frame and
lse = logsumexp_v z, the loss is exactly ``slack_ctc_loss(z, ...)``; the lattice only reads the band
emission table e[t, j] = z[t, y_u] - lse[t] (plus the ``<slack>`` column), and the gradient is

    dz[t, v] = g_b * (softmax(z_t)[v] - gamma_t(v))          (gamma: the sparse posteriors, <= W + 1 columns)
    dH = dz W,   dW = dz^T H,   db = sum_t dz[t]

so nothing ``[B, T, V]``-sized is needed beyond one tile of z at a time.

Layouts. ``hidden`` [B, T, D] is viewed as N = B*T flat frames (frame i = b*T + t); ``weight`` [V, D];
``bias`` [V]. The forward keeps, per frame, lse [N] and the posterior table of the lattice
(``csrc/lattice.h``): ``post_target`` [B, T, W] (target column column_lo(t+1) + j) and
``post_special`` [B, T]; that is O(N * W), independent of V.

Design: two paths, chosen per call (``gradient_in_forward_choice``, host integers only).

**Gradient in the forward** (Liger-style, 3 GEMMs). dz = g w (softmax - gamma): its softmax part needs no
lattice, so while each chunk is hot the forward adds it to the gradients and only the sparse posterior
part waits for the backward:

* forward: per chunk of ``chunk_size`` frames, z = h W^T + b (GEMM 1) into one reused buffer; the
  backend's ``emissions_grad_window`` (``csrc/ops.cpp``) gives the emission tables and turns z in place
  into round(w softmax) (w: the row's share of the reduced loss, ``row_weight`` included), keeping the
  fp32 softmax at the band's columns; then dH[chunk] = z W (GEMM 2) and dW += z^T H (GEMM 3), db += sum z,
  into fp32 accumulators. The buffer is free again before the lattice runs; no logits are kept.
* backward: the accumulators are scaled by the upstream gradient g (a scalar), and at each live frame's
  band tokens and special token ``delta = exact - g round(w softmax)`` is added, ``exact = g w (softmax -
  posterior)`` from the backend's ``band_values_window`` (so a band token ends with the materialised
  path's rounding of dz). Per block of frames of one row the writers lie within ``block + W - 1`` target
  positions: dH += Delta W[positions] (a gather of head-weight rows), dW[tokens] += Delta^T H (a scatter
  into them; repeated rows accumulated in a fixed order: ``index_add_`` on the CPU, ``index_put_`` with
  ``accumulate`` on a GPU), db likewise, and the special token as a rank-1 update. That costs about
  ``2 x 2 N (block + W) D`` FLOPs against the ``2 N V D`` of the GEMM it saves.
* taken when the correction costs under a quarter of that GEMM, the reduction is a scalar (``none``
  with per-row upstream gradients cannot rescale a dW already summed over rows: pass ``row_weight=``
  instead), without ``zero_infinity`` (a row the lattice finds infeasible would already have its softmax
  in dW; without it such a row's gradient is NaN, as PyTorch's), and when its [V, D] fp32 dW accumulator
  (low-precision inputs over several chunks) is no larger than one chunk of logits (at G4, V = 126,464,
  D = 4,096, chunk 1,024: 2.07 GB against 247 MiB, so G4 keeps the recompute path unless the chunk is
  8,192 frames). ``MDLM_CTC_GRADIENT_IN_FORWARD=1``/``0`` overrides the cost (not the conditions).

**Recompute** (store-free, 4 GEMMs; 3 when one chunk holds every frame):

* forward: for each chunk of ``chunk_size`` frames, z = h_chunk W^T + b [chunk, V] (GEMM 1) into one
  reused buffer, then the backend's ``emissions_window`` stage on it (``csrc/ops.cpp``: the
  vocabulary pass over a window of the flat frames, which may cut a row); then the backend's lattice
  (C++ on CPU, the Triton lattice on GPU) over the whole [B, T, W] table, which is small and which it
  overwrites with the posteriors.
* backward: per tile of frames x vocabulary, the logits are recomputed into one reused buffer (GEMM 2)
  and the backend's ``gradient_window`` stage turns them into dz in place (softmax times g minus the
  posteriors of the tile's tokens, with the backend's NaN / observed / infeasible rules); dH += dz W_tile
  (GEMM 3), dW_tile = dz^T H (GEMM 4), db_tile = sum dz. The loop order makes the fp32 accumulator the
  smaller of dH [N, D] and dW [V, D]: vocabulary tiles outside when N <= V (each dW tile is then one
  GEMM over all N frames, rounded once), frame chunks outside otherwise.
* one chunk holding every frame (N <= chunk_size): the forward's buffer is kept for the backward, whose
  one tile uses it instead of GEMM 2 (3 GEMMs, as materialising). The peak is unchanged (the tile would
  allocate the same buffer), but the buffer lives from the forward to the backward; not under
  ``torch.compile`` (whose functionalisation would copy a buffer the backward overwrites), and a second
  backward (``retain_graph``) recomputes. Below one row per chunk nothing can be kept: the posteriors
  of any frame need the lattice over its whole row, so a chunk's logits are gone before its gradient
  is known, and the recompute is the price of the memory bound.

Both: on the CPU the chunk buffers come from the C++ kernels' buffer pool (``backends.work_buffer``), so
a call does not page-fault and zero a fresh mmap of tens of MB for each of them. A second backward
through a retained graph takes the recompute path (the first consumed the accumulators).

An earlier alternative, chunked by whole sequences with the gradient computed in the forward from the
materialised stages (provider ``rows`` of ``benchmarks/bench_linear_slack_ctc.py``), needed a chunk of
at least one sequence (T*V logits) and ran its lattice once per chunk between GEMMs; the gradient in the
forward above keeps any chunk size and one lattice.

Measurements. The design comparison above was measured on this project's 2-core CPU at D=512 with an
earlier version of this module (rows in ``benchmarks/results/linear_slack_ctc.jsonl``). This version, at
N=4096, D=256, V=32,000 on a 2-core AMD EPYC VM: memory one process per configuration
(``bench_linear_slack_ctc.py --isolated``, ``benchmarks/results/linear_slack_ctc_cpu_memory.md``): the CPU
allocator's peak (pooled buffers included) is one chunk of logits + the returned gradients + the band
tables (1.02x in fp32, 1.11x in bf16: the fp32 dH accumulator). bf16 time side by side
(``--workloads cpu-bf16``, two runs in ``linear_slack_ctc.jsonl``): 0.84-0.91x materialised's CPU
seconds at the default chunk (4,096 frames: one chunk, kept logits, 3 GEMMs), 1.06-1.17x at chunk 1024
(4 GEMMs); GEMMs are about 80% of the time at this D, so the recompute GEMM is what chunks shorter than
the batch cost (in fp32 too, whose default chunk here is 2,048 frames). GPU figures (G4) are unmeasured.

Default chunk. ``default_chunk_size``: a byte budget (256 MiB of logits), since memory is what a chunk
costs; it keeps G4's 1,024 frames and lets a batch whose logits fit be one chunk, so the backward reuses
the forward's logits.

Paths. Every stage comes from the backend: ``backends.window_stages(backend)`` (emissions and gradient
over a window; the C++ kernels on CPU, the torch ops for ``reference``, and for ``triton`` and ``cuda``
the Triton kernels of the materialised path, run over the window: ``emissions_window``,
``gradient_window`` in ``triton_kernels``, the same bits per frame) and ``backends.stages(backend)``'s
lattice. No probe and no host synchronisation on the hot path: with ``validate=False`` (and
``band_bound``) a call can be captured in a CUDA graph after one eager warm-up call, which compiles the
Triton kernels (and sets up cuBLAS) (tests/test_linear_slack_ctc.py, GPU-only; unrun so far).

Exactness. Same maths as the materialised loss: z is computed in the input dtype as ``F.linear``
(one rounding of h W^T + b), lse/softmax/posteriors in fp32 (fp64 for fp64 input), dz rounded once
to the input dtype; dH accumulates over vocabulary tiles and dW over frame chunks in fp32 (fp64), and
the result is cast once (for bf16/fp16 on the CPU and without cuBLAS's fp32-output GEMM, each tile's
product is rounded to the input dtype before the fp32 sum). No gradient filtering. Deterministic:
GEMMs, fixed-order reductions, and the posteriors of equal tokens in one frame summed in band order.

Op layer. ``mdlm_ctc::linear_lattice_forward`` (the reduced loss: ``row_weight`` and the reduction
applied inside, as ``_ops.py``), ``mdlm_ctc::linear_lattice_backward`` (recompute) and
``mdlm_ctc::linear_gradient_correction`` (the gradient in the forward's backward, in place on its
accumulators) are ``torch.library`` custom ops with fake kernels and registered autograd, so
``torch.compile`` treats the loss as one opaque node.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from . import _validation, backends
from ._ops import REDUCTION_CODES, refuse_unsupported_backward, row_weight_gradient, upstream_rows
from .losses import SlackCTCLoss
from . import reference
from .reference import PRESERVE, acc_dtype, band_links

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""The default chunk's logits budget: 256 MiB (``default_chunk_size``)."""

_CHUNK_ALIGN = 128  # default chunks are whole multiples of this many frames


def default_chunk_size(vocab: int, itemsize: int) -> int:
    """Frames per chunk when ``chunk_size`` is not given: as many as ``DEFAULT_CHUNK_BYTES`` of logits hold,
    rounded down to a multiple of 128, at least 128.

    A budget in bytes, not in frames, because memory is what a chunk costs: 1,024 frames of bf16 logits at
    V = 126,464 (G4, 247 MiB), 4,096 at V = 32,000 (so a batch of 4,096 tokens is one chunk, whose logits
    the backward reuses: 3 GEMMs, not 4), 2,048 in fp32 at V = 32,000.
    """
    frames = DEFAULT_CHUNK_BYTES // (max(int(vocab), 1) * max(int(itemsize), 1))
    return max(_CHUNK_ALIGN, frames // _CHUNK_ALIGN * _CHUNK_ALIGN)


_MIN_VOCAB_TILE = 1024  # narrower vocabulary tiles make the backward GEMMs inefficient


# ---------------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------------

def _gather_sharded(x: Optional[Tensor]) -> Optional[Tensor]:
    """A sharded ``DTensor`` head weight/bias (FSDP2 outside its forward) as the full tensor.

    All-gathered with ``full_tensor(grad_placements=Partial)``: each rank's gradient is the gradient of its
    own loss, a partial sum, so backward reduce-scatters the ranks' gradients (summed) into the shards.
    (Inside an FSDP2 forward the loop passes the already unsharded parameter, a plain tensor.)"""
    if x is None or type(x).__name__ != "DTensor":
        return x
    from torch.distributed.tensor import Partial

    return x.full_tensor(grad_placements=[Partial()] * x.device_mesh.ndim)


def _autocast(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Under ``torch.autocast`` cast like ``F.linear`` would (float64 stays), so that a bf16 model
    with fp32 master weights can call the loss directly; the casts are differentiable."""
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        return hidden, weight, bias
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(x):
        if isinstance(x, Tensor) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return x.to(dtype)
        return x

    return cast(hidden), cast(weight), cast(bias)


def check_linear_args(hidden, weight, bias, targets, target_lengths, slack_id, input_lengths, collapse, max_shift,
                      observed, reduction, zero_infinity, backend, validate, chunk_size, band_bound=None):
    """Checks of ``linear_slack_ctc_loss`` (SPEC §4); returns ``(LatticeArgs, chunk_size)``.

    The hidden/weight/bias checks are specific; everything else is the shared ``slack_ctc_loss``
    checking, run against a stand-in for the logits (a stride-0 ``[B, T, V]`` view of one element).
    """
    check_tensor = _validation.check_tensor
    check_tensor(hidden, "hidden", ndim=3, ndim_text="3-D (batch, time, hidden size)", floating=True)
    check_tensor(weight, "weight", ndim=2, ndim_text="2-D (vocab, hidden size), like nn.Linear.weight",
                 floating=True)
    B, T, D = hidden.shape
    V, D_w = weight.shape
    if D_w != D:
        raise ValueError(f"`weight` must have shape (vocab, {D}) to match `hidden` of shape {tuple(hidden.shape)}; "
                         f"got {tuple(weight.shape)}")
    if V == 0:
        raise ValueError(f"`weight` must have at least one row (the vocabulary); got shape {tuple(weight.shape)}")
    _validation.check_same_device(weight, "weight", hidden.device, "hidden")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"`weight` is {weight.dtype} but `hidden` is {hidden.dtype}; pass both in one dtype "
                        f"(or call under torch.autocast)")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, ndim_text="1-D (vocab,)", floating=True)
        if bias.shape[0] != V:
            raise ValueError(f"`bias` must have shape ({V},) to match `weight`; got {tuple(bias.shape)}")
        _validation.check_same_device(bias, "bias", hidden.device, "hidden")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"`bias` is {bias.dtype} but `hidden` is {hidden.dtype}; pass one dtype")
    if chunk_size is None:
        chunk_size = default_chunk_size(V, hidden.element_size())
    chunk_size = _validation.check_int(chunk_size, "chunk_size", low=1)
    logits_stand_in = hidden.new_empty(()).expand(B, T, V)
    args = _validation.check_slack_ctc_args(logits_stand_in, targets, target_lengths, slack_id, input_lengths,
                                            collapse, max_shift, observed, reduction, zero_infinity, backend,
                                            validate, name="hidden", band_bound=band_bound)
    return args, chunk_size


# ---------------------------------------------------------------------------------------------
# the GEMMs
# ---------------------------------------------------------------------------------------------

_wide_gemm_failed = False  # set once if this torch has no fp32-output low-precision GEMM on CUDA


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b``; ``out`` may be wider (fp32) than ``a``, ``b`` (bf16/fp16).

    Wider: on CUDA, cuBLAS with an fp32 output (``out_dtype``, torch >= 2.8) reads and writes the
    accumulator in its epilogue, so the product is never rounded to the operands' dtype; without it
    (and on the CPU, whose ``mm`` has no ``out_dtype`` and whose bf16 GEMM is 3x its fp32 one here),
    the product is computed in the operands' dtype (rounded once) and added to ``out`` in fp32. No
    probe, no host synchronisation: an unsupported ``out_dtype`` raises on the host before any launch.
    """
    global _wide_gemm_failed
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.is_cuda and not _wide_gemm_failed:
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _wide_gemm_failed = True
    product = torch.mm(a, b)  # [rows, D] or [v, D] in the operands' dtype: small next to a chunk of logits
    if accumulate:
        out.add_(product)
    else:
        out.copy_(product)


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out = h @ weight.T (+ bias)`` in the input dtype, as ``F.linear`` computes it; the forward and the
    backward's recompute both go through here."""
    if bias is not None:
        return torch.addmm(bias, h, weight.t(), out=out)
    return torch.mm(h, weight.t(), out=out)


# ---------------------------------------------------------------------------------------------
# the two passes over the frames, on the backend's windowed stages
# ---------------------------------------------------------------------------------------------

def _forward(hidden, weight, bias, targets, input_lengths, target_lengths, observed, special_id, mode, max_shift,
             band_width, need_grad, chunk_size, keep_logits, backend):
    """Per chunk of frames: GEMM 1 into one ``[n, V]`` buffer, the backend's ``emissions_window`` on
    it; then the backend's lattice over the whole band table. With ``keep_logits`` (one chunk holds
    every frame) the buffer is returned, [N, V], for the backward to use instead of recomputing it."""
    B, T, D, V, N, W, acc, h, shift = _geometry(hidden, weight, band_width, mode, max_shift)
    device = hidden.device
    emissions_window, _ = backends.window_stages(backend)
    lse, table, special = _frame_tables(N, W, acc, device)
    buffer = backends.work_buffer(h, min(N, chunk_size) * V)  # one buffer, reused by every chunk
    for start in range(0, N, chunk_size):
        stop = min(N, start + chunk_size)
        logits = buffer[: (stop - start) * V].view(stop - start, V)
        _logits_into(logits, h[start:stop], weight, bias)
        lse[start:stop], table[start:stop], special[start:stop] = emissions_window(
            logits, start, T, targets, input_lengths, target_lengths, observed, special_id, shift, W, True)
    kept = buffer.view(N, V) if _kept_rows(N, chunk_size, keep_logits) else hidden.new_empty((0, V))
    del buffer
    _, lattice_band, _ = backends.stages(backend)
    table, special = table.view(B, T, W), special.view(B, T)
    nll = lattice_band(table, special, targets, input_lengths, target_lengths, mode, shift, need_grad)
    if not need_grad:
        table, special = table.new_empty((B, T, 0)), special.new_empty((B, 0))
    return nll, lse.view(B, T), table, special, kept


def _geometry(hidden, weight, band_width, mode, max_shift):
    """``(B, T, D, V, N, W, acc, h, shift)`` of a forward: the sizes, the table width, the accumulation dtype,
    the hidden states as ``[N, D]`` frames and the band's max_shift (-1 for standard CTC)."""
    B, T, D = hidden.shape
    N = B * T
    return (B, T, D, weight.shape[0], N, max(band_width, 1), acc_dtype(hidden.dtype), hidden.reshape(N, D),
            max_shift if mode == PRESERVE else -1)


def _frame_tables(N: int, W: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised per-frame tables ``([N], [N, W], [N])``: lse, the band table and the special column (or the
    band softmax's ``[N]`` scratch, and its two tables)."""
    return (torch.empty(N, dtype=dtype, device=device), torch.empty(N, W, dtype=dtype, device=device),
            torch.empty(N, dtype=dtype, device=device))


def _kept_rows(N: int, chunk_size: int, keep_logits: bool) -> int:
    """Rows of the logits the forward keeps for the backward: all N when asked and one chunk holds them."""
    return N if keep_logits and N <= chunk_size else 0


def _tiling(N: int, V: int, chunk_size: int):
    """``(vocab_outer, frames_per_tile, vocab_per_tile)`` for the backward, at most ``chunk_size * V``
    logits per tile. Vocabulary outside when N <= V: the fp32 accumulator is then dH [N, D]."""
    budget = max(chunk_size, 1) * V
    if N == 0:
        return True, 1, V
    if N <= V:
        narrowest = min(V, _MIN_VOCAB_TILE)
        frames = N if budget >= N * narrowest else max(1, budget // narrowest)
        return True, frames, min(V, max(1, budget // frames))
    return False, min(N, chunk_size), V


def _backward(grad_nll, hidden, weight, bias, lse, targets, input_lengths, target_lengths, observed, post_target,
              post_special, nll, special_id, mode, max_shift, zero_infinity, need_hidden, need_weight, need_bias,
              chunk_size, backend, kept=None):
    """Per tile of frames x vocabulary: GEMM 2 recomputes the logits into one buffer, the backend's
    ``gradient_window`` turns them into dz in place, GEMMs 3 and 4 (and the bias sum) take dz. ``kept``
    (the forward's logits, one tile) replaces GEMM 2 and is overwritten with dz."""
    B, T, D = hidden.shape
    V = weight.shape[0]
    N, W = B * T, post_target.shape[2]
    dtype, device = hidden.dtype, hidden.device
    acc = acc_dtype(dtype)
    h = hidden.reshape(N, D)
    flat_lse, flat_special, flat_target = lse.reshape(N), post_special.reshape(N), post_target.reshape(N, W)
    shift = max_shift if mode == PRESERVE else -1
    _, gradient_window = backends.window_stages(backend)

    grad_hidden = grad_weight = grad_bias = None
    low_precision = acc != dtype
    vocab_outer, frames_per_tile, vocab_per_tile = _tiling(N, V, chunk_size)
    frame_starts = list(range(0, N, frames_per_tile))
    vocab_starts = list(range(0, V, vocab_per_tile))
    if need_hidden:
        direct = not low_precision or len(vocab_starts) == 1
        grad_hidden = torch.zeros(N, D, dtype=dtype if direct else acc, device=device)
    if need_weight:
        direct = not low_precision or len(frame_starts) == 1
        grad_weight = torch.zeros(V, D, dtype=dtype if direct else acc, device=device)
    if need_bias:
        grad_bias = torch.zeros(V, dtype=acc, device=device)
    reuse = kept is not None
    if reuse and (len(frame_starts), len(vocab_starts)) != (1, 1):
        raise RuntimeError("mdlm_ctc: kept logits need a backward of one tile")  # keep_logits implies N <= chunk
    buffer = kept.view(-1) if reuse else backends.work_buffer(h, min(N, frames_per_tile) * min(V, vocab_per_tile))

    def tile(fi, start, vi, v0):
        stop, v1 = min(N, start + frames_per_tile), min(V, v0 + vocab_per_tile)
        dz = buffer[: (stop - start) * (v1 - v0)].view(stop - start, v1 - v0)
        if not reuse:
            _logits_into(dz, h[start:stop], weight[v0:v1], None if bias is None else bias[v0:v1])
        gradient_window(grad_nll, dz, start, T, v0, V, flat_lse[start:stop], targets, input_lengths, target_lengths,
                        observed, flat_target[start:stop], flat_special[start:stop], nll, special_id, shift,
                        zero_infinity, True, dz)
        if grad_hidden is not None:
            _mm_into(grad_hidden[start:stop], dz, weight[v0:v1], accumulate=vi > 0)
        if grad_weight is not None:
            _mm_into(grad_weight[v0:v1], dz.t(), h[start:stop], accumulate=fi > 0)
        if grad_bias is not None:
            grad_bias[v0:v1] += dz.sum(0, dtype=acc)

    if vocab_outer:
        for vi, v0 in enumerate(vocab_starts):
            for fi, start in enumerate(frame_starts):
                tile(fi, start, vi, v0)
    else:
        for fi, start in enumerate(frame_starts):
            for vi, v0 in enumerate(vocab_starts):
                tile(fi, start, vi, v0)
    del buffer

    grad_hidden = hidden.new_empty(0) if grad_hidden is None else grad_hidden.to(dtype).view(B, T, D)
    grad_weight = hidden.new_empty(0) if grad_weight is None else grad_weight.to(dtype)
    grad_bias = hidden.new_empty(0) if grad_bias is None else grad_bias.to(dtype)
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# the gradient in the forward (Liger-style): 3 GEMMs, a sparse posterior correction in the backward
# ---------------------------------------------------------------------------------------------

def correction_block(band_width: int) -> int:
    """Frames per block of the sparse correction: a block's band positions span ``block + W - 1`` target
    positions, whose head-weight rows are gathered once for the block (memory ~ (1 + W / block) N D)."""
    return max(64, min(1024, 1 << max(int(band_width) - 1, 1).bit_length()))


def gradient_in_forward_choice(N: int, V: int, D: int, band_width: int, chunk_size: int, itemsize: int,
                               reduction: int, zero_infinity: bool) -> bool:
    """Whether the fused head accumulates the gradient's softmax part in the forward (host integers only).

    The forward's softmax part replaces the backward's recompute GEMM (``2 N V D`` FLOPs) by a sparse
    correction of two GEMMs over the blocks' band positions (``2 x 2 N (block + W - 1) D``); it is taken when
    that costs under a quarter of the GEMM it saves, when the reduction is a scalar (``none`` with an arbitrary
    per-row upstream gradient cannot rescale a dW already summed over rows; ``weight=`` can), without
    ``zero_infinity`` (a row the lattice finds infeasible would have its softmax already summed into dW), and
    when the fp32 dW accumulator that low-precision inputs need across chunks ([V, D], 4 V D bytes) is no
    larger than one chunk of logits. ``MDLM_CTC_GRADIENT_IN_FORWARD`` (``1`` / ``0``) overrides the cost."""
    from ._ops import REDUCTION_CODES, gradient_in_forward_setting

    if reduction == REDUCTION_CODES["none"] or zero_infinity:
        return False
    setting = gradient_in_forward_setting()
    if setting != "auto":
        return setting == "1"
    block = correction_block(band_width)
    cheap = 4 * (block + band_width) <= V / 2
    one_chunk = N <= chunk_size
    accumulator_fits = itemsize >= 4 or one_chunk or 4 * D <= chunk_size * itemsize
    return cheap and accumulator_fits


def _forward_with_gradient(hidden, weight, bias, targets, input_lengths, target_lengths, observed, special_id, mode,
                           max_shift, band_width, row_scale, chunk_size, need_hidden, need_weight, need_bias,
                           backend):
    """Per chunk of frames: GEMM 1 into one ``[n, V]`` buffer, the backend's ``emissions_grad_window`` turns it
    into ``row_scale * softmax`` in place (and gives the band's softmax), then GEMM 2 (``dH = dz W``) and GEMM 3
    (``dW += dz^T H``) while the chunk is hot; the lattice over the whole band table at the end. Returns
    ``(nll, lse, post_target, post_special, soft_target, soft_special, dH, dW, db)``: the accumulators in the
    accumulation dtype (an empty one where no gradient is needed)."""
    B, T, D, V, N, W, acc, h, shift = _geometry(hidden, weight, band_width, mode, max_shift)
    device = hidden.device
    emissions_grad_window, _ = backends.window_two_pass_stages(backend)
    lse, table, special = _frame_tables(N, W, acc, device)
    _, soft_target, soft_special = _frame_tables(N, W, acc, device)
    grad_hidden = torch.empty(N, D, dtype=acc, device=device) if need_hidden else hidden.new_empty(0, dtype=acc)
    grad_weight = torch.empty(V, D, dtype=acc, device=device) if need_weight else hidden.new_empty(0, dtype=acc)
    grad_bias = torch.zeros(V, dtype=acc, device=device) if need_bias else hidden.new_empty(0, dtype=acc)
    if need_weight and N == 0:
        grad_weight.zero_()
    buffer = backends.work_buffer(h, min(N, chunk_size) * V)
    for start in range(0, N, chunk_size):
        stop = min(N, start + chunk_size)
        dz = buffer[: (stop - start) * V].view(stop - start, V)
        _logits_into(dz, h[start:stop], weight, bias)
        (lse[start:stop], table[start:stop], special[start:stop], soft_target[start:stop],
         soft_special[start:stop]) = emissions_grad_window(dz, start, T, targets, input_lengths, target_lengths,
                                                           observed, special_id, shift, W, row_scale, dz)
        if need_hidden:
            _mm_into(grad_hidden[start:stop], dz, weight, accumulate=False)
        if need_weight:
            _mm_into(grad_weight, dz.t(), h[start:stop], accumulate=start > 0)
        if need_bias:
            grad_bias += dz.sum(0, dtype=acc)
    del buffer
    _, lattice_band, _ = backends.stages(backend)
    table, special = table.view(B, T, W), special.view(B, T)
    nll = lattice_band(table, special, targets, input_lengths, target_lengths, mode, shift, True)
    return nll, lse.view(B, T), table, special, soft_target, soft_special, grad_hidden, grad_weight, grad_bias


def _correct(grad_loss, hidden, weight, targets, input_lengths, target_lengths, observed, soft_target, soft_special,
             post_target, post_special, nll, row_scale, special_id, shift, chunk_size, backend, grad_hidden,
             grad_weight, grad_bias):
    """The backward of the gradient in the forward, in place on the accumulators (which hold the softmax part,
    ``sum_v round(w softmax_v) W_v`` and so on): scale them by the upstream gradient g (a scalar), then add, at
    each live frame's band tokens and special token, ``delta = exact - g round(w softmax)`` with ``exact = g w
    (softmax - posterior)`` from the backend's ``band_values_window`` (so a band token ends with the
    materialised path's rounding of dz). Per block of frames of one row (:func:`_correct_blocks`):
    ``dH += Delta @ W[positions]`` (a gather of head-weight rows), ``dW[tokens] += Delta^T @ H`` (a scatter
    into them, deterministic: repeated rows are accumulated in a fixed order), ``db[tokens] += sum Delta``, and
    the special token's rank-1 update. Frames of an infeasible row make their dH rows, dW and db NaN (PyTorch's
    convention), as the materialised path."""
    B, T, D = hidden.shape
    N, W = B * T, soft_target.shape[-1]
    acc = soft_target.dtype
    g = grad_loss.to(acc).reshape(())
    for accumulator in (grad_hidden, grad_weight, grad_bias):
        accumulator.mul_(g)
    if N == 0:
        return
    device = hidden.device
    U_max = targets.shape[1]
    U_b = target_lengths.long().clamp(0, U_max)
    tokens, next_same = (band_links(targets, U_b, weight.shape[0])[::2] if U_max > 0 else (None, None))
    inputs = dict(g=g, hidden=hidden, weight=weight, targets=targets, input_lengths=input_lengths,
                  target_lengths=target_lengths, observed=observed, soft_target=soft_target, soft_special=soft_special,
                  post_target=post_target.reshape(N, W), post_special=post_special.reshape(N), nll=nll,
                  row_scale=row_scale, special_id=special_id, shift=shift, backend=backend, tokens=tokens,
                  next_same=next_same)
    block = correction_block(W)
    per_row = -(-T // block)
    span = block + W - 1
    # blocks in batches whose temporaries (gathered fp32 head-weight rows, Delta, hidden rows, the band's
    # positions and values) stay under one chunk of logits and 64 MiB: a batch is a window of whole frames
    per_block = 4 * (span * D + block * (span + D + 10 * W))
    budget = min(64 * 2**20, chunk_size * weight.shape[0] * hidden.element_size())
    blocks_per_batch = max(1, budget // per_block)
    for first in range(0, B * per_row, blocks_per_batch):
        last = min(B * per_row, first + blocks_per_batch) - 1
        start = (first // per_row) * T + (first % per_row) * block
        stop = (last // per_row) * T + min(T, (last % per_row) * block + block)
        _correct_blocks(start, stop, first, last + 1, per_row, block, **inputs, grad_hidden=grad_hidden,
                        grad_weight=grad_weight, grad_bias=grad_bias)
    # an infeasible row: NaN at its free frames' dH rows, and (as every dz column is NaN) in all of dW and db
    frames = torch.arange(N, device=device)
    row, t = frames // T, frames % T
    free = t < input_lengths.long().clamp(0, T)[row]
    if observed is not None:
        free = free & (observed.reshape(-1) < 0)
    poisoned = free & (nll == float("inf"))[row]
    if grad_hidden.numel():
        grad_hidden.masked_fill_(poisoned[:, None], float("nan"))
    any_poisoned = poisoned.any()
    for accumulator in (grad_weight, grad_bias):
        if accumulator.numel():
            accumulator.masked_fill_(any_poisoned, float("nan"))


def _correct_blocks(start, stop, first_block, stop_block, per_row, block, *, g, hidden, weight, targets, input_lengths,
                    target_lengths, observed, soft_target, soft_special, post_target, post_special, nll, row_scale,
                    special_id, shift, backend, tokens, next_same, grad_hidden, grad_weight, grad_bias):
    """The corrections of the blocks ``first_block .. stop_block - 1`` (block i: row i // per_row, frames
    ``(i % per_row) * block`` on; the last block of a row padded), whose frames are ``start .. stop - 1``.

    A block's writers (each token's last slot in a frame's band: one per token and frame) lie at target
    positions ``p0 .. p0 + block + W - 2``, ``p0`` its first frame's first band position (the band moves by at
    most one position per frame), so each block gathers that many head-weight rows, without reading a length
    on the host."""
    B, T, D = hidden.shape
    V = weight.shape[0]
    n, W = stop - start, soft_target.shape[-1]
    acc, dtype, device = soft_target.dtype, hidden.dtype, hidden.device
    U_max = targets.shape[1]
    k = min(max(int(special_id), 0), V - 1)
    _, band_values_window = backends.window_two_pass_stages(backend)
    window = slice(start, stop)
    values, special_values = band_values_window(g.expand(B).contiguous(), row_scale, nll, start, T, V, targets,
                                                input_lengths, target_lengths, observed, soft_target[window],
                                                soft_special[window], post_target[window], post_special[window],
                                                special_id, shift)
    frames = torch.arange(start, stop, device=device)
    row, t = frames // T, frames % T
    T_b = input_lengths.long().clamp(0, T)[row]
    U_b = target_lengths.long().clamp(0, U_max)[row]
    live = (t < T_b) & (nll[row] != float("inf"))
    if observed is not None:
        live = live & (observed.reshape(-1)[window] < 0)
    w = row_scale.to(acc)[row]

    def rounded(soft):  # what the forward wrote (and summed into the accumulators): round(w softmax)
        return (w.view(-1, *([1] * (soft.dim() - 1))) * soft).to(dtype).to(acc)

    k_in_band = torch.zeros(n, dtype=torch.bool, device=device)
    if U_max > 0:
        c_lo = reference.column_lo(t + 1, T_b, U_b, None if shift < 0 else shift)  # 1-based
        c_hi = torch.minimum(t + 1, U_b)
        slot = torch.arange(W, device=device)
        position = c_lo[:, None] - 1 + slot  # 0-based target position of each band slot
        in_band = (slot[None, :] < (c_hi - c_lo + 1).clamp(min=0)[:, None]) & live[:, None]
        at = position.clamp(0, U_max - 1)
        writer = in_band & (next_same[row[:, None], at] + 1 > c_hi[:, None])
        delta = torch.where(writer, values.to(acc) - g * rounded(soft_target[window]), 0.0)
        k_in_band = (in_band & (tokens[row[:, None], at] == k)).any(1)
    # the special token, unless a band writer holds it (invalid input: then the writer's value includes it)
    delta_k = torch.where(live & ~k_in_band, special_values.to(acc) - g * rounded(soft_special[window]), 0.0)

    ids = torch.arange(first_block, stop_block, device=device)
    b, t0 = ids // per_row, (ids % per_row) * block
    local = t0[:, None] + torch.arange(block, device=device)  # [nb, block] frames of the row
    real = local < T
    at_frame = b[:, None] * T + local.clamp(max=T - 1) - start  # window index (padding: the row's last, masked)
    special = torch.where(real, delta_k[at_frame], 0.0)  # [nb, block]
    h_blocks = torch.where(real[:, :, None], hidden.reshape(B * T, D)[at_frame + start].to(acc), 0.0)
    rows = special[:, :, None] * weight[k].to(acc)  # dH of the special token
    if U_max > 0:
        span = block + W - 1
        p0 = position[(b * T + t0 - start).clamp(0, n - 1), 0]  # [nb]
        q = position[at_frame] - p0[:, None, None]  # [nb, block, W], in [0, span) where delta is not 0
        keep = (delta[at_frame] != 0) & real[:, :, None]
        Delta = torch.zeros(ids.numel(), block, span + 1, dtype=acc, device=device)
        Delta.scatter_(2, torch.where(keep, q, span), torch.where(keep, delta[at_frame], 0.0))
        Delta = Delta[:, :, :span]  # one slot per (frame, position): no index repeats
        window_tokens = tokens[b[:, None], (p0[:, None] + torch.arange(span, device=device)).clamp(0, U_max - 1)]
        if grad_hidden.numel():
            rows = rows + torch.bmm(Delta, weight[window_tokens].to(acc))
        if grad_weight.numel():
            _accumulate_rows(grad_weight, window_tokens.reshape(-1),
                             torch.bmm(Delta.transpose(1, 2), h_blocks).reshape(-1, D))
        if grad_bias.numel():
            _accumulate_rows(grad_bias, window_tokens.reshape(-1), Delta.sum(1).reshape(-1))
    if grad_hidden.numel():
        grad_hidden.index_add_(0, (at_frame + start)[real], rows[real])  # frames are distinct
    if grad_weight.numel():
        grad_weight[k] += (special[:, :, None] * h_blocks).sum((0, 1))
    if grad_bias.numel():
        grad_bias[k] += special.sum()


def _accumulate_rows(target: Tensor, index: Tensor, values: Tensor) -> None:
    """``target[index] += values`` with repeated indices summed in a fixed order: ``index_add_`` on the CPU,
    ``index_put_(accumulate=True)`` on a GPU (sorted, not atomics)."""
    if target.device.type == "cpu":
        target.index_add_(0, index, values)
    else:
        target.index_put_((index,), values, accumulate=True)


# ---------------------------------------------------------------------------------------------
# the op layer
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("mdlm_ctc::linear_lattice_forward", mutates_args=())
def linear_lattice_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                           input_lengths: Tensor, target_lengths: Tensor, observed: Optional[Tensor],
                           row_weight: Optional[Tensor], special_id: int, mode: int, max_shift: int, band_width: int,
                           reduction: int, need_grad: bool, zero_infinity: bool, chunk_size: int, keep_logits: bool,
                           gradient_in_forward: bool, need_hidden: bool, need_weight: bool, need_bias: bool,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                  Tensor, Tensor, Tensor, Tensor]:
    """``(loss, nll [B], row_scale [B], lse [B, T], post_target [B, T, W], post_special [B, T], logits,
    soft_target [N, W], soft_special [N], grad_hidden, grad_weight, grad_bias)`` from hidden states and the LM
    head: the loss reduced inside (``row_scale``: ``mdlm_ctc/_ops.py``). The posteriors are empty (width 0)
    unless ``need_grad``; ``logits`` is ``[N, V]`` with ``keep_logits`` if ``N <= chunk_size``, else ``[0, V]``.
    With ``gradient_in_forward`` (and ``need_grad``) the gradient's softmax part is accumulated here: the band
    softmax tables and the accumulators (acc dtype; empty for an input that needs no gradient) are returned,
    and no logits are kept; otherwise those are empty."""
    from ._ops import reduce_loss, row_scale_of

    B, T, D = hidden.shape
    acc = acc_dtype(hidden.dtype)
    scale = row_scale_of(target_lengths, row_weight, reduction, B, acc)
    empty = hidden.new_empty((0,), dtype=acc)
    if _in_forward(need_grad, gradient_in_forward, reduction, zero_infinity):
        (nll, lse, post_target, post_special, soft_target, soft_special, grad_hidden, grad_weight,
         grad_bias) = _forward_with_gradient(hidden, weight, bias, targets, input_lengths, target_lengths, observed,
                                             special_id, mode, max_shift, band_width, scale, chunk_size, need_hidden,
                                             need_weight, need_bias, backend)
        kept = hidden.new_empty((0, weight.shape[0]))
    else:
        nll, lse, post_target, post_special, kept = _forward(hidden, weight, bias, targets, input_lengths,
                                                             target_lengths, observed, special_id, mode, max_shift,
                                                             band_width, need_grad, chunk_size, keep_logits, backend)
        soft_target, soft_special = empty.view(0, 0), empty.clone()
        grad_hidden, grad_weight, grad_bias = empty.clone(), empty.clone(), empty.clone()
    loss = reduce_loss(nll, scale, row_weight, reduction, zero_infinity)
    return (loss, nll, scale, lse, post_target, post_special, kept, soft_target, soft_special, grad_hidden,
            grad_weight, grad_bias)


def _in_forward(need_grad: bool, gradient_in_forward: bool, reduction: int, zero_infinity: bool) -> bool:
    """The op's own guard on the caller's choice (:func:`gradient_in_forward_choice`): a scalar reduction and no
    ``zero_infinity``, whatever it was asked."""
    return need_grad and gradient_in_forward and reduction != REDUCTION_CODES["none"] and not zero_infinity


@linear_lattice_forward.register_fake
def _linear_lattice_forward_fake(hidden, weight, bias, targets, input_lengths, target_lengths, observed, row_weight,
                                 special_id, mode, max_shift, band_width, reduction, need_grad, zero_infinity,
                                 chunk_size, keep_logits, gradient_in_forward, need_hidden, need_weight, need_bias,
                                 backend):
    B, T, D = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    width = max(band_width, 1) if need_grad else 0
    in_forward = _in_forward(need_grad, gradient_in_forward, reduction, zero_infinity)

    def new(*shape, dtype=acc):
        return hidden.new_empty(shape, dtype=dtype)
    return (new(B) if reduction == 0 else new(), new(B), new(B), new(B, T), new(B, T, width),
            new(B, T if need_grad else 0),
            new(0 if in_forward else _kept_rows(B * T, chunk_size, keep_logits), V, dtype=hidden.dtype),
            new(B * T if in_forward else 0, width if in_forward else 0), new(B * T if in_forward else 0),
            new(*((B * T, D) if in_forward and need_hidden else (0,))),
            new(*((V, D) if in_forward and need_weight else (0,))),
            new(*((V,) if in_forward and need_bias else (0,))))


@torch.library.custom_op("mdlm_ctc::linear_lattice_backward", mutates_args=())
def linear_lattice_backward(grad_nll: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], lse: Tensor,
                            targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                            observed: Optional[Tensor], post_target: Tensor, post_special: Tensor, nll: Tensor,
                            special_id: int, mode: int, max_shift: int, zero_infinity: bool, need_hidden: bool,
                            need_weight: bool, need_bias: bool, chunk_size: int,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The recompute path's backward: ``(grad_hidden, grad_weight, grad_bias)`` in the inputs' dtype (an
    unrequested one is empty) for the per-row gradient ``grad_nll`` of the nll."""
    return _backward(grad_nll, hidden, weight, bias, lse, targets, input_lengths, target_lengths, observed,
                     post_target, post_special, nll, special_id, mode, max_shift, zero_infinity, need_hidden,
                     need_weight, need_bias, chunk_size, backend)


@linear_lattice_backward.register_fake
def _linear_lattice_backward_fake(grad_nll, hidden, weight, bias, lse, targets, input_lengths, target_lengths,
                                  observed, post_target, post_special, nll, special_id, mode, max_shift, zero_infinity,
                                  need_hidden, need_weight, need_bias, chunk_size, backend):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


@torch.library.custom_op("mdlm_ctc::linear_gradient_correction",
                         mutates_args=("grad_hidden", "grad_weight", "grad_bias"))
def linear_gradient_correction(grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor, grad_loss: Tensor,
                               hidden: Tensor, weight: Tensor, targets: Tensor, input_lengths: Tensor,
                               target_lengths: Tensor, observed: Optional[Tensor], soft_target: Tensor,
                               soft_special: Tensor, post_target: Tensor, post_special: Tensor, nll: Tensor,
                               row_scale: Tensor, special_id: int, band_shift: int, chunk_size: int,
                               backend: str) -> None:
    """The gradient-in-forward path's backward, in place on its accumulators (:func:`_correct`): the upstream
    gradient (a scalar) applied and the sparse posterior part subtracted. ``band_shift``: max_shift for
    preserve, -1 otherwise (no argument may be called ``mode``: functionalisation's own)."""
    _correct(grad_loss, hidden, weight, targets, input_lengths, target_lengths, observed, soft_target, soft_special,
             post_target, post_special, nll, row_scale, special_id, band_shift, chunk_size, backend, grad_hidden,
             grad_weight, grad_bias)


@linear_gradient_correction.register_fake
def _linear_gradient_correction_fake(*args):
    return None


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, input_lengths, target_lengths, observed, row_weight, special_id, mode, max_shift,
     band_width, reduction, need_grad, zero_infinity, chunk_size, keep_logits, gradient_in_forward, need_hidden,
     need_weight, need_bias, backend) = inputs
    (loss, nll, scale, lse, post_target, post_special, kept, soft_target, soft_special, grad_hidden, grad_weight,
     grad_bias) = output
    in_forward = _in_forward(need_grad, gradient_in_forward, reduction, zero_infinity)
    accumulators = (grad_hidden, grad_weight, grad_bias)
    # Eager: kept logits and accumulators are held by ctx, not saved: the backward overwrites them and drops
    # them (a second backward, with retain_graph, recomputes). A traced backward gets the accumulators saved.
    traced = torch.compiler.is_compiling() or type(nll) is not torch.Tensor
    ctx.accumulators = None if traced else accumulators
    ctx.save_for_backward(hidden, weight, bias, targets, input_lengths, target_lengths, observed, row_weight, lse,
                          post_target, post_special, nll, scale, soft_target, soft_special,
                          *(accumulators if traced else (None, None, None)))
    ctx.mark_non_differentiable(nll, scale, lse, post_target, post_special, kept, soft_target, soft_special,
                                *accumulators)
    ctx.kept = kept if kept.numel() > 0 else None
    ctx.set_materialize_grads(False)
    ctx.options = (special_id, mode, max_shift, reduction, need_grad, zero_infinity, chunk_size, in_forward, backend)


def _backward_formula(ctx, grad_loss, *_unused):
    special_id, mode, max_shift, reduction, need_grad, zero_infinity, chunk_size, in_forward, backend = ctx.options
    (hidden, weight, bias, targets, input_lengths, target_lengths, observed, row_weight, lse, post_target,
     post_special, nll, scale, soft_target, soft_special, *accumulators) = ctx.saved_tensors
    if accumulators[0] is None:
        accumulators, ctx.accumulators = ctx.accumulators, None
    none = (None,) * 22
    if grad_loss is None:
        return none
    grad_rows = upstream_rows(grad_loss, reduction, nll.shape[0], nll.dtype)
    grad_hidden = grad_weight = grad_bias = grad_row_weight = None
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = bias is not None and ctx.needs_input_grad[2]
    if need_hidden or need_weight or need_bias:
        refuse_unsupported_backward(need_grad)
        shift = max_shift if mode == PRESERVE else -1
        kept, ctx.kept = ctx.kept, None
        if in_forward and accumulators is not None:
            grad_hidden, grad_weight, grad_bias = accumulators
            linear_gradient_correction(grad_hidden, grad_weight, grad_bias, grad_loss.to(nll.dtype), hidden, weight,
                                       targets, input_lengths, target_lengths, observed, soft_target, soft_special,
                                       post_target, post_special, nll, scale, special_id, shift, chunk_size,
                                       backend)
            dtype = hidden.dtype
            grad_hidden = grad_hidden.to(dtype).view(hidden.shape) if need_hidden else None
            grad_weight = grad_weight.to(dtype) if need_weight else None
            grad_bias = grad_bias.to(dtype) if need_bias else None
        else:  # the recompute path (or a second backward after the gradient in the forward)
            # Kept logits are used in eager mode only (linear_slack_ctc_loss turns keep_logits off under
            # torch.compile; a traced backward, whose tensors are fake or functional, recomputes): the op's body
            # then runs directly, and the op itself never overwrites a tensor it was given.
            if type(kept) is not torch.Tensor:
                kept = None
            backward = linear_lattice_backward if kept is None else functools.partial(_backward, kept=kept)
            grad_hidden, grad_weight, grad_bias = backward(
                (grad_rows * scale).contiguous(), hidden, weight, bias, lse, targets, input_lengths, target_lengths,
                observed, post_target, post_special, nll, special_id, mode, max_shift, zero_infinity, need_hidden,
                need_weight, need_bias, chunk_size, backend)
            grad_hidden = grad_hidden if need_hidden else None
            grad_weight = grad_weight if need_weight else None
            grad_bias = grad_bias if need_bias else None
    if row_weight is not None and ctx.needs_input_grad[7]:
        grad_row_weight = row_weight_gradient(grad_rows, nll, target_lengths, reduction, zero_infinity,
                                              row_weight.dtype)
    return (grad_hidden, grad_weight, grad_bias) + none[3:7] + (grad_row_weight,) + none[8:]


torch.library.register_autograd("mdlm_ctc::linear_lattice_forward", _backward_formula, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the public API
# ---------------------------------------------------------------------------------------------

def linear_slack_ctc_loss(hidden: Tensor, weight: Tensor, targets: Tensor, target_lengths: Tensor | None = None, *,
                          bias: Tensor | None = None, slack_id: int, input_lengths: Tensor | None = None,
                          collapse: str = "preserve", max_shift: int | None = None, observed: Tensor | None = None,
                          reduction: str = "mean", zero_infinity: bool = False, backend: str = "auto",
                          validate: bool = True, chunk_size: int | None = None,
                          band_bound: int | None = None, row_weight: Tensor | None = None) -> Tensor:
    """``slack_ctc_loss(hidden @ weight.T + bias, ...)`` without materialising the logits.

    Args:
        hidden: ``[B, T, D]`` hidden states entering the LM head, float32/bfloat16/float16/float64.
        weight: ``[V, D]`` the LM head (``nn.Linear(D, V).weight``), same dtype and device as ``hidden``.
        targets, target_lengths, slack_id, input_lengths, collapse, max_shift, observed, reduction,
        zero_infinity, backend, validate, band_bound: exactly as :func:`mdlm_ctc.slack_ctc_loss` (SPEC
        §2-§3). With ``validate=False`` give ``band_bound`` so that the per-frame tables are band-sized
        (``[B*T, band_bound]``) without a host sync; otherwise they are ``min(U, T)`` wide.
        bias: optional ``[V]`` bias of the LM head.
        chunk_size: frames (tokens) per chunk; at most ``chunk_size * V`` logits exist at any time
            (one buffer, reused by every chunk and tile; the backend's stages read and overwrite it in
            place). Default (``None``): as many frames as 256 MiB of logits hold (``default_chunk_size``:
            1,024 in bf16 at V = 126,464). With a scalar reduction the gradient's softmax part is
            accumulated in the forward where that is cheap (3 GEMMs, module docstring); otherwise, when one
            chunk holds every frame the backward reuses the forward's logits (3 GEMMs), and below that it
            recomputes them (4). Smaller saves memory, larger amortises the per-chunk overhead.
        row_weight: optional ``[B]`` per-row loss weights, as ``weight=`` of :func:`mdlm_ctc.slack_ctc_loss`
            (the name ``weight`` is the LM head's here): applied before the reduction, known in the forward.

    An empty batch gives 0 for ``mean`` and ``sum`` (never NaN) and zero gradients.

    Gradients reach ``hidden``, ``weight`` and ``bias`` (exact: the same maths as the materialised loss,
    accumulated in fp32, returned in the inputs' dtype; deterministic). Frames past ``input_lengths``
    and observed frames give their hidden states zero gradient. Under ``torch.autocast`` the inputs are
    cast like ``F.linear`` casts them.

    Returns:
        The loss: float32 (float64 for float64 inputs), ``[B]`` for ``reduction="none"`` else a scalar.
    """
    weight, bias = _gather_sharded(weight), _gather_sharded(bias)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    args, chunk_size = check_linear_args(hidden, weight, bias, targets, target_lengths, slack_id, input_lengths,
                                         collapse, max_shift, observed, reduction, zero_infinity, backend, validate,
                                         chunk_size, band_bound)
    row_weight = _validation.check_weight(row_weight, hidden.shape[0], hidden.device, "hidden", name="row_weight")
    name = backends.resolve(backend, hidden.device, (hidden.shape[0], hidden.shape[1], args.band_width, args.mode))
    grad_enabled = torch.is_grad_enabled()
    need_hidden, need_weight = grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad
    need_bias = grad_enabled and bias is not None and bias.requires_grad
    need_grad = need_hidden or need_weight or need_bias
    B, T, D = hidden.shape
    V = weight.shape[0]
    code = REDUCTION_CODES[reduction]
    in_forward = need_grad and gradient_in_forward_choice(B * T, V, D, args.band_width, chunk_size,
                                                          hidden.element_size(), code, zero_infinity)
    # when one chunk holds every frame the recompute path keeps its logits for the backward (_kept_rows: 3
    # GEMMs, not 4; the backward's one tile would allocate the same buffer). Not under torch.compile, whose
    # functionalisation would copy the buffer that the backward overwrites.
    keep_logits = need_grad and not in_forward and not torch.compiler.is_compiling()
    loss, *_ = linear_lattice_forward(hidden, weight, bias, args.targets, args.input_lengths, args.target_lengths,
                                      args.observed, row_weight, args.special_id, args.mode, args.max_shift,
                                      args.band_width, code, need_grad, zero_infinity, chunk_size, keep_logits,
                                      in_forward, need_hidden, need_weight, need_bias, name)
    return loss


class LinearSlackCTCLoss(SlackCTCLoss):
    """Module form of :func:`linear_slack_ctc_loss` (the options of :class:`SlackCTCLoss` plus
    ``chunk_size``); ``forward(hidden, weight, targets, ...)`` or, with an ``nn.Linear`` LM head,
    ``forward(hidden, lm_head, targets, ...)``."""

    def __init__(self, slack_id: int, collapse: str = "preserve", max_shift: int | None = None,
                 reduction: str = "mean", zero_infinity: bool = False, backend: str = "auto",
                 chunk_size: int | None = None, band_bound: int | None = None):
        super().__init__(slack_id, collapse, max_shift, reduction, zero_infinity, backend, band_bound)
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor | nn.Linear, targets: Tensor, target_lengths: Tensor | None = None,
                bias: Tensor | None = None, input_lengths: Tensor | None = None,
                observed: Tensor | None = None, row_weight: Tensor | None = None) -> Tensor:
        if isinstance(weight, nn.Linear):
            weight, bias = weight.weight, weight.bias if bias is None else bias
        return linear_slack_ctc_loss(hidden, weight, targets, target_lengths, bias=bias, slack_id=self.slack_id,
                                     input_lengths=input_lengths, collapse=self.collapse, max_shift=self.max_shift,
                                     observed=observed, reduction=self.reduction, zero_infinity=self.zero_infinity,
                                     backend=self.backend, chunk_size=self.chunk_size,
                                     band_bound=self.band_bound, row_weight=row_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
