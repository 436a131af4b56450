"""Development path: compile ``csrc/`` with ninja at run time (``MDLM_CTC_JIT=1``).

Used on a machine where the package was installed without building ``mdlm_ctc._C`` (for example a
bare GPU machine with no network: ``MDLM_CTC_BUILD=none pip install -e .`` then ``MDLM_CTC_JIT=1``).
It needs the source tree (``csrc/`` next to ``mdlm_ctc/``), a C++ compiler and ninja; the CUDA
kernels are compiled too when torch has CUDA and ``nvcc`` is found.
"""

from __future__ import annotations

import os
import platform
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def sources(with_cuda: bool) -> list[str]:
    files = [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "slack_ctc_cpu.cpp")]
    if with_cuda:
        files.append(os.path.join(CSRC, "slack_ctc_cuda.cu"))
    return files


def cpu_flags() -> list[str]:
    arch = os.environ.get("MDLM_CTC_CPU_ARCH", "native")
    flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64") and arch:
        flags.append("-mprefer-vector-width=512")  # use AVX-512 where -march has it
    return flags + ([f"-march={arch}"] if arch else [])


def cuda_flags() -> list[str]:
    archs = os.environ.get("MDLM_CTC_CUDA_ARCHS", "90")
    flags = ["-O3", "-std=c++20", "-lineinfo"]
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "").replace("+PTX", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def load(verbose: bool = False) -> None:
    from torch.utils import cpp_extension

    if not os.path.isdir(CSRC):
        raise RuntimeError(f"no source tree at {CSRC}; the JIT path needs a checkout of the repository")
    with_cuda = (torch.version.cuda is not None and (shutil.which("nvcc") or os.environ.get("CUDA_HOME"))
                 and os.path.exists(os.path.join(CSRC, "slack_ctc_cuda.cu")))
    cpp_extension.load(
        name="mdlm_ctc_C_jit",
        sources=sources(bool(with_cuda)),
        extra_include_paths=[CSRC],
        extra_cflags=cpu_flags() + (["-DMDLM_CTC_WITH_CUDA=1"] if with_cuda else []),
        extra_cuda_cflags=cuda_flags() if with_cuda else None,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )
