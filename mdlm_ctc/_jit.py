"""Development path: compile ``csrc/`` with ninja at run time (``MDLM_CTC_JIT=1``).

Used on a machine where the package was installed without building ``mdlm_ctc._C`` (for example a
bare GPU machine with no network: ``MDLM_CTC_BUILD=none pip install -e .`` then ``MDLM_CTC_JIT=1``).
It needs the source tree (``csrc/`` next to ``mdlm_ctc/``), a C++ compiler and ninja; the CUDA
kernels are compiled too when torch has CUDA and ``nvcc`` is found.

To stay within about two minutes on a 16-core machine, the CUDA file is compiled for the
architecture of the GPU that is present only (``MDLM_CTC_CUDA_ARCHS`` overrides it, e.g. "90"), the
three sources compile in parallel (ninja; ``MAX_JOBS`` caps the jobs), and the build directory is
reused across runs (``MDLM_CTC_JIT_DIR``, default torch's extension cache), so only the first run pays.
"""

from __future__ import annotations

import os
import shutil

import torch

from . import _build_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def sources(with_cuda: bool) -> list[str]:
    names = _build_flags.SOURCES_CPU + (_build_flags.SOURCES_CUDA if with_cuda else ())
    return [os.path.join(CSRC, name) for name in names]


def cuda_archs() -> list[str]:
    """``MDLM_CTC_CUDA_ARCHS`` ("90", "80;90", "90+PTX"), else the capability of every visible GPU
    (a lazy torch.cuda query: this only runs when the JIT build is requested), else "90"."""
    env = os.environ.get("MDLM_CTC_CUDA_ARCHS")
    if env:
        return _build_flags.parse_archs(env)
    archs: list[str] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            if f"{major}{minor}" not in archs:
                archs.append(f"{major}{minor}")
    return archs or ["90"]


def cuda_unavailable_reason() -> str | None:
    """Why the JIT build would leave out the CUDA kernels, or None if it will compile them."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _build_flags.cuda_home() is None:
        return "no CUDA toolkit (nvcc) was found: set CUDA_HOME or put nvcc on PATH"
    if not os.path.exists(os.path.join(CSRC, "slack_ctc_cuda.cu")):
        return f"{os.path.join(CSRC, 'slack_ctc_cuda.cu')} is missing"
    return None


def load(verbose: bool = False) -> None:
    """Compile and load the kernels (the ops register themselves under ``torch.ops.mdlm_ctc_C``).

    Raises RuntimeError with what is missing when nothing can be built."""
    from torch.utils import cpp_extension

    if not os.path.isdir(CSRC):
        raise RuntimeError(f"no source tree at {CSRC}; the JIT path needs a checkout of the repository "
                           "(or install a wheel with the prebuilt mdlm_ctc._C)")
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as error:
        raise RuntimeError("the JIT build of the kernels needs ninja (`pip install ninja`, or the system "
                           "package) and none was found; without it, install with a C++ compiler present so "
                           "that setup.py builds mdlm_ctc._C ahead of time") from error
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"the JIT build of the kernels needs a C++ compiler and {compiler!r} was not found "
                           "(set CXX); use backend=\"reference\" (pure PyTorch) or backend=\"triton\" meanwhile")
    with_cuda = cuda_unavailable_reason() is None
    if with_cuda:
        home = _build_flags.cuda_home()
        os.environ.setdefault("CUDA_HOME", home)
        if cpp_extension.CUDA_HOME is None:  # torch looked before CUDA_HOME was set
            cpp_extension.CUDA_HOME = home
    build_directory = os.environ.get("MDLM_CTC_JIT_DIR")
    if build_directory:
        os.makedirs(build_directory, exist_ok=True)
    cpp_extension.load(
        name="mdlm_ctc_C_jit_cuda" if with_cuda else "mdlm_ctc_C_jit",
        sources=sources(with_cuda),
        extra_include_paths=[CSRC],
        extra_cflags=_build_flags.cpu_flags() + (["-DMDLM_CTC_WITH_CUDA=1"] if with_cuda else []),
        extra_cuda_cflags=_build_flags.cuda_flags(cuda_archs()) if with_cuda else None,
        extra_ldflags=["-fopenmp"],
        build_directory=build_directory,
        is_python_module=False,
        verbose=verbose,
    )
