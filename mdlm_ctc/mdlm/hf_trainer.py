"""Slack-CTC (and LLaDA's CE) inside ``transformers.Trainer``: a data collator, a loss, a Trainer mixin.

The collator runs LLaDA's forward process on the host (prompt never masked, one ``t`` per row, the
``mask_eps`` floor, a seeded generator per row) and builds the clean sequence of the objective; the loss
scores the model's logits with the same :func:`~mdlm_ctc.mdlm.objectives.objective_loss` the loop uses.
Two ways to plug them in::

    special = add_slack_token(model, tokenizer)               # <slack>: tokenizer + embeddings, as the loop
    collator = MDLMCollator(special, ObjectiveConfig(objective="ctc"), max_length=1024)

    # (a) plain transformers.Trainer
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, compute_loss_func=mdlm_loss)
    # (b) the mixin (also on top of dllm's MDLMTrainer): exact with gradient accumulation too
    MDLMTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)

**Rows** (the dataset's items): the loop's ``data.Encoded`` rows; or dicts with ``input_ids`` (prompt then
answer, unpadded) and ``labels`` that are ``-100`` over the prompt and the ids after it (the SFT format of
dllm and TRL, which the Trainer's column filter keeps), or ``prompt_length`` (``prompt_len``) instead of
``labels`` with ``remove_unused_columns=False``. Trailing EOS tokens of a row count as its EOS padding.

**Normalisation** is the loop's (``objective.normalization``) over the whole optimizer step. With
``compute_loss_func`` the loss sees one micro-batch, so it normalises over the micro-batch of every
process (their rows and canvas positions are summed across processes) and refuses gradient
accumulation rather than mis-scale it; :class:`MDLMTrainerMixin` sums them over the accumulated
micro-batches too (``get_batch_samples``), so any ``gradient_accumulation_steps`` is exact.

**Noise.** Row ``j`` of micro-batch ``m`` of step ``k`` (the collator's batch ``k * A + m`` with ``A``
micro-batches per step) uses the seed ``data.noise_seed(seed, k, m * B + j)`` (``B`` rows per
micro-batch; on process ``r`` the position is offset by ``r * 2**24``): the loop's seed of that row. So
with one process, ``train_sampling_strategy="sequential"`` and the rows in the loop's order
(:func:`loop_order`), step ``k`` of the Trainer sees the rows, the noise and hence the loss of step
``k`` of ``mdlm-ctc train`` (``A = 1`` with ``compute_loss_func``; any ``A`` with
:class:`MDLMTrainerMixin`, which tells the collator ``A``). The count runs across dataloader workers
(they take batches in turn); keep workers persistent (``dataloader_persistent_workers=True``), or every
epoch restarts it. :class:`MDLMTrainerMixin` restarts the count at the resumed step when a run resumes.
Evaluation batches go through the same collator and advance the count too (the noise stays distinct; a
run with evaluations draws other noise after them).

Loop option -> here: ``objective.*`` (every ``objective`` option: the :class:`ObjectiveConfig` fields),
``max_length``/``pad_to``/``canvas_extra`` and ``seed`` -> :class:`MDLMCollator` arguments of the same
names; ``slack_token``/``slack_id``/``mask_token``/``mask_id``/``eos_token``/``eos_id`` ->
:func:`add_slack_token`; ``batch_size`` -> ``per_device_train_batch_size * gradient_accumulation_steps
* processes``. ``slack_insertion="best"`` needs the model inside the forward process and is not offered
here (the loop and :func:`~mdlm_ctc.mdlm.objectives.corrupt` have it); the loss uses logits (the loop's
fused LM-head path is not wired into the Trainer).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback

from .config import Config, DataConfig, ObjectiveConfig, validate_objective
from .data import Encoded, GlobalOrder, noise_seed
from .model import SpecialIds, resolve_special_ids
from .objectives import Corruption, collate, corrupt, layout_length, objective_loss

IGNORE = -100
_RANK_STRIDE = 1 << 24  # rows per batch are far fewer: positions of different processes never meet

__all__ = ["MDLMCollator", "mdlm_loss", "MDLMTrainerMixin", "MDLMTrainer", "StepDenominators", "add_slack_token",
           "loop_order", "sft_features", "ObjectiveConfig"]


# ------------------------------------------------------------------------------ tokenizer and embeddings
def add_slack_token(model, tokenizer, *, slack_token: str = "<slack>", slack_id: int | None = None,
                    mask_token: str | None = None, mask_id: int | None = None, eos_token: str | None = None,
                    eos_id: int | None = None) -> SpecialIds:
    """Mask, EOS and slack ids of ``model``/``tokenizer``; adds ``<slack>`` exactly as the loop does.

    A vocabulary without ``slack_token`` gets it as a special token, and the model's embedding (and
    untied LM head) a row initialised to the mean of the rows in use (resized when needed); with
    ``slack_id`` a reserved row is reused as it is (LLaDA: e.g. 126084). The keyword arguments are the
    loop's options of the same names (``--slack-token``, ``--mask-id``, ...).
    """
    for name, value in (("slack_id", slack_id), ("mask_id", mask_id), ("eos_id", eos_id)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"`{name}` must be a token id >= 0 or None; got {value!r}")
    for name, value in (("slack_token", slack_token), ("mask_token", mask_token), ("eos_token", eos_token)):
        if value is not None and (not isinstance(value, str) or not value) or name == "slack_token" and value is None:
            raise ValueError(f"`{name}` must be a non-empty token string{'' if name == 'slack_token' else ' or None'}; "
                             f"got {value!r}")
    if mask_id is None and mask_token is None and getattr(tokenizer, "mask_token_id", None) is None \
            and getattr(getattr(model, "config", None), "mask_token_id", None) is None \
            and "<|mdm_mask|>" not in tokenizer.get_vocab() \
            and "llada" not in str(getattr(getattr(model, "config", None), "model_type", "")).lower():
        raise ValueError(f"`tokenizer` ({type(tokenizer).__name__}) has no mask token (and the model config no "
                         f"mask_token_id); pass mask_token= or mask_id=")
    if eos_id is None and eos_token is None and getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(f"`tokenizer` ({type(tokenizer).__name__}) has no EOS token; pass eos_token= or eos_id=")
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, slack_token=slack_token, slack_id=slack_id, mask_token=mask_token,
                                    mask_id=mask_id, eos_token=eos_token, eos_id=eos_id)
    special = resolve_special_ids(model, tokenizer, cfg)
    reserved = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "bos", "unk", "cls", "sep")}
    for name, token_id in reserved.items():
        if token_id is not None and token_id == special.slack_id:
            raise ValueError(f"the slack id {special.slack_id} is the tokenizer's {name} token "
                             f"({getattr(tokenizer, f'{name}_token')!r}): slack must be a token of its own (it is "
                             f"deleted from every canvas); pass another slack_token= or slack_id=")
    return special


# ------------------------------------------------------------------------------ rows
def sft_features(rows) -> list[dict]:
    """The loop's rows as Trainer features: ``input_ids`` (prompt, answer) and ``labels`` (-100 over the prompt)."""
    return [{"input_ids": r.prompt_ids + r.answer_ids, "labels": [IGNORE] * len(r.prompt_ids) + r.answer_ids}
            for r in rows]


def loop_order(rows, *, batch_size: int, seed: int, steps: int) -> list:
    """The rows in the order ``mdlm-ctc train`` visits them: ``steps`` global batches of ``batch_size``."""
    order = GlobalOrder(len(rows), batch_size, seed)
    return [rows[i] for step in range(steps) for i in order.batch(step)]


def _id_list(value, what: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{what} must be a list of token ids; got {type(value).__name__}")
    return list(value)


def _prompt_from_labels(ids: list[int], labels: list[int], index: int) -> int:
    if len(labels) != len(ids):
        raise ValueError(f"feature {index}: `labels` has {len(labels)} entries but `input_ids` has {len(ids)}")
    prompt = 0
    while prompt < len(labels) and labels[prompt] == IGNORE:
        prompt += 1
    for j in range(prompt, len(ids)):
        if labels[j] != ids[j]:
            raise ValueError(f"feature {index}: `labels[{j}]` = {labels[j]} but `input_ids[{j}]` = {ids[j]}; the "
                             f"collator expects labels = -100 over the prompt, then the input ids (one prompt, one "
                             f"answer)")
    return prompt


def _row_of(feature, index: int, eos_id: int) -> Encoded:
    """One dataset item as the loop's row (prompt ids, answer ids without its EOS padding)."""
    if isinstance(feature, Encoded):
        return feature
    if not isinstance(feature, Mapping):
        raise TypeError(f"feature {index} must be an Encoded row or a dict with `input_ids`; got "
                        f"{type(feature).__name__}")
    if "prompt_ids" in feature and "answer_ids" in feature:
        return Encoded(_id_list(feature["prompt_ids"], f"feature {index} `prompt_ids`"),
                       _id_list(feature["answer_ids"], f"feature {index} `answer_ids`"))
    if "input_ids" not in feature:
        raise ValueError(f"feature {index} has no `input_ids` (keys: {sorted(feature)})")
    ids = _id_list(feature["input_ids"], f"feature {index} `input_ids`")
    key = next((k for k in ("prompt_length", "prompt_len") if k in feature), None)
    if key is not None:
        prompt = feature[key]
        prompt = int(prompt.item()) if isinstance(prompt, torch.Tensor) else prompt
        if not isinstance(prompt, int) or isinstance(prompt, bool) or not 0 <= prompt <= len(ids):
            raise ValueError(f"feature {index}: `{key}` must be an integer in [0, {len(ids)}]; got {prompt!r}")
    elif "labels" in feature:
        prompt = _prompt_from_labels(ids, _id_list(feature["labels"], f"feature {index} `labels`"), index)
    else:
        raise ValueError(f"feature {index} has no prompt length: give `labels` (-100 over the prompt), "
                         f"`prompt_length`, or an Encoded row (keys: {sorted(feature)}; the Trainer drops columns "
                         f"its model does not take unless remove_unused_columns=False)")
    answer = ids[prompt:]
    while answer and answer[-1] == eos_id:  # trailing EOS is the row's EOS padding
        answer.pop()
    return Encoded(ids[:prompt], answer)


# ------------------------------------------------------------------------------ the collator
class MDLMCollator:
    """Data collator: rows -> ``{"input_ids": noisy ids, "labels": Corruption}`` (see the module docstring).

    Args:
        special: mask, EOS and slack ids (:func:`add_slack_token`).
        objective: the objective and its options (default: the loop's defaults, ``ctc``).
        max_length, pad_to, canvas_extra: the row layout, as the loop's options of the same names.
        seed: the run seed of the noise (the loop's ``seed``).
    """

    def __init__(self, special: SpecialIds, objective: ObjectiveConfig | None = None, *, max_length: int = 36,
                 pad_to: str = "max_length", canvas_extra: int = 8, seed: int = 0):
        if not isinstance(special, SpecialIds):
            raise TypeError(f"`special` must be the SpecialIds that add_slack_token returns; got "
                            f"{type(special).__name__}")
        self.special = special
        self.objective = validate_objective(ObjectiveConfig() if objective is None else objective)
        if self.objective.objective != "ce" and self.objective.slack_insertion == "best":
            raise ValueError("slack_insertion='best' needs the model's forward pass inside the forward process; the "
                             "collator runs without the model (use the loop, or corrupt(..., align=...) in your own "
                             "compute_loss)")
        for name, value, low in (("max_length", max_length, 2), ("canvas_extra", canvas_extra, 0), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}")
        if pad_to not in ("max_length", "longest"):
            raise ValueError(f"`pad_to` must be 'max_length' or 'longest'; got {pad_to!r}")
        self.layout = DataConfig(max_length=max_length, pad_to=pad_to, canvas_extra=canvas_extra)
        self.seed = seed
        self.accumulation = 1  # micro-batches per step (MDLMTrainerMixin sets gradient_accumulation_steps)
        self.start = 0         # index of the first batch this copy collates (MDLMTrainerMixin sets it on resume)
        self._calls = 0

    def batch_index(self) -> int:
        """The index of the batch being collated, counted across dataloader workers."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.start + self._calls * workers + worker

    def __call__(self, features, return_tensors=None) -> dict:
        if not features:
            raise ValueError("`features` is empty: a batch needs at least one row")
        s = self.special
        rows = [_row_of(f, i, s.eos_id) for i, f in enumerate(features)]
        for i, r in enumerate(rows):
            for name, token in (("mask", s.mask_id), ("slack", s.slack_id)):
                if token in r.prompt_ids or token in r.answer_ids:
                    raise ValueError(f"feature {i} contains the {name} id {token}; the forward process reserves it")
        length = layout_length(rows, self.layout)
        for i, r in enumerate(rows):
            need = len(r.prompt_ids) + len(r.answer_ids) + 1
            if need > length:
                raise ValueError(f"feature {i} needs {need} positions (prompt {len(r.prompt_ids)}, answer "
                                 f"{len(r.answer_ids)}, EOS) but the layout has {length} (`max_length`); drop or "
                                 f"truncate long rows first, or raise max_length")
        index = self.batch_index()
        self._calls += 1
        step, micro = divmod(index, self.accumulation)
        first = int(os.environ.get("RANK", "0")) * _RANK_STRIDE + micro * len(rows)
        seeds = [noise_seed(self.seed, step, first + j) for j in range(len(rows))]
        corruption = corrupt(collate(rows, length, s.eos_id, seeds), self.objective, s)
        return {"input_ids": corruption.noisy_ids, "labels": corruption}


# ------------------------------------------------------------------------------ the loss
@dataclass
class StepDenominators:
    """Rows and canvas positions of a whole optimizer step (every micro-batch, every process)."""

    totals: torch.Tensor  # float32 [2]: rows, canvas positions

    def as_dict(self) -> dict:
        return {"rows": self.totals[0], "tokens": self.totals[1]}


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _accumulating() -> bool:
    """Whether the Trainer is inside gradient accumulation (a micro-batch that does not sync gradients)."""
    if "accelerate" not in sys.modules:
        return False
    from accelerate.state import GradientState

    return not GradientState().sync_gradients


def _logits_of(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"`outputs` must carry the model's logits (`.logits`); got {type(outputs).__name__}")
    return logits


def mdlm_loss(outputs, labels, num_items_in_batch=None) -> torch.Tensor:
    """The loop's loss for ``Trainer(compute_loss_func=mdlm_loss)``: ``labels`` is what :class:`MDLMCollator` built.

    Normalised over the step (see the module docstring) and multiplied by the number of processes,
    which the data-parallel gradient average divides out again.
    """
    if not isinstance(labels, Corruption):
        raise TypeError(f"`labels` must be the Corruption that MDLMCollator puts in the batch; got "
                        f"{type(labels).__name__} (is the data collator an MDLMCollator?)")
    logits = _logits_of(outputs)
    corruption = labels.to(logits.device, non_blocking=True)
    world = _world_size()
    if isinstance(num_items_in_batch, StepDenominators):
        denoms = num_items_in_batch.as_dict()
    else:
        if _accumulating():
            raise ValueError("gradient_accumulation_steps > 1 with compute_loss_func=mdlm_loss: the loss sees one "
                             "micro-batch and cannot normalise over the step; use MDLMTrainer (or "
                             "MDLMTrainerMixin), which counts the whole step")
        denoms = corruption.denominators
        if world > 1:
            totals = torch.tensor([corruption.rows, corruption.tokens], dtype=torch.float32, device=logits.device)
            torch.distributed.all_reduce(totals)
            denoms = StepDenominators(totals).as_dict()
    loss, _ = objective_loss(logits, corruption, denominators=denoms)
    return loss * world if world > 1 else loss


# ------------------------------------------------------------------------------ the Trainer mixin
class MDLMTrainerMixin:
    """Put before a ``transformers.Trainer`` subclass (``Trainer`` itself, dllm's ``MDLMTrainer``, ...).

    ``compute_loss`` runs the model on the collator's noisy ids and returns :func:`mdlm_loss`;
    ``get_batch_samples`` counts the rows and canvas positions of the whole step (all accumulated
    micro-batches, summed over processes), so the loss is normalised over the step like the loop's.
    """

    loss_is_scaled_for_ga = True  # normalised over the accumulated step already

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.data_collator, MDLMCollator):
            self.data_collator.accumulation = self.args.gradient_accumulation_steps
            self.add_callback(_NoiseCount(self.data_collator))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        labels = [b.get("labels") for b in batch_samples if isinstance(b, Mapping)]
        if not labels or not all(isinstance(c, Corruption) for c in labels):
            return batch_samples, num_items
        totals = torch.tensor([sum(c.rows for c in labels), sum(c.tokens for c in labels)], dtype=torch.float32,
                              device=device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return batch_samples, StepDenominators(totals)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        loss = mdlm_loss(outputs, labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


class _NoiseCount(TrainerCallback):
    """On (re)start, number the collator's batches from the step the run starts at."""

    def __init__(self, collator: MDLMCollator):
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        self.collator.start = state.global_step * args.gradient_accumulation_steps
        self.collator._calls = 0


class MDLMTrainer(MDLMTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`MDLMTrainerMixin`."""
