"""A stand-in for Dream-v0-Instruct-7B's Hub folder, for CI: the traits of Dream's published code that
transformers 5 breaks, written for mdlm-ctc's tests (not Dream's files).

* the rotary embedding looks up ``ROPE_INIT_FUNCTIONS["default"]`` (gone in transformers 5) and keeps
  ``inv_freq`` as a non-persistent buffer that the model's own ``_init_weights`` does not initialise;
* a ``GenerationConfig`` subclass overrides ``validate(self, is_init=False)``, and the model's
  ``from_pretrained`` loads it from the folder's ``generation_config.json``;
* the head predicts the next position (Dream starts from an autoregressive model): its sampler shifts
  the logits right by one;
* model type ``Dream``, reached through ``auto_map`` ``AutoModel`` only.
"""

from __future__ import annotations

import json
import os

CONFIGURATION = '''
from transformers import PretrainedConfig


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(self, vocab_size=64, hidden_size=32, num_attention_heads=4, rope_theta=10000.0,
                 max_position_embeddings=128, use_cache=False, mask_token_id=60, **kwargs):
        self.vocab_size, self.hidden_size, self.num_attention_heads = vocab_size, hidden_size, num_attention_heads
        self.rope_theta, self.max_position_embeddings, self.use_cache = rope_theta, max_position_embeddings, use_cache
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=False, **kwargs)
'''

MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_dream import DreamConfig


class DreamGenerationConfig(GenerationConfig):
    def __init__(self, **kwargs):
        self.alg = kwargs.pop("alg", "origin")
        super().__init__(**kwargs)

    def validate(self, is_init=False):
        pass


class DreamRotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.rope_type, self.rope_kwargs = config, "default", {}
        self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_init_fn(self.config, None, **self.rope_kwargs)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = self.inv_freq

    def forward(self, x):
        angles = torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * self.inv_freq[None, :].float()
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class DreamBase(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.rotary_emb = DreamRotaryEmbedding(config)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        q, k = self.rotary_emb(q), self.rotary_emb(k)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class DreamModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = DreamBase(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.05)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, **kwargs):
        return MaskedLMOutput(logits=self.lm_head(self.model(input_ids)))

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        model = super().from_pretrained(path, *args, **kwargs)
        model.generation_config = DreamGenerationConfig.from_pretrained(path)
        return model
'''


def build_dream_standin(folder, seed: int = 0) -> None:
    """Write the stand-in folder (config, code, generation config, random weights)."""
    import torch
    from safetensors.torch import save_file

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "configuration_dream.py"), "w") as f:
        f.write(CONFIGURATION)
    with open(os.path.join(folder, "modeling_dream.py"), "w") as f:
        f.write(MODELING)
    config = {"architectures": ["DreamModel"], "model_type": "Dream", "transformers_version": "4.46.2",
              "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
              "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "rope_theta": 10000.0,
              "mask_token_id": 60, "use_cache": False}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"alg": "entropy", "mask_token_id": 60, "transformers_version": "4.46.2"}, f)
    generator = torch.Generator().manual_seed(seed)
    weights = {"model.embed_tokens.weight": torch.randn(64, 32, generator=generator) * 0.5,
               "model.qkv.weight": torch.randn(96, 32, generator=generator) * 0.2,
               "model.qkv.bias": torch.zeros(96), "lm_head.weight": torch.randn(64, 32, generator=generator) * 0.2}
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
