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
        "--shift-fractions", "0,0.5", "--base-steps", "6", "--finetune-seeds", "1,2"]
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
                 "config.yaml", "base/final/model.safetensors", "base/metrics.jsonl", "init/model.safetensors",
                 "tokenizer/tokenizer.json", "data/train.jsonl", "data/eval.jsonl", "eval/base.jsonl"):
        assert (root / name).exists(), name
    for label, files in (("ce", "ce"), ("ctc", "ctc"), ("ctc_ms0", "ctc_ms0")):
        for seed in ((1, 2) if label != "ctc_ms0" else (1,)):
            for name in (f"ft/{label}/seed{seed}/metrics.jsonl", f"ft/{label}/seed{seed}/final/model.safetensors",
                         f"eval/{files}-seed{seed}.jsonl"):
                assert (root / name).exists(), name
    assert not (root / "ft" / "ctc_ms0" / "seed2").exists()  # the control runs on the first seed only
    for png in ("loss_curves.png", "shift_robustness.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact@0 [95% CI]" in printed and "win vs ce@0" in printed and "report:" in printed
    report = (root / "report.md").read_text()
    for section in ("## Protocol", "## Results without shift", "## Shift robustness", "## Against `ce`",
                    "## The paper's claims, read from the intervals", "Claim 1", "Claim 2", "**Control**",
                    "## How the CTC settings were chosen", "## Training", "## Caveats",
                    "![loss curves](loss_curves.png)", "draws the fine-tuning seeds with replacement"):
        assert section in report, section
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["results"]) == {"base", "ce", "ctc", "ctc@ms0"}
    assert set(summary["results"]["ce"]) == {"1", "2"}
    assert set(summary["stats"]["pairs"]) == {"ctc", "ctc@ms0"}
    assert summary["stats"]["pairs"]["ctc"]["seeds"] == [1, 2]
    assert set(summary["stats"]["pairs"]["ctc"]) == {"seeds", "0.0", "0.5"}
    records = [json.loads(line) for line in (root / "eval" / "ctc-seed1.jsonl").read_text().splitlines()]
    assert len(records) == 24 and {"prediction", "reference", "exact", "edit"} <= set(records[0])


def test_fine_tunes_start_from_the_base_and_differ_only_where_they_should(compared):
    root, _ = compared
    import yaml
    from safetensors.torch import load_file

    base = load_file(str(root / "base" / "final" / "model.safetensors"))
    init = load_file(str(root / "init" / "model.safetensors"))
    assert base.keys() == init.keys() and any(not (base[k] == init[k]).all() for k in base)  # the base trained
    config = {}
    for label, seed in (("ce", 1), ("ctc", 1), ("ce", 2), ("ctc_ms0", 1)):
        config[label, seed] = yaml.safe_load((root / "ft" / label / f"seed{seed}" / "config.yaml").read_text())
        assert config[label, seed]["train"]["init_from"] == str(root / "base" / "final")
    ce, ctc = config["ce", 1], config["ctc", 1]
    assert ce["objective"].pop("objective") == "ce" and ctc["objective"].pop("objective") == "ctc"
    assert ce == ctc  # same seed: only the objective differs
    assert config["ce", 2]["run"]["seed"] == 2 and ce["run"]["seed"] == 1
    assert config["ctc_ms0", 1]["objective"]["ctc_max_shift"] == 0


def test_compare_reuses_the_base_and_finished_runs(compared, capsys):
    root, _ = compared
    before = json.loads((root / "summary.json").read_text())["stats"]
    assert main(["compare", "--output-dir", str(root.parent), "--name", "job", *TINY, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and str(root / "base") in out
    assert "training it again" not in out
    # the same models, sampler and examples: the evaluations are read back, and give the same statistics
    assert out.count("evaluation reused") == 6 and "[ctc/seed2] evaluation reused" in out
    assert json.loads((root / "summary.json").read_text())["stats"] == before


def test_a_changed_base_setting_retrains_the_base(tmp_path, capsys):
    from mdlm_ctc.mdlm.compare import train_once
    from mdlm_ctc.mdlm.config import Config
    from mdlm_ctc.mdlm.train import prepare

    cfg = Config.from_dict(dict(tiny_hidden_size=32, tiny_layers=2, tiny_intermediate_size=64, synthetic_train_size=50,
                                synthetic_eval_size=4, max_length=32, synthetic_max_len=6, batch_size=4, steps=2,
                                checkpoint_every=0, output_dir=str(tmp_path), progress=False))
    prepared = prepare(cfg, str(tmp_path / "r"), log=lambda *a: None)
    run_dir = str(tmp_path / "r" / "run")
    first = train_once(cfg, prepared, run_dir, "ce", log=print)
    again = train_once(cfg, prepared, run_dir, "ce", log=print)
    assert again == first and "reusing" in capsys.readouterr().out
    cfg.train.lr = cfg.train.lr / 2
    train_once(cfg, prepared, run_dir, "ce", log=print)
    assert "training it again" in capsys.readouterr().out
    train_once(cfg, prepared, run_dir, "ce", log=print)
    assert "reusing" in capsys.readouterr().out
    # other initial weights at the same path (a retrained base): the runs made from them are retrained
    from safetensors.torch import load_file, save_file

    weights_path = os.path.join(prepared.init_source, "model.safetensors")
    weights = load_file(weights_path)
    save_file({k: v + 1e-3 for k, v in weights.items()}, weights_path, metadata={"format": "pt"})
    train_once(cfg, prepared, run_dir, "ce", log=print)
    assert "training it again" in capsys.readouterr().out


def test_eval_and_sample_commands(compared, capsys):
    root, _ = compared
    ctc, ce = root / "ft" / "ctc" / "seed1" / "final", root / "ft" / "ce" / "seed1" / "final"
    assert main(["eval", "--output-dir", str(root.parent), "--name", "job", "--checkpoint", str(ctc),
                 "--baseline", str(ce), *EVAL]) == 0
    out = capsys.readouterr().out
    assert "ctc" in out and "win vs ce@0" in out
    assert main(["sample", "--checkpoint", str(ctc), "--prompt", "copy : a b c", "--show-canvas",
                 "--gen-length", "16", "--sample-steps", "8", "--block-length", "8", "--shift-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "prompt:    copy : a b c _ _ _\n" in out and "canvas:" in out and "content tokens displaced" in out
    assert "note: prompt written in the training format: copy : a b c _ _ _" in out  # the width it was trained on
    assert main(["sample", "--checkpoint", str(ctc), "--prompt", "copy : a b zebra"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # (transformers' loading bar comes first on stderr)
    assert line.startswith("mdlm-ctc sample: error: ") and "does not know: zebra" in line and "copy : a c b" in line


def test_ablate_writes_its_table_and_compare_reports_it(compared, capsys):
    root, _ = compared
    assert main(["ablate", "--output-dir", str(root.parent), "--name", "job", *TINY, "--variants", "eos-b1",
                 "--synthetic-val-size", "10", "--finetune-seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "chosen:" in out  # the comparison's base is reused
    table = (root / "ablation" / "ablation.md").read_text()
    assert "`ce`" in table and "`eos-b1`" in table and "Validation split (10 examples" in table
    data = json.loads((root / "ablation" / "ablation.json").read_text())
    assert set(data["variants"]) == {"ce", "eos-b1"} and data["chosen"] == "eos-b1" and data["examples"] == 10
    assert main(["compare", "--output-dir", str(root.parent), "--name", "job", *TINY, "--resume",
                 "--shift-fractions", "0,0.5"]) == 0
    capsys.readouterr()
    assert "`eos-b1`" in (root / "report.md").read_text()


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
