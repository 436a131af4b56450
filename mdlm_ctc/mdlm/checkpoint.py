"""Resumable checkpoints that can be trusted: two layouts, one integrity manifest, safe pruning.

**Layouts** (``<run>/checkpoints/step_XXXXXXX/``):

* ``safetensors`` (one process, DDP): ``model.safetensors`` + ``config.json`` (``save_pretrained``),
  ``training_state.pt`` (optimizer, scheduler, RNG, data position; tensors and plain containers only,
  read back with ``torch.load(weights_only=True)``), ``run_config.json``.
* ``dcp`` (FSDP2): the model and optimizer state through ``torch.distributed.checkpoint``
  (``get_state_dict`` / ``set_state_dict``), every rank writing its own shards (``*.distcp`` and
  ``.metadata``), so nothing is ever gathered on one rank; ``training_state.pt`` holds the scheduler,
  the data position and every rank's RNG state. DCP reshards on load, so a run may resume on another
  number of processes.
* LoRA (``--lora``), either layout: only the trainable tensors (adapters and ``<slack>`` rows;
  ``adapter.safetensors`` instead of ``model.safetensors``), the frozen base being the run's initial model.

**Integrity.** Every checkpoint ends with ``manifest.json``: the size and SHA-256 of each of its files,
written last (after every file is fsynced) and atomically. A checkpoint is written into a temporary
folder that is renamed into place only after its manifest exists. ``--resume`` verifies the newest
checkpoint against its manifest and falls back, with a warning naming the damaged file, to the newest
intact one; when none is intact it stops with a :class:`CheckpointError` (a ``ValueError``: the CLI
prints it without a traceback) naming every damaged file. Pruning (``keep_checkpoints``) never deletes
the newest checkpoint whose files still match their recorded sizes, whatever damaged checkpoints newer
than it exist. Under several processes the hashing is split across ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil

import torch

STATE_FILE = "training_state.pt"
ADAPTER_STATE_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
_HASH_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """No intact checkpoint to resume from (the message names the damaged files)."""


# ------------------------------------------------------------------------------ process-group helpers
def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_objects(obj) -> list:
    rank, world = _world()
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj):
    rank, world = _world()
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    import numpy as np

    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ manifest
def _files_of(folder: str) -> list[str]:
    """Every file under ``folder`` (relative paths, sorted), except the manifest itself."""
    found = []
    for base, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), folder)
            if rel != MANIFEST_FILE:
                found.append(rel)
    return sorted(found)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_identity(source: str) -> str:
    """The initial weights a run starts from: the SHA-256 of a folder's ``model.safetensors``, else the name."""
    path = os.path.join(source, "model.safetensors")
    return sha256_of(path) if os.path.isfile(path) else source


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _describe_files(folder: str, names: list[str]) -> dict:
    """{name: {"bytes", "sha256"}} for this rank's share of ``names`` (round robin over ranks)."""
    rank, world = _world()
    out = {}
    for name in names[rank::world]:
        path = os.path.join(folder, name)
        _fsync_file(path)
        out[name] = {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    return out


def write_manifest(folder: str, step: int, layout: str) -> None:
    """Hash every file of ``folder`` (split across ranks) and write ``manifest.json`` last (rank 0)."""
    names = _broadcast_object(_files_of(folder) if _world()[0] == 0 else None)
    files = {}
    for part in _gather_objects(_describe_files(folder, names)):
        files.update(part)
    if _world()[0] == 0:
        manifest = {"format": 1, "layout": layout, "step": step, "files": dict(sorted(files.items()))}
        tmp = os.path.join(folder, f".{MANIFEST_FILE}.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, MANIFEST_FILE))
        _fsync_dir(folder)


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def check_checkpoint(folder: str, *, checksums: bool = True) -> str | None:
    """``None`` when ``folder`` matches its manifest, else what is wrong (naming the file).

    ``checksums=False`` compares the sizes only (cheap: used for pruning). With several processes the
    hashing is split across ranks and every rank gets the same verdict.
    """
    manifest = read_manifest(folder)
    problem = None
    if manifest is None:
        problem = (f"{os.path.join(folder, MANIFEST_FILE)} is missing or unreadable (a checkpoint cut "
                   f"before it finished, or written by an older mdlm-ctc)")
    else:
        for name, entry in manifest["files"].items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                problem = f"{path} is missing"
                break
            size = os.path.getsize(path)
            if size != entry["bytes"]:
                problem = f"{path} has {size} bytes; the manifest records {entry['bytes']}"
                break
    if problem is not None or not checksums:
        return problem
    names = sorted(manifest["files"])
    rank, world = _world()
    mine = None
    for name in names[rank::world]:
        if sha256_of(os.path.join(folder, name)) != manifest["files"][name]["sha256"]:
            mine = f"{os.path.join(folder, name)} does not match its SHA-256 in the manifest"
            break
    verdicts = [v for v in _gather_objects(mine) if v is not None]
    return verdicts[0] if verdicts else None


def step_folders(ckpt_root: str) -> list[str]:
    """``step_*`` folders under ``ckpt_root``, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(os.path.join(ckpt_root, d) for d in os.listdir(ckpt_root)
                  if d.startswith("step_") and os.path.isdir(os.path.join(ckpt_root, d)))


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The newest checkpoint whose files have the sizes its manifest records (no hashing)."""
    for folder in reversed(step_folders(ckpt_root)):
        if check_checkpoint(folder, checksums=False) is None:
            return folder
    return None


def find_resumable(ckpt_root: str, warn=print) -> str | None:
    """The newest fully verified checkpoint; warns about each damaged newer one it skips.

    ``None`` when the run has no checkpoint at all; :class:`CheckpointError` when it has some but none is
    intact.
    """
    folders = step_folders(ckpt_root)
    damaged = []
    for folder in reversed(folders):
        problem = check_checkpoint(folder)
        if problem is None:
            if damaged:
                warn(f"warning: skipping {len(damaged)} damaged checkpoint(s) ({'; '.join(damaged)}); resuming "
                     f"from the newest intact one, {folder}")
            return folder
        damaged.append(problem)
    if damaged:
        raise CheckpointError(f"no intact checkpoint to resume from in {ckpt_root}: " + "; ".join(damaged)
                              + ". Restore the damaged file(s) or start again without --resume")
    return None


def prune(ckpt_root: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest checkpoints, never the newest intact one; returns what was deleted."""
    folders = step_folders(ckpt_root)
    kept = set(folders[-keep:])
    newest_intact = latest_checkpoint(ckpt_root)
    if newest_intact is not None:
        kept.add(newest_intact)
    deleted = [f for f in folders if f not in kept]
    for folder in deleted:
        shutil.rmtree(folder, ignore_errors=True)
    return deleted


# ------------------------------------------------------------------------------ save and load
def _publish(ckpt_root: str, tmp: str, final: str, keep: int) -> None:
    """Rank 0: rename the finished temporary folder into place, point ``latest`` at it, prune."""
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = os.path.join(ckpt_root, f".latest-{os.getpid()}")
    with open(pointer_tmp, "w") as f:
        f.write(os.path.basename(final) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(ckpt_root, LATEST_FILE))
    _fsync_dir(ckpt_root)
    prune(ckpt_root, keep)


def _dcp_options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only)


def save_checkpoint(ckpt_root: str, step: int, hf_model, optimizer, scheduler, data_state: dict, keep: int,
                    config: dict, *, sharded_model=None, trainable_only: bool = False) -> str:
    """Write ``step_XXXXXXX`` (see the module docstring), prune to ``keep``; returns its path.

    Called on every rank (single-process layouts are written by rank 0; every rank hashes a share).
    ``sharded_model``: the ``fully_shard``-ed module (``dcp`` layout); ``hf_model`` then only gives its
    ``config``. ``trainable_only`` (LoRA): only the trainable tensors are saved (``adapter.safetensors``
    or the DCP shards), the frozen base is the run's initial model.
    """
    rank, _ = _world()
    name = f"step_{step:07d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}")
    layout = "dcp" if sharded_model is not None else "safetensors"
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state = {"step": step, "layout": layout, "trainable_only": trainable_only,
             "scheduler": scheduler.state_dict(), "data": data_state}
    rngs = _gather_objects(rng_state())
    state["rng"], state["rng_by_rank"] = rngs[rank], rngs
    if layout == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(sharded_model, optimizer, options=_dcp_options(trainable_only))
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    elif rank == 0:
        if trainable_only:
            from safetensors.torch import save_file

            from .lora import trainable_state_dict

            save_file({k: v.contiguous() for k, v in trainable_state_dict(hf_model).items()},
                      os.path.join(tmp, ADAPTER_STATE_FILE))
            hf_model.config.save_pretrained(tmp)
        else:
            hf_model.save_pretrained(tmp, safe_serialization=True)
        state["optimizer"] = optimizer.state_dict()
    if rank == 0:
        if layout == "dcp":
            hf_model.config.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(config, f, indent=1)
    _barrier()
    write_manifest(tmp, step, layout)
    if rank == 0:
        _publish(ckpt_root, tmp, final, keep)
    _barrier()
    return final


def load_checkpoint(path: str, hf_model, optimizer, scheduler, *, sharded_model=None,
                    trainable_only: bool = False) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` into the model, optimizer and scheduler.

    Returns the training state (``step``, ``data``, ...). A ``dcp`` checkpoint needs ``sharded_model``
    (any number of processes: DCP reshards); a ``safetensors`` one the plain Hugging Face model.
    """
    state = torch.load(os.path.join(path, STATE_FILE), weights_only=True, map_location="cpu")
    layout = state.get("layout", "safetensors")
    if bool(state.get("trainable_only", False)) != trainable_only:
        raise ValueError(f"checkpoint {path} was written {'with' if not trainable_only else 'without'} --lora; "
                         f"resume it with the same setting")
    if layout == "dcp":
        if sharded_model is None:
            raise ValueError(f"checkpoint {path} was written by an FSDP run (sharded); resume it with "
                             f"--distributed fsdp")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        options = _dcp_options(trainable_only)
        model_sd, optim_sd = get_state_dict(sharded_model, optimizer, options=options)
        loaded = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(sharded_model, optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"], options=options)
    else:
        if sharded_model is not None:
            raise ValueError(f"checkpoint {path} was written without FSDP; resume it without --distributed fsdp "
                             f"(or start again)")
        from safetensors.torch import load_file

        if trainable_only:
            from .lora import trainable_state_dict

            weights = load_file(os.path.join(path, ADAPTER_STATE_FILE))
            expected = set(trainable_state_dict(hf_model))
            if set(weights) != expected:
                raise ValueError(f"checkpoint {path} does not match the adapted model (its trainable tensors "
                                 f"differ: {sorted(set(weights) ^ expected)[:3]})")
            unexpected = hf_model.load_state_dict(weights, strict=False).unexpected_keys
            if unexpected:  # never silently: strict=False only skips the frozen base
                raise ValueError(f"checkpoint {path}: {unexpected[:3]} did not load into the adapted model")
        else:
            weights = load_file(os.path.join(path, "model.safetensors"))
            missing, unexpected = hf_model.load_state_dict(weights, strict=False)
            tied = set(getattr(hf_model, "_tied_weights_keys", None) or [])
            if unexpected or [k for k in missing if k not in tied]:
                raise ValueError(f"checkpoint {path} does not match the model (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]})")
        optimizer.load_state_dict(state["optimizer"])
    rank, world = _world()
    by_rank = state.get("rng_by_rank") or [state["rng"]]
    set_rng_state(by_rank[rank] if len(by_rank) == world else state["rng"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def clean_temporaries(ckpt_root: str) -> None:
    """Remove what a killed save left behind (temporary folders and pointer files)."""
    for entry in os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []:
        if entry.startswith((".tmp-", ".latest-")):
            path = os.path.join(ckpt_root, entry)
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.remove(path)
