"""Training objectives: LLaDA's masked cross-entropy (``ce``), slack-CTC (``ctc``) and their mix.

This module is the trainer-independent objective API. The loop (``train``), the Hugging Face
Trainer integration (``hf_trainer``) and the NeMo AutoModel strategy (``nemo``) all compute their loss
with the same two calls, so there is one implementation:

1. :func:`corrupt` -- LLaDA's forward process and the clean sequence the objective scores:
   ``Batch`` (``input_ids`` in LLaDA layout, prompt and answer lengths, one noise seed per row) and an
   :class:`~mdlm_ctc.mdlm.config.ObjectiveConfig` (the loop's ``objective`` options, same names) ->
   a :class:`Corruption`: ``noisy_ids`` for the model, everything the loss needs, on the host until
   ``.to(device)``;
2. :func:`objective_loss` -- the model's output on ``noisy_ids`` (logits, or final hidden states with
   the LM head for the fused path) -> the normalised loss and detached statistics.

``compute_loss`` (the loop's micro-batch loss) is exactly ``corrupt`` -> model -> ``objective_loss``.

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
* ``probe_visible``: ``probe``, and the displaced token (the one right of the inserted slack) is always
  visible, as the sampler leaves it;
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
5. weighting: the same ``1 / p`` per row as CE; normalisation as above, the same for both. For CTC both
   are one per-row ``weight=`` of the loss (``reduction="sum"``), known in the forward: the two-pass
   gradient is then final when the loss is backpropagated as is (no dense rescaling pass).
6. mixing: pure CTC by default; ``ce+ctc`` with ``ctc_weight``.
7. slack is a vocabulary token (added with a mean-initialised row when missing, see ``model.py``);
   it never appears in prompts.
8. inference: the LLaDA sampler; slack is an ordinary candidate in confidence ranking, deleted at the
   end (``sample_slack_budget`` and ``eos_fill`` are optional constraints, measured in the ablation).

Which of these settings is the default was measured, not assumed: ``mdlm-ctc ablate`` (``ablation.py``).

**Band bound** (SPEC §5). Every row's band width ``min(U_b, T_b - U_b + 1)`` (and ``ctc_max_shift + 1``)
is known on the host when the canvas is built: on the ``eos`` canvas it is at most the slack budget plus
one. :func:`corrupt` records it as ``Corruption.band_bound`` and :func:`objective_loss` passes it to the
loss, so the posterior tables stay band-sized without the validation sync (``validate=False``, or under
``torch.compile``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import mdlm_ctc
from mdlm_ctc.reference import column_band_width

from .config import ObjectiveConfig, validate_objective
from .model import LMHead, SpecialIds, lm_head_of

FUSED_VOCAB_THRESHOLD = 32768


# ------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """A (micro-)batch in LLaDA layout; ``input_ids`` is the clean CE sequence.

    Build one with :func:`make_batch` (checked) or :func:`collate` (the loop's rows).
    """

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


def make_batch(input_ids: torch.Tensor, prompt_lengths, answer_lengths=None, *, eos_id: int,
               noise_seeds) -> Batch:
    """A checked :class:`Batch` from tensors in LLaDA layout (prompt, answer, EOS padding to ``L``).

    ``answer_lengths`` defaults to the canvas less its trailing run of ``eos_id`` (the EOS padding);
    every row needs ``prompt + answer + 1 <= L`` (its answer is followed by at least one EOS).
    ``noise_seeds``: one integer per row; row ``b``'s noise comes from a generator seeded with it.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
            or input_ids.dtype == torch.bool:
        raise ValueError(f"`input_ids` must be a 2-D integer tensor (batch, length); got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} of shape "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    B, L = input_ids.shape
    ids = input_ids.detach().cpu().long()

    def lengths(value, name):
        if value is None:
            raise ValueError(f"`{name}` is required: the prompt of every row must be known (it is never masked)")
        t = torch.as_tensor(value).detach().cpu()
        if t.shape != (B,) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"`{name}` must be {B} integers (one per row of `input_ids`); got {value!r}")
        return t.long()

    prompts = lengths(prompt_lengths, "prompt_lengths")
    for b in range(B):
        if not 0 <= int(prompts[b]) <= L - 1:
            raise ValueError(f"`prompt_lengths[{b}]` = {int(prompts[b])} leaves no canvas in a row of length {L}")
    if answer_lengths is None:
        answers = torch.empty(B, dtype=torch.long)
        for b in range(B):
            canvas = ids[b, int(prompts[b]):]
            not_eos = (canvas != eos_id).nonzero()
            answers[b] = int(not_eos[-1]) + 1 if len(not_eos) else 0
    else:
        answers = lengths(answer_lengths, "answer_lengths")
    for b in range(B):
        if not 0 <= int(answers[b]) <= L - int(prompts[b]) - 1:
            raise ValueError(f"`answer_lengths[{b}]` = {int(answers[b])} does not fit the canvas of row {b} "
                             f"({L - int(prompts[b])} positions after its prompt, one of them for EOS)")
    seeds = list(noise_seeds) if not isinstance(noise_seeds, torch.Tensor) else noise_seeds.tolist()
    if len(seeds) != B or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"`noise_seeds` must be {B} integers >= 0 (one per row); got {noise_seeds!r}")
    return Batch(ids, prompts, answers, seeds)


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


def draw_noise(batch: Batch, eps: float, generators: list | None = None) -> Noise:
    """LLaDA's forward process with one generator per row (seeded with ``batch.noise_seeds`` unless given).

    Row ``b`` draws ``t`` then one uniform per position from its generator, in float64, on the
    generator's device; the result lives on the batch's device.
    """
    B, L = batch.input_ids.shape
    if generators is None:
        generators = [torch.Generator().manual_seed(int(seed)) for seed in batch.noise_seeds]
    ps, draws = [], []
    for g in generators:
        t = torch.rand((), generator=g, dtype=torch.float64, device=g.device).item()
        ps.append((1.0 - eps) * t + eps)
        draws.append(torch.rand(L, generator=g, dtype=torch.float64, device=g.device).cpu())
    p = torch.tensor(ps, dtype=torch.float64)
    u = torch.stack(draws) if draws else torch.empty(0, L, dtype=torch.float64)
    positions = torch.arange(L)[None, :]
    canvas = positions >= batch.prompt_lengths.cpu()[:, None]
    masked = (u < p[:, None]) & canvas
    device = batch.input_ids.device
    return Noise(p=p.to(device=device, dtype=torch.float32), masked=masked.to(device), generators=list(generators))


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
    u = torch.rand(target_length, generator=generator, dtype=torch.float64,
                   device=generator.device).cpu().clamp_min(1e-300)
    k = torch.floor(torch.log(u) / torch.log(torch.tensor(rate, dtype=torch.float64))).long()
    before = torch.cumsum(k, 0) - k
    return torch.minimum(k, (room - before).clamp_min(0))


def probe_slack_counts(target_length: int, answer_length: int, room: int, rate: float, generator) -> torch.Tensor:
    """``probe`` insertion: with probability ``rate`` one slack token before a uniformly chosen answer token."""
    counts = torch.zeros(target_length, dtype=torch.long)
    hit = float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device)) < rate
    k = int(torch.randint(max(answer_length, 1), (), generator=generator, device=generator.device))
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


# ------------------------------------------------------------------------------ the public API
@dataclass
class Corruption:
    """A micro-batch after the forward process: the model's input and everything the loss needs.

    Tensors stay where :func:`corrupt` built them (the host) until :meth:`to`; the ``int`` fields are
    host-side facts about the layout, so the loss never reads a length back from the device.
    """

    noisy_ids: torch.Tensor            # [B, L] what the model sees: the clean sequence, mask where masked
    clean_ids: torch.Tensor            # [B, L] the clean sequence (ce: LLaDA's; ctc, ce+ctc: the CTC canvas)
    masked: torch.Tensor               # [B, L] bool: masked canvas positions (the prompt never is)
    p: torch.Tensor                    # [B] float32: masking probability of every row (the 1/p weight)
    prompt_lengths: torch.Tensor       # [B]
    canvas_lengths: torch.Tensor       # [B] T_b = L - P_b
    targets: torch.Tensor | None       # [B, U_max] CTC targets (ctc, ce+ctc), right-padded
    target_lengths: torch.Tensor | None  # [B]
    spec: ObjectiveConfig              # the objective options the corruption was built for
    special: SpecialIds
    band_bound: int | None             # max over rows of min(U_b, T_b - U_b + 1) (and ctc_max_shift + 1)
    canvas_width: int                  # max_b T_b
    shared_prompt_length: int | None   # P when every row's prompt has that length (the canvas is then a view)
    rows: int                          # this micro-batch's rows ...
    tokens: int                        # ... and canvas positions: its own normalisers

    def to(self, device, non_blocking: bool = False) -> "Corruption":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Corruption":
        """Page-locked host copies (what a DataLoader with ``pin_memory=True`` asks of a batch)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "Corruption":
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def denominators(self) -> dict:
        """This micro-batch's own normalisers (the global batch's when it is the whole step)."""
        return {"rows": float(self.rows), "tokens": float(self.tokens)}


@torch.compiler.disable  # host-side bookkeeping (per-row generators, Python loops): nothing to compile
def corrupt(batch: Batch, spec: ObjectiveConfig, special: SpecialIds, *, noise: Noise | None = None,
            align: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Corruption:
    """LLaDA's forward process and the objective's clean sequence for one micro-batch.

    Args:
        batch: rows in LLaDA layout (:func:`make_batch`, :func:`collate`).
        spec: the objective and its options (``spec.objective`` is ``"ce"``, ``"ctc"`` or ``"ce+ctc"``;
            the other fields are the loop's ``objective`` options, same names and meanings).
        special: mask, EOS and slack ids (``model.resolve_special_ids``, ``hf_trainer.add_slack_token``).
        noise: a draw of the forward process; default: :func:`draw_noise` with the batch's seeds.
        align: ``slack_insertion="best"`` only: maps the fully masked ``[B, L]`` ids to the model's logits
            ``[B, L, V]`` (called without gradient); the clean canvas is the model's Viterbi alignment.

    Returns:
        A :class:`Corruption` on the batch's device; feed ``noisy_ids`` to the model and its output to
        :func:`objective_loss`.
    """
    validate_objective(spec)
    if not isinstance(special, SpecialIds):
        raise TypeError(f"`special` must be a SpecialIds (mask, EOS and slack ids); got {type(special).__name__}")
    if noise is None:
        noise = draw_noise(batch, spec.mask_eps)
    p, masked = noise.p, noise.masked
    prompts = batch.prompt_lengths.cpu()
    L = batch.input_ids.shape[1]
    shared = int(prompts[0]) if len(prompts) and bool((prompts == prompts[0]).all()) else None
    targets = target_lengths = band_bound = None
    if spec.objective == "ce":
        clean = batch.input_ids
    else:
        targets, target_lengths = ctc_targets(batch, special.eos_id, spec)
        alignment = None
        if spec.slack_insertion == "best":
            if align is None:
                raise ValueError("slack_insertion='best' needs `align` (the model's logits on the fully masked "
                                 "canvas) to find the model's own alignment")
            alignment = best_alignment_of(align, batch, targets, target_lengths, special, spec.ctc_max_shift)
        clean, inserted = clean_ctc_canvas(batch, targets, target_lengths, noise, slack_id=special.slack_id,
                                           insertion=spec.slack_insertion, rate=spec.slack_rate,
                                           alignment=alignment, return_inserted=True)
        if spec.slack_insertion in ("probe", "probe_visible"):
            masked = masked | inserted  # the probe re-masks the position a token was displaced from
        if spec.slack_insertion == "probe_visible":  # and the displaced token is visible, as in the sampler
            masked = masked & ~F.pad(inserted[:, :-1], (1, 0))
        widths = column_band_width(L - prompts, target_lengths.cpu(), spec.ctc_max_shift)
        band_bound = max(int(widths.max()), 1) if len(widths) else 1
    noisy = torch.where(masked, torch.full_like(clean, special.mask_id), clean)
    canvas = L - prompts
    return Corruption(noisy_ids=noisy, clean_ids=clean, masked=masked, p=p, prompt_lengths=batch.prompt_lengths,
                      canvas_lengths=batch.canvas_lengths, targets=targets, target_lengths=target_lengths, spec=spec,
                      special=special, band_bound=band_bound, canvas_width=int(canvas.max()) if len(canvas) else 0,
                      shared_prompt_length=shared, rows=len(canvas), tokens=int(canvas.sum()))


def objective_loss(output: torch.Tensor, corruption: Corruption, *, head: LMHead | None = None,
                   denominators: dict | None = None, validate: bool = True) -> tuple[torch.Tensor, dict]:
    """The normalised loss of one micro-batch, and detached statistics.

    Args:
        output: the model's output on ``corruption.noisy_ids``: logits ``[B, L, V]``, or with ``head``
            the final hidden states ``[B, L, D]`` (the fused path: no ``B x L x V`` logits for CTC).
        corruption: from :func:`corrupt`, on the output's device.
        head: the LM head (``weight`` ``[V, D]``, ``bias``) for the fused path.
        denominators: ``{"rows", "tokens"}`` of the *global* batch (all micro-batches and processes of the
            optimizer step); default: the micro-batch's own (right when it is the whole step).
        validate: let the CTC loss check its inputs (one host sync). Without it, ``band_bound`` keeps the
            posterior tables band-sized.

    Returns:
        ``(loss, stats)``: ``stats`` holds ``mask_rate`` and ``ce`` and/or ``ctc`` (the normalised terms),
        ``slack_fraction`` for the CTC objectives, all detached.
    """
    c = corruption
    if not isinstance(c, Corruption):
        raise TypeError(f"`corruption` must be the Corruption that corrupt() returns; got {type(c).__name__}")
    B, L = c.noisy_ids.shape
    if not isinstance(output, torch.Tensor) or output.dim() != 3 or tuple(output.shape[:2]) != (B, L) \
            or not output.dtype.is_floating_point:
        raise ValueError(f"`output` must be the model's {'hidden states' if head is not None else 'logits'} on "
                         f"`noisy_ids`, a float tensor of shape ({B}, {L}, {'D' if head is not None else 'V'}); got "
                         f"{getattr(output, 'dtype', type(output).__name__)} of shape "
                         f"{tuple(getattr(output, 'shape', ()))}")
    if output.device != c.masked.device:
        raise ValueError(f"`corruption` is on {c.masked.device} but `output` is on {output.device}; move it with "
                         f"corruption.to(device)")
    denoms = c.denominators if denominators is None else denominators
    spec, mode = c.spec, c.spec.normalization
    stats = {"mask_rate": c.p.mean().detach()}
    if spec.objective == "ce":
        row_sums = _masked_ce_row_sums(output, head, c.clean_ids, c.masked, c.p)
        loss = _normalise(row_sums, c.canvas_lengths, mode, denoms)
        stats["ce"] = loss.detach()
        return loss, stats

    T = c.canvas_width
    canvas_out = _canvas_view(output, c, T)
    canvas_clean = _canvas_view(c.clean_ids[..., None], c, T)[..., 0]
    canvas_masked = _canvas_view(c.masked[..., None], c, T)[..., 0]
    inside = torch.arange(T, device=output.device)[None, :] < c.canvas_lengths[:, None]
    observed = torch.where(canvas_masked | ~inside, torch.full_like(canvas_clean, -1), canvas_clean)
    row_weight = 1.0 / (c.p.float() * _row_denominators(c.canvas_lengths, mode, denoms))
    ctc_loss = slack_ctc_nll(canvas_out, head, c.targets, c.target_lengths, c.canvas_lengths, observed,
                             slack_id=c.special.slack_id, max_shift=spec.ctc_max_shift, band_bound=c.band_bound,
                             validate=validate, weight=row_weight)
    stats["ctc"] = ctc_loss.detach()
    in_canvas = torch.arange(L, device=output.device)[None] >= c.prompt_lengths[:, None]
    stats["slack_fraction"] = (((c.clean_ids == c.special.slack_id) & in_canvas).float().sum().detach()
                               / c.canvas_lengths.sum())
    if spec.objective == "ctc":
        return ctc_loss, stats
    ce_rows = _masked_ce_row_sums(output, head, c.clean_ids, c.masked, c.p)
    ce_loss = _normalise(ce_rows, c.canvas_lengths, mode, denoms)
    stats["ce"] = ce_loss.detach()
    w = spec.ctc_weight
    return (1.0 - w) * ce_loss + w * ctc_loss, stats


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
                  observed, *, slack_id: int, max_shift: int | None, band_bound: int | None = None,
                  validate: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row slack-CTC negative log-likelihood ``[B]``, from logits or (hidden states, LM head); with
    ``weight`` (``[B]``), the scalar ``sum_b weight_b * nll_b`` computed inside the loss op."""
    common = dict(slack_id=slack_id, input_lengths=input_lengths, collapse="preserve", max_shift=max_shift,
                  observed=observed, reduction="none" if weight is None else "sum", validate=validate,
                  band_bound=band_bound)
    if head is not None:
        return mdlm_ctc.linear_slack_ctc_loss(canvas_out, head.weight, targets, target_lengths, bias=head.bias,
                                              row_weight=weight, **common)
    return mdlm_ctc.slack_ctc_loss(canvas_out, targets, target_lengths, weight=weight, **common)


# ------------------------------------------------------------------------------ helpers
def _canvas_view(x: torch.Tensor, c: Corruption, width: int) -> torch.Tensor:
    """``x[b, P_b : P_b + width]`` for every row (a view when all prompts have one length)."""
    if c.shared_prompt_length is not None:
        return x[:, c.shared_prompt_length: c.shared_prompt_length + width]
    L = x.shape[1]
    idx = (c.prompt_lengths[:, None] + torch.arange(width, device=x.device)[None, :]).clamp(max=L - 1)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _row_denominators(canvas_lengths: torch.Tensor, mode: str, denoms: dict) -> torch.Tensor:
    """What :func:`_normalise` divides each row's sum by, per row (float32 ``[B]``)."""
    if mode == "sequence":
        return canvas_lengths.float() * denoms["rows"]
    return torch.full(canvas_lengths.shape, denoms["tokens" if mode == "token" else "rows"],
                      dtype=torch.float32, device=canvas_lengths.device)


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


# ------------------------------------------------------------------------------ the loop's micro-batch loss
def compute_loss(model, batch: Batch, *, objective: str, special, obj_cfg, denoms: dict,
                 head: LMHead | None = None, align_model=None, device=None) -> tuple[torch.Tensor, dict]:
    """The (already normalised) loss of one micro-batch, and detached statistics: :func:`corrupt`, the
    model, :func:`objective_loss`.

    ``model`` is the (possibly DDP-wrapped) :class:`~mdlm_ctc.mdlm.model.DiffusionLM`; it returns
    hidden states when ``head`` is given (fused path), logits otherwise. ``align_model`` is the
    unwrapped model used without gradient for ``slack_insertion="best"``. The batch may stay on the
    host; ``device`` (default: the batch's) is where the model runs.
    """
    spec = obj_cfg if obj_cfg.objective == objective else dataclasses.replace(obj_cfg, objective=objective)
    device = batch.input_ids.device if device is None else torch.device(device)
    align = None
    if spec.objective != "ce" and spec.slack_insertion == "best":
        def align(ids):
            return _logits(align_model or model, ids.to(device), head)
    corruption = corrupt(batch, spec, special, align=align).to(device)
    out = model(corruption.noisy_ids, want="hidden" if head is not None else "logits")
    return objective_loss(out, corruption, head=head, denominators=denoms)


def _logits(model, ids: torch.Tensor, head: LMHead | None) -> torch.Tensor:
    if head is None:
        return model(ids, want="logits")
    return F.linear(model(ids, want="hidden"), head.weight, head.bias)


@torch.no_grad()
def best_alignment_of(align: Callable[[torch.Tensor], torch.Tensor], batch: Batch, targets, target_lengths, special,
                      max_shift) -> torch.Tensor:
    """Viterbi canvas ``[B, T_max]`` of the logits ``align`` gives on the fully masked canvas (no gradient)."""
    L = batch.input_ids.shape[1]
    positions = torch.arange(L, device=batch.input_ids.device)[None, :]
    fully_masked = torch.where(positions >= batch.prompt_lengths[:, None],
                               torch.full_like(batch.input_ids, special.mask_id), batch.input_ids)
    logits = align(fully_masked)
    T = int(batch.canvas_lengths.max())
    prompts = batch.prompt_lengths.to(logits.device)
    idx = (prompts[:, None] + torch.arange(T, device=logits.device)[None, :]).clamp(max=L - 1)
    canvas = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
    return mdlm_ctc.best_alignment(canvas.float(), targets.to(logits.device), target_lengths.to(logits.device),
                                   slack_id=special.slack_id, input_lengths=batch.canvas_lengths.to(logits.device),
                                   max_shift=max_shift)


def best_canvas_alignment(model, batch: Batch, targets, target_lengths, special, max_shift, head) -> torch.Tensor:
    """Viterbi canvas ``[B, T_max]`` of the model on the fully masked canvas (no gradient)."""
    return best_alignment_of(lambda ids: _logits(model, ids, head), batch, targets, target_lengths, special, max_shift)
