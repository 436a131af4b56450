"""LoRA fine-tuning through ``peft`` (``--lora``), the trainable ``<slack>`` row, adapter folders, merging.

* **Targets, by full module path.** ``lora_target_modules`` names linear layers; each entry is a full
  module path (``model.transformer.blocks.0.ff_out``) or its trailing part (``ff_out``, ``mlp.down_proj``),
  matched on whole path components, or ``all-linear``. :func:`resolve_lora_targets` turns the entries into
  the explicit list of full paths handed to peft (which then cannot match anything else; the adapted
  model is checked against the list). The LM head is the module ``get_output_embeddings()`` returns,
  never a name: an entry that matches the head *and* other layers adapts the other layers only (LLaDA's
  ``ff_out`` is both its head and every block's MLP output: README's LLaDA list adapts the blocks), and
  an entry that names the head alone is refused, since the head's ``<slack>`` row trains as a trainable
  token and peft cannot do both on one layer. An entry that matches nothing is refused. ``plan`` sizes
  the same resolution on the layers the config implies (``plan.ModelShape.linear_layers``), so its count
  is peft's.
* **Adapters**: ``peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
  target_modules=<the resolved paths>)`` injected with ``get_peft_model``; the base weights are frozen.
  The loop keeps training the Hugging Face model itself (peft replaces the targeted ``nn.Linear``
  modules in place), so the forward, the fused LM head and FSDP2 see the same model as without LoRA.
* **The slack row trains.** ``<slack>`` is a token the base model never saw, so its input-embedding row
  (and its LM-head row when the head is not tied to the embeddings) must learn. We use peft's
  trainable-token support (``trainable_token_indices``, keyed by the two modules' full paths): each of
  the two layers gets a ``TrainableTokensWrapper`` holding a trainable copy of the slack row only
  (``hidden_size`` numbers with their AdamW state, not the whole ``vocab x hidden`` matrix); the forward
  substitutes it into the frozen weight, and merging writes it back. With tied embeddings the
  embedding's row is the only one. The fused LM-head loss reads the substituted weight (``model.LMHead``).
* **Init**: the adapters are drawn from the run seed, identically on every process.
* **Folders**: ``final/`` of a LoRA run is the adapter (``adapter_config.json``,
  ``adapter_model.safetensors``) + tokenizer + ``mdlm_ctc.json`` naming the base;
  ``model.load_adapted`` (used by ``eval``/``sample`` through ``model.load_model_dir``) loads the base
  and the adapter and merges them; ``mdlm-ctc merge`` writes the merged full model
  (``save_pretrained``), whose outputs equal the adapted model's.

Dependencies run one way: this module uses ``model`` (folders, loading); ``model`` never imports it.
"""

from __future__ import annotations

import os

import torch

from .model import ADAPTER_CONFIG, META_FILE, is_adapter_dir, load_adapted, read_meta, save_model_dir  # noqa: F401


def module_path(hf_model, module) -> str:
    """The full path of ``module`` inside ``hf_model`` (by identity)."""
    for name, candidate in hf_model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"cannot find {type(module).__name__} in {type(hf_model).__name__}")


def target_module_list(text: str) -> list[str] | str:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError(f"`lora_target_modules` must name at least one module (or 'all-linear'); got {text!r}")
    return "all-linear" if names == ["all-linear"] else names


def linear_layers(hf_model) -> dict[str, tuple[int, int]]:
    """``{full path: (in_features, out_features)}`` of every ``nn.Linear`` of ``hf_model``, in module order."""
    return {name: (m.in_features, m.out_features) for name, m in hf_model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def head_path(hf_model) -> str | None:
    """Full path of the LM head (``get_output_embeddings()``), or ``None`` when it is the input embedding."""
    head, embedding = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    tied = head is embedding or (head is not None and getattr(head, "weight", None) is embedding.weight)
    return None if head is None or tied else module_path(hf_model, head)


def resolve_lora_targets(spec: str, layers: dict, head: str | None, owner: str) -> tuple[list[str], list[str]]:
    """The full paths ``spec`` (``lora_target_modules``) adapts among ``layers``, and notes for the log.

    See the module docstring for the rules. ``layers`` maps full paths of the linear layers to their
    shapes (:func:`linear_layers`, or the plan's from a config); ``head`` is the LM head's path.
    """
    names = target_module_list(spec)
    if names == "all-linear":
        return [p for p in layers if p != head], []
    chosen, notes = set(), []
    for name in names:
        matched = [p for p in layers if p == name or p.endswith("." + name)]
        if not matched:
            leaves = sorted({p.rsplit(".", 1)[-1] for p in layers})
            raise ValueError(f"`lora_target_modules` entry {name!r} matches no linear layer of {owner} (its linear "
                             f"layers are named {', '.join(leaves)})")
        if head in matched:
            if len(matched) == 1:
                raise ValueError(f"`lora_target_modules` entry {name!r} would put LoRA on the LM head ({head}), "
                                 f"whose <slack> row trains as a trainable token: peft cannot do both on one "
                                 f"layer; leave the head out")
            matched.remove(head)
            notes.append(f"{name!r} also names the LM head ({head}); the head is not adapted (its <slack> row "
                         f"trains instead)")
        chosen.update(matched)
    return [p for p in layers if p in chosen], notes


def slack_token_indices(hf_model, slack_id: int) -> dict[str, list[int]]:
    """``trainable_token_indices`` for peft, by full path: the slack row of the input embedding, and of the
    LM head when it is not tied to the embedding."""
    indices = {module_path(hf_model, hf_model.get_input_embeddings()): [slack_id]}
    head = head_path(hf_model)
    if head is not None:
        indices[head] = [slack_id]
    return indices


def apply_lora(hf_model, cfg, slack_id: int, log=None):
    """Inject LoRA adapters (and the trainable slack row) into ``hf_model`` in place; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import TrainableTokensWrapper

    t = cfg.train
    targets, notes = resolve_lora_targets(t.lora_target_modules, linear_layers(hf_model), head_path(hf_model),
                                          type(hf_model).__name__)
    tokens = slack_token_indices(hf_model, slack_id)
    for note in notes if log is not None else ():
        log(f"note: lora_target_modules: {note}")
    config = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                        target_modules=targets, bias="none", trainable_token_indices=tokens)
    # LoRA's A matrices are drawn at random: from the run seed, so that every process of a job (and every
    # run of it) starts from the same adapter, and the global RNG stream is left untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        peft_model = get_peft_model(hf_model, config)
    # peft matches names by suffix; the paths given are full, and this checks that nothing else was caught
    adapted = [n for n, m in hf_model.named_modules() if isinstance(m, LoraLayer)]
    wrapped = sorted(n for n, m in hf_model.named_modules() if isinstance(m, TrainableTokensWrapper))
    if sorted(adapted) != sorted(targets) or wrapped != sorted(tokens):
        raise ValueError(f"peft adapted other modules than the ones resolved (LoRA on {adapted[:4]}..., trainable "
                         f"tokens on {wrapped}; expected {targets[:4]}..., {sorted(tokens)}); name the layers by "
                         f"full path in --lora-target-modules")
    return peft_model


def trainable_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """The trainable tensors of an adapted model (what a LoRA checkpoint must hold), under the names
    ``load_state_dict`` takes: those of ``state_dict``, from which an activation-checkpoint wrapper
    (``--gradient-checkpointing`` on a model without transformers' switch, LLaDA's) strips its prefix."""
    trainable = {id(p) for p in hf_model.parameters() if p.requires_grad}
    return {name: t.detach() for name, t in hf_model.state_dict(keep_vars=True).items() if id(t) in trainable}


def save_adapter(peft_model, tokenizer, special, path: str, base: str, extra: dict | None = None,
                 state_dict: dict | None = None) -> None:
    """The adapter folder (peft layout) + tokenizer + ``mdlm_ctc.json`` (special ids, ``lora_base``)."""
    import json
    import shutil

    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(tmp, state_dict=state_dict)
    from safetensors import safe_open

    with safe_open(os.path.join(tmp, "adapter_model.safetensors"), "pt") as f:
        saved = len(list(f.keys()))
    trainable = sum(1 for p in peft_model.parameters() if p.requires_grad)
    if saved != trainable:  # peft finds adapters by module name; never write an adapter that lost some
        raise RuntimeError(f"peft saved {saved} adapter tensors of the {trainable} trainable ones to {tmp}")
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump({"special_ids": special.to_dict(), "lora_base": base, **(extra or {})}, f, indent=1)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def merge_to_full_model(adapter_dir: str, out_dir: str, cfg) -> None:
    """``mdlm-ctc merge``: the base with the adapter folded in, written as a full model folder."""
    if not is_adapter_dir(adapter_dir):
        raise ValueError(f"`checkpoint` {adapter_dir!r} is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    model, tokenizer, special = load_adapted(adapter_dir, cfg, torch.device("cpu"), merge=True)
    extra = {k: v for k, v in read_meta(adapter_dir).items() if k not in ("special_ids", "lora_base")}
    save_model_dir(model, tokenizer, special, out_dir, {**extra, "merged_from": adapter_dir})
