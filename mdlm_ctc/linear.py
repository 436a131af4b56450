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

Design: store-free ("recompute"), chosen with the measurements below.

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
* on the CPU the chunk buffers come from the C++ kernels' buffer pool (``backends.work_buffer``), so a
  call does not page-fault and zero a fresh mmap of tens of MB for each of them.
* the alternative, chunked by whole sequences with the gradient computed in the forward (Liger
  FLCE's structure, 3 GEMMs), was built from the backend stages and measured side by side
  (``benchmarks/bench_linear_slack_ctc.py``, provider ``rows``). It saves one GEMM, but
  (a) it needs the upstream gradient in the forward: ``reduction="none"`` with per-row weights
  (the fine-tuning loop's 1/p weighting) cannot use it; (b) its chunk is at least one sequence
  (T*V logits: 1 GB in bf16 at T=4096, V=126,464), so no chunk size bounds memory below that;
  (c) dW summed across chunks needs a [V, D] fp32 buffer (2.07 GB at V=126,464, D=4,096, over G4's
  2 GB on its own) or, as Liger does, one bf16 rounding of dW per chunk; (d) its lattice runs once
  per chunk, serialised between GEMMs.

Trade per forward + backward: time, 4 LM-head GEMMs (2*N*V*D FLOPs each) vs 3; memory, one chunk of
logits + fp32 dH [N, D] vs one sequence of logits + fp32 dW [V, D]; recompute, the logits once vs none.

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

Op layer. ``mdlm_ctc::linear_lattice_forward`` / ``mdlm_ctc::linear_lattice_backward`` are
``torch.library`` custom ops with fake kernels and registered autograd (as ``_ops.py``), so
``torch.compile`` treats the loss as one opaque node.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from . import _validation, backends
from .losses import SlackCTCLoss, _reduce
from .reference import PRESERVE, acc_dtype

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
    B, T, D = hidden.shape
    V = weight.shape[0]
    N, W = B * T, max(band_width, 1)
    acc = acc_dtype(hidden.dtype)
    device = hidden.device
    h = hidden.reshape(N, D)
    shift = max_shift if mode == PRESERVE else -1
    emissions_window, _ = backends.window_stages(backend)
    lse = torch.empty(N, dtype=acc, device=device)
    table = torch.empty(N, W, dtype=acc, device=device)
    special = torch.empty(N, dtype=acc, device=device)
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
# the op layer
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("mdlm_ctc::linear_lattice_forward", mutates_args=())
def linear_lattice_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                           input_lengths: Tensor, target_lengths: Tensor, observed: Optional[Tensor], special_id: int,
                           mode: int, max_shift: int, band_width: int, need_grad: bool, zero_infinity: bool,
                           chunk_size: int, keep_logits: bool,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(nll [B], lse [B, T], post_target [B, T, W], post_special [B, T], logits)`` from hidden states
    and the LM head; the posteriors are empty (width 0) unless ``need_grad``; ``logits`` is ``[N, V]``
    with ``keep_logits`` if ``N <= chunk_size``, else ``[0, V]``. ``zero_infinity`` is only read by the
    backward."""
    return _forward(hidden, weight, bias, targets, input_lengths, target_lengths, observed, special_id, mode,
                    max_shift, band_width, need_grad, chunk_size, keep_logits, backend)


@linear_lattice_forward.register_fake
def _linear_lattice_forward_fake(hidden, weight, bias, targets, input_lengths, target_lengths, observed, special_id,
                                 mode, max_shift, band_width, need_grad, zero_infinity, chunk_size, keep_logits,
                                 backend):
    B, T, _ = hidden.shape
    acc = acc_dtype(hidden.dtype)
    width = max(band_width, 1) if need_grad else 0
    return (hidden.new_empty((B,), dtype=acc), hidden.new_empty((B, T), dtype=acc),
            hidden.new_empty((B, T, width), dtype=acc), hidden.new_empty((B, T if need_grad else 0), dtype=acc),
            hidden.new_empty((_kept_rows(B * T, chunk_size, keep_logits), weight.shape[0])))


@torch.library.custom_op("mdlm_ctc::linear_lattice_backward", mutates_args=())
def linear_lattice_backward(grad_nll: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], lse: Tensor,
                            targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                            observed: Optional[Tensor], post_target: Tensor, post_special: Tensor, nll: Tensor,
                            special_id: int, mode: int, max_shift: int, zero_infinity: bool, need_hidden: bool,
                            need_weight: bool, need_bias: bool, chunk_size: int,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` in the inputs' dtype; an unrequested one is empty."""
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


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, input_lengths, target_lengths, observed, special_id, mode, max_shift, band_width,
     need_grad, zero_infinity, chunk_size, keep_logits, backend) = inputs
    nll, lse, post_target, post_special, kept = output
    ctx.save_for_backward(hidden, weight, bias, targets, input_lengths, target_lengths, observed, lse, post_target,
                          post_special, nll)
    ctx.mark_non_differentiable(lse, post_target, post_special, kept)
    # Not a saved tensor: the backward overwrites it with dz and drops it (a second backward, with
    # retain_graph, recomputes), so it is freed when the backward ends, as the recompute buffer is.
    ctx.kept = kept if kept.numel() > 0 else None
    ctx.set_materialize_grads(False)
    ctx.options = (special_id, mode, max_shift, need_grad, zero_infinity, chunk_size, backend)


def _backward_formula(ctx, grad_nll, _grad_lse, _grad_post_target, _grad_post_special, _grad_kept):
    special_id, mode, max_shift, need_grad, zero_infinity, chunk_size, backend = ctx.options
    (hidden, weight, bias, targets, input_lengths, target_lengths, observed, lse, post_target, post_special,
     nll) = ctx.saved_tensors
    none = (None,) * 16
    if grad_nll is None:
        return none
    if not need_grad:
        raise RuntimeError("mdlm_ctc: the forward ran without posteriors (no input required grad, or grad mode "
                           "was off), so there is no gradient to compute")
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = bias is not None and ctx.needs_input_grad[2]
    kept, ctx.kept = ctx.kept, None
    # Kept logits are used in eager mode only (linear_slack_ctc_loss turns keep_logits off under
    # torch.compile; a traced backward, whose tensors are fake or functional, recomputes): the op's body
    # then runs directly, and the op itself never overwrites a tensor it was given.
    if type(kept) is not torch.Tensor:
        kept = None
    backward = linear_lattice_backward if kept is None else functools.partial(_backward, kept=kept)
    grad_hidden, grad_weight, grad_bias = backward(
        grad_nll.contiguous(), hidden, weight, bias, lse, targets, input_lengths, target_lengths, observed,
        post_target, post_special, nll, special_id, mode, max_shift, zero_infinity, need_hidden, need_weight,
        need_bias, chunk_size, backend)
    return ((grad_hidden if need_hidden else None, grad_weight if need_weight else None,
             grad_bias if need_bias else None) + none[3:])


torch.library.register_autograd("mdlm_ctc::linear_lattice_forward", _backward_formula, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the public API
# ---------------------------------------------------------------------------------------------

def linear_slack_ctc_loss(hidden: Tensor, weight: Tensor, targets: Tensor, target_lengths: Tensor | None = None, *,
                          bias: Tensor | None = None, slack_id: int, input_lengths: Tensor | None = None,
                          collapse: str = "preserve", max_shift: int | None = None, observed: Tensor | None = None,
                          reduction: str = "mean", zero_infinity: bool = False, backend: str = "auto",
                          validate: bool = True, chunk_size: int | None = None,
                          band_bound: int | None = None) -> Tensor:
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
            1,024 in bf16 at V = 126,464). When one chunk holds every frame the backward reuses the
            forward's logits (3 GEMMs); below that it recomputes them (4). Smaller saves memory, larger
            amortises the per-chunk overhead.

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
    name = backends.resolve(backend, hidden.device, (hidden.shape[0], hidden.shape[1], args.band_width, args.mode))
    need_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    # when one chunk holds every frame the forward keeps its logits for the backward (_kept_rows: 3 GEMMs,
    # not 4; the backward's one tile would allocate the same buffer). Not under torch.compile, whose
    # functionalisation would copy the buffer that the backward overwrites.
    keep_logits = need_grad and not torch.compiler.is_compiling()
    nll, *_ = linear_lattice_forward(hidden, weight, bias, args.targets, args.input_lengths, args.target_lengths,
                                     args.observed, args.special_id, args.mode, args.max_shift, args.band_width,
                                     need_grad, zero_infinity, chunk_size, keep_logits, name)
    return _reduce(nll, args.target_lengths, reduction, zero_infinity)


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
                observed: Tensor | None = None) -> Tensor:
        if isinstance(weight, nn.Linear):
            weight, bias = weight.weight, weight.bias if bias is None else bias
        return linear_slack_ctc_loss(hidden, weight, targets, target_lengths, bias=bias, slack_id=self.slack_id,
                                     input_lengths=input_lengths, collapse=self.collapse, max_shift=self.max_shift,
                                     observed=observed, reduction=self.reduction, zero_infinity=self.zero_infinity,
                                     backend=self.backend, chunk_size=self.chunk_size,
                                     band_bound=self.band_bound)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
