"""LoRA fine-tuning through ``peft`` (``--lora``), the trainable ``<slack>`` row, adapter folders, merging.

* **Adapters**: ``peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
  target_modules=lora_target_modules)`` injected with ``get_peft_model``; the base weights are frozen.
  The loop keeps training the Hugging Face model itself (peft replaces the targeted ``nn.Linear``
  modules in place), so the forward, the fused LM head and FSDP2 see the same model as without LoRA.
* **The slack row trains.** ``<slack>`` is a token the base model never saw, so its input-embedding row
  (and its LM-head row when the head is not tied to the embeddings) must learn. We use peft's
  trainable-token support (``trainable_token_indices``): each of the two layers gets a
  ``TrainableTokensWrapper`` holding a trainable copy of the slack row only (``hidden_size`` numbers
  with their AdamW state, not the whole ``vocab x hidden`` matrix); the forward substitutes it into the
  frozen weight, and merging writes it back. With tied embeddings the embedding's row is the only one.
  The fused LM-head loss reads the substituted weight (``model.LMHead``).
* **Init**: the adapters are drawn from the run seed, identically on every process.
* **Folders**: ``final/`` of a LoRA run is the adapter (``adapter_config.json``,
  ``adapter_model.safetensors``) + tokenizer + ``mdlm_ctc.json`` naming the base;
  :func:`load_adapted` (used by ``eval``/``sample`` through ``model.load_model_dir``) loads the base
  and the adapter and merges them; ``mdlm-ctc merge`` writes the merged full model
  (``save_pretrained``), whose outputs equal the adapted model's.
"""

from __future__ import annotations

import os

import torch

ADAPTER_CONFIG = "adapter_config.json"


def _module_name(hf_model, module) -> str:
    for name, candidate in hf_model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError(f"cannot find {type(module).__name__} in {type(hf_model).__name__}")


def target_module_list(text: str) -> list[str] | str:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError(f"`lora_target_modules` must name at least one module (or 'all-linear'); got {text!r}")
    return "all-linear" if names == ["all-linear"] else names


def slack_token_indices(hf_model, slack_id: int) -> dict[str, list[int]]:
    """``trainable_token_indices`` for peft: the slack row of the input embedding, and of the head if untied."""
    emb = hf_model.get_input_embeddings()
    indices = {_module_name(hf_model, emb): [slack_id]}
    head = hf_model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is not None and head.weight is emb.weight
    if head is not None and not tied:
        indices[_module_name(hf_model, head)] = [slack_id]
    return indices


def apply_lora(hf_model, cfg, slack_id: int):
    """Inject LoRA adapters (and the trainable slack row) into ``hf_model`` in place; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    t = cfg.train
    targets = target_module_list(t.lora_target_modules)
    present = {name.rsplit(".", 1)[-1] for name, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)}
    if targets != "all-linear" and not set(targets) & present:
        raise ValueError(f"`lora_target_modules` {t.lora_target_modules!r} matches no linear layer of "
                         f"{type(hf_model).__name__} (it has {', '.join(sorted(present))})")
    config = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                        target_modules=targets, bias="none",
                        trainable_token_indices=slack_token_indices(hf_model, slack_id))
    # LoRA's A matrices are drawn at random: from the run seed, so that every process of a job (and every
    # run of it) starts from the same adapter, and the global RNG stream is left untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return get_peft_model(hf_model, config)


def trainable_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """The trainable tensors of an adapted model (what a LoRA checkpoint must hold)."""
    return {name: p.detach() for name, p in hf_model.named_parameters() if p.requires_grad}


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def save_adapter(peft_model, tokenizer, special, path: str, base: str, extra: dict | None = None,
                 state_dict: dict | None = None) -> None:
    """The adapter folder (peft layout) + tokenizer + ``mdlm_ctc.json`` (special ids, ``lora_base``)."""
    import json
    import shutil

    from .model import META_FILE

    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump({"special_ids": special.to_dict(), "lora_base": base, **(extra or {})}, f, indent=1)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_adapted(path: str, cfg, device: torch.device, *, merge: bool = True):
    """(model, tokenizer, special ids) of an adapter folder: its base with the adapter (merged by default)."""
    from peft import PeftModel

    from .model import load_model_dir, load_tokenizer, read_meta

    meta = read_meta(path)
    base_path = meta.get("lora_base")
    if base_path is None:
        raise ValueError(f"{path} is an adapter folder without `lora_base` in its mdlm_ctc.json; cannot find "
                         f"its base model")
    base, _, special = load_model_dir(base_path, cfg, device)
    model = PeftModel.from_pretrained(base, path)
    model = model.merge_and_unload() if merge else model
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, cfg)
    return model.to(device), tokenizer, special


def merge_to_full_model(adapter_dir: str, out_dir: str, cfg) -> None:
    """``mdlm-ctc merge``: the base with the adapter folded in, written as a full model folder."""
    from .model import read_meta, save_model_dir

    if not is_adapter_dir(adapter_dir):
        raise ValueError(f"`checkpoint` {adapter_dir!r} is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    model, tokenizer, special = load_adapted(adapter_dir, cfg, torch.device("cpu"), merge=True)
    extra = {k: v for k, v in read_meta(adapter_dir).items() if k not in ("special_ids", "lora_base")}
    save_model_dir(model, tokenizer, special, out_dir, {**extra, "merged_from": adapter_dir})
