"""LoRA through peft: the loss falls, the base stays frozen, the slack rows train, merge is exact, resume works."""

import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("peft")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mdlm_ctc.cli import main  # noqa: E402
from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.lora import load_adapted  # noqa: E402
from mdlm_ctc.mdlm.model import load_model_dir, read_meta  # noqa: E402
from mdlm_ctc.mdlm.train import read_metrics  # noqa: E402

# the slack canvas: its slack padding is predicted through the trainable <slack> head row, so 30 noisy steps of
# attention-only adapters visibly lower the loss (the eos canvas's EOS tail needs the frozen EOS row)
TINY = ["--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-intermediate-size", "64",
        "--synthetic-train-size", "200", "--synthetic-eval-size", "10", "--max-length", "32",
        "--synthetic-max-len", "8", "--batch-size", "8", "--no-progress", "--threads", "1", "--device", "cpu",
        "--objective", "ctc", "--ctc-canvas", "slack", "--steps", "30", "--log-every", "10", "--checkpoint-every", "10", "--lr", "1e-2",
        "--warmup-steps", "2", "--lora", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0",
        "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj", "--fused-lm-head", "on"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    assert main(["train", "--output-dir", str(out), "--name", "lora", *TINY]) == 0
    return out / "lora"


def _cfg():
    return Config.from_dict({"device": "cpu"})


def test_a_lora_run_lowers_the_loss(run):
    losses = [m["loss"] for m in read_metrics(str(run / "metrics.jsonl"))]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses


def test_only_adapters_and_the_slack_rows_train(run):
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and any("lora_B" in k for k in adapter)
    deltas = {k: v for k, v in adapter.items() if "trainable_tokens" in k}
    assert any("embed_tokens" in k for k in deltas) and any("lm_head" in k for k in deltas)
    assert all(v.shape[0] == 1 for v in deltas.values()), {k: v.shape for k, v in deltas.items()}

    meta = read_meta(str(run / "final"))
    slack = meta["special_ids"]["slack_id"]
    init, _, _ = load_model_dir(meta["lora_base"], _cfg(), CPU)
    merged, _, _ = load_adapted(str(run / "final"), _cfg(), CPU, merge=True)
    before, after = init.state_dict(), merged.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        if any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or name.endswith(
                ("embed_tokens.weight", "lm_head.weight")):
            continue
        assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        others = torch.ones(before[name].shape[0], dtype=torch.bool)
        others[slack] = False
        assert torch.equal(before[name][others], after[name][others]), f"{name}: a row other than <slack> changed"
        assert not torch.equal(before[name][slack], after[name][slack]), f"{name}: the <slack> row did not train"
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])


def test_merge_writes_a_full_model_with_the_adapted_outputs(run):
    out = run.parent / "merged"
    assert main(["merge", "--checkpoint", str(run / "final"), "--merge-output", str(out), "--device", "cpu"]) == 0
    assert os.path.exists(out / "model.safetensors") and not os.path.exists(out / "adapter_config.json")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # plain Hugging Face loading
    adapted, _, special = load_adapted(str(run / "final"), _cfg(), CPU, merge=False)
    adapted.eval()
    ids = torch.randint(0, merged.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 5] = special.slack_id
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert read_meta(str(out))["special_ids"] == special.to_dict()


def test_lora_checkpoints_hold_only_the_trainable_tensors_and_resume(run, tmp_path):
    ckpt = run / "checkpoints" / "step_0000020"
    names = set(os.listdir(ckpt))
    assert "adapter.safetensors" in names and "model.safetensors" not in names
    saved = load_file(str(ckpt / "adapter.safetensors"))
    assert saved and all("lora_" in k or "trainable_tokens" in k for k in saved)
    # resume the finished run's last checkpoint as if it had been killed after step 20
    import shutil

    copy = tmp_path / "lora"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final"))
    os.remove(copy / "done.json")
    assert main(["train", "--output-dir", str(tmp_path), "--name", "lora", *TINY, "--resume"]) == 0
    a = load_file(str(run / "final" / "adapter_model.safetensors"))
    b = load_file(str(copy / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SMALL = [*TINY, "--steps", "8", "--log-every", "2", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def single_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-single")
    assert main(["train", "--output-dir", str(out), "--name", "single", *SMALL]) == 0
    return out / "single"


@pytest.mark.parametrize("distributed", ["fsdp", "ddp"])
def test_lora_with_two_processes_matches_one(single_small, tmp_path, distributed):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "mdlm_ctc", "train", "--output-dir", str(tmp_path), *SMALL, "--name", distributed,
                          "--distributed", distributed], env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    a = load_file(str(single_small / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / distributed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    la = [m["loss"] for m in read_metrics(str(single_small / "metrics.jsonl"))]
    lb = [m["loss"] for m in read_metrics(str(tmp_path / distributed / "metrics.jsonl"))]
    assert len(la) == 4 and lb == pytest.approx(la, rel=1e-5)
