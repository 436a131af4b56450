"""Checkpoint integrity: manifests, fallback to the newest intact checkpoint, clear errors, safe pruning."""

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("yaml")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mdlm_ctc.cli import main  # noqa: E402
from mdlm_ctc.mdlm.checkpoint import (MANIFEST_FILE, CheckpointError, check_checkpoint,  # noqa: E402
                                      find_resumable, latest_checkpoint, prune, write_manifest)

TINY = ["--tiny-hidden-size", "32", "--tiny-layers", "2", "--tiny-intermediate-size", "64",
        "--synthetic-train-size", "200", "--synthetic-eval-size", "10", "--max-length", "32",
        "--synthetic-max-len", "8", "--batch-size", "8", "--no-progress", "--threads", "1", "--device", "cpu",
        "--steps", "6", "--checkpoint-every", "2", "--log-every", "2", "--keep-checkpoints", "3", "--lr", "3e-3",
        "--warmup-steps", "1"]


def _train(out, name, *extra):
    return main(["train", "--output-dir", str(out), "--name", name, *TINY, *extra])


def _truncate_to_half(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run (the reference) and a second run of the same job, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("ckpt")
    assert _train(out, "whole") == 0
    assert _train(out, "victim") == 0
    return out


def _final(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def test_every_checkpoint_has_a_manifest_written_last(runs):
    root = runs / "victim" / "checkpoints"
    for step in ("step_0000002", "step_0000004"):
        folder = root / step
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        on_disk = sorted(os.path.relpath(os.path.join(b, n), folder) for b, _, ns in os.walk(folder) for n in ns)
        assert sorted(manifest["files"]) == [n for n in on_disk if n != MANIFEST_FILE]
        assert manifest["layout"] == "safetensors" and manifest["step"] == int(step[5:])
        for name, entry in manifest["files"].items():
            assert entry["bytes"] == os.path.getsize(folder / name) and len(entry["sha256"]) == 64
        assert check_checkpoint(str(folder)) is None


def test_resume_falls_back_to_the_newest_intact_checkpoint(runs, capsys):
    victim = runs / "victim"
    os.remove(victim / "done.json")  # as if the run had been killed after its step-4 checkpoint
    newest = victim / "checkpoints" / "step_0000004" / "model.safetensors"
    _truncate_to_half(newest)
    assert _train(runs, "victim", "--resume") == 0
    out = capsys.readouterr().out
    assert "warning: skipping 1 damaged checkpoint" in out and str(newest) in out and "bytes" in out
    assert "resuming from" in out and "step_0000002 (step 2)" in out
    whole, resumed = _final(runs / "whole"), _final(victim)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), f"{name} differs after the fallback resume"


def test_resume_with_no_intact_checkpoint_stops_with_a_clear_error(tmp_path, capsys):
    assert _train(tmp_path, "broken") == 0
    run = tmp_path / "broken"
    os.remove(run / "done.json")
    for step in ("step_0000002", "step_0000004"):
        _truncate_to_half(run / "checkpoints" / step / "model.safetensors")
    assert _train(tmp_path, "broken", "--resume") == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint to resume from" in err and "Traceback" not in err
    assert "step_0000002/model.safetensors" in err and "step_0000004/model.safetensors" in err


def _fake_checkpoint(root, step, payload=b"weights"):
    folder = os.path.join(root, f"step_{step:07d}")
    os.makedirs(folder)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(payload * 100)
    with open(os.path.join(folder, "training_state.pt"), "wb") as f:
        f.write(b"state")
    write_manifest(folder, step, "safetensors")
    return folder


def test_same_size_corruption_and_missing_manifest_are_caught(tmp_path):
    folder = _fake_checkpoint(str(tmp_path), 3)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"X")
    assert "does not match its SHA-256" in check_checkpoint(folder)
    assert check_checkpoint(folder, checksums=False) is None  # sizes still match
    os.remove(os.path.join(folder, MANIFEST_FILE))
    assert "manifest.json is missing" in check_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_resumable(str(tmp_path), warn=lambda *a: None)
    assert find_resumable(str(tmp_path / "nothing-here")) is None


def test_pruning_never_deletes_the_last_intact_checkpoint(tmp_path):
    root = str(tmp_path)
    intact = _fake_checkpoint(root, 2)
    for step in (4, 6):
        _truncate_to_half(os.path.join(_fake_checkpoint(root, step), "model.safetensors"))
    assert latest_checkpoint(root) == intact
    deleted = prune(root, keep=1)
    assert sorted(os.listdir(root)) == ["step_0000002", "step_0000006"]
    assert [os.path.basename(d) for d in deleted] == ["step_0000004"]
    _fake_checkpoint(root, 8)
    prune(root, keep=1)
    assert sorted(os.listdir(root)) == ["step_0000008"]


def test_a_checkpoint_resumes_only_under_its_own_layout(runs):
    from mdlm_ctc.mdlm.checkpoint import load_checkpoint

    folder = str(runs / "whole" / "checkpoints" / "step_0000004")
    with pytest.raises(ValueError, match="written without FSDP; resume it without --distributed fsdp"):
        load_checkpoint(folder, None, None, None, sharded_model=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="written without --lora"):
        load_checkpoint(folder, None, None, None, trainable_only=True)
