"""Batched Viterbi alignment: the most probable admissible canvas for each row."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops, _validation


def best_alignment(logits: Tensor, targets: Tensor, target_lengths: Tensor | None = None, *, slack_id: int,
                   input_lengths: Tensor | None = None, collapse: str = "preserve", max_shift: int | None = None,
                   observed: Tensor | None = None) -> Tensor:
    """The most probable admissible canvas per row (Viterbi), ``[B, T]`` token ids.

    ``-1`` at positions ``t >= input_lengths[b]`` and everywhere on an infeasible row;
    ``collapse(best_alignment(...), slack_id, collapse)`` equals the target on every feasible row.
    Ties go to the earliest placement of the target tokens.
    """
    args = _validation.check_slack_ctc_args(logits, targets, target_lengths, slack_id, input_lengths, collapse,
                                            max_shift, observed, None, False, "auto", True)
    with torch.no_grad():
        return _ops.best_alignment_op(args.logits.detach(), args.targets, args.input_lengths, args.target_lengths,
                                      args.observed, args.special_id, args.mode, args.max_shift)
