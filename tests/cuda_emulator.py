"""Build and call the host emulator of the CUDA lattice (``csrc/lattice_cuda_emulator.h``) through ctypes.

Shared by the emulated kernel tests (test_slack_ctc_cuda.py), the mutation suite
(test_cuda_mutations.py) and the launch-planning tests (test_cuda_plan.py).

A library is the runtime (``lattice_cuda_emulator_runtime.cpp``, independent of the kernel) linked with
one or more objects of the kernel side (``lattice_cuda_emulator.cpp``, which includes the kernel). Every
object and library is cached by the content of what it is built from (the sources of its ``csrc``
directory, the compiler and the flags), in ``$MDLM_CTC_EMULATOR_CACHE`` or ``.pytest_cache/d/cuda_emulator``:
the runtime is compiled once for every build, a kernel source that was built before is not built again,
and the objects of one library compile in parallel.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
RUNTIME = "lattice_cuda_emulator_runtime.cpp"
KERNEL_SIDE = "lattice_cuda_emulator.cpp"
FLAGS = ("-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wno-unknown-pragmas")
CACHE_ENTRIES = 400  # the oldest entries beyond this many are removed

ERRORS = {1: "deadlock", 2: "bad configuration", 3: "barrier count or warp-divergent barrier",
          4: "memory access out of range", 5: "a row got no status", 6: "data race",
          7: "read of a cp.async destination before its wait", 8: "access to an exited CTA's shared memory",
          9: "shuffle outside its mask", 10: "read of uninitialised memory",
          11: "DSMEM access to a CTA that has not started", 12: "runaway kernel"}

# The full build: every instantiation, float and double kernels in two objects compiled side by side.
FULL = (("MDLM_EMU_ACC=4",), ("MDLM_EMU_ACC=8", "MDLM_EMU_NO_DRIVER"))
# A small build (a few seconds): float kernels of VT = 2 and 2 stages only (the mutation suite, the plan tests).
SMALL = (("MDLM_EMU_VT=2", "MDLM_EMU_STAGES=2", "MDLM_EMU_FLOAT_ONLY"),)

RESIDENT_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                               ctypes.c_void_p)


def compiler_or_skip_reason():
    """The C++ compiler to build the emulator with, or (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, "the emulator uses ucontext fibers (Linux)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler})"
    return compiler, ""


def cache_dir():
    path = os.environ.get("MDLM_CTC_EMULATOR_CACHE") or os.path.join(ROOT, ".pytest_cache", "d", "cuda_emulator")
    os.makedirs(path, exist_ok=True)
    return path


_COMPILER_IDS = {}


def _compiler_id(compiler):
    if compiler not in _COMPILER_IDS:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        _COMPILER_IDS[compiler] = f"{shutil.which(compiler)}\n{version}"
    return _COMPILER_IDS[compiler]


def _sources_digest(csrc):
    """A digest of every source file of a csrc directory (whatever the kernel side includes)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(csrc)):
        if name.endswith((".h", ".cuh", ".cpp", ".cu")):
            digest.update(name.encode() + b"\0")
            with open(os.path.join(csrc, name), "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()


def _key(*parts):
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


PARTIAL = ".partial-"  # a build in progress: never pruned (a concurrent prune removed one mid-build once)


def _compile(compiler, command, out):
    """Runs `command` writing to a temporary file, then moves it to `out` (atomic: builds may race)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=PARTIAL, suffix=os.path.splitext(out)[1])
    os.close(fd)
    try:
        result = subprocess.run([compiler, *command, "-o", tmp], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"building the emulator failed:\n{compiler} {' '.join(command)}\n{result.stderr[-6000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _prune(cache, keep=()):
    """Removes the oldest entries beyond CACHE_ENTRIES, never one in ``keep`` (objects in use are touched on
    every use, so the shared runtime object stays among the newest while mutants are built beside it)."""
    entries = sorted((os.path.join(cache, n) for n in os.listdir(cache)
                      if n.endswith((".o", ".so")) and not n.startswith(PARTIAL) and os.path.join(cache, n) not in keep),
                     key=os.path.getmtime)
    for path in entries[:-CACHE_ENTRIES]:
        try:
            os.remove(path)
        except OSError:
            pass


def library_path(csrc=CSRC, units=((),), opt="-O1", jobs=None):
    """Builds (or finds in the cache) the emulator library of the sources in ``csrc``: the runtime and one
    object of the kernel side per entry of ``units`` (a tuple of preprocessor definitions each); returns
    its path."""
    compiler, why = compiler_or_skip_reason()
    if compiler is None:
        raise RuntimeError(why)
    cache = cache_dir()
    cid = _compiler_id(compiler)
    runtime_key = _key(cid, "-O2", *FLAGS, open(os.path.join(csrc, RUNTIME)).read(),
                       open(os.path.join(csrc, "lattice_cuda_emulator.h")).read())
    sources = _sources_digest(csrc)
    objects = [(os.path.join(cache, f"runtime-{runtime_key}.o"),
                ["-O2", *FLAGS, "-c", os.path.join(csrc, RUNTIME)])]
    for defines in units:
        flags = [opt, *FLAGS, *[f"-D{d}" for d in defines], f"-I{csrc}"]
        objects.append((os.path.join(cache, f"kernels-{_key(cid, sources, *flags)}.o"),
                        [*flags, "-c", os.path.join(csrc, KERNEL_SIDE)]))
    library = os.path.join(cache, f"emulator-{_key(*[path for path, _ in objects])}.so")
    if os.path.exists(library):
        os.utime(library)
        return library
    for path, _ in objects:
        try:
            os.utime(path)  # in use: the newest entries are the last to be pruned
        except OSError:
            pass
    missing = [(path, command) for path, command in objects if not os.path.exists(path)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or max(1, min(len(missing), os.cpu_count() or 1))) as pool:
        for future in [pool.submit(_compile, compiler, command, path) for path, command in missing]:
            future.result()
    _compile(compiler, ["-shared", *[path for path, _ in objects]], library)
    _prune(cache, keep={library, *[path for path, _ in objects]})
    return library


def load(path):
    """The ctypes handle of an emulator library."""
    lib = ctypes.CDLL(str(path))
    i64, cint, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn = lib.mdlm_ctc_emulate_lattice_band
    fn.argtypes = [cint, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, i64, cint, ptr,
                   cint, cint, cint, cint, cint, cint, ctypes.c_uint64, cint]
    fn.restype = cint
    lib.mdlm_ctc_emulator_last_error.restype = ctypes.c_char_p
    lib.mdlm_ctc_plan_lattice.argtypes = [i64, i64, cint, i64, i64, cint, cint, i64, cint, cint, cint, RESIDENT_FN, ptr,
                                          ctypes.POINTER(i64)]
    lib.mdlm_ctc_plan_lattice.restype = None
    lib.mdlm_ctc_plan_launch_bounds.argtypes = [cint, cint]
    lib.mdlm_ctc_plan_launch_bounds.restype = cint
    return lib


def build(csrc=CSRC, units=((),), opt="-O1"):
    """Builds (or finds) the emulator of the sources in ``csrc``; returns the ctypes handle."""
    return load(library_path(csrc, units, opt))


class EmulatorError(AssertionError):
    def __init__(self, code, message):
        super().__init__(f"emulator: {ERRORS.get(code, code)}: {message}")
        self.code = code


def emulate(lib, table, special, targets, T_b, U_b, mode, shift, need_grad, *, cluster=1, threads=32, vt=1,
            stages=2, lazy=True, preempt=60, seed=0, late_start=True):
    """Runs the CUDA lattice code in the emulator on CPU tensors; returns (nll, table, special).
    Raises EmulatorError when the emulator reports a violation (race, deadlock, ...)."""
    table, special = table.clone().contiguous(), special.clone().contiguous()
    targets, T_b, U_b = targets.long().contiguous(), T_b.long().contiguous(), U_b.long().contiguous()
    B, T, W = table.shape
    nll = torch.empty(B, dtype=table.dtype)
    rc = lib.mdlm_ctc_emulate_lattice_band(
        int(table.dtype == torch.float64), table.data_ptr(), special.data_ptr(), targets.data_ptr(), T_b.data_ptr(),
        U_b.data_ptr(), B, T, W, targets.shape[1], mode, shift, int(need_grad), nll.data_ptr(), cluster, threads, vt,
        stages, int(lazy), preempt, seed, int(late_start))
    if rc != 0:
        raise EmulatorError(rc, lib.mdlm_ctc_emulator_last_error().decode())
    return nll, table, special
