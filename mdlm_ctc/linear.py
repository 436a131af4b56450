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

* forward: for each chunk of ``chunk_size`` frames, z = h_chunk W^T + b [chunk, V] (GEMM 1), its lse
  and band emissions (the vocabulary pass of ``csrc/ops.cpp`` restricted to those frames: the
  backend stages take whole rows, and a chunk may cut a row); then the backend's lattice (stage 2:
  C++ on CPU, the Triton lattice on GPU) over the whole [B, T, W] table, which is small and which it
  overwrites with the posteriors.
* backward: the logits are recomputed tile by tile (GEMM 2) and turned into dz in place (softmax
  times g, then the posteriors, merged per (frame, token), written once); dH += dz W_tile (GEMM 3),
  dW_tile = dz^T H (GEMM 4), db_tile = sum dz. The loop order makes the fp32 accumulator the smaller
  of dH [N, D] and dW [V, D]: vocabulary tiles outside when N <= V (each dW tile is then one GEMM
  over all N frames, rounded once), frame chunks outside otherwise.
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

CPU measurements (the only ones in this session; GPU figures are unmeasured). 2 shared cores
(load 3-7 from other jobs, so process CPU seconds are the stable figure; wall in parentheses),
float32, forward + backward with gradients for hidden and weight, N=4096 (B=2, T=2048, U=1792),
D=512, V=32,000, medians of 7 round-robin repeats; peak extra memory includes the 70.5 MiB of
gradients (rows in ``benchmarks/results/linear_slack_ctc.jsonl``):

    store-free (this module), chunk 1024      6.9 CPU-s (12.3 s)   258 MiB
    store-free (this module), chunk 2048      6.0 CPU-s  (8.6 s)   513 MiB
    rows: 3 GEMMs, gradient in the forward    3.9 CPU-s  (6.4 s)   823 MiB  (one sequence per chunk)
    materialised logits + slack_ctc_loss      3.9 CPU-s  (6.1 s)  1004 MiB
    chunked linear + CE in torch (Liger)      5.9 CPU-s  (9.3 s)   141 MiB  (cross-entropy, not CTC)
    one GEMM [4096 x 512] x [512 x 32000]     1.0 CPU-s; one elementwise pass over those logits ~1 CPU-s

At D=512 a pass over the logits costs as much as a GEMM, so the CPU gap (x1.6-1.8) is the fourth GEMM
plus the torch-op vocabulary passes (the ``rows`` prototype uses the fused C++ stages). At G4
(D=4,096, H200) a GEMM is ~24 ms at 700 TFLOP/s and a Triton pass over bf16 logits ~1 ms [est.]: the
store-free path should cost ~4/3 of a 3-GEMM fused CE, borderline for G4's 1.2x. Its memory at G4,
chunk 1024 [est.]: 0.26 GB of logits tile + 0.27 GB fp32 dH + ~0.2 GB of per-frame tables and
temporaries, plus the 1.17 GB of gradients themselves: ~1.9 GB (~1.8 GB at chunk 512). Store-free
was chosen for generality (any reduction and upstream gradient), a chunk bound independent of T,
and fp32 accumulation that fits G4's memory; ``rows`` stays in the benchmark so the H200 measures
what the fourth GEMM costs.

Paths. CPU: torch ops for the vocabulary passes, the C++ lattice. CUDA: cuBLAS GEMMs, two small
Triton kernels below for the vocabulary passes (row logsumexp in fp32 from bf16 logits; the in-place
softmax-times-g pass; checked once per dtype against the torch passes, which take over with a
warning if they fail), and the lattice of ``backends.resolve(backend, device)`` (the Triton lattice
with ``"auto"``). ``backend="reference"`` keeps everything in plain PyTorch.

Exactness. Same maths as the materialised loss: z is computed in the input dtype as ``F.linear``
(one rounding of h W^T + b), lse/softmax/posteriors in fp32 (fp64 for fp64 input), dz rounded once
to the input dtype; dH accumulates over vocabulary tiles and dW over frame chunks in fp32 (fp64),
and the result is cast once. No gradient filtering. Deterministic: GEMMs, fixed-order reductions,
and posteriors of equal tokens in one frame merged by a sort and a fixed-order segmented scan, so
every (frame, token) of dz is written once (no atomics).

Op layer. ``mdlm_ctc::linear_lattice_forward`` / ``mdlm_ctc::linear_lattice_backward`` are
``torch.library`` custom ops with fake kernels and registered autograd (as ``_ops.py``), so
``torch.compile`` treats the loss as one opaque node.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import _validation, backends
from .losses import SlackCTCLoss, _reduce
from .reference import NEG_INF, PRESERVE, acc_dtype, column_lo

DEFAULT_CHUNK_SIZE = 1024
"""Frames per chunk: one chunk holds ``chunk_size * V`` logits (259 MB in bf16 at V = 126,464)."""

_MIN_VOCAB_TILE = 1024  # narrower vocabulary tiles make the backward GEMMs inefficient
_WIDE_PRODUCT_ELEMENTS = 1 << 24  # fp32 temporary of a low-precision GEMM accumulated in fp32 (64 MiB)
_SPARSE_ROWS = 4096  # frames per step of the sparse posterior write (its [rows, W + 1] temporaries)


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
                      observed, reduction, zero_infinity, backend, validate, chunk_size):
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
    chunk_size = _validation.check_int(chunk_size, "chunk_size", low=1)
    logits_stand_in = hidden.new_empty(()).expand(B, T, V)
    args = _validation.check_slack_ctc_args(logits_stand_in, targets, target_lengths, slack_id, input_lengths,
                                            collapse, max_shift, observed, reduction, zero_infinity, backend,
                                            validate, name="hidden")
    return args, chunk_size


# ---------------------------------------------------------------------------------------------
# frame geometry: which tokens a chunk of frames reads
# ---------------------------------------------------------------------------------------------

class _Frames:
    """Flat frames ``start <= i < stop`` (i = b*T + t): row, activity, and the tokens of their entries.

    ``tokens`` is ``[n, 1 + W]``: the special token in column 0, then the band's target tokens
    (table slot j = column 1 + j), ``-1`` where slot j is outside the frame's band.
    """

    def __init__(self, start, stop, T, targets, T_b, U_b, shift, width, special_id, V, observed):
        device = targets.device
        i = torch.arange(start, stop, device=device)
        self.row = i // T
        t = i % T
        T_row, U_row = T_b[self.row], U_b[self.row]
        self.active = t < T_row
        frame = t + 1
        u = column_lo(frame, T_row, U_row, shift)[:, None] + torch.arange(width, device=device)
        in_band = (u >= 1) & (u <= torch.minimum(frame, U_row)[:, None]) & self.active[:, None]
        U = targets.shape[1]
        if U > 0:
            band = targets[self.row[:, None], (u - 1).clamp(0, U - 1)].long().clamp(0, V - 1)
            band = torch.where(in_band, band, -1)
        else:
            band = torch.full_like(u, -1)
        special = torch.full_like(self.row, min(max(special_id, 0), V - 1))
        self.tokens = torch.cat([special[:, None], band], 1)
        self.observed = None if observed is None else observed[start:stop]
        self.live = self.active if self.observed is None else self.active & (self.observed < 0)


def _merge_duplicates(tokens: Tensor, values: Tensor):
    """Sum the values of equal tokens within each row, deterministically.

    Returns ``(tokens, totals, last)`` sorted by token: ``totals`` holds a run's sum at its last entry
    (``last``) and 0 elsewhere. A stable sort then a Hillis-Steele segmented scan: log2(E) steps, each
    adding values of the same token in a fixed order, so no atomics and no order dependence.
    """
    E = tokens.shape[1]
    tokens, order = torch.sort(tokens, dim=1, stable=True)
    values = values.gather(1, order)
    step = 1
    while step < E:
        same = tokens[:, step:] == tokens[:, :-step]
        values = torch.cat([values[:, :step], values[:, step:] + torch.where(same, values[:, :-step], 0.0)], 1)
        step *= 2
    last = torch.ones_like(tokens, dtype=torch.bool)
    last[:, :-1] = tokens[:, 1:] != tokens[:, :-1]
    return tokens, torch.where(last, values, 0.0), last


# ---------------------------------------------------------------------------------------------
# the two vocabulary passes: torch ops (CPU, fallback) and Triton (CUDA)
# ---------------------------------------------------------------------------------------------

def _row_logsumexp_torch(z: Tensor) -> Tensor:
    return torch.logsumexp(z.to(acc_dtype(z.dtype)), dim=1)


def _softmax_grad_torch(z: Tensor, lse: Tensor, scale: Tensor, fill: Tensor, compute: Tensor) -> None:
    """In place: ``z <- scale * exp(z - lse)`` on computed rows, ``fill`` on the others (lse = +inf
    where the frame is dead, so exp gives 0)."""
    acc = acc_dtype(z.dtype)
    dense = z if z.dtype == acc else z.to(acc)  # in place for fp32/fp64; one wide copy for bf16/fp16
    dense.sub_(lse[:, None]).exp_().mul_(scale[:, None])
    skipped = ~compute
    if bool(skipped.any()):  # a host sync, fine here: this path runs on the CPU (or as a CUDA fallback)
        dense[skipped] = fill[skipped][:, None].to(acc)
    if dense is not z:
        z.copy_(dense)


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """Build the two Triton kernels on first use (no Triton import at package import)."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_logsumexp_kernel(z_ptr, out_ptr, V, stride_zn, BLOCK_V: tl.constexpr):
        # one program per frame: an online max / sum over vocabulary blocks, fp32 whatever z's dtype
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_zn
        running_max = tl.full([], float("-inf"), tl.float32)
        running_sum = tl.zeros([], tl.float32)
        has_nan = tl.zeros([], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            has_nan = has_nan | tl.max((x != x).to(tl.int32), axis=0)
            x = tl.where(x != x, float("-inf"), x)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # all -inf so far: keep the sum at 0 instead of exp(-inf - -inf) = NaN
            pivot = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - pivot) + tl.sum(tl.exp(x - pivot), axis=0)
            running_max = new_max
        result = tl.where(running_max == float("-inf"), running_max, running_max + tl.log(running_sum))
        result = tl.where(running_max == float("inf"), running_max, result)
        result = tl.where(has_nan != 0, float("nan"), result)
        tl.store(out_ptr + row, result)

    @triton.jit
    def softmax_grad_kernel(z_ptr, lse_ptr, scale_ptr, fill_ptr, compute_ptr, V, stride_zn, BLOCK_V: tl.constexpr):
        # in place: z <- scale * exp(z - lse) (computed rows) or fill (the others), in z's dtype
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_zn
        lse = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr + row)
        fill = tl.load(fill_ptr + row)
        compute = tl.load(compute_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.where(compute != 0, tl.exp(x - lse) * scale, fill)
            tl.store(base + cols, y.to(z_ptr.dtype.element_ty), mask=mask)

    return row_logsumexp_kernel, softmax_grad_kernel


def _triton_block(V: int) -> int:
    return 1 << max(6, min(12, (V - 1).bit_length()))


def _row_logsumexp_triton(z: Tensor) -> Tensor:
    kernel, _ = _triton_kernels()
    out = torch.empty(z.shape[0], dtype=acc_dtype(z.dtype), device=z.device)
    if z.shape[0]:
        kernel[(z.shape[0],)](z, out, z.shape[1], z.stride(0), BLOCK_V=_triton_block(z.shape[1]), num_warps=8)
    return out


def _softmax_grad_triton(z: Tensor, lse: Tensor, scale: Tensor, fill: Tensor, compute: Tensor) -> None:
    _, kernel = _triton_kernels()
    if z.shape[0]:
        acc = torch.float32
        kernel[(z.shape[0],)](z, lse.to(acc).contiguous(), scale.to(acc).contiguous(), fill.to(acc).contiguous(),
                              compute.to(torch.int8).contiguous(), z.shape[1], z.stride(0),
                              BLOCK_V=_triton_block(z.shape[1]), num_warps=8)


@functools.lru_cache(maxsize=None)
def _triton_usable() -> bool:
    try:
        _triton_kernels()
        return True
    except Exception:  # no Triton, or one that cannot define these kernels: the torch passes take over
        return False


@functools.lru_cache(maxsize=None)
def _triton_passes_work(device_type: str, dtype: torch.dtype) -> bool:
    """Build and check the Triton passes once per device type and dtype against the torch passes; where
    they fail to build or disagree, warn once and use the torch passes (correct, slower)."""
    if not _triton_usable():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(3, 300, generator=g) * 4).to(device=device_type, dtype=dtype)
        lse = _row_logsumexp_torch(z)
        ok = torch.allclose(_row_logsumexp_triton(z), lse, atol=1e-3, rtol=1e-4)
        ones = torch.ones(3, device=device_type)
        fused, plain = z.clone(), z.clone()
        _softmax_grad_triton(fused, lse, ones * 0.5, ones * 0, ones.bool())
        _softmax_grad_torch(plain, lse, ones * 0.5, ones * 0, ones.bool())
        ok = ok and torch.allclose(fused.float(), plain.float(), atol=1e-6, rtol=2e-2)
        if not ok:
            warnings.warn("mdlm_ctc.linear: the Triton vocabulary passes disagree with the torch passes on this "
                          "machine; using the torch passes", RuntimeWarning, stacklevel=3)
        return ok
    except Exception as error:
        warnings.warn(f"mdlm_ctc.linear: the Triton vocabulary passes do not run on this machine ({error}); using "
                      f"the torch passes", RuntimeWarning, stacklevel=3)
        return False


def _passes(device: torch.device, dtype: torch.dtype, backend: str):
    """``(row_logsumexp, softmax_grad)`` for this call: the Triton kernels for CUDA tensors (whatever
    backend runs the lattice, except ``"reference"``, the pure-PyTorch path) and, for tests, for CPU
    tensors with the Triton backend under ``TRITON_INTERPRET=1``; torch ops otherwise and for float64."""
    if backend == "reference" or dtype == torch.float64:
        return _row_logsumexp_torch, _softmax_grad_torch
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if (device.type == "cuda" or interpreted) and _triton_passes_work(device.type, dtype):
        return _row_logsumexp_triton, _softmax_grad_triton
    return _row_logsumexp_torch, _softmax_grad_torch


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b``; ``out`` may be wider (fp32) than ``a``, ``b`` (bf16/fp16): the product is then
    accumulated in ``out``'s dtype without a rounding to the operands' dtype."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.is_cuda and _wide_gemm_in_place_works(out.device.type, a.dtype, out.dtype):
        if accumulate:  # cuBLAS reads and writes the fp32 accumulator in its epilogue: no temporary
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        return
    wide_product = out.is_cuda and _wide_gemm_works(out.device.type, a.dtype, out.dtype)
    rows = max(1, _WIDE_PRODUCT_ELEMENTS // max(out.shape[1], 1))  # row blocks: a small fp32 temporary
    for r0 in range(0, out.shape[0], rows):
        a_rows, out_rows = a[r0:r0 + rows], out[r0:r0 + rows]
        if wide_product:
            product = torch.mm(a_rows, b, out_dtype=out.dtype)  # cuBLAS: low-precision inputs, fp32 output
        elif out.is_cuda:
            # an older torch: the product is rounded once to the operands' dtype before the fp32 sum
            # (an fp32 GEMM would be exact but an order of magnitude slower)
            product = torch.mm(a_rows, b)
        else:
            product = torch.mm(a_rows.to(out.dtype), b.to(out.dtype))
        if accumulate:
            out_rows.add_(product)
        else:
            out_rows.copy_(product)


def _probe_operands(device_type, dtype):
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device_type).to(dtype)
    return a, a.t().contiguous(), torch.tensor([[5.0, 11.0], [11.0, 25.0]], device=device_type)  # a @ a.T


@functools.lru_cache(maxsize=None)
def _wide_gemm_works(device_type: str, dtype: torch.dtype, wide: torch.dtype) -> bool:
    """``torch.mm(..., out_dtype=wide)`` exists here (torch >= 2.8 on CUDA) and gives the right numbers."""
    try:
        a, b, expected = _probe_operands(device_type, dtype)
        return bool(torch.equal(torch.mm(a, b, out_dtype=wide), expected.to(wide)))
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _wide_gemm_in_place_works(device_type: str, dtype: torch.dtype, wide: torch.dtype) -> bool:
    """The ``out=`` forms of ``mm``/``addmm`` with ``out_dtype=wide`` work here, accumulating in place."""
    try:
        a, b, expected = _probe_operands(device_type, dtype)
        out = torch.full((2, 2), 1.0, dtype=wide, device=device_type)
        torch.addmm(out, a, b, out_dtype=wide, out=out)
        accumulated = torch.equal(out, expected.to(wide) + 1)
        torch.mm(a, b, out_dtype=wide, out=out)
        return bool(accumulated and torch.equal(out, expected.to(wide)))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# the two passes over the frames
# ---------------------------------------------------------------------------------------------

def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out = h @ weight.T (+ bias)`` in the input dtype, as ``F.linear`` computes it; the forward and the
    backward's recompute both go through here."""
    if bias is not None:
        return torch.addmm(bias, h, weight.t(), out=out)
    return torch.mm(h, weight.t(), out=out)


def _geometry(hidden, targets, input_lengths, target_lengths, mode, max_shift):
    B, T, _ = hidden.shape
    T_b = input_lengths.long().clamp(0, T)
    U_b = target_lengths.long().clamp(0, targets.shape[1])
    shift = max_shift if (mode == PRESERVE and max_shift >= 0) else None
    return T_b, U_b, shift


def _forward(hidden, weight, bias, targets, input_lengths, target_lengths, observed, special_id, mode, max_shift,
             band_width, need_grad, chunk_size, backend):
    B, T, D = hidden.shape
    V = weight.shape[0]
    N, W = B * T, max(band_width, 1)
    acc = acc_dtype(hidden.dtype)
    device = hidden.device
    T_b, U_b, shift = _geometry(hidden, targets, input_lengths, target_lengths, mode, max_shift)
    h = hidden.reshape(N, D)
    flat_observed = None if observed is None else observed.reshape(N).long()
    row_logsumexp, _ = _passes(device, hidden.dtype, backend)
    lse = torch.empty(N, dtype=acc, device=device)
    table = torch.empty(N, W, dtype=acc, device=device)
    special = torch.empty(N, dtype=acc, device=device)
    for start in range(0, N, chunk_size):
        stop = min(N, start + chunk_size)
        frames = _Frames(start, stop, T, targets, T_b, U_b, shift, W, special_id, V, flat_observed)
        # [n, V]: the only V-sized tensor of the forward
        logits = _logits_into(h.new_empty((stop - start, V)), h[start:stop], weight, bias)
        frame_lse = row_logsumexp(logits)
        picked = logits.gather(1, frames.tokens.clamp(min=0)).to(acc)
        del logits
        emissions = torch.where((frame_lse == NEG_INF)[:, None], NEG_INF, picked - frame_lse[:, None])
        if frames.observed is not None:  # an observed frame is forced: 0 for its token, -inf otherwise
            forced = torch.where(frames.tokens == frames.observed[:, None], 0.0, NEG_INF).to(acc)
            emissions = torch.where((frames.observed >= 0)[:, None], forced, emissions)
        used = (frames.tokens >= 0) & frames.active[:, None]
        emissions = torch.where(used, emissions, 0.0)
        # as the vocabulary pass of csrc/ops.cpp: a NaN anywhere in an active frame reaches the lattice
        has_nan = frames.active & (frame_lse.isnan() | emissions.isnan().any(1))
        special[start:stop] = torch.where(has_nan, float("nan"), emissions[:, 0])
        table[start:stop] = emissions[:, 1:]
        lse[start:stop] = torch.where(frames.active, frame_lse, 0.0)
    _, lattice_band, _ = backends.stages(backend)
    table, special = table.view(B, T, W), special.view(B, T)
    shift_arg = max_shift if mode == PRESERVE else -1
    nll = lattice_band(table, special, targets, input_lengths, target_lengths, mode, shift_arg, need_grad)
    if not need_grad:
        table, special = table.new_empty((B, T, 0)), special.new_empty((B, 0))
    return nll, lse.view(B, T), table, special


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
              chunk_size, backend):
    B, T, D = hidden.shape
    V = weight.shape[0]
    N, W = B * T, post_target.shape[2]
    dtype, device = hidden.dtype, hidden.device
    acc = acc_dtype(dtype)
    T_b, U_b, shift = _geometry(hidden, targets, input_lengths, target_lengths, mode, max_shift)
    h = hidden.reshape(N, D)
    flat_lse = lse.reshape(N).to(acc)
    flat_post = torch.cat([post_special.reshape(N, 1), post_target.reshape(N, W)], 1).to(acc)
    flat_observed = None if observed is None else observed.reshape(N).long()
    g = grad_nll.to(acc)
    infeasible = nll == float("inf")
    _, softmax_grad = _passes(device, dtype, backend)

    def frame_block(start, stop):
        """Per-frame scale / fill and the merged sparse posteriors of frames [start, stop)."""
        frames = _Frames(start, stop, T, targets, T_b, U_b, shift, W, special_id, V, flat_observed)
        dead_row = infeasible[frames.row]
        compute = frames.live & ~dead_row
        scale = torch.where(compute, g[frames.row], 0.0)
        # PyTorch's convention (csrc/ops.cpp): an infeasible row's live frames get 0 or NaN
        nan_fill = frames.live & dead_row & (not zero_infinity)
        fill = torch.where(nan_fill, float("nan"), 0.0).to(acc)
        frame_lse = flat_lse[start:stop]
        frame_lse = torch.where(frame_lse == NEG_INF, float("inf"), frame_lse)  # a dead frame: softmax 0
        posts = torch.where(frames.tokens >= 0, flat_post[start:stop], 0.0)
        tokens, totals, last = _merge_duplicates(frames.tokens, posts)
        return compute, scale, fill, frame_lse, tokens, totals, last & (tokens >= 0)

    def tile_gradient(block, start, stop, v0, v1):
        """dz for frames [start, stop) x vocabulary [v0, v1), in the input dtype, held in a flat
        buffer whose last element is a sink for the sparse writes that fall outside the tile."""
        compute, scale, fill, frame_lse, tokens, totals, writes = block
        n, v = stop - start, v1 - v0
        buffer = torch.empty(n * v + 1, dtype=dtype, device=device)
        z = buffer[: n * v].view(n, v)
        _logits_into(z, h[start:stop], weight[v0:v1], None if bias is None else bias[v0:v1])
        for r0 in range(0, n, _SPARSE_ROWS):  # in row blocks, so the [rows, W + 1] temporaries stay small
            r1 = min(n, r0 + _SPARSE_ROWS)
            local = tokens[r0:r1] - v0
            inside = writes[r0:r1] & (local < v) & (local >= 0) & compute[r0:r1, None]
            # the posterior columns, read before the dense pass overwrites the logits; one rounding to dtype
            picked = z[r0:r1].gather(1, local.clamp(0, v - 1)).to(acc)
            value = (scale[r0:r1, None] * (torch.exp(picked - frame_lse[r0:r1, None]) - totals[r0:r1])).to(dtype)
            softmax_grad(z[r0:r1], frame_lse[r0:r1], scale[r0:r1], fill[r0:r1], compute[r0:r1])
            index = torch.arange(r0, r1, device=device)[:, None] * v + local
            index = torch.where(inside, index, n * v)  # every (frame, token) once; the rest to the sink
            buffer.index_put_((index.reshape(-1),), value.reshape(-1))
        return z

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

    def accumulate(dz, block_range, vocab_range, first_frame_block, first_vocab_tile):
        (start, stop), (v0, v1) = block_range, vocab_range
        if grad_hidden is not None:
            _mm_into(grad_hidden[start:stop], dz, weight[v0:v1], accumulate=not first_vocab_tile)
        if grad_weight is not None:
            _mm_into(grad_weight[v0:v1], dz.t(), h[start:stop], accumulate=not first_frame_block)
        if grad_bias is not None:
            grad_bias[v0:v1] += dz.sum(0, dtype=acc)

    if vocab_outer:
        single_block = frame_block(0, N) if len(frame_starts) == 1 else None
        for vi, v0 in enumerate(vocab_starts):
            v1 = min(V, v0 + vocab_per_tile)
            for fi, start in enumerate(frame_starts):
                stop = min(N, start + frames_per_tile)
                block = single_block if single_block is not None else frame_block(start, stop)
                dz = tile_gradient(block, start, stop, v0, v1)
                accumulate(dz, (start, stop), (v0, v1), fi == 0, vi == 0)
                del dz
    else:
        for fi, start in enumerate(frame_starts):
            stop = min(N, start + frames_per_tile)
            block = frame_block(start, stop)
            for vi, v0 in enumerate(vocab_starts):
                v1 = min(V, v0 + vocab_per_tile)
                dz = tile_gradient(block, start, stop, v0, v1)
                accumulate(dz, (start, stop), (v0, v1), fi == 0, vi == 0)
                del dz

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
                           chunk_size: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(nll [B], lse [B, T], post_target [B, T, W], post_special [B, T])`` from hidden states and the
    LM head; the posteriors are empty (width 0) unless ``need_grad``. ``zero_infinity`` is only read by
    the backward."""
    return _forward(hidden, weight, bias, targets, input_lengths, target_lengths, observed, special_id, mode,
                    max_shift, band_width, need_grad, chunk_size, backend)


@linear_lattice_forward.register_fake
def _linear_lattice_forward_fake(hidden, weight, bias, targets, input_lengths, target_lengths, observed, special_id,
                                 mode, max_shift, band_width, need_grad, zero_infinity, chunk_size, backend):
    B, T, _ = hidden.shape
    acc = acc_dtype(hidden.dtype)
    width = max(band_width, 1) if need_grad else 0
    return (hidden.new_empty((B,), dtype=acc), hidden.new_empty((B, T), dtype=acc),
            hidden.new_empty((B, T, width), dtype=acc), hidden.new_empty((B, T if need_grad else 0), dtype=acc))


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
     need_grad, zero_infinity, chunk_size, backend) = inputs
    nll, lse, post_target, post_special = output
    ctx.save_for_backward(hidden, weight, bias, targets, input_lengths, target_lengths, observed, lse, post_target,
                          post_special, nll)
    ctx.mark_non_differentiable(lse, post_target, post_special)
    ctx.set_materialize_grads(False)
    ctx.options = (special_id, mode, max_shift, need_grad, zero_infinity, chunk_size, backend)


def _backward_formula(ctx, grad_nll, _grad_lse, _grad_post_target, _grad_post_special):
    special_id, mode, max_shift, need_grad, zero_infinity, chunk_size, backend = ctx.options
    (hidden, weight, bias, targets, input_lengths, target_lengths, observed, lse, post_target, post_special,
     nll) = ctx.saved_tensors
    none = (None,) * 15
    if grad_nll is None:
        return none
    if not need_grad:
        raise RuntimeError("mdlm_ctc: the forward ran without posteriors (no input required grad, or grad mode "
                           "was off), so there is no gradient to compute")
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = bias is not None and ctx.needs_input_grad[2]
    grad_hidden, grad_weight, grad_bias = linear_lattice_backward(
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
                          validate: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """``slack_ctc_loss(hidden @ weight.T + bias, ...)`` without materialising the logits.

    Args:
        hidden: ``[B, T, D]`` hidden states entering the LM head, float32/bfloat16/float16/float64.
        weight: ``[V, D]`` the LM head (``nn.Linear(D, V).weight``), same dtype and device as ``hidden``.
        targets, target_lengths, slack_id, input_lengths, collapse, max_shift, observed, reduction,
        zero_infinity, backend, validate: exactly as :func:`mdlm_ctc.slack_ctc_loss` (SPEC §2-§3).
        bias: optional ``[V]`` bias of the LM head.
        chunk_size: frames (tokens) per chunk; at most ``chunk_size * V`` logits exist at any time
            (plus a few same-sized temporaries in the CPU path). Default 1024: 259 MB of bf16 logits at
            V = 126,464. Smaller saves memory, larger amortises the per-chunk overhead.

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
                                         chunk_size)
    name = backends.resolve(backend, hidden.device)
    need_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    nll, _, _, _ = linear_lattice_forward(hidden, weight, bias, args.targets, args.input_lengths,
                                          args.target_lengths, args.observed, args.special_id, args.mode,
                                          args.max_shift, args.band_width, need_grad, zero_infinity, chunk_size,
                                          name)
    return _reduce(nll, args.target_lengths, reduction, zero_infinity)


class LinearSlackCTCLoss(SlackCTCLoss):
    """Module form of :func:`linear_slack_ctc_loss` (the options of :class:`SlackCTCLoss` plus
    ``chunk_size``); ``forward(hidden, weight, targets, ...)`` or, with an ``nn.Linear`` LM head,
    ``forward(hidden, lm_head, targets, ...)``."""

    def __init__(self, slack_id: int, collapse: str = "preserve", max_shift: int | None = None,
                 reduction: str = "mean", zero_infinity: bool = False, backend: str = "auto",
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__(slack_id, collapse, max_shift, reduction, zero_infinity, backend)
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor | nn.Linear, targets: Tensor, target_lengths: Tensor | None = None,
                bias: Tensor | None = None, input_lengths: Tensor | None = None,
                observed: Tensor | None = None) -> Tensor:
        if isinstance(weight, nn.Linear):
            weight, bias = weight.weight, weight.bias if bias is None else bias
        return linear_slack_ctc_loss(hidden, weight, targets, target_lengths, bias=bias, slack_id=self.slack_id,
                                     input_lengths=input_lengths, collapse=self.collapse, max_shift=self.max_shift,
                                     observed=observed, reduction=self.reduction, zero_infinity=self.zero_infinity,
                                     backend=self.backend, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
