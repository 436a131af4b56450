"""FSDP2 (``fully_shard``) on CPU with gloo: two processes match one; sharded checkpoints survive SIGKILL.

The runs use the fused LM-head CTC path (the head weight is sharded between steps), gradient
checkpointing, accumulation (2 micro-batches per process) and clipping, all at once.
"""

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

from mdlm_ctc.mdlm.checkpoint import MANIFEST_FILE, latest_checkpoint  # noqa: E402
from mdlm_ctc.mdlm.train import read_metrics  # noqa: E402

COMMON = ["--objective", "ctc", "--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-intermediate-size", "64",
          "--synthetic-train-size", "200", "--synthetic-eval-size", "10", "--max-length", "32",
          "--synthetic-max-len", "8", "--batch-size", "8", "--micro-batch-size", "2", "--steps", "16",
          "--log-every", "2", "--checkpoint-every", "4", "--keep-checkpoints", "2", "--no-progress", "--device", "cpu",
          "--warmup-steps", "2", "--lr", "3e-3", "--grad-clip", "0.5", "--fused-lm-head", "on",
          "--gradient-checkpointing", "--threads", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _torchrun(out, name, *extra, background=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mdlm_ctc",
           "train", "--output-dir", str(out), "--name", name, "--distributed", "fsdp", *COMMON, *extra]
    if background:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    single = subprocess.run([sys.executable, "-m", "mdlm_ctc", "train", "--output-dir", str(out), "--name", "single",
                             *COMMON], env=ENV, capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-4000:]
    _torchrun(out, "fsdp")
    return out


def _descendants(pid):
    """Process ids below ``pid`` (torchrun's workers run in their own process groups)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _final(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def _metrics(run_dir):
    return [{k: v for k, v in m.items() if k != "elapsed_s"} for m in read_metrics(os.path.join(run_dir,
                                                                                               "metrics.jsonl"))]


def test_two_fsdp_processes_match_one(runs):
    a, b = _final(runs / "single"), _final(runs / "fsdp")
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].shape == a[name].shape  # the consolidated export, not a shard
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    ma, mb = _metrics(runs / "single"), _metrics(runs / "fsdp")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(2, 17, 2))
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
        assert y["lr"] == x["lr"]
    assert json.load(open(runs / "fsdp" / "done.json"))["fused_lm_head"] is True


def test_fsdp_checkpoints_are_sharded_dcp_with_a_manifest(runs):
    ckpt = latest_checkpoint(str(runs / "fsdp" / "checkpoints"))
    assert ckpt.endswith("step_0000012")
    names = os.listdir(ckpt)
    assert ".metadata" in names and sum(n.endswith(".distcp") for n in names) == 2  # one shard file per rank
    assert "model.safetensors" not in names
    manifest = json.load(open(os.path.join(ckpt, MANIFEST_FILE)))
    assert manifest["layout"] == "dcp" and set(manifest["files"]) == set(names) - {MANIFEST_FILE}


def test_sigkilled_fsdp_run_resumes_to_the_uninterrupted_result(runs):
    killed = runs / "killed"
    proc = _torchrun(runs, "killed", background=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and latest_checkpoint(str(killed / "checkpoints")) is None:
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            time.sleep(0.02)
        victims = _descendants(proc.pid)
        assert len(victims) >= 2, victims
        for pid in [proc.pid, *victims]:  # the launcher and both workers, as an OOM killer or scheduler would
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    while any(_alive(pid) for pid in victims):
        time.sleep(0.05)
    assert not (killed / "done.json").exists(), "the run finished before it was killed; nothing was tested"
    resumed = _torchrun(runs, "killed", "--resume")
    assert "resuming from" in resumed.stdout
    whole, again = _final(runs / "fsdp"), _final(killed)
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], rtol=0, atol=0, msg=f"{name} differs after resume")
    assert _metrics(killed) == _metrics(runs / "fsdp")
