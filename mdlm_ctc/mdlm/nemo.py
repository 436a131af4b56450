"""Slack-CTC as a NeMo AutoModel dLLM strategy (``nemo_automodel.recipes.dllm``), registered as ``slack_ctc``.

NeMo AutoModel's diffusion-LM recipe (``DiffusionLMSFTRecipe``, ``nemo-automodel`` 0.7.0) delegates what
differs between dLLM families to a ``DLLMStrategy`` looked up by ``dllm.mode`` in ``DLLM_STRATEGIES``:
``create_loss_fn`` (the loss module), ``apply_corruption`` (the forward process, called once per row with
a per-row seeded generator), ``prepare_batch`` (the model's inputs), ``pre_step`` and ``setup_extra``.
:class:`SlackCTCStrategy` fills them with the objective API the loop uses (``objectives.corrupt`` and
``objectives.objective_loss``), so a NeMo run trains the same objective on the same canvas::

    torchrun --nproc-per-node=8 -m mdlm_ctc.mdlm.nemo -c llada_slack_ctc.yaml

(the module registers the strategy, then runs NeMo's recipe ``main``). The recipe's YAML names the
strategy and takes the loop's ``objective`` options under ``dllm``::

    dllm:
      mode: slack_ctc
      mask_token_id: 126336
      eps: 0.001                  # the loop's mask_eps
      supervise_padding: true     # required: the canvas is the answer and its EOS padding (LLaDA SFT)
      slack_token_id: 126084      # a reserved row of LLaDA's embedding (or a <slack> the checkpoint has)
      objective: ctc              # ctc | ce+ctc | ce
      ctc_canvas: eos
      slack_budget: 2

What this strategy needs from the recipe, and why:

* **one supervised suffix per row** (``supervise_padding: true``, single-turn data): the canvas of a row
  is everything after its prompt, the answer then its EOS padding; trailing EOS (or pad) tokens of the
  canvas count as padding;
* **the slack row already in the checkpoint** (``slack_token_id``, or a ``slack_token`` the tokenizer
  has): the recipe shards the model with FSDP2 before any strategy hook runs, so the embedding can no
  longer grow; add ``<slack>`` once with ``hf_trainer.add_slack_token`` and ``save_pretrained``;
* **token normalisation**: the recipe divides the loss by the step's supervised-token count (all
  micro-batches, all data-parallel ranks), which is the loop's ``normalization: token`` exactly; the
  other normalisations need a row count that the recipe does not pass to the loss;
* no context parallelism (the CTC lattice needs whole rows) and no block diffusion (``block_size``);
  ``slack_insertion: best`` runs the model once more without gradient on the fully masked canvas.

The module imports without NeMo; only :func:`register` (and ``python -m``) imports it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .config import ObjectiveConfig, validate_objective
from .model import SpecialIds
from .objectives import Batch, Corruption, corrupt, draw_noise, objective_loss

STRATEGY_NAME = "slack_ctc"
_STASH = "_mdlm_ctc_corruption"
_OPTIONS = ("objective", "ctc_canvas", "slack_budget", "slack_budget_ratio", "slack_insertion", "slack_rate",
            "ctc_max_shift", "ctc_weight", "normalization", "slack_token_id", "slack_token", "eos_token_id")
_NEMO_KEYS = ("mode", "mask_token_id", "eps", "supervise_padding", "block_size", "block_length", "half_life_ratio",
              "pad_block_size", "pad_seq_len_divisible", "vocab_size", "uniform_ratio", "num_timesteps",
              "schedule_shape", "schedule_peak", "chunk_size", "self_conditioning_p", "encoder_loss_weight",
              "clean_loss_weight", "auto_balance_clean_loss", "ar_loss_alpha")  # the dllm keys NeMo 0.7.0 reads


class DLLMLossOutput(NamedTuple):
    """What the recipe reads from a dLLM loss (the fields of NeMo's own ``DLLMLossOutput``)."""

    total_loss: torch.Tensor
    dllm_loss: torch.Tensor
    draft_correct_per_pos: torch.Tensor | None = None
    draft_count_per_pos: torch.Tensor | None = None


def objective_from_dllm_config(dllm_cfg) -> ObjectiveConfig:
    """The loop's objective options from the recipe's ``dllm`` section (``eps`` is ``mask_eps``)."""
    get = dllm_cfg.get
    keys = list(dllm_cfg.keys()) if hasattr(dllm_cfg, "keys") else []
    for key in keys:  # a misspelt option of ours is an error; NeMo's own keys pass
        close = difflib.get_close_matches(str(key), _OPTIONS, n=1, cutoff=0.8)
        if key not in _OPTIONS and key not in _NEMO_KEYS and close:
            raise ValueError(f"unknown option `dllm.{key}` (did you mean `dllm.{close[0]}`?)")
    normalization = get("normalization", "token")
    if normalization != "token":
        raise ValueError(f"`dllm.normalization` must be 'token' with the NeMo recipe (it normalises by the step's "
                         f"supervised tokens and passes no row count to the loss); got {normalization!r}")
    defaults = ObjectiveConfig()
    options = {name: get(name, getattr(defaults, name)) for name in
               ("objective", "ctc_canvas", "slack_budget", "slack_budget_ratio", "slack_insertion", "slack_rate",
                "ctc_max_shift", "ctc_weight")}
    for name in ("slack_rate", "slack_budget_ratio", "ctc_weight"):
        if isinstance(options[name], int) and not isinstance(options[name], bool):
            options[name] = float(options[name])
    eps = get("eps", 1e-3)
    return validate_objective(ObjectiveConfig(mask_eps=float(eps), normalization="token", **options))


def _concat(parts: list[Corruption]) -> Corruption:
    """One micro-batch's corruption from its rows' (every row corrupted on its own generator)."""
    first = parts[0]
    if len(parts) == 1:
        return first

    def cat(name):
        return torch.cat([getattr(c, name) for c in parts])

    targets = target_lengths = None
    if first.targets is not None:
        width = max(c.targets.shape[1] for c in parts)
        targets = torch.cat([torch.nn.functional.pad(c.targets, (0, width - c.targets.shape[1]),
                                                     value=first.special.eos_id) for c in parts])
        target_lengths = cat("target_lengths")
    prompts = {c.shared_prompt_length for c in parts}
    bounds = [c.band_bound for c in parts if c.band_bound is not None]
    return Corruption(noisy_ids=cat("noisy_ids"), clean_ids=cat("clean_ids"), masked=cat("masked"), p=cat("p"),
                      prompt_lengths=cat("prompt_lengths"), canvas_lengths=cat("canvas_lengths"), targets=targets,
                      target_lengths=target_lengths, spec=first.spec, special=first.special,
                      band_bound=max(bounds) if bounds else None,
                      canvas_width=max(c.canvas_width for c in parts),
                      shared_prompt_length=prompts.pop() if len(prompts) == 1 else None,
                      rows=sum(c.rows for c in parts), tokens=sum(c.tokens for c in parts))


class SlackCTCLossModule(torch.nn.Module):
    """The loss module the recipe calls (``create_loss_fn``); it scores the strategy's current corruption."""

    def __init__(self, strategy: "SlackCTCStrategy"):
        super().__init__()
        self.strategy = strategy

    def forward(self, logits, target_ids=None, noise_mask=None, p_mask=None, loss_mask=None, loss_mask_ar=None,
                num_diffusion_tokens=None, num_ar_tokens=None, causal_logits=None, noisy_input_ids=None, **unused):
        corruption = self.strategy.current
        if corruption is None:
            raise RuntimeError("the slack_ctc loss ran before the strategy prepared its batch (prepare_batch)")
        if causal_logits is not None:
            raise ValueError("the model returned causal_logits (a hybrid diffusion + AR model): slack_ctc has no AR "
                             "term and would drop it; use that model's own dllm.mode")
        if noise_mask is not None and tuple(noise_mask.shape) != tuple(corruption.masked.shape):
            raise ValueError(f"`noise_mask` has shape {tuple(noise_mask.shape)} but the strategy's batch has "
                             f"{tuple(corruption.masked.shape)}")
        corruption = corruption.to(logits.device, non_blocking=True)
        tokens = corruption.tokens if num_diffusion_tokens is None else max(int(num_diffusion_tokens), 1)
        loss, _ = objective_loss(logits, corruption, denominators={"rows": float(corruption.rows),
                                                                    "tokens": float(tokens)})
        return DLLMLossOutput(total_loss=loss, dllm_loss=loss.detach().clone())


class SlackCTCStrategy:
    """A ``DLLMStrategy`` for slack-CTC (see the module docstring); :func:`register` makes it NeMo's subclass."""

    def __init__(self):
        self.spec: ObjectiveConfig | None = None
        self.dllm_cfg: Mapping | None = None
        self.special: SpecialIds | None = None
        self.padding_ids: set[int] = set()
        self.current: Corruption | None = None
        self._pending: list[Corruption] = []
        self._align = None

    # ---------------------------------------------------------------- DLLMStrategy interface
    @property
    def normalization_mode(self) -> str:
        return "supervised"

    @property
    def loss_log_key(self) -> str:
        return "dllm_loss"

    def create_loss_fn(self, dllm_cfg) -> torch.nn.Module:
        self.dllm_cfg = dllm_cfg
        self.spec = objective_from_dllm_config(dllm_cfg)
        return SlackCTCLossModule(self)

    def setup_extra(self, recipe) -> None:
        """Resolve the EOS and slack ids (mask: the recipe's); refuse what the canvas cannot do."""
        cfg = self.dllm_cfg or {}
        tokenizer = getattr(recipe, "tokenizer", None)
        if getattr(getattr(recipe, "distributed_config", None), "cp_size", 1) not in (None, 1):
            raise ValueError("slack_ctc needs whole rows (the CTC lattice runs over a row's canvas); set "
                             "distributed.cp_size: 1")
        eos = cfg.get("eos_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None) if eos is None else eos
        if eos is None:
            raise ValueError("slack_ctc needs the EOS id (the canvas is the answer and its EOS padding): the tokenizer "
                             "has none; set dllm.eos_token_id")
        slack = cfg.get("slack_token_id", None)
        if slack is None:
            token = cfg.get("slack_token", "<slack>")
            slack = tokenizer.get_vocab().get(token) if tokenizer is not None else None
            if slack is None:
                raise ValueError(f"the tokenizer has no {token!r} and dllm.slack_token_id is not set; the recipe has "
                                 f"sharded the model before this hook, so its embedding cannot grow now: add the token "
                                 f"to the checkpoint first (mdlm_ctc.mdlm.hf_trainer.add_slack_token, then "
                                 f"save_pretrained) or set dllm.slack_token_id to a reserved id (LLaDA: 126084)")
        vocab = getattr(getattr(recipe.model_parts[0], "config", None), "vocab_size", None) \
            if getattr(recipe, "model_parts", None) else None
        if vocab is not None and not 0 <= int(slack) < int(vocab):
            raise ValueError(f"`dllm.slack_token_id` {slack} is outside the model's vocabulary ({vocab} rows)")
        special = SpecialIds(mask_id=int(recipe.mask_token_id), eos_id=int(eos), slack_id=int(slack),
                             pad_id=getattr(tokenizer, "pad_token_id", None))
        if len({special.mask_id, special.eos_id, special.slack_id}) != 3:
            raise ValueError(f"mask ({special.mask_id}), EOS ({special.eos_id}) and slack ({special.slack_id}) must be "
                             f"three different tokens")
        self.special = special
        self.padding_ids = {special.eos_id} | ({special.pad_id} if special.pad_id is not None else set())

    def apply_corruption(self, input_ids, loss_mask, mask_token_id, *, eps, block_size=None, half_life_ratio=None,
                         generator=None):
        """The forward process of the rows of ``input_ids`` (the recipe passes one row and its generator)."""
        if self.spec is None or self.special is None:
            raise RuntimeError("create_loss_fn and setup_extra must run before apply_corruption")
        if block_size is not None:
            raise ValueError(f"slack_ctc does not do block diffusion; unset dllm.block_size (got {block_size})")
        if int(mask_token_id) != self.special.mask_id:
            raise ValueError(f"`mask_token_id` {mask_token_id} differs from the one resolved at setup "
                             f"({self.special.mask_id})")
        device = input_ids.device
        ids, supervised = input_ids.detach().cpu().long(), loss_mask.detach().cpu().bool()
        B, L = ids.shape
        canvas = supervised.sum(1)
        prompts = L - canvas
        answers = torch.empty(B, dtype=torch.long)
        for b in range(B):
            P = int(prompts[b])
            if not bool(supervised[b, P:].all()) or P >= L:
                raise ValueError(f"row {b}: slack_ctc needs one supervised suffix per row (the answer and its padding: "
                                 f"dllm.supervise_padding: true, single-turn data); loss_mask is "
                                 f"{supervised[b].int().tolist()}")
            tail = ids[b, P:].tolist()
            while tail and tail[-1] in self.padding_ids:
                tail.pop()
            if len(tail) == L - P and self.spec.objective != "ce" and self.spec.ctc_canvas == "slack":
                raise ValueError(f"row {b} has no EOS after its answer (the longest row of a batch is not padded); "
                                 f"ctc_canvas 'slack' needs one: pad the rows (e.g. dllm.pad_seq_len_divisible) or "
                                 f"use ctc_canvas 'eos'")
            answers[b] = min(len(tail), L - P - 1)  # eos canvas: a row without padding has no room for slack
        if generator is None:  # older recipes: from the global RNG, as NeMo's own corruption then does
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))
        if B == 1:
            generators = [generator]
        else:  # several rows at once: one generator per row, seeded from the given one
            seeds = torch.randint(0, 2 ** 62, (B,), generator=generator, device=generator.device).tolist()
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        batch = Batch(ids, prompts, answers, [0] * B)
        spec = self.spec if self.spec.mask_eps == float(eps) else dataclasses.replace(self.spec, mask_eps=float(eps))
        noise = draw_noise(batch, spec.mask_eps, generators=generators)
        part = corrupt(batch, spec, self.special, noise=noise, align=self._align)
        self._pending.append(part)
        return (part.noisy_ids.to(device), part.masked.to(device),
                part.p[:, None].expand(B, L).to(device=device, dtype=torch.float32))

    def pre_step(self, recipe, batches) -> tuple[int, int]:
        """Corrupt every micro-batch (through the recipe, so its per-row seeds are used) and stash the result."""
        self._align = _aligner(recipe) if self.spec is not None and self.spec.objective != "ce" \
            and self.spec.slack_insertion == "best" else None
        num_noise = num_supervised = 0
        for index, batch in enumerate(batches):
            self._pending = []
            kwargs = {"microbatch_idx": index} if "microbatch_idx" in _parameters(recipe._apply_corruption) else {}
            noisy, noise_mask, p_mask = recipe._apply_corruption(batch["input_ids"], batch["loss_mask"], **kwargs)
            corruption = _concat(self._pending)
            batch["_noisy_input_ids"] = noisy
            batch["_noise_mask"] = noise_mask
            batch["_p_mask"] = p_mask
            batch["_clean_input_ids"] = corruption.clean_ids.to(batch["input_ids"].device)
            batch[_STASH] = corruption
            num_noise += int(noise_mask.sum().item())
            num_supervised += int(batch["loss_mask"].sum().item())
        self._pending = []
        return num_noise, num_supervised

    def forward_backward(self, recipe, idx, batch, **kwargs) -> None:
        recipe._forward_backward_step(idx, batch, **kwargs)

    def prepare_batch(self, batch, noisy_input_ids, noise_mask, clean_input_ids):
        stashed = batch.pop(_STASH, None)
        if stashed is None:  # corrupted on the fly by the recipe (no pre_step): the rows just corrupted
            if not self._pending:
                raise RuntimeError("slack_ctc: no corruption for this batch (apply_corruption did not run)")
            stashed, self._pending = _concat(self._pending), []
        self.current = stashed
        batch["input_ids"] = noisy_input_ids
        batch.pop("attention_mask", None)  # bidirectional, and the EOS padding is canvas
        return batch


def _parameters(function) -> set:
    return set(inspect.signature(function).parameters)


def _aligner(recipe):
    """``align`` for ``slack_insertion: best``: the recipe's model on ids, without gradient."""
    model = recipe.model_parts[0]
    device = getattr(getattr(recipe, "dist_env", None), "device", None)

    def align(ids):
        with torch.no_grad():
            out = model(input_ids=ids.to(device) if device is not None else ids)
        return getattr(out, "logits", out)

    return align


def register(name: str = STRATEGY_NAME, registry: dict | None = None, base: type | None = None) -> type:
    """Register :class:`SlackCTCStrategy` as ``dllm.mode: <name>``; returns the registered class.

    Without ``registry`` it goes into NeMo's ``DLLM_STRATEGIES`` as a subclass of NeMo's ``DLLMStrategy``
    (``nemo-automodel`` must be importable).
    """
    if registry is None:
        try:
            from nemo_automodel.recipes.dllm import strategy as nemo_strategy
        except ImportError as err:
            raise ImportError(f"registering the slack_ctc strategy needs nemo-automodel (pip install "
                              f"nemo-automodel): {err}") from None
        registry, base = nemo_strategy.DLLM_STRATEGIES, nemo_strategy.DLLMStrategy
    bases = (SlackCTCStrategy,) if base is None else (SlackCTCStrategy, base)
    cls = type("SlackCTCStrategy", bases, {"__module__": __name__, "__doc__": SlackCTCStrategy.__doc__})
    registry[name] = cls
    return cls


def main() -> None:
    """``python -m mdlm_ctc.mdlm.nemo -c recipe.yaml [overrides]``: register, then run NeMo's dLLM recipe."""
    register()
    from nemo_automodel.recipes.dllm.train_ft import main as recipe_main

    recipe_main()


if __name__ == "__main__":
    main()
