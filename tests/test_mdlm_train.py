"""Training: the loss decreases, schedules, safe checkpoints, and SIGKILL + resume == uninterrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("yaml")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.train import (STATE_FILE, latest_checkpoint, lr_factor, prepare,  # noqa: E402
                                 read_metrics, train_run)

TINY = ["--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-intermediate-size", "64",
        "--synthetic-train-size", "400", "--synthetic-eval-size", "10", "--max-length", "32",
        "--synthetic-max-len", "8", "--batch-size", "8", "--no-progress", "--threads", "1"]
TINY_DICT = {"tiny_hidden_size": 32, "tiny_layers": 2, "tiny_intermediate_size": 64, "synthetic_train_size": 400,
             "synthetic_eval_size": 10, "max_length": 32, "synthetic_max_len": 8, "batch_size": 8,
             "progress": False}


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return [sys.executable, "-m", "mdlm_ctc", *args], env


@pytest.mark.parametrize("objective", ["ce", "ctc", "ce+ctc"])
def test_loss_decreases(tmp_path, objective):
    cfg = Config.from_dict(dict(TINY_DICT, output_dir=str(tmp_path), steps=60, lr=3e-3, warmup_steps=5,
                                log_every=10, checkpoint_every=0, objective=objective))
    prepared = prepare(cfg, cfg.run_dir(), log=lambda *a: None)
    summary = train_run(cfg, prepared, cfg.run_dir(), log=lambda *a: None)
    metrics = read_metrics(os.path.join(cfg.run_dir(), "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    assert metrics[-1]["loss"] < 0.7 * metrics[0]["loss"], [m["loss"] for m in metrics]
    assert summary["final"]["step"] == 60
    assert os.path.exists(os.path.join(cfg.run_dir(), "final", "model.safetensors"))
    assert json.load(open(os.path.join(cfg.run_dir(), "final", "mdlm_ctc.json")))["objective"] == objective


def test_schedules():
    cfg = Config.from_dict({"steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1, "schedule": "cosine"})
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=1e-3)
    cfg = Config.from_dict({"steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.0, "schedule": "wsd",
                            "wsd_decay_fraction": 0.2})
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[10:80] == [1.0] * 70 and f[-1] == pytest.approx(0.0) and f[90] == pytest.approx(0.45)
    cfg = Config.from_dict({"steps": 10, "warmup_steps": 0, "schedule": "constant"})
    assert [lr_factor(s, cfg) for s in range(10)] == [1.0] * 10


def test_checkpoints_are_safe_to_load(tmp_path):
    cfg = Config.from_dict(dict(TINY_DICT, output_dir=str(tmp_path), steps=6, checkpoint_every=2, keep_checkpoints=2,
                                log_every=2, objective="ctc"))
    prepared = prepare(cfg, cfg.run_dir(), log=lambda *a: None)
    train_run(cfg, prepared, cfg.run_dir(), log=lambda *a: None)
    root = os.path.join(cfg.run_dir(), "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step_0000002", "step_0000004"]  # kept 2, no temp files
    ckpt = latest_checkpoint(root)
    assert ckpt.endswith("step_0000004")
    state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True)  # no arbitrary pickle
    assert state["step"] == 4 and state["data"]["rows_seen"] == 32 and "optimizer" in state and "rng" in state
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())


def _final(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def _metric_lines(run_dir):
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [{k: v for k, v in m.items() if k != "elapsed_s"} for m in metrics]


@pytest.mark.parametrize("objective", ["ctc"])
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, objective):
    common = [*TINY, "--output-dir", str(tmp_path), "--steps", "120", "--checkpoint-every", "10", "--log-every", "5",
              "--objective", objective, "--slack-insertion", "best", "--keep-checkpoints", "3"]
    cmd, env = _cli("train", "--name", "whole", *common)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)

    cmd, env = _cli("train", "--name", "killed", *common)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_dir = tmp_path / "killed"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and latest_checkpoint(str(killed_dir / "checkpoints")) is None:
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "done.json").exists(), "the run finished before it was killed; nothing was tested"
    cmd, env = _cli("train", "--name", "killed", *common, "--resume")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    assert "resuming from" in out.stdout

    whole, resumed = _final(tmp_path / "whole"), _final(killed_dir)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), f"{name} differs after resume"
    assert _metric_lines(tmp_path / "whole") == _metric_lines(killed_dir)
