"""What the main job's verdict rests on: the gap test, the power figures, the mechanism line, the shipped
base (identity, reproducible build, used by compare and reported), and the user-facing fixes (prompts,
output folders, plans without data, the OpenMP wait policy)."""

import json
import math
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from mdlm_ctc.mdlm import model as M  # noqa: E402
from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.evaluate import crossed_bootstrap, detectable_difference, gap_stats  # noqa: E402
from mdlm_ctc.mdlm.sampler import generate_group  # noqa: E402

SPECIAL = M.SpecialIds(mask_id=2, eos_id=1, slack_id=3, pad_id=0)
V = 20
TINY = {"tiny_hidden_size": 32, "tiny_layers": 2, "tiny_intermediate_size": 64, "synthetic_train_size": 200,
        "synthetic_eval_size": 8, "synthetic_val_size": 8, "max_length": 32, "synthetic_max_len": 6, "batch_size": 8,
        "steps": 4, "base_steps": 5, "log_every": 2, "checkpoint_every": 0, "progress": False, "gen_length": 16,
        "sample_steps": 8, "block_length": 8, "bootstrap_samples": 50, "shift_fractions": "0,0.5",
        "finetune_seeds": "1", "threads": 1}


class GapModel(torch.nn.Module):
    """Predicts ``table[j]`` at canvas position ``j`` (earlier positions more confident), except that a masked
    position whose right neighbour holds ``table[j]`` (the token was displaced there) gets ``answer`` with
    probability ``p`` (the rest on ``table[j]``)."""

    def __init__(self, prompt_length, table, answer, p=0.75):
        super().__init__()
        self.P, self.table, self.answer, self.p = prompt_length, table, answer, p
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, want="logits"):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, V)
        for b in range(B):
            for j, tok in enumerate(self.table):
                pos = self.P + j
                displaced = (input_ids[b, pos] == SPECIAL.mask_id and pos + 1 < L and input_ids[b, pos + 1] == tok)
                if displaced:
                    logits[b, pos, self.answer] = 40.0 + math.log(self.p)
                    logits[b, pos, tok] = 40.0 + math.log(1 - self.p)
                else:
                    logits[b, pos, tok] = 10.0 - j  # earlier positions are more confident
        return logits


def _cfg(**kw):
    base = dict(gen_length=4, block_length=4, sample_steps=4, temperature=0.0)
    base.update(kw)
    return Config.from_dict(base).sample


# ------------------------------------------------------------------------------ the single-displacement probe
def test_probe_displaces_one_token_and_records_the_gap():
    # one token per step: 10 at 0, 11 at 1, ... ; the probe displaces the content commit of index 1 (token 11)
    model = GapModel(2, [10, 11, 12, 13], answer=SPECIAL.slack_id)
    out = generate_group(model, torch.tensor([[5, 6]]), [torch.Generator()], SPECIAL, _cfg(), probe=[1])[0]
    gap = out.gap
    assert (gap["position"], gap["to"], gap["token"], gap["content_index"]) == (1, 2, 11, 1)
    assert gap["p_slack"] == pytest.approx(0.75, abs=1e-6) and gap["p_duplicate"] == pytest.approx(0.25, abs=1e-6)
    assert gap["p_other"] == pytest.approx(0.0, abs=1e-6) and gap["top"] == SPECIAL.slack_id
    assert out.displaced == 1 and out.canvas[:3] == [10, 3, 11] and gap["final"] == SPECIAL.slack_id
    assert out.tokens == [10, 11, 13]  # slack deleted; 12 never found a place (the canvas is 4 long)
    # a model that writes the duplicate
    dup = generate_group(GapModel(2, [10, 11, 12, 13], answer=7, p=0.1), torch.tensor([[5, 6]]), [torch.Generator()],
                         SPECIAL, _cfg(), probe=[0])[0]
    assert dup.gap["top"] == 10 and dup.gap["final"] == 10 and dup.canvas[:2] == [10, 10]
    assert dup.gap["p_duplicate"] == pytest.approx(0.9, abs=1e-6)
    # no probe (-1): nothing moves, like shift fraction 0
    none = generate_group(model, torch.tensor([[5, 6]]), [torch.Generator()], SPECIAL, _cfg(), probe=[-1])[0]
    assert none.gap is None and none.displaced == 0 and none.canvas == [10, 11, 12, 13]
    with pytest.raises(ValueError, match="probe"):
        generate_group(model, torch.tensor([[5, 6]]), [torch.Generator()], SPECIAL, _cfg(), shift_fraction=0.1,
                       probe=[0])


def test_a_blocked_probe_moves_the_next_content_commit():
    # all four positions are committed in one step: only the last has... no free right neighbour at all, so the
    # probe finds none; with two per step, index 0 is blocked by its neighbour and index 1 moves
    model = GapModel(2, [10, 11, 12, 13], answer=SPECIAL.slack_id)
    one_step = generate_group(model, torch.tensor([[5, 6]]), [torch.Generator()], SPECIAL,
                              _cfg(sample_steps=1), probe=[0])[0]
    assert one_step.gap is None and one_step.blocked == 4
    two = generate_group(model, torch.tensor([[5, 6]]), [torch.Generator()], SPECIAL, _cfg(sample_steps=2),
                         probe=[0])[0]
    assert two.blocked == 1 and two.gap["token"] == 11 and two.gap["to"] == 2


# ------------------------------------------------------------------------------ statistics
def test_detectable_difference_is_the_power_formula():
    stat = {"lo": -0.02, "hi": 0.02}  # SE = 0.04 / 3.92
    assert detectable_difference(stat) == pytest.approx((1.959964 + 0.841621) * 0.04 / (2 * 1.959964), rel=1e-5)
    assert detectable_difference(stat, power=0.5) == pytest.approx(0.02, rel=1e-5)  # z_0.5 = 0: the half-width


def test_crossed_bootstrap_skips_missing_cells():
    v = np.array([[1.0, np.nan, 0.0, 1.0], [np.nan, 1.0, 1.0, 1.0]])
    out = crossed_bootstrap(v, samples=200)
    assert out["mean"] == pytest.approx(5 / 6) and out["seed_means"] == pytest.approx([2 / 3, 1.0])
    assert 0 <= out["lo"] <= out["mean"] <= out["hi"] <= 1
    assert math.isnan(crossed_bootstrap(np.full((2, 3), np.nan))["mean"])


def _gap_run(p_slack, final, exact_after, placed=None):
    n = len(p_slack)
    placed = placed or [True] * n
    recs = []
    for i in range(n):
        recs.append({"placed": placed[i], "p_slack": p_slack[i] if placed[i] else float("nan"),
                     "p_duplicate": (1 - p_slack[i]) if placed[i] else float("nan"),
                     "p_other": 0.0 if placed[i] else float("nan"), "top": final[i] if placed[i] else None,
                     "final": final[i] if placed[i] else None, "exact_after": exact_after[i]})
    return {"records": recs}


def _plain(exact):
    return {"fractions": {0.0: {"records": [{"exact": e} for e in exact]}}}


def test_gap_stats_and_the_mechanism_line():
    from mdlm_ctc.mdlm.report import gap_markdown, mechanism_line

    n = 40
    ce = {s: _gap_run([0.0] * n, ["duplicate"] * n, [0.0] * n) for s in (1, 2)}
    ctc = {s: _gap_run([0.9] * n, ["slack"] * n, [1.0] * n) for s in (1, 2)}
    plain = {s: _plain([1.0] * n) for s in (1, 2)}
    stats = gap_stats({"ce": ce, "ctc": ctc}, {"ce": plain, "ctc": plain}, 0.0, "ce", samples=100)
    fam = stats["families"]
    assert fam["ce"]["drop"]["mean"] == 1.0 and fam["ctc"]["drop"]["mean"] == 0.0
    assert fam["ctc"]["final_slack"]["mean"] == 1.0 and fam["ce"]["final_duplicate"]["mean"] == 1.0
    pair = stats["pairs"]["ctc"]
    assert pair["p_slack"]["mean"] == pytest.approx(0.9) and pair["drop_diff"]["mean"] == 1.0  # ce's minus ctc's
    assert "detectable" in pair["p_slack"]
    assert "the mechanism works here" in mechanism_line(stats)
    assert "| `ctc` | 2 | 1.000 |" in gap_markdown(stats)
    # CTC that raises slack a little but still writes the duplicate
    weak = {s: _gap_run([0.3] * n, ["duplicate"] * n, [0.0] * n) for s in (1, 2)}
    stats = gap_stats({"ce": ce, "ctc": weak}, {"ce": plain, "ctc": plain}, 0.0, "ce", samples=100)
    assert "the mechanism is weak here" in mechanism_line(stats)
    same = gap_stats({"ce": ce, "ctc": ce}, {"ce": plain, "ctc": plain}, 0.0, "ce", samples=100)
    assert "no sign of the mechanism" in mechanism_line(same)
    # a rise far below a point of probability (both print 0.000) is no rise
    tiny = {s: _gap_run([1e-6] * n, ["duplicate"] * n, [0.0] * n) for s in (1, 2)}
    stats = gap_stats({"ce": ce, "ctc": tiny}, {"ce": plain, "ctc": plain}, 0.0, "ce", samples=100)
    assert stats["pairs"]["ctc"]["p_slack"]["lo"] > 0 and "no sign of the mechanism" in mechanism_line(stats)
    # nothing could be displaced: said, not a row of nan
    empty = {s: _gap_run([0.0] * 3, ["other"] * 3, [0.0] * 3, placed=[False] * 3) for s in (1,)}
    stats = gap_stats({"ce": empty, "ctc": empty}, {"ce": {1: _plain([0.0] * 3)}, "ctc": {1: _plain([0.0] * 3)}},
                      0.0, "ce", samples=20)
    assert "not measured" in mechanism_line(stats)


# ------------------------------------------------------------------------------ prompts, folders, plans
def test_hand_prompts_are_written_in_the_training_format():
    from mdlm_ctc.mdlm.prompts import synthetic_prompt

    assert synthetic_prompt("copy : a b c", 6) == "copy : a b c _ _ _"
    assert synthetic_prompt("reverse : a b", 4) == "reverse : _ _ a b"
    assert synthetic_prompt("insert x 1 : a b", 4) == "insert x 1 : a b _"
    assert synthetic_prompt("copy : a b c _ _ _", 6) == "copy : a b c _ _ _"  # already in form
    assert synthetic_prompt("hello there", 6) == "hello there"               # not a task prompt
    with pytest.raises(ValueError, match="at most 3 symbols"):
        synthetic_prompt("insert x 1 : a b c d", 4)
    with pytest.raises(ValueError, match="is not a copy prompt"):
        synthetic_prompt("copy a b", 6)


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    from mdlm_ctc.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="`output_dir` must be a folder"):
        Config.from_dict({"output_dir": str(afile)})
    with pytest.raises(ValueError, match="is a file, not a folder"):
        Config.from_dict({"output_dir": str(afile / "sub")})
    assert main(["compare", "--output-dir", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err


def test_plan_needs_no_data_files(tmp_path, capsys):
    from mdlm_ctc.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(f"data: {{train_file: {tmp_path / 'nope.jsonl'}, eval_file: {tmp_path / 'nope2.jsonl'}}}\n"
                   f"run: {{output_dir: {tmp_path}}}\n")
    assert main(["plan", "--config", str(job)]) == 0
    assert "ddp" in capsys.readouterr().out
    assert main(["train", "--config", str(job)]) == 2  # training does read them
    assert "`train_file` must be an existing file" in capsys.readouterr().err


def test_the_cli_runs_with_a_passive_openmp_wait_policy(monkeypatch):
    from mdlm_ctc import cli

    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: calls.append((exe, argv)))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cli.sys, "argv", [os.path.join("x", "mdlm_ctc", "__main__.py"), "compare", "--steps", "3"])
    cli._passive_openmp(None)
    assert calls == [(cli.sys.executable, [cli.sys.executable, "-m", "mdlm_ctc", "compare", "--steps", "3"])]
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    calls.clear()
    cli._passive_openmp(None)        # the variable is set now: no second run
    cli._passive_openmp(["compare"])  # called in-process
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    cli._passive_openmp(None)        # one thread: no OpenMP waits
    assert calls == []


# ------------------------------------------------------------------------------ the shipped base
def test_shipped_base_is_the_default_jobs_base():
    """The asset in the package is what `compare` with default options would train: same settings, same
    initial weights, same tokenizer, and weights matching their recorded SHA-256."""
    from mdlm_ctc.mdlm import base as B
    from mdlm_ctc.mdlm.compare import base_config, run_settings, same_settings
    from mdlm_ctc.mdlm.train import prepare

    identity = B.read_identity()
    if identity is None:
        pytest.skip("no shipped base in this checkout")
    cfg = Config()
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        prepared = prepare(cfg, root, log=lambda *a: None)
        ok, why = B.check_shipped(run_settings(base_config(cfg), prepared), prepared.tokenizer.get_vocab(),
                                  same_settings)
    assert ok, why
    for key in ("sha256", "threads", "machine", "commit", "torch", "steps", "final_loss", "train_seconds"):
        assert identity[key] not in (None, ""), key
    assert identity["steps"] == cfg.base_step_count() and identity["resumed_from"] == 0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny base built twice by the build script (same thread count): the same bits."""
    from mdlm_ctc.mdlm.build_base import build

    root = tmp_path_factory.mktemp("build")
    ids = []
    for i in (0, 1):
        cfg = Config.from_dict(dict(TINY, output_dir=str(root), name=f"b{i}"))
        ids.append(build(cfg, str(root / f"asset{i}"), threads=1, log=lambda *a: None))
    return root, ids


def test_the_build_script_reproduces_its_base(built):
    root, (a, b) = built
    assert a["sha256"] == b["sha256"] and a["settings"] == b["settings"]
    assert a["threads"] == 1 and a["steps"] == 5 and a["final_loss"] > 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "mdlm_ctc.json", "identity.json"):
        assert (root / "asset0" / name).exists(), name


def test_compare_uses_the_shipped_base_and_says_so(built, tmp_path, monkeypatch, capsys):
    from mdlm_ctc.mdlm import base as B
    from mdlm_ctc.mdlm.compare import run_compare

    root, (identity, _) = built
    monkeypatch.setattr(B, "ASSET_DIR", str(root / "asset0"))
    cfg = Config.from_dict(dict(TINY, output_dir=str(tmp_path), name="job", compare_objectives="ce",
                                control=False, gap_test=False))
    summary = run_compare(cfg, log=print)
    out = capsys.readouterr().out
    assert "[base] the shipped base" in out and "training the base" not in out
    assert summary["base"]["origin"] == "shipped" and summary["base"]["identity"]["sha256"] == identity["sha256"]
    assert B.weights_sha256(str(tmp_path / "job" / "base" / "final")) == identity["sha256"]
    report = (tmp_path / "job" / "report.md").read_text()
    assert "Shipped with the package" in report and identity["sha256"] in report
    assert "trained without interruption" in report
    # another base setting: trained here, and said why
    other = Config.from_dict(dict(TINY, output_dir=str(tmp_path), name="job2", compare_objectives="ce",
                                  control=False, gap_test=False, base_lr=1e-4))
    summary = run_compare(other, log=print)
    out = capsys.readouterr().out
    assert "training the base here" in out and f"base settings differ from the shipped base's (lr: {Config().compare.base_lr:g} shipped, 0.0001 here)" in out
    assert summary["base"]["origin"] == "trained"
    assert "Trained in this run with 1 thread(s)" in (tmp_path / "job2" / "report.md").read_text()
    with pytest.raises(ValueError, match="`base_source` is 'shipped'"):
        run_compare(Config.from_dict(dict(TINY, output_dir=str(tmp_path), name="job3", base_lr=1e-4,
                                          base_source="shipped")), log=lambda *a: None)
    # base_source train: the shipped copy is replaced by a base trained here
    again = Config.from_dict(dict(TINY, output_dir=str(tmp_path), name="job", compare_objectives="ce",
                                  control=False, gap_test=False, base_source="train"))
    assert run_compare(again, log=lambda *a: None)["base"]["origin"] == "trained"


def test_a_damaged_shipped_base_is_not_used(built, tmp_path, monkeypatch):
    from mdlm_ctc.mdlm import base as B
    from mdlm_ctc.mdlm.compare import base_config, run_settings, same_settings
    from mdlm_ctc.mdlm.train import prepare

    root, _ = built
    asset = tmp_path / "asset"
    shutil.copytree(root / "asset0", asset)
    cfg = Config.from_dict(dict(TINY, output_dir=str(tmp_path), name="b0"))
    prepared = prepare(cfg, cfg.run_dir(), log=lambda *a: None)
    settings = run_settings(base_config(cfg), prepared)
    vocab = prepared.tokenizer.get_vocab()
    assert B.check_shipped(settings, vocab, same_settings, str(asset)) == (True, "")
    weights = asset / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    ok, why = B.check_shipped(settings, vocab, same_settings, str(asset))
    assert not ok and "damaged" in why
    identity = json.loads((asset / "identity.json").read_text())
    assert B.check_shipped(settings, vocab, same_settings, str(tmp_path / "nowhere"))[1].startswith("no shipped base")
    assert identity["settings"]["source"]["weights"] == settings["source"]["weights"]
