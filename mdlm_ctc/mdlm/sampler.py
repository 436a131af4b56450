"""LLaDA's sampler (low-confidence remasking, semi-autoregressive blocks) and the positional-shift probe.

**Sampling** (LLaDA ``generate.py``): the canvas starts as ``gen_length`` mask tokens after the prompt
and is split into blocks of ``block_length``; each block gets ``sample_steps / blocks`` steps and the
number of tokens committed per step is the even split of the block's masked positions (remainder first).
At each step the model predicts every position; the prediction is the arg-max of the logits (plus
Gumbel noise times ``temperature``; LLaDA's ``exp(logits) / (-log u)^temperature`` has the same arg-max
as ``logits + temperature * Gumbel``, computed here in float64 without the overflow-prone ``exp``);
the masked positions of the current block (and any still-masked earlier position) with the highest
confidence (softmax probability of the prediction; uniform noise with ``remasking="random"``) are
committed and never change again. The mask token itself is never predicted. At the end, ``<slack>`` is
deleted and the text is cut at the first EOS, or at the answer's terminator when the model has one
(``SpecialIds.answer_end``: LLaDA-8B-Instruct's ``<|eot_id|>``, which its SFT data put between the
answer and the EOS padding; ``finalize``); repeats are kept.

**Positional-shift probe** (paper.md §5.1; mdlm.md §5.2). With ``shift_fraction = rho``, every *content*
token (not slack, EOS or the answer's terminator) is, at the moment it is committed, displaced by one
position with probability ``rho``: it is written into the neighbouring position instead (right, left or
a random side, per ``shift_direction``) when that position is still masked, and its own position is
masked again (to be decoded later). When the neighbour is already committed or outside the canvas,
nothing moves (counted as blocked). So the model sees one of its own tokens one position away from where
it put it, which is the misalignment that the slack token is meant to absorb. Only content tokens are
candidates, so both a CE and a CTC model receive the same expected number of displaced content tokens;
the realised fraction is reported. If a displacement re-opens a position of a block whose last step has
passed, it is decoded with the next block (LLaDA lets earlier masked positions compete anyway), and a
final step commits anything still masked, without displacement.

**Single-displacement probe** (``probe``; the gap test of ``evaluate.gap_test``). Instead of a random
draw per token, row ``b`` displaces exactly one content token: its ``probe[b]``-th content commit (0-based,
in commit order), or the next one whose neighbour is free if that one is blocked. The next forward pass
sees the state the shift probe creates (the token one position away, its old position masked again:
the gap), and the sampler records the model's distribution at the gap there: the probability of
``<slack>``, of the displaced token (writing it again is a duplicate) and of anything else, the arg-max,
and at the end the token finally committed at the gap (``SampleResult.gap``). Decoding then continues
without further displacement.

**Constraints matching the CTC lattice** (off by default; the same for every model). With
``sample_slack_budget = m >= 0`` a row that has committed ``m`` slack tokens no longer considers slack
(the ``eos`` canvas of training holds exactly ``m``). With ``eos_fill``, committing an EOS (or the
answer's terminator) commits EOS at every later masked position at once (LLaDA's canvas ends in EOS
padding); those positions count as committed, so the block's remaining steps have fewer tokens to place.

**Determinism.** Every row has its own generator seeded by the caller (an example's seed), used for the
Gumbel noise, random remasking and the shift draws, so seeded sampling is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SampleResult:
    canvas: list[int]           # the generated canvas (gen_length ids)
    tokens: list[int]           # slack deleted, cut at the first EOS
    content_committed: int      # content tokens committed (candidates of the shift probe)
    displaced: int              # content tokens actually displaced
    blocked: int                # chosen for displacement but the neighbour was taken
    gap: dict | None = None     # the single-displacement probe: the gap and the model's distribution there


def finalize(canvas: list[int], slack_id: int, eos_id: int, mask_id: int | None = None,
             stop_ids=()) -> list[int]:
    """Delete slack (and stray masks), cut at the first EOS (or any of ``stop_ids``); repeats are kept."""
    out = []
    for tok in canvas:
        if tok == eos_id or tok in stop_ids:
            break
        if tok == slack_id or tok == mask_id:
            continue
        out.append(tok)
    return out


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x) if not hasattr(model, "hf") else model(x, want="logits")
    return (out.logits if hasattr(out, "logits") else out).float()


def _schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: even split, remainder on the first steps. ``[B, steps]``."""
    base = n_masked // steps
    remainder = n_masked % steps
    out = base[:, None].repeat(1, steps)
    out += (torch.arange(steps)[None, :] < remainder[:, None]).long()
    return out


@torch.no_grad()
def generate_group(model, prompts: torch.Tensor, generators: list, special, cfg, shift_fraction: float = 0.0,
                   device=None, probe: list[int] | None = None) -> list[SampleResult]:
    """Sample a batch of prompts that all have the same length ``P`` (``prompts`` is ``[B, P]``).

    ``probe``: per row, the content commit to displace (the single-displacement probe; -1: none), in
    place of ``shift_fraction``'s random draws.
    """
    if probe is not None and shift_fraction > 0:
        raise ValueError("`probe` replaces the shift fraction's random displacements; pass shift_fraction=0")
    device = device or prompts.device
    B, P = prompts.shape
    G = cfg.gen_length
    mask_id, slack_id, eos_id = special.mask_id, special.slack_id, special.eos_id
    stops = torch.tensor(getattr(special, "stop_ids", (eos_id,)), device=device)
    not_content = {slack_id, mask_id, *stops.tolist()}  # the probe moves content tokens only
    x = torch.cat([prompts.to(device), torch.full((B, G), mask_id, dtype=torch.long, device=device)], dim=1)
    num_blocks = G // cfg.block_length
    steps_per_block = cfg.sample_steps // num_blocks
    content = [0] * B
    displaced = [0] * B
    blocked = [0] * B
    directions = {"right": 1, "left": -1}
    gaps: list[dict | None] = [None] * B   # probe: the displacement made in each row
    pending: list[int] = []                # rows whose gap the next forward pass measures

    def step(limit: int, k_per_row: torch.Tensor, allow_shift: bool):
        mask_index = x == mask_id
        logits = _logits(model, x)
        logits[..., mask_id] = float("-inf")
        if cfg.sample_slack_budget >= 0:
            spent = (x[:, P:] == slack_id).sum(1) >= cfg.sample_slack_budget
            logits[spent, :, slack_id] = float("-inf")
        if pending:
            _measure_gaps(logits)
        if cfg.temperature > 0:
            u = torch.stack([torch.rand(logits.shape[1:], generator=g, dtype=torch.float64) for g in generators])
            gumbel = -torch.log((-torch.log(u.clamp_min(1e-300))).clamp_min(1e-300))
            x0 = torch.argmax(logits.double() + cfg.temperature * gumbel.to(device), dim=-1)
        else:
            x0 = torch.argmax(logits, dim=-1)
        if cfg.remasking == "low_confidence":
            confidence = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None])[..., 0]
        else:
            confidence = torch.stack([torch.rand(x.shape[1], generator=g) for g in generators]).to(device)
        confidence[:, limit:] = float("-inf")
        confidence = torch.where(mask_index, confidence, torch.full_like(confidence, float("-inf")))
        for b in range(B):
            k = int(k_per_row[b])
            if k <= 0:
                continue
            chosen = torch.topk(confidence[b], k=k).indices
            chosen = chosen[torch.isfinite(confidence[b, chosen])]
            x[b, chosen] = x0[b, chosen]
            if allow_shift and (shift_fraction > 0 or probe is not None):
                _shift_row(b, sorted(chosen.tolist()))
            elif allow_shift:
                content[b] += sum(1 for i in chosen.tolist() if int(x[b, i]) not in not_content)
            if cfg.eos_fill:
                _fill_after_eos(b)

    def _fill_after_eos(b: int):
        eos = torch.isin(x[b, P:], stops).nonzero()
        if len(eos):
            tail = x[b, P + int(eos[0]) + 1:]
            tail[tail == mask_id] = eos_id

    def _measure_gaps(logits: torch.Tensor):
        for b in pending:
            gap = gaps[b]
            probs = F.softmax(logits[b, P + gap["position"]].double(), dim=-1)
            gap["p_slack"] = float(probs[slack_id])
            gap["p_duplicate"] = float(probs[gap["token"]]) if gap["token"] != slack_id else 0.0
            gap["p_other"] = max(0.0, 1.0 - gap["p_slack"] - gap["p_duplicate"])
            gap["top"] = int(torch.argmax(probs))
        pending.clear()

    def _shift_row(b: int, chosen: list[int]):
        g = generators[b]
        side = directions.get(cfg.shift_direction)
        # right moves go right-to-left (and left moves left-to-right) so that a run of new tokens can move together
        order = chosen[::-1] if side != -1 else chosen
        if probe is not None:  # in commit order: the probe's index counts content commits left to right
            order = sorted(order)
        for i in order:
            tok = int(x[b, i])
            if tok in not_content:
                continue
            index = content[b]
            content[b] += 1
            if probe is not None:
                if gaps[b] is not None or probe[b] < 0 or index < probe[b]:
                    continue
                d = side if side is not None else (1 if float(torch.rand((), generator=g)) < 0.5 else -1)
            else:
                u = float(torch.rand((), generator=g))
                d = side if side is not None else (1 if float(torch.rand((), generator=g)) < 0.5 else -1)
                if u >= shift_fraction:
                    continue
            j = i + d
            if P <= j < P + G and int(x[b, j]) == mask_id:
                x[b, j] = tok
                x[b, i] = mask_id
                displaced[b] += 1
                if probe is not None:
                    gaps[b] = {"position": i - P, "token": tok, "to": j - P, "content_index": index}
                    pending.append(b)
            else:
                blocked[b] += 1

    for nb in range(num_blocks):
        limit = P + (nb + 1) * cfg.block_length
        n_masked = (x[:, :limit] == mask_id).sum(1).cpu()
        schedule = _schedule(n_masked, steps_per_block)
        for i in range(steps_per_block):
            k = schedule[:, i]
            if i == steps_per_block - 1:
                k = (x[:, :limit] == mask_id).sum(1).cpu()  # commit whatever is left of the block
            step(limit, k, allow_shift=True)
    while bool((x[:, P:] == mask_id).any()):  # positions re-opened by the last displacements
        step(P + G, (x[:, P:] == mask_id).sum(1).cpu(), allow_shift=False)

    results = []
    for b in range(B):
        canvas = x[b, P:].tolist()
        if gaps[b] is not None:
            gaps[b]["final"] = canvas[gaps[b]["position"]]
        results.append(SampleResult(canvas=canvas, tokens=finalize(canvas, slack_id, eos_id, mask_id,
                                                                   tuple(stops.tolist())),
                                    content_committed=content[b], displaced=displaced[b], blocked=blocked[b],
                                    gap=gaps[b]))
    return results


def generate(model, prompts: list[list[int]], seeds: list[int], special, cfg, *, shift_fraction: float = 0.0,
             device=None, progress: bool = False, desc: str = "sample",
             probe: list[int] | None = None) -> list[SampleResult]:
    """Sample every prompt (any lengths): rows are grouped by prompt length, ``sample_batch_size`` at a time.

    ``seeds[i]`` seeds prompt ``i``'s generator, so a prompt's sample does not depend on the others'
    randomness (the arithmetic of a batched forward may still differ in the last bits across batch sizes).
    ``probe[i]``: prompt ``i``'s single displacement (see :func:`generate_group`).
    """
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    groups = []
    for length in sorted(by_length):
        idx = by_length[length]
        for s in range(0, len(idx), cfg.sample_batch_size):
            groups.append(idx[s:s + cfg.sample_batch_size])
    results: list[SampleResult | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for group in tqdm(groups, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
            batch = torch.tensor([prompts[i] for i in group], dtype=torch.long, device=device)
            gens = [torch.Generator().manual_seed(int(seeds[i])) for i in group]
            rows = None if probe is None else [probe[i] for i in group]
            for i, r in zip(group, generate_group(model, batch, gens, special, cfg, shift_fraction, device, rows)):
                results[i] = r
    finally:
        model.train(was_training)
    return results
