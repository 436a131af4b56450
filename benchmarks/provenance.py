"""Which code a measurement ran: commit, dirty flag and tree hash, without torch (the GPU check's driver
uses it before anything is installed), and the append-only JSONL writes every row goes through.

A lent GPU machine gets a copy of the working tree without ``.git``. So ``benchmarks/gpu_prep.sh`` writes,
on the development machine, ``.gpu_check/provenance.json``: the commit, whether the tree was dirty
(tracked changes or untracked files, which travel too), and the SHA-256 of every file that travels; the
driver checks those hashes on the GPU machine (``tree_matches``: False when the tree changed after the
prep step) and hands the result to every process it starts through ``MDLM_CTC_COMMIT``,
``MDLM_CTC_DIRTY``, ``MDLM_CTC_TREE`` and ``MDLM_CTC_TREE_MATCHES``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREP_FILE = os.path.join(ROOT, ".gpu_check", "provenance.json")
ENV = {"commit": "MDLM_CTC_COMMIT", "dirty": "MDLM_CTC_DIRTY", "tree": "MDLM_CTC_TREE",
       "tree_matches": "MDLM_CTC_TREE_MATCHES"}


@functools.lru_cache(maxsize=None)
def provenance() -> dict:
    """``commit`` (``+dirty`` appended for a dirty tree), ``dirty`` (None when unknown), ``tree`` (hash of the
    prep step's file hashes, where there is one), ``tree_matches`` and ``source``: the driver's environment
    variables, else ``git``, else the prep file (checked against the files here), else "unknown"."""
    if os.environ.get(ENV["commit"]):
        def flag(name):
            value = os.environ.get(ENV[name])
            return None if value in (None, "") else value == "1"
        return {"commit": os.environ[ENV["commit"]], "dirty": flag("dirty"), "tree": os.environ.get(ENV["tree"]) or None,
                "tree_matches": flag("tree_matches"), "source": "env"}
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"commit": rev + ("+dirty" if dirty else ""), "dirty": bool(dirty), "tree": None,
                "tree_matches": None, "source": "git"}
    except (OSError, subprocess.CalledProcessError):
        pass
    prep = read_prep_file()
    if prep:
        return {"commit": prep["commit"] + ("+dirty" if prep.get("dirty") else ""), "dirty": prep.get("dirty"),
                "tree": prep.get("tree"), "tree_matches": tree_matches(prep), "source": "prep file"}
    return {"commit": "unknown", "dirty": None, "tree": None, "tree_matches": None, "source": "none"}


def as_env(prov: dict) -> dict:
    """``provenance()`` as the environment the driver's children read it from."""
    def text(value):
        return "" if value is None else ("1" if value is True else "0" if value is False else str(value))
    return {ENV[key]: text(prov.get(key)) for key in ENV}


def read_prep_file() -> dict | None:
    try:
        with open(PREP_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def file_sha256(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def tree_hash(hashes: dict) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12]


def tree_matches(prep: dict) -> bool | None:
    """Whether every file the prep step hashed still has that content here (None without hashes)."""
    files = prep.get("files")
    if not files:
        return None
    return all(file_sha256(os.path.join(ROOT, path)) == sha for path, sha in files.items())


def append_jsonl(path: str, row: dict) -> None:
    """Append one row as one line: a single write on an append-only descriptor, then fsync (a process killed
    right after keeps the row; concurrent writers never interleave within a line)."""
    data = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(paths) -> list[dict]:
    """The rows of JSONL files (missing files and torn lines are skipped)."""
    rows = []
    for path in [paths] if isinstance(paths, str) else (paths or ()):
        try:
            with open(path) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
        except OSError:
            continue
    return rows


KEY_FIELDS = ("bench", "workload", "provider", "variant", "dtype", "collapse", "timed", "B", "T", "U", "V", "D",
              "chunk_len", "chunk_size", "default_chunk", "dry_run", "commit", "tree")
"""What makes two benchmark rows the same measurement: the workload and provider at one configuration, on one
commit and tree; :func:`row_key` adds the GPU's name."""


def row_key(row: dict) -> tuple:
    gpu = row.get("gpu", (row.get("machine") or {}).get("gpu"))
    return tuple(row.get(k) for k in KEY_FIELDS) + (gpu,)
