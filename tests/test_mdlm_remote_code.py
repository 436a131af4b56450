"""LLaDA's loading path in CI: a stand-in of LLaDA-8B-Instruct's Hub folder (``llada_standin``) with the
traits of its published code that break a loop built on transformers 5, loaded through
``--trust-remote-code`` exactly as ``--model GSAI-ML/LLaDA-8B-Instruct --trust-remote-code`` is: load,
train, the fused head, resize and reload, LoRA with README's targets, the answer's terminator.
README's LLaDA commands themselves run in ``test_mdlm_llada_job.py``.
"""

import hashlib
import json
import os
import re
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("yaml")

import torch  # noqa: E402
from llada_standin import build_llada_standin  # noqa: E402

from mdlm_ctc.cli import main  # noqa: E402
from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.model import (LLADA_EOS_ID, LLADA_MASK_ID, load_pretrained, load_tokenizer,  # noqa: E402
                                 resolve_special_ids)

CPU = torch.device("cpu")
DATA = ["--synthetic-train-size", "120", "--synthetic-eval-size", "6", "--synthetic-tasks", "copy,reverse",
        "--synthetic-max-len", "5", "--max-length", "40"]
README_TARGETS = "q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out"  # README's LLaDA LoRA list


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "tiny-llada"
    return folder, build_llada_standin(folder)


def _trusted(**options):
    return Config.from_dict({"trust_remote_code": True, "device": "cpu", **options})


def _digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))
            if os.path.isfile(folder / name)}


# ------------------------------------------------------------------------------ the stand-in is faithful
def test_the_standin_breaks_transformers_5_the_way_llada_does(llada, tmp_path):
    """Without the compatibility layer the stand-in fails the three ways LLaDA's own code does."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = tmp_path / "raw-llada"  # a fresh copy: its classes are imported anew, never patched
    shutil.copytree(llada[0], folder)
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):  # post_init() never called
        AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    model = get_class_from_dynamic_module("modeling_llada.LLaDAModelLM", str(folder))(config)
    with pytest.raises(TypeError, match="unexpected keyword argument"):  # tie_weights(self) takes no keywords
        model.tie_weights(missing_keys=set(), recompute_mapping=False)
    with pytest.raises(AttributeError, match="use_cache"):  # transformers 5 dropped it from the config
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    names = [name for name, _ in model.named_modules()]
    assert "model.transformer.ff_out" in names and "model.transformer.blocks.0.ff_out" in names
    assert model.get_output_embeddings() is model.model.transformer.ff_out  # untied: the head is ff_out
    assert config.embedding_size == config.vocab_size > len(AutoTokenizer.from_pretrained(str(folder)))


def test_loading_shims_the_classes_in_memory_and_leaves_the_files_alone(llada, capsys):
    from safetensors.torch import load_file

    folder, _ = llada
    before = _digests(folder)
    hf = load_pretrained(str(folder), _trusted(), CPU)
    assert "compatibility shims: " in capsys.readouterr().out
    from mdlm_ctc.mdlm.remote_code import applied_shims

    assert {"post_init", "tie_weights(**kwargs)"} <= set(applied_shims(type(hf)))
    assert hf.config.use_cache is False and hasattr(hf, "all_tied_weights_keys")
    saved = load_file(str(folder / "model.safetensors"))
    state = hf.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert _digests(folder) == before  # nothing on disk changed


def test_remote_code_that_cannot_load_names_the_model_the_versions_and_the_fix(llada, tmp_path, capsys):
    import transformers

    folder = tmp_path / "broken-llada"
    shutil.copytree(llada[0], folder)
    modeling = (folder / "modeling_llada.py").read_text()
    (folder / "modeling_llada.py").write_text(modeling.replace(
        "        super().__init__(config)\n", "        super().__init__(config)\n        self.config.no_such_field\n"))
    from mdlm_ctc.mdlm.remote_code import RemoteCodeError

    with pytest.raises(RemoteCodeError) as err:
        load_pretrained(str(folder), _trusted(), CPU)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "modeling_llada.LLaDAModelLM" in message
    assert "written for transformers 4.46.3" in message and f"transformers {transformers.__version__}" in message
    assert "Fix: " in message and "no_such_field" in message
    assert main(["sample", "--checkpoint", str(folder), "--trust-remote-code", "--device", "cpu", "--prompt", "a",
                 "--no-progress"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "cannot be loaded with transformers" in err_lines[0]


def test_the_folder_needs_trust_remote_code(llada, tmp_path, capsys):
    folder, _ = llada
    code = main(["train", "--model", str(folder), "--output-dir", str(tmp_path), "--device", "cpu", "--steps", "1",
                 *DATA, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--trust-remote-code" in err[0]


def test_llada_ids_come_from_its_config_and_tokenizer(llada):
    folder, ids = llada
    cfg = _trusted()
    tokenizer = load_tokenizer(str(folder), cfg)
    assert tokenizer.mask_token_id is None  # as LLaDA's: the config's mask_token_id names it
    special = resolve_special_ids(load_pretrained(str(folder), cfg, CPU), tokenizer, cfg)
    assert (special.mask_id, special.eos_id) == (ids["<|mdm_mask|>"], ids["<|endoftext|>"])
    assert special.answer_end == [ids["<|eot_id|>"]] and special.stop_ids == (special.eos_id, ids["<|eot_id|>"])
    assert special.slack_id == len(tokenizer) - 1 < 128  # <slack> took the first spare embedding row


def test_llada_configs_default_to_llada_ids():
    from tokenizers import Tokenizer, models
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

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


# ------------------------------------------------------------------------------ training, the fused head
def _train(folder, out, name, *extra):
    return ["train", "--model", str(folder), "--trust-remote-code", "--output-dir", str(out), "--name", name,
            "--device", "cpu", "--no-progress", "--threads", "1", *DATA, "--steps", "3", "--batch-size", "4",
            "--checkpoint-every", "0", "--objective", "ctc", "--warmup-steps", "0", "--lr", "1e-3", *extra]


@pytest.mark.parametrize("fused", ["on", "off"])
def test_train_and_sample_through_the_remote_code_path(llada, tmp_path, capsys, fused):
    folder, ids = llada
    assert main(_train(folder, tmp_path, "job", "--fused-lm-head", fused, "--steps", "2")) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and "trained ctc for 2 steps" in out
    done = json.loads((tmp_path / "job" / "done.json").read_text())
    assert done["fused_lm_head"] is (fused == "on")
    final = tmp_path / "job" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["embedding_size"] == saved["vocab_size"] == 128  # <slack> took a spare row: nothing grew
    assert (final / "modeling_llada.py").read_text() == (folder / "modeling_llada.py").read_text()  # unchanged
    assert main(["sample", "--checkpoint", str(final), "--trust-remote-code", "--device", "cpu", "--no-progress",
                 *DATA, "--num-samples", "2", "--gen-length", "8", "--sample-steps", "4", "--block-length", "8",
                 "--show-canvas"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt:") == 2 and out.count("canvas:") == 2


def test_fused_hidden_states_are_the_head_input(llada):
    """The head bypass returns exactly what the model's LM head sees (its logits are head(hidden))."""
    from mdlm_ctc.mdlm.model import DiffusionLM

    hf = load_pretrained(str(llada[0]), _trusted(), CPU).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    net = DiffusionLM(hf)
    with torch.no_grad():
        hidden = net(ids, want="hidden")
        logits = net(ids)
    assert hidden.shape == (2, 9, 32)
    torch.testing.assert_close(hf.get_output_embeddings()(hidden), logits, rtol=0, atol=0)


def test_checkpointing_without_a_transformers_switch(llada, tmp_path):
    """LLaDA's code has no gradient-checkpointing switch: torch's composable checkpoint hooks its layers
    (names unchanged), and the result equals the run without recomputation (FSDP2 on this stand-in:
    test_mdlm_llada_job.py)."""
    from safetensors.torch import load_file

    from mdlm_ctc.mdlm.distributed import enable_activation_checkpointing

    folder, _ = llada
    hf = load_pretrained(str(folder), _trusted(), CPU)
    names = [n for n, _ in hf.named_modules()], set(hf.state_dict())
    assert enable_activation_checkpointing(hf) == "composable checkpoint"
    assert ([n for n, _ in hf.named_modules()], set(hf.state_dict())) == names
    assert main(_train(folder, tmp_path, "plain", "--fused-lm-head", "on")) == 0
    assert main(_train(folder, tmp_path, "ckpt", "--fused-lm-head", "on", "--gradient-checkpointing")) == 0
    plain = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    ckpt = load_file(str(tmp_path / "ckpt" / "final" / "model.safetensors"))
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------ resize
def test_a_resized_vocabulary_keeps_every_size_field_and_reloads(tmp_path):
    """When the tokenizer fills every row, <slack> grows the embedding and the head; vocab_size and LLaDA's
    embedding_size (and the inner model's copy) follow, so the saved folder reloads."""
    from mdlm_ctc.mdlm.model import save_model_dir

    folder = tmp_path / "filled-llada"
    build_llada_standin(folder, fill_rows=True)
    cfg = _trusted()
    hf, tokenizer = load_pretrained(str(folder), cfg, CPU), load_tokenizer(str(folder), cfg)
    assert len(tokenizer) == hf.get_input_embeddings().weight.shape[0] == 128
    special = resolve_special_ids(hf, tokenizer, cfg)
    assert special.slack_id == 128 and hf.get_output_embeddings().weight.shape[0] == 129
    assert (hf.config.vocab_size, hf.config.embedding_size, hf.model.config.embedding_size) == (129, 129, 129)
    out = tmp_path / "final"
    save_model_dir(hf, tokenizer, special, str(out))
    saved = json.loads((out / "config.json").read_text())
    assert saved["vocab_size"] == saved["embedding_size"] == 129
    reloaded = load_pretrained(str(out), cfg, CPU)  # from_pretrained(trust_remote_code=True) of the saved folder
    state, again = hf.state_dict(), reloaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


# ------------------------------------------------------------------------------ the answer's terminator
def test_the_canvas_is_the_answer_eot_then_eos_padding_with_and_without_wrap_chat(llada, tmp_path):
    """LLaDA's SFT rows end the answer with <|eot_id|> (its chat template's end of turn), then EOS padding."""
    from mdlm_ctc.mdlm.data import load_datasets
    from mdlm_ctc.mdlm.objectives import collate
    from mdlm_ctc.mdlm.train import prepare

    folder, ids = llada
    eot, eos = ids["<|eot_id|>"], ids["<|endoftext|>"]
    for wrap in (True, False):
        cfg = _trusted(model=str(folder), output_dir=str(tmp_path), name=f"wrap{wrap}", wrap_chat=wrap,
                       synthetic_train_size=20, synthetic_eval_size=4, synthetic_max_len=5, max_length=40)
        prepared = prepare(cfg, cfg.run_dir(), log=lambda *a: None)
        examples = load_datasets(cfg)[0]
        for row in prepared.train_rows[:3]:
            answer = prepared.tokenizer(examples[row.index].response, add_special_tokens=False)["input_ids"]
            canvas = collate([row], 40, eos, [0]).input_ids[0, len(row.prompt_ids):].tolist()
            assert canvas == answer + [eot] + [eos] * (len(canvas) - len(answer) - 1)
            assert (row.prompt_ids[-1] == ids["<|end_header_id|>"]) is wrap  # a chat prompt ends with the header
    cfg = _trusted(answer_end="none")
    assert resolve_special_ids(None, load_tokenizer(str(folder), cfg), cfg, hf_config=None).answer_end == []
    with pytest.raises(ValueError, match="`answer_end` '<nope>' is not a token"):
        resolve_special_ids(None, load_tokenizer(str(folder), cfg), _trusted(answer_end="<nope>"))


def test_answer_end_follows_the_chat_template():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mdlm_ctc.mdlm.model import chat_template_answer_end
    from mdlm_ctc.mdlm.sampler import finalize
    from mdlm_ctc.mdlm.tokenizer import train_tokenizer

    core = Tokenizer(models.WordLevel(vocab={"user": 0, "assistant": 1, "hello": 2, "<unk>": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>")
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's
    assert chat_template_answer_end(tok, eos) == [im_end]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"  # ends with EOS
    assert chat_template_answer_end(tok, eos) == []
    embedded = train_tokenizer(["copy : a b"], 64)  # the embedded model: 'role : content', no terminator
    assert chat_template_answer_end(embedded, embedded.eos_token_id) == []
    assert finalize([0, 3, 2, im_end, 1, eos], slack_id=3, eos_id=eos, stop_ids=(eos, im_end)) == [0, 2]


# ------------------------------------------------------------------------------ LoRA with README's targets
def test_lora_with_readmes_targets_adapts_the_blocks_and_plan_counts_what_peft_trains(llada, tmp_path):
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import TrainableTokensWrapper

    from mdlm_ctc.mdlm.lora import apply_lora, head_path, linear_layers
    from mdlm_ctc.mdlm.plan import lora_params, model_shape

    folder, _ = llada
    cfg = _trusted(model=str(folder), lora=True, lora_rank=4, lora_target_modules=README_TARGETS)
    hf = load_pretrained(str(folder), cfg, CPU)
    special = resolve_special_ids(hf, load_tokenizer(str(folder), cfg), cfg)
    shape = model_shape(cfg)  # from config.json alone
    assert shape.linear_layers() == linear_layers(hf) and shape.head_path == head_path(hf)
    peft_model = apply_lora(hf, cfg, special.slack_id)
    adapted = {n for n, m in hf.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {f"model.transformer.blocks.{i}.{leaf}" for i in range(2) for leaf in README_TARGETS.split(",")}
    assert {n for n, m in hf.named_modules() if isinstance(m, TrainableTokensWrapper)} == {
        "model.transformer.wte", "model.transformer.ff_out"}  # the slack row of the embedding and the head only
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == lora_params(shape, 4, README_TARGETS) == 2 * 4 * (4 * 64 + 3 * 96) + 2 * 32
    ids = torch.tensor([[special.slack_id, 5, 6]])
    hf(input_ids=ids).logits.sum().backward()  # a forward/backward through the adapted model
    assert hf.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].grad is not None


@pytest.mark.parametrize("targets, message", [
    ("q_proj,o_proj", "`lora_target_modules` entry 'o_proj' matches no linear layer"),
    ("q_proj,model.transformer.ff_out", "would put LoRA on the LM head (model.transformer.ff_out)"),
])
def test_bad_lora_targets_are_refused_in_one_line(llada, tmp_path, capsys, targets, message):
    folder, _ = llada
    assert main(_train(folder, tmp_path, "bad", "--lora", "--lora-target-modules", targets)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    from mdlm_ctc.mdlm.lora import apply_lora

    hf = load_pretrained(str(folder), _trusted(), CPU)  # the same refusal from the loaded model
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_lora(hf, _trusted(lora=True, lora_target_modules=targets), 116)


# ------------------------------------------------------------------------------ Dream's traits
def test_dreams_code_loads_with_its_rotary_buffer_its_generation_config_and_shifted_outputs(tmp_path, capsys):
    """Dream's code under transformers 5: RoPE's 'default' initialiser is gone, its own GenerationConfig
    has a 4.x validate(), and its non-persistent inv_freq would stay uninitialised memory; its head
    predicts the next position, so the loop shifts its outputs right by one as Dream's sampler does."""
    from dream_standin import build_dream_standin
    from transformers import AutoModel

    from mdlm_ctc.mdlm.model import DiffusionLM

    raw = tmp_path / "raw-dream"
    build_dream_standin(raw)
    with pytest.raises(KeyError, match="default"):
        AutoModel.from_pretrained(str(raw), trust_remote_code=True)
    folder = tmp_path / "tiny-dream"
    build_dream_standin(folder)
    hf = load_pretrained(str(folder), _trusted(), CPU).eval()
    note = capsys.readouterr().out
    for shim in ("rope 'default'", "DreamGenerationConfig.validate(**kwargs)", "rotary inv_freq"):
        assert shim in note, note
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    assert torch.equal(hf.model.rotary_emb.inv_freq, inv_freq) and hf.generation_config.alg == "entropy"
    reference = type(hf)(hf.config).eval()  # built on the CPU, where its own __init__ computes inv_freq
    reference.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    net = DiffusionLM(hf)
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
        torch.testing.assert_close(logits, reference(input_ids=ids).logits, rtol=0, atol=0)
        shifted, hidden = net(ids), net(ids, want="hidden")
    assert torch.equal(shifted[:, 1:], logits[:, :-1]) and torch.equal(shifted[:, :1], logits[:, :1])
    torch.testing.assert_close(hf.get_output_embeddings()(hidden), shifted, rtol=0, atol=0)
