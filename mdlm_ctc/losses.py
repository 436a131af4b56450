"""The public losses: ``slack_ctc_loss`` / ``SlackCTCLoss`` and the drop-in ``ctc_loss`` / ``CTCLoss``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _ops, _validation, backends


def _reduce(nll: Tensor, target_lengths: Tensor, reduction: str, zero_infinity: bool) -> Tensor:
    """PyTorch's reductions of per-row losses (``mean``: each divided by its clamped target length, then
    averaged over the batch; 0 over an empty batch, never NaN), for callers that hold ``nll`` themselves."""
    code = _ops.REDUCTION_CODES[reduction]
    scale = _ops.row_scale_of(target_lengths, None, code, nll.shape[0], nll.dtype)
    return _ops.reduce_loss(nll, scale, None, code, zero_infinity)


def _run(args: _validation.LatticeArgs, *, normalize: bool, zero_infinity: bool, backend: str, reduction: str,
         weight: Tensor | None = None, inplace_backward: bool = False) -> Tensor:
    """The reduced loss through the op layer (``mdlm_ctc/_ops.py``), on the two-pass or the three-pass path."""
    x = args.logits
    if x.stride(-1) != 1:
        x = x.contiguous()  # kernels read the vocabulary dimension contiguously
    name = backends.resolve(backend, x.device, (x.shape[0], x.shape[1], args.band_width, args.mode))
    need_grad = torch.is_grad_enabled() and x.requires_grad
    B, T, V = x.shape
    two_pass = need_grad and normalize and _ops.gradient_in_forward(name, x.device, V, args.band_width,
                                                                    x.element_size())
    inplace = inplace_backward and need_grad and not torch.compiler.is_compiling()
    loss, *_ = _ops.loss_forward(x, args.targets, args.input_lengths, args.target_lengths, args.observed, weight,
                                 args.special_id, args.mode, args.max_shift, args.band_width,
                                 _ops.REDUCTION_CODES[reduction], need_grad, normalize, zero_infinity, two_pass,
                                 inplace, name)
    return loss


def slack_ctc_loss(logits: Tensor, targets: Tensor, target_lengths: Tensor | None = None, *, slack_id: int,
                   input_lengths: Tensor | None = None, collapse: str = "preserve", max_shift: int | None = None,
                   observed: Tensor | None = None, reduction: str = "mean", zero_infinity: bool = False,
                   backend: str = "auto", validate: bool = True, inplace_backward: bool = False,
                   band_bound: int | None = None, weight: Tensor | None = None) -> Tensor:
    """CTC loss from unnormalised logits, with the surface-preserving collapse by default.

    Args:
        logits: ``[B, T, V]`` float32/bfloat16/float16/float64, batch-first. The log-softmax is applied
            inside; no log-probabilities are materialised.
        targets: ``[B, U]`` integer ids, right-padded.
        target_lengths: ``[B]`` (default ``U`` for every row).
        slack_id: the ``<slack>`` token (the blank for ``collapse="standard"``).
        input_lengths: ``[B]`` (default ``T``); frames ``t >= input_lengths[b]`` are ignored and get
            zero gradient.
        collapse: ``"preserve"`` (delete ``<slack>`` only, keep repeats; SPEC §3.1) or ``"standard"``
            (classic CTC, identical to ``torch.nn.functional.ctc_loss``; §3.2).
        max_shift: preserve only: at most this many slack tokens precede any target token (§3.3);
            ``0`` is position-wise cross-entropy, ``None`` the full lattice.
        observed: ``[B, T]`` ids, ``-1`` where the position is free; only canvases agreeing with every
            observed token count, and observed positions get zero gradient (§3.4).
        reduction: ``"none"`` -> ``[B]``, ``"sum"``, or ``"mean"`` (each loss divided by its target
            length clamped to >= 1, then averaged over the batch, as PyTorch).
        zero_infinity: an infeasible row gives loss 0 and zero gradient instead of ``inf`` (and a NaN
            gradient, as in PyTorch).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``;
            :func:`mdlm_ctc.available_backends` lists what this machine has.
        validate: check values (ids, lengths) with one host sync; skipped under ``torch.compile``.
        inplace_backward: write the gradient over the logits buffer instead of a new ``B×T×V`` one (no
            extra memory at all). On the two-pass path (the default where the band is narrow next to the
            vocabulary, see the README's "How it is built") the softmax is written over the logits *in the
            forward*, so the logits' values are gone as soon as the loss returns: only for logits nothing
            else reads again (their version counter is bumped, so an op that saved them for its own backward
            fails loudly), and a second backward through a retained graph is refused. On the three-pass path
            the gradient overwrites them during backward (Triton; the other backends copy). Ignored under
            ``torch.compile``.
        band_bound: an upper bound on every row's band width ``min(U_b, T_b - U_b + 1)`` (and
            ``max_shift + 1``). Only used without the validation sync (``validate=False``, under
            ``torch.compile``), where the lengths are not read on the host: the posterior table is then
            ``band_bound`` wide instead of ``min(U, T)`` (G1: 257 instead of 1,792 columns), checked on
            the device (a device-side assert if a row is wider). Validated calls raise a ``ValueError``
            naming the row when a row is wider.
        weight: optional ``[B]`` float tensor, a per-row multiplier of the loss applied before the reduction:
            ``none`` returns ``weight * nll``, ``sum`` ``sum_b weight_b * nll_b``, ``mean``
            ``mean_b(weight_b * nll_b / max(U_b, 1))``. Unlike multiplying the ``reduction="none"`` result
            afterwards, the weight is known in the forward, where the two-pass path writes the gradient's
            softmax part already scaled by it: the backward then needs no dense pass (only where the
            upstream gradient is not exactly 1, e.g. under a gradient scaler). Differentiable (its gradient
            is the row's share of the loss).

    Returns:
        The loss: float32 (float64 for float64 logits), ``[B]`` for ``reduction="none"`` else a scalar.
        An empty batch (``B = 0``, e.g. a rank with no rows) gives 0 for ``mean`` and ``sum``, never NaN;
        ``T = 0`` is accepted: a row with an empty target has loss 0 (the empty canvas), any other is
        infeasible.
    """
    args = _validation.check_slack_ctc_args(logits, targets, target_lengths, slack_id, input_lengths, collapse,
                                            max_shift, observed, reduction, zero_infinity, backend, validate,
                                            band_bound=band_bound)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"`inplace_backward` must be a bool; got {inplace_backward!r}")
    weight = _validation.check_weight(weight, args.logits.shape[0], args.logits.device)
    return _run(args, normalize=True, zero_infinity=zero_infinity, backend=backend, reduction=reduction,
                weight=weight, inplace_backward=inplace_backward)


class SlackCTCLoss(nn.Module):
    """Module form of :func:`slack_ctc_loss`."""

    def __init__(self, slack_id: int, collapse: str = "preserve", max_shift: int | None = None,
                 reduction: str = "mean", zero_infinity: bool = False, backend: str = "auto",
                 band_bound: int | None = None):
        super().__init__()
        self.slack_id = slack_id
        self.band_bound = band_bound
        self.collapse = collapse
        self.max_shift = max_shift
        self.reduction = reduction
        self.zero_infinity = zero_infinity
        self.backend = backend

    def forward(self, logits: Tensor, targets: Tensor, target_lengths: Tensor | None = None,
                input_lengths: Tensor | None = None, observed: Tensor | None = None,
                weight: Tensor | None = None) -> Tensor:
        return slack_ctc_loss(logits, targets, target_lengths, slack_id=self.slack_id, input_lengths=input_lengths,
                              collapse=self.collapse, max_shift=self.max_shift, observed=observed,
                              reduction=self.reduction, zero_infinity=self.zero_infinity, backend=self.backend,
                              band_bound=self.band_bound, weight=weight)

    def extra_repr(self) -> str:
        return (f"slack_id={self.slack_id}, collapse={self.collapse!r}, max_shift={self.max_shift}, "
                f"reduction={self.reduction!r}, zero_infinity={self.zero_infinity}, backend={self.backend!r}")


def ctc_loss(log_probs: Tensor, targets: Tensor, input_lengths, target_lengths, blank: int = 0,
             reduction: str = "mean", zero_infinity: bool = False, *, backend: str = "auto") -> Tensor:
    """Drop-in for ``torch.nn.functional.ctc_loss``: same arguments, same values.

    ``log_probs`` is ``[T, B, C]`` (or unbatched ``[T, C]``); targets are padded ``[B, S]`` or
    concatenated 1-D; lengths are tensors or lists. Also accepts bfloat16/float16 ``log_probs``. An empty
    batch or ``T = 0`` is refused with a ``ValueError``, as PyTorch refuses it.

    One difference, on purpose: the gradient is the true derivative of the loss with respect to
    ``log_probs`` (``-g * posterior``). PyTorch returns ``g * (exp(log_probs) - posterior)``, which is
    only right after a ``log_softmax``; through a ``log_softmax`` both give the same gradient.
    """
    args, unbatched = _validation.check_ctc_loss_args(log_probs, targets, input_lengths, target_lengths, blank,
                                                      reduction, zero_infinity)
    _validation.check_choice(backend, "backend", _validation.BACKENDS)
    loss = _run(args, normalize=False, zero_infinity=zero_infinity, backend=backend, reduction=reduction)
    if unbatched and reduction == "none":
        loss = loss[0]
    return loss


class CTCLoss(nn.Module):
    """Drop-in for ``torch.nn.CTCLoss`` (see :func:`ctc_loss`)."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        self.blank = blank
        self.reduction = reduction
        self.zero_infinity = zero_infinity
        self.backend = backend

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths, target_lengths) -> Tensor:
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                        self.zero_infinity, backend=self.backend)

    def extra_repr(self) -> str:
        return f"blank={self.blank}, reduction={self.reduction!r}, zero_infinity={self.zero_infinity}"
