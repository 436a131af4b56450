"""The readable reference lattices: the oracle for every kernel, and the ``"reference"`` backend.

Everything here is plain PyTorch in log space: a loop over frames t, vectorised over the batch and
the lattice states, masking for ragged lengths, float64-capable. Read it next to SPEC §3.

Per row b: T_b = input length, U_b = target length, y_1..y_U the target, k the special token
(``<slack>`` for ``collapse="preserve"``, the blank for ``collapse="standard"``). The emission table
``em[b, t, c]`` holds log p_t(k) at column c = 0 and log p_t(y_c) at columns c = 1..U (0 or -inf at
observed frames, SPEC §3.4). The two lattices only ever read that table.

* ``preserve``: states u = 0..U (target tokens emitted so far); at frame t a path either emits k and
  stays, or emits y_{u+1} and advances. Repeats are never merged.
* ``standard``: classic CTC over the extended label k y_1 k y_2 ... y_U k (states s = 0..2U).

Besides the loss (:func:`slack_ctc_reference`, differentiable by autograd), this module implements
the three stages of the backend contract that the fast kernels implement too (``csrc/ops.cpp``):
:func:`emissions_reference` (logsumexp and the band emission table), :func:`lattice_band_reference`
(alpha/beta, the loss and the posteriors, by the forward-backward algorithm) and
:func:`gradient_reference` (``g * (softmax - posterior)``), and the two-pass path's stages
(:func:`emissions_grad_reference`: the softmax written in the vocabulary pass; :func:`gradient_finish_reference`:
its backward; the windowed ones of the fused LM head). The tests' oracle for every path is
:func:`slack_ctc_reference` under autograd, which shares none of the stages.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
PRESERVE, STANDARD = 0, 1
COLLAPSE_MODES = {"preserve": PRESERVE, "standard": STANDARD}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 input, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _LogSumExp(torch.autograd.Function):
    """logsumexp whose gradient is 0, not NaN, where every term is -inf.

    ``torch.logsumexp`` backpropagates ``exp(x - out)``, which is ``exp(-inf + inf) = NaN`` for an
    unreachable lattice state; an unreachable state contributes nothing, so its gradient is 0.
    """

    @staticmethod
    def forward(ctx, x, dim):
        out = torch.logsumexp(x, dim)
        ctx.save_for_backward(x, out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        out = out.unsqueeze(ctx.dim)
        weight = torch.exp(x - out.masked_fill(out == NEG_INF, 0.0))
        weight = weight.masked_fill(out == NEG_INF, 0.0)
        return grad.unsqueeze(ctx.dim) * weight, None


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _LogSumExp.apply(x, dim)


def logaddexp(*terms: torch.Tensor) -> torch.Tensor:
    return logsumexp(torch.stack(terms), 0)


def shift_right(x: torch.Tensor, by: int) -> torch.Tensor:
    """x[..., s - by] at position s, -inf where s < by."""
    pad = x.new_full(x.shape[:-1] + (by,), NEG_INF)
    return torch.cat([pad, x], dim=-1)[..., : x.shape[-1]]


def log_emissions(logits, targets, special_id, observed=None, normalize=True):
    """The emission table ``[B, T, 1 + U]``: log p_t(k) in column 0, log p_t(y_u) in column u.

    ``logits`` is ``[B, T, V]``; the log-softmax is taken in the accumulation dtype. With
    ``normalize=False`` the input is used as log-probabilities as it is (``ctc_loss``). At an
    observed frame (``observed[b, t] >= 0``) a column is 0 if its token is the observed one and -inf
    otherwise: the frame is forced and its logits are not used.
    """
    B, T, V = logits.shape
    x = logits.to(acc_dtype(logits.dtype))
    if normalize:
        lse = torch.logsumexp(x.detach(), -1, keepdim=True)
        dead = lse == NEG_INF  # a frame whose logits are all -inf emits nothing
        x = x.masked_fill(dead, 0.0)
        logp = (x - torch.logsumexp(x, -1, keepdim=True)).masked_fill(dead, NEG_INF)
    else:
        logp = x
    columns = torch.cat([targets.new_full((B, 1), special_id), targets.clamp(0, V - 1)], dim=1).long()
    em = logp.gather(2, columns[:, None, :].expand(B, T, columns.shape[1]))
    if observed is not None:
        seen = observed[:, :, None].long()
        forced = torch.where(seen == columns[:, None, :], 0.0, NEG_INF).to(em.dtype)
        em = torch.where(seen >= 0, forced, em)
    return em


def _lengths(lengths, batch, default, device):
    if lengths is None:
        return torch.full((batch,), default, dtype=torch.long, device=device)
    return torch.as_tensor(lengths, device=device).long().clamp(0, default)


def _preserve_valid(U1, t, target_lengths, max_shift):
    """States u that a preserve path may occupy after frame t: u <= U, and u >= t - m unless u = U."""
    u = torch.arange(U1, device=target_lengths.device)
    valid = u[None, :] <= target_lengths[:, None]
    if max_shift is not None:
        valid = valid & ((u[None, :] >= t - max_shift) | (u[None, :] == target_lengths[:, None]))
    return valid


def preserve_lattice(em, input_lengths, target_lengths, max_shift=None, keep_alphas=False):
    """log p(y) under the surface-preserving collapse; -inf for an infeasible row. ``em``: [B, T, 1+U].

    With ``keep_alphas`` also returns alpha_t for t = 0..T as ``[B, T+1, 1+U]`` (frozen past T_b).
    """
    B, T, U1 = em.shape
    u = torch.arange(U1, device=em.device)
    alpha = em.new_full((B, U1), NEG_INF)
    alpha[:, 0] = 0.0
    alphas = [alpha]
    for t in range(1, T + 1):
        e = em[:, t - 1]
        stay = alpha + e[:, :1]
        advance = shift_right(alpha, 1) + e.masked_fill(u == 0, 0.0)  # column 0 is k, never an advance
        new = logaddexp(stay, advance).masked_fill(~_preserve_valid(U1, t, target_lengths, max_shift), NEG_INF)
        alpha = torch.where((t <= input_lengths)[:, None], new, alpha)  # frozen once t > T_b
        alphas.append(alpha)
    loglik = alpha.gather(1, target_lengths[:, None]).squeeze(1)
    return (loglik, torch.stack(alphas, 1)) if keep_alphas else loglik


def preserve_betas(em, input_lengths, target_lengths, max_shift=None):
    """beta_t(u) = log p(frames t+1..T_b complete the target | u emitted after frame t), ``[B, T+1, 1+U]``."""
    B, T, U1 = em.shape
    u = torch.arange(U1, device=em.device)
    final = torch.where(u[None, :] == target_lengths[:, None], 0.0, NEG_INF).to(em.dtype)
    beta = torch.where((input_lengths == T)[:, None], final, torch.full_like(final, NEG_INF))
    betas = [beta]
    for t in range(T, 0, -1):  # beta_{t-1} from beta_t
        e = em[:, t - 1]
        stay = beta + e[:, :1]
        advance = torch.cat([beta[:, 1:] + e[:, 1:], beta.new_full((B, 1), NEG_INF)], 1)
        new = logaddexp(stay, advance).masked_fill(~_preserve_valid(U1, t - 1, target_lengths, max_shift), NEG_INF)
        start = torch.where((input_lengths == t - 1)[:, None], final, torch.full_like(final, NEG_INF))
        beta = torch.where((t <= input_lengths)[:, None], new, start)
        betas.append(beta)
    return torch.stack(betas[::-1], 1)


def _standard_states(targets, U, B):
    """Table column of each extended-label state, and where the skip s-2 -> s is allowed."""
    S = 2 * U + 1
    s = torch.arange(S, device=targets.device)
    column = torch.where(s % 2 == 1, (s + 1) // 2, 0)  # extended label l'_s as a table column
    labels = targets[:, :U].long()
    label_of_state = torch.cat([labels.new_full((B, 1), -1), labels], 1).gather(1, column.expand(B, S))
    prev_label = torch.cat([labels.new_full((B, 2), -1), label_of_state], 1)[:, :S]
    skip = (s % 2 == 1) & (s >= 3) & (label_of_state != prev_label)
    return column, skip


def standard_lattice(em, targets, input_lengths, target_lengths, keep_alphas=False):
    """log p(y) under classic CTC (merge repeats, delete the blank); -inf for an infeasible row."""
    B, T, U1 = em.shape
    S = 2 * U1 - 1
    column, skip = _standard_states(targets, U1 - 1, B)
    valid = torch.arange(S, device=em.device)[None, :] <= 2 * target_lengths[:, None]
    alpha = em.new_full((B, S), NEG_INF)
    alpha[:, 0] = 0.0  # virtual frame 0: alpha_1 is then the usual CTC initialisation
    alphas = [alpha]
    for t in range(1, T + 1):
        e = em[:, t - 1].gather(1, column.expand(B, S))
        from_skip = shift_right(alpha, 2).masked_fill(~skip, NEG_INF)
        new = (logaddexp(alpha, shift_right(alpha, 1), from_skip) + e).masked_fill(~valid, NEG_INF)
        alpha = torch.where((t <= input_lengths)[:, None], new, alpha)
        alphas.append(alpha)
    end_blank = alpha.gather(1, (2 * target_lengths)[:, None]).squeeze(1)
    end_label = alpha.gather(1, (2 * target_lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    end_label = end_label.masked_fill(target_lengths == 0, NEG_INF)
    loglik = logaddexp(end_blank, end_label)
    return (loglik, torch.stack(alphas, 1)) if keep_alphas else loglik


def standard_betas(em, targets, input_lengths, target_lengths):
    """beta_t(s) for classic CTC (emission at frame t excluded), ``[B, T+1, 2U+1]``."""
    B, T, U1 = em.shape
    S = 2 * U1 - 1
    column, skip = _standard_states(targets, U1 - 1, B)
    s = torch.arange(S, device=em.device)
    valid = s[None, :] <= 2 * target_lengths[:, None]
    is_final = (s[None, :] == 2 * target_lengths[:, None]) | (
        (s[None, :] == 2 * target_lengths[:, None] - 1) & (target_lengths[:, None] > 0))
    final = torch.where(is_final, 0.0, NEG_INF).to(em.dtype)
    beta = torch.where((input_lengths == T)[:, None], final, torch.full_like(final, NEG_INF))
    betas = [beta]
    skip_next = torch.cat([skip[:, 2:], skip.new_zeros(B, 2)], 1)[:, :S]  # is s -> s+2 allowed
    for t in range(T, 0, -1):
        emitted = beta + em[:, t - 1].gather(1, column.expand(B, S))
        from_skip = torch.cat([emitted[:, 2:], emitted.new_full((B, 2), NEG_INF)], 1)[:, :S].masked_fill(
            ~skip_next, NEG_INF)
        from_next = torch.cat([emitted[:, 1:], emitted.new_full((B, 1), NEG_INF)], 1)[:, :S]
        new = logaddexp(emitted, from_next, from_skip).masked_fill(~valid, NEG_INF)
        start = torch.where((input_lengths == t - 1)[:, None], final, torch.full_like(final, NEG_INF))
        beta = torch.where((t <= input_lengths)[:, None], new, start)
        betas.append(beta)
    return torch.stack(betas[::-1], 1)


def posteriors_reference(em, targets, input_lengths, target_lengths, mode, max_shift=None):
    """``(loglik [B], posterior [B, T, 1+U])``: the probability that frame t emits each table column.

    This is d loglik / d em, computed by the forward-backward algorithm; rows that are infeasible or
    frames past the input length get 0.
    """
    B, T, U1 = em.shape
    if mode == PRESERVE:
        loglik, alphas = preserve_lattice(em, input_lengths, target_lengths, max_shift, keep_alphas=True)
        betas = preserve_betas(em, input_lengths, target_lengths, max_shift)
        before, after = alphas[:, :-1], betas[:, 1:]  # alpha_{t-1}, beta_t for frames t = 1..T
        stay = before + em[:, :, :1] + after
        advance = shift_right(before, 1) + em.masked_fill(torch.arange(U1, device=em.device) == 0, 0.0) + after
        log_post = torch.cat([torch.logsumexp(stay, 2, keepdim=True), advance[:, :, 1:]], 2)
    else:
        loglik, alphas = standard_lattice(em, targets, input_lengths, target_lengths, keep_alphas=True)
        betas = standard_betas(em, targets, input_lengths, target_lengths)
        occupancy = alphas[:, 1:] + betas[:, 1:]  # state s at frame t, t = 1..T
        log_post = torch.cat([torch.logsumexp(occupancy[:, :, 0::2], 2, keepdim=True), occupancy[:, :, 1::2]], 2)
    feasible = loglik > NEG_INF
    frames = torch.arange(T, device=em.device)
    keep = feasible[:, None, None] & (frames[None, :] < input_lengths[:, None])[:, :, None]
    posterior = torch.exp(log_post - loglik.masked_fill(~feasible, 0.0)[:, None, None]).masked_fill(~keep, 0.0)
    return loglik, posterior


def slack_ctc_reference(logits, targets, target_lengths=None, *, slack_id, input_lengths=None,
                        collapse="preserve", max_shift=None, observed=None, normalize=True):
    """Per-row negative log-likelihood ``[B]`` (``+inf`` for an infeasible row), differentiable.

    Same arguments and meaning as :func:`mdlm_ctc.slack_ctc_loss` with ``reduction="none"``; no
    argument checking. ``normalize=False`` treats ``logits`` as log-probabilities.
    """
    B, T, _ = logits.shape
    T_b = _lengths(input_lengths, B, T, logits.device)
    U_b = _lengths(target_lengths, B, targets.shape[1], logits.device)
    em = log_emissions(logits, targets, slack_id, observed, normalize)
    if COLLAPSE_MODES[collapse] == PRESERVE:
        loglik = preserve_lattice(em, T_b, U_b, max_shift)
    else:
        loglik = standard_lattice(em, targets, T_b, U_b)
    return -loglik


# ---------------------------------------------------------------------------------------------
# bands (mirrors csrc/lattice.h)
# ---------------------------------------------------------------------------------------------

def column_lo(t, T_b, U_b, max_shift=None):
    """First target column u that can be emitted at frame t (1-based); tensors broadcast."""
    lo = torch.clamp(U_b - T_b + t, min=1)
    if max_shift is not None:
        lo = torch.maximum(lo, t - max_shift)
    return lo


def column_band_width(T_b, U_b, max_shift=None):
    """Width of the posterior table a row needs: min(U, T - U + 1, m + 1), 0 if infeasible or empty."""
    width = torch.minimum(U_b, T_b - U_b + 1)
    if max_shift is not None:
        width = width.clamp(max=max_shift + 1)
    return torch.where((U_b > T_b) | (U_b <= 0), torch.zeros_like(width), width)


# ---------------------------------------------------------------------------------------------
# the backend contract
# ---------------------------------------------------------------------------------------------

def _band_columns(T, T_b, U_b, shift, W, device):
    """For every frame and band slot j: the target column u it holds, and whether it is in the band."""
    frames = torch.arange(T, device=device)
    lo = column_lo(frames[None, :] + 1, T_b[:, None], U_b[:, None], shift)  # [B, T]
    u = lo[:, :, None] + torch.arange(W, device=device)  # [B, T, W]
    hi = torch.minimum(frames[None, :] + 1, U_b[:, None])[:, :, None]
    active = (frames[None, :] < T_b[:, None])[:, :, None]
    return u, (u >= 1) & (u <= hi) & active


def emissions_reference(logits, targets, input_lengths, target_lengths, observed, special_id, max_shift, band_width,
                        normalize):
    """Stage 1 of the backend contract (``csrc/ops.cpp``): ``(lse, table, special)``."""
    B, T, V = logits.shape
    acc = acc_dtype(logits.dtype)
    U = targets.shape[1]
    T_b = input_lengths.long().clamp(0, T)
    U_b = target_lengths.long().clamp(0, U)
    shift = None if max_shift < 0 else max_shift
    active = torch.arange(T, device=logits.device)[None, :] < T_b[:, None]
    em = log_emissions(logits.detach(), targets, special_id, observed, normalize)
    if normalize:
        lse = torch.logsumexp(logits.detach().to(acc), -1).masked_fill(~active, 0.0)
    else:
        lse = torch.zeros(B, T, dtype=acc, device=logits.device)
    u, in_band = _band_columns(T, T_b, U_b, shift, band_width, logits.device)
    table = em.gather(2, u.clamp(0, U)).masked_fill(~in_band, 0.0)
    special = em[:, :, 0].masked_fill(~active, 0.0)
    frame_nan = lse.isnan() | table.isnan().any(-1)
    special = special.masked_fill(frame_nan & active, float("nan"))
    return lse, table, special


def lattice_band_reference(table, special, targets, input_lengths, target_lengths, mode, max_shift, need_grad):
    """Stage 2 of the backend contract: ``nll [B]``; with ``need_grad`` the posteriors overwrite
    ``table`` and ``special`` in place."""
    B, T, W = table.shape
    U = targets.shape[1]
    T_b = input_lengths.long().clamp(0, T)
    U_b = target_lengths.long().clamp(0, U)
    shift = max_shift if (mode == PRESERVE and max_shift >= 0) else None
    u, in_band = _band_columns(T, T_b, U_b, shift, W, table.device)
    # the full emission table: band columns where the band has them, -inf (never on a path) elsewhere
    em = table.new_full((B, T, U + 2), NEG_INF)
    em.scatter_(2, torch.where(in_band, u, U + 1), table)
    em = em[:, :, : U + 1]
    em[:, :, 0] = special
    active = torch.arange(T, device=table.device)[None, :] < T_b[:, None]
    nan_row = (special.isnan() & active).any(1)
    loglik, posterior = posteriors_reference(em.masked_fill(nan_row[:, None, None], 0.0), targets, T_b, U_b, mode,
                                             shift)
    nll = (-loglik).masked_fill(nan_row, float("nan"))
    if need_grad:
        post_target = posterior.gather(2, u.clamp(0, U)).masked_fill(~in_band, 0.0)
        table.copy_(post_target.masked_fill(nan_row[:, None, None], float("nan")))
        special.copy_(posterior[:, :, 0].masked_fill(nan_row[:, None], float("nan")))
    return nll


def gradient_reference(grad_nll, logits, lse, targets, input_lengths, target_lengths, observed, post_target,
                       post_special, nll, special_id, max_shift, zero_infinity, normalize):
    """Stage 3 of the backend contract: ``g * (softmax - posterior)`` in the logits' dtype."""
    B, T, V = logits.shape
    acc = acc_dtype(logits.dtype)
    W = post_target.shape[2]
    U = targets.shape[1]
    T_b = input_lengths.long().clamp(0, T)
    U_b = target_lengths.long().clamp(0, U)
    shift = None if max_shift < 0 else max_shift
    active = torch.arange(T, device=logits.device)[None, :] < T_b[:, None]
    if observed is not None:
        active = active & (observed < 0)
    if normalize:
        grad = torch.exp(logits.to(acc) - lse[:, :, None]).masked_fill(lse[:, :, None] == NEG_INF, 0.0)
    else:
        grad = torch.zeros(B, T, V, dtype=acc, device=logits.device)
    grad[:, :, special_id] -= post_special.to(acc)
    u, in_band = _band_columns(T, T_b, U_b, shift, W, logits.device)
    if U > 0 and W > 0:
        tokens = targets.long().clamp(0, V - 1).gather(1, (u - 1).clamp(0, U - 1).flatten(1)).view(B, T, W)
        grad.scatter_add_(2, tokens, -post_target.to(acc).masked_fill(~in_band, 0.0))
    grad = grad * grad_nll.to(acc)[:, None, None]
    infeasible = nll == float("inf")
    grad = torch.where(infeasible[:, None, None], 0.0 if zero_infinity else float("nan"), grad)
    return grad.masked_fill(~active[:, :, None], 0.0).to(logits.dtype)


def band_links(targets, target_lengths, V):
    """Per row: clamped ids ``tokens`` [B, U], and for every position the previous / next position
    holding the same token (``prev_same``: -1 when none; ``next_same``: U + 1 when none), padding
    excluded. Device ops only (one sort), no sync. A band slot at position p of frame t is its token's
    last in the band (its "writer", which carries the token's summed posterior) iff next_same[p] + 1 >
    column_hi(t + 1): the Triton gradient kernels and the fused LM head's sparse correction use it."""
    B, U = targets.shape
    tokens = targets.to(torch.int64).clamp(0, max(V - 1, 0)).contiguous()
    position = torch.arange(U, device=targets.device)
    key = torch.where(position[None, :] < target_lengths[:, None], tokens, V)  # padding sorts last as token V
    sorted_tokens, sorted_positions = torch.sort(key, dim=1, stable=True)
    next_sorted = torch.full_like(sorted_positions, U + 1)
    prev_sorted = torch.full_like(sorted_positions, -1)
    if U > 1:
        same = sorted_tokens[:, 1:] == sorted_tokens[:, :-1]
        next_sorted[:, :-1] = torch.where(same, sorted_positions[:, 1:], U + 1)
        prev_sorted[:, 1:] = torch.where(same, sorted_positions[:, :-1], -1)
    next_same = torch.empty_like(sorted_positions).scatter_(1, sorted_positions, next_sorted)
    prev_same = torch.empty_like(sorted_positions).scatter_(1, sorted_positions, prev_sorted)
    return tokens, prev_same, next_same


# ---------------------------------------------------------------------------------------------
# the two-pass stages: the gradient written in the vocabulary pass (csrc/ops.cpp, mdlm_ctc/_ops.py)
# ---------------------------------------------------------------------------------------------

def emissions_grad_reference(logits, targets, input_lengths, target_lengths, observed, special_id, max_shift,
                             band_width, row_scale, grad):
    """Stage 1 of the two-pass path: :func:`emissions_reference`'s ``(lse, table, special)``, and the
    softmax written into ``grad`` ``[B, T, V]`` (which may be ``logits`` itself) scaled by the row's
    weight, ``round(row_scale[b] * softmax)`` (0 past the input length and at observed frames). Also returns
    the unrounded softmax at the band's columns and at the special token (``soft_target [B, T, W]``,
    ``soft_special [B, T]``), which the backward needs where the posteriors are subtracted."""
    B, T, V = logits.shape
    lse, table, special = emissions_reference(logits, targets, input_lengths, target_lengths, observed, special_id,
                                              max_shift, band_width, True)
    soft, soft_target, soft_special = _band_softmax(logits.reshape(B * T, V), lse.reshape(B * T), 0, T, targets,
                                                    input_lengths, target_lengths, observed, special_id, max_shift,
                                                    band_width)
    dense = _scaled_softmax(soft, row_scale, 0, T, input_lengths, observed)
    grad.copy_(dense.view(B, T, V).to(grad.dtype))
    return lse, table, special, soft_target.view(B, T, band_width), soft_special.view(B, T)


def gradient_finish_reference(grad_rows, row_scale, nll, targets, input_lengths, target_lengths, observed,
                              soft_target, soft_special, post_target, post_special, special_id, max_shift,
                              zero_infinity, grad):
    """Stage 3 of the two-pass path, in place on ``grad`` (``round(w * softmax)`` from
    :func:`emissions_grad_reference`), with ``g = grad_rows[b]`` the upstream gradient of row b's loss and
    ``w = row_scale[b]``: every element is scaled by g (a no-op where g is 1), the band's tokens and the
    special token get ``(g * w) * (softmax - posterior)``, an infeasible row 0 (``zero_infinity``) or NaN,
    and frames past the input length and observed frames 0."""
    B, T, V = grad.shape
    acc = acc_dtype(grad.dtype)
    n = B * T
    g = grad_rows.to(acc).reshape(B)
    _, live, free, infeasible = _frame_state(0, n, T, input_lengths, observed, nll)
    W = post_target.shape[-1]
    exact, touched = _exact_band_values(g * row_scale.to(acc), 0, T, targets, input_lengths, target_lengths,
                                        observed, nll, soft_target.reshape(n, W), soft_special.reshape(n),
                                        post_target.reshape(n, W), post_special.reshape(n), special_id, max_shift, V)
    out = grad.reshape(n, V).to(acc) * g[torch.arange(n, device=grad.device) // T][:, None]
    out = torch.where(touched, exact, out)
    out = torch.where((infeasible & free)[:, None], 0.0 if zero_infinity else float("nan"), out)
    grad.copy_(out.masked_fill(~free[:, None], 0.0).view(B, T, V).to(grad.dtype))


def _frame_state(frame_offset, n, T, input_lengths, observed, nll):
    """Per flat frame ``frame_offset <= i < frame_offset + n``: (row, live, free, infeasible): free = active
    and not observed, live = free on a row that is not infeasible."""
    i = torch.arange(frame_offset, frame_offset + n, device=input_lengths.device)
    row = i // T
    free = (i % T) < input_lengths.long().clamp(0, T)[row]
    if observed is not None:
        free = free & (observed.reshape(-1)[frame_offset:frame_offset + n] < 0)
    infeasible = (nll == float("inf"))[row] if nll is not None else torch.zeros_like(free)
    return row, free & ~infeasible, free, infeasible


def _band_softmax(logits, lse, frame_offset, T, targets, input_lengths, target_lengths, observed, special_id,
                  max_shift, W):
    """softmax of window frames ``[n, V]`` in the accumulation dtype (as :func:`gradient_reference` computes
    it), and its values at the band's columns ``[n, W]`` and at the special token ``[n]`` (0 where the frame
    is not free, or the column outside the band)."""
    n, V = logits.shape
    acc = acc_dtype(logits.dtype)
    lse = lse.to(acc)
    soft = torch.exp(logits.detach().to(acc) - lse[:, None]).masked_fill((lse == NEG_INF)[:, None], 0.0)
    row, _, u, in_band = _window_columns(frame_offset, n, T, targets, input_lengths, target_lengths, max_shift, W,
                                         logits.device)
    _, _, free, _ = _frame_state(frame_offset, n, T, input_lengths, observed, None)
    at = soft.gather(1, _window_tokens(targets, row, u, special_id, V))
    return soft, at[:, 1:].masked_fill(~(in_band & free[:, None]), 0.0), at[:, 0].masked_fill(~free, 0.0)


def _scaled_softmax(soft, row_scale, frame_offset, T, input_lengths, observed):
    """``row_scale[b] * softmax`` per window frame, 0 where the frame is not free (acc dtype)."""
    row, _, free, _ = _frame_state(frame_offset, soft.shape[0], T, input_lengths, observed, None)
    return (row_scale.to(soft.dtype)[row][:, None] * soft).masked_fill(~free[:, None], 0.0)


def _exact_band_values(gw, frame_offset, T, targets, input_lengths, target_lengths, observed, nll, soft_target,
                       soft_special, post_target, post_special, special_id, max_shift, V):
    """``(values [n, V], touched [n, V])``: at every token of a live frame's band and at its special token,
    ``gw[b] * (softmax - posterior)`` with the posteriors of a repeated token summed, and where those are."""
    n, W = soft_target.shape
    row, live, _, _ = _frame_state(frame_offset, n, T, input_lengths, observed, nll)
    _, _, u, in_band = _window_columns(frame_offset, n, T, targets, input_lengths, target_lengths, max_shift, W,
                                       soft_target.device)
    tokens = _window_tokens(targets, row, u, special_id, V)
    valid = torch.cat([live[:, None], in_band & live[:, None]], 1)
    index = torch.where(valid, tokens, V)  # column V collects what is not in a live band and is dropped
    soft = torch.cat([soft_special[:, None], soft_target], 1)
    post = torch.cat([post_special[:, None], post_target], 1).to(soft.dtype)
    softmax = soft.new_zeros(n, V + 1).scatter_(1, index, soft)  # repeats carry one value: any order
    posterior = soft.new_zeros(n, V + 1).scatter_add_(1, index, post)
    touched = torch.zeros(n, V + 1, dtype=torch.bool, device=soft.device).scatter_(1, index, True)
    values = gw.to(soft.dtype)[row][:, None] * (softmax - posterior)
    return values[:, :V], touched[:, :V]


# ---------------------------------------------------------------------------------------------
# the windowed stages: a window of flat frames i = b*T + t (and of the vocabulary for the gradient)
# ---------------------------------------------------------------------------------------------

def _window_columns(frame_offset, n, T, targets, input_lengths, target_lengths, max_shift, W, device):
    """For the frames ``frame_offset <= i < frame_offset + n``: their row, activity, band columns and
    which of those are in the band (as ``_band_columns``, one frame per line)."""
    i = torch.arange(frame_offset, frame_offset + n, device=device)
    row, t = i // T, i % T
    T_b = input_lengths.long().clamp(0, T)[row]
    U_b = target_lengths.long().clamp(0, targets.shape[1])[row]
    shift = None if max_shift < 0 else max_shift
    u = column_lo(t + 1, T_b, U_b, shift)[:, None] + torch.arange(W, device=device)
    active = t < T_b
    in_band = (u >= 1) & (u <= torch.minimum(t + 1, U_b)[:, None]) & active[:, None]
    return row, active, u, in_band


def _window_tokens(targets, row, u, special_id, V):
    """``[n, 1 + W]`` token ids: the special token, then the target token of each band column."""
    U = targets.shape[1]
    band = targets.long()[row[:, None], (u - 1).clamp(0, max(U - 1, 0))] if U > 0 else torch.zeros_like(u)
    special = torch.full_like(row, special_id)[:, None]
    return torch.cat([special, band], 1).clamp(0, V - 1)


def emissions_window_reference(logits, frame_offset, frames_per_row, targets, input_lengths, target_lengths,
                               observed, special_id, max_shift, band_width, normalize):
    """Stage 1 over a window of frames (``csrc/ops.cpp``): ``(lse [n], table [n, W], special [n])``
    from the window's logits ``[n, V]``."""
    n, V = logits.shape
    acc = acc_dtype(logits.dtype)
    row, active, u, in_band = _window_columns(frame_offset, n, frames_per_row, targets, input_lengths,
                                              target_lengths, max_shift, band_width, logits.device)
    x = logits.detach().to(acc)
    lse = torch.logsumexp(x, 1) if normalize else torch.zeros(n, dtype=acc, device=logits.device)
    tokens = _window_tokens(targets, row, u, special_id, V)
    em = x.gather(1, tokens)
    if normalize:
        em = torch.where((lse == NEG_INF)[:, None], NEG_INF, em - lse[:, None])
    if observed is not None:
        seen = observed.reshape(-1)[frame_offset:frame_offset + n].long()[:, None]
        em = torch.where(seen >= 0, torch.where(seen == tokens, 0.0, NEG_INF).to(acc), em)
    table = em[:, 1:].masked_fill(~in_band, 0.0)
    frame_nan = (lse.isnan() | table.isnan().any(1)) & active
    special = em[:, 0].masked_fill(~active, 0.0).masked_fill(frame_nan, float("nan"))
    return lse.masked_fill(~active, 0.0), table, special


def gradient_window_reference(grad_nll, logits, frame_offset, frames_per_row, vocab_offset, vocab_size, lse, targets,
                              input_lengths, target_lengths, observed, post_target, post_special, nll, special_id,
                              max_shift, zero_infinity, normalize, out):
    """Stage 3 over a window of frames and the vocabulary window ``[vocab_offset, vocab_offset + v)``:
    writes ``g * (softmax - posterior)`` of that window into ``out`` ``[n, v]`` (may be ``logits``)."""
    n, v = logits.shape
    acc = acc_dtype(logits.dtype)
    W = post_target.shape[1]
    row, active, u, in_band = _window_columns(frame_offset, n, frames_per_row, targets, input_lengths,
                                              target_lengths, max_shift, W, logits.device)
    lse = lse.to(acc)
    if normalize:
        grad = torch.exp(logits.detach().to(acc) - lse[:, None]).masked_fill((lse == NEG_INF)[:, None], 0.0)
    else:
        grad = torch.zeros(n, v, dtype=acc, device=logits.device)
    local = _window_tokens(targets, row, u, special_id, vocab_size) - vocab_offset
    inside = (local >= 0) & (local < v) & torch.cat([torch.ones_like(in_band[:, :1]), in_band], 1)
    posteriors = torch.cat([post_special.reshape(n, 1), post_target], 1).to(acc)
    grad.scatter_add_(1, local.clamp(0, v - 1), -posteriors.masked_fill(~inside, 0.0))
    grad = grad * grad_nll.to(acc)[row][:, None]
    infeasible = (nll == float("inf"))[row]
    grad = torch.where(infeasible[:, None], 0.0 if zero_infinity else float("nan"), grad)
    if observed is not None:
        active = active & (observed.reshape(-1)[frame_offset:frame_offset + n] < 0)
    out.copy_(grad.masked_fill(~active[:, None], 0.0).to(out.dtype))


def emissions_grad_window_reference(logits, frame_offset, frames_per_row, targets, input_lengths, target_lengths,
                                    observed, special_id, max_shift, band_width, row_scale, grad):
    """:func:`emissions_grad_reference` over a window of frames (the fused LM head's chunks): the outputs of
    :func:`emissions_window_reference` and ``soft_target [n, W]``, ``soft_special [n]``; writes the window's
    ``round(row_scale * softmax)`` into ``grad`` ``[n, V]`` (may be ``logits``)."""
    n, V = logits.shape
    T = frames_per_row
    lse, table, special = emissions_window_reference(logits, frame_offset, T, targets, input_lengths,
                                                     target_lengths, observed, special_id, max_shift, band_width,
                                                     True)
    soft, soft_target, soft_special = _band_softmax(logits, lse, frame_offset, T, targets, input_lengths,
                                                    target_lengths, observed, special_id, max_shift, band_width)
    grad.copy_(_scaled_softmax(soft, row_scale, frame_offset, T, input_lengths, observed).to(grad.dtype))
    return lse, table, special, soft_target, soft_special


def band_values_window_reference(grad_rows, row_scale, nll, frame_offset, frames_per_row, vocab_size, targets,
                                 input_lengths, target_lengths, observed, soft_target, soft_special, post_target,
                                 post_special, special_id, max_shift):
    """The exact gradient at the band's tokens of a window of frames (what the fused LM head subtracts
    sparsely): ``(values [n, W], special [n])`` in the accumulation dtype, ``(g * w) * (softmax - posterior)``
    of each slot's token (repeats summed; every slot holding a token carries its total), and of the special
    token. Frames that are not live (past the input length, observed, on an infeasible row) are unspecified."""
    n, W = soft_target.shape
    gw = grad_rows.to(soft_target.dtype).reshape(-1) * row_scale.to(soft_target.dtype)
    values, _ = _exact_band_values(gw, frame_offset, frames_per_row, targets, input_lengths, target_lengths, observed,
                                   nll, soft_target, soft_special, post_target, post_special, special_id, max_shift,
                                   vocab_size)
    row, _, u, _ = _window_columns(frame_offset, n, frames_per_row, targets, input_lengths, target_lengths, max_shift,
                                   W, soft_target.device)
    at = values.gather(1, _window_tokens(targets, row, u, special_id, vocab_size))
    return at[:, 1:], at[:, 0]


def viterbi_reference(logits, targets, input_lengths, target_lengths, observed, special_id, mode, max_shift,
                      normalize=True):
    """The most probable admissible canvas per row ``[B, T]`` (token ids), -1 past the input length and
    on infeasible rows. Ties prefer the earliest placement of target tokens."""
    B, T, V = logits.shape
    T_b = input_lengths.long().clamp(0, T)
    U_b = target_lengths.long().clamp(0, targets.shape[1])
    em = log_emissions(logits.detach(), targets, special_id, observed, normalize)
    U = em.shape[2] - 1
    device = logits.device
    if mode == PRESERVE:
        S = U + 1
        state_column = torch.arange(S, device=device)
        u = state_column
    else:
        S = 2 * U + 1
        s = torch.arange(S, device=device)
        state_column = torch.where(s % 2 == 1, (s + 1) // 2, 0)
        labels = targets[:, :U].long()
        label_of_state = torch.cat([labels.new_full((B, 1), -1), labels], 1).gather(1, state_column.expand(B, S))
        prev_label = torch.cat([labels.new_full((B, 2), -1), label_of_state], 1)[:, :S]
        skip = (s % 2 == 1) & (s >= 3) & (label_of_state != prev_label)
    score = em.new_full((B, S), NEG_INF)
    score[:, 0] = 0.0
    step_back = torch.zeros(B, T, S, dtype=torch.uint8, device=device)  # how many states the best move advanced
    emitted_special = torch.zeros(B, T, S, dtype=torch.bool, device=device)
    for t in range(1, T + 1):
        e = em[:, t - 1]
        if mode == PRESERVE:
            stay = score + e[:, :1]
            advance = shift_right(score, 1) + e.masked_fill(u == 0, 0.0)
            best, arg = torch.stack([stay, advance]).max(0)  # first maximum: prefer stay
            valid = u <= U_b[:, None]
            if max_shift is not None and max_shift >= 0:
                valid = valid & ((u >= t - max_shift) | (u == U_b[:, None]))
            new = best.masked_fill(~valid, NEG_INF)
            emitted_special[:, t - 1] = arg == 0
        else:
            e_state = e.gather(1, state_column.expand(B, S))
            from_skip = shift_right(score, 2).masked_fill(~skip, NEG_INF)
            best, arg = torch.stack([score, shift_right(score, 1), from_skip]).max(0)
            new = (best + e_state).masked_fill(~(torch.arange(S, device=device) <= 2 * U_b[:, None]), NEG_INF)
            emitted_special[:, t - 1] = (torch.arange(S, device=device) % 2 == 0).expand(B, S)
        step_back[:, t - 1] = arg.to(torch.uint8)
        score = torch.where((t <= T_b)[:, None], new, score)
    if mode == PRESERVE:
        final = U_b.clone()
        final_score = score.gather(1, final[:, None]).squeeze(1)
    else:
        end_blank = score.gather(1, (2 * U_b)[:, None]).squeeze(1)
        end_label = score.gather(1, (2 * U_b - 1).clamp(min=0)[:, None]).squeeze(1).masked_fill(U_b == 0, NEG_INF)
        final = torch.where(end_label > end_blank, 2 * U_b - 1, 2 * U_b)  # ties: end on a blank
        final_score = torch.maximum(end_blank, end_label)
    feasible = final_score > NEG_INF
    canvas = torch.full((B, T), -1, dtype=torch.long, device=device)
    state = final
    rows = torch.arange(B, device=device)
    padded_targets = torch.cat([targets.new_full((B, 1), special_id), targets.long().clamp(0, V - 1)], 1)[:, : U + 1]
    for t in range(T, 0, -1):
        live = (t <= T_b) & feasible
        special = emitted_special[rows, t - 1, state]
        token = torch.where(special, torch.full_like(state, special_id),
                            padded_targets.gather(1, state_column[state][:, None]).squeeze(1).long())
        canvas[:, t - 1] = torch.where(live, token, canvas[:, t - 1])
        back = step_back[rows, t - 1, state].long()
        state = torch.where(live, state - back, state)
    return canvas
