"""LLaDA's loading path in CI: a small remote-code model folder (``auto_map``) trained and sampled.

No network reaches LLaDA's files, so the test writes a folder shaped like LLaDA-8B-Instruct's: a
config and a modeling file of its own, referenced by ``auto_map``; a ``*ModelLM`` whose
``base_model`` (``self.model``) is a plain module returning logits, whose LM head is
``model.transformer.ff_out`` and whose layers are named in ``_no_split_modules``; a tokenizer without
a mask token; and a reserved token reused as ``<slack>`` by id. It goes through ``--trust-remote-code``
exactly as ``--model GSAI-ML/LLaDA-8B-Instruct --trust-remote-code`` would.
"""

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("yaml")

import torch  # noqa: E402

from mdlm_ctc.cli import main  # noqa: E402
from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.model import LLADA_EOS_ID, LLADA_MASK_ID, resolve_special_ids  # noqa: E402

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyLLaDAConfig(PretrainedConfig):
    model_type = "tiny_llada"

    def __init__(self, d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=64, embedding_size=64,
                 max_sequence_length=128, weight_tying=False, **kwargs):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.mlp_hidden_size, self.vocab_size, self.embedding_size = mlp_hidden_size, vocab_size, embedding_size
        self.max_sequence_length, self.weight_tying = max_sequence_length, weight_tying
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tiny_llada import TinyLLaDAConfig


class TinyLLaDABlock(nn.Module):
    """Bidirectional attention + SwiGLU, with LLaDA's module names."""

    def __init__(self, c):
        super().__init__()
        d = c.d_model
        self.n_heads = c.n_heads
        self.attn_norm, self.ff_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, c.mlp_hidden_size, bias=False), nn.Linear(d, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, d, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, n, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class TinyLLaDAModel(nn.Module):
    """Like LLaDA's LLaDAModel: a plain module (not a PreTrainedModel) that returns logits."""

    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.embedding_size, c.d_model), wpe=nn.Embedding(c.max_sequence_length, c.d_model),
            blocks=nn.ModuleList(TinyLLaDABlock(c) for _ in range(c.n_layers)), ln_f=nn.RMSNorm(c.d_model),
            ff_out=nn.Linear(c.d_model, c.embedding_size, bias=False)))

    def forward(self, input_ids):
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in t.blocks:
            x = block(x)
        return CausalLMOutput(logits=t.ff_out(t.ln_f(x)))


class TinyLLaDAModelLM(PreTrainedModel):
    config_class = TinyLLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["TinyLLaDABlock"]

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyLLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.05)

    def forward(self, input_ids=None, **kwargs):
        return CausalLMOutput(logits=self.model(input_ids).logits)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.transformer.ff_out
'''

SPECIALS = ["<|endoftext|>", "<|mdm_mask|>", "<|reserved_token_3|>", "<pad>", "<unk>"]
DATA = ["--synthetic-train-size", "120", "--synthetic-eval-size", "6", "--synthetic-tasks", "copy,reverse",
        "--synthetic-max-len", "5", "--max-length", "24"]


@pytest.fixture(scope="module")
def llada_like(tmp_path_factory):
    """A remote-code model folder shaped like LLaDA's, with a tokenizer covering the synthetic tasks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from mdlm_ctc.mdlm.data import load_datasets

    folder = tmp_path_factory.mktemp("remote") / "tiny-llada"
    folder.mkdir()
    (folder / "configuration_tiny_llada.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny_llada.py").write_text(MODELING)
    cfg = Config.from_dict({flag[2:].replace("-", "_"): value for flag, value in zip(DATA[::2], DATA[1::2])})
    train, evaluation, _ = load_datasets(cfg)
    words = sorted({w for ex in train + evaluation for w in f"{ex.prompt} {ex.response}".split()})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<pad>",
                                        unk_token="<unk>")  # like LLaDA's: no mask token declared
    tokenizer.save_pretrained(folder)
    rows = len(vocab) + 8  # spare rows beyond the tokenizer, as LLaDA's 126,464-row embedding has
    config = {"architectures": ["TinyLLaDAModelLM"], "model_type": "tiny_llada",
              "auto_map": {"AutoConfig": "configuration_tiny_llada.TinyLLaDAConfig",
                           "AutoModel": "modeling_tiny_llada.TinyLLaDAModelLM",
                           "AutoModelForCausalLM": "modeling_tiny_llada.TinyLLaDAModelLM"},
              "d_model": 32, "n_heads": 2, "n_layers": 2, "mlp_hidden_size": 64, "vocab_size": rows,
              "embedding_size": rows, "max_sequence_length": 64, "weight_tying": False}
    (folder / "config.json").write_text(json.dumps(config))
    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config, trust_remote_code=True).save_pretrained(str(folder))
    return folder, vocab


def _ids(vocab):
    return ["--mask-id", str(vocab["<|mdm_mask|>"]), "--eos-id", str(vocab["<|endoftext|>"]),
            "--slack-id", str(vocab["<|reserved_token_3|>"])]


def test_the_folder_needs_trust_remote_code(llada_like, tmp_path, capsys):
    folder, vocab = llada_like
    code = main(["train", "--model", str(folder), "--output-dir", str(tmp_path), "--device", "cpu", "--steps", "1",
                 *DATA, *_ids(vocab), "--no-progress"])
    assert code == 2 and "--trust-remote-code" in capsys.readouterr().err


@pytest.mark.parametrize("fused", ["on", "off"])
def test_train_a_step_and_sample_through_the_remote_code_path(llada_like, tmp_path, capsys, fused):
    folder, vocab = llada_like
    rows_before = json.loads((folder / "config.json").read_text())["embedding_size"]
    common = ["--model", str(folder), "--trust-remote-code", "--output-dir", str(tmp_path), "--name", "job",
              "--device", "cpu", "--no-progress", *DATA, *_ids(vocab)]
    assert main(["train", *common, "--steps", "2", "--batch-size", "4", "--checkpoint-every", "0",
                 "--fused-lm-head", fused, "--objective", "ctc", "--warmup-steps", "0", "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and "trained ctc for 2 steps" in out
    done = json.loads((tmp_path / "job" / "done.json").read_text())
    assert done["fused_lm_head"] is (fused == "on")
    final = tmp_path / "job" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["embedding_size"] == rows_before  # <slack> reused a reserved id: nothing grew
    assert os.path.exists(final / "modeling_tiny_llada.py")  # the remote code travels with the model
    special = json.loads((final / "mdlm_ctc.json").read_text())["special_ids"]
    assert special["slack_id"] == vocab["<|reserved_token_3|>"] and special["mask_id"] == vocab["<|mdm_mask|>"]
    assert main(["sample", "--checkpoint", str(final), "--trust-remote-code", "--device", "cpu", "--no-progress",
                 *DATA, "--num-samples", "2", "--gen-length", "8", "--sample-steps", "4", "--block-length", "8",
                 "--show-canvas"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt:") == 2 and out.count("canvas:") == 2


def test_fused_hidden_states_are_the_head_input(llada_like):
    """The head bypass returns exactly what the model's LM head sees (its logits are head(hidden))."""
    from mdlm_ctc.mdlm.model import DiffusionLM, load_pretrained

    folder, _ = llada_like
    cfg = Config.from_dict({"trust_remote_code": True, "device": "cpu"})
    hf = load_pretrained(str(folder), cfg, torch.device("cpu")).eval()
    ids = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(1))
    net = DiffusionLM(hf)
    with torch.no_grad():
        hidden = net(ids, want="hidden")
        logits = net(ids)
    assert hidden.shape == (2, 9, 32)
    torch.testing.assert_close(hf.get_output_embeddings()(hidden), logits, rtol=0, atol=0)


def test_llada_configs_default_to_llada_ids():
    from transformers import PretrainedConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab={"a": 0, "<unk>": 1},
                                                                              unk_token="<unk>")))
    config = PretrainedConfig()
    config.model_type = "llada"
    cfg = Config.from_dict({"slack_id": 126084})
    special = resolve_special_ids(None, tok, cfg, hf_config=config)
    assert (special.mask_id, special.eos_id, special.slack_id) == (LLADA_MASK_ID, LLADA_EOS_ID, 126084)
    assert (LLADA_MASK_ID, LLADA_EOS_ID) == (126336, 126081)
    with pytest.raises(ValueError, match="`slack_id` 130000 is outside the embedding matrix"):
        config.vocab_size = 126464
        resolve_special_ids(None, tok, Config.from_dict({"slack_id": 130000}), hf_config=config)


def _train_remote(folder, vocab, out, name, *extra):
    return ["train", "--model", str(folder), "--trust-remote-code", "--output-dir", str(out), "--name", name,
            "--device", "cpu", "--no-progress", "--threads", "1", *DATA, *_ids(vocab), "--steps", "3",
            "--batch-size", "4", "--checkpoint-every", "0", "--fused-lm-head", "on", "--objective", "ctc",
            "--warmup-steps", "0", "--lr", "1e-3", *extra]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def test_checkpointing_without_a_transformers_switch_and_fsdp(llada_like, tmp_path):
    """LLaDA's code has no gradient-checkpointing switch: torch's checkpoint_wrapper wraps its layers; the
    result equals the run without recomputation, and two FSDP2 processes match one."""
    import subprocess
    import sys

    from mdlm_ctc.mdlm.distributed import enable_activation_checkpointing
    from mdlm_ctc.mdlm.model import load_pretrained

    folder, vocab = llada_like
    hf = load_pretrained(str(folder), Config.from_dict({"trust_remote_code": True}), torch.device("cpu"))
    keys = set(hf.state_dict())
    assert enable_activation_checkpointing(hf) == "checkpoint_wrapper" and set(hf.state_dict()) == keys
    assert main(_train_remote(folder, vocab, tmp_path, "plain")) == 0
    assert main(_train_remote(folder, vocab, tmp_path, "ckpt", "--gradient-checkpointing")) == 0
    plain, ckpt = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "mdlm_ctc", *_train_remote(folder, vocab, tmp_path, "fsdp", "--gradient-checkpointing",
                                                      "--distributed", "fsdp")],
                          env=env, capture_output=True, text=True, timeout=400)
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    sharded = _weights(tmp_path / "fsdp")
    for name in plain:
        torch.testing.assert_close(sharded[name], ckpt[name], rtol=1e-4, atol=1e-5, msg=name)
