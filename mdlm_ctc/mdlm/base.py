"""The base model shipped with the package, and what identifies a base.

The default comparison fine-tunes from a tiny CE-trained base. Training that base takes minutes and,
like any training run, its bits depend on float rounding (thread count, CPU instruction set), so two
machines would otherwise compare the objectives on two different bases. The package therefore ships
the default job's base (``assets/base/``: ``model.safetensors``, ``config.json``, the tokenizer,
``mdlm_ctc.json`` and :data:`IDENTITY_FILE`), built by ``python -m mdlm_ctc.mdlm.build_base build``.
``compare`` and ``ablate`` use it when their base settings are the recorded ones (``base_source``
``auto``) and say so in the report; any other setting trains the base in the run folder instead.

An identity (:func:`describe`) records the SHA-256 of the weights, the settings that made them
(``compare.settings_of`` of the base configuration, with the SHA-256 of the initial weights), the
thread count, the machine, the commit, the versions, the number of steps, the final training loss,
the training seconds and whether the run was resumed after an interruption.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time

from .checkpoint import sha256_of

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "base")
IDENTITY_FILE = "identity.json"
WEIGHTS_FILE = "model.safetensors"


def commit() -> str:
    """The short commit of the code that runs (``?`` outside a git checkout)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """The machine in words: architecture, logical CPUs and CPU model (its instruction set sets float rounding)."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()})"


def weights_sha256(folder: str) -> str:
    return sha256_of(os.path.join(folder, WEIGHTS_FILE))


def describe(folder: str, settings: dict, *, threads: int, summary: dict | None = None,
             seconds: float | None = None) -> dict:
    """The identity of the base model in ``folder`` (see the module docstring)."""
    import torch
    import transformers

    summary = summary or {}
    final = summary.get("final") or {}
    return {
        "sha256": weights_sha256(folder), "settings": json.loads(json.dumps(settings)), "threads": int(threads),
        "machine": machine(), "commit": commit(), "torch": torch.__version__, "transformers": transformers.__version__,
        "steps": summary.get("steps"), "final_loss": final.get("loss"),
        "train_seconds": summary.get("train_seconds") if seconds is None else round(seconds, 1),
        "resumed_from": summary.get("resumed_from", 0), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def read_identity(folder: str | None = None) -> dict | None:
    path = os.path.join(folder or ASSET_DIR, IDENTITY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def install(source: str, out: str, identity: dict) -> None:
    """Copy the model folder ``source`` to ``out`` (atomically) and write its identity there."""
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    with open(os.path.join(tmp, IDENTITY_FILE), "w") as f:
        json.dump(identity, f, indent=1)
        f.write("\n")
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def check_shipped(settings: dict, vocab: dict, same_settings, folder: str | None = None) -> tuple[bool, str]:
    """Whether the shipped base is the base of a job with these base ``settings`` and tokenizer ``vocab``;
    (True, "") or (False, the reason in words). ``same_settings(recorded, current)`` compares settings."""
    folder = folder or ASSET_DIR
    identity = read_identity(folder)
    if identity is None:
        return False, f"no shipped base in this installation ({folder})"
    if not same_settings(identity["settings"], settings):
        changed = _changed(identity["settings"], settings)
        return False, f"this job's base settings differ from the shipped base's ({', '.join(changed) or 'settings'})"
    if weights_sha256(folder) != identity["sha256"]:
        return False, f"the shipped base's weights do not match their recorded SHA-256 ({folder} is damaged)"
    with open(os.path.join(folder, "tokenizer.json")) as f:
        shipped_vocab = json.load(f)["model"]["vocab"]
    if shipped_vocab != vocab:
        return False, "this job's tokenizer differs from the shipped base's"
    return True, ""


def _changed(recorded: dict, current: dict) -> list[str]:
    out = []
    for section, values in recorded.items():
        now = current.get(section)
        if isinstance(values, dict) and isinstance(now, dict):
            out += [f"{k}: {v!r} shipped, {now.get(k)!r} here" for k, v in values.items() if now.get(k) != v]
        elif values != now:
            out.append(section)
    return out


def base_identity(folder: str, summary: dict | None = None) -> dict:
    """The short identity an ablation records of the base it fine-tuned from (and a report compares with its
    own): the SHA-256 of the weights, the thread count that built them, and whether they are the shipped ones."""
    import torch

    ident = (summary or {}).get("identity") or {}
    return {"sha256": weights_sha256(folder), "threads": ident.get("threads", torch.get_num_threads()),
            "origin": (summary or {}).get("origin", "trained")}
