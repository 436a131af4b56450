"""The collapse maps, on token ids (SPEC §2, §3)."""

from __future__ import annotations

import torch

from . import _validation


def collapse(tokens, slack_id, mode="preserve", lengths=None):
    """Map canvases to the sequences they stand for.

    ``mode="preserve"`` deletes every ``slack_id`` and keeps everything else, repeats included
    ("1 0 0 0" stays "1 0 0 0"); ``mode="standard"`` is classic CTC: merge runs of equal tokens, then
    delete ``slack_id`` (the blank).

    Args:
        tokens: ``[B, T]`` or ``[T]`` integer ids. Negative ids are padding (as ``best_alignment``
            writes past a row's input length) and are dropped before collapsing.
        slack_id: the special token.
        mode: ``"preserve"`` or ``"standard"``.
        lengths: optional ``[B]`` valid lengths; positions ``t >= lengths[b]`` are ignored.

    Returns:
        ``(ids, lengths)``: ``ids`` has the shape of ``tokens``, right-padded with ``-1``; ``lengths``
        is ``[B]`` (a scalar tensor for 1-D input).
    """
    _validation.check_collapse_args(tokens, slack_id, mode, lengths)
    squeeze = tokens.dim() == 1
    ids = tokens[None] if squeeze else tokens
    ids = ids.long()
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device)
    keep = ids >= 0
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=ids.device).long().reshape(-1)
        keep = keep & (positions[None, :] < lengths[:, None])
    # padding is removed first, so a run is never broken by it
    compact = _left_align(ids, keep)
    valid = compact >= 0
    if mode == "standard":
        previous = torch.cat([compact.new_full((B, 1), -1), compact[:, :-1]], dim=1)
        valid = valid & (compact != previous)
    valid = valid & (compact != slack_id)
    out = _left_align(compact, valid)
    out_lengths = valid.sum(1)
    if squeeze:
        return out[0], out_lengths[0]
    return out, out_lengths


def _left_align(ids, keep):
    """Move the kept entries of each row to its front, in order; the rest becomes -1."""
    B, T = ids.shape
    slot = torch.cumsum(keep.long(), dim=1) - 1
    slot = torch.where(keep, slot, torch.full_like(slot, T))  # dropped entries go to a spare column
    out = ids.new_full((B, T + 1), -1)
    out.scatter_(1, slot, torch.where(keep, ids, torch.full_like(ids, -1)))
    return out[:, :T]
