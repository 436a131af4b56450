"""DDP: two gloo processes on CPU match one process with the same global batch."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("yaml")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mdlm_ctc.mdlm.train import read_metrics  # noqa: E402

COMMON = ["--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-intermediate-size", "64",
          "--synthetic-train-size", "300", "--synthetic-eval-size", "10", "--max-length", "32",
          "--synthetic-max-len", "8", "--batch-size", "8", "--steps", "12", "--log-every", "2",
          "--checkpoint-every", "6", "--no-progress", "--device", "cpu", "--warmup-steps", "2", "--lr", "3e-3"]


@pytest.mark.parametrize("objective", ["ctc", "ce"])
def test_two_processes_match_one(tmp_path, objective):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["train", "--output-dir", str(tmp_path), "--objective", objective, *COMMON]
    # one process, two micro-batches of 4 (gradient accumulation) == two processes with 4 rows each
    single = subprocess.run([sys.executable, "-m", "mdlm_ctc", *args, "--name", "single", "--micro-batch-size", "4",
                             "--threads", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mdlm_ctc", *args, "--name", "ddp", "--threads", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(os.path.join(tmp_path, "single", "final", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "ddp", "final", "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    ma, mb = read_metrics(os.path.join(tmp_path, "single", "metrics.jsonl")), read_metrics(
        os.path.join(tmp_path, "ddp", "metrics.jsonl"))
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [2, 4, 6, 8, 10, 12]
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
        assert y["lr"] == x["lr"]
    assert os.path.isdir(os.path.join(tmp_path, "ddp", "checkpoints", "step_0000006"))
