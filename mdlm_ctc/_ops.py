"""The op layer: ``torch.library`` custom ops with fake kernels and autograd.

One op carries every materialised loss in the package, ``mdlm_ctc::loss_forward`` -> ``(loss, nll,
row_scale, lse, post_target, post_special, soft_target, soft_special, grad)``: the reduced loss (the
per-row weights and the reduction are applied inside, so the op knows each row's share of the
gradient before the backward), the per-row negative log-likelihood, and what the backward needs. It
composes a backend's stages (``csrc/ops.cpp``) along one of two paths:

* **two passes** (the default for normalised logits that require a gradient): the vocabulary pass
  reads each frame's logits once, gives the logsumexp and the band emission table, and in the same
  sweep writes ``row_scale[b] * softmax`` into the gradient buffer (or over the logits themselves with
  ``inplace_backward``); the lattice turns the band table into posteriors; the backward
  (``mdlm_ctc::gradient_finish``) only writes ``(g * row_scale) * (softmax - posterior)`` at the band's
  tokens and the special token (``W + 1`` values per frame), plus one dense pass over the rows whose
  upstream gradient ``g`` is not exactly 1 or that are infeasible, decided per row on the device (no
  host sync). The buffer is the gradient itself, allocated in the forward instead of the backward.
* **three passes**: the vocabulary pass, the lattice, and in the backward the gradient pass
  (``mdlm_ctc::loss_backward``: ``g * row_scale * (softmax - posterior)``, reading the logits again).
  Used where it moves fewer bytes: log-probability input (``ctc_loss``: the gradient is the sparse
  ``-g * posterior``, there is no softmax to write early) and bands as wide as the vocabulary (the
  band's scattered columns touch most cache lines of a frame's gradient a second time, see
  :func:`gradient_in_forward`).

A second backward through a retained graph finds the buffer already turned into the first gradient:
it runs the two-pass vocabulary pass again from the saved logits into a new buffer (the same bits as
the first backward for the same upstream gradient); with ``inplace_backward`` the logits are gone
and it is refused. Double backward (``create_graph=True``) is refused.

Traffic per element of the ``[B, T, V]`` logits (``e`` bytes each): two passes read ``e`` and write
``e`` (plus ``2 (W + 1) * 4`` bytes per frame of band tables, and a dense ``2e`` where the dense scaling
runs); three passes read ``2e`` and write ``e``.

``row_scale[b]`` is the row's share of the reduced loss: ``weight[b] / (B * max(U_b, 1))`` for
``reduction="mean"``, ``weight[b]`` for ``"sum"`` and ``"none"`` (``weight`` is the optional per-row
argument of :func:`mdlm_ctc.slack_ctc_loss`, 1 when absent).

``best_alignment`` is a second op (Viterbi). A ``backend`` string argument selects the implementation
(``mdlm_ctc.backends``); the ops are opaque to ``torch.compile``, so no graph breaks.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .reference import PRESERVE, acc_dtype, viterbi_reference

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}
_LINE_BYTES = {"cpu": 64}  # the granularity a scattered write touches: a cache line on the CPU, a sector on a GPU
_GPU_SECTOR_BYTES = 32


def gradient_in_forward_setting() -> str:
    """``MDLM_CTC_GRADIENT_IN_FORWARD``: ``auto`` (default; :func:`gradient_in_forward` decides per call),
    ``1`` (always write the gradient in the forward where possible) or ``0`` (never: the three-pass path,
    and the recompute path of the fused LM head). Read on the host at every call."""
    value = os.environ.get("MDLM_CTC_GRADIENT_IN_FORWARD", "auto").strip().lower()
    if value not in ("auto", "1", "0"):
        raise ValueError(f"MDLM_CTC_GRADIENT_IN_FORWARD must be auto, 1 or 0; got {value!r}")
    return value


def gradient_in_forward(backend: str, device: torch.device, vocab: int, band_width: int, itemsize: int) -> bool:
    """Whether the two-pass path moves fewer bytes than the three-pass path for a band of ``band_width``
    columns in a ``vocab``-wide frame of ``itemsize``-byte logits (host integers only: no sync).

    Per frame, the three-pass path reads the logits twice and writes the gradient once (``3 V e`` bytes);
    the two-pass path reads them once and writes once (``2 V e``), writes and reads the fp32 band softmax
    (``2 (W + 1) 4``), and in the backward reads and writes what the band's ``W + 1`` scattered columns
    touch: ``min(V e, (W + 1) L)`` bytes each way with ``L`` a cache line (CPU, 64 B) or a sector (GPU,
    32 B). So it wins when ``2 min(V e, (W + 1) L) + 8 (W + 1) < V e``: MDLM bands at LLM vocabularies
    (G1: 258 columns of 126,464), not a band as wide as a 1,000-token vocabulary (C1, C2).
    """
    setting = gradient_in_forward_setting()
    if setting != "auto":
        return setting == "1"
    line = _LINE_BYTES.get(device.type, _GPU_SECTOR_BYTES)
    row_bytes = vocab * itemsize
    columns = band_width + 1
    return 2 * min(row_bytes, columns * line) + 8 * columns < row_bytes


def row_scale_of(target_lengths: Tensor, weight: Optional[Tensor], reduction: int, batch: int,
                 dtype: torch.dtype) -> Tensor:
    """``[B]``: d loss / d nll_b for an upstream gradient of 1 (the module docstring's ``row_scale``)."""
    if weight is None:
        scale = torch.ones(batch, dtype=dtype, device=target_lengths.device)
    else:
        scale = weight.to(dtype, copy=True)  # an output must not alias the input
    if reduction == REDUCTION_CODES["mean"]:
        scale = scale / (target_lengths.clamp(min=1).to(dtype) * batch)
    return scale


def upstream_rows(grad_loss: Tensor, reduction: int, batch: int, dtype: torch.dtype) -> Tensor:
    """``[B]``: the upstream gradient of each row's loss (the scalar's, broadcast, for mean and sum)."""
    grad = grad_loss.to(dtype)
    return (grad.expand(batch) if reduction != REDUCTION_CODES["none"] else grad).contiguous()


def refuse_unsupported_backward(need_grad: bool) -> None:
    """The backward's two refusals, with their reasons (shared by the materialised and the fused loss)."""
    if not need_grad:
        raise RuntimeError("mdlm_ctc: the forward ran without posteriors (no input required grad, or grad mode "
                           "was off), so there is no gradient to compute")
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("mdlm_ctc: the loss is differentiable once; double backward (create_graph=True) "
                           "through it is not supported")


def row_weight_gradient(grad_rows: Tensor, nll: Tensor, target_lengths: Tensor, reduction: int, zero_infinity: bool,
                        dtype: torch.dtype) -> Tensor:
    """d loss / d weight_b: the row's share of the loss, ``g_b * nll_b`` (``/ (B max(U_b, 1))`` for mean)."""
    if zero_infinity:
        nll = torch.where(nll == float("inf"), torch.zeros_like(nll), nll)
    factor = row_scale_of(target_lengths, None, reduction, nll.shape[0], nll.dtype)
    return (grad_rows * nll * factor).to(dtype)


def reduce_loss(nll: Tensor, row_scale: Tensor, weight: Optional[Tensor], reduction: int,
                zero_infinity: bool) -> Tensor:
    """The loss from per-row nll: ``sum_b row_scale[b] * nll[b]`` (``mean``, ``sum``; 0 over no rows), or
    ``weight * nll`` (``none``). ``zero_infinity`` counts an infeasible row as 0. A ``-0`` becomes ``+0``."""
    if zero_infinity:
        nll = torch.where(nll == float("inf"), torch.zeros_like(nll), nll)
    if reduction == REDUCTION_CODES["none"]:
        loss = nll if weight is None else nll * weight.to(nll.dtype)
    else:
        loss = (nll * row_scale).sum()
    return loss + 0.0


@torch.library.custom_op("mdlm_ctc::loss_forward", mutates_args=())
def loss_forward(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                 observed: Optional[Tensor], weight: Optional[Tensor], special_id: int, mode: int, max_shift: int,
                 band_width: int, reduction: int, need_grad: bool, normalize: bool, zero_infinity: bool,
                 two_pass: bool, inplace_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                           Tensor, Tensor, Tensor, Tensor]:
    """The loss and what its backward needs (module docstring). ``two_pass`` (with ``need_grad``, normalised
    input) writes the scaled softmax in the vocabulary pass into ``grad`` (returned), or, with
    ``inplace_grad`` in eager mode, over ``logits`` (then ``grad`` is empty and the logits' version counter
    is bumped, so a graph that saved them for its own backward fails loudly instead of reading a gradient).
    Without ``need_grad`` the posteriors and band tables are empty (width 0) and nothing is written."""
    B, T, V = logits.shape
    acc = acc_dtype(logits.dtype)
    shift = max_shift if mode == PRESERVE else -1
    width = max(band_width, 1)
    scale = row_scale_of(target_lengths, weight, reduction, B, acc)
    emissions, lattice_band, _ = backends.stages(backend)
    two_pass = two_pass and need_grad and normalize
    empty = logits.new_empty((0,))
    if two_pass:
        emissions_grad, _ = backends.two_pass_stages(backend)
        grad = logits if inplace_grad else backends.gradient_buffer(logits)
        lse, table, special, soft_target, soft_special = emissions_grad(
            logits, targets, input_lengths, target_lengths, observed, special_id, shift, width, scale, grad)
        if inplace_grad:
            torch.autograd.graph.increment_version(logits)
            grad = empty
    else:
        lse, table, special = emissions(logits, targets, input_lengths, target_lengths, observed, special_id, shift,
                                        width, normalize)
        soft_target, soft_special, grad = table.new_empty((B, T, 0)), special.new_empty((B, 0)), empty
    nll = lattice_band(table, special, targets, input_lengths, target_lengths, mode, shift, need_grad)
    if not need_grad:  # the table only held emissions
        table, special = table.new_empty((B, T, 0)), special.new_empty((B, 0))
    loss = reduce_loss(nll, scale, weight, reduction, zero_infinity)
    return loss, nll, scale, lse, table, special, soft_target, soft_special, grad


@loss_forward.register_fake
def _loss_forward_fake(logits, targets, input_lengths, target_lengths, observed, weight, special_id, mode, max_shift,
                       band_width, reduction, need_grad, normalize, zero_infinity, two_pass, inplace_grad, backend):
    B, T, _ = logits.shape
    acc = acc_dtype(logits.dtype)
    width = max(band_width, 1) if need_grad else 0
    two_pass = two_pass and need_grad and normalize
    side = width if two_pass else 0

    def new(*shape, dtype=acc):
        return logits.new_empty(shape, dtype=dtype)
    return (new(B) if reduction == REDUCTION_CODES["none"] else new(), new(B), new(B), new(B, T), new(B, T, width),
            new(B, T if need_grad else 0), new(B, T, side), new(B, T if side else 0),
            new(*(logits.shape if two_pass and not inplace_grad else (0,)), dtype=logits.dtype))


@torch.library.custom_op("mdlm_ctc::loss_backward", mutates_args=())
def loss_backward(grad_nll: Tensor, logits: Tensor, lse: Tensor, targets: Tensor, input_lengths: Tensor,
                  target_lengths: Tensor, observed: Optional[Tensor], post_target: Tensor, post_special: Tensor,
                  nll: Tensor, special_id: int, mode: int, max_shift: int, zero_infinity: bool, normalize: bool,
                  backend: str) -> Tensor:
    """The three-pass gradient pass: ``grad_nll[b] * (softmax - posterior)`` in the logits' dtype
    (``-grad_nll[b] * posterior`` for log-probability input, ``normalize=False``)."""
    _, _, gradient = backends.stages(backend)
    return gradient(grad_nll, logits, lse, targets, input_lengths, target_lengths, observed, post_target, post_special,
                    nll, special_id, max_shift if mode == PRESERVE else -1, zero_infinity, normalize)


@loss_backward.register_fake
def _loss_backward_fake(grad_nll, logits, lse, targets, input_lengths, target_lengths, observed, post_target,
                        post_special, nll, special_id, mode, max_shift, zero_infinity, normalize, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("mdlm_ctc::gradient_finish", mutates_args=("grad",))
def gradient_finish(grad: Tensor, grad_rows: Tensor, row_scale: Tensor, nll: Tensor, targets: Tensor,
                    input_lengths: Tensor, target_lengths: Tensor, observed: Optional[Tensor], soft_target: Tensor,
                    soft_special: Tensor, post_target: Tensor, post_special: Tensor, special_id: int, band_shift: int,
                    zero_infinity: bool, backend: str) -> None:
    """The two-pass backward, in place on ``grad`` (which holds ``row_scale * softmax``): the rows whose
    upstream gradient ``grad_rows[b]`` is not exactly 1 scaled, infeasible rows filled, and the exact
    ``(g * row_scale) * (softmax - posterior)`` at the band's tokens and the special token. ``band_shift``:
    ``max_shift`` for preserve, -1 otherwise (no argument may be called ``mode``: functionalisation's own)."""
    _, finish = backends.two_pass_stages(backend)
    finish(grad_rows, row_scale, nll, targets, input_lengths, target_lengths, observed, soft_target, soft_special,
           post_target, post_special, special_id, band_shift, zero_infinity, grad)


@gradient_finish.register_fake
def _gradient_finish_fake(*args):
    return None


def _setup_context(ctx, inputs, output):
    (logits, targets, input_lengths, target_lengths, observed, weight, special_id, mode, max_shift, band_width,
     reduction, need_grad, normalize, zero_infinity, two_pass, inplace_grad, backend) = inputs
    loss, nll, scale, lse, post_target, post_special, soft_target, soft_special, grad = output
    two_pass = two_pass and need_grad and normalize
    # The two-pass buffer: the gradient output, or the logits themselves (then the logits are not saved as
    # logits: their values are gone). Three passes save the logits for the gradient pass; two passes save
    # them too unless in place, for a second backward through a retained graph (one that needs them).
    buffer = (logits if inplace_grad else grad) if two_pass else None
    saved_logits = None if (two_pass and inplace_grad) else logits
    # Eager: the buffer is held by ctx, not saved, since the backward overwrites it (a saved tensor's version
    # check would then refuse a second backward, which recomputes instead) and drops it before returning it
    # (so that autograd can hand it on without a copy). A traced backward gets it as a saved tensor.
    traced = torch.compiler.is_compiling() or (buffer is not None and type(buffer) not in (Tensor, torch.nn.Parameter))
    ctx.buffer = None if traced else buffer
    ctx.save_for_backward(saved_logits, buffer if traced else None, targets, input_lengths, target_lengths, observed,
                          weight, lse, post_target, post_special, soft_target, soft_special, nll, scale)
    ctx.mark_non_differentiable(nll, scale, lse, post_target, post_special, soft_target, soft_special, grad)
    ctx.set_materialize_grads(False)  # no zero-filled [B, T, W] gradients for the non-differentiable outputs
    ctx.options = (special_id, mode, max_shift, reduction, need_grad, normalize, zero_infinity, two_pass,
                   inplace_grad, backend)
    ctx.buffer_used = False


def _backward(ctx, grad_loss, *_unused):
    (special_id, mode, max_shift, reduction, need_grad, normalize, zero_infinity, two_pass, inplace_grad,
     backend) = ctx.options
    (logits, buffer, targets, input_lengths, target_lengths, observed, weight, lse, post_target, post_special,
     soft_target, soft_special, nll, scale) = ctx.saved_tensors
    if buffer is None:
        buffer, ctx.buffer = ctx.buffer, None
    none = (None,) * 17
    if grad_loss is None:
        return none
    grad_rows = upstream_rows(grad_loss, reduction, nll.shape[0], nll.dtype)
    grad_logits = grad_weight = None
    if ctx.needs_input_grad[0]:
        refuse_unsupported_backward(need_grad)
        shift = max_shift if mode == PRESERVE else -1
        if two_pass:
            if ctx.buffer_used:  # a second backward (retain_graph): the vocabulary pass again, into a new buffer
                if logits is None:
                    raise RuntimeError("mdlm_ctc: a second backward through this loss (retain_graph=True) needs the "
                                       "logits, but inplace_backward=True wrote the gradient over them in the "
                                       "forward; call it without inplace_backward to backpropagate twice")
                buffer = backends.gradient_buffer(logits)
                backends.two_pass_stages(backend)[0](logits, targets, input_lengths, target_lengths, observed,
                                                     special_id, shift, post_target.shape[-1], scale, buffer)
            ctx.buffer_used = True
            gradient_finish(buffer, grad_rows, scale, nll, targets, input_lengths, target_lengths, observed,
                            soft_target, soft_special, post_target, post_special, special_id, shift, zero_infinity,
                            backend)
            grad_logits = buffer
        else:
            args = (grad_rows * scale, logits, lse, targets, input_lengths, target_lengths, observed, post_target,
                    post_special, nll)
            if inplace_grad and not two_pass and not torch.compiler.is_compiling():
                # the three-pass gradient over the logits buffer: the Triton pass reads each row's band values
                # before it writes the row, so it runs in place; the other backends copy (no memory saved)
                if backend in ("triton", "cuda"):
                    backends.stages(backend)[2](*args, special_id, shift, zero_infinity, normalize, out=logits)
                else:
                    logits.copy_(loss_backward(*args, special_id, mode, max_shift, zero_infinity, normalize, backend))
                grad_logits = logits
            else:
                grad_logits = loss_backward(*args, special_id, mode, max_shift, zero_infinity, normalize, backend)
    if weight is not None and ctx.needs_input_grad[5]:
        grad_weight = row_weight_gradient(grad_rows, nll, target_lengths, reduction, zero_infinity, weight.dtype)
    return (grad_logits, None, None, None, None, grad_weight) + none[6:]


torch.library.register_autograd("mdlm_ctc::loss_forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("mdlm_ctc::best_alignment", mutates_args=())
def best_alignment_op(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                      observed: Optional[Tensor], special_id: int, mode: int, max_shift: int) -> Tensor:
    return viterbi_reference(logits, targets, input_lengths, target_lengths, observed, special_id, mode,
                             None if max_shift < 0 else max_shift)


@best_alignment_op.register_fake
def _best_alignment_fake(logits, targets, input_lengths, target_lengths, observed, special_id, mode, max_shift):
    return logits.new_empty(logits.shape[:2], dtype=torch.long)
