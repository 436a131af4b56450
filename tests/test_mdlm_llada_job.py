"""README's LLaDA job, run as written on the CPU stand-in of LLaDA-8B-Instruct (``llada_standin``).

The YAML and the commands are read from README.md (the block after the ``llada-job`` marker), the
model id is replaced by the stand-in's folder and the data files by small synthetic ones; every command
then gets the same scaled-down sizes appended (flags given last win): a few steps, short rows, CPU, and
``--fused-lm-head on`` (what ``auto`` picks at LLaDA's 126,464-row vocabulary). ``torchrun
--nproc_per_node=8`` becomes two CPU processes (gloo), so the FSDP2 lines run sharded as written.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("yaml")

import torch  # noqa: E402
from llada_standin import build_llada_standin  # noqa: E402

from mdlm_ctc.cli import main  # noqa: E402
from mdlm_ctc.mdlm.data import synthetic_dataset, write_jsonl  # noqa: E402
from mdlm_ctc.mdlm.train import read_metrics  # noqa: E402

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
MODEL_ID = "GSAI-ML/LLaDA-8B-Instruct"
TRAIN = ["--steps", "6", "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "40", "--checkpoint-every",
         "3", "--log-every", "2", "--lr", "5e-3", "--warmup-steps", "0", "--lora-rank", "4", "--fused-lm-head", "on",
         "--threads", "1"]
SAMPLE = ["--gen-length", "8", "--block-length", "8", "--sample-steps", "8"]
EVAL = ["--max-eval-examples", "3", "--shift-fractions", "0,0.1", "--bootstrap-samples", "20"]
COMMON = ["--device", "cpu", "--no-progress"]


def readme_job() -> tuple[str, list[list[str]]]:
    """(the YAML text, the commands as argument lists) of README's LLaDA job."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("<!-- llada-job"):]
    yaml_text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in bash.splitlines() if line.strip()]
    return yaml_text, commands


def _extra(args: list[str]) -> list[str]:
    command = args[args.index("mdlm_ctc") + 1] if args[0] == "torchrun" else args[1]
    return {"train": TRAIN + COMMON, "eval": SAMPLE + EVAL + COMMON, "sample": SAMPLE + COMMON,
            "merge": ["--device", "cpu"], "plan": []}[command]


def _run(args: list[str], cwd) -> None:
    if args[0] == "torchrun":  # torchrun --nproc_per_node=8 -m mdlm_ctc ...: two CPU processes
        rest = args[args.index("-m"):]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *rest, *_extra(args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"{shlex.join(args)}\n{proc.stderr[-4000:]}"
    else:
        assert args[0] == "mdlm-ctc", args
        assert main([*args[1:], *_extra(args)]) == 0, shlex.join(args)


@pytest.fixture
def job(tmp_path, monkeypatch):
    folder = tmp_path / "hub" / "LLaDA-8B-Instruct"
    ids = build_llada_standin(folder)
    yaml_text, commands = readme_job()
    assert MODEL_ID in yaml_text and "trust_remote_code: true" in yaml_text
    (tmp_path / "llada.yaml").write_text(yaml_text.replace(MODEL_ID, str(folder)))
    tasks, lengths = ["copy", "reverse"], dict(min_len=2, max_len=5, alphabet_size=6)
    write_jsonl(synthetic_dataset(64, 1, tasks, **lengths), str(tmp_path / "sft.jsonl"))
    write_jsonl(synthetic_dataset(6, 2, tasks, **lengths), str(tmp_path / "eval.jsonl"))
    monkeypatch.chdir(tmp_path)
    return tmp_path, ids, commands


def test_readmes_llada_job_runs_on_the_standin(job, capsys):
    root, ids, commands = job
    names = [(c[c.index("mdlm_ctc") + 1] if c[0] == "torchrun" else c[1]) for c in commands]
    assert names == ["plan", "train", "train", "train", "eval", "sample", "merge"], names
    plan, ce, ctc, lora, evaluate, sample, merge = commands

    _run(plan, root)
    assert "memory plan per GPU" in capsys.readouterr().out

    for command, objective in ((ce, "ce"), (ctc, "ctc")):  # FSDP2, two processes, gradient checkpointing
        _run(command, root)
        run = root / "runs" / f"llada-{objective}"
        losses = [m["loss"] for m in read_metrics(str(run / "metrics.jsonl"))]
        assert len(losses) == 3 and losses[-1] < losses[0], (objective, losses)  # the loss falls
        assert os.path.exists(run / "checkpoints" / "step_0000003" / ".metadata")  # sharded (DCP) checkpoints
        assert json.loads((run / "done.json").read_text())["fused_lm_head"] is True
        saved = json.loads((run / "final" / "config.json").read_text())
        assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_llada.LLaDAModelLM"
        special = json.loads((run / "final" / "mdlm_ctc.json").read_text())["special_ids"]
        assert special["answer_end"] == [ids["<|eot_id|>"]]

    _run(lora, root)  # LoRA with README's targets on one process
    run = root / "runs" / "llada-lora"
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(
        f"model.transformer.blocks.{i}.{leaf}" for i in range(2)
        for leaf in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"))
    assert sorted(adapter["trainable_token_indices"]) == ["model.transformer.ff_out", "model.transformer.wte"]
    from safetensors.torch import load_file

    tensors = load_file(str(run / "final" / "adapter_model.safetensors"))  # every adapter, none lost on save
    assert sum("lora_A" in k for k in tensors) == sum("lora_B" in k for k in tensors) == 14 and len(tensors) == 30
    # killed after its step-3 checkpoint: the same command with --resume ends with the same adapter, bitwise
    finished = load_file(str(run / "final" / "adapter_model.safetensors"))
    shutil.rmtree(run / "final")
    os.remove(run / "done.json")
    capsys.readouterr()
    _run([*lora, "--resume"], root)
    assert "step_0000003 (step 3)" in capsys.readouterr().out
    resumed = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert finished.keys() == resumed.keys() and all(torch.equal(finished[k], resumed[k]) for k in finished)

    _run(evaluate, root)  # loads both final/ folders through the model's own code
    assert "per-example outputs" in capsys.readouterr().out
    _run(sample, root)
    out = capsys.readouterr().out
    assert "prompt:    copy : a c b _ _" in out and "canvas:" in out
    _run(merge, root)
    merged = root / "runs" / "llada-lora" / "final-merged"
    assert os.path.exists(merged / "model.safetensors") and os.path.exists(merged / "modeling_llada.py")
    from mdlm_ctc.mdlm.config import Config
    from mdlm_ctc.mdlm.model import load_adapted, load_pretrained

    cfg = Config.from_dict({"trust_remote_code": True})
    adapted, _, special = load_adapted(str(run / "final"), cfg, torch.device("cpu"), merge=False)
    full = load_pretrained(str(merged), cfg, torch.device("cpu"))
    x = torch.tensor([[special.slack_id, 5, 6, special.mask_id, 7]])
    with torch.no_grad():  # the merged model answers as the adapted one
        torch.testing.assert_close(full(input_ids=x).logits, adapted.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)
