"""Models: the embedded tiny bidirectional Llama, Hugging Face loading, special ids, model folders.

* **Embedded default.** ``LlamaForCausalLM(LlamaConfig(..., is_causal=False))``: a Llama with the
  causal mask removed (transformers >= 5 honours ``is_causal=False`` for every attention kernel),
  i.e. "LLaDA's architecture, tiny", randomly initialised from the run seed. No Hub access.
* **Any Hugging Face masked-diffusion LM** from a folder or id; the first of
  ``AutoModelForCausalLM``, ``AutoModelForMaskedLM``, ``AutoModel`` that loads is used, and the model
  must return ``.logits`` ``[B, L, V]``. **LLaDA** needs ``--trust-remote-code`` (opt-in, never the
  default): e.g. ``--model GSAI-ML/LLaDA-8B-Instruct --trust-remote-code``.
* **Special ids are read, never hard-coded**: the mask from the tokenizer's mask token, else the
  config's ``mask_token_id`` (LLaDA: 126336), else ``<|mdm_mask|>``; EOS from the tokenizer (LLaDA:
  126081) unless ``--eos-token`` names another. ``--mask-id`` / ``--eos-id`` give ids directly; a
  LLaDA config (``model_type`` llada) that names neither falls back to LLaDA's 126336 / 126081.
* **Remote code** (``--trust-remote-code``, LLaDA's path): ``AutoConfig`` / ``AutoModel*`` load the
  folder's own classes through its ``auto_map``, with the compatibility layer of ``remote_code``
  (LLaDA's and Dream's files were written for transformers 4.x; the files are never edited); LLaDA's
  ``base_model`` is a plain module that returns logits, so the fused head reads the final hidden
  states by letting the model's own forward call a pass-through in place of its LM-head module for
  that call (nothing vocabulary-sized is computed).
* **The answer's terminator** (``--answer-end``, default ``auto``): the token(s) the tokenizer's chat
  template closes an assistant turn with, when that is not EOS (LLaDA-8B-Instruct: ``<|eot_id|>``;
  Qwen/Dream: ``<|im_end|>`` and its newline). The training canvas is then the answer, the terminator
  and EOS padding, with ``--wrap-chat`` and without (what SFT on LLaDA's chat format with EOS padding
  gives, and what its chat loop expects the model to write), and the sampler's answer stops at the
  terminator or EOS, whichever comes first. Templates without one (the embedded model's) leave the canvas answer + EOS.
* **`<slack>`** (``--slack-token``). If the vocabulary has it, it is used as is. Otherwise it is added
  to the tokenizer as a special token. Its id is the tokenizer's next id; when that id is beyond the
  embedding matrix the embeddings are resized (``resize_token_embeddings``), and when it falls into a
  spare row that the checkpoint already has (LLaDA pads its 126,464-row embedding beyond the
  tokenizer), that row is reused. After a resize every vocabulary-size field of the config
  (``vocab_size``, LLaDA's ``embedding_size``, padded sizes) is set to the new row count, so the saved
  folder reloads. Either way the slack row of the input embedding and of the output
  head is set to the mean of the rows in use (what transformers' ``mean_resizing`` does), so the
  initialisation is deterministic and identical for the CE baseline and the CTC run. Alternatively,
  name a reserved token the model already has with ``--slack-token``, or reuse a reserved id with
  ``--slack-id`` (LLaDA: 126084, as VoidPadding does): no token is added, the embedding keeps its size
  and the row is used as it is.
* **LM head access** (for the fused CTC path): exposed only when the model has a plain linear output
  layer (``get_output_embeddings``) on top of ``base_model``'s last hidden state, and no final-logit
  scaling or soft-capping; otherwise the loss uses logits.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .remote_code import load_remote_model, needs_own_code, remote_class_reference

META_FILE = "mdlm_ctc.json"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class SpecialIds:
    mask_id: int
    eos_id: int
    slack_id: int
    pad_id: int | None = None
    answer_end: list[int] = field(default_factory=list)  # between the answer and its EOS padding

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Where a sampled answer ends: EOS, or the first token of the answer's terminator."""
        return (self.eos_id, *self.answer_end[:1])


# ------------------------------------------------------------------------------ device and precision
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`device` is {name!r} but CUDA is not available on this machine; use 'cpu' or 'auto'")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CUDA (precision 'auto' or 'bf16'); nothing on CPU."""
    import contextlib

    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("`precision` 'bf16' needs a CUDA device; use 'auto' or 'fp32' on CPU")
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------ building and loading
def build_embedded_model(cfg, vocab_size: int, max_positions: int, seed: int):
    """The tiny bidirectional Llama, randomly initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.tiny_hidden_size, intermediate_size=m.tiny_intermediate_size,
        num_hidden_layers=m.tiny_layers, num_attention_heads=m.tiny_heads, num_key_value_heads=m.tiny_kv_heads,
        max_position_embeddings=max(max_positions, 64), is_causal=False, tie_word_embeddings=False,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=None, eos_token_id=1,
    )
    config._attn_implementation = m.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _load_dtype(cfg, device):
    if cfg.model.load_dtype == "float32":
        return torch.float32
    if cfg.model.load_dtype == "bfloat16":
        return torch.bfloat16
    return torch.float32 if device.type == "cpu" else "auto"


def auto_config(path: str, cfg):
    """``AutoConfig`` of ``path``; a clear error when it needs its own code and ``--trust-remote-code`` is off."""
    from transformers import AutoConfig, PretrainedConfig

    if not cfg.model.trust_remote_code:
        try:
            raw, _ = PretrainedConfig.get_config_dict(path)
        except OSError:
            raw = {}  # AutoConfig below says what is wrong with the path
        if needs_own_code(raw):
            raise ValueError(f"`model` {path!r} needs its own code (model_type {raw.get('model_type')!r}); pass "
                             f"--trust-remote-code to allow it")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ValueError(f"`model` {path!r} needs its own code; pass --trust-remote-code to allow it") from None
        raise


_SHIMS_REPORTED: set = set()  # model classes whose shims were reported (once per process)


def load_pretrained(path: str, cfg, device: torch.device):
    """A Hugging Face model from a folder or id (see the module docstring for the class order)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    trust = cfg.model.trust_remote_code
    config = auto_config(path, cfg)
    if getattr(config, "is_causal", None) is True:
        warnings.warn(f"{path}: config.is_causal is True; a masked diffusion LM must attend both ways "
                      f"(set is_causal=False in its config)", stacklevel=2)
    if trust and remote_class_reference(config) is not None:
        model, shims = load_remote_model(path, config, dtype=_load_dtype(cfg, device))
        if shims and type(model) not in _SHIMS_REPORTED and os.environ.get("RANK", "0") == "0":
            import transformers

            _SHIMS_REPORTED.add(type(model))
            print(f"note: {path}: its own code loaded under transformers {transformers.__version__} with mdlm-ctc's "
                  f"compatibility shims: {', '.join(shims)} (mdlm_ctc/mdlm/remote_code.py)")
        return model
    kwargs = dict(trust_remote_code=trust, dtype=_load_dtype(cfg, device))
    if not trust:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    errors = []
    for auto in (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModel):
        try:
            return auto.from_pretrained(path, **kwargs)
        except (ValueError, KeyError) as err:  # this Auto class has no mapping for the config
            errors.append(f"{auto.__name__}: {err}")
    raise ValueError(f"`model` {path!r} could not be loaded as a masked LM:\n  " + "\n  ".join(errors))


def load_tokenizer(path: str, cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    tok.padding_side = "right"
    return tok


# ------------------------------------------------------------------------------ special ids
def _token_id(tokenizer, token: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def _mean_init_row(model, row: int, n_rows_in_use: int) -> None:
    """Set the input-embedding row (and the output-head row, if untied) to the mean of the used rows."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[row] = emb[:n_rows_in_use].float().mean(0).to(emb.dtype)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[row] = out.weight[:n_rows_in_use].float().mean(0).to(out.weight.dtype)
            if getattr(out, "bias", None) is not None:
                out.bias[row] = out.bias[:n_rows_in_use].float().mean(0).to(out.bias.dtype)


#: config fields that give a vocabulary / embedding size (LLaDA keeps ``embedding_size`` beside ``vocab_size``)
VOCAB_SIZE_FIELDS = ("vocab_size", "embedding_size", "padded_vocab_size", "vocab_size_padded", "n_vocab")


def sync_vocabulary_sizes(model, rows: int) -> list[str]:
    """After a resize to ``rows`` embedding rows: raise every vocabulary-size field below ``rows`` to it.

    Covers the model's config, its text sub-config and any config object a submodule keeps (LLaDA's
    inner model holds its own copy), so that the saved ``config.json`` describes the saved weights and
    the folder reloads (LLaDA refuses ``embedding_size < vocab_size``). Returns the fields changed.
    """
    configs, changed = [], []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        for candidate in (config, getattr(config, "get_text_config", lambda: None)()):
            if candidate is not None and all(candidate is not c for c in configs):
                configs.append(candidate)
    for config in configs:
        for name in VOCAB_SIZE_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value < rows:
                setattr(config, name, rows)
                changed.append(name)
    return changed


def ensure_slack_token(model, tokenizer, slack_token: str) -> tuple[int, bool]:
    """The slack id; adds the token (and an embedding row) when the vocabulary lacks it.

    Returns ``(slack_id, added)``.
    """
    existing = _token_id(tokenizer, slack_token)
    if existing is not None:
        return existing, False
    n_before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [slack_token]}, replace_extra_special_tokens=False)
    slack_id = _token_id(tokenizer, slack_token)
    try:
        rows = model.get_input_embeddings().weight.shape[0]
        if slack_id >= rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            sync_vocabulary_sizes(model, model.get_input_embeddings().weight.shape[0])
        _mean_init_row(model, slack_id, min(n_before, rows))
    except (NotImplementedError, AttributeError) as err:
        raise ValueError(
            f"the vocabulary has no {slack_token!r} and this model's embeddings cannot be resized ({err}); "
            f"pass --slack-token with a reserved token the model already has") from None
    return slack_id, True


LLADA_MASK_ID = 126336   # LLaDA's <|mdm_mask|>
LLADA_EOS_ID = 126081    # LLaDA's <|endoftext|> / EOS


def _is_llada(config) -> bool:
    return "llada" in str(getattr(config, "model_type", "")).lower()


def resolve_special_ids(model, tokenizer, cfg, hf_config=None) -> SpecialIds:
    """Mask, EOS and slack ids (see the module docstring); adds ``<slack>`` when missing.

    Ids given as options (``mask_id``, ``eos_id``, ``slack_id``) win; LLaDA configs default to LLaDA's
    mask and EOS ids. ``slack_id`` reuses a reserved row of the vocabulary as it is (no token added, no
    embedding resized). With ``model=None`` only the tokenizer gets the slack token (and the ids are what
    loading the model later gives): used to prepare a job without loading a large model twice.
    """
    m = cfg.model
    config = hf_config if hf_config is not None else getattr(model, "config", None)
    if m.mask_id is not None:
        mask_id = m.mask_id
    elif m.mask_token is not None:
        mask_id = _token_id(tokenizer, m.mask_token)
        if mask_id is None:
            raise ValueError(f"`mask_token` {m.mask_token!r} is not in the tokenizer's vocabulary")
    elif tokenizer.mask_token_id is not None:
        mask_id = tokenizer.mask_token_id
    elif getattr(config, "mask_token_id", None) is not None:
        mask_id = int(config.mask_token_id)
    elif _token_id(tokenizer, "<|mdm_mask|>") is not None:
        mask_id = _token_id(tokenizer, "<|mdm_mask|>")
    elif _is_llada(config):
        mask_id = LLADA_MASK_ID
    else:
        raise ValueError("no mask token found (tokenizer mask token, config.mask_token_id, '<|mdm_mask|>'); "
                         "pass --mask-token or --mask-id")
    if m.eos_id is not None:
        eos_id = m.eos_id
    elif m.eos_token is not None:
        eos_id = _token_id(tokenizer, m.eos_token)
        if eos_id is None:
            raise ValueError(f"`eos_token` {m.eos_token!r} is not in the tokenizer's vocabulary")
    elif tokenizer.eos_token_id is not None:
        eos_id = tokenizer.eos_token_id
    elif _is_llada(config):
        eos_id = LLADA_EOS_ID
    else:
        raise ValueError("the tokenizer has no EOS token; pass --eos-token or --eos-id")
    if m.slack_id is not None:
        slack_id = m.slack_id
        rows = model.get_input_embeddings().weight.shape[0] if model is not None else getattr(
            config, "embedding_size", None) or getattr(config, "vocab_size", None)
        if rows is not None and slack_id >= rows:
            raise ValueError(f"`slack_id` {slack_id} is outside the embedding matrix ({rows} rows)")
    elif model is not None:
        slack_id, _ = ensure_slack_token(model, tokenizer, m.slack_token)
    else:
        if _token_id(tokenizer, m.slack_token) is None:
            tokenizer.add_special_tokens({"additional_special_tokens": [m.slack_token]},
                                         replace_extra_special_tokens=False)
        slack_id = _token_id(tokenizer, m.slack_token)
    if len({mask_id, eos_id, slack_id}) != 3:
        raise ValueError(f"mask ({mask_id}), EOS ({eos_id}) and slack ({slack_id}) must be three different tokens")
    answer_end = resolve_answer_end(tokenizer, m.answer_end, eos_id)
    if set(answer_end) & {mask_id, slack_id}:
        raise ValueError(f"`answer_end` {m.answer_end!r} gives ids {answer_end}, which include the mask ({mask_id}) "
                         f"or slack ({slack_id}) token")
    return SpecialIds(mask_id=int(mask_id), eos_id=int(eos_id), slack_id=int(slack_id),
                      pad_id=tokenizer.pad_token_id, answer_end=[int(i) for i in answer_end])


_ANSWER_PROBE = "mdlmctcanswerprobe"  # stands for an assistant answer when the chat template is rendered


def chat_template_answer_end(tokenizer, eos_id: int) -> list[int]:
    """The token(s) the chat template closes an assistant turn with, unless that is EOS.

    Renders ``[user, assistant]`` with a probe answer and reads the text after it: its tokens up to and
    including the first special token (LLaDA-8B-Instruct: ``<|eot_id|>``, after which its template always
    opens the next assistant header), plus the whitespace tokens that follow it (Qwen/Dream:
    ``<|im_end|>`` and ``\\n``). Nothing when the tokenizer has no template, the template cannot render a
    two-turn chat, the turn ends without a special token (the embedded model's ``role : content``), or
    it ends with EOS (the EOS padding already ends the answer).
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _ANSWER_PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001  (a template may insist on other roles; then there is nothing to read)
        return []
    if not isinstance(text, str) or _ANSWER_PROBE not in text:
        return []
    tail = list(tokenizer(text.split(_ANSWER_PROBE, 1)[1], add_special_tokens=False)["input_ids"])
    special = {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    special |= set(getattr(tokenizer, "all_special_ids", []))
    first = next((k for k, i in enumerate(tail) if i in special), None)
    if first is None or tail[first] == eos_id:
        return []
    end = first + 1
    while end < len(tail) and tail[end] not in special and not tokenizer.decode([tail[end]]).strip():
        end += 1
    return tail[:end]


def resolve_answer_end(tokenizer, setting: str, eos_id: int) -> list[int]:
    """Ids of ``--answer-end``: 'auto' (:func:`chat_template_answer_end`), 'none', or a token of the vocabulary."""
    if setting == "none":
        return []
    if setting == "auto":
        return chat_template_answer_end(tokenizer, eos_id)
    token_id = _token_id(tokenizer, setting)
    if token_id is None:
        raise ValueError(f"`answer_end` {setting!r} is not a token of the tokenizer's vocabulary (use 'auto', "
                         f"'none' or a token such as '<|eot_id|>')")
    return [] if token_id == eos_id else [token_id]


def prepare_tokenizer(path: str, cfg) -> tuple[object, SpecialIds]:
    """Tokenizer and special ids of a model folder/id without loading its weights."""
    meta = read_meta(path) if os.path.isdir(path) else {}
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, cfg)
    if "special_ids" in meta:
        return tokenizer, SpecialIds(**meta["special_ids"])
    return tokenizer, resolve_special_ids(None, tokenizer, cfg, hf_config=auto_config(path, cfg))


# ------------------------------------------------------------------------------ forward helpers
class LMHead:
    """A model's linear output layer, read at each use.

    ``weight`` and ``bias`` are looked up on the module every time they are read, never cached: under
    FSDP2 the module's parameter is a sharded ``DTensor`` between steps and the all-gathered full tensor
    during forward/backward (see ``distributed``), and under LoRA with a trainable slack row the head
    is peft's ``TrainableTokensWrapper`` whose effective weight is the base weight with the trained rows
    substituted (``get_merged_weights``).
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def _tokens(self):
        adapter = getattr(self.module, "token_adapter", None)
        return adapter if adapter is not None and not adapter.merged and not adapter.disable_adapters else None

    @property
    def linear(self) -> torch.nn.Linear:
        adapter = getattr(self.module, "token_adapter", None)
        return adapter.base_layer if adapter is not None else self.module

    @property
    def weight(self) -> torch.Tensor:
        tokens = self._tokens
        return tokens.get_merged_weights(tokens.active_adapters) if tokens is not None else self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


def lm_head_of(model) -> LMHead | None:
    """The plain linear LM head of ``model``, or ``None`` when it is not safely exposed."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if any(getattr(config, attr, None) not in (None, 1.0, 0.0, False)
           for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "scale_logits")):
        return None
    try:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    lm_head = LMHead(head)
    return lm_head if isinstance(lm_head.linear, torch.nn.Linear) else None


def unwrap(model):
    """The Hugging Face model inside a :class:`DiffusionLM` and/or DDP wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, DiffusionLM):
        model = model.hf
    return model


def predicts_next_position(config) -> bool:
    """Dream keeps the head of the autoregressive model it starts from: the output at position ``i``
    predicts the token at ``i + 1``, and its sampler shifts the logits right by one position."""
    return str(getattr(config, "model_type", "")).lower() == "dream"


class DiffusionLM(torch.nn.Module):
    """Thin wrapper so that one (DDP-wrappable) forward returns logits or last hidden states.

    Position ``i`` of the output always predicts the token at position ``i``: for a model whose head
    predicts the next position (:func:`predicts_next_position`, Dream) the outputs are shifted right by
    one as its own sampler does (position 0 keeps its own output), for logits and hidden states alike
    (the head is applied per position, so the fused head sees the same alignment).
    """

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        self.shift = predicts_next_position(getattr(hf_model, "config", None))

    def forward(self, input_ids: torch.Tensor, want: str = "logits") -> torch.Tensor:
        out = self._forward(input_ids, want)
        return torch.cat([out[:, :1], out[:, :-1]], dim=1) if self.shift else out

    def _forward(self, input_ids: torch.Tensor, want: str) -> torch.Tensor:
        if want == "hidden":
            from transformers import PreTrainedModel

            if isinstance(self.hf.base_model, PreTrainedModel) and self.hf.base_model is not self.hf:
                out = self.hf.base_model(input_ids=input_ids)
                if hasattr(out, "last_hidden_state"):
                    return out.last_hidden_state
            return _hidden_by_head_bypass(self.hf, input_ids)
        return self.hf(input_ids=input_ids).logits


class _PassThrough(torch.nn.Module):
    """Stands in for the LM head for one forward: returns its input (the final hidden states)."""

    def __init__(self):
        super().__init__()
        self.called = False

    def forward(self, x, *args, **kwargs):
        self.called = True
        return x


def _hidden_by_head_bypass(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    """The LM head's input, from the model's own forward with the head module swapped out for one call.

    For models whose ``base_model`` is not a transformers model that returns ``last_hidden_state``
    (LLaDA's ``LLaDAModel`` returns logits): nothing vocabulary-sized is computed.
    """
    head = hf_model.get_output_embeddings()
    parent, attr = next(((mod, name) for mod in hf_model.modules() for name, child in mod.named_children()
                         if child is head), (None, None))
    if parent is None or head is hf_model.get_input_embeddings():
        raise ValueError("this model computes its logits without a separate LM-head module (tied embeddings); "
                         "use --fused-lm-head off")
    stand_in = _PassThrough()
    setattr(parent, attr, stand_in)
    try:
        out = hf_model(input_ids=input_ids)
    finally:
        setattr(parent, attr, head)
    if not stand_in.called:
        raise ValueError("this model does not call its LM-head module in forward; use --fused-lm-head off")
    return out.logits


# ------------------------------------------------------------------------------ model folders
def save_model_dir(model, tokenizer, special: SpecialIds, path: str, extra: dict | None = None,
                   state_dict: dict | None = None) -> None:
    """``save_pretrained`` (safetensors) + tokenizer + ``mdlm_ctc.json`` (special ids), written atomically.

    ``state_dict``: the weights to write instead of the model's own (the consolidated weights of an
    FSDP-sharded model).
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump({"special_ids": special.to_dict(), **(extra or {})}, f, indent=1)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def read_meta(path: str) -> dict:
    meta = os.path.join(path, META_FILE)
    if not os.path.exists(meta):
        return {}
    with open(meta) as f:
        return json.load(f)


def is_adapter_dir(path: str) -> bool:
    """A peft adapter folder (``final/`` of a ``--lora`` run)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_adapted(path: str, cfg, device: torch.device, *, merge: bool = True):
    """(model, tokenizer, special ids) of an adapter folder: its base with the adapter (merged by default)."""
    from peft import PeftModel

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


def load_model_dir(path: str, cfg, device: torch.device):
    """(model, tokenizer, special ids) from a folder written by :func:`save_model_dir` (or any HF folder).

    A LoRA adapter folder (``final/`` of a ``--lora`` run) is loaded onto its base and merged.
    """
    if os.path.isdir(path) and is_adapter_dir(path):
        return load_adapted(path, cfg, device)
    if not os.path.isdir(path) and not cfg.model.trust_remote_code and os.path.sep in path:
        raise ValueError(f"model folder not found: {path!r}")
    model = load_pretrained(path, cfg, device)
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, cfg)
    meta = read_meta(path) if os.path.isdir(path) else {}
    if "special_ids" in meta:
        special = SpecialIds(**meta["special_ids"])
    else:
        special = resolve_special_ids(model, tokenizer, cfg)
    return model.to(device), tokenizer, special
