"""A stand-in for LLaDA-8B-Instruct's Hub folder, for CI (no network reaches the real one).

Written for mdlm-ctc's tests from a description of the traits of LLaDA's published code that break a
loop built on transformers 5, not from LLaDA's files. The folder has what the real one has: a
``configuration_llada.py`` / ``modeling_llada.py`` pair reached through ``auto_map``, a ``config.json``,
a tokenizer with LLaDA's special tokens and chat-template format, and safetensors weights. Its code
reproduces, on purpose:

* ``LLaDAModelLM.__init__`` never calls ``post_init()``;
* ``tie_weights(self)`` takes no keyword arguments;
* the config passes ``use_cache`` to ``PretrainedConfig.__init__`` (which transformers 5 drops) and the
  forward reads ``self.config.use_cache``; ``return_dict`` falls back to ``config.use_return_dict``;
* ``ff_out`` is both the LM head (``model.transformer.ff_out``) and every block's MLP output
  (``model.transformer.blocks.N.ff_out``);
* ``embedding_size`` (rows of the embedding and head) is a field of its own beside ``vocab_size``; the
  inner model copies the config at build time and refuses ``embedding_size < vocab_size`` with LLaDA's
  message; the tokenizer has fewer tokens than rows (spare rows), unless ``fill_rows``;
* untied embeddings (``weight_tying`` false; the head is ``wte`` when true);
* ``base_model`` (``self.model``) is a plain ``nn.Module`` that returns logits, never hidden states;
* no mask token in the tokenizer (the config's ``mask_token_id`` names it), EOS ``<|endoftext|>`` as the
  pad token, and a chat template that closes every turn with ``<|eot_id|>`` and always ends with the
  assistant header (it has no ``add_generation_prompt`` switch);
* the config class registers itself as model type ``llada`` and the model with ``AutoModel``.
"""

from __future__ import annotations

import json
import os

CONFIGURATION = '''
"""LLaDA-like configuration (mdlm-ctc test stand-in)."""
from transformers import AutoConfig, PretrainedConfig

DEFAULTS = dict(d_model=32, n_heads=4, n_kv_heads=None, n_layers=2, mlp_hidden_size=64, vocab_size=256,
                embedding_size=256, max_sequence_length=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                weight_tying=False, scale_logits=False, block_type="llama", init_std=0.02, mask_token_id=None)


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, use_cache: bool = False, **kwargs):
        values = dict(DEFAULTS)
        values.update(kwargs)
        values["use_cache"] = use_cache   # transformers 5 drops it (a generation parameter)
        values.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(**values)

    @property
    def hidden_size(self):
        return self.d_model

    @property
    def num_attention_heads(self):
        return self.n_heads

    @property
    def num_hidden_layers(self):
        return self.n_layers


AutoConfig.register("llada", LLaDAConfig)
'''

MODELING = '''
"""LLaDA-like model (mdlm-ctc test stand-in): a bidirectional Llama with OLMo-style module names."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto import AutoModel

from .configuration_llada import DEFAULTS, LLaDAConfig


@dataclass
class InnerConfig:
    """The inner model's own copy of the sizes, taken when it is built."""
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: Optional[int]
    rope_theta: float
    rms_norm_eps: float
    weight_tying: bool
    scale_logits: bool
    init_std: float


def inner_config(config):
    values = {name: getattr(config, name, DEFAULTS.get(name)) for name in InnerConfig.__dataclass_fields__}
    values["n_kv_heads"] = values["n_kv_heads"] or values["n_heads"]
    return InnerConfig(**values)


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x.float() * scale).to(x.dtype)


def rotate(x, theta):
    n, d = x.shape[-2], x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * freqs[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(x.dtype), torch.cat([angles.sin()] * 2, -1).to(x.dtype)
    first, second = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-second, first], -1) * sin


class LLaDALlamaBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        kv = c.d_model // c.n_heads * c.n_kv_heads
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=False)
        self.attn_norm, self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps), RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.k_proj = nn.Linear(c.d_model, kv, bias=False)
        self.v_proj = nn.Linear(c.d_model, kv, bias=False)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)

    def forward(self, x, attention_bias=None):
        b, n, d = x.shape
        c, hd = self.c, self.c.d_model // self.c.n_heads
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, n, c.n_heads, hd).transpose(1, 2)
        k = self.k_proj(h).view(b, n, c.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(h).view(b, n, c.n_kv_heads, hd).transpose(1, 2)
        q, k = rotate(q, c.rope_theta), rotate(k, c.rope_theta)
        if c.n_kv_heads != c.n_heads:
            k = k.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1)
            v = v.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, n, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


@dataclass
class LLaDAOutput:
    logits: torch.Tensor


class LLaDAModel(nn.Module):
    """Not a PreTrainedModel: it keeps its own copy of the config and returns logits."""

    def __init__(self, config: InnerConfig, init_params: bool = False):
        super().__init__()
        self.config = config
        if config.embedding_size is not None and config.embedding_size < config.vocab_size:
            raise Exception("embedding size should be at least as big as vocab size")
        rows = config.embedding_size or config.vocab_size
        modules = dict(wte=nn.Embedding(rows, config.d_model),
                       blocks=nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
                       ln_f=RMSNorm(config.d_model, config.rms_norm_eps))
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, rows, bias=False)
        self.transformer = nn.ModuleDict(modules)
        if init_params:
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=config.init_std)

    def forward(self, input_ids, attention_mask=None):
        x = self.transformer.wte(input_ids)
        bias = None
        if attention_mask is not None and 0 in attention_mask:
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.transformer.blocks:
            x = block(x, bias)
        x = self.transformer.ln_f(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        if self.config.scale_logits:
            logits = logits / math.sqrt(self.config.d_model)
        return LLaDAOutput(logits=logits)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config, model=None, init_params=False):
        super().__init__(config)
        self.model = model or LLaDAModel(inner_config(config), init_params=init_params)
        # (no self.post_init(): the published code never calls it)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None, use_cache=None,
                output_hidden_states=None, return_dict=None):
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache:
            raise ValueError("a masked diffusion LM has no KV cache")
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        logits = self.model(input_ids, attention_mask=attention_mask).logits
        if not return_dict:
            return (logits,)
        return CausalLMOutputWithPast(logits=logits)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.transformer.wte if self.config.weight_tying else self.model.transformer.ff_out

    def set_output_embeddings(self, value):
        if self.config.weight_tying:
            self.model.transformer.wte = value
        else:
            self.model.transformer.ff_out = value

    def tie_weights(self):
        if self.config.weight_tying:
            self.model.transformer.ff_out = self.model.transformer.wte


AutoModel.register(LLaDAConfig, LLaDAModelLM)
'''

# the chat format of LLaDA's SFT data (GUIDELINES.md): every turn is <|start_header_id|>role<|end_header_id|>,
# two newlines, the content and <|eot_id|>; BOS first; the template always ends with the assistant's header
CHAT_TEMPLATE = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}<|start_header_id|>"
                 "{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|reserved_token_0|>", "<|reserved_token_1|>", "<|mdm_mask|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = (["user", "assistant", "system", ":", "_", "copy", "reverse", "expand", "insert", "dedup", "what", "is",
          "the", "answer", "?", "."] + list("abcdefghijklmnopqrstuvwxyz") + list("0123456789")
         + [f"*{k}" for k in range(2, 10)])
ROWS = 128  # embedding rows; the tokenizer has fewer (spare rows, as LLaDA's 126,464 rows for 126,349 tokens)


def build_llada_standin(folder, *, fill_rows: bool = False, seed: int = 0, d_model: int = 32, n_layers: int = 2,
                        mlp_hidden_size: int = 64) -> dict:
    """Write the stand-in folder; returns the token ids of its special tokens.

    ``fill_rows``: the tokenizer fills every embedding row (no spare row: adding ``<slack>`` resizes).
    """
    import torch
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "configuration_llada.py"), "w") as f:
        f.write(CONFIGURATION)
    with open(os.path.join(folder, "modeling_llada.py"), "w") as f:
        f.write(MODELING)
    words = WORDS + ["<unk>"]
    n_tokens = ROWS if fill_rows else ROWS - 12
    filler = [f"w{i}" for i in range(n_tokens - len(words) - len(SPECIALS))]
    vocab = {tok: i for i, tok in enumerate(words + filler + SPECIALS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIALS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>")  # no mask token, as LLaDA's
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    ids = {tok: vocab[tok] for tok in SPECIALS}
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "transformers_version": "4.46.3",
              "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                           "AutoModel": "modeling_llada.LLaDAModelLM",
                           "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
              "d_model": d_model, "n_heads": 4, "n_kv_heads": 4, "n_layers": n_layers,
              "mlp_hidden_size": mlp_hidden_size, "vocab_size": ROWS, "embedding_size": ROWS,
              "max_sequence_length": 256, "weight_tying": False, "use_cache": False, "block_type": "llama",
              "mask_token_id": ids["<|mdm_mask|>"], "eos_token_id": ids["<|endoftext|>"],
              "pad_token_id": ids["<|endoftext|>"]}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    # random weights through the stand-in's own classes (its inner model; no transformers save path needed)
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    cls = get_class_from_dynamic_module("modeling_llada.LLaDAModelLM", folder)
    module = __import__(cls.__module__, fromlist=["LLaDAModel", "inner_config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inner = module.LLaDAModel(module.inner_config(hf_config), init_params=True)
    save_file({f"model.{k}": v.contiguous() for k, v in inner.state_dict().items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return ids
