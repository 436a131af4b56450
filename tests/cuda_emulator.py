"""Build and call the host emulator of the CUDA lattice (``csrc/lattice_cuda_emulator.h``) through ctypes.

Shared by the emulated kernel tests (test_slack_ctc_cuda.py), the mutation suite
(test_cuda_mutations.py) and the launch-planning tests (test_cuda_plan.py).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

ERRORS = {1: "deadlock", 2: "bad configuration", 3: "named-barrier count mismatch",
          4: "shared-memory address out of range", 5: "a row got no status", 6: "data race",
          7: "read of a cp.async destination before its wait", 8: "access to an exited CTA's shared memory",
          9: "shuffle outside its mask", 10: "read of uninitialised shared memory"}

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


def build(library, csrc=CSRC, defines=(), opt="-O1"):
    """Compiles the emulator from the headers in ``csrc`` into ``library``; returns the ctypes handle."""
    compiler, why = compiler_or_skip_reason()
    if compiler is None:
        raise RuntimeError(why)
    command = [compiler, opt, "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-x", "c++", "-DMDLM_CTC_EMULATOR_API",
               *[f"-D{d}" for d in defines], f"-I{csrc}", os.path.join(csrc, "lattice_cuda_emulator.h"),
               "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"building the emulator failed:\n{' '.join(command)}\n{result.stderr[-6000:]}")
    lib = ctypes.CDLL(str(library))
    i64, cint, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn = lib.mdlm_ctc_emulate_lattice_band
    fn.argtypes = [cint, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, i64, cint, ptr,
                   cint, cint, cint, cint, cint, cint, ctypes.c_uint64]
    fn.restype = cint
    lib.mdlm_ctc_emulator_last_error.restype = ctypes.c_char_p
    lib.mdlm_ctc_plan_lattice.argtypes = [i64, i64, cint, i64, i64, cint, cint, i64, cint, cint, cint, RESIDENT_FN, ptr,
                                          ctypes.POINTER(i64)]
    lib.mdlm_ctc_plan_lattice.restype = None
    lib.mdlm_ctc_plan_launch_bounds.argtypes = [cint, cint]
    lib.mdlm_ctc_plan_launch_bounds.restype = cint
    return lib


class EmulatorError(AssertionError):
    def __init__(self, code, message):
        super().__init__(f"emulator: {ERRORS.get(code, code)}: {message}")
        self.code = code


def emulate(lib, table, special, targets, T_b, U_b, mode, shift, need_grad, *, cluster=1, threads=32, vt=1,
            stages=2, lazy=True, preempt=60, seed=0):
    """Runs the CUDA lattice code in the emulator on CPU tensors; returns (nll, table, special).
    Raises EmulatorError when the emulator reports a violation (race, deadlock, ...)."""
    table, special = table.clone().contiguous(), special.clone().contiguous()
    targets, T_b, U_b = targets.long().contiguous(), T_b.long().contiguous(), U_b.long().contiguous()
    B, T, W = table.shape
    nll = torch.empty(B, dtype=table.dtype)
    rc = lib.mdlm_ctc_emulate_lattice_band(
        int(table.dtype == torch.float64), table.data_ptr(), special.data_ptr(), targets.data_ptr(), T_b.data_ptr(),
        U_b.data_ptr(), B, T, W, targets.shape[1], mode, shift, int(need_grad), nll.data_ptr(), cluster, threads, vt,
        stages, int(lazy), preempt, seed)
    if rc != 0:
        raise EmulatorError(rc, lib.mdlm_ctc_emulator_last_error().decode())
    return nll, table, special
