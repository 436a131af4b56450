"""The main job and the CLI end to end, on a tiny budget: compare, eval, sample, python -m mdlm_ctc."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("yaml")
pytest.importorskip("tqdm")

from mdlm_ctc.cli import main  # noqa: E402

TINY = ["--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-intermediate-size", "64",
        "--synthetic-train-size", "300", "--synthetic-eval-size", "12", "--max-length", "32",
        "--synthetic-max-len", "6",
        "--batch-size", "8", "--steps", "8", "--log-every", "2", "--checkpoint-every", "4", "--no-progress",
        "--gen-length", "16", "--sample-steps", "8", "--block-length", "8", "--bootstrap-samples", "50",
        "--shift-fractions", "0,0.5"]
EVAL = ["--synthetic-train-size", "300", "--synthetic-eval-size", "12", "--synthetic-max-len", "6", "--no-progress",
        "--gen-length", "16", "--sample-steps", "8", "--block-length", "8", "--bootstrap-samples", "50",
        "--shift-fractions", "0,0.5"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["compare", "--output-dir", str(out), "--name", "job", *TINY]) == 0
    return out / "job", buf.getvalue()


def test_compare_writes_the_report_and_prints_the_table(compared):
    root, printed = compared
    for name in ("report.md", "loss_curves.png", "shift_robustness.png", "per_task.png", "summary.json",
                 "config.yaml", "ce/metrics.jsonl", "ctc/metrics.jsonl", "ce/final/model.safetensors",
                 "ctc/final/model.safetensors", "eval/ce.jsonl", "eval/ctc.jsonl", "init/model.safetensors",
                 "tokenizer/tokenizer.json", "data/train.jsonl", "data/eval.jsonl"):
        assert (root / name).exists(), name
    for png in ("loss_curves.png", "shift_robustness.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact@0 [95% CI]" in printed and "win vs ce@0" in printed and "report:" in printed
    report = (root / "report.md").read_text()
    for section in ("## Results without shift", "## Shift robustness", "## Pairwise comparison against `ce`",
                    "## Training", "## Caveats", "![loss curves](loss_curves.png)"):
        assert section in report
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["results"]) == {"ce", "ctc"}
    assert set(summary["comparison"]["pairs"]["ctc"]) == {"0.0", "0.5"}
    records = [json.loads(line) for line in (root / "eval" / "ctc.jsonl").read_text().splitlines()]
    assert len(records) == 24 and {"prediction", "reference", "exact", "edit"} <= set(records[0])


def test_both_runs_start_from_the_same_weights(compared):
    root, _ = compared
    from safetensors.torch import load_file

    ce = load_file(str(root / "ce" / "checkpoints" / "step_0000004" / "model.safetensors"))
    init = load_file(str(root / "init" / "model.safetensors"))
    assert ce.keys() == init.keys()
    cfg_ce = (root / "ce" / "config.yaml").read_text()
    cfg_ctc = (root / "ctc" / "config.yaml").read_text()
    # the two runs differ only in the objective
    assert cfg_ce.replace("objective: ce\n", "objective: ctc\n") == cfg_ctc


def test_compare_resume_skips_finished_runs(compared, capsys):
    root, _ = compared
    assert main(["compare", "--output-dir", str(root.parent), "--name", "job", *TINY, "--resume",
                 "--shift-fractions", "0"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out


def test_eval_and_sample_commands(compared, capsys):
    root, _ = compared
    assert main(["eval", "--output-dir", str(root.parent), "--name", "job", "--checkpoint", str(root / "ctc" / "final"),
                 "--baseline", str(root / "ce" / "final"), *EVAL]) == 0
    out = capsys.readouterr().out
    assert "ctc" in out and "win vs ce@0" in out
    assert main(["sample", "--checkpoint", str(root / "ctc" / "final"), "--prompt", "copy : a b c", "--show-canvas",
                 "--gen-length", "16", "--sample-steps", "8", "--block-length", "8", "--shift-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "prompt:    copy : a b c" in out and "canvas:" in out and "content tokens displaced" in out


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "mdlm_ctc", "--help"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0 and "compare" in out.stdout and "sample" in out.stdout


def test_train_a_hugging_face_folder_without_slack(tmp_path, capsys):
    """A model folder saved by transformers (no mdlm-ctc metadata, no <slack>) with JSONL data."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.train_from_iterator(["copy : a b c d", "user assistant"], trainer=trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<eos>", "<mask>", "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", mask_token="<mask>",
                                  unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant : "
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                         is_causal=False))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [json.dumps({"prompt": "copy : a b", "response": "a b"}),
            json.dumps({"messages": [{"role": "user", "content": "copy : c d"},
                                     {"role": "assistant", "content": "c d"}]})] * 4
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    args = ["train", "--model", str(tmp_path / "base"), "--train-file", str(tmp_path / "d.jsonl"),
            "--eval-file", str(tmp_path / "d.jsonl"), "--output-dir", str(tmp_path / "runs"), "--name", "hf",
            "--steps", "3", "--batch-size", "4", "--max-length", "16", "--no-progress", "--objective", "ctc",
            "--checkpoint-every", "0"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "runs" / "hf" / "final" / "mdlm_ctc.json").read_text())
    assert meta["special_ids"]["slack_id"] == len(tok)  # added after the existing vocabulary
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tmp_path / "runs" / "hf" / "final"), "--prompt", "copy : a b",
                 "--gen-length", "8", "--sample-steps", "8", "--block-length", "8"]) == 0
    assert "answer:" in capsys.readouterr().out
