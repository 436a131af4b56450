"""Training objectives: LLaDA's masked cross-entropy (``ce``), slack-CTC (``ctc``) and their mix.

Layout of a row (LLaDA SFT): ``[prompt | canvas]`` with ``L`` positions in total; the canvas of row
``b`` is the ``T_b = L - P_b`` positions after its prompt. ``L`` is ``max_length`` (or the longest
row of the *global* batch plus ``canvas_extra``), so the layout never depends on how a batch is split.

**Forward process (both objectives).** One ``t ~ U(0, 1)`` per row, ``p = (1 - eps) t + eps``; each
canvas position is masked independently with probability ``p``; the prompt is never masked. The noise
of a row comes from its own seeded generator (see ``data.noise_seed``), so the CE and CTC runs of a
comparison draw the *same* ``t`` and the same masked positions for the same row.

**ce** (exactly LLaDA's SFT, GUIDELINES §SFT / paper.md §2.3): the clean canvas is the answer, one
EOS and EOS padding to ``T_b`` (the padding is part of the answer and trained). Loss of row ``b`` =
sum over masked canvas positions of ``CE / p_b``.

**ctc** (slack-CTC, arXiv 2601.22947 as reconstructed in paper.md). The *target* depends on
``ctc_canvas``:

* ``eos`` (default): LLaDA's canvas less ``m_b`` EOS, i.e. the answer and its EOS padding cut to
  ``U_b = T_b - m_b`` tokens, with the slack budget ``m_b`` of :func:`slack_budgets`. Every admissible
  canvas then holds exactly ``m_b`` slack tokens (between answer tokens or among the EOS tail), the
  canvas stays LLaDA's, and the EOS cannot drift: ``m_b = 0`` (``slack_budget 0`` or ``ctc_max_shift
  0``) is CE exactly, loss and gradients;
* ``slack``: the answer followed by one EOS (``U_b = A_b + 1``), the rest of the canvas slack (the
  earlier design: the EOS may sit anywhere after the answer).

The *clean canvas* is the target with ``<slack>`` inserted, padded with ``<slack>`` to ``T_b``; where
slack goes is ``slack_insertion``:

* ``random``: before each target token a geometric number of slack tokens,
  ``P(k) = (1 - r) r^k`` with ``r = slack_rate``, truncated so the canvas fits (Imputer-style
  alignment noise, paper.md §1.5 reading (b));
* ``best``: the model's own Viterbi alignment (``mdlm_ctc.best_alignment``) computed without gradient
  on the fully masked canvas (hard-EM; costs one extra forward pass per step);
* ``probe``: with probability ``slack_rate`` per row, one slack token before a uniformly chosen answer
  token, and that position always masked: the canvas the sampler's shift probe produces (a token
  displaced one position right, its old position masked again);
* ``none``: the answer, EOS, then slack (paper.md §1.5 reading (a)).

The canvas is masked as above. Masked positions are *free* (``observed = -1``); every unmasked canvas
position is *observed* with its clean token (slack included), i.e. a hard anchor of the lattice
(SPEC §3.4). Loss of row ``b`` = ``slack_ctc_loss(canvas logits, target, observed=...) / p_b``: the
sum over every canvas that agrees with the visible tokens and collapses (delete slack, keep repeats) to
the target. With nothing masked the row's loss is 0, exactly like CE.

**ce+ctc**: ``(1 - ctc_weight) * CE + ctc_weight * CTC`` from one forward pass on the CTC canvas; the CE
term is position-wise CE on the masked positions against the clean CTC canvas (slack included), i.e.
CE on the one alignment that the canvas fixes, while the CTC term sums over all alignments.

**Normalisation** (``normalization``), identical for both objectives, over the *global* batch:
``sequence`` (LLaDA: each row divided by its canvas length ``T_b`` = answer length including EOS
padding, then averaged over rows), ``token`` (sum divided by the canvas positions of the batch, SMDM)
or ``batch`` (sum divided by the number of rows).

Open questions of paper.md §7 and the choices made here:

1. collapse: delete slack only, never merge repeats (``collapse="preserve"``); EOS is a target token.
2. lattice: unrestricted by default; ``ctc_max_shift`` bands it (SPEC §3.3). Leading, trailing and
   consecutive slack are all allowed.
3. T > U comes from the slack budget (``eos`` canvas: ``m_b`` slots in LLaDA's canvas) or from slack
   padding (``slack`` canvas); slack may also be inserted inside the answer (``random``/``probe``/
   ``best``). The EOS is part of the target so the model learns to stop; the text is cut at the first
   EOS at decoding.
4. visible tokens are anchors (observed); the lattice runs over the whole response canvas, masked and
   visible positions alike (visible ones contribute factor 1 and no gradient).
5. weighting: the same ``1 / p`` per row as CE; normalisation as above, the same for both.
6. mixing: pure CTC by default; ``ce+ctc`` with ``ctc_weight``.
7. slack is a vocabulary token (added with a mean-initialised row when missing, see ``model.py``);
   it never appears in prompts.
8. inference: the LLaDA sampler; slack is an ordinary candidate in confidence ranking, deleted at the
   end (``sample_slack_budget`` and ``eos_fill`` are optional constraints, measured in the ablation).

Which of these settings is the default was measured, not assumed: ``mdlm-ctc ablate`` (``ablation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import mdlm_ctc

from .model import LMHead, lm_head_of

FUSED_VOCAB_THRESHOLD = 32768


# ------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """A (micro-)batch in LLaDA layout; ``input_ids`` is the clean CE sequence."""

    input_ids: torch.Tensor       # [B, L] prompt, answer, EOS padding
    prompt_lengths: torch.Tensor  # [B]
    answer_lengths: torch.Tensor  # [B] (without EOS)
    noise_seeds: list[int]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.prompt_lengths.to(device), self.answer_lengths.to(device),
                     self.noise_seeds)

    @property
    def canvas_lengths(self) -> torch.Tensor:
        return self.input_ids.shape[1] - self.prompt_lengths


def layout_length(rows, data_cfg) -> int:
    """``L`` for a global batch: ``max_length``, or the longest prompt + answer + EOS plus ``canvas_extra``."""
    if data_cfg.pad_to == "max_length":
        return data_cfg.max_length
    return max(len(r.prompt_ids) + len(r.answer_ids) + 1 for r in rows) + data_cfg.canvas_extra


def collate(rows, length: int, eos_id: int, noise_seeds: list[int]) -> Batch:
    ids = torch.full((len(rows), length), eos_id, dtype=torch.long)
    for b, r in enumerate(rows):
        seq = r.prompt_ids + r.answer_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    prompt_lengths = torch.tensor([len(r.prompt_ids) for r in rows], dtype=torch.long)
    answer_lengths = torch.tensor([len(r.answer_ids) for r in rows], dtype=torch.long)
    return Batch(ids, prompt_lengths, answer_lengths, list(noise_seeds))


def denominators(rows, length: int) -> dict:
    """Normalisers of the global batch: its rows and its canvas positions."""
    return {"rows": float(len(rows)), "tokens": float(sum(length - len(r.prompt_ids) for r in rows))}


# ------------------------------------------------------------------------------ forward process
@dataclass
class Noise:
    p: torch.Tensor          # [B] masking probability per row
    masked: torch.Tensor     # [B, L] bool, canvas positions only
    generators: list         # per-row generators, positioned after the mask draws


def draw_noise(batch: Batch, eps: float) -> Noise:
    """LLaDA's forward process with one seeded generator per row."""
    B, L = batch.input_ids.shape
    ps, draws, gens = [], [], []
    for seed in batch.noise_seeds:
        g = torch.Generator().manual_seed(int(seed))
        t = torch.rand((), generator=g, dtype=torch.float64).item()
        ps.append((1.0 - eps) * t + eps)
        draws.append(torch.rand(L, generator=g, dtype=torch.float64))
        gens.append(g)
    p = torch.tensor(ps, dtype=torch.float64)
    u = torch.stack(draws)
    positions = torch.arange(L)[None, :]
    canvas = positions >= batch.prompt_lengths.cpu()[:, None]
    masked = (u < p[:, None]) & canvas
    device = batch.input_ids.device
    return Noise(p=p.to(device=device, dtype=torch.float32), masked=masked.to(device), generators=gens)


# ------------------------------------------------------------------------------ CTC canvas
def slack_budgets(batch: Batch, obj_cfg) -> torch.Tensor:
    """Slack slots ``m_b`` of every row on the ``eos`` canvas ``[B]``.

    ``slack_budget + ceil(slack_budget_ratio * A_b)``, bound by ``ctc_max_shift`` (at most that many
    slack tokens can precede a target token, and on this canvas every slack token precedes an EOS of
    the target or the end) and by the room ``T_b - A_b - 1`` (the answer and one EOS always fit).
    """
    answer = batch.answer_lengths
    budget = obj_cfg.slack_budget + torch.ceil(obj_cfg.slack_budget_ratio * answer.double()).long()
    if obj_cfg.ctc_max_shift is not None:
        budget = budget.clamp(max=obj_cfg.ctc_max_shift)
    return torch.minimum(budget, (batch.canvas_lengths - answer - 1).clamp_min(0))


def ctc_targets(batch: Batch, eos_id: int, obj_cfg=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[B, U_max]`` and their lengths, for the configured CTC canvas.

    ``slack`` canvas: the answer and one EOS (padded with EOS). ``eos`` canvas: the first
    ``T_b - m_b`` positions of LLaDA's canvas (the answer, then EOS padding), so that every admissible
    canvas holds exactly ``m_b`` slack tokens (:func:`slack_budgets`).
    """
    if obj_cfg is not None and obj_cfg.ctc_canvas == "eos":
        lengths = batch.canvas_lengths - slack_budgets(batch, obj_cfg)
        U = int(lengths.max())
        idx = batch.prompt_lengths[:, None] + torch.arange(U, device=batch.input_ids.device)[None, :]
        targets = batch.input_ids.gather(1, idx.clamp(max=batch.input_ids.shape[1] - 1))
        return targets, lengths
    B, L = batch.input_ids.shape
    lengths = batch.answer_lengths + 1
    U = int(lengths.max())
    idx = batch.prompt_lengths[:, None] + torch.arange(U, device=batch.input_ids.device)[None, :]
    targets = batch.input_ids.gather(1, idx.clamp(max=L - 1))
    targets = torch.where(torch.arange(U, device=targets.device)[None, :] < batch.answer_lengths[:, None],
                          targets, torch.full_like(targets, eos_id))
    return targets, lengths


def random_slack_counts(target_length: int, room: int, rate: float, generator) -> torch.Tensor:
    """Slack tokens before each target token: geometric(rate), truncated so their sum fits ``room``."""
    if rate <= 0.0 or room <= 0:
        return torch.zeros(target_length, dtype=torch.long)
    u = torch.rand(target_length, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    k = torch.floor(torch.log(u) / torch.log(torch.tensor(rate, dtype=torch.float64))).long()
    before = torch.cumsum(k, 0) - k
    return torch.minimum(k, (room - before).clamp_min(0))


def probe_slack_counts(target_length: int, answer_length: int, room: int, rate: float, generator) -> torch.Tensor:
    """``probe`` insertion: with probability ``rate`` one slack token before a uniformly chosen answer token."""
    counts = torch.zeros(target_length, dtype=torch.long)
    hit = float(torch.rand((), generator=generator, dtype=torch.float64)) < rate
    k = int(torch.randint(max(answer_length, 1), (), generator=generator))
    if hit and room >= 1 and answer_length >= 1:
        counts[k] = 1
    return counts


def clean_ctc_canvas(batch: Batch, targets: torch.Tensor, target_lengths: torch.Tensor, noise: Noise, *,
                     slack_id: int, insertion: str, rate: float, alignment: torch.Tensor | None = None,
                     return_inserted: bool = False):
    """The clean sequence ``[B, L]``: prompt, then the target with slack inserted, padded with slack.

    With ``return_inserted`` also returns a ``[B, L]`` bool mask of the slack tokens inserted before a
    target token (not the trailing ones).
    """
    B, L = batch.input_ids.shape
    out = batch.input_ids.clone()
    inserted = torch.zeros(B, L, dtype=torch.bool)
    tgt, tlen, plen = targets.cpu(), target_lengths.cpu(), batch.prompt_lengths.cpu()
    alen = batch.answer_lengths.cpu()
    for b in range(B):
        P, U = int(plen[b]), int(tlen[b])
        T = L - P
        canvas = torch.full((T,), slack_id, dtype=torch.long)
        if insertion == "best":
            canvas = alignment[b, :T].cpu()
        else:
            if insertion in ("probe", "probe_visible"):
                counts = probe_slack_counts(U, int(alen[b]), T - U, rate, noise.generators[b])
            else:
                counts = random_slack_counts(U, T - U, rate if insertion == "random" else 0.0, noise.generators[b])
            positions = torch.arange(U) + torch.cumsum(counts, 0)
            canvas[positions] = tgt[b, :U]
            if U:
                inserted[b, P: P + int(positions[-1])] = canvas[: int(positions[-1])] == slack_id
        out[b, P:] = canvas.to(out.device)
    return (out, inserted.to(out.device)) if return_inserted else out


# ------------------------------------------------------------------------------ the loss switch
def resolve_fused_lm_head(setting: str, model) -> LMHead | None:
    """The LM head to fuse into the CTC loss, or ``None`` to compute it from logits.

    ``on``: whenever possible; ``auto``: when the vocabulary is >= 32768 too; ``off``: never. Fusing
    needs ``mdlm_ctc.linear_slack_ctc_loss`` (absent in older builds) and a plainly exposed head.
    """
    if setting == "off" or not hasattr(mdlm_ctc, "linear_slack_ctc_loss"):
        return None
    head = lm_head_of(model)
    if head is None or (setting == "auto" and head.weight.shape[0] < FUSED_VOCAB_THRESHOLD):
        return None
    return head


def slack_ctc_nll(canvas_out: torch.Tensor, head: LMHead | None, targets, target_lengths, input_lengths,
                  observed, *, slack_id: int, max_shift: int | None) -> torch.Tensor:
    """Per-row slack-CTC negative log-likelihood ``[B]``, from logits or (hidden states, LM head)."""
    common = dict(slack_id=slack_id, input_lengths=input_lengths, collapse="preserve", max_shift=max_shift,
                  observed=observed, reduction="none")
    if head is not None:
        return mdlm_ctc.linear_slack_ctc_loss(canvas_out, head.weight, targets, target_lengths, bias=head.bias,
                                              **common)
    return mdlm_ctc.slack_ctc_loss(canvas_out, targets, target_lengths, **common)


# ------------------------------------------------------------------------------ helpers
def _canvas_view(x: torch.Tensor, prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``x[b, P_b : P_b + width]`` for every row (a view when all prompts have one length)."""
    L = x.shape[1]
    P = prompt_lengths
    if bool((P == P[0]).all()):
        return x[:, int(P[0]): int(P[0]) + width]
    idx = (P[:, None] + torch.arange(width, device=x.device)[None, :]).clamp(max=L - 1)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _normalise(row_sums: torch.Tensor, canvas_lengths: torch.Tensor, mode: str, denoms: dict) -> torch.Tensor:
    if mode == "sequence":
        return (row_sums / canvas_lengths.to(row_sums.dtype)).sum() / denoms["rows"]
    if mode == "token":
        return row_sums.sum() / denoms["tokens"]
    return row_sums.sum() / denoms["rows"]


def _masked_ce_row_sums(out, head, clean, masked, p) -> torch.Tensor:
    """Sum over masked positions of CE / p, per row (logits, or hidden states + head)."""
    rows = masked.nonzero(as_tuple=True)[0]
    if head is not None:
        logits = F.linear(out[masked], head.weight, head.bias)
    else:
        logits = out[masked]
    ce = F.cross_entropy(logits.float(), clean[masked], reduction="none")
    return torch.zeros(masked.shape[0], device=ce.device, dtype=ce.dtype).index_add_(0, rows, ce / p[rows])


# ------------------------------------------------------------------------------ the objective
def compute_loss(model, batch: Batch, *, objective: str, special, obj_cfg, denoms: dict,
                 head: LMHead | None = None, align_model=None) -> tuple[torch.Tensor, dict]:
    """The (already normalised) loss of one micro-batch, and detached statistics.

    ``model`` is the (possibly DDP-wrapped) :class:`~mdlm_ctc.mdlm.model.DiffusionLM`; it returns
    hidden states when ``head`` is given (fused path), logits otherwise. ``align_model`` is the
    unwrapped model used without gradient for ``slack_insertion="best"``.
    """
    want = "hidden" if head is not None else "logits"
    noise = draw_noise(batch, obj_cfg.mask_eps)
    p, masked = noise.p, noise.masked
    canvas_lengths = batch.canvas_lengths
    stats = {"mask_rate": p.mean().detach()}
    mode = obj_cfg.normalization

    if objective == "ce":
        clean = batch.input_ids
        noisy = torch.where(masked, torch.full_like(clean, special.mask_id), clean)
        out = model(noisy, want=want)
        row_sums = _masked_ce_row_sums(out, head, clean, masked, p)
        loss = _normalise(row_sums, canvas_lengths, mode, denoms)
        stats["ce"] = loss.detach()
        return loss, stats

    targets, target_lengths = ctc_targets(batch, special.eos_id, obj_cfg)
    alignment = None
    if obj_cfg.slack_insertion == "best":
        alignment = best_canvas_alignment(align_model or model, batch, targets, target_lengths, special,
                                          obj_cfg.ctc_max_shift, head)
    clean, inserted = clean_ctc_canvas(batch, targets, target_lengths, noise, slack_id=special.slack_id,
                                       insertion=obj_cfg.slack_insertion, rate=obj_cfg.slack_rate,
                                       alignment=alignment, return_inserted=True)
    if obj_cfg.slack_insertion in ("probe", "probe_visible"):
        masked = masked | inserted  # the probe re-masks the position a token was displaced from
    if obj_cfg.slack_insertion == "probe_visible":  # and the displaced token is visible, as in the sampler
        masked = masked & ~F.pad(inserted[:, :-1], (1, 0))
    noisy = torch.where(masked, torch.full_like(clean, special.mask_id), clean)
    out = model(noisy, want=want)
    T = int(canvas_lengths.max())
    canvas_out = _canvas_view(out, batch.prompt_lengths, T)
    canvas_clean = _canvas_view(clean[..., None], batch.prompt_lengths, T)[..., 0]
    canvas_masked = _canvas_view(masked[..., None], batch.prompt_lengths, T)[..., 0]
    inside = torch.arange(T, device=clean.device)[None, :] < canvas_lengths[:, None]
    observed = torch.where(canvas_masked | ~inside, torch.full_like(canvas_clean, -1), canvas_clean)
    nll = slack_ctc_nll(canvas_out, head, targets, target_lengths, canvas_lengths, observed,
                        slack_id=special.slack_id, max_shift=obj_cfg.ctc_max_shift)
    ctc_loss = _normalise(nll.float() / p, canvas_lengths, mode, denoms)
    stats["ctc"] = ctc_loss.detach()
    in_canvas = torch.arange(clean.shape[1], device=clean.device)[None] >= batch.prompt_lengths[:, None]
    stats["slack_fraction"] = ((clean == special.slack_id) & in_canvas).float().sum().detach() / canvas_lengths.sum()
    if objective == "ctc":
        return ctc_loss, stats
    ce_rows = _masked_ce_row_sums(out, head, clean, masked, p)
    ce_loss = _normalise(ce_rows, canvas_lengths, mode, denoms)
    stats["ce"] = ce_loss.detach()
    w = obj_cfg.ctc_weight
    return (1.0 - w) * ce_loss + w * ctc_loss, stats


@torch.no_grad()
def best_canvas_alignment(model, batch: Batch, targets, target_lengths, special, max_shift, head) -> torch.Tensor:
    """Viterbi canvas ``[B, T_max]`` of the model on the fully masked canvas (no gradient)."""
    L = batch.input_ids.shape[1]
    positions = torch.arange(L, device=batch.input_ids.device)[None, :]
    fully_masked = torch.where(positions >= batch.prompt_lengths[:, None],
                               torch.full_like(batch.input_ids, special.mask_id), batch.input_ids)
    want = "hidden" if head is not None else "logits"
    out = model(fully_masked, want=want)
    if head is not None:
        out = F.linear(out, head.weight, head.bias)
    T = int(batch.canvas_lengths.max())
    logits = _canvas_view(out, batch.prompt_lengths, T)
    return mdlm_ctc.best_alignment(logits.float(), targets, target_lengths, slack_id=special.slack_id,
                                   input_lengths=batch.canvas_lengths, max_shift=max_shift)
