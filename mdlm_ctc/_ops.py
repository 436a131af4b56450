"""The op layer: ``torch.library`` custom ops with fake kernels and autograd.

Two ops carry every loss in the package; each composes the three stages of a backend
(``csrc/ops.cpp``: emissions, lattice_band, gradient):

* ``mdlm_ctc::lattice_forward`` -> ``(nll [B], lse [B, T], post_target [B, T, W], post_special [B, T])``:
  the negative log-likelihood per row and, when a gradient is needed, the posteriors the gradient
  pass reads (layout in ``csrc/lattice.h``). The forward computes all that backward needs;
* ``mdlm_ctc::lattice_backward`` -> ``grad [B, T, V]``: ``g * (softmax - posterior)`` in the logits'
  dtype (``-g * posterior`` for log-probability inputs, ``normalize=False``).

``best_alignment`` is a third op (Viterbi). A ``backend`` string argument selects the implementation
(``mdlm_ctc.backends``); the ops are opaque to ``torch.compile``, so no graph breaks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .reference import PRESERVE, acc_dtype, viterbi_reference


@torch.library.custom_op("mdlm_ctc::lattice_forward", mutates_args=())
def lattice_forward(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                    observed: Optional[Tensor], special_id: int, mode: int, max_shift: int, band_width: int,
                    need_grad: bool, normalize: bool, zero_infinity: bool, inplace_grad: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    emissions, lattice_band, _ = backends.stages(backend)
    shift = max_shift if mode == PRESERVE else -1
    width = max(band_width, 1)
    lse, table, special = emissions(logits, targets, input_lengths, target_lengths, observed, special_id, shift, width,
                                    normalize)
    nll = lattice_band(table, special, targets, input_lengths, target_lengths, mode, shift, need_grad)
    if not need_grad:  # the table only held emissions
        table, special = table.new_empty((table.shape[0], table.shape[1], 0)), special.new_empty((special.shape[0], 0))
    return nll, lse, table, special


@lattice_forward.register_fake
def _lattice_forward_fake(logits, targets, input_lengths, target_lengths, observed, special_id, mode, max_shift,
                          band_width, need_grad, normalize, zero_infinity, inplace_grad, backend):
    B, T, _ = logits.shape
    acc = acc_dtype(logits.dtype)
    width = max(band_width, 1) if need_grad else 0
    return (logits.new_empty((B,), dtype=acc), logits.new_empty((B, T), dtype=acc),
            logits.new_empty((B, T, width), dtype=acc), logits.new_empty((B, T if need_grad else 0), dtype=acc))


@torch.library.custom_op("mdlm_ctc::lattice_backward", mutates_args=())
def lattice_backward(grad_nll: Tensor, logits: Tensor, lse: Tensor, targets: Tensor, input_lengths: Tensor,
                     target_lengths: Tensor, observed: Optional[Tensor], post_target: Tensor, post_special: Tensor,
                     nll: Tensor, special_id: int, mode: int, max_shift: int, zero_infinity: bool, normalize: bool,
                     backend: str) -> Tensor:
    _, _, gradient = backends.stages(backend)
    return gradient(grad_nll, logits, lse, targets, input_lengths, target_lengths, observed, post_target, post_special,
                    nll, special_id, max_shift if mode == PRESERVE else -1, zero_infinity, normalize)


@lattice_backward.register_fake
def _lattice_backward_fake(grad_nll, logits, lse, targets, input_lengths, target_lengths, observed, post_target,
                           post_special, nll, special_id, mode, max_shift, zero_infinity, normalize, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("mdlm_ctc::lattice_backward_into_logits", mutates_args=("logits",))
def lattice_backward_into_logits(grad_nll: Tensor, logits: Tensor, lse: Tensor, targets: Tensor,
                                 input_lengths: Tensor, target_lengths: Tensor, observed: Optional[Tensor],
                                 post_target: Tensor, post_special: Tensor, nll: Tensor, special_id: int, mode: int,
                                 max_shift: int, zero_infinity: bool, normalize: bool, backend: str) -> None:
    """``lattice_backward`` written over the logits buffer (the caller gave up the logits' values).

    The Triton gradient pass reads each row's band values before writing the row, so it runs in place;
    the other backends compute the gradient and copy it over (same result, no memory saved)."""
    _, _, gradient = backends.stages(backend)
    args = (grad_nll, logits, lse, targets, input_lengths, target_lengths, observed, post_target, post_special, nll,
            special_id, max_shift if mode == PRESERVE else -1, zero_infinity, normalize)
    if backend in ("triton", "cuda"):
        gradient(*args, out=logits)
    else:
        logits.copy_(gradient(*args))


@lattice_backward_into_logits.register_fake
def _lattice_backward_into_logits_fake(*args):
    return None


def _setup_context(ctx, inputs, output):
    (logits, targets, input_lengths, target_lengths, observed, special_id, mode, max_shift, band_width,
     need_grad, normalize, zero_infinity, inplace_grad, backend) = inputs
    nll, lse, post_target, post_special = output
    ctx.save_for_backward(logits, targets, input_lengths, target_lengths, observed, lse, post_target, post_special,
                          nll)
    ctx.mark_non_differentiable(lse, post_target, post_special)
    ctx.set_materialize_grads(False)  # no zero-filled [B, T, W] gradients for the non-differentiable outputs
    ctx.options = (special_id, mode, max_shift, need_grad, normalize, zero_infinity, inplace_grad, backend)


def _backward(ctx, grad_nll, _grad_lse, _grad_post_target, _grad_post_special):
    special_id, mode, max_shift, need_grad, normalize, zero_infinity, inplace_grad, backend = ctx.options
    (logits, targets, input_lengths, target_lengths, observed, lse, post_target, post_special,
     nll) = ctx.saved_tensors
    if not need_grad:
        raise RuntimeError("mdlm_ctc: the forward ran without posteriors (the logits did not require grad, or "
                           "grad mode was off), so there is no gradient to compute")
    if grad_nll is None:
        return (None,) * 14
    if inplace_grad and not torch.compiler.is_compiling():
        lattice_backward_into_logits(grad_nll.contiguous(), logits, lse, targets, input_lengths, target_lengths,
                                     observed, post_target, post_special, nll, special_id, mode, max_shift,
                                     zero_infinity, normalize, backend)
        return (logits,) + (None,) * 13
    grad = lattice_backward(grad_nll.contiguous(), logits, lse, targets, input_lengths, target_lengths, observed,
                            post_target, post_special, nll, special_id, mode, max_shift, zero_infinity, normalize,
                            backend)
    return (grad,) + (None,) * 13


torch.library.register_autograd("mdlm_ctc::lattice_forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("mdlm_ctc::best_alignment", mutates_args=())
def best_alignment_op(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                      observed: Optional[Tensor], special_id: int, mode: int, max_shift: int) -> Tensor:
    return viterbi_reference(logits, targets, input_lengths, target_lengths, observed, special_id, mode,
                             None if max_shift < 0 else max_shift)


@best_alignment_op.register_fake
def _best_alignment_fake(logits, targets, input_lengths, target_lengths, observed, special_id, mode, max_shift):
    return logits.new_empty(logits.shape[:2], dtype=torch.long)
