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
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's mdlm_ctc, not an installed one


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


def test_the_consolidated_export_loads_in_hugging_face_eval_and_sample(runs, capsys):
    from transformers import AutoModelForCausalLM

    from mdlm_ctc.cli import main

    final = runs / "fsdp" / "final"
    model = AutoModelForCausalLM.from_pretrained(str(final))
    reference = _final(runs / "single")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5)
    data = ["--synthetic-train-size", "200", "--synthetic-eval-size", "10", "--synthetic-max-len", "8", "--device",
            "cpu", "--no-progress", "--gen-length", "8", "--sample-steps", "4", "--block-length", "8"]
    assert main(["sample", "--checkpoint", str(final), "--num-samples", "2", *data]) == 0
    assert capsys.readouterr().out.count("prompt:") == 2
    assert main(["eval", "--checkpoint", str(final), "--output-dir", str(runs), "--name", "eval", *data,
                 "--max-eval-examples", "3", "--shift-fractions", "0", "--bootstrap-samples", "10"]) == 0
    assert "per-example outputs" in capsys.readouterr().out


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


DTENSOR_WORKER = r'''
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import mdlm_ctc

dist.init_process_group("gloo")
rank = dist.get_rank()
inputs = torch.load(sys.argv[1])
mesh = init_device_mesh("cpu", (2,))
weight = distribute_tensor(inputs["weight"].clone(), mesh, [Shard(0)]).requires_grad_()
bias = distribute_tensor(inputs["bias"].clone(), mesh, [Shard(0)]).requires_grad_()
hidden, targets, lengths = inputs["hidden"][rank], inputs["targets"][rank], inputs["lengths"][rank]
loss = mdlm_ctc.linear_slack_ctc_loss(hidden, weight, targets, lengths, bias=bias, slack_id=0, chunk_size=5)
loss.backward()
torch.save({"loss": loss.detach(), "weight_grad": weight.grad.to_local(), "bias_grad": bias.grad.to_local(),
            "placements": [str(p) for p in weight.grad.placements]}, f"{sys.argv[2]}.{rank}")
dist.destroy_process_group()
'''


def test_linear_slack_ctc_loss_takes_a_sharded_dtensor_head(tmp_path):
    """A Shard(0) DTensor weight/bias: gathered for the loss, gradient summed over ranks and returned sharded."""
    from torch.distributed.tensor import Shard

    import mdlm_ctc

    g = torch.Generator().manual_seed(0)
    V, D, T = 10, 6, 7  # V even: one 5-row shard per rank
    inputs = {"weight": torch.randn(V, D, generator=g, dtype=torch.float64),
              "bias": torch.randn(V, generator=g, dtype=torch.float64),
              "hidden": torch.randn(2, 2, T, D, generator=g, dtype=torch.float64),
              "targets": torch.randint(1, V, (2, 2, 4), generator=g), "lengths": torch.tensor([[4, 3], [2, 4]])}
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "worker.py").write_text(DTENSOR_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), str(tmp_path / "inputs.pt"), str(tmp_path / "out")],
                          env=dict(ENV, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    weight = inputs["weight"].clone().requires_grad_()
    bias = inputs["bias"].clone().requires_grad_()
    total = 0
    for rank in range(2):
        loss = mdlm_ctc.linear_slack_ctc_loss(inputs["hidden"][rank], weight, inputs["targets"][rank],
                                              inputs["lengths"][rank], bias=bias, slack_id=0)
        got = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(got["loss"], loss.detach())
        total = total + loss
    total.backward()  # the gradient of the sum of both ranks' losses, sliced per shard
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got["placements"] == [str(Shard(0))]
        torch.testing.assert_close(got["weight_grad"], weight.grad[5 * rank:5 * (rank + 1)])
        torch.testing.assert_close(got["bias_grad"], bias.grad[5 * rank:5 * (rank + 1)])


def test_mixed_precision_policy_is_bf16_with_fp32_reduction_on_gpu_only():
    from mdlm_ctc.mdlm.distributed import mixed_precision_policy

    gpu = mixed_precision_policy(torch.device("cuda", 0), "auto")  # a device object needs no GPU
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    for device, precision in ((torch.device("cpu"), "auto"), (torch.device("cuda", 0), "fp32")):
        policy = mixed_precision_policy(device, precision)
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)  # the parameters' own fp32
