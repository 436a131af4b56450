"""Compiler flags and toolkit discovery, shared by setup.py (ahead-of-time build) and _jit.py (ninja at
run time). Imports nothing beyond the standard library: setup.py loads this file directly, before torch
or the package can be imported."""

from __future__ import annotations

import os
import platform
import shutil

SOURCES_CPU = ("ops.cpp", "slack_ctc_cpu.cpp")
SOURCES_CUDA = ("slack_ctc_cuda.cu",)


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: ``CUDA_HOME``/``CUDA_PATH``, else the one ``nvcc`` on PATH belongs
    to, else ``/usr/local/cuda``; None when no ``nvcc`` is found."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def cpu_flags() -> list[str]:
    """C++ flags of the CPU kernels. ``-march`` from ``MDLM_CTC_CPU_ARCH`` (``native`` by default: the
    extension is built on the machine that runs it; e.g. ``x86-64-v2`` for a portable build, empty for
    none). No fast-math: the lattice relies on exact -inf handling (csrc/logspace.h)."""
    arch = os.environ.get("MDLM_CTC_CPU_ARCH", "native")
    flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64") and arch:
        flags.append("-mprefer-vector-width=512")  # use AVX-512 where -march has it
    if arch:
        flags.append(f"-march={arch}")
    return flags


def gencode_flags(archs: list[str]) -> list[str]:
    """``-gencode`` flags for compute capabilities like "90" (SASS) or "90+PTX" (PTX, JIT-compiled by
    newer GPUs). Raises ValueError on anything else."""
    flags = []
    for arch in archs:
        arch = arch.strip().replace(".", "")
        if not arch:
            continue
        num = arch[: -len("+PTX")] if arch.endswith("+PTX") else arch
        if not num.isdigit():
            raise ValueError(f"MDLM_CTC_CUDA_ARCHS: {arch!r} is not a compute capability like 90 or 90+PTX")
        code = f"compute_{num}" if arch.endswith("+PTX") else f"sm_{num}"
        flags.append(f"-gencode=arch=compute_{num},code={code}")
    if not flags:
        raise ValueError("MDLM_CTC_CUDA_ARCHS names no architecture")
    return flags


def parse_archs(text: str) -> list[str]:
    """``"90;90+PTX"`` or ``"80,90"`` -> ``["90", "90+PTX"]``."""
    return [a.strip().replace(".", "") for a in text.replace(",", ";").split(";") if a.strip()]


def cuda_flags(archs: list[str]) -> list[str]:
    """nvcc flags: -O3 for host and device, -lineinfo for readable profiles, no fast-math."""
    return ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"] + gencode_flags(archs)
